//! Producers and disks failing under a running job: pg_dump killed mid-stream, the server
//! dropping every connection mid-dump (what a restart does to its clients), and a disk that fills
//! up (the repository directory, the restore spool, the verifier's scratch; simulated with a file
//! size limit, `ulimit -f`, which fails writes with EFBIG as a full disk fails them with ENOSPC).
//! Each time: a clear error, nothing published, nothing applied, earlier backups intact, and the
//! next run succeeds.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat_tests::*;

struct Fx {
    pg: &'static Postgres,
    db: String,
    dir: tempfile::TempDir,
    key: Key,
    policy: PathBuf,
}

fn setup(prefix: &str, rows: u32) -> Fx {
    let pg = postgres();
    let db = pg.create_db(prefix);
    pg.psql(
        &db,
        &format!(
            "create table t as select g as id, md5(g::text) || md5((g * 5)::text) as a, md5(random()::text) as b
             from generate_series(1, {rows}) g"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let src = format!(
        "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nglobals = false\n",
        pg.url(&db),
        pg.password_file(dir.path()).display()
    );
    let policy = write_policy(dir.path(), "url = \"file://./repo\"", &key.recipient, &src);
    Fx {
        pg,
        db,
        dir,
        key,
        policy,
    }
}

impl Fx {
    fn p(&self) -> String {
        self.policy.to_str().unwrap().to_string()
    }

    fn manifests(&self) -> usize {
        let base = self.dir.path().join("repo/backups/app-db");
        std::fs::read_dir(base)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("manifest.json").exists())
                    .count()
            })
            .unwrap_or(0)
    }

    fn backup(&self) -> Run {
        lifeboat(self.dir.path(), &["backup", "--policy", &self.p()], &[])
    }

    /// Starts a backup, waits until pg_dump has run for a moment under it (the table is large
    /// enough that the dump takes seconds), does `act(pid of pg_dump)`, and
    /// returns the backup's result.
    fn backup_interrupted(&self, act: &dyn Fn(u32)) -> (i32, String) {
        let child = Command::new(lifeboat_bin())
            .args(["backup", "--policy", &self.p()])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let dump_pid = loop {
            let out = Command::new("pgrep")
                .args(["-P", &child.id().to_string(), "pg_dump"])
                .output()
                .unwrap();
            // The dump itself, not the `pg_dump --version` that comes first.
            let dump = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .find(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| !String::from_utf8_lossy(&c).contains("--version"))
                });
            if let Some(pid) = dump {
                break pid;
            }
            assert!(Instant::now() < deadline, "pg_dump never started");
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        act(dump_pid);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn verify(&self, env: &[(String, String)]) -> Run {
        let id = self.key.identity.to_str().unwrap().to_string();
        verifier(
            self.dir.path(),
            &["verify", "--policy", &self.p(), "--identity", &id],
            env,
        )
    }
}

#[test]
fn pg_dump_killed_mid_stream_publishes_nothing() {
    let fx = setup("killed", 1_500_000);
    assert_eq!(fx.backup().code, 0);
    let (code, stderr) = fx.backup_interrupted(&|pid| {
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
    });
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("pg_dump"), "{stderr}");
    eprintln!("pg_dump killed: {}", stderr.lines().next().unwrap_or(""));
    assert!(stderr.contains("nothing was published"), "{stderr}");
    assert_eq!(fx.manifests(), 1, "only the earlier backup");
    assert_eq!(fx.backup().code, 0, "the next run succeeds");
    assert_eq!(fx.verify(&[]).code, 0);
}

#[test]
fn connections_dropped_mid_dump_publish_nothing() {
    let fx = setup("dropped", 1_500_000);
    let (code, stderr) = fx.backup_interrupted(&|_| {
        // What a server restart does to its clients: every backend of the database is gone.
        fx.pg.psql(
            "postgres",
            &format!(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity where datname = '{}'",
                fx.db
            ),
        );
    });
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("nothing was published"), "{stderr}");
    assert_eq!(fx.manifests(), 0);
    assert_eq!(fx.backup().code, 0, "the next run succeeds");
}

#[test]
fn full_disks_fail_cleanly_everywhere() {
    let fx = setup("fulldisk", 100_000);
    assert_eq!(fx.backup().code, 0);
    let p = fx.p();
    // The repository's disk: the data object cannot be written.
    let r = limited(
        &lifeboat_bin(),
        fx.dir.path(),
        512,
        &["backup", "--policy", &p],
        &[],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("disk is full"), "{}", r.stderr);
    assert!(r.stderr.contains("nothing was published"), "{}", r.stderr);
    assert_eq!(fx.manifests(), 1, "only the earlier backup");
    let left: Vec<_> = files_under(&fx.dir.path().join("repo"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    assert!(
        left.is_empty(),
        "temp files left in the repository: {left:?}"
    );

    // A restore from a local directory spools nothing (the stored object is read in place), so
    // the same limit does not stop it. (A full spool disk, from S3: tests/faults.rs.)
    let target = format!("full_{}", suffix());
    let to = fx.pg.url(&target);
    let id = fx.key.identity.to_str().unwrap().to_string();
    let env = [("PGPASSWORD".to_string(), fx.pg.password.clone())];
    let r = limited(
        &lifeboat_bin(),
        fx.dir.path(),
        256,
        &[
            "restore",
            "--policy",
            &p,
            "--source",
            "app-db",
            "--to",
            &to,
            "--identity",
            &id,
        ],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let count = |db: &str| fx.pg.psql(db, "select count(*) from t");
    assert_eq!(count(&target), count(&fx.db));

    // The verifier's scratch: it fails, says so, and leaves no scratch behind.
    let tmp = tempfile::tempdir().unwrap();
    let venv = [("TMPDIR".to_string(), tmp.path().display().to_string())];
    let r = limited(
        &verifier_bin(),
        fx.dir.path(),
        256,
        &["verify", "--policy", &p, "--identity", &id],
        &venv,
    );
    assert_ne!(r.code, 0, "{}", r.stderr);
    let scratch: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(scratch.is_empty(), "scratch left behind: {scratch:?}");
    // With room again, everything works.
    assert_eq!(fx.verify(&[]).code, 0);
}
