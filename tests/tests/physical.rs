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
    setup_on(postgres(), prefix)
}

/// The fixture on `pg` instead of the cluster this binary shares.
fn setup_on(pg: &'static Postgres, prefix: &str) -> Fx {
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
    /// A policy with one physical source as `user`, with `more` fields (or its verify section).
    fn policy(&self, user: &str, more: &str) -> PathBuf {
        let pw = self.pg.password_file(self.dir.path());
        let url = format!("postgres://{user}@127.0.0.1:{}/{}", self.pg.port, self.db);
        PolicyBuilder::new(&self.key.recipient)
            .source(
                "cluster",
                "postgres-physical",
                &format!(
                    "url = \"{url}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nretries = 0\n{more}",
                    pw.display()
                ),
            )
            .write(self.dir.path())
    }

    /// A physical source's fields as `postgres`, streaming WAL through `slot` and flushing every
    /// second, with `more` fields.
    fn wal_fields(&self, slot: &str, more: &str) -> String {
        let pw = self.pg.password_file(self.dir.path());
        format!(
            "url = \"{}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nretries = 0\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}\n{more}",
            self.pg.url(&self.db),
            pw.display()
        )
    }

    /// A policy whose source streams WAL through a new slot, flushing every second: the slot
    /// and the policy.
    fn wal_policy(&self) -> (String, PathBuf) {
        let slot = format!("lb_{}", suffix());
        let policy = self.policy(
            "postgres",
            &format!("wal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}"),
        );
        (slot, policy)
    }

    /// `lifeboat check --read-data` with the identity: every stored byte re-hashed.
    fn check_read_data(&self, policy: &Path) -> Run {
        self.run(&[
            "check",
            "--read-data",
            "--policy",
            policy.to_str().unwrap(),
            "--identity",
            self.key.identity.to_str().unwrap(),
        ])
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

    /// A policy streaming WAL through a new slot into a repository at an absolute path (the
    /// restored server runs restore_command in its data directory): slot, policy, repository.
    fn recovery_policy(&self) -> (String, PathBuf, PathBuf) {
        let slot = format!("lb_{}", suffix());
        let repo = self.dir.path().join("repo");
        let pw = self.pg.password_file(self.dir.path());
        let policy = PolicyBuilder::new(&self.key.recipient)
            .repository(&format!("url = \"file://{}\"", repo.display()))
            .source(
                "cluster",
                "postgres-physical",
                &format!(
                    "url = \"{}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}",
                    self.pg.url(&self.db),
                    pw.display()
                ),
            )
            .write(self.dir.path());
        (slot, policy, repo)
    }

    /// Starts a server on the cluster restored into `restored/data`, set to recover from the
    /// archive, and waits until recovery has ended. The server's OS user runs restore_command:
    /// it reads the policy, the key and the repository.
    fn recover(&self, restored: &Path, policy: &Path, repo: &Path) -> Postgres {
        for (path, recursive) in [
            (self.dir.path(), false),
            (policy, false),
            (self.key.identity.as_path(), false),
            (repo, true),
        ] {
            let mut chmod = std::process::Command::new("chmod");
            if recursive {
                chmod.arg("-R");
            }
            assert!(chmod.arg("a+rX").arg(path).status().unwrap().success());
        }
        let copy = self.pg.start_restored(restored);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while copy.psql("postgres", "select pg_is_in_recovery()") != "f" {
            assert!(
                std::time::Instant::now() < deadline,
                "recovery never finished:\n{}",
                std::fs::read_to_string(restored.join("log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        copy
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
    let r = restore_to(&fx, &policy, &data, &[]);
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

    // The base backup unpacks as it downloads; damage found on the way, or only at its end
    // (a byte flipped near the end, a byte appended), is exit 13 naming the object, and the
    // directory is emptied again: no partial cluster is left to start.
    let object = fx
        .dir
        .path()
        .join(format!("repo/backups/cluster/{id}/base.tar.zst.age"));
    let good = std::fs::read(&object).unwrap();
    let mut flipped = good.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x01;
    let mut longer = good.clone();
    longer.push(0);
    for (what, bytes) in [("a flipped byte", flipped), ("an appended byte", longer)] {
        std::fs::write(&object, bytes).unwrap();
        let damaged = fx.dir.path().join("damaged");
        let r = restore_to(&fx, &policy, &damaged, &[]);
        assert_eq!(r.code, 13, "{what}: {}", r.stderr);
        assert!(
            r.stderr.contains("error: base backup base.tar.zst.age:"),
            "{what}: {}",
            r.stderr
        );
        let left: Vec<_> = std::fs::read_dir(&damaged).unwrap().flatten().collect();
        assert!(left.is_empty(), "{what}: {left:?} left in the directory");
    }
    std::fs::write(&object, good).unwrap();
}

#[test]
fn the_verifier_starts_a_server_on_the_backup_and_runs_the_policys_checks() {
    let fx = setup("phys_verify");
    // Checks in the url's database, in one named, and in every one.
    let every = "select count(*) from pg_database where datname = current_database()";
    let policy = fx.policy(
        "postgres",
        &format!(
            "[sources.verify]\nchecks = [{{ sql = \"select count(*) from t\", equals = 5000 }}, \
             {{ sql = \"select count(*) from pg_roles where rolname = 'postgres'\", equals = 1, database = \"postgres\" }}, \
             {{ sql = \"{every}\", equals = 1, database = \"*\" }}]"
        ),
    );
    let id = fx.backup(&policy);
    // A temp dir of its own, where the scratch must be gone afterwards (other tests' are not).
    let tmp = tempfile::Builder::new()
        .prefix("lbt-")
        .tempdir_in("/tmp")
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let env = [("TMPDIR".to_string(), tmp.path().display().to_string())];
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
            &env,
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
        "pg_amcheck",
        "system identifier",
        "recovered",
        &format!("database {}", fx.db),
        "database postgres",
        "sql: select count(*) from t",
        "sql: select count(*) from pg_roles where rolname = 'postgres' (in postgres)",
        &format!("sql: {every} (in {})", fx.db),
        &format!("sql: {every} (in postgres)"),
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let databases = names.iter().filter(|n| n.starts_with("database ")).count();
    let everywhere = names
        .iter()
        .filter(|n| n.starts_with(&format!("sql: {every}")))
        .count();
    assert_eq!(everywhere, databases, "one check per database: {names:?}");

    // The policy's check runs in the restored cluster: a wrong expectation fails (exit 4).
    // A database the backup lacks fails its check, naming it.
    let wrong = fx.policy(
        "postgres",
        "[sources.verify]\nchecks = [{ sql = \"select count(*) from t\", equals = 5001 }, \
         { sql = \"select 1\", equals = 1, database = \"nosuchdb\" }]",
    );
    let r = verify(&wrong);
    assert_eq!(r.code, 4, "verify: {}{}", r.stdout, r.stderr);
    let reports: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let failed: Vec<String> = reports[0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| {
            format!(
                "{}: {}",
                c["name"].as_str().unwrap(),
                c["found"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            "sql: select count(*) from t: 5000",
            "sql: select 1 (in nosuchdb): the backup has no database nosuchdb"
        ],
        "{}",
        r.stdout
    );
    let scratch_left = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("lbv-"))
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
    let policy = fx.policy("postgres", "max_rate = \"1MiB\"");
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

/// The end of the WAL stored under `wal/cluster/` in the repository at `repo`, as an LSN: each
/// whole segment reaches its end, a partial one its length. With the keys seen.
fn archived_end(repo: &Path) -> (u64, Vec<String>) {
    let keys: Vec<String> = files_under(&repo.join("wal/cluster"))
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    (archived_end_of_names(&keys), keys)
}

/// The end of the WAL that objects named `names` (file names, no prefix) hold.
fn archived_end_of_names(names: &[String]) -> u64 {
    let segment = 16u64 << 20;
    let mut end = 0;
    for name in names {
        let name = name.rsplit('/').next().unwrap_or(name);
        // An upload in progress (`.SEGMENT….tmp-…` in a directory repository) holds nothing yet,
        // and a signature (stored before its object) holds no WAL.
        if name.starts_with('.') || name.ends_with(".minisig") {
            continue;
        }
        let Some(seg) = name.get(..24) else { continue };
        let (Ok(log), Ok(n)) = (
            u64::from_str_radix(&seg[8..16], 16),
            u64::from_str_radix(&seg[16..24], 16),
        ) else {
            continue;
        };
        let start = (log << 32) + n * segment;
        let parts: Vec<&str> = name.split('.').collect();
        let reach = if parts.get(1) == Some(&"partial") {
            start + u64::from_str_radix(parts[2], 16).unwrap()
        } else {
            start + segment
        };
        end = end.max(reach);
    }
    end
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Whole segment objects under `wal/cluster/`, by file name.
fn whole_segments(repo: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = files_under(&repo.join("wal/cluster"))
        .into_iter()
        .filter(|f| {
            let n = f.file_name().unwrap().to_string_lossy().to_string();
            n.split('.').count() == 4 && !n.contains(".history.")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn wal_streams_into_the_repository_within_the_flush_interval_under_writes() {
    let fx = setup("phys_wal");
    let slot = format!("lb_{}", suffix());
    let policy = fx.policy(
        "postgres",
        &format!("retention = {{ keep_last = 1 }}\nwal = {{ slot = \"{slot}\", flush_interval = \"2s\" }}"),
    );
    let p = policy.to_str().unwrap();
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    let repo = fx.dir.path().join("repo");
    let pg = fx.pg;
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    // A write load, with segment switches and two base backups on the way.
    let mut last_write = 0;
    for i in 0..30 {
        pg.psql(
            &fx.db,
            &format!(
                "insert into t (v) select md5(g::text || '{i}') from generate_series(1, 2000) g"
            ),
        );
        if i == 5 || i == 20 {
            pg.psql("postgres", "select pg_switch_wal()");
        }
        if i == 10 || i == 25 {
            let r = fx.run(&["backup", "--policy", p]);
            assert_eq!(r.code, 0, "base backup: {}", r.stderr);
        }
        last_write = lsn(&pg.psql("postgres", "select pg_current_wal_lsn()"));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // What a user measures as the RPO: the archive reaches the server's position of the last
    // write within the flush interval and a few seconds.
    let written_at = std::time::Instant::now();
    let deadline = written_at + std::time::Duration::from_secs(2 + 5);
    let (mut end, mut keys) = archived_end(&repo);
    while end < last_write && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        (end, keys) = archived_end(&repo);
    }
    assert!(
        end >= last_write,
        "archived up to {end:X}, the last write was at {last_write:X}; keys {keys:?}\n{}",
        stderr()
    );
    eprintln!(
        "the archive reached the last write {:.1} s after it (flush_interval 2s); {} objects",
        written_at.elapsed().as_secs_f64(),
        keys.len()
    );
    // The slot is told only what is stored: its restart point never passes the archive.
    let restart = lsn(&pg.psql(
        "postgres",
        &format!("select restart_lsn from pg_replication_slots where slot_name = '{slot}'"),
    ));
    let (end, _) = archived_end(&repo);
    assert!(restart <= end, "slot at {restart:X}, archive at {end:X}");
    assert!(restart > 0, "the slot moved");

    // Stock tools read a stored partial segment: its name carries its length and SHA-256.
    let (name, plaintext) = a_stored_partial(&fx, &repo);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&plaintext))
    };
    let parts: Vec<&str> = name.split('.').collect();
    assert_eq!(sha, parts[3], "{name}");
    assert_eq!(
        plaintext.len() as u64,
        u64::from_str_radix(parts[2], 16).unwrap(),
        "{name}"
    );

    // SIGTERM stops it at a safe point.
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.code().is_some(), "{status:?}\n{}", stderr());
    pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );

    // check: the chain from each kept base backup is whole, and every object decrypts to the
    // SHA-256 its name gives.
    let id = fx.key.identity.to_str().unwrap();
    let check = || fx.run(&["check", "--read-data", "--policy", p, "--identity", id]);
    let r = check();
    assert_eq!(r.code, 0, "check: {}", r.stderr);
    // A missing segment is a gap, named by its LSN range (exit 13).
    let segments = whole_segments(&repo);
    assert!(segments.len() >= 3, "{segments:?}");
    let victim = &segments[segments.len() - 2];
    let kept = std::fs::read(victim).unwrap();
    std::fs::remove_file(victim).unwrap();
    let r = check();
    assert_eq!(r.code, 13, "check with a segment gone: {}", r.stderr);
    assert!(
        r.stderr.contains("is not in the archive") && r.stderr.contains("wal/cluster/"),
        "{}",
        r.stderr
    );
    std::fs::write(victim, kept).unwrap();

    // Prune keeps the newest base backup and the WAL from its start; older WAL goes.
    let listed = |r: &Run| -> Vec<serde_json::Value> { serde_json::from_str(&r.stdout).unwrap() };
    let before = whole_segments(&repo);
    let r = fx.run(&["prune", "--policy", p]);
    assert_eq!(r.code, 0, "prune: {}", r.stderr);
    assert!(r.stderr.contains("WAL segments"), "{}", r.stderr);
    let backups = listed(&fx.run(&["list", "--policy", p, "--json"]));
    assert_eq!(backups.len(), 1);
    let start = lsn(backups[0]["base_backup"]["start_lsn"].as_str().unwrap());
    let after = whole_segments(&repo);
    assert!(after.len() < before.len(), "{before:?} → {after:?}");
    let first_kept = archived_end_of(&after[0]);
    assert!(
        first_kept > start - (start % (16 << 20)),
        "the segment holding the kept backup's start stays: {after:?}"
    );
    let r = check();
    assert_eq!(r.code, 0, "check after prune: {}", r.stderr);
    // list shows the window a point-in-time recovery could reach.
    let r = fx.run(&["list", "--policy", p]);
    assert!(
        r.stdout.contains("cluster: recoverable (WAL stored")
            && r.stdout.contains("the archive's end"),
        "{}",
        r.stdout
    );
    eprintln!("{}", r.stdout);
}

/// The end LSN of one whole segment object.
fn archived_end_of(f: &Path) -> u64 {
    let name = f.file_name().unwrap().to_string_lossy().to_string();
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let n = u64::from_str_radix(&name[16..24], 16).unwrap();
    (log << 32) + (n + 1) * (16 << 20)
}

/// Starts `lifeboat wal stream` for `policy`, logging to `log`, and waits until its slot is
/// active.
fn start_streamer(fx: &Fx, policy: &Path, slot: &str, log: &Path) -> std::process::Child {
    start_streamer_with(fx, policy, slot, log, &[])
}

/// [`start_streamer`] with `env` set (an S3 repository's credentials).
fn start_streamer_with(
    fx: &Fx,
    policy: &Path,
    slot: &str,
    log: &Path,
    env: &[(String, String)],
) -> std::process::Child {
    let child = std::process::Command::new(lifeboat_bin())
        .args([
            "wal",
            "stream",
            "--policy",
            policy.to_str().unwrap(),
            "--source",
            "cluster",
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(fx.dir.path())
        .env("LIFEBOAT_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while fx.pg.psql(
        "postgres",
        &format!("select count(*) from pg_replication_slots where slot_name = '{slot}' and active"),
    ) != "1"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never streamed:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child
}

/// Stops a streamer with SIGKILL: nothing is cleaned up.
fn stop(child: &mut std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn write_some(fx: &Fx, rounds: usize, switch_at: Option<usize>) -> u64 {
    write_on(fx.pg, &fx.db, rounds, switch_at)
}

/// `rounds` inserts into `db` on `pg` (a WAL switch after round `switch_at`); the server's WAL
/// position after the last.
fn write_on(pg: &Postgres, db: &str, rounds: usize, switch_at: Option<usize>) -> u64 {
    let mut last = 0;
    for i in 0..rounds {
        pg.psql(
            db,
            &format!(
                "insert into t (v) select md5(g::text || '{i}') from generate_series(1, 2000) g"
            ),
        );
        if Some(i) == switch_at {
            pg.psql("postgres", "select pg_switch_wal()");
        }
        last = lsn(&pg.psql("postgres", "select pg_current_wal_lsn()"));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    last
}

fn wait_archived(repo: &Path, lsn: u64, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while archived_end(repo).0 < lsn {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    true
}

#[test]
fn a_streamer_killed_9_resumes_from_its_slot_and_the_chain_stays_whole() {
    let fx = setup("phys_wal_kill");
    let (slot, policy) = fx.wal_policy();
    let p = policy.to_str().unwrap();
    let repo = fx.dir.path().join("repo");
    let log = fx.dir.path().join("stream.log");
    // A temp dir of its own: the segment spool must not outlive the killed process.
    let tmp = fx.dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let env = [("TMPDIR".to_string(), tmp.display().to_string())];
    let mut child = start_streamer_with(&fx, &policy, &slot, &log, &env);
    let r = fx.run(&["backup", "--policy", p]);
    assert_eq!(r.code, 0, "base backup: {}", r.stderr);
    write_some(&fx, 10, Some(3));
    child.kill().unwrap(); // SIGKILL mid-stream: nothing is cleaned up
    child.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the killed streamer left {left:?} in its TMPDIR"
    );
    // Written while no streamer runs: the slot holds it on the server.
    let during = write_some(&fx, 10, Some(5));
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    let last = write_some(&fx, 10, None).max(during);
    assert!(
        wait_archived(&repo, last, std::time::Duration::from_secs(10)),
        "archived to {:X}, wrote to {last:X}:\n{}",
        archived_end(&repo).0,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    stop(&mut child);
    let r = fx.check_read_data(Path::new(p));
    assert_eq!(r.code, 0, "the chain is whole after the kill: {}", r.stderr);
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
}

#[test]
fn a_slot_dropped_by_an_operator_is_recreated_and_the_gap_is_reported() {
    // A cluster of its own: another test's slot would keep the WAL this one needs gone.
    let pg: &'static Postgres = Box::leak(Box::new(start_cluster(Vec::new())));
    let fx = setup_on(pg, "phys_wal_drop");
    let (slot, policy) = fx.wal_policy();
    let p = policy.to_str().unwrap();
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    let r = fx.run(&["backup", "--policy", p]);
    assert_eq!(r.code, 0, "base backup: {}", r.stderr);
    write_some(&fx, 5, Some(2));
    stop(&mut child);
    // An operator drops the slot; the WAL written meanwhile is gone from the server.
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
    for _ in 0..3 {
        write_some(&fx, 3, Some(1));
        fx.pg.psql("postgres", "select pg_switch_wal()");
        fx.pg.psql("postgres", "checkpoint");
    }
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    let last = write_some(&fx, 5, None);
    assert!(wait_archived(
        &fx.dir.path().join("repo"),
        last,
        std::time::Duration::from_secs(10)
    ));
    stop(&mut child);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("WAL from") && logged.contains("is lost"),
        "the streamer says what is lost:\n{logged}"
    );
    let r = fx.run(&["check", "--policy", p]);
    assert_eq!(r.code, 13, "the gap is reported: {}", r.stderr);
    assert!(r.stderr.contains("is not in the archive"), "{}", r.stderr);
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
}

#[test]
fn the_agent_streams_wal_and_exports_where_the_archive_stands() {
    let fx = setup("phys_agent");
    let slot = format!("lb_{}", suffix());
    let port = free_port();
    let pw = fx.pg.password_file(fx.dir.path());
    let policy = fx.dir.path().join("agent.toml");
    let base = PolicyBuilder::new(&fx.key.recipient)
        .source(
            "cluster",
            "postgres-physical",
            &format!(
                "url = \"{}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nrun_on_start = true\nschedule = \"0 3 * * 0\"\nobjectives = {{ rpo = \"1m\" }}\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}",
                fx.pg.url(&fx.db),
                pw.display()
            ),
        )
        .text();
    std::fs::write(
        &policy,
        format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n\n{base}"),
    )
    .unwrap();
    let mut agent = std::process::Command::new(lifeboat_bin())
        .args(["agent", "--policy", policy.to_str().unwrap()])
        .current_dir(fx.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let last = write_some(&fx, 10, Some(4));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let archived: u64 = loop {
        let body = http_get(port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let archived = metric(&body, "lifeboat_wal_archived_lsn", &[("source", "cluster")]);
        let caught = metric(
            &body,
            "lifeboat_wal_caught_up_timestamp_seconds",
            &[("source", "cluster")],
        );
        if let (Some(a), Some(_)) = (archived, caught) {
            if a as u64 >= last {
                break a as u64;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent's metrics never showed the archive at {last:X}:\n{body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert!(
        archived_end(&fx.dir.path().join("repo")).0 >= archived,
        "the metric never runs ahead of the repository"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    let status = agent.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the agent stops cleanly on SIGTERM");
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
}

#[test]
fn an_s3_outage_while_streaming_loses_nothing_and_the_slot_waits() {
    use lifeboat_tests::s3proxy::{HttpFault, Rule, S3Proxy};
    let fx = setup("phys_wal_s3");
    let s3 = s3();
    let bucket = rt().block_on(s3.create_bucket());
    let proxy = S3Proxy::start(&s3.endpoint);
    let env = s3.env();
    let slot = format!("lb_{}", suffix());
    let policy = PolicyBuilder::new(&fx.key.recipient)
        .repository(&format!(
            "url = \"s3://{bucket}/repo\"\nendpoint = \"{}\"",
            proxy.endpoint
        ))
        .source("cluster", "postgres-physical", &fx.wal_fields(&slot, ""))
        .write(fx.dir.path());
    let p = policy.to_str().unwrap();
    let archived = || {
        let keys = rt().block_on(s3.keys(&bucket, "repo/wal/cluster/"));
        archived_end_of_names(&keys)
    };
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer_with(&fx, &policy, &slot, &log, &env);
    let r = lifeboat(fx.dir.path(), &["backup", "--policy", p], &env);
    assert_eq!(r.code, 0, "base backup: {}", r.stderr);
    write_some(&fx, 5, Some(2));
    // The store refuses every write for a while.
    proxy.add(Rule::new(
        "PUT",
        "/wal/",
        HttpFault::Status(503, "SlowDown"),
    ));
    proxy.add(Rule::new(
        "POST",
        "/wal/",
        HttpFault::Status(503, "SlowDown"),
    ));
    let outage = std::time::Instant::now();
    let mut during = 0;
    while outage.elapsed() < std::time::Duration::from_secs(15) {
        during = write_some(&fx, 3, None);
        // The server is told nothing beyond what is stored: the slot keeps the rest.
        let restart = lsn(&fx.pg.psql(
            "postgres",
            &format!("select restart_lsn from pg_replication_slots where slot_name = '{slot}'"),
        ));
        let end = archived();
        assert!(
            restart <= end,
            "slot at {restart:X} passed the archive at {end:X}"
        );
    }
    assert!(archived() < during, "the outage held the archive back");
    proxy.clear();
    let last = write_some(&fx, 3, None).max(during);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while archived() < last {
        assert!(
            std::time::Instant::now() < deadline,
            "the archive never caught up after the outage ({:X} < {last:X}):\n{}",
            archived(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    eprintln!(
        "caught up {:.1} s after the store came back",
        (std::time::Instant::now() - outage).as_secs_f64() - 15.0
    );
    stop(&mut child);
    let r = lifeboat(
        fx.dir.path(),
        &[
            "check",
            "--read-data",
            "--policy",
            p,
            "--identity",
            fx.key.identity.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(
        r.code, 0,
        "the chain is whole after the outage: {}",
        r.stderr
    );
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
}

/// A cluster of its own with data, and a hot standby of it that the fixture points at: the
/// streamer's slot lives on the standby, which survives its promotion.
fn standby_fixture(prefix: &str) -> (&'static Postgres, Fx) {
    let primary: &'static Postgres = Box::leak(Box::new(start_cluster(Vec::new())));
    let Fx { db, dir, key, .. } = setup_on(primary, prefix);
    let standby: &'static Postgres = Box::leak(Box::new(primary.start_standby()));
    (
        primary,
        Fx {
            pg: standby,
            db,
            dir,
            key,
        },
    )
}

/// Waits until the archive holds WAL up to `last`, naming the streamer's log if it never does.
fn assert_archived(fx: &Fx, last: u64, log: &Path) {
    assert!(
        wait_archived(
            &fx.dir.path().join("repo"),
            last,
            std::time::Duration::from_secs(30)
        ),
        "archived to {:X}, wrote to {last:X}:\n{}",
        archived_end(&fx.dir.path().join("repo")).0,
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// What the archive holds after a promotion: both timelines, the new one's history file, and
/// a chain `check --read-data` finds whole.
fn assert_both_timelines_whole(fx: &Fx, policy: &Path) {
    let (_, keys) = archived_end(&fx.dir.path().join("repo"));
    assert!(
        keys.iter().any(|k| k == "00000002.history.zst.age"),
        "the new timeline's history is archived: {keys:?}"
    );
    let on = |tli: &str| keys.iter().filter(|k| k.starts_with(tli)).count();
    assert!(on("00000001") > 0 && on("00000002") > 1, "{keys:?}");
    let r = fx.check_read_data(policy);
    assert_eq!(
        r.code, 0,
        "the chain across the switch is whole: {}",
        r.stderr
    );
}

#[test]
fn a_promoted_standby_is_followed_onto_its_new_timeline_without_a_break() {
    let (primary, fx) = standby_fixture("phys_promote");
    let (slot, policy, repo) = fx.recovery_policy();
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    // A base backup taken from the standby, as many sites do.
    fx.backup(&policy);
    let before = write_on(primary, &fx.db, 6, Some(2));
    assert_archived(&fx, before, &log);
    assert_eq!(fx.pg.psql("postgres", "select pg_promote()"), "t");
    let after = write_on(fx.pg, &fx.db, 6, Some(3));
    assert_archived(&fx, after, &log);
    stop(&mut child);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("Following the server onto a new timeline"),
        "{logged}"
    );
    assert!(
        !logged.contains("reconnecting"),
        "the switch is followed within the session: {logged}"
    );
    assert_both_timelines_whole(&fx, &policy);

    // A point-in-time restore from the base backup on timeline 1 follows the archive across the
    // switch: every row written on both timelines comes back.
    let expected = fx.pg.psql(&fx.db, "select count(*) from t");
    let restored = fx.dir.path().join("restored");
    let r = restore_to(&fx, &policy, &restored.join("data"), &["--latest"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let copy = fx.recover(&restored, &policy, &repo);
    assert_eq!(
        copy.psql(&fx.db, "select count(*) from t"),
        expected,
        "{}",
        std::fs::read_to_string(restored.join("log")).unwrap_or_default()
    );
    let server_log = std::fs::read_to_string(restored.join("log")).unwrap_or_default();
    assert!(server_log.contains("00000002.history"), "{server_log}");
}

#[test]
fn a_streamer_started_after_a_promotion_walks_the_history_it_missed() {
    let (primary, fx) = standby_fixture("phys_promote_down");
    let (slot, policy) = fx.wal_policy();
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    fx.backup(&policy);
    let before = write_on(primary, &fx.db, 4, Some(1));
    assert_archived(&fx, before, &log);
    stop(&mut child);
    // Written on the old timeline while nobody streams; then the standby is promoted and
    // written to: the slot holds both.
    let missed = write_on(primary, &fx.db, 4, Some(2));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while lsn(&fx.pg.psql("postgres", "select pg_last_wal_replay_lsn()")) < missed {
        assert!(
            std::time::Instant::now() < deadline,
            "the standby never replayed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(fx.pg.psql("postgres", "select pg_promote()"), "t");
    let after = write_on(fx.pg, &fx.db, 6, Some(3));
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    assert_archived(&fx, after, &log);
    stop(&mut child);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("Following the server onto a new timeline"),
        "the restarted streamer began on the old timeline: {logged}"
    );
    assert_both_timelines_whole(&fx, &policy);
}

#[test]
fn a_server_crash_while_streaming_loses_nothing() {
    // A cluster of its own: the crash restarts every backend of it.
    let pg: &'static Postgres = Box::leak(Box::new(start_cluster(Vec::new())));
    let fx = setup_on(pg, "phys_wal_crash");
    let (slot, policy) = fx.wal_policy();
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    fx.backup(&policy);
    write_some(&fx, 4, Some(1));
    // SIGKILL of the walsender: the postmaster takes it for a crash and restarts the server
    // (crash recovery), dropping every connection.
    let pid = fx.pg.psql(
        "postgres",
        &format!("select active_pid from pg_replication_slots where slot_name = '{slot}'"),
    );
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -9 of walsender {pid}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::process::Command::new(fx.pg.bin.join("pg_isready"))
        .args(["-q", "-h", "127.0.0.1", "-p", &fx.pg.port.to_string()])
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
        || fx.pg.psql("postgres", "select 1") != "1"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let last = write_some(&fx, 6, Some(2));
    assert_archived(&fx, last, &log);
    stop(&mut child);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("reconnecting"), "{logged}");
    let r = fx.check_read_data(&policy);
    assert_eq!(
        r.code, 0,
        "the chain is whole after the crash: {}",
        r.stderr
    );
}

#[test]
fn a_second_streamer_on_the_same_slot_stands_by_and_takes_over() {
    let fx = setup("phys_wal_standby");
    let (slot, policy) = fx.wal_policy();
    let (log_a, log_b) = (fx.dir.path().join("a.log"), fx.dir.path().join("b.log"));
    let mut a = start_streamer(&fx, &policy, &slot, &log_a);
    // Started while `a` holds the slot: the start helper sees the slot active at once.
    let mut b = start_streamer(&fx, &policy, &slot, &log_b);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&log_b)
        .unwrap_or_default()
        .contains("standing by")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the second streamer never said it stands by:\n{}",
            std::fs::read_to_string(&log_b).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    write_some(&fx, 3, Some(1));
    stop(&mut a);
    let last = write_some(&fx, 4, Some(2));
    assert_archived(&fx, last, &log_b);
    stop(&mut b);
    let logged = std::fs::read_to_string(&log_b).unwrap_or_default();
    assert!(logged.contains("Streaming WAL"), "b took over: {logged}");
    assert!(
        !logged.contains("ERROR"),
        "standing by is no error: {logged}"
    );
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
}

#[test]
fn wal_of_another_cluster_is_refused_and_nothing_is_archived() {
    let fx = setup("phys_wal_other");
    let slot = format!("lb_{}", suffix());
    let policy = fx.policy("postgres", "");
    fx.backup(&policy);
    // The same source name and repository, pointed at a different cluster.
    let other: &'static Postgres = Box::leak(Box::new(start_cluster(Vec::new())));
    let pw = other.password_file(fx.dir.path());
    let wrong = PolicyBuilder::new(&fx.key.recipient)
        .source(
            "cluster",
            "postgres-physical",
            &format!(
                "url = \"{}\"\npassword_file = \"{}\"\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}",
                other.url("postgres"),
                pw.display()
            ),
        )
        .write(fx.dir.path());
    let r = fx.run(&[
        "wal",
        "stream",
        "--policy",
        wrong.to_str().unwrap(),
        "--source",
        "cluster",
    ]);
    assert_eq!(
        r.code, 13,
        "another cluster's WAL is integrity damage: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("system identifier") && r.stderr.contains("new source name"),
        "{}",
        r.stderr
    );
    assert!(
        files_under(&fx.dir.path().join("repo/wal")).is_empty(),
        "nothing archived"
    );
    assert_eq!(
        other.psql("postgres", "select count(*) from pg_replication_slots"),
        "0",
        "no slot is left holding WAL on the wrong server"
    );
}

#[test]
fn an_invalidated_slot_is_a_gap_the_agent_reports_and_answers_with_a_base_backup() {
    // A cluster of its own whose slots may hold at most two segments.
    let pg: &'static Postgres = Box::leak(Box::new(start_cluster(vec![
        "max_slot_wal_keep_size=32MB".into(),
    ])));
    let fx = setup_on(pg, "phys_wal_lost");
    let slot = format!("lb_{}", suffix());
    let port = free_port();
    let (hook_port, hooks) = webhook();
    let pw = fx.pg.password_file(fx.dir.path());
    let base = PolicyBuilder::new(&fx.key.recipient)
        .source(
            "cluster",
            "postgres-physical",
            &format!(
                "url = \"{}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\nschedule = \"0 3 * * 0\"\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}",
                fx.pg.url(&fx.db),
                pw.display()
            ),
        )
        .text();
    let policy = fx.dir.path().join("agent.toml");
    std::fs::write(
        &policy,
        format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n\n[[notify]]\nurl = \"http://127.0.0.1:{hook_port}/hook\"\n\n{base}"),
    )
    .unwrap();
    let p = policy.to_str().unwrap();
    let log = fx.dir.path().join("agent.log");
    let start_agent = || {
        std::process::Command::new(lifeboat_bin())
            .args(["agent", "--policy", p])
            .current_dir(fx.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap()
    };
    // A base backup, and WAL archived after it.
    fx.backup(&policy);
    let mut agent = start_agent();
    let first = write_some(&fx, 3, Some(1));
    assert_archived(&fx, first, &log);
    let term = |agent: &mut std::process::Child| {
        std::process::Command::new("kill")
            .args(["-TERM", &agent.id().to_string()])
            .status()
            .unwrap();
        assert_eq!(agent.wait().unwrap().code(), Some(0));
    };
    term(&mut agent);
    // While the agent is down the server writes past what the slot may hold: it is invalidated.
    for _ in 0..4 {
        write_some(&fx, 2, Some(0));
        fx.pg.psql("postgres", "select pg_switch_wal()");
    }
    fx.pg.psql("postgres", "checkpoint");
    assert_eq!(
        fx.pg.psql(
            "postgres",
            &format!("select wal_status from pg_replication_slots where slot_name = '{slot}'")
        ),
        "lost"
    );
    let mut agent = start_agent();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let backups = loop {
        let r = fx.run(&["list", "--policy", p, "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap_or_default();
        if list.len() >= 2 {
            break list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no base backup after the gap:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let body = http_get(port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert_eq!(
        metric(&body, "lifeboat_wal_gaps_total", &[("source", "cluster")]),
        Some(1.0),
        "{body}"
    );
    let last = write_some(&fx, 3, Some(1));
    assert_archived(&fx, last, &log);
    term(&mut agent);
    let got = hooks.lock().unwrap().clone();
    assert!(
        got.iter()
            .any(|h| h["event"] == "gap" && h["message"].as_str().unwrap_or("").contains("lost")),
        "a gap webhook: {got:?}"
    );
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("invalidated"), "{logged}");
    // The gap is named by check; the new base backup restores to the archive's end.
    let r = fx.run(&["check", "--policy", p]);
    assert_eq!(r.code, 13, "the gap is reported: {}", r.stderr);
    assert!(r.stderr.contains("is not in the archive"), "{}", r.stderr);
    let newest = backups[0]["base_backup"]["start_lsn"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        lsn(&newest) > first,
        "the new base backup starts after the gap"
    );
}

#[test]
fn wal_streams_over_tls_and_the_servers_certificate_is_verified() {
    let fx = setup("phys_wal_tls");
    let slot = format!("lb_{}", suffix());
    let policy = fx.policy(
        "tlsuser",
        &format!(
            "tls_ca_file = \"{}\"\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}",
            fx.pg.ca_file.display()
        ),
    );
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    assert_eq!(
        fx.pg.psql(
            "postgres",
            &format!("select ssl from pg_stat_ssl join pg_replication_slots on pid = active_pid where slot_name = '{slot}'"),
        ),
        "t",
        "the walsender's connection is TLS"
    );
    let last = write_some(&fx, 4, Some(1));
    assert_archived(&fx, last, &log);
    stop(&mut child);
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
    // Without the CA that signed the server's certificate, nothing is streamed.
    let pw = fx.pg.password_file(fx.dir.path());
    let unverified = PolicyBuilder::new(&fx.key.recipient)
        .source(
            "cluster",
            "postgres-physical",
            &format!(
                "url = \"postgres://tlsuser@127.0.0.1:{}/{}?sslmode=require\"\npassword_file = \"{}\"\nwal = {{ slot = \"{slot}\" }}",
                fx.pg.port,
                fx.db,
                pw.display()
            ),
        )
        .write(fx.dir.path());
    let r = fx.run(&[
        "wal",
        "stream",
        "--policy",
        unverified.to_str().unwrap(),
        "--source",
        "cluster",
    ]);
    assert_eq!(
        r.code, 12,
        "an unverified certificate is refused: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("TLS handshake") && r.stderr.contains("tls_ca_file"),
        "{}",
        r.stderr
    );
}

/// For point-in-time tests: table `stamped` (each row with its commit's clock), a policy
/// streaming WAL into a repository at an absolute path, and its streamer running: the fixture,
/// slot, policy, repository, the streamer's log and the streamer.
fn stamped_fixture(prefix: &str) -> (Fx, String, PathBuf, PathBuf, PathBuf, std::process::Child) {
    let fx = setup(prefix);
    fx.pg.psql(
        &fx.db,
        "create table stamped (id serial primary key, batch int not null, at timestamptz not null default clock_timestamp())",
    );
    let (slot, policy, repo) = fx.recovery_policy();
    let log = fx.dir.path().join("stream.log");
    let child = start_streamer(&fx, &policy, &slot, &log);
    (fx, slot, policy, repo, log, child)
}

#[test]
fn recovery_through_wal_fetch_reaches_exactly_the_target_time() {
    let (fx, slot, policy, repo, log, mut child) = stamped_fixture("phys_pitr");
    fx.backup(&policy);
    let batch = |n: u32| {
        fx.pg.psql(
            &fx.db,
            &format!("insert into stamped (batch) select {n} from generate_series(1, 100)"),
        );
    };
    batch(1);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let target = fx.pg.psql("postgres", "select clock_timestamp()::text");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    batch(2);
    let last = lsn(&fx.pg.psql("postgres", "select pg_current_wal_lsn()"));
    assert_archived(&fx, last, &log);
    stop(&mut child);
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );

    let identity = fx.key.identity.to_str().unwrap();
    let wal_get = runbook_wal_get(fx.dir.path());
    let commands = [
        (
            "wal-fetch",
            format!(
                "{} wal fetch --policy {} --source cluster --identity {identity} %f %p",
                lifeboat_bin().display(),
                policy.display()
            ),
        ),
        (
            "stock-tools",
            format!(
                "LIFEBOAT_REPO={} LIFEBOAT_SOURCE=cluster LIFEBOAT_IDENTITY_FILE={identity} {} %f %p",
                repo.display(),
                wal_get.display()
            ),
        ),
    ];
    for (name, restore_command) in commands {
        let restored = fx.dir.path().join(format!("restored-{name}"));
        let data = restored.join("data");
        let r = restore_to(&fx, &policy, &data, &[]);
        assert_eq!(r.code, 0, "restore: {}", r.stderr);
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.auto.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "restore_command = '{restore_command}'\nrecovery_target_time = '{target}'\nrecovery_target_action = 'promote'",
        )
        .unwrap();
        std::fs::write(data.join("recovery.signal"), "").unwrap();
        let copy = fx.recover(&restored, &policy, &repo);
        let server_log = std::fs::read_to_string(restored.join("log")).unwrap_or_default();
        assert_eq!(
            copy.psql(
                &fx.db,
                "select batch, count(*) from stamped group by batch order by batch"
            ),
            "1|100",
            "{name}: exactly what was committed by {target}:\n{server_log}"
        );
        assert!(
            server_log.contains("restored log file"),
            "{name}: {server_log}"
        );
    }
    // A damaged object is never handed to recovery; a file the archive lacks is "not found".
    let fetch =
        |file: &str, dest: &Path, extra: &[&str]| wal_fetch(&fx, &policy, file, dest, extra);
    let whole = whole_segments(&repo)[0].clone();
    let name = whole.file_name().unwrap().to_string_lossy()[..24].to_string();
    let dest = fx.dir.path().join("fetched");
    let r = fetch(&name, &dest, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);
    std::fs::remove_file(&dest).unwrap();
    // The segment size as `lifeboat restore` passes it; a size no cluster has is refused (126,
    // which stops recovery) before anything is written.
    let r = fetch(&name, &dest, &["--segment-size", "16777216"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::remove_file(&dest).unwrap();
    let r = fetch(&name, &dest, &["--segment-size", "1000"]);
    assert_eq!(r.code, 126, "{}", r.stderr);
    assert!(r.stderr.contains("--segment-size 1000"), "{}", r.stderr);
    assert!(!dest.exists());
    let mut bytes = std::fs::read(&whole).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&whole, bytes).unwrap();
    let r = fetch(&name, &dest, &[]);
    // Not 1, which recovery would read as the archive's end, opening a cluster short of its
    // target: above 125 PostgreSQL stops recovery.
    assert_eq!(r.code, 126, "a flipped byte: {}", r.stderr);
    assert!(r.stderr.contains(&name), "names the object: {}", r.stderr);
    assert!(!dest.exists(), "nothing written for recovery to read");
    let r = fetch("0000000100000009000000FF", &dest, &[]);
    assert_eq!(r.code, 1, "not in the archive: {}", r.stderr);
    assert!(
        r.stderr.contains("not in cluster's WAL archive"),
        "{}",
        r.stderr
    );
    assert!(!dest.exists());
}

#[test]
fn object_lock_keeps_whole_wal_segments_and_leaves_partials_deletable() {
    let fx = setup("phys_wal_lock");
    let s3 = s3();
    let bucket = rt().block_on(s3.create_locked_bucket());
    let env = s3.env();
    let slot = format!("lb_{}", suffix());
    let pw = fx.pg.password_file(fx.dir.path());
    let policy = PolicyBuilder::new(&fx.key.recipient)
        .repository(&format!(
            "url = \"s3://{bucket}/repo\"\nendpoint = \"{}\"\nobject_lock = {{ mode = \"governance\", days = 1 }}",
            s3.endpoint
        ))
        .source(
            "cluster",
            "postgres-physical",
            &format!(
                "url = \"{}\"\npassword_file = \"{}\"\nwal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}",
                fx.pg.url(&fx.db),
                pw.display()
            ),
        )
        .write(fx.dir.path());
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer_with(&fx, &policy, &slot, &log, &env);
    let last = write_some(&fx, 6, Some(2));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let keys = loop {
        let keys = rt().block_on(s3.keys(&bucket, "repo/wal/cluster/"));
        if archived_end_of_names(&keys) >= last {
            if keys.iter().any(|k| k.contains(".partial.")) {
                break keys;
            }
            // The server is shared: another test's WAL switch can complete the segment and leave
            // the next one empty, so there is no growing segment until something is written.
            write_some(&fx, 1, None);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never archived: {keys:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    stop(&mut child);
    let lock_of = |key: &str| {
        rt().block_on(async {
            s3.client()
                .await
                .head_object()
                .bucket(&bucket)
                .key(key)
                .send()
                .await
                .unwrap()
                .object_lock_mode()
                .map(|m| m.as_str().to_string())
        })
    };
    let whole = keys
        .iter()
        .find(|k| !k.contains(".partial."))
        .expect("a whole segment");
    assert_eq!(lock_of(whole).as_deref(), Some("GOVERNANCE"), "{whole}");
    let partial = keys
        .iter()
        .find(|k| k.contains(".partial."))
        .expect("the growing segment");
    assert_eq!(lock_of(partial), None, "{partial}");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !logged.contains("Could not delete a superseded partial"),
        "superseded partials are deleted: {logged}"
    );
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
}

#[test]
fn a_slot_made_by_hand_without_reserved_wal_is_made_to_reserve_it() {
    let fx = setup("phys_wal_unreserved");
    let (slot, policy) = fx.wal_policy();
    // An operator's `pg_create_physical_replication_slot(name)`: no WAL reserved, not lost.
    fx.pg.psql(
        "postgres",
        &format!("select pg_create_physical_replication_slot('{slot}')"),
    );
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    let last = write_some(&fx, 3, Some(1));
    assert_archived(&fx, last, &log);
    stop(&mut child);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("reserves no WAL yet"), "{logged}");
    assert!(
        !logged.contains("invalidated"),
        "not taken for a lost slot: {logged}"
    );
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
}

/// RUNBOOK.md's stock-tools restore_command, exactly as written there, installed in `dir`.
fn runbook_wal_get(dir: &Path) -> PathBuf {
    let runbook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../RUNBOOK.md"))
            .unwrap();
    let script = runbook
        .split_once("cat > lifeboat-wal-get <<'EOF'\n")
        .and_then(|(_, rest)| rest.split_once("\nEOF\n"))
        .map(|(script, _)| format!("{script}\n"))
        .expect("RUNBOOK.md holds the lifeboat-wal-get script");
    let wal_get = dir.join("lifeboat-wal-get");
    std::fs::write(&wal_get, script).unwrap();
    assert!(std::process::Command::new("chmod")
        .arg("a+rx")
        .arg(&wal_get)
        .status()
        .unwrap()
        .success());
    wal_get
}

/// `lifeboat wal fetch FILE DEST` of the source `cluster`, with `extra` options, as the
/// fixture's key holder.
fn wal_fetch(fx: &Fx, policy: &Path, file: &str, dest: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "wal",
        "fetch",
        "--policy",
        policy.to_str().unwrap(),
        "--source",
        "cluster",
        "--identity",
        fx.key.identity.to_str().unwrap(),
    ];
    args.extend(extra);
    args.extend([file, dest.to_str().unwrap()]);
    fx.run(&args)
}

/// `lifeboat restore --to DIR` with `args` (a target), as the fixture's key holder.
fn restore_to(fx: &Fx, policy: &Path, dir: &Path, args: &[&str]) -> Run {
    let mut all = vec![
        "restore",
        "--policy",
        policy.to_str().unwrap(),
        "--source",
        "cluster",
        "--to",
        dir.to_str().unwrap(),
        "--identity",
        fx.key.identity.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    fx.run(&all)
}

#[test]
fn point_in_time_restore_picks_the_base_backup_and_stops_exactly_at_each_target() {
    let (fx, slot, policy, repo, log, mut child) = stamped_fixture("phys_pitr_targets");
    let now = || fx.pg.psql("postgres", "select clock_timestamp()::text");
    let pause = || std::thread::sleep(std::time::Duration::from_millis(1200));
    let batch = |n: u32| {
        fx.pg.psql(
            &fx.db,
            &format!("insert into stamped (batch) select {n} from generate_series(1, 100)"),
        );
    };
    let before_any = now();
    pause();
    let first = fx.backup(&policy);
    batch(1);
    // Made after the base backup: they come back only through WAL.
    let role = format!("pitr_{}", suffix());
    let other_db = format!("{}_other", fx.db);
    fx.pg.psql("postgres", &format!("create role {role} login"));
    fx.pg
        .psql("postgres", &format!("create database {other_db}"));
    fx.pg.psql(
        &fx.db,
        "select lo_from_bytea(0, 'written after the backup')",
    );
    pause();
    let t1 = now();
    pause();
    batch(2);
    let second = fx.backup(&policy);
    batch(3);
    let after_3 = fx.pg.psql("postgres", "select pg_current_wal_lsn()::text");
    pause();
    let t2 = now();
    pause();
    batch(4);
    let last = lsn(&fx.pg.psql("postgres", "select pg_current_wal_lsn()"));
    assert_archived(&fx, last, &log);
    stop(&mut child);
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );

    // The plan first: the base backup chosen, the replay and the window; nothing written.
    let planned = fx.dir.path().join("planned");
    let r = restore_to(&fx, &policy, &planned, &["--time", &t1, "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains(&first), "{}", r.stderr);
    assert!(r.stderr.contains("recovery_target_time"), "{}", r.stderr);
    assert!(r.stderr.contains("window"), "{}", r.stderr);
    assert!(
        r.stderr.contains("never restored and replayed"),
        "{}",
        r.stderr
    );
    assert!(!planned.exists());

    let rows = |copy: &Postgres| {
        copy.psql(
            &fx.db,
            "select string_agg(batch || ':' || n, ' ' order by batch) from (select batch, count(*) n from stamped group by batch) b",
        )
    };
    let cases: [(&str, Vec<&str>, &str, &str); 4] = [
        ("t1", vec!["--time", &t1], &first, "1:100"),
        ("t2", vec!["--time", &t2], &second, "1:100 2:100 3:100"),
        ("lsn", vec!["--lsn", &after_3], &second, "1:100 2:100 3:100"),
        (
            "latest",
            vec!["--latest"],
            &second,
            "1:100 2:100 3:100 4:100",
        ),
    ];
    let mut prefetched = 0;
    for (name, args, base, expected) in cases {
        let restored = fx.dir.path().join(format!("restored-{name}"));
        let mut args = args.clone();
        args.push("--json");
        let r = restore_to(&fx, &policy, &restored.join("data"), &args);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(doc["backup"]["id"], *base, "{name}: {doc:#}");
        assert!(restored.join("data/recovery.signal").exists(), "{name}");
        let copy = fx.recover(&restored, &policy, &repo);
        let server_log = std::fs::read_to_string(restored.join("log")).unwrap_or_default();
        assert_eq!(
            rows(&copy),
            expected,
            "{name}: exactly what was committed by the target:\n{server_log}"
        );
        prefetched += server_log.matches("(prefetched, checked)").count();
    }
    // While the server replayed a segment, the next whole ones were fetched (and checked).
    assert!(prefetched > 0, "no segment came from the prefetch");

    // --start: lifeboat starts the server and returns once recovery reached the target.
    let started = fx.dir.path().join("restored-start").join("data");
    let port = free_port();
    let port_text = port.to_string();
    let r = restore_to(
        &fx,
        &policy,
        &started,
        &["--time", &t1, "--start", "--port", &port_text],
    );
    assert_eq!(r.code, 0, "--start: {}", r.stderr);
    assert!(
        r.stderr.contains("recovery stopping before commit"),
        "{}",
        r.stderr
    );
    assert!(
        !started.join("lifeboat-prefetch").exists(),
        "what was fetched ahead is gone once the server is promoted"
    );
    // Not a terminal: each phase is a plain line, the replay's among them.
    assert!(
        r.stderr.contains("… replaying WAL from the archive ("),
        "{}",
        r.stderr
    );
    let out = fx.pg.psql_on(
        port,
        &fx.db,
        "select pg_is_in_recovery()::text || ' ' || (select count(*) from stamped)",
    );
    let seen = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The whole cluster: a role, a database and a large object made after the base backup.
    let query = |db: &str, sql: &str| {
        let out = fx.pg.psql_on(port, db, sql);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let made_after = (
        query("postgres", &format!("select count(*) from pg_roles where rolname = '{role}'")),
        query(&other_db, "select current_database()"),
        query(&fx.db, "select string_agg(convert_from(lo_get(oid), 'UTF8'), ',' order by oid) from pg_largeobject_metadata"),
    );
    fx.pg.pg_ctl_stop(&started);
    assert_eq!(
        made_after,
        (
            "1".to_string(),
            other_db.clone(),
            "large object,written after the backup".to_string()
        )
    );
    assert_eq!(
        seen,
        "false 100",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Targets outside the window are refused before anything is written, naming the window.
    for (args, why) in [
        (vec!["--time", before_any.as_str()], "before"),
        (vec!["--lsn", "FF/0"], "not archived"),
    ] {
        let dir = fx.dir.path().join("refused");
        let r = restore_to(&fx, &policy, &dir, &args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("recoverable window"), "{}", r.stderr);
        assert!(!dir.exists(), "nothing written");
    }

    // A damaged object on the way stops recovery: the cluster never opens short of its target.
    let mut objects: Vec<PathBuf> = files_under(&repo.join("wal/cluster"))
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains(".history"))
        .collect();
    objects.sort_by_key(|p| p.file_name().unwrap().to_os_string());
    let segment = objects
        .last()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()[..24]
        .to_string();
    for object in objects
        .iter()
        .filter(|p| p.to_string_lossy().contains(&segment))
    {
        let mut bytes = std::fs::read(object).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(object, bytes).unwrap();
    }
    let restored = fx.dir.path().join("restored-damaged");
    let r = restore_to(&fx, &policy, &restored.join("data"), &["--latest"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A hot standby accepts read-only queries from consistency on: wait for the end of recovery.
    let log_file = restored.join("log");
    let copy = fx.pg.try_start_restored(&restored).ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let log = loop {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        if log.contains("database system is shut down") {
            break log;
        }
        if let Some(copy) = &copy {
            let open = copy.psql_raw("postgres", "select pg_is_in_recovery()");
            assert!(
                String::from_utf8_lossy(&open.stdout).trim() != "f",
                "opened without the damaged segment {segment}: {}\n{log}",
                rows(copy)
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "recovery neither stopped nor ended:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(log.contains(&segment), "the log names the segment: {log}");
    assert!(log.contains("could not restore file"), "{log}");
}

/// A stored object's plaintext, read with the stock tools (age, zstd).
/// The name and plaintext of a partial segment the streamer stored. The cluster is shared with
/// tests that switch WAL, which stores the growing segment whole and drops its partials, and a
/// partial is superseded every flush: so this writes a little, waits for a partial, and reads a
/// copy taken before its next flush can delete it.
fn a_stored_partial(fx: &Fx, repo: &Path) -> (String, Vec<u8>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let found = files_under(&repo.join("wal/cluster"))
            .into_iter()
            .filter(|f| {
                let n = f.file_name().unwrap().to_string_lossy().to_string();
                n.contains(".partial.") && !n.starts_with('.')
            })
            .max();
        if let Some(partial) = found {
            let copy = fx.dir.path().join("partial.copy");
            if std::fs::copy(&partial, &copy).is_ok() {
                let name = partial.file_name().unwrap().to_string_lossy().to_string();
                return (name, plaintext_of(fx, &copy));
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no partial segment was stored in 30 s"
        );
        fx.pg.psql(&fx.db, "insert into t (v) values ('after')");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

fn plaintext_of(fx: &Fx, object: &Path) -> Vec<u8> {
    stock_plaintext(&fx.key.identity, object)
}

/// Replaces the whole segment object `object` with one of "another cluster": its plaintext with
/// the header's system identifier changed, sealed again (zstd, age) under a name with the new
/// hash, as a writer with the recipient could. The forged object's path and the segment's name.
fn reseal_as_other_cluster(fx: &Fx, object: &Path) -> (PathBuf, String) {
    use sha2::Digest;
    let name = object.file_name().unwrap().to_string_lossy()[..24].to_string();
    let mut plain = plaintext_of(fx, object);
    let id = u64::from_le_bytes(plain[24..32].try_into().unwrap());
    plain[24..32].copy_from_slice(&(id ^ 0x5a5a).to_le_bytes());
    let sha = hex::encode(sha2::Sha256::digest(&plain));
    let forged = object.with_file_name(format!("{name}.{sha}.zst.age"));
    let plain_file = fx.dir.path().join("other-cluster.plain");
    std::fs::write(&plain_file, &plain).unwrap();
    let sealed = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -qc '{}' | age -r '{}' > '{}'",
            plain_file.display(),
            fx.key.recipient,
            forged.display()
        ))
        .status()
        .unwrap();
    assert!(sealed.success());
    std::fs::remove_file(object).unwrap();
    (forged, name)
}

#[test]
fn the_verifier_replays_the_archived_wal_past_the_backup_and_names_a_damaged_or_missing_segment() {
    let fx = setup("phys_drill");
    let slot = format!("lb_{}", suffix());
    // 5000 rows at the backup; 3 × 2000 written after it reach the restore only through WAL.
    let policy = fx.policy(
        "postgres",
        &format!(
            "wal = {{ slot = \"{slot}\", flush_interval = \"1s\" }}\nobjectives = {{ rto = \"1h\" }}\n[sources.verify]\ntimeout = \"5m\"\nchecks = [{{ sql = \"select count(*) from t\", equals = 11000 }}]"
        ),
    );
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    fx.backup(&policy);
    write_some(&fx, 3, Some(0));
    // More segments than the verifier fetches ahead of replay (8): the feeder must wait for
    // recovery to take them, and go on.
    fx.pg.psql(&fx.db, "create table filler (x int)");
    for _ in 0..12 {
        fx.pg.psql(&fx.db, "insert into filler values (1)");
        fx.pg.psql("postgres", "select pg_switch_wal()");
    }
    fx.pg.psql(&fx.db, "insert into filler values (2)");
    let last = lsn(&fx.pg.psql("postgres", "select pg_current_wal_lsn()"));
    assert_archived(&fx, last, &log);
    stop(&mut child);
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
    let verify = || {
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
    let r = verify();
    assert_eq!(r.code, 0, "verify: {}{}", r.stdout, r.stderr);
    let reports: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let checks = reports[0]["checks"].as_array().unwrap();
    let replay = checks
        .iter()
        .find(|c| c["name"] == "WAL replay")
        .unwrap_or_else(|| panic!("no replay check: {checks:#?}"));
    assert_eq!(replay["expected"], replay["found"], "{replay:#}");
    assert!(
        reports[0]["notes"]
            .to_string()
            .contains("archived WAL segment"),
        "{:#}",
        reports[0]
    );
    // Two replays: to a record chosen at random inside the window, stopping exactly there, then
    // on to the archive's end; the report holds both, and the rate.
    let drill = &reports[0]["replay"];
    let targets = drill["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2, "{drill:#}");
    let (point, end) = (&targets[0], &targets[1]);
    assert_eq!(point["kind"], "random point in the window", "{drill:#}");
    assert_eq!(point["reached"], point["target"], "{drill:#}");
    let at = |v: &serde_json::Value| lsn(v.as_str().unwrap());
    assert!(
        at(&drill["from"]) < at(&point["target"])
            && at(&point["target"]) < at(&drill["archive_end"]),
        "{drill:#}"
    );
    assert_eq!(end["kind"], "archive end", "{drill:#}");
    // Redo ends in the archive's last segment (16 MiB, the test cluster's).
    let segment = 16 << 20;
    assert!(
        at(&end["reached"]) / segment >= (at(&drill["archive_end"]) - 1) / segment,
        "{drill:#}"
    );
    assert!(drill["segments"].as_u64().unwrap() >= 12, "{drill:#}");
    assert!(
        drill["bytes_per_second"].as_f64().unwrap() > 0.0,
        "{drill:#}"
    );
    let point_check = checks
        .iter()
        .find(|c| c["name"] == "WAL replay to a random point")
        .unwrap_or_else(|| panic!("no random-point check: {checks:#?}"));
    assert_eq!(point_check["passed"], true, "{point_check:#}");
    // The measured RTO against the source's objective.
    assert_eq!(reports[0]["rto_objective_seconds"], 3600.0);
    assert_eq!(reports[0]["rto_met"], true);
    // A point-in-time restore's plan names the newest drill (the server's restore_command needs
    // the repository as an absolute path).
    let absolute = fx.dir.path().join("absolute.toml");
    let text = std::fs::read_to_string(&policy).unwrap().replace(
        "file://./repo",
        &format!("file://{}/repo", fx.dir.path().display()),
    );
    std::fs::write(&absolute, text).unwrap();
    let planned = fx.dir.path().join("planned");
    let r = restore_to(&fx, &absolute, &planned, &["--latest", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = reports[0]["verify_id"].as_str().unwrap();
    assert!(
        r.stderr
            .contains(&format!("newest passed: verification {id}")),
        "{}",
        r.stderr
    );

    // The newest object damaged: exit 13 naming it.
    let mut objects = whole_segments(&fx.dir.path().join("repo"));
    objects.extend(
        files_under(&fx.dir.path().join("repo/wal/cluster"))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".partial.")),
    );
    objects.sort_by_key(|p| p.file_name().unwrap().to_os_string());
    let newest = objects.last().unwrap().clone();
    let kept = std::fs::read(&newest).unwrap();
    let mut bytes = kept.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&newest, bytes).unwrap();
    let r = verify();
    let name = newest.file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(r.code, 13, "damaged: {}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&name[..24]) || r.stdout.contains(&name[..24]),
        "names {name}: {}{}",
        r.stdout,
        r.stderr
    );
    std::fs::write(&newest, kept).unwrap();

    // A segment of another cluster under a right name and hash (its header's system identifier
    // changed, the object re-sealed): exit 13 naming it, and `wal fetch` stops recovery (126).
    let mut wholes = whole_segments(&fx.dir.path().join("repo"));
    wholes.sort_by_key(|p| p.file_name().unwrap().to_os_string());
    let planted = wholes[wholes.len() - 3].clone();
    let original = std::fs::read(&planted).unwrap();
    let (forged, name) = reseal_as_other_cluster(&fx, &planted);
    let r = verify();
    assert_eq!(r.code, 13, "another cluster's: {}{}", r.stdout, r.stderr);
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(
        out.contains("WAL of another cluster") && out.contains(&name),
        "{out}"
    );
    let system_id = fx.pg.psql(
        "postgres",
        "select system_identifier from pg_control_system()",
    );
    let other = fx.dir.path().join("fetched-other");
    let at = ["--segment-size", "16777216", "--system-id", &system_id];
    let r = wal_fetch(&fx, &policy, &name, &other, &at);
    assert_eq!(r.code, 126, "{}", r.stderr);
    assert!(r.stderr.contains("WAL of another cluster"), "{}", r.stderr);
    std::fs::remove_file(&forged).unwrap();
    std::fs::write(&planted, original).unwrap();

    // A segment between the backup and the end deleted: a gap, exit 13 naming its LSN range.
    let before_newest = objects[objects.len() - 2].clone();
    std::fs::remove_file(&before_newest).unwrap();
    let r = verify();
    assert_eq!(r.code, 13, "gap: {}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("is not in the archive") || r.stdout.contains("is not in the archive"),
        "{}{}",
        r.stdout,
        r.stderr
    );
}

#[test]
fn streamed_wal_is_signed_and_a_planted_segment_is_never_replayed() {
    let fx = setup("phys_signed");
    let signing = signing_keygen(fx.dir.path(), "signing.key");
    let slot = format!("lb_{}", suffix());
    let policy = PolicyBuilder::new(&fx.key.recipient)
        .signing(&signing.signs(&[&signing.public]))
        .copy("dr", "url = \"file://./copy\"")
        .source("cluster", "postgres-physical", &fx.wal_fields(&slot, ""))
        .write(fx.dir.path());
    let log = fx.dir.path().join("stream.log");
    let mut child = start_streamer(&fx, &policy, &slot, &log);
    fx.backup(&policy);
    write_some(&fx, 2, Some(0));
    let last = write_some(&fx, 2, Some(0));
    assert_archived(&fx, last, &log);
    stop(&mut child);
    fx.pg.psql(
        "postgres",
        &format!("select pg_drop_replication_slot('{slot}')"),
    );
    let repo = fx.dir.path().join("repo");
    // The streamer was killed (SIGKILL): an upload it had in flight is left as the store's
    // hidden temp file, which no reader lists; every published segment must be signed.
    let wal: Vec<PathBuf> = files_under(&repo.join("wal/cluster"))
        .into_iter()
        .filter(|f| !f.to_string_lossy().ends_with(".minisig"))
        .filter(|f| {
            !f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    assert!(!wal.is_empty());
    for f in &wal {
        let sig = PathBuf::from(format!("{}.minisig", f.display()));
        assert!(sig.exists(), "{} has no signature", f.display());
    }
    let r = fx.check_read_data(&policy);
    assert_eq!(r.code, 0, "a signed archive checks clean: {}", r.stderr);

    let segment = whole_segments(&repo).pop().expect("a whole segment");
    let file = segment.file_name().unwrap().to_string_lossy().to_string();
    let name = file[..24].to_string();

    // A copy takes each WAL object with its signature, and recovery fetches from it alone.
    let r = fx.run(&["copy", "--policy", policy.to_str().unwrap()]);
    assert_eq!(r.code, 0, "copy: {}", r.stderr);
    let at_copy = fx
        .dir
        .path()
        .join("copy")
        .join(segment.strip_prefix(&repo).unwrap());
    assert!(at_copy.exists(), "{} not copied", at_copy.display());
    assert!(PathBuf::from(format!("{}.minisig", at_copy.display())).exists());
    let r = wal_fetch(
        &fx,
        &policy,
        &name,
        &fx.dir.path().join("from-copy"),
        &["--repository", "dr"],
    );
    assert_eq!(r.code, 0, "wal fetch from the copy: {}", r.stderr);
    let fetch = |dest: &str| wal_fetch(&fx, &policy, &name, &fx.dir.path().join(dest), &[]);
    // RUNBOOK.md's stock-tools script, with the public key: minisign checks the same signature.
    let wal_get = runbook_wal_get(fx.dir.path());
    let stock = |dest: &str| {
        std::process::Command::new(&wal_get)
            .args([name.as_str(), dest])
            .current_dir(fx.dir.path())
            .env("LIFEBOAT_REPO", &repo)
            .env("LIFEBOAT_SOURCE", "cluster")
            .env("LIFEBOAT_IDENTITY_FILE", &fx.key.identity)
            .env("LIFEBOAT_SIGNING_PUBLIC_KEY", &signing.public)
            .output()
            .unwrap()
    };
    let out = stock("stock-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(fx.dir.path().join("stock-1"))
            .unwrap()
            .len(),
        16 << 20
    );
    // A bucket writer plants another "whole" object of that segment, sorting first.
    let planted = segment.with_file_name(format!("{name}.{}.zst.age", "0".repeat(64)));
    std::fs::copy(&segment, &planted).unwrap();
    let r = fetch("fetched-1");
    assert_eq!(
        r.code, 0,
        "the signed object is fetched, the planted one passed over: {}",
        r.stderr
    );
    assert_eq!(
        std::fs::metadata(fx.dir.path().join("fetched-1"))
            .unwrap()
            .len(),
        16 << 20
    );
    let r = fx.check_read_data(&policy);
    assert_eq!(r.code, 13, "check names the planted object: {}", r.stderr);
    let planted_key = format!(
        "wal/cluster/00000001/{}",
        planted.file_name().unwrap().to_string_lossy()
    );
    let problems: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("  wal/"))
        .collect();
    assert_eq!(problems.len(), 1, "the planted object only: {}", r.stderr);
    assert!(
        problems[0].starts_with(&format!("  {planted_key}: "))
            && problems[0].contains("is not signed"),
        "{}",
        r.stderr
    );

    // Only an unsigned object left for the segment: recovery stops (126), never ends early.
    std::fs::remove_file(&planted).unwrap();
    let sig = PathBuf::from(format!("{}.minisig", segment.display()));
    let kept = std::fs::read(&sig).unwrap();
    std::fs::remove_file(&sig).unwrap();
    let r = fetch("fetched-2");
    assert_eq!(r.code, 126, "{}", r.stderr);
    assert!(r.stderr.contains("is not signed"), "{}", r.stderr);
    let out = stock("stock-2");
    assert_eq!(out.status.code(), Some(126));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no trusted signature"));
    assert!(!fx.dir.path().join("stock-2").exists());
    assert!(!fx.dir.path().join("fetched-2").exists());
    let r = fx.check_read_data(&policy);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        r.stderr.contains(&file),
        "check names the segment: {}",
        r.stderr
    );

    // Another segment's signature: made for another object, refused.
    let moved = whole_segments(&repo)
        .into_iter()
        .find(|f| *f != segment)
        .map(|f| PathBuf::from(format!("{}.minisig", f.display())))
        .expect("two whole segments");
    std::fs::copy(&moved, &sig).unwrap();
    let r = fetch("fetched-3");
    assert_eq!(r.code, 126, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not match its bytes"),
        "{}",
        r.stderr
    );
    std::fs::write(&sig, kept).unwrap();
    let r = fetch("fetched-4");
    assert_eq!(r.code, 0, "{}", r.stderr);
}
