//! The verifier against real servers: a rich schema verifies; every kind of damage is caught with
//! its exit code; the scratch cluster is always gone afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;

use lifeboat_tests::*;

struct Fx {
    pg: &'static Postgres,
    db: String,
    dir: tempfile::TempDir,
    key: Key,
    pwfile: PathBuf,
    /// TMPDIR of the verifier: its scratch clusters and spool files live here.
    tmp: PathBuf,
}

fn setup(prefix: &str) -> Fx {
    let pg = postgres();
    let db = pg.create_db(prefix);
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = pg.password_file(dir.path());
    // Short: the scratch cluster's unix socket lives below it.
    let tmp = PathBuf::from(format!("/tmp/lbvt-{}", suffix()));
    std::fs::create_dir(&tmp).unwrap();
    Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
        tmp,
    }
}

impl Fx {
    fn policy(&self, verify: &str) -> PathBuf {
        let src = format!(
            "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n[sources.verify]\n{verify}\n",
            self.pg.url(&self.db),
            self.pwfile.display()
        );
        write_policy(
            self.dir.path(),
            "url = \"file://./repo\"",
            &self.key.recipient,
            &src,
        )
    }

    fn backup(&self, policy: &Path) -> String {
        let env = [("SCRATCH_PW".to_string(), self.pg.password.clone())];
        let r = lifeboat(
            self.dir.path(),
            &["backup", "--policy", policy.to_str().unwrap()],
            &env,
        );
        assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
        let r = lifeboat(
            self.dir.path(),
            &["list", "--policy", policy.to_str().unwrap(), "--json"],
            &env,
        );
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        list[0]["id"].as_str().unwrap().to_string()
    }

