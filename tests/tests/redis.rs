//! Redis sources against real redis-server: capture as a replica (both payload framings) and by
//! BGSAVE, with a password and an ACL user; the stock tools read what was stored; the verifier
//! proves it; restores into a directory and into a live server reproduce the data exactly; a
//! connection cut or a flipped byte mid-payload publishes nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use lifeboat_tests::*;

struct Fx {
    dir: tempfile::TempDir,
    key: Key,
    policy: PathBuf,
}

fn setup(source: &str) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let policy = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        source,
    );
    Fx { dir, key, policy }
}

fn source(url: &str, extra: &str) -> String {
    format!("[[sources]]\nname = \"cache\"\nkind = \"redis\"\nurl = \"{url}\"\n{extra}\n")
}

impl Fx {
    fn run(&self, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--policy", self.policy.to_str().unwrap()]);
        lifeboat(self.dir.path(), &all, &[])
    }

    fn backups(&self) -> Vec<serde_json::Value> {
        let r = self.run(&["list", "--json"]);
        if r.code == 10 {
            return Vec::new(); // no repository yet
        }
        assert_eq!(r.code, 0, "list failed: {}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap()
    }

    fn backup_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("repo/backups/cache").join(id)
    }

    fn fingerprint(&self, id: &str) -> serde_json::Value {
        let out = Command::new("age")
            .args(["-d", "-i"])
            .arg(&self.key.identity)
            .arg(self.backup_dir(id).join("fingerprint.json.age"))
            .output()
            .expect("age CLI");
        assert!(out.status.success(), "age -d fingerprint");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `age -d | zstd -d` into `dir/dump.rdb`, with the stock CLIs only.
    fn stock_decrypt(&self, id: &str, dir: &Path) -> PathBuf {
        let out = dir.join("dump.rdb");
        let status = Command::new("sh")
            .arg("-c")
            .arg("age -d -i \"$1\" \"$2\" | zstd -d -q -o \"$3\"")
            .arg("sh")
            .arg(&self.key.identity)
            .arg(self.backup_dir(id).join("dump.rdb.zst.age"))
            .arg(&out)
            .status()
            .expect("sh");
        assert!(status.success(), "age -d | zstd -d failed");
        out
    }
}

fn check_rdb(file: &Path) -> String {
    let out = Command::new(redis_bin("redis-check-rdb"))
        .arg(file)
        .output()
        .expect("redis-check-rdb");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "redis-check-rdb rejects {}: {text}",
        file.display()
    );
    text
}

/// Loads `rdb` into a fresh server and returns it.
fn load(rdb: &Path) -> Redis {
    let r = Redis::start(&[]);
    // The server started empty; restart it on the file by copying it in and DEBUG RELOAD NOSAVE.
    std::fs::copy(rdb, r.dir.join("dump.rdb")).unwrap();
    let _: () = redis::cmd("DEBUG")
        .arg("RELOAD")
        .arg("NOSAVE")
        .query(&mut r.conn(0, None))
        .expect("DEBUG RELOAD NOSAVE");
    r
}

fn expected_keys(r: &Redis, auth: Option<(&str, &str)>) -> serde_json::Value {
    let ks = r.keyspace(auth);
    serde_json::json!(ks
        .iter()
        .map(|(db, (keys, expires))| (db.to_string(), (*keys, *expires)))
        .collect::<std::collections::BTreeMap<_, _>>())
}

fn fingerprint_keys(fp: &serde_json::Value) -> serde_json::Value {
    let dbs = fp["rdb"]["databases"].as_object().unwrap();
    serde_json::json!(dbs
        .iter()
        .filter(|(_, d)| d["keys"].as_u64().unwrap() > 0)
        .map(|(db, d)| (
            db.clone(),
            (d["keys"].as_u64().unwrap(), d["expires"].as_u64().unwrap())
        ))
        .collect::<std::collections::BTreeMap<_, _>>())
}

