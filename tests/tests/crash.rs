//! Crash points: a real backup into S3 is killed with SIGKILL at points spread over its whole life
//! (connecting, dumping, uploading parts, completing, writing the manifest), again and again.
//! After every kill: no manifest names a missing or short object, the backup taken before the
//! kills still verifies, and a fresh backup succeeds. The agent's next start aborts the uploads the
//! killed runs left open. `CRASH_POINTS=200` for the full run that RELIABILITY.md reports.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat_tests::*;

#[test]
fn kill_9_at_any_point_never_leaves_a_partial_backup() {
    let points: u32 = std::env::var("CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let pg = postgres();
    let db = pg.create_db("crash");
    pg.psql(
        &db,
        "create table t as select g as id, md5(g::text) || md5((g * 3)::text) as a, md5(random()::text) as b
         from generate_series(1, 200000) g;",
    );
    let s3 = s3();
    let bucket = rt().block_on(s3.create_bucket());
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let port = free_port();
    let repository = format!(
        "url = \"s3://{bucket}/repo\"\nendpoint = \"{}\"\npart_size = \"5MiB\"",
        s3.endpoint
    );
    let source = |timeout: &str| {
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\n\n[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nglobals = false\ntimeout = \"{timeout}\"\n",
            pg.url(&db),
            pg.password_file(dir.path()).display()
        )
    };
    let policy = write_policy(dir.path(), &repository, &key.recipient, &source("10m"));
    let p = policy.to_str().unwrap().to_string();
    let mut env = s3.env();
    // Its own temp dir: what a killed run leaves there is checked below.
    let tmp = tempfile::tempdir().unwrap();
    env.push(("TMPDIR".into(), tmp.path().display().to_string()));

    // A good backup first, and how long one takes.
    let t = Instant::now();
    let r = lifeboat(dir.path(), &["backup", "--policy", &p], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let life = t.elapsed();
    let list = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        let r = lifeboat(dir, &["list", "--policy", &p, "--json"], &env);
        assert_eq!(r.code, 0, "list: {}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap()
    };
    let first = list(dir.path())[0]["id"].as_str().unwrap().to_string();

    let started = Instant::now();
    let mut killed_before_exit = 0;
    for i in 0..points {
        let at = life.mul_f64(f64::from(i) / f64::from(points) * 1.1);
        let mut child = Command::new(lifeboat_bin())
            .args(["backup", "--policy", &p])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            killed_before_exit += 1;
        }
        let _ = child.kill(); // SIGKILL: no cleanup runs
        let _ = child.wait();
        // After every kill: every listed backup is whole (check compares manifests with objects).
        let r = lifeboat(dir.path(), &["check", "--policy", &p], &env);
        assert_eq!(
            r.code, 0,
            "after a kill at {at:?} ({i} of {points}): {}",
            r.stderr
        );
    }
    assert!(
        killed_before_exit * 2 >= points,
        "most kills must hit a running backup ({killed_before_exit} of {points})"
    );
    let r = lifeboat(dir.path(), &["check", "--policy", &p, "--read-data"], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let left_open = rt().block_on(s3.pending_uploads(&bucket)).len();
    eprintln!(
        "{points} kill points over {life:?}: {killed_before_exit} hit a running backup, {left_open} uploads left open, {} backups listed",
        list(dir.path()).len()
    );

    // The backup from before the kills still verifies, and so does a new one.
    let id = key.identity.to_str().unwrap().to_string();
    let v = verifier(
        dir.path(),
        &[
            "verify",
            "--policy",
            &p,
            "--identity",
            &id,
            "--backup",
            &first,
        ],
        &env,
    );
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    assert_eq!(
        lifeboat(dir.path(), &["backup", "--policy", &p], &env).code,
        0
    );
    // The killed runs' password files are gone: the next run removed those of dead processes.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lifeboat-pgpass-"))
        .collect();
    assert!(left.is_empty(), "password files left behind: {left:?}");
    let v = verifier(
        dir.path(),
        &["verify", "--policy", &p, "--identity", &id],
        &env,
    );
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);

    // The agent's start aborts uploads older than the longest source timeout plus a minute.
    let short = write_policy(dir.path(), &repository, &key.recipient, &source("1s"));
    let wait = Duration::from_secs(62).saturating_sub(started.elapsed());
    std::thread::sleep(wait);
    let mut agent = Command::new(lifeboat_bin())
        .args(["agent", "--policy", short.to_str().unwrap()])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // /healthz answers only once start-up (and its sweep) is done.
    let healthy = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).ok()?;
        buf.starts_with(b"HTTP/1.").then_some(())
    };
    while healthy().is_none() {
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let still_open = rt().block_on(s3.pending_uploads(&bucket));
    assert!(
        still_open.is_empty(),
        "{left_open} uploads were left open by killed runs; after the agent's start: {still_open:?}"
    );
}