    /// `lifeboat restore` of the newest backup into the database `target` (created by it).
    fn restore_into(&self, policy: &Path, target: &str) {
        let key = self.key.identity.to_str().unwrap();
        let to = self.pg.url(target);
        let p = policy.to_str().unwrap();
        let args = [
            "restore",
            "--policy",
            p,
            "--source",
            "app-db",
            "--to",
            &to,
            "--identity",
            key,
        ];
        let env = [("PGPASSWORD".into(), self.pg.password.clone())];
        let r = lifeboat(self.dir.path(), &args, &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }

    fn verify(&self, policy: &Path, extra: &[&str]) -> Run {
        self.verify_with(policy, extra, &[])
    }

    /// [`Fx::verify`] with more environment.
    fn verify_with(&self, policy: &Path, extra: &[&str], env: &[(String, String)]) -> Run {
        let mut args = vec!["verify", "--policy", policy.to_str().unwrap(), "--identity"];
        let id = self.key.identity.to_str().unwrap().to_string();
        args.push(&id);
        args.extend_from_slice(extra);
        let mut all = vec![
            ("TMPDIR".to_string(), self.tmp.display().to_string()),
            ("SCRATCH_PW".to_string(), self.pg.password.clone()),
        ];
        all.extend_from_slice(env);
        let r = verifier(self.dir.path(), &args, &all);
        self.assert_scratch_gone();
        r
    }

    fn assert_scratch_gone(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        // The guard removes the cluster asynchronously after the verifier exits; allow it a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut left = left;
        while !left.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
            left = std::fs::read_dir(&self.tmp)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
        }
        assert!(left.is_empty(), "scratch left behind: {left:?}");
        let ps = Command::new("pgrep")
            .args(["-f", self.tmp.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            ps.stdout.is_empty(),
            "a scratch server still runs: {}",
            String::from_utf8_lossy(&ps.stdout)
        );
    }

    fn object(&self, id: &str, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("repo/backups/app-db")
            .join(id)
            .join(name)
    }

    fn reports(&self, id: &str) -> Vec<serde_json::Value> {
        let dir = self.dir.path().join("repo/verifications/app-db").join(id);
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        out.sort();
        out.iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn load_schema(pg: &Postgres, db: &str) {
    let sql =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/schema.sql"))
            .unwrap();
    pg.psql(db, &sql);
}

#[test]
fn a_rich_schema_verifies_and_the_report_is_listed() {
    let fx = setup("vrich");
    load_schema(fx.pg, &fx.db);
    let policy = fx.policy(
        "checks = [{ sql = \"select count(*) from accounts\", min = 1 }, { sql = \"select count(*) from measurements\", equals = 12000 }]",
    );
    let id = fx.backup(&policy);
    let r = fx.verify(&policy, &["--json"]);
    assert_eq!(r.code, 0, "verify failed: {}", r.stderr);
    assert!(
        r.stderr.contains(&format!("app-db {id}: verified")),
        "{}",
        r.stderr
    );
    let reports: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let report = &reports[0];
    assert_eq!(report["result"], "pass", "{report:#}");
    let checks = report["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in [
        "globals replayed",
        "table public.accounts",
        "table public.measurements_2025",
        "table Ünïcødé.Tâble ✓",
        "table public.no_columns",
        "sequence public.standalone_seq",
        "large objects",
        "schema objects: policies",
        "schema objects: triggers",
        "sql: select count(*) from measurements",
    ] {
        assert!(names.contains(&want), "no check {want:?} in {names:?}");
    }
    assert!(checks.iter().all(|c| c["passed"] == true), "{checks:#?}");
    // Restored unprivileged; the one untrusted extension was made for it.
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("unprivileged role lifeboat_restore"),
        "{notes}"
    );
    assert!(notes.contains("extension pg_stat_statements"), "{notes}");
    // The partitions (about 80 blocks each) were read back in ranges of blocks on several
    // connections, and their pieces add up to the dump's exact rows: every table check passed.
    let spread = report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .find(|n| n.starts_with("read back "))
        .unwrap_or_else(|| panic!("no read-back note in {notes}"));
    let cut: usize = spread
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{spread}"));
    assert!(cut >= 2, "{spread}");
    assert!(spread.contains("on 4 connection(s)"), "{spread}");
    // The measured RTO, split: every phase took some time, and together they fit in the total.
    let t = &report["timings"];
    let phases = [
        "download_seconds",
        "restore_seconds",
        "index_build_seconds",
        "readback_seconds",
        "checks_seconds",
    ];
    let secs: Vec<f64> = phases.iter().map(|p| t[p].as_f64().unwrap()).collect();
    assert!(secs.iter().all(|s| *s > 0.0), "{t:#}");
    assert!(
        secs.iter().sum::<f64>() <= t["total_seconds"].as_f64().unwrap(),
        "{t:#}"
    );
    assert!(report["scratch"]
        .as_str()
        .unwrap()
        .starts_with("ephemeral cluster"));

    // The report is in the repository, and list shows the backup as verified.
    let stored = fx.reports(&id);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["result"], "pass");
    let r = lifeboat(
        fx.dir.path(),
        &["list", "--policy", policy.to_str().unwrap(), "--json"],
        &[],
    );
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(list[0]["verified"], true);
    assert_eq!(list[0]["verification"]["result"], "pass");
}

#[test]
fn a_failing_assertion_fails_verification_with_exit_4() {
    let fx = setup("vassert");
    fx.pg.psql(
        &fx.db,
        "create table users (id int); insert into users values (1), (2)",
    );
    let policy = fx.policy("checks = [{ sql = \"select count(*) from users\", min = 5 }]");
    let id = fx.backup(&policy);
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("FAIL sql: select count(*) from users: expected >= 5, found 2"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.reports(&id)[0]["result"], "fail");
    let r = lifeboat(
        fx.dir.path(),
        &["list", "--policy", policy.to_str().unwrap()],
        &[],
    );
    assert!(r.stdout.contains("FAILED"), "{}", r.stdout);
}

#[test]
fn damage_is_caught_before_restore_with_its_exit_code() {
    let fx = setup("vdamage");
    fx.pg.psql(
        &fx.db,
        "create table t as select g, md5(g::text) from generate_series(1, 5000) g",
    );
    let policy = fx.policy("");
    let first = fx.backup(&policy);
    fx.pg.psql(
        &fx.db,
        "insert into t select g, 'x' from generate_series(1, 10) g",
    );
    let second = fx.backup(&policy);
    let dump = "database.dump.zst.age";

    // Wrong identity: 12.
    let other = tempfile::tempdir().unwrap();
    let other_key = keygen(other.path());
    let r = verifier(
        fx.dir.path(),
        &[
            "verify",
            "--policy",
            policy.to_str().unwrap(),
            "--identity",
            other_key.identity.to_str().unwrap(),
        ],
        &[("TMPDIR".into(), fx.tmp.display().to_string())],
    );
    assert_eq!(r.code, 12, "{}", r.stderr);
    fx.assert_scratch_gone();

    let original = std::fs::read(fx.object(&second, dump)).unwrap();
    // Flipped bit: 13.
    let mut b = original.clone();
    let i = b.len() / 3;
    b[i] ^= 0x10;
    std::fs::write(fx.object(&second, dump), &b).unwrap();
    let r = fx.verify(&policy, &["--backup", &second]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("backups/app-db/{second}/{dump}: SHA-256")),
        "{}",
        r.stderr
    );
    // Truncated: 13.
    std::fs::write(fx.object(&second, dump), &original[..original.len() / 2]).unwrap();
    assert_eq!(fx.verify(&policy, &["--backup", &second]).code, 13);
    // Swapped with the other backup's object: 13.
    std::fs::copy(fx.object(&first, dump), fx.object(&second, dump)).unwrap();
    assert_eq!(fx.verify(&policy, &["--backup", &second]).code, 13);
    // The integrity failures were recorded as failed verifications.
    assert!(fx.reports(&second).iter().all(|r| r["result"] == "fail"));

