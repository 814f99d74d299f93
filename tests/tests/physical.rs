//! Physical PostgreSQL sources (`kind = "postgres-physical"`) against a real server: a base
//! backup restores into a directory a server starts on with every row, the verifier proves it by
//! starting one, stock tools unpack it, and a role or a pg_hba.conf that allow no replication
//! get a clear error with nothing published.

use std::path::{Path, PathBuf};

use lifeboat_tests::*;

struct Fx {
    pg: &'static Postgres,
    db: String,
    dir: tempfile::TempDir,
    key: Key,
}

fn setup(prefix: &str) -> Fx {
    let pg = postgres();
    let db = pg.create_db(prefix);
    pg.psql(
        &db,
        "create table t (id serial primary key, v text); \
         insert into t (v) select md5(g::text) from generate_series(1, 5000) g; \
         create table u as select g, now() as at from generate_series(1, 300) g; \
         select lo_from_bytea(0, 'large object');",
    );
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    Fx { pg, db, dir, key }
}

impl Fx {
    /// A policy with one physical source as `user`, whose verify section is `verify`.
    fn policy(&self, user: &str, verify: &str) -> PathBuf {
        let pw = self.pg.password_file(self.dir.path());
        let url = format!("postgres://{user}@127.0.0.1:{}/{}", self.pg.port, self.db);
        PolicyBuilder::new(&self.key.recipient)
            .source(
                "cluster",
                "postgres-physical",
                &format!(
                    "url = \"{url}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nretries = 0\n{verify}",
                    pw.display()
                ),
            )
            .write(self.dir.path())
    }

    fn run(&self, args: &[&str]) -> Run {
        lifeboat(self.dir.path(), args, &[])
    }

