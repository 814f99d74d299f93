//! Copies to a second repository, between two real S3 servers (moto) with different
//! credentials: the copy's server (behind the fault proxy) answers only requests signed with the
//! copy's own access key, from its `credentials_profile`, while the primary's come from the
//! environment. Every kind restores and verifies from the copy alone with the primary's server
//! stopped; a copy catches up after it was down, repairs damage `check` finds, and an
//! interrupted copy publishes nothing.

use std::path::{Path, PathBuf};

use lifeboat_tests::s3proxy::{HttpFault, Rule, S3Proxy};
use lifeboat_tests::*;

/// The copy's access key: the copy's server refuses every other.
const COPY_KEY: &str = "drwriterkey";

struct Fx {
    dir: tempfile::TempDir,
    key: Key,
    primary_bucket: String,
    copy_bucket: String,
    /// In front of the shared moto server, which holds the copies.
    proxy: S3Proxy,
    env: Vec<(String, String)>,
}

fn setup() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let copy_bucket = rt().block_on(s3().create_bucket());
    let proxy = S3Proxy::start(&s3().endpoint);
    let aws_config = dir.path().join("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile dr-writer]\naws_access_key_id = {COPY_KEY}\naws_secret_access_key = drsecret\n\n\
             [profile dr-wrong]\naws_access_key_id = notthekey\naws_secret_access_key = drsecret\n"
        ),
    )
    .unwrap();
    let mut env = s3().env();
    env.push(("AWS_CONFIG_FILE".into(), aws_config.display().to_string()));
    let credentials = dir.path().join("aws-credentials");
    std::fs::write(&credentials, "").unwrap();
    env.push((
        "AWS_SHARED_CREDENTIALS_FILE".into(),
        credentials.display().to_string(),
    ));
    env.extend(index_key_env());
    let fx = Fx {
        dir,
        key,
        primary_bucket: String::new(),
        copy_bucket,
        proxy,
        env,
    };
    fx.copy_server_up();
    fx
}

impl Fx {
    /// A policy: the primary on `primary` (an endpoint), `sources`, and the copy `dr-west`
    /// written with `profile`'s credentials.
    fn policy(&self, primary: &str, profile: &str, sources: &[(&str, &str, String)]) -> PathBuf {
        self.builder(primary, profile, sources)
            .write(self.dir.path())
    }

    fn builder(
        &self,
        primary: &str,
        profile: &str,
        sources: &[(&str, &str, String)],
    ) -> PolicyBuilder {
        let mut b = PolicyBuilder::new(&self.key.recipient)
            .repository(&format!(
                "url = \"s3://{}/prod\"\nendpoint = \"{primary}\"",
                self.primary_bucket
            ))
            .index_key()
            .copy(
                "dr-west",
                &format!(
                    "url = \"s3://{}/prod\"\nendpoint = \"{}\"\nregion = \"us-west-2\"\ncredentials_profile = \"{profile}\"\nretention = {{ keep_last = 5 }}\npart_size = \"5MiB\"",
                    self.copy_bucket, self.proxy.endpoint
                ),
            );
        for (name, kind, fields) in sources {
            b = b.source(name, kind, fields);
        }
        b
    }

    /// The copy's server answers only the copy's own access key.
    fn copy_server_up(&self) {
        self.proxy.clear();
        self.proxy.add(
            Rule::new("*", "", HttpFault::Status(403, "InvalidAccessKeyId"))
                .without_header("authorization", "Credential=drwriterkey/"),
        );
    }

    /// The copy's region is down.
    fn copy_server_down(&self) {
        self.proxy.clear();
        self.proxy.add(Rule::new(
            "*",
            "",
            HttpFault::Status(503, "ServiceUnavailable"),
        ));
    }