    // Swapped, and the manifest edited to match: integrity passes, the content does not.
    let m1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.object(&first, "manifest.json")).unwrap())
            .unwrap();
    let mut m2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.object(&second, "manifest.json")).unwrap())
            .unwrap();
    m2["parts"][0] = m1["parts"][0].clone();
    std::fs::write(
        fx.object(&second, "manifest.json"),
        serde_json::to_vec(&m2).unwrap(),
    )
    .unwrap();
    let r = fx.verify(&policy, &["--backup", &second]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("FAIL table public.t: expected 5010 rows"),
        "{}",
        r.stderr
    );

    // Missing manifest: the backup is not trusted.
    std::fs::remove_file(fx.object(&second, "manifest.json")).unwrap();
    let r = fx.verify(&policy, &["--backup", &second]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        r.stderr.contains("has objects but no manifest"),
        "{}",
        r.stderr
    );
    // The first backup still verifies, and the output says what it proved, table by table.
    let r = fx.verify(&policy, &["--backup", &first]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .lines()
            .any(|l| l.starts_with("  ok   table public.t: ")
                && l.ends_with(" rows, content hash matched")),
        "{}",
        r.stderr
    );
}

#[test]
fn a_scratch_server_gets_a_throwaway_database_and_never_the_source() {
    let fx = setup("vserver");
    fx.pg.psql(
        &fx.db,
        "create table t as select generate_series(1, 100) as id",
    );
    // The password from the environment (SCRATCH_PW, which `verify` sets): never written out.
    let with_pw = |db: &str| {
        format!(
            "postgres://postgres:${{SCRATCH_PW}}@127.0.0.1:{}/{db}",
            fx.pg.port
        )
    };
    let scratch = with_pw("postgres");
    let policy = fx.policy(&format!("scratch_url = \"{scratch}\""));
    fx.backup(&policy);
    let r = fx.verify(&policy, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The test server's user is a superuser: the report warns.
    assert!(
        r.stdout
            .contains("verify.scratch_url connects as a superuser"),
        "{}",
        r.stdout
    );
    let left = fx.pg.psql(
        "postgres",
        "select count(*) from pg_database where datname like 'lifeboat_verify_%'",
    );
    assert_eq!(left, "0", "the scratch database was dropped");

    let own = with_pw(&fx.db);
    let policy = fx.policy(&format!("scratch_url = \"{own}\""));
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 14, "{}", r.stderr);
    assert!(
        r.stderr.contains("points at the source's own database"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains(&fx.pg.password), "{}", r.stderr);
}

#[test]
fn scheduled_verification_writes_reports_until_sigterm() {
    let fx = setup("vrun");
    fx.pg.psql(
        &fx.db,
        "create table t as select generate_series(1, 100) as id",
    );
    let policy = fx.policy("schedule = \"*/2 * * * * *\"");
    // Started before the first backup: no repository yet. It must wait for one, not exit.
    let mut child = std::process::Command::new(verifier_bin())
        .args([
            "run",
            "--policy",
            policy.to_str().unwrap(),
            "--identity",
            fx.key.identity.to_str().unwrap(),
        ])
        .env("TMPDIR", &fx.tmp)
        .current_dir(fx.dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the verifier daemon exited while the repository did not exist yet"
    );
    let id = fx.backup(&policy);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while fx.reports(&id).is_empty() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("no scheduled verification within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Verifier stopped"), "{stderr}");
    assert_eq!(fx.reports(&id)[0]["result"], "pass");
    fx.assert_scratch_gone();
}