    fn backup(&self, policy: &Path) -> String {
        let p = policy.to_str().unwrap();
        let r = self.run(&["backup", "--policy", p]);
        assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
        let r = self.run(&["list", "--policy", p, "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        list[0]["id"].as_str().unwrap().to_string()
    }

    fn backups(&self) -> Vec<PathBuf> {
        files_under(&self.dir.path().join("repo/backups"))
    }
}

#[test]
fn a_base_backup_restores_into_a_directory_a_server_starts_on() {
    let fx = setup("phys_restore");
    let before = fx.pg.digest(&fx.db);
    let policy = fx.policy("postgres", "");
    let id = fx.backup(&policy);

    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            fx.dir
                .path()
                .join(format!("repo/backups/cluster/{id}/manifest.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["kind"], "postgres-physical");
    let base = &manifest["base_backup"];
    let lsn = |v: &serde_json::Value| {
        let (hi, lo) = v.as_str().unwrap().split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    assert!(
        lsn(&base["stop_lsn"]) > lsn(&base["start_lsn"]),
        "{manifest:#}"
    );
    assert_eq!(base["timeline"], 1, "{manifest:#}");
    let system_id = fx.pg.psql(
        "postgres",
        "select system_identifier from pg_control_system()",
    );
    assert_eq!(
        base["system_identifier"],
        system_id.as_str(),
        "{manifest:#}"
    );

    // Rows written after the backup are not in it.
    fx.pg
        .psql(&fx.db, "insert into t (v) values ('after the backup')");

    let restored = fx.dir.path().join("restored");
    let data = restored.join("data");
    let r = fx.run(&[
        "restore",
        "--policy",
        policy.to_str().unwrap(),
        "--source",
        "cluster",
        "--to",
        data.to_str().unwrap(),
        "--identity",
        fx.key.identity.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "restore: {}", r.stderr);
    assert!(
        r.stderr.contains("pg_ctl -D") && r.stderr.contains("consistent at LSN"),
        "{}",
        r.stderr
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700,
        "the server refuses a data directory others can read"
    );
    assert!(data.join("backup_label").exists() && data.join("backup_manifest").exists());

    let copy = fx.pg.start_restored(&restored);
    assert_eq!(
        copy.digest(&fx.db),
        before,
        "the restored cluster holds what the source held at backup time"
    );
    assert_eq!(
        copy.psql(
            "postgres",
            "select system_identifier from pg_control_system()"
        ),
        system_id
    );
}

#[test]
fn the_verifier_starts_a_server_on_the_backup_and_runs_the_policys_checks() {
    let fx = setup("phys_verify");
    let policy = fx.policy(
        "postgres",
        "[sources.verify]\nchecks = [{ sql = \"select count(*) from t\", equals = 5000 }]",
    );
    let id = fx.backup(&policy);
    let verify = |policy: &Path| {
        verifier(
            fx.dir.path(),
            &[
                "verify",
                "--policy",
                policy.to_str().unwrap(),
                "--identity",
                fx.key.identity.to_str().unwrap(),
                "--json",
            ],
            &[],
        )
    };
    let r = verify(&policy);
    assert_eq!(r.code, 0, "verify: {}{}", r.stdout, r.stderr);
    let reports: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let report = &reports[0];
    assert_eq!(report["backup_id"], id.as_str());
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "pg_verifybackup",
        "system identifier",
        "recovered",
        &format!("database {}", fx.db),
        "database postgres",
        "sql: select count(*) from t",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }

    // The policy's check runs in the restored cluster: a wrong expectation fails (exit 4).
    let wrong = fx.policy(
        "postgres",
        "[sources.verify]\nchecks = [{ sql = \"select count(*) from t\", equals = 5001 }]",
    );
    let r = verify(&wrong);
    assert_eq!(r.code, 4, "verify: {}{}", r.stdout, r.stderr);
    let scratch_left = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("lbv-"))
        .filter(|e| {
            e.path().join("data/backup_label").exists() || e.path().join("data/PG_VERSION").exists()
        })
        .count();
    assert_eq!(scratch_left, 0, "the scratch cluster was torn down");
}

#[test]
fn stock_tools_unpack_a_base_backup_that_pg_verifybackup_accepts() {
    let fx = setup("phys_stock");
    let policy = fx.policy("postgres", "");
    let id = fx.backup(&policy);
    let object = fx
        .dir
        .path()
        .join(format!("repo/backups/cluster/{id}/base.tar.zst.age"));
    let out = fx.dir.path().join("stock");
    std::fs::create_dir(&out).unwrap();
    let script = format!(
        "set -o pipefail; age -d -i {} {} | zstd -d | tar -x -C {}",
        fx.key.identity.display(),
        object.display(),
        out.display()
    );
    let st = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .status()
        .unwrap();
    assert!(st.success(), "{script}");
    let v = std::process::Command::new(fx.pg.bin.join("pg_verifybackup"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "pg_verifybackup: {}",
        String::from_utf8_lossy(&v.stderr)
    );
}

#[test]
fn a_role_without_replication_is_told_what_to_grant_and_nothing_is_published() {
    let fx = setup("phys_norep");
    let role = format!("norep_{}", suffix());
    fx.pg.psql(
        "postgres",
        &format!("create role {role} login password '{}'", fx.pg.password),
    );
    let policy = fx.policy(&role, "");
    let r = fx.run(&["backup", "--policy", policy.to_str().unwrap()]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(
        r.stderr.contains("lacks REPLICATION") && r.stderr.contains("ALTER ROLE"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains(&fx.pg.password), "{}", r.stderr);
    assert!(fx.backups().is_empty(), "{:?}", fx.backups());
}

#[test]
fn a_pg_hba_without_a_replication_line_is_named() {
    let fx = setup("phys_hba");
    let role = format!("nohba_{}", suffix());
    fx.pg.psql(
        "postgres",
        &format!(
            "create role {role} login replication password '{}'",
            fx.pg.password
        ),
    );
    let hba = fx.pg.dir.join("data/pg_hba.conf");
    let original = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host replication {role} 127.0.0.1/32 reject\n{original}"),
    )
    .unwrap();
    fx.pg.psql("postgres", "select pg_reload_conf()");
    let policy = fx.policy(&role, "");
    let r = fx.run(&["backup", "--policy", policy.to_str().unwrap()]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(
        r.stderr.contains("pg_hba.conf") && r.stderr.contains("host replication"),
        "{}",
        r.stderr
    );
    assert!(fx.backups().is_empty(), "{:?}", fx.backups());
}

#[test]
fn a_server_with_minimal_wal_is_told_what_to_set() {
    let pg = start_cluster(vec!["wal_level=minimal".into(), "max_wal_senders=0".into()]);
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let policy = PolicyBuilder::new(&key.recipient)
        .source(
            "cluster",
            "postgres-physical",
            &format!(
                "url = \"{}\"\npassword_file = \"{}\"\nretries = 0",
                pg.url("postgres"),
                pg.password_file(dir.path()).display()
            ),
        )
        .write(dir.path());
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", policy.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("wal_level is minimal") && r.stderr.contains("wal_level = replica"),
        "{}",
        r.stderr
    );
    assert!(files_under(&dir.path().join("repo/backups")).is_empty());
}

#[test]
fn a_base_backup_killed_midway_leaves_nothing_visible_and_no_slot() {
    let fx = setup("phys_kill");
    // 1 MiB/s: the cluster takes tens of seconds, so the kill lands inside the backup.
    let policy = {
        let pw = fx.pg.password_file(fx.dir.path());
        PolicyBuilder::new(&fx.key.recipient)
            .source(
                "cluster",
                "postgres-physical",
                &format!(
                    "url = \"{}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nmax_rate = \"1MiB\"\nretries = 0",
                    fx.pg.url(&fx.db),
                    pw.display()
                ),
            )
            .write(fx.dir.path())
    };
    let mut child = std::process::Command::new(lifeboat_bin())
        .args(["backup", "--policy", policy.to_str().unwrap()])
        .current_dir(fx.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let slots = || {
        fx.pg.psql(
            "postgres",
            "select count(*) from pg_replication_slots where slot_name like 'lifeboat_base_%'",
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while slots() == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup never reserved its WAL"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the throttled backup ended too early for the kill"
    );
    child.kill().unwrap(); // SIGKILL: no cleanup runs
    child.wait().unwrap();
    let manifests: Vec<PathBuf> = fx
        .backups()
        .into_iter()
        .filter(|f| f.ends_with("manifest.json"))
        .collect();
    assert!(manifests.is_empty(), "{manifests:?}");
    let r = fx.run(&["list", "--policy", policy.to_str().unwrap(), "--json"]);
    assert_eq!(r.stdout.trim(), "[]", "{}", r.stderr);
    // The server drops the temporary slot once the killed session is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while slots() != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed backup's slot outlived it"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