    /// A policy with `[agent]` listening on `port`, written as `agent.toml`.
    fn agent_policy(&self, port: u16, sources: &[(&str, &str, String)]) -> PathBuf {
        let text = format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"5s\"\n\n{}",
            self.builder(&s3().endpoint, "dr-writer", sources).text()
        );
        let policy = self.dir.path().join("agent.toml");
        std::fs::write(&policy, text).unwrap();
        policy
    }

    /// Starts `lifeboat ARGS` in the background, with the test's environment.
    fn spawn(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(lifeboat_bin())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    fn run(&self, args: &[&str]) -> Run {
        lifeboat(self.dir.path(), args, &self.env)
    }

    fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 0, "lifeboat {args:?}: {}", r.stderr);
        r
    }

    /// `lifeboat restore --repository dr-west --source SOURCE --to TO EXTRA…`.
    fn restore_from_copy(&self, policy: &str, source: &str, to: &str, extra: &[&str]) {
        let mut args = vec!["restore", "--policy", policy, "--repository", "dr-west"];
        args.extend([
            "--source",
            source,
            "--to",
            to,
            "--identity",
            self.identity(),
        ]);
        args.extend(extra);
        self.ok(&args);
    }

    fn identity(&self) -> &str {
        self.key.identity.to_str().unwrap()
    }

    /// `lifeboat copy --json`: the report of the one copy.
    fn copy(&self, policy: &Path) -> serde_json::Value {
        let r = self.ok(&["copy", "--policy", policy.to_str().unwrap(), "--json"]);
        serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    }

    /// `lifeboat copy`: how many of `source`'s backups it copied.
    fn copied_now(&self, policy: &Path, source: &str) -> usize {
        let report = self.copy(policy);
        let copied = source_report(&report, source)["copied"]
            .as_array()
            .map(Vec::len);
        copied.unwrap_or_else(|| panic!("{report}"))
    }

    /// The backups `list --repository dr-west` shows.
    fn copied(&self, policy: &Path) -> Vec<serde_json::Value> {
        self.try_copied(policy)
            .unwrap_or_else(|e| panic!("list --repository dr-west: {e}"))
    }

    /// [`Fx::copied`], or why the copy cannot be listed (yet).
    fn try_copied(&self, policy: &Path) -> Result<Vec<serde_json::Value>, String> {
        let p = policy.to_str().unwrap();
        let r = self.run(&["list", "--policy", p, "--repository", "dr-west", "--json"]);
        match r.code {
            0 => Ok(serde_json::from_str(&r.stdout).unwrap()),
            _ => Err(r.stderr),
        }
    }
}

/// The shared primary and a database of `rows` rows as a logical source `app` (with `extra`
/// fields).
fn on_shared_primary(
    fx: &mut Fx,
    db: &str,
    rows: u32,
    extra: &str,
) -> [(&'static str, &'static str, String); 1] {
    fx.primary_bucket = rt().block_on(s3().create_bucket());
    let pg = postgres();
    let db = pg.create_db(db);
    pg.psql(
        &db,
        &format!("create table t as select g from generate_series(1, {rows}) g"),
    );
    let pw = pg.password_file(fx.dir.path());
    [(
        "app",
        "postgres",
        format!(
            "url = \"{}\"\npassword_file = \"{}\"\n{extra}",
            pg.url(&db),
            pw.display()
        ),
    )]
}

/// Waits up to a minute for `f`.
fn wait_for(what: &str, f: &dyn Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// SIGTERM, and the agent's exit 0.
fn stop_agent(mut agent: std::process::Child) {
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(agent.wait().unwrap().code(), Some(0));
}

fn source_report<'a>(report: &'a serde_json::Value, source: &str) -> &'a serde_json::Value {
    report["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == source)
        .unwrap_or_else(|| panic!("no {source} in {report}"))
}