/// A function the restore runs (through a CHECK constraint, as the table's rows load) that does
/// `what` only in the verifier's scratch database, never in the source.
fn hostile_check(pg: &Postgres, db: &str, what: &str) {
    pg.psql(
        db,
        &format!(
            "create function hostile(x int) returns boolean language plpgsql as $f$ \
             begin if current_database() = 'restored' then {what} end if; return true; end $f$; \
             create table guarded (x int check (hostile(x))); insert into guarded values (1)"
        ),
    );
}

/// Whether anything connected to `listener` (non-blocking) since it was bound.
fn reached(listener: &std::net::TcpListener) -> bool {
    listener.set_nonblocking(true).unwrap();
    listener.accept().is_ok()
}

#[test]
fn a_dump_that_runs_programs_or_reaches_the_network_is_contained_and_reported() {
    let fx = setup("vhostile");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let marker = PathBuf::from(format!("/tmp/lbv-hostile-{}", suffix()));
    let program = format!(
        "touch {}; bash -c \"echo hi > /dev/tcp/127.0.0.1/{port}\"",
        marker.display()
    );
    hostile_check(
        fx.pg,
        &fx.db,
        &format!("execute format('copy (select 1) to program %L', '{program}');"),
    );
    let policy = fx.policy("");
    let id = fx.backup(&policy);

    // Restored as the unprivileged role: COPY … PROGRAM is refused, the restore fails, the
    // report says why and what to do.
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("pg_execute_server_program"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("restore_as_superuser"), "{}", r.stderr);
    assert!(!marker.exists(), "the program ran");
    assert!(!reached(&listener), "the restore reached the network");
    let report = fx.reports(&id).pop().unwrap();
    assert_eq!(report["result"], "fail");
    let notes = report["notes"].to_string();
    assert!(notes.contains("lost SUPERUSER"), "{notes}");
    assert!(notes.contains("had no network"), "{notes}");

    // Restored as superuser on purpose: the program runs (as the scratch cluster's OS user), but
    // in a network namespace of its own it reaches nothing.
    let policy = fx.policy("restore_as_superuser = true");
    let r = fx.verify(&policy, &[]);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("program"), "{}", r.stderr);
    assert!(!reached(&listener), "the restore reached the network");
}

