//! S3 faults, through a fault-injecting proxy in front of the real S3 test server: transient
//! errors are retried and the backup is whole; persistent ones publish nothing and leave no open
//! upload; a failing listing makes prune delete nothing; a truncated download never reaches
//! pg_restore. A canary password and a canary S3 secret ride along, and no output ever shows them.

use std::path::PathBuf;
use std::time::Duration;

use lifeboat_tests::s3proxy::{HttpFault, Rule, S3Proxy};
use lifeboat_tests::*;

const PG_CANARY: &str = "canary-pg-7f3a";
const S3_CANARY: &str = "canary-s3-9b1c";

struct Fx {
    pg: &'static Postgres,
    db: String,
    dir: tempfile::TempDir,
    key: Key,
    policy: PathBuf,
    bucket: String,
    proxy: S3Proxy,
    env: Vec<(String, String)>,
    outputs: Vec<String>,
}

/// A database whose dump spans several 5 MiB parts, a role with the canary password, a bucket
/// behind a fresh proxy, and a policy that uses all three.
fn setup(prefix: &str) -> Fx {
    let pg = postgres();
    let db = pg.create_db(prefix);
    let role = format!("r_{}", suffix());
    pg.psql(
        &db,
        &format!(
            "create role {role} login password '{PG_CANARY}' superuser;
             create table t as select g as id, md5(g::text) || md5((g * 7)::text) as a, md5(random()::text) as b
             from generate_series(1, 250000) g;"
        ),
    );
    let s3 = s3();
    let bucket = rt().block_on(s3.create_bucket());
    let proxy = S3Proxy::start(&s3.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = dir.path().join("pgpass");
    std::fs::write(&pwfile, PG_CANARY).unwrap();
    let policy = write_policy(
        dir.path(),
        &format!(
            "url = \"s3://{bucket}/repo\"\nendpoint = \"{}\"\npart_size = \"5MiB\"",
            proxy.endpoint
        ),
        &key.recipient,
        &format!(
            "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"postgres://{role}@127.0.0.1:{}/{db}\"\npassword_file = \"{}\"\nglobals = false\n",
            pg.port,
            pwfile.display()
        ),
    );
    let mut env = s3.env();
    for (k, v) in env.iter_mut() {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = S3_CANARY.to_string();
        }
    }
    Fx {
        pg,
        db,
        dir,
        key,
        policy,
        bucket,
        proxy,
        env,
        outputs: Vec::new(),
    }
}

impl Fx {
    fn run(&mut self, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        let p = self.policy.to_str().unwrap().to_string();
        all.extend(["--policy", &p]);
        let r = lifeboat(self.dir.path(), &all, &self.env);
        self.outputs.push(format!("{}{}", r.stdout, r.stderr));
        r
    }

    /// `lifeboat restore` of the latest backup into a new database `target`.
    fn restore(&mut self, target: &str, extra: &[&str]) -> Run {
        let (args, env) = self.restore_command(target, extra);
        self.env = env;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args)
    }

    /// The arguments (without the policy) and environment of [`Fx::restore`].
    fn restore_command(
        &self,
        target: &str,
        extra: &[&str],
    ) -> (Vec<String>, Vec<(String, String)>) {
        let to = self.pg.url(target);
        let id = self.key.identity.to_str().unwrap().to_string();
        let mut env = self.env.clone();
        env.push(("PGPASSWORD".into(), self.pg.password.clone()));
        let mut args: Vec<String> = [
            "restore",
            "--source",
            "app-db",
            "--to",
            &to,
            "--identity",
            &id,
        ]
        .map(String::from)
        .into();
        args.extend(extra.iter().map(|a| a.to_string()));
        (args, env)
    }

    fn verify(&mut self) -> Run {
        let p = self.policy.to_str().unwrap().to_string();
        let id = self.key.identity.to_str().unwrap().to_string();
        let r = verifier(
            self.dir.path(),
            &["verify", "--policy", &p, "--identity", &id],
            &self.env,
        );
        self.outputs.push(format!("{}{}", r.stdout, r.stderr));
        r
    }

    fn keys(&self) -> Vec<String> {
        rt().block_on(s3().keys(&self.bucket, "repo/backups/"))
    }

    fn manifests(&self) -> usize {
        self.keys()
            .iter()
            .filter(|k| k.ends_with("/manifest.json"))
            .count()
    }

    fn pending(&self) -> Vec<String> {
        rt().block_on(s3().pending_uploads(&self.bucket))
    }
}