#[test]
fn every_kind_restores_and_verifies_from_the_copy_alone_with_the_primary_stopped() {
    let mut fx = setup();
    let primary = S3::start();
    fx.primary_bucket = rt().block_on(primary.create_bucket());

    let pg = postgres();
    let db = pg.create_db("copy_logical");
    pg.psql(
        &db,
        "create table t (id int primary key, v text); insert into t select g, md5(g::text) from generate_series(1, 2000) g;",
    );
    let cluster_db = pg.create_db("copy_physical");
    pg.psql(
        &cluster_db,
        "create table w (id serial primary key, v text); insert into w (v) select md5(g::text) from generate_series(1, 1000) g;",
    );
    let redis = Redis::start(&[]);
    fill_redis(&redis, None);
    let files = fx.dir.path().join("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    std::fs::write(files.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(files.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
    // Incompressible and larger than two of the copy's 5 MiB parts: copied as a multipart upload.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let big: Vec<u8> = (0..(11 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(files.join("big.bin"), &big).unwrap();
    let pw = pg.password_file(fx.dir.path());
    let slot = format!("lb_{}", suffix());
    let sources = [
        (
            "app",
            "postgres",
            format!("url = \"{}\"\npassword_file = \"{}\"", pg.url(&db), pw.display()),
        ),
        ("cache", "redis", format!("url = \"{}\"", redis.url())),
        ("files", "objects", format!("from = \"dir://{}\"", files.display())),
        (
            "cluster",
            "postgres-physical",
            format!(
                "url = \"{}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}",
                pg.url(&cluster_db),
                pw.display()
            ),
        ),
    ];
    let policy = fx.policy(&primary.endpoint, "dr-writer", &sources);
    let p = policy.to_str().unwrap();

    // WAL streams while the backups are taken, and after them.
    let log = fx.dir.path().join("stream.log");
    let mut streamer = std::process::Command::new(lifeboat_bin())
        .args(["wal", "stream", "--policy", p, "--source", "cluster"])
        .envs(fx.env.iter().map(|(k, v)| (k, v)))
        .current_dir(fx.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    fx.ok(&["backup", "--policy", p]);
    pg.psql(
        &cluster_db,
        "insert into w (v) select 'after the base backup' from generate_series(1, 500); select pg_switch_wal();",
    );
    std::thread::sleep(std::time::Duration::from_secs(4));
    streamer.kill().unwrap();
    streamer.wait().unwrap();
    pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );

    let report = fx.copy(&policy);
    for name in ["app", "cache", "files", "cluster"] {
        let s = source_report(&report, name);
        assert_eq!(s["copied"].as_array().unwrap().len(), 1, "{name}: {report}");
        assert!(s["error"].is_null(), "{name}: {report}");
    }
    for shared in ["files", "cluster"] {
        assert!(
            source_report(&report, shared)["shared"].as_u64().unwrap() > 0,
            "{shared}'s blobs or WAL were copied: {report}"
        );
    }
    assert!(
        fx.proxy
            .requests()
            .iter()
            .any(|r| r.contains("partNumber=3")),
        "the big blob went up in parts"
    );
    // Caught up: a second run writes nothing.
    let again = fx.copy(&policy);
    for s in again["sources"].as_array().unwrap() {
        assert_eq!(
            (
                s["copied"].as_array().unwrap().len(),
                s["present"].as_u64(),
                s["objects"].as_u64()
            ),
            (0, Some(1), Some(0)),
            "{again}"
        );
    }
    // `list` says where each backup exists.
    let r = fx.ok(&["list", "--policy", p]);
    assert!(r.stdout.contains("COPIES"), "{}", r.stdout);
    assert_eq!(r.stdout.matches(" dr-west").count(), 4, "{}", r.stdout);

    // The primary's region is gone.
    primary.stop();
    let copied = fx.copied(&policy);
    assert_eq!(copied.len(), 4, "{copied:?}");
    let r = fx.run(&["list", "--policy", p]);
    assert_ne!(r.code, 0, "the primary is unreachable: {}", r.stderr);
    fx.ok(&[
        "check",
        "--policy",
        p,
        "--repository",
        "dr-west",
        "--read-data",
        "--identity",
        fx.identity(),
    ]);

    // A database, a Redis dump, the files and a cluster restore from the copy.
    let into = pg.create_db("copy_restored");
    fx.env.push(("PGPASSWORD".into(), pg.password.clone()));
    fx.restore_from_copy(p, "app", &pg.url(&into), &[]);
    assert_eq!(pg.digest(&into), pg.digest(&db));
    let rdb_dir = fx.dir.path().join("rdb");
    std::fs::create_dir(&rdb_dir).unwrap();
    fx.restore_from_copy(p, "cache", rdb_dir.to_str().unwrap(), &[]);
    assert!(std::fs::metadata(rdb_dir.join("dump.rdb")).unwrap().len() > 1000);
    let out = fx.dir.path().join("files-restored");
    fx.restore_from_copy(p, "files", out.to_str().unwrap(), &[]);
    assert_eq!(
        std::fs::read(out.join("sub/b.bin")).unwrap(),
        vec![7u8; 300_000]
    );
    assert!(std::fs::read(out.join("big.bin")).unwrap() == big);
    let data = fx.dir.path().join("cluster-restored");
    fx.restore_from_copy(p, "cluster", data.to_str().unwrap(), &["--latest"]);
    let conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("--repository dr-west"),
        "recovery fetches WAL from the copy too: {conf}"
    );

    // The verifier proves every kind from the copy: the cluster by replaying the copied WAL.
    let v = verifier(
        fx.dir.path(),
        &[
            "verify",
            "--policy",
            p,
            "--repository",
            "dr-west",
            "--identity",
            fx.identity(),
            "--json",
        ],
        &fx.env,
    );
    assert_eq!(v.code, 0, "verify from the copy: {}", v.stderr);
    let reports: Vec<serde_json::Value> = serde_json::from_str(&v.stdout).unwrap();
    assert_eq!(reports.len(), 4, "{}", v.stdout);
    assert!(
        reports.iter().all(|r| r["result"] == "pass"),
        "{}",
        v.stdout
    );
}