#[test]
fn replica_capture_reads_back_with_stock_tools_verifies_and_restores_exactly() {
    for diskless in ["yes", "no"] {
        let src = Redis::start(&["--repl-diskless-sync", diskless]);
        let keys = fill_redis(&src, None);
        assert_eq!(keys, 50, "17 keys in db 0, 30 in db 1, 3 in db 5");
        let fx = setup(&source(&src.url(), ""));
        let r = fx.run(&["backup"]);
        assert_eq!(
            r.code, 0,
            "backup (diskless={diskless}) failed: {}",
            r.stderr
        );
        let list = fx.backups();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["kind"], "redis");
        let id = list[0]["id"].as_str().unwrap();

        // The fingerprint counts exactly what the server held.
        let fp = fx.fingerprint(id);
        assert_eq!(
            fingerprint_keys(&fp),
            expected_keys(&src, None),
            "diskless={diskless}"
        );
        assert_eq!(fp["mode"], "replication");
        assert!(fp["crc64"].as_str().is_some_and(|c| c.len() == 16));
        let types = &fp["rdb"]["databases"]["0"]["types"];
        for t in ["string", "list", "set", "zset", "hash", "stream"] {
            assert!(types[t].as_u64().unwrap() > 0, "no {t} counted: {types}");
        }

        // Stock tools only: age -d | zstd -d gives a file redis-check-rdb accepts and a fresh
        // server loads into the same dataset.
        let out = tempfile::tempdir().unwrap();
        let rdb = fx.stock_decrypt(id, out.path());
        assert!(check_rdb(&rdb).contains(&format!("{keys} keys read")));
        let loaded = load(&rdb);
        assert_eq!(loaded.digest(None), src.digest(None), "diskless={diskless}");
        drop(loaded);

        // The verifier restores it into its own scratch redis-server and compares.
        let v = verifier(
            fx.dir.path(),
            &[
                "verify",
                "--policy",
                fx.policy.to_str().unwrap(),
                "--identity",
                fx.key.identity.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(v.code, 0, "verify failed: {}{}", v.stdout, v.stderr);
        assert_eq!(fx.backups()[0]["verified"], true);
    }
}

#[test]
fn restore_into_a_live_server_reproduces_every_type_and_ttl() {
    let src = Redis::start(&[]);
    fill_redis(&src, None);
    let fx = setup(&source(&src.url(), ""));
    assert_eq!(fx.run(&["backup"]).code, 0);
    let id = fx.identity();

    let target = Redis::start(&[]);
    let to = target.url();
    let r = fx.restore_to(&to, &[]);
    assert_eq!(r.code, 0, "restore failed: {}", r.stderr);
    assert_eq!(target.digest(None), src.digest(None));
    let ttl: i64 = redis::cmd("TTL")
        .arg("session:1")
        .query(&mut target.conn(0, None))
        .unwrap();
    assert!((3500..=3600).contains(&ttl), "TTL kept: {ttl}");
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg("events")
        .arg("workers")
        .query(&mut target.conn(0, None))
        .unwrap();
    assert_eq!(
        pending[0],
        redis::Value::Int(5),
        "consumer group with 5 pending entries"
    );

    // A non-empty target is refused (exit 14) and left alone, unless --yes; --flush empties it.
    let _: () = redis::cmd("SET")
        .arg("extra")
        .arg("1")
        .query(&mut target.conn(0, None))
        .unwrap();
    let r = fx.restore_to(&to, &[]);
    assert_eq!(r.code, 14, "{}", r.stderr);
    assert!(r.stderr.contains("already holds data"), "{}", r.stderr);
    let r = fx.restore_to(&to, &["--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_ne!(
        target.digest(None),
        src.digest(None),
        "without --flush other keys stay"
    );
    let r = fx.restore_to(&to, &["--yes", "--flush"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        target.digest(None),
        src.digest(None),
        "--flush removed the extra key"
    );

    // A password in --to would be visible in ps: refused before anything happens.
    let r = fx.run(&[
        "restore",
        "--source",
        "cache",
        "--to",
        &format!("redis://u:hunter2@127.0.0.1:{}", target.port),
        "--identity",
        &id,
    ]);
    assert_eq!(r.code, 2);
    assert!(!r.stderr.contains("hunter2"), "{}", r.stderr);
}

impl Fx {
    fn identity(&self) -> String {
        self.key.identity.to_str().unwrap().to_string()
    }

    /// `lifeboat-verifier verify --json` of the newest backup: its report.
    fn verify(&self) -> (Run, serde_json::Value) {
        let identity = self.identity();
        let policy = self.policy.to_str().unwrap();
        let args = [
            "verify",
            "--policy",
            policy,
            "--identity",
            &identity,
            "--json",
        ];
        let r = verifier(self.dir.path(), &args, &[]);
        let reports: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
        let report = reports[0].clone();
        (r, report)
    }

    /// `restore --source cache --to TO --identity … EXTRA`.
    fn restore_to(&self, to: &str, extra: &[&str]) -> Run {
        let identity = self.identity();
        let mut args = vec![
            "restore",
            "--source",
            "cache",
            "--to",
            to,
            "--identity",
            &identity,
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }
}

#[test]
fn restore_into_a_directory_writes_a_loadable_dump_and_never_overwrites_silently() {
    let src = Redis::start(&[]);
    fill_redis(&src, None);
    let fx = setup(&source(&src.url(), ""));
    assert_eq!(fx.run(&["backup"]).code, 0);
    let id = fx.identity();
    let out = fx.dir.path().join("restored");
    let to = out.to_str().unwrap();
    let r = fx.run(&[
        "restore",
        "--source",
        "cache",
        "--to",
        to,
        "--identity",
        &id,
        "--dry-run",
    ]);
    assert_eq!(r.code, 0);
    assert!(!out.join("dump.rdb").exists(), "dry run writes nothing");
    std::fs::create_dir_all(&out).unwrap();
    let r = fx.run(&[
        "restore",
        "--source",
        "cache",
        "--to",
        to,
        "--identity",
        &id,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("appendonly no"),
        "says how to load it: {}",
        r.stderr
    );
    check_rdb(&out.join("dump.rdb"));
    assert_eq!(load(&out.join("dump.rdb")).digest(None), src.digest(None));
    let r = fx.run(&[
        "restore",
        "--source",
        "cache",
        "--to",
        to,
        "--identity",
        &id,
    ]);
    assert_eq!(
        r.code, 14,
        "an existing dump.rdb is not replaced without --yes"
    );
}

#[test]
fn passwords_and_acl_users_work_and_wrong_ones_are_credential_errors() {
    let src = Redis::start(&[
        "--requirepass",
        "s3cret-default",
        "--user",
        "backup",
        "on",
        ">s3cret-backup",
        "+psync",
        "+replconf",
        "+sync",
        "+ping",
        "+bgsave",
        "+info",
    ]);
    fill_redis(&src, Some(("default", "s3cret-default")));
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("redis-password");
    std::fs::write(&pwfile, "s3cret-backup\n").unwrap();

    // An ACL user with only the replication commands, password from a file.
    let fx = setup(&source(
        &format!("redis://backup@127.0.0.1:{}", src.port),
        &format!("password_file = \"{}\"", pwfile.display()),
    ));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "ACL user backup failed: {}", r.stderr);
    let id = fx.backups()[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        fingerprint_keys(&fx.fingerprint(&id)),
        expected_keys(&src, Some(("default", "s3cret-default")))
    );

    // The default user's password through ${VAR}, in file mode (BGSAVE + the shared volume).
    let fx = setup(&source(
        &format!("redis://:${{REDIS_PW}}@127.0.0.1:{}", src.port),
        &format!(
            "mode = \"file\"\nrdb_path = \"{}\"",
            src.dir.join("dump.rdb").display()
        ),
    ));
    let env = [("REDIS_PW".to_string(), "s3cret-default".to_string())];
    let p = fx.policy.to_str().unwrap();
    let r = lifeboat(fx.dir.path(), &["backup", "--policy", p], &env);
    assert_eq!(r.code, 0, "file mode failed: {}", r.stderr);
    let r = lifeboat(fx.dir.path(), &["list", "--json", "--policy", p], &env);
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let fp = fx.fingerprint(list[0]["id"].as_str().unwrap());
    assert_eq!(fp["mode"], "file");
    assert_eq!(
        fingerprint_keys(&fp),
        expected_keys(&src, Some(("default", "s3cret-default")))
    );

    // Wrong password: exit 12, the password never printed.
    let r = lifeboat(
        fx.dir.path(),
        &["backup", "--policy", p],
        &[("REDIS_PW".into(), "wrong-pw".into())],
    );
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(!r.stderr.contains("wrong-pw"), "{}", r.stderr);
    // No password at all: the server's NOAUTH becomes a credential error that says what to set.
    let fx = setup(&source(&src.url(), ""));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(r.stderr.contains("password_file"), "{}", r.stderr);
}

#[test]
fn a_cut_or_damaged_payload_publishes_nothing() {
    for diskless in ["yes", "no"] {
        let src = Redis::start(&["--repl-diskless-sync", diskless]);
        fill_redis(&src, None);
        for (fault, code) in [
            (Fault::CutAfter(300_000), 1),
            (Fault::FlipAt(1_000_000), 13),
        ] {
            let proxy = Proxy::start(src.port, fault);
            let fx = setup(&source(&format!("redis://127.0.0.1:{}", proxy.port), ""));
            let r = fx.run(&["backup"]);
            assert_eq!(r.code, code, "{fault:?} diskless={diskless}: {}", r.stderr);
            assert!(
                r.stderr.contains("nothing was published"),
                "{fault:?}: {}",
                r.stderr
            );
            assert!(fx.backups().is_empty(), "{fault:?}: a backup was listed");
            let left: Vec<_> = std::fs::read_dir(fx.dir.path().join("repo/backups"))
                .map(|d| d.flatten().collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "{fault:?}: objects left behind: {left:?}");
        }
    }
}

#[test]
fn a_server_that_refuses_replication_says_to_use_file_mode() {
    let src = Redis::start(&[
        "--rename-command",
        "PSYNC",
        "",
        "--rename-command",
        "SYNC",
        "",
    ]);
    let fx = setup(&source(&src.url(), ""));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("mode = \"file\""), "{}", r.stderr);
    assert!(fx.backups().is_empty());
}

/// A redis-server with TLS on `tls_port`, its certificate from `certs` (see `make_certs`).
fn tls_redis(tls_port: &str, certs: &Path, extra: &[&str]) -> Redis {
    let file = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let (cert, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
    let mut args = vec![
        "--tls-port",
        tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ];
    args.extend_from_slice(extra);
    Redis::start(&args)
}

#[test]
fn rediss_is_verified_against_the_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let ca = certs.path().join("ca.crt");
    let tls_port = free_port().to_string();
    let src = tls_redis(&tls_port, certs.path(), &["--tls-replication", "yes"]);
    fill_redis(&src, None);
    let url = format!("rediss://localhost:{tls_port}");
    let fx = setup(&source(
        &url,
        &format!("tls_ca_file = \"{}\"", ca.display()),
    ));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "backup over TLS failed: {}", r.stderr);
    let id = fx.backups()[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        fingerprint_keys(&fx.fingerprint(&id)),
        expected_keys(&src, None)
    );

    // A live restore into a TLS server, its certificate checked against the same CA.
    let target_port = free_port().to_string();
    let target = tls_redis(&target_port, certs.path(), &[]);
    let to = format!("rediss://localhost:{target_port}");
    let identity = fx.identity();
    let r = fx.restore_to(&to, &[]);
    assert_eq!(r.code, 0, "restore into rediss://: {}", r.stderr);
    assert_eq!(target.digest(None), src.digest(None));

    // The same repository read with a policy whose source has no CA: the target's certificate is
    // not trusted, and nothing is written.
    let no_ca = write_policy(
        fx.dir.path(),
        "url = \"file://./repo\"",
        &fx.key.recipient,
        &source(&url, ""),
    );
    let r = lifeboat(
        fx.dir.path(),
        &[
            "restore",
            "--source",
            "cache",
            "--to",
            &to,
            "--identity",
            &identity,
            "--yes",
            "--policy",
            no_ca.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(r.code, 12, "a target whose CA is not trusted: {}", r.stderr);
    assert!(r.stderr.contains("tls_ca_file"), "{}", r.stderr);
    assert_eq!(target.digest(None), src.digest(None));

    // Without the CA the source's certificate is not trusted: a credential error, nothing stored.
    let fx = setup(&source(&url, ""));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(r.stderr.contains("tls_ca_file"), "{}", r.stderr);
    assert!(fx.backups().is_empty());
}

/// Waits up to 30 s for `done`, panicking with `what`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The primary's port as `sentinel` names it now.
fn named_primary(sentinel: &Redis, name: &str) -> Option<u16> {
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(name)
        .query(&mut sentinel.conn(0, None))
        .ok()?;
    addr.and_then(|(_, port)| port.parse().ok())
}

#[test]
fn sentinel_names_the_server_to_capture_and_a_failover_between_runs_just_works() {
    let primary = Redis::start(&[]);
    fill_redis(&primary, None);
    let replica = Redis::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    wait_until("the replica is in sync", || {
        replica.info("replication", "master_link_status") == "up"
            && replica.keyspace(None) == primary.keyspace(None)
    });
    let sentinel = Redis::sentinel(primary.port, "cache-main");
    wait_until("the sentinel knows a healthy replica", || {
        let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg("cache-main")
            .query(&mut sentinel.conn(0, None))
            .unwrap_or_default();
        replicas.iter().any(|r| {
            r.chunks(2)
                .any(|kv| kv[0] == "master-link-status" && kv[1] == "ok")
        })
    });
    // The first sentinel listed is down: the next one is asked.
    let sentinels = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), sentinel.port);
    let fx = setup(&source(
        &format!("redis+sentinel://{sentinels}/cache-main"),
        "",
    ));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "backup through sentinel: {}", r.stderr);
    let first = fx.backups()[0].clone();
    let id = first["id"].as_str().unwrap();
    assert_eq!(
        first["origin"]["identity"],
        format!("redis run {}", primary.info("server", "run_id")),
        "the primary was captured"
    );
    assert_eq!(
        fingerprint_keys(&fx.fingerprint(id)),
        expected_keys(&primary, None)
    );

    // role=replica captures the replica, sparing the primary.
    let from_replica = setup(&source(
        &format!(
            "redis+sentinel://127.0.0.1:{}/cache-main?role=replica",
            sentinel.port
        ),
        "",
    ));
    let r = from_replica.run(&["backup"]);
    assert_eq!(r.code, 0, "backup of a replica: {}", r.stderr);
    let b = from_replica.backups()[0].clone();
    assert_eq!(
        b["origin"]["identity"],
        format!("redis run {}", replica.info("server", "run_id"))
    );
    assert_eq!(b["origin"]["details"]["role"], "slave");

    // A failover between runs: the next backup captures the new primary, and carries on the
    // same history (the promoted replica keeps the old replication id as its second).
    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg("cache-main")
        .query(&mut sentinel.conn(0, None))
        .expect("SENTINEL FAILOVER");
    wait_until("the sentinel names the promoted replica", || {
        named_primary(&sentinel, "cache-main") == Some(replica.port)
            && replica.info("replication", "role") == "master"
    });
    let _: () = redis::cmd("SET")
        .arg("written-after-failover")
        .arg(1)
        .query(&mut replica.conn(0, None))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "backup after the failover: {}", r.stderr);
    let after = fx.backups()[0].clone();
    assert_ne!(after["id"], first["id"]);
    assert_eq!(
        after["origin"]["identity"],
        format!("redis run {}", replica.info("server", "run_id"))
    );
    assert_eq!(
        after["lineage"]["state"], "same",
        "a failover is not another system: {after}"
    );
    assert_eq!(
        fingerprint_keys(&fx.fingerprint(after["id"].as_str().unwrap())),
        expected_keys(&replica, None)
    );

    // A name no sentinel monitors: a clear error naming it, nothing published.
    let wrong = setup(&source(
        &format!("redis+sentinel://127.0.0.1:{}/cache-mian", sentinel.port),
        "retries = 0",
    ));
    let r = wrong.run(&["backup"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no sentinel named a primary of cache-mian")
            && r.stderr.contains("it monitors no primary named cache-mian"),
        "{}",
        r.stderr
    );
    assert!(wrong.backups().is_empty());
}

/// The names of the Redis Functions libraries `r` holds, sorted.
fn libraries(r: &Redis) -> Vec<String> {
    let list: Vec<Vec<redis::Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query(&mut r.conn(0, None))
        .unwrap();
    let mut names: Vec<String> = list
        .iter()
        .filter_map(|lib| {
            let i = lib
                .iter()
                .position(|v| matches!(v, redis::Value::BulkString(b) if b == b"library_name"))?;
            match &lib[i + 1] {
                redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            }
        })
        .collect();
    names.sort();
    names
}

fn load_library(r: &Redis, name: &str, function: &str) {
    let code = format!(
        "#!lua name={name}\nredis.register_function('{function}', function(keys, args) return '{name}:' .. args[1] end)"
    );
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(code)
        .query(&mut r.conn(0, None))
        .unwrap();
}

#[test]
fn redis_functions_are_counted_verified_and_restored_into_a_live_server() {
    let src = Redis::start(&[]);
    fill_redis(&src, None);
    load_library(&src, "billing", "charge");
    let fx = setup(&source(&src.url(), ""));
    assert_eq!(fx.run(&["backup"]).code, 0);
    let b = fx.backups()[0].clone();
    let id = b["id"].as_str().unwrap();
    assert_eq!(fx.fingerprint(id)["rdb"]["functions"], 1);

    // The verifier compares the libraries its scratch server loaded with the capture's count.
    let (r, report) = fx.verify();
    assert_eq!(r.code, 0, "verify: {}", r.stderr);
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "Redis Functions libraries")
        .cloned()
        .expect("a functions check");
    assert_eq!(
        (check["expected"].as_str(), check["found"].as_str()),
        (Some("1"), Some("1"))
    );

    // A live restore carries them: before, only the keys arrived.
    let target = Redis::start(&[]);
    let to = target.url();
    let restore = |extra: &[&str]| fx.restore_to(&to, extra);
    let r = restore(&["--dry-run"]);
    assert!(
        r.stderr
            .contains("Redis Functions libraries it holds (FUNCTION RESTORE)")
            && r.stderr
                .contains("Not restored: ACL users and configuration"),
        "the plan says what a live restore carries and what not: {}",
        r.stderr
    );
    let r = restore(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("and 1 Redis Functions library"),
        "{}",
        r.stderr
    );
    assert_eq!(libraries(&target), vec!["billing"]);
    let called: String = redis::cmd("FCALL")
        .arg("charge")
        .arg(0)
        .arg("42")
        .query(&mut target.conn(0, None))
        .unwrap();
    assert_eq!(called, "billing:42");
    assert_eq!(target.digest(None), src.digest(None));

    // A target with libraries of its own holds data: refused without --yes, kept with --yes
    // (same-named ones replaced), deleted with --flush.
    let fresh = Redis::start(&[]);
    load_library(&fresh, "audit", "log");
    let r = fx.restore_to(&fresh.url(), &[]);
    assert_eq!(
        r.code, 14,
        "a target holding only libraries holds data: {}",
        r.stderr
    );
    assert_eq!(libraries(&fresh), vec!["audit"]);
    let r = fx.restore_to(&fresh.url(), &["--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(libraries(&fresh), vec!["audit", "billing"]);
    let r = fx.restore_to(&fresh.url(), &["--yes", "--flush"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(libraries(&fresh), vec!["billing"]);
}

#[test]
fn scan_mode_writes_a_real_rdb_where_sync_psync_and_bgsave_are_refused() {
    // The way managed services are set up: the backup user may not replicate or save.
    let src = Redis::start(&[
        "--user",
        "backup",
        "on",
        ">s3cret-backup",
        "~*",
        "&*",
        "+@all",
        "-sync",
        "-psync",
        "-bgsave",
    ]);
    fill_redis(&src, None);
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("redis-password");
    std::fs::write(&pwfile, "s3cret-backup\n").unwrap();
    let url = format!("redis://backup@127.0.0.1:{}", src.port);
    let password = format!("password_file = \"{}\"", pwfile.display());
    let scan = format!("{password}\nmode = \"scan\"\nscan_rate = 100000");

    // A server without Functions libraries.
    let fx = setup(&source(&url, &scan));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "scan backup without libraries: {}", r.stderr);
    let fp = fx.fingerprint(fx.backups()[0]["id"].as_str().unwrap());
    assert_eq!(fp["rdb"]["functions"], 0, "{fp}");
    assert_eq!(fingerprint_keys(&fp), expected_keys(&src, None));
    load_library(&src, "billing", "charge");

    // Replication is refused, as on a managed service...
    let fx = setup(&source(&url, &format!("{password}\nretries = 0")));
    let r = fx.run(&["backup"]);
    assert_ne!(r.code, 0, "replication must be refused: {}", r.stderr);
    assert!(fx.backups().is_empty());

    // ...and a scan takes the snapshot.
    let fx = setup(&source(&url, &scan));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "scan backup: {}", r.stderr);
    let id = fx.backups()[0]["id"].as_str().unwrap().to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.backup_dir(&id).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["parts"][0]["format"], "rdb-scan-not-point-in-time");
    let fp = fx.fingerprint(&id);
    assert_eq!(fp["mode"], "scan");
    assert_eq!(fp["scan"]["vanished"], 0, "{fp}");
    assert_eq!(fp["rdb"]["functions"], 1, "{fp}");
    assert_eq!(fingerprint_keys(&fp), expected_keys(&src, None));

    // The stock tools read what was stored, and a stock server loads it with the same digest.
    let out = tempfile::tempdir().unwrap();
    let rdb = fx.stock_decrypt(&id, out.path());
    check_rdb(&rdb);
    let loaded = load(&rdb);
    assert_eq!(loaded.digest(None), src.digest(None));
    assert_eq!(libraries(&loaded), vec!["billing"]);
    let ttl: i64 = redis::cmd("TTL")
        .arg("session:1")
        .query(&mut loaded.conn(0, None))
        .unwrap();
    assert!((3500..=3600).contains(&ttl), "the TTL is kept: {ttl}");

    // The verifier treats it like any other snapshot.
    let (r, _) = fx.verify();
    assert_eq!(r.code, 0, "verify of a scanned snapshot: {}", r.stderr);

    // scan_rate belongs to scan mode.
    let fx = setup(&source(&url, &format!("{password}\nscan_rate = 10")));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("scan_rate"), "{}", r.stderr);
}