impl Drop for Fx {
    /// Whatever happened, no output showed a secret.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for out in &self.outputs {
            assert!(
                !out.contains(PG_CANARY),
                "the database password was printed:\n{out}"
            );
            assert!(
                !out.contains(S3_CANARY),
                "the S3 secret was printed:\n{out}"
            );
        }
        let repo: Vec<String> = self.keys();
        assert!(
            !repo.iter().any(|k| k.contains("canary")),
            "a secret in an object key"
        );
    }
}

#[test]
fn transient_s3_faults_are_retried_and_the_backup_is_whole() {
    let mut fx = setup("transient");
    fx.proxy
        .add(Rule::new("PUT", "partNumber=2", HttpFault::Status(503, "SlowDown")).times(2));
    fx.proxy
        .add(Rule::new("PUT", "partNumber=1", HttpFault::ResetMidBody).times(1));
    fx.proxy.add(
        Rule::new(
            "PUT",
            "manifest.json",
            HttpFault::Status(500, "InternalError"),
        )
        .times(1),
    );
    fx.proxy.add(
        Rule::new(
            "POST",
            "?uploads",
            HttpFault::Delay(std::time::Duration::from_secs(1)),
        )
        .times(1),
    );
    fx.proxy
        .add(Rule::new("GET", "database.dump", HttpFault::Status(503, "SlowDown")).times(1));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "backup through transient faults: {}", r.stderr);
    let fired = fx.proxy.fired();
    assert!(fired.len() >= 5, "faults injected: {fired:?}");
    assert!(
        fx.proxy
            .requests()
            .iter()
            .filter(|r| r.contains("partNumber="))
            .count()
            >= 3,
        "the dump spans several parts"
    );
    let r = fx.run(&["check", "--read-data"]);
    assert_eq!(r.code, 0, "check after retries: {}", r.stderr);
    let v = fx.verify();
    assert_eq!(
        v.code, 0,
        "the backup made through faults verifies: {}",
        v.stderr
    );
    assert!(fx.pending().is_empty(), "no upload left open");
}

#[test]
fn a_complete_answered_with_an_error_body_publishes_nothing() {
    let mut fx = setup("complete");
    fx.proxy
        .add(Rule::new("POST", "uploadId=", HttpFault::OkWithErrorBody));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("complete multipart upload")
            && r.stderr.contains("InternalError (HTTP 200)"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.manifests(), 0);
    assert!(
        fx.pending().is_empty(),
        "the multipart upload was aborted: {:?}",
        fx.pending()
    );
    // The server recovers; the next run succeeds.
    fx.proxy.clear();
    assert_eq!(fx.run(&["backup"]).code, 0);
    assert_eq!(fx.manifests(), 1);
}

#[test]
fn credentials_the_store_refuses_exit_12_from_every_command() {
    let mut fx = setup("creds");
    assert_eq!(fx.run(&["backup"]).code, 0);
    let before = fx.keys();
    // What S3 answers a wrong secret key, to every request.
    fx.proxy.add(Rule::new(
        "*",
        "",
        HttpFault::Status(403, "SignatureDoesNotMatch"),
    ));
    let target = format!(
        "postgresql://127.0.0.1:{}/restored_{}",
        fx.pg.port,
        suffix()
    );
    for cmd in [
        &["backup"][..],
        &["list"],
        &["check"],
        &["prune"],
        &["restore", "--source", "app-db", "--to", &target],
    ] {
        let r = fx.run(cmd);
        assert_eq!(r.code, 12, "{cmd:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("SignatureDoesNotMatch"),
            "{cmd:?}: {}",
            r.stderr
        );
    }
    let r = fx.verify();
    assert_eq!(r.code, 12, "{}", r.stderr);
    // An unknown access key, on the first request of a backup.
    fx.proxy.clear();
    fx.proxy.add(Rule::new(
        "*",
        "",
        HttpFault::Status(403, "InvalidAccessKeyId"),
    ));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(r.stderr.contains("InvalidAccessKeyId"), "{}", r.stderr);
    fx.proxy.clear();
    assert_eq!(fx.keys(), before, "nothing was written or deleted");
    assert!(fx.pending().is_empty());
}