#[test]
fn a_copy_catches_up_after_an_outage_repairs_damage_and_never_shows_half_a_backup() {
    let mut fx = setup();
    let sources = on_shared_primary(&mut fx, "copy_outage", 500, "");
    let policy = fx.policy(&s3().endpoint, "dr-writer", &sources);
    let p = policy.to_str().unwrap();

    let r = fx.ok(&["policy", "check", p]);
    assert!(
        r.stderr.contains("ok, 1 source(s), copied to dr-west"),
        "{}",
        r.stderr
    );

    // The copy's region is down: backups go on; the copy fails, naming the copy.
    fx.copy_server_down();
    fx.ok(&["backup", "--policy", p]);
    let r = fx.run(&["copy", "--policy", p]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("dr-west"), "{}", r.stderr);
    fx.ok(&["backup", "--policy", p]);

    // Back up: the next catch-up copies both.
    fx.copy_server_up();
    assert_eq!(fx.copied_now(&policy, "app"), 2);
    assert_eq!(fx.copied(&policy).len(), 2);

    // A byte flipped at the copy: check finds it, the next catch-up copies it again.
    let newest = fx.copied(&policy)[0]["id"].as_str().unwrap().to_string();
    let object = format!("prod/backups/app/{newest}/database.dump.zst.age");
    // Rewritten after its manifest (listings give times to the second) is how a catch-up
    // tells a changed object without reading it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut bytes = rt().block_on(s3().get(&fx.copy_bucket, &object));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    rt().block_on(async {
        s3().client()
            .await
            .put_object()
            .bucket(&fx.copy_bucket)
            .key(&object)
            .body(bytes.into())
            .send()
            .await
            .expect("damage the copy")
    });
    let check = [
        "check",
        "--policy",
        p,
        "--repository",
        "dr-west",
        "--read-data",
    ];
    let r = fx.run(&check);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("database.dump.zst.age"), "{}", r.stderr);
    let report = fx.copy(&policy);
    let repaired = source_report(&report, "app")["repaired"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(repaired.len(), 1, "{report}");
    assert!(repaired[0]
        .as_str()
        .unwrap()
        .ends_with(&format!("{newest}/database.dump.zst.age")));
    fx.ok(&check);

    // kill -9 while the copy writes a manifest: nothing is visible, the next run completes it.
    fx.ok(&["backup", "--policy", p]);
    fx.proxy.clear();
    fx.proxy.add(Rule::new(
        "PUT",
        "manifest.json",
        HttpFault::Delay(std::time::Duration::from_secs(60)),
    ));
    let mut child = fx.spawn(&["copy", "--policy", p]);
    wait_for("the manifest's write", &|| {
        fx.proxy.fired().iter().any(|f| f.contains("manifest.json"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    fx.copy_server_up();
    // Its lease on copying to dr-west would lapse in 10 minutes: while it is held, another copy
    // is refused (exit 11). Here it lapses at once.
    let r = fx.run(&["copy", "--policy", p]);
    assert_eq!(r.code, 11, "{}", r.stderr);
    assert!(r.stderr.contains("copy-dr-west"), "{}", r.stderr);
    let lock = "prod/locks/copy-dr-west.json";
    rt().block_on(async {
        s3().client()
            .await
            .delete_object()
            .bucket(&fx.primary_bucket)
            .key(lock)
            .send()
            .await
            .expect("the lease lapses")
    });
    assert_eq!(
        fx.copied(&policy).len(),
        2,
        "the interrupted backup is not visible"
    );
    let r = fx.ok(&["list", "--policy", p, "--repository", "dr-west"]);
    assert!(r.stderr.contains("interrupted run"), "{}", r.stderr);
    assert_eq!(fx.copied_now(&policy, "app"), 1);
    assert_eq!(fx.copied(&policy).len(), 3);

    // Wrong credentials for the copy: exit 12, naming the copy; backups go on.
    let wrong = fx.policy(&s3().endpoint, "dr-wrong", &sources);
    let r = fx.run(&["copy", "--policy", wrong.to_str().unwrap()]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(r.stderr.contains("dr-west"), "{}", r.stderr);
    let missing = fx.policy(&s3().endpoint, "no-such-profile", &sources);
    let r = fx.run(&["copy", "--policy", missing.to_str().unwrap()]);
    assert_eq!(r.code, 12, "a profile that is not there: {}", r.stderr);
    fx.ok(&["backup", "--policy", wrong.to_str().unwrap()]);

    // The primary's prune (keep_last = 3) deletes its oldest backup; the copy's rules (keep_last
    // = 5) keep it there, and its own prune keeps it too.
    let oldest = fx.copied(&policy).last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    fx.ok(&["prune", "--policy", p]);
    let r = fx.ok(&["list", "--policy", p, "--json"]);
    assert!(
        !r.stdout.contains(&oldest),
        "pruned at the primary: {}",
        r.stdout
    );
    assert_eq!(fx.copied_now(&policy, "app"), 1);
    let copied = fx.copied(&policy);
    assert_eq!(copied.len(), 4);
    assert!(copied.iter().any(|b| b["id"] == oldest.as_str()));
    let r = fx.ok(&["prune", "--policy", p, "--repository", "dr-west"]);
    assert!(
        fx.copied(&policy)
            .iter()
            .any(|b| b["id"] == oldest.as_str()),
        "{}",
        r.stdout
    );
}

#[test]
fn the_agent_copies_each_backup_backs_up_while_the_copy_is_down_and_reports_the_lag() {
    let mut fx = setup();
    let sources = on_shared_primary(
        &mut fx,
        "copy_agent",
        100,
        "schedule = \"*/3 * * * * *\"\nretries = 0",
    );
    let port = free_port();
    let policy = fx.agent_policy(port, &sources);
    let metrics = || {
        http_get(port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    };
    let copy_runs = |result: &str| {
        metric(
            &metrics(),
            "lifeboat_copy_runs_total",
            &[("copy", "dr-west"), ("source", "app"), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    let backups = || {
        metric(
            &metrics(),
            "lifeboat_runs_total",
            &[("source", "app"), ("op", "backup"), ("result", "success")],
        )
        .unwrap_or(0.0)
    };

    // The copy's region is down: backups go on, the copy's failures are counted.
    fx.copy_server_down();
    let agent = fx.spawn(&["agent", "--policy", policy.to_str().unwrap()]);
    wait_for("two backups and a failed copy", &|| {
        backups() >= 2.0 && copy_runs("failure") >= 1.0
    });
    assert_eq!(copy_runs("success"), 0.0);

    // Back: the next backup's copy catches up on everything, and the lag is small.
    fx.copy_server_up();
    wait_for("a copy", &|| copy_runs("success") >= 1.0);
    let body = metrics();
    let lag = metric(
        &body,
        "lifeboat_copy_lag_seconds",
        &[("copy", "dr-west"), ("source", "app")],
    )
    .expect("the copy's lag");
    assert!((0.0..30.0).contains(&lag), "lag {lag}:\n{body}");
    assert!(
        metric(
            &body,
            "lifeboat_copy_newest_backup_timestamp_seconds",
            &[("copy", "dr-west"), ("source", "app")]
        )
        .unwrap_or(0.0)
            > 1.7e9
    );
    assert!(
        metric(&body, "lifeboat_copy_bytes_total", &[("copy", "dr-west")]).unwrap_or(0.0) > 0.0
    );
    let (_, status) = http_get(port, "/status").expect("/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let copy = &status["sources"]["app"]["copies"]["dr-west"];
    assert!(
        copy["error"].is_null() && copy["newest_backup"].is_string(),
        "{status}"
    );
    let copied = fx.copied(&policy).len();
    assert!(
        copied >= 2,
        "the backups taken while the copy was down were copied: {copied}"
    );

    stop_agent(agent);
}

#[test]
fn the_agent_copies_wal_as_it_is_archived_between_backups() {
    let mut fx = setup();
    fx.primary_bucket = rt().block_on(s3().create_bucket());
    let pg = postgres();
    let db = pg.create_db("copy_wal");
    pg.psql(&db, "create table w (id serial primary key, v text)");
    let pw = pg.password_file(fx.dir.path());
    let slot = format!("lb_{}", suffix());
    let port = free_port();
    let sources = [(
        "cluster",
        "postgres-physical",
        format!(
            "url = \"{}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}",
            pg.url(&db),
            pw.display()
        ),
    )];
    let policy = fx.agent_policy(port, &sources);
    fx.ok(&["backup", "--policy", policy.to_str().unwrap()]);
    let copied_wal = || {
        rt().block_on(s3().keys(&fx.copy_bucket, "prod/wal/cluster/"))
            .into_iter()
            .filter(|k| !k.contains(".partial.") && !k.contains(".history"))
            .count()
    };
    let agent = fx.spawn(&["agent", "--policy", policy.to_str().unwrap()]);
    // The start's catch-up copies the base backup.
    wait_for("the base backup at the copy", &|| {
        fx.try_copied(&policy).is_ok_and(|b| b.len() == 1)
    });
    // No backup runs (the source has no schedule): WAL alone reaches the copy, the growing
    // segment as partial objects, then each segment whole.
    pg.psql(
        &db,
        "insert into w (v) select 'partial' from generate_series(1, 1000)",
    );
    wait_for("a partial segment at the copy", &|| {
        rt().block_on(s3().keys(&fx.copy_bucket, "prod/wal/cluster/"))
            .iter()
            .any(|k| k.contains(".partial."))
    });
    let before = copied_wal();
    for round in 0..3 {
        pg.psql(
            &db,
            &format!("insert into w (v) select 'round {round}' from generate_series(1, 1000); select pg_switch_wal();"),
        );
        let want = before + round + 1;
        wait_for("a switched segment at the copy", &|| copied_wal() >= want);
    }
    assert_eq!(fx.copied(&policy).len(), 1, "no backup was taken meanwhile");
    // The copy keeps each partial it was given (its writer deletes nothing); the copy's prune
    // collects those a whole segment superseded.
    let superseded = || {
        let keys = rt().block_on(s3().keys(&fx.copy_bucket, "prod/wal/cluster/"));
        let segment = |k: &str| k.rsplit('/').next().unwrap_or("")[..24].to_string();
        let whole: std::collections::HashSet<String> = keys
            .iter()
            .filter(|k| !k.contains(".partial.") && !k.contains(".history"))
            .map(|k| segment(k))
            .collect();
        keys.iter()
            .filter(|k| k.contains(".partial.") && whole.contains(&segment(k)))
            .count()
    };
    assert!(superseded() > 0, "partials were copied as WAL was archived");
    fx.ok(&[
        "prune",
        "--policy",
        policy.to_str().unwrap(),
        "--repository",
        "dr-west",
    ]);
    assert_eq!(superseded(), 0);
    let body = http_get(port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let point = metric(
        &body,
        "lifeboat_copy_recovery_point_timestamp_seconds",
        &[("copy", "dr-west"), ("source", "cluster")],
    )
    .unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - point < 30.0,
        "the copy's recovery point is recent: {point} vs {now}\n{body}"
    );

    stop_agent(agent);
    pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
}