/// The key slot the way Redis Cluster computes it (`CLUSTER KEYSLOT`).
fn key_slot(r: &Redis, key: &[u8]) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(&mut r.conn(0, None))
        .expect("CLUSTER KEYSLOT")
}

#[test]
fn a_cluster_is_captured_whole_with_its_slot_map_and_verified_shard_by_shard() {
    let cluster = RedisCluster::start(3, 1, &[]);
    let keys = cluster.fill(3000);
    let fx = setup(&source(&cluster.url(), "prefer_replica = true"));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "cluster backup failed: {}", r.stderr);
    let id = fx.backups()[0]["id"].as_str().unwrap().to_string();
    let fp = fx.fingerprint(&id);
    let shards = fp["cluster"].as_array().expect("a cluster fingerprint");
    assert_eq!(shards.len(), 3, "{fp:#}");
    let replicas: Vec<u16> = cluster.nodes[3..].iter().map(|n| n.port).collect();
    let mut total = 0;
    let scratch = tempfile::tempdir().unwrap();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(s["name"], format!("shard-{i}"));
        assert_eq!(s["role"], "replica", "prefer_replica: {}", r.stderr);
        let port: u16 = s["node"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(replicas.contains(&port), "{s:#}");
        total += s["rdb"]["databases"]["0"]["keys"].as_u64().unwrap();
        // Each shard is a plain RDB file the stock tools read, holding only its own slots.
        let object = fx.backup_dir(&id).join(s["object"].as_str().unwrap());
        let out = scratch.path().join(format!("{i}.rdb"));
        let status = Command::new("sh")
            .arg("-c")
            .arg("age -d -i \"$1\" \"$2\" | zstd -d -q -o \"$3\"")
            .args([
                "sh",
                &fx.identity(),
                object.to_str().unwrap(),
                out.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        check_rdb(&out);
        let loaded = load(&out);
        let ranges: Vec<(u16, u16)> = serde_json::from_value(s["slots"].clone()).unwrap();
        let found: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg("*")
            .query(&mut loaded.conn(0, None))
            .unwrap();
        assert_eq!(
            found.len() as u64,
            s["rdb"]["databases"]["0"]["keys"].as_u64().unwrap()
        );
        for k in found.iter().take(200) {
            let slot = key_slot(&cluster.nodes[0], k);
            assert!(
                ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)),
                "{k:?} in slot {slot} is outside {ranges:?}"
            );
        }
    }
    assert_eq!(total, keys, "every key is in exactly one shard");
    assert_eq!(fp["rdb"]["databases"]["0"]["keys"].as_u64(), Some(keys));
    let (v, report) = fx.verify();
    assert_eq!(v.code, 0, "verify failed: {}\n{report:#}", v.stderr);
    assert_eq!(report["result"], "pass", "{report:#}");
    let checks = report["checks"].to_string();
    for want in ["slot map", "shard-2 keys in its slots", "shard-0 db0 keys"] {
        assert!(checks.contains(want), "no check {want:?}: {report:#}");
    }
    // list shows each shard of the newest backup, without the key.
    let r = fx.run(&["list"]);
    assert!(
        r.stdout
            .contains(&format!("cache: 3 shards in backup {id}")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("shard-0   slots 0-5460"), "{}", r.stdout);
    let listed = &fx.backups()[0]["shards"];
    assert_eq!(listed[2]["slots"], "10922-16383", "{listed:#}");
    assert_eq!(
        listed[2]["keys"],
        shards[2]["rdb"]["databases"]["0"]["keys"]
    );
    assert!(listed[2]["size_stored"].as_u64().unwrap() > 0);

    // The agent's /metrics: each shard's keys and sizes.
    let port = free_port();
    let agent_source = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\n\n{}schedule = \"*/2 * * * * *\"\n",
        source(&cluster.url(), "")
    );
    let ax = setup(&agent_source);
    let mut agent = Command::new(lifeboat_bin())
        .args(["agent", "--policy", ax.policy.to_str().unwrap()])
        .current_dir(ax.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut body = String::new();
    wait_until("per-shard metrics", || {
        body = http_get(port, "/metrics").map(|x| x.1).unwrap_or_default();
        body.contains("lifeboat_last_backup_shard_keys")
    });
    let _ = agent.kill();
    let _ = agent.wait();
    let shard_keys = |name: &str| {
        metric(
            &body,
            "lifeboat_last_backup_shard_keys",
            &[("source", "cache"), ("shard", name)],
        )
    };
    let sum: f64 = ["shard-0", "shard-1", "shard-2"]
        .iter()
        .map(|s| shard_keys(s).unwrap_or(-1e9))
        .sum();
    assert_eq!(sum as u64, keys, "{body}");
    let stored = metric(
        &body,
        "lifeboat_last_backup_shard_bytes",
        &[
            ("source", "cache"),
            ("shard", "shard-1"),
            ("stage", "stored"),
        ],
    );
    assert!(stored.is_some_and(|b| b > 0.0), "{body}");
}