#[test]
fn untrusted_language_functions_need_restore_as_superuser() {
    let fx = setup("vclang");
    fx.pg.psql(
        &fx.db,
        "create function c_handler() returns int as '$libdir/plpgsql', 'plpgsql_call_handler' language c; \
         create table t as select generate_series(1, 10) as id",
    );
    let policy = fx.policy("");
    fx.backup(&policy);
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("permission denied for language c"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("restore_as_superuser = true"),
        "{}",
        r.stderr
    );
    // The operator who trusts the repository's writers says so, and the same backup verifies.
    let policy = fx.policy("restore_as_superuser = true");
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_dump_that_fills_the_disk_is_stopped() {
    let fx = setup("vfill");
    fx.pg.psql(
        &fx.db,
        "create table junk (s text); alter table junk alter column s set storage external",
    );
    // About 20 GB of uncompressed rows, were nothing to stop it.
    hostile_check(
        fx.pg,
        &fx.db,
        "insert into public.junk select repeat('x', 1000) from generate_series(1, 20000000);",
    );
    // A size limit of its own.
    let policy = fx.policy("scratch_max_size = \"64MiB\"");
    let id = fx.backup(&policy);
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("grew past verify.scratch_max_size (64.0 MiB)"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.reports(&id).pop().unwrap()["result"], "fail");

    // No limit, on a small filesystem: the verifier stops before it is full.
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=800m", "tmpfs"])
        .arg(&fx.tmp)
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs needs root");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&fx.tmp);
    let policy = fx.policy("");
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("the scratch filesystem had only")
            && r.stderr.contains("(the verifier keeps 256.0 MiB free)"),
        "{}",
        r.stderr
    );
    // The floor is the operator's to set: here a higher one than the default.
    let policy = fx.policy("scratch_keep_free = \"384MiB\"");
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("(the verifier keeps 384.0 MiB free)"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_forged_roles_part_runs_no_shell_command_and_no_sql_but_roles() {
    use sha2::{Digest, Sha256};
    let fx = setup("vforge");
    fx.pg.psql(&fx.db, "create table t as select 1 as id");
    let policy = fx.policy("");
    let id = fx.backup(&policy);
    let marker = PathBuf::from(format!("/tmp/lbv-forged-{}", suffix()));
    let script = format!(
        "CREATE ROLE forged_ok;\n\\! touch {m}\nCOPY (SELECT 1) TO PROGRAM 'touch {m}';\nALTER ROLE lifeboat_verify NOSUPERUSER;\nCREATE ROLE forged_super SUPERUSER;\nGRANT pg_execute_server_program TO forged_ok;\n",
        m = marker.display()
    );
    // Written as a bucket writer with the public recipient would: compressed, encrypted, and
    // the manifest's hashes made to match.
    let sh = |cmd: &str, input: &[u8]| -> Vec<u8> {
        use std::io::Write;
        let mut c = Command::new("sh")
            .args(["-c", cmd])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{cmd}");
        out.stdout
    };
    let stored = sh(
        &format!("zstd -q -c | age -r {}", fx.key.recipient),
        script.as_bytes(),
    );
    let path = fx.object(&id, "manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let part = m["parts"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["role"] == "globals")
        .unwrap();
    std::fs::write(fx.object(&id, part["name"].as_str().unwrap()), &stored).unwrap();
    part["size_plain"] = script.len().into();
    part["sha256_plain"] = hex::encode(Sha256::digest(script.as_bytes())).into();
    part["size_stored"] = stored.len().into();
    part["sha256_stored"] = hex::encode(Sha256::digest(&stored)).into();
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();

    let r = fx.verify(&policy, &["--json"]);
    assert!(
        !marker.exists(),
        "a statement of the forged part ran a program"
    );
    assert_eq!(r.code, 4, "{}", r.stderr);
    let reports: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let globals = reports[0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "globals replayed")
        .unwrap()
        .clone();
    let found = globals["found"].as_str().unwrap();
    for want in [
        "refused psql meta-command \\!",
        "refused COPY (SELECT 1) TO",
        "refused ALTER ROLE lifeboat_verify NOSUPERUSER (it names the role the restore runs as)",
    ] {
        assert!(found.contains(want), "{want:?} not in {found}");
    }
    assert!(!found.contains("touch"), "{found}");
    // The superuser and the program-running membership it asked for were taken back.
    let notes = reports[0]["notes"].to_string();
    assert!(notes.contains("forged_super"), "{notes}");
    assert!(notes.contains("1 membership(s)"), "{notes}");
}

#[test]
fn a_dump_that_never_finishes_is_stopped_at_the_verify_timeout() {
    let fx = setup("vsleep");
    hostile_check(fx.pg, &fx.db, "perform pg_sleep(3600);");
    let policy = fx.policy("timeout = \"3s\"");
    let id = fx.backup(&policy);
    let t0 = std::time::Instant::now();
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(t0.elapsed() < std::time::Duration::from_secs(60));
    assert!(
        r.stderr.contains("stopped after verify.timeout (3s)"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.reports(&id).pop().unwrap()["result"], "fail");
}

#[test]
fn a_row_of_many_megabytes_is_fingerprinted_as_it_streams_and_verifies() {
    let fx = setup("vbigrow");
    fx.pg.psql(
        &fx.db,
        "create table big (id int, b bytea, t text);
         insert into big select 1, convert_to(repeat('x', 12 << 20), 'UTF8'), repeat('y', 12 << 20);
         insert into big select 2, '\\x00ff', 'small';",
    );
    let policy = fx.policy("");
    fx.backup(&policy);
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("  ok   table public.big: 2 rows, content hash matched"),
        "{}",
        r.stderr
    );
    // On a terminal the verification shows its phases as it goes.
    let command = format!(
        "{} verify --policy {} --identity {}",
        verifier_bin().display(),
        policy.display(),
        fx.key.identity.display()
    );
    let tty = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .current_dir(fx.dir.path())
        .env("TMPDIR", &fx.tmp)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains("app-db: restoring into a scratch server"),
        "no phases on a terminal: {shown}"
    );
}

#[test]
fn a_latin1_database_verifies_and_restores_with_its_encoding_and_locale() {
    let mut fx = setup("vlatin");
    let db = format!("latin_{}", suffix());
    fx.pg.psql(
        "postgres",
        &format!("create database {db} template template0 encoding 'LATIN1' locale 'C'"),
    );
    fx.db = db.clone();
    fx.pg.psql(
        &db,
        // Unicode escapes: the text is the same whatever psql's client encoding.
        "create table t (id int primary key, name text);
         insert into t values (1, U&'caf\\00E9'), (2, U&'\\00C6r\\00F8sk\\00F8bing'),
           (3, U&'na\\00EFve fa\\00E7ade'), (4, 'plain');
         create index on t (name);",
    );
    let policy = fx.policy(
        "checks = [{ sql = \"select count(*) from t where name like U&'%\\\\00E9%'\", equals = 1 }]",
    );
    let id = fx.backup(&policy);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.object(&id, "manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["database"]["encoding"], "LATIN1", "{manifest:#}");
    assert_eq!(manifest["database"]["collate"], "C", "{manifest:#}");

    // The scratch database is LATIN1 too, and the content hashes match.
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("  ok   table public.t: 4 rows, content hash matched"),
        "{}",
        r.stderr
    );

    // A restore into a database that does not exist creates it as the source was.
    let target = format!("latin_restored_{}", suffix());
    fx.restore_into(&policy, &target);
    let q = |name: &str| {
        fx.pg.psql(
            "postgres",
            &format!(
                "select pg_encoding_to_char(encoding) || ' ' || datcollate || ' ' || datctype \
                 from pg_database where datname = '{name}'"
            ),
        )
    };
    assert_eq!(q(&target), "LATIN1 C C");
    let rows = "select encode(convert_to(string_agg(name, ',' order by id), 'UTF8'), 'hex') from t";
    let want: String = "café,Ærøskøbing,naïve façade,plain"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(fx.pg.psql(&db, rows), want, "the source holds the text");
    assert_eq!(
        fx.pg.psql(&target, rows),
        want,
        "the restore holds the text"
    );
    assert_eq!(fx.pg.digest(&target), fx.pg.digest(&db));
}

#[test]
fn a_sql_ascii_database_with_bytes_in_no_encoding_verifies_and_restores_them() {
    let mut fx = setup("vascii");
    let db = format!("ascii_{}", suffix());
    fx.pg.psql(
        "postgres",
        &format!("create database {db} template template0 encoding 'SQL_ASCII' locale 'C'"),
    );
    fx.db = db.clone();
    // 0xe9 is no UTF-8 character: the bytes are stored as they are.
    fx.pg.psql(
        &db,
        "create table s as select g as id, convert_from('\\x636166e9'::bytea, 'SQL_ASCII') || g as name          from generate_series(1, 20) g",
    );
    let policy = fx.policy("");
    let id = fx.backup(&policy);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.object(&id, "manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["database"]["encoding"], "SQL_ASCII",
        "{manifest:#}"
    );
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("  ok   table public.s: 20 rows, content hash matched"),
        "{}",
        r.stderr
    );
    let target = format!("ascii_restored_{}", suffix());
    fx.restore_into(&policy, &target);
    let bytes =
        "select encode(convert_to(string_agg(name, ',' order by id), 'SQL_ASCII'), 'hex') from s";
    assert_eq!(fx.pg.psql(&target, bytes), fx.pg.psql(&db, bytes));
    assert!(fx.pg.psql(&db, bytes).starts_with("636166e931"));
}

#[test]
fn a_verification_without_a_network_namespace_is_shown_as_uncontained() {
    let fx = setup("vuncontained");
    fx.pg.psql(
        &fx.db,
        "create table t as select generate_series(1, 10) as id",
    );
    let policy = fx.policy("");
    let id = fx.backup(&policy);
    let r = fx.verify(&policy, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fx.reports(&id)[0]["contained"], true);
    std::thread::sleep(std::time::Duration::from_millis(1100));

    // As in a pod without CAP_SYS_ADMIN: `unshare` is refused.
    let bin = fx.dir.path().join("no-unshare");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(bin.join("unshare"), "#!/bin/sh\nexit 1\n").unwrap();
    assert!(std::process::Command::new("chmod")
        .args(["+x"])
        .arg(bin.join("unshare"))
        .status()
        .unwrap()
        .success());
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let r = fx.verify_with(&policy, &[], &[("PATH".into(), path)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let latest = fx.reports(&id).pop().unwrap();
    assert_eq!(latest["contained"], false);
    assert!(
        latest["notes"]
            .to_string()
            .contains("shared the host's network"),
        "{latest}"
    );

    // list says so, in words and in --json.
    let p = policy.to_str().unwrap();
    let r = lifeboat(fx.dir.path(), &["list", "--policy", p], &[]);
    assert!(
        r.stderr.contains(&format!(
            "the latest verification of app-db {id} ran uncontained"
        )),
        "{}",
        r.stderr
    );
    let r = lifeboat(fx.dir.path(), &["list", "--policy", p, "--json"], &[]);
    let list: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(list[0]["verification"]["contained"], false);

    // And the agent's /metrics.
    let port = free_port();
    let with_agent = listening(&policy, port);
    let mut agent = std::process::Command::new(lifeboat_bin())
        .args(["agent", "--policy", with_agent.to_str().unwrap()])
        .current_dir(fx.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let body = loop {
        let got = http_get(port, "/metrics")
            .map(|(_, body)| body)
            .filter(|body| {
                metric(
                    body,
                    "lifeboat_verification_contained",
                    &[("source", "app-db")],
                )
                .is_some()
            });
        if got.is_some() || std::time::Instant::now() > deadline {
            break got.unwrap_or_default();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        metric(
            &body,
            "lifeboat_verification_contained",
            &[("source", "app-db")]
        ),
        Some(0.0)
    );
    // The measured RTO by phase, as the dashboard stacks it: the phases add up to the report's
    // total.
    let phase = |p: &str| {
        metric(
            &body,
            "lifeboat_last_verification_phase_seconds",
            &[("source", "app-db"), ("phase", p)],
        )
        .unwrap_or_else(|| panic!("no phase {p} in {body}"))
    };
    let stacked: f64 = [
        "download",
        "restore",
        "index_build",
        "readback",
        "checks",
        "other",
    ]
    .iter()
    .map(|p| phase(p))
    .sum();
    let total = latest["timings"]["total_seconds"].as_f64().unwrap();
    assert!((stacked - total).abs() < 0.01, "{stacked} != {total}");
    assert!(phase("restore") > 0.0 && phase("readback") > 0.0);
}