#[test]
fn a_manifest_that_cannot_be_written_publishes_nothing_and_cleans_up() {
    let mut fx = setup("manifest");
    fx.proxy.add(Rule::new(
        "PUT",
        "manifest.json",
        HttpFault::Status(500, "InternalError"),
    ));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("manifest"), "{}", r.stderr);
    assert!(
        fx.keys().is_empty(),
        "the run's data objects were removed: {:?}",
        fx.keys()
    );
    assert!(fx.pending().is_empty());
}

#[test]
fn a_bucket_that_requires_sse_kms_gets_it_on_every_write() {
    let mut fx = setup("ssekms");
    // The bucket's policy, as the proxy enforces it: PutObject and CreateMultipartUpload without
    // `x-amz-server-side-encryption: aws:kms` are refused.
    let sse = ("x-amz-server-side-encryption", "aws:kms");
    fx.proxy.add(
        Rule::new("PUT", "", HttpFault::Status(403, "AccessDenied"))
            .unless("partNumber")
            .without_header(sse.0, sse.1),
    );
    fx.proxy.add(
        Rule::new("POST", "?uploads", HttpFault::Status(403, "AccessDenied"))
            .without_header(sse.0, sse.1),
    );
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 12, "without the header: {}", r.stderr);
    assert!(r.stderr.contains("AccessDenied"), "{}", r.stderr);
    assert_eq!(fx.manifests(), 0);
    assert!(fx.pending().is_empty(), "{:?}", fx.pending());

    let text = std::fs::read_to_string(&fx.policy).unwrap();
    let with = text.replacen(
        "part_size = \"5MiB\"",
        "part_size = \"5MiB\"\nserver_side_encryption = \"aws:kms\"\nkms_key_id = \"alias/lifeboat\"",
        1,
    );
    std::fs::write(&fx.policy, with).unwrap();
    let refused = fx.proxy.fired().len();
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "with server_side_encryption: {}", r.stderr);
    assert_eq!(fx.proxy.fired().len(), refused, "{:?}", fx.proxy.fired());
    assert_eq!(fx.manifests(), 1);
    // Multipart and single-put objects alike are stored under the key asked for.
    let keys = fx.keys();
    rt().block_on(async {
        let client = s3().client().await;
        for key in keys {
            let head = client.head_object().bucket(&fx.bucket).key(&key);
            let head = head.send().await.unwrap();
            assert_eq!(
                head.server_side_encryption().map(|s| s.as_str()),
                Some("aws:kms"),
                "{key}"
            );
            assert!(
                head.ssekms_key_id()
                    .is_some_and(|k| k.contains("alias/lifeboat")),
                "{key}: {:?}",
                head.ssekms_key_id()
            );
        }
    });
    fx.proxy.clear();
    let r = fx.run(&["check", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_server_without_list_multipart_uploads_is_still_checked() {
    let mut fx = setup("nolistmpu");
    assert_eq!(fx.run(&["backup"]).code, 0);
    fx.proxy.add(Rule::new(
        "GET",
        "?uploads",
        HttpFault::Status(501, "NotImplemented"),
    ));
    let r = fx.run(&["check", "--read-data", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["backups"], 1, "{report:#}");
    assert!(report["bytes_read"].as_u64().unwrap() > 0, "{report:#}");
    assert!(
        report["uploads_unlisted"]
            .as_str()
            .is_some_and(|w| w.contains("NotImplemented (HTTP 501)")),
        "{report:#}"
    );
    // A 501 is permanent: asked once, not retried.
    let asked = fx
        .proxy
        .fired()
        .iter()
        .filter(|f| f.contains("?uploads"))
        .count();
    assert_eq!(asked, 1, "{:?}", fx.proxy.fired());
    let r = fx.run(&["check"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("warning: unfinished uploads were not listed, the server refused"),
        "{}",
        r.stderr
    );
    // Prune prunes, and says the sweep was not done.
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("warning: unfinished uploads were not listed, the server refused"),
        "{}",
        r.stderr
    );
    // Damage is still found.
    fx.proxy.clear();
    let manifest = fx
        .keys()
        .into_iter()
        .find(|k| k.ends_with("/manifest.json"))
        .unwrap();
    let object = manifest.replace("manifest.json", "database.dump.zst.age");
    rt().block_on(async {
        let client = s3().client().await;
        let del = client.delete_object().bucket(&fx.bucket).key(&object);
        del.send().await.unwrap();
    });
    fx.proxy.add(Rule::new(
        "GET",
        "?uploads",
        HttpFault::Status(501, "NotImplemented"),
    ));
    let r = fx.run(&["check"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("database.dump.zst.age"), "{}", r.stderr);
    fx.proxy.clear();
}

#[test]
fn a_listing_that_fails_makes_prune_delete_nothing() {
    let mut fx = setup("listing");
    for _ in 0..2 {
        assert_eq!(fx.run(&["backup"]).code, 0);
    }
    let before = fx.keys();
    fx.proxy.add(Rule::new(
        "GET",
        "list-type=2",
        HttpFault::Status(500, "InternalError"),
    ));
    let r = fx.run(&["prune"]);
    assert_ne!(
        r.code, 0,
        "prune must fail when it cannot list: {}",
        r.stderr
    );
    fx.proxy.clear();
    assert_eq!(fx.keys(), before, "nothing was deleted");
}

#[test]
fn a_truncated_download_never_reaches_pg_restore() {
    let mut fx = setup("truncated");
    assert_eq!(fx.run(&["backup"]).code, 0);
    fx.proxy.add(Rule::new(
        "GET",
        "database.dump.zst.age",
        HttpFault::TruncateResponse,
    ));
    let target = format!("restored_{}", suffix());
    let r = fx.restore(&target, &[]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    eprintln!(
        "truncated download: restore exit {}: {}",
        r.code,
        r.stderr.lines().next().unwrap_or("")
    );
    let exists = fx.pg.psql(
        "postgres",
        &format!("select count(*) from pg_database where datname = '{target}'"),
    );
    assert_eq!(exists, "0", "the target database was not even created");
    let v = fx.verify();
    assert_ne!(
        v.code, 0,
        "the verifier does not pass a backup it could not read"
    );
    let _ = &fx.db;
}

#[test]
fn a_large_part_downloads_in_ranges_and_a_dropped_range_is_fetched_again_alone() {
    let mut fx = setup("ranges");
    assert_eq!(fx.run(&["backup"]).code, 0);
    // The dump is stored in about 14 MiB: four ranges of 4 MiB. The second and third answers
    // are cut off half way.
    fx.proxy.add(
        Rule::new("GET", "database.dump.zst.age", HttpFault::TruncateResponse)
            .skip(1)
            .times(2),
    );
    let target = format!("restored_{}", suffix());
    let r = fx.restore(&target, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let content = "select count(*), md5(string_agg(a || b, ',' order by id)) from t";
    assert_eq!(
        fx.pg.psql(&target, content),
        fx.pg.psql(&fx.db, content),
        "the restore holds the source's rows"
    );
    // The part in ranges: one GET each, counted once however often it was retried; the two
    // cut off were sent again, alone.
    let out: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    fn largest_stored(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::Object(o) => o
                .iter()
                .map(|(k, v)| match (k.as_str(), v.as_u64()) {
                    ("size_stored", Some(n)) => n,
                    _ => largest_stored(v),
                })
                .max()
                .unwrap_or(0),
            serde_json::Value::Array(a) => a.iter().map(largest_stored).max().unwrap_or(0),
            _ => 0,
        }
    }
    let stored = largest_stored(&out);
    let ranges = stored.div_ceil(4 << 20) as usize;
    assert!(ranges >= 3, "{stored} bytes stored: {out:#}");
    let sent = fx
        .proxy
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET") && r.contains("database.dump.zst.age"))
        .count();
    assert_eq!(fx.proxy.fired().len(), 2, "{:?}", fx.proxy.fired());
    assert_eq!(sent, ranges + 2, "{:?}", fx.proxy.requests());
    assert_eq!(
        out["requests"]["get"].as_u64(),
        Some(ranges as u64),
        "{out:#}"
    );
}

#[test]
fn restore_with_jobs_reads_the_dump_where_it_is_stored_and_refuses_one_replaced_meanwhile() {
    let mut fx = setup("jobsrange");
    // Two backups (before a restore sets PGPASSWORD for its target).
    assert_eq!(fx.run(&["backup"]).code, 0);
    assert_eq!(fx.run(&["backup"]).code, 0);
    let dump_gets = |proxy: &S3Proxy, key: &str| {
        proxy
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains(key))
            .count()
    };
    let stored_size = |fx: &Fx, key: &str| rt().block_on(s3().get(&fx.bucket, key)).len() as u64;
    let dumps = |fx: &Fx| -> Vec<String> {
        let mut v: Vec<String> = fx
            .keys()
            .into_iter()
            .filter(|k| k.ends_with("/database.dump.zst.age"))
            .collect();
        v.sort();
        v
    };
    // Restored by id: ids taken in the same second do not sort by time.
    let (first, newest) = match &dumps(&fx)[..] {
        [first, newest] => (first.clone(), newest.clone()),
        other => panic!("{other:?}"),
    };
    let id_of = |key: &str| key.rsplit('/').nth(1).unwrap().to_string();
    let newest_id = id_of(&newest);
    let size = stored_size(&fx, &newest);
    // The check reads it whole in 4 MiB ranges (the part is over 8 MiB).
    assert!(size > 8 << 20, "{size}");
    let check_gets = size.div_ceil(4 << 20) as usize;
    let spool = fx.dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let spool_arg = spool.to_str().unwrap().to_string();
    let before = dump_gets(&fx.proxy, &newest);
    let target = format!("restored_{}", suffix());
    let r = fx.restore(
        &target,
        &[
            "--jobs",
            "2",
            "--spool-dir",
            &spool_arg,
            "--backup",
            &newest_id,
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("loading 1 table(s)"), "{}", r.stderr);
    let content = "select count(*), md5(string_agg(a || b, ',' order by id)) from t";
    assert_eq!(fx.pg.psql(&target, content), fx.pg.psql(&fx.db, content));
    // Read twice from the store, once to check it and once by range to load it, and never
    // copied into the spool directory.
    let gets = dump_gets(&fx.proxy, &newest) - before;
    assert!(gets > check_gets + 2, "{gets} GETs of the dump");
    // Every one by range: the identity is tried on the header alone, not on a whole download.
    let whole: Vec<String> = fx
        .proxy
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET ") && r.contains(&newest) && !r.contains(" range="))
        .collect();
    assert!(whole.is_empty(), "{whole:?}");
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Replaced in the store after the check, before the load: the newest backup's dump holds
    // the older backup's object by the time the restore opens it to load. Its header is not
    // the manifest's: exit 13, naming it.
    let older = rt().block_on(s3().get(&fx.bucket, &first));
    // Held: the first GET after the check's ranges, which reads the header (to see that the
    // identity opens it, and once for every reader after).
    fx.proxy.add(
        Rule::new("GET", &newest, HttpFault::Delay(Duration::from_secs(4)))
            .skip(check_gets)
            .times(1),
    );
    let before = dump_gets(&fx.proxy, &newest);
    let policy = fx.policy.to_str().unwrap().to_string();
    let (args, env) = fx.restore_command(
        &format!("replaced_{}", suffix()),
        &["--jobs", "2", "--backup", &newest_id, "--policy", &policy],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = std::thread::scope(|s| {
        let restore = s.spawn(|| lifeboat(fx.dir.path(), &args, &env));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while dump_gets(&fx.proxy, &newest) < before + check_gets + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                fx.proxy.requests()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        rt().block_on(async {
            s3().client()
                .await
                .put_object()
                .bucket(&fx.bucket)
                .key(&newest)
                .body(older.clone().into())
                .send()
                .await
                .expect("put the older object")
        });
        restore.join().unwrap()
    });
    fx.proxy.clear();
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        r.stderr.contains("age header's SHA-256") && r.stderr.contains("database.dump.zst.age"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_full_spool_disk_fails_the_restore_before_the_target_is_created() {
    let mut fx = setup("fullspool");
    assert_eq!(fx.run(&["backup"]).code, 0);
    // From S3 the stored dump (several MiB) is spooled before anything is applied; a file size
    // limit of 256 KiB stands for a full disk there.
    let target = format!("full_{}", suffix());
    let policy = fx.policy.to_str().unwrap().to_string();
    let (args, env) = fx.restore_command(&target, &["--policy", &policy]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = limited(&lifeboat_bin(), fx.dir.path(), 256, &args, &env);
    fx.outputs.push(format!("{}{}", r.stdout, r.stderr));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("spool"), "names the spool: {}", r.stderr);
    assert!(
        r.stderr.contains("--spool-dir"),
        "says what to do: {}",
        r.stderr
    );
    assert_eq!(
        fx.pg.psql(
            "postgres",
            &format!("select count(*) from pg_database where datname = '{target}'")
        ),
        "0",
        "nothing was created on the target"
    );
}