#[test]
fn a_cluster_backup_restores_into_a_cluster_of_any_shape_a_single_server_or_a_directory() {
    let source_cluster = RedisCluster::start(3, 0, &[]);
    source_cluster.fill(2000);
    let want = key_digests(&source_cluster.current_primaries());
    let fx = setup(&source(&source_cluster.url(), ""));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "cluster backup failed: {}", r.stderr);

    // The same shape: every node ends up with exactly its own data.
    let same = RedisCluster::start(3, 0, &[]);
    let r = fx.restore_to(&same.url(), &[]);
    assert_eq!(r.code, 0, "restore into a 3-shard cluster: {}", r.stderr);
    assert!(r.stderr.contains("2000 key(s)"), "{}", r.stderr);
    for (a, b) in source_cluster.nodes.iter().zip(&same.nodes) {
        assert_eq!(a.digest(None), b.digest(None), "DEBUG DIGEST per node");
        assert_eq!(
            libraries(b),
            vec!["clusterlib".to_string()],
            "Functions on every primary"
        );
    }

    // Another shape: two shards, keys routed by slot.
    let two = RedisCluster::start(2, 0, &[]);
    let r = fx.restore_to(&two.url(), &[]);
    assert_eq!(r.code, 0, "restore into a 2-shard cluster: {}", r.stderr);
    assert_eq!(key_digests(&two.current_primaries()), want);

    // It now holds data: a second restore is refused until --yes, and --flush empties it first.
    let _: () = redis::cmd("SET")
        .arg("stray")
        .arg("x")
        .query(&mut two.client())
        .unwrap();
    let r = fx.restore_to(&two.url(), &[]);
    assert_ne!(
        r.code, 0,
        "a cluster holding data is not written without --yes"
    );
    assert!(r.stderr.contains("already holds data"), "{}", r.stderr);
    let r = fx.restore_to(&two.url(), &["--yes", "--flush"]);
    assert_eq!(r.code, 0, "restore --yes --flush: {}", r.stderr);
    assert_eq!(
        key_digests(&two.current_primaries()),
        want,
        "the stray key is gone"
    );

    // A single server: every shard merged.
    let single = Redis::start(&[]);
    let r = fx.restore_to(&single.url(), &[]);
    assert_eq!(r.code, 0, "restore into one server: {}", r.stderr);
    assert_eq!(key_digests(&[&single]), want);
    assert_eq!(libraries(&single), vec!["clusterlib".to_string()]);

    // A directory: one dump.rdb per shard for stock loading, and the slot map.
    let dir = fx.dir.path().join("restored");
    let r = fx.restore_to(dir.to_str().unwrap(), &[]);
    assert_eq!(r.code, 0, "restore into a directory: {}", r.stderr);
    let map: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("slots.json")).unwrap()).unwrap();
    let mut loaded = Vec::new();
    for (i, shard) in map.as_array().unwrap().iter().enumerate() {
        assert_eq!(shard["shard"], format!("shard-{i}"));
        let file = dir.join(format!("shard-{i}/dump.rdb"));
        check_rdb(&file);
        loaded.push(load(&file));
    }
    assert_eq!(loaded.len(), 3);
    assert_eq!(key_digests(&loaded.iter().collect::<Vec<_>>()), want);
}

/// Stops a server at once, the way a crash would (no save, no waiting for replicas).
fn crash(r: &Redis) {
    let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .arg("NOW")
        .arg("FORCE")
        .query(&mut r.conn(0, None));
}

#[test]
fn a_shard_that_fails_over_during_its_capture_is_captured_again_and_one_that_is_gone_publishes_nothing(
) {
    // Primaries wait 3 s before sending a snapshot: long enough to crash one mid-capture.
    let cluster = RedisCluster::start(3, 1, &["--repl-diskless-sync-delay", "3"]);
    let keys = cluster.fill(1500);
    let fx = setup(&source(&cluster.url(), ""));
    let victim = &cluster.nodes[0];
    let replica_port = cluster.nodes[3].port;
    let r = std::thread::scope(|s| {
        let run = s.spawn(|| fx.run(&["backup"]));
        wait_until("the capture to wait for shard-0's snapshot", || {
            victim.info("replication", "connected_slaves") == "2"
        });
        crash(victim);
        run.join().unwrap()
    });
    assert_eq!(r.code, 0, "backup across a failover: {}", r.stderr);
    assert!(r.stderr.contains("capturing it once more"), "{}", r.stderr);
    let id = fx.backups()[0]["id"].as_str().unwrap().to_string();
    let fp = fx.fingerprint(&id);
    let shard0 = &fp["cluster"][0];
    assert_eq!(shard0["retried"], true, "{shard0:#}");
    assert_eq!(
        shard0["node"],
        format!("127.0.0.1:{replica_port}"),
        "the promoted replica"
    );
    assert_eq!(shard0["role"], "primary");
    assert_eq!(fp["rdb"]["databases"]["0"]["keys"].as_u64(), Some(keys));
    let (v, report) = fx.verify();
    assert_eq!(v.code, 0, "verify: {}\n{report:#}", v.stderr);
    assert_eq!(report["result"], "pass", "{report:#}");

    // A shard with no replica to take over: the backup fails naming it, and nothing is left.
    let small = RedisCluster::start(3, 0, &[]);
    small.fill(300);
    let fx = setup(&source(&small.url(), ""));
    crash(&small.nodes[2]);
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let port = small.nodes[2].port;
    assert!(
        r.stderr
            .contains(&format!("shard-2, primary 127.0.0.1:{port}"))
            && r.stderr.contains("cannot connect"),
        "{}",
        r.stderr
    );
    assert!(fx.backups().is_empty());
    let stored = files_under(&fx.dir.path().join("repo/backups"));
    assert!(
        stored.is_empty(),
        "objects of the failed backup remain: {stored:?}"
    );
}

#[test]
fn a_tls_cluster_is_captured_and_restored_over_tls_and_scan_mode_reads_every_shard() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let tls = format!(
        "tls_ca_file = \"{}\"",
        certs.path().join("ca.crt").display()
    );
    let cluster = RedisCluster::start_tls(3, 0, certs.path());
    let keys = cluster.fill(1000);
    let want = key_digests(&cluster.current_primaries());
    let fx = setup(&source(&cluster.url(), &tls));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "TLS cluster backup: {}", r.stderr);
    let id = fx.backups()[0]["id"].as_str().unwrap().to_string();
    let fp = fx.fingerprint(&id);
    for (s, port) in fp["cluster"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&cluster.tls_ports)
    {
        assert_eq!(
            s["node"],
            format!("127.0.0.1:{port}"),
            "captured over TLS: {s:#}"
        );
    }
    let (v, report) = fx.verify();
    assert_eq!(v.code, 0, "verify: {}\n{report:#}", v.stderr);
    assert_eq!(report["result"], "pass", "{report:#}");

    let target = RedisCluster::start_tls(2, 0, certs.path());
    let r = fx.restore_to(&target.url(), &[]);
    assert_eq!(r.code, 0, "restore into a TLS cluster: {}", r.stderr);
    assert_eq!(key_digests(&target.current_primaries()), want);

    // Managed services refuse SYNC: a scan reads every shard instead.
    let fx = setup(&source(&cluster.url(), &format!("{tls}\nmode = \"scan\"")));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "cluster scan: {}", r.stderr);
    let b = &fx.backups()[0];
    let fp = fx.fingerprint(b["id"].as_str().unwrap());
    assert_eq!(fp["mode"], "scan");
    assert_eq!(fp["rdb"]["databases"]["0"]["keys"].as_u64(), Some(keys));
    let (v, report) = fx.verify();
    assert_eq!(v.code, 0, "verify the scan: {}\n{report:#}", v.stderr);
    assert_eq!(report["result"], "pass", "{report:#}");
}
