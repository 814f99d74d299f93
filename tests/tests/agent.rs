//! The sidecar against real servers: schedules fire, metrics and status tell the truth, a failing
//! source does not stop another, and SIGTERM mid-backup publishes nothing and exits 0.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat_tests::*;

/// A running agent, killed if the test fails before stopping it.
struct AgentProc(Option<Child>);

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_agent(dir: &Path, policy: &Path, env: &[(String, String)]) -> AgentProc {
    AgentProc(Some(
        Command::new(lifeboat_bin())
            .args(["agent", "--policy", policy.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent"),
    ))
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop(mut agent: AgentProc) -> (i32, String, Duration) {
    let child = agent.0.take().expect("the agent runs");
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

#[test]
fn scheduled_runs_report_success_and_failure_per_source() {
    let pg = postgres();
    let db = pg.create_db("agent");
    pg.psql(
        &db,
        "create table t as select generate_series(1, 100) as id",
    );
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = pg.password_file(dir.path());
    let port = free_port();
    let (hook_port, hooks) = webhook();
    let sources = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"5s\"\n\n\
         [[notify]]\nurl = \"http://127.0.0.1:{hook_port}/hook?token=${{HOOK_TOKEN}}\"\n\n\
         [[sources]]\nname = \"good\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nschedule = \"*/2 * * * * *\"\nretries = 0\nobjectives = {{ rpo = \"1h\" }}\n\n\
         [[sources]]\nname = \"bad\"\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:{}/x\"\nschedule = \"*/2 * * * * *\"\nretries = 0\nobjectives = {{ rpo = \"1h\" }}\n",
        pg.url(&db),
        pwfile.display(),
        free_port()
    );
    let policy = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &sources,
    );
    // The webhook's token comes from the environment, as a policy must take it.
    let hook_env = [("HOOK_TOKEN".to_string(), "s3cr3t".to_string())];
    // One verified backup before the agent starts: its report feeds the verify metrics.
    let r = lifeboat(
        dir.path(),
        &[
            "backup",
            "--policy",
            policy.to_str().unwrap(),
            "--source",
            "good",
        ],
        &hook_env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = verifier(
        dir.path(),
        &[
            "verify",
            "--policy",
            policy.to_str().unwrap(),
            "--source",
            "good",
            "--identity",
            key.identity.to_str().unwrap(),
        ],
        &hook_env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let child = start_agent(dir.path(), &policy, &hook_env);

    wait_until("/healthz", 30, || {
        http_get(port, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    let mut body = String::new();
    wait_until("a success of good and a failure of bad", 60, || {
        body = http_get(port, "/metrics").map(|x| x.1).unwrap_or_default();
        metric(
            &body,
            "lifeboat_last_success_timestamp_seconds",
            &[("source", "good"), ("op", "backup")],
        )
        .unwrap_or(0.0)
            > 0.0
            && metric(
                &body,
                "lifeboat_last_failure_timestamp_seconds",
                &[("source", "bad"), ("op", "backup")],
            )
            .unwrap_or(0.0)
                > 0.0
            && metric(
                &body,
                "lifeboat_last_success_timestamp_seconds",
                &[("source", "good"), ("op", "prune")],
            )
            .unwrap_or(0.0)
                > 0.0
    });
    let runs = |source: &str, op: &str, result: &str| {
        metric(
            &body,
            "lifeboat_runs_total",
            &[("source", source), ("op", op), ("result", result)],
        )
    };
    assert!(runs("good", "backup", "success").unwrap() >= 1.0, "{body}");
    assert!(runs("bad", "backup", "failure").unwrap() >= 1.0, "{body}");
    // The repository requests of its backups: the dump and the fingerprint at least.
    let puts = metric(
        &body,
        "lifeboat_requests_total",
        &[("source", "good"), ("target", "repository"), ("op", "put")],
    );
    assert!(puts.unwrap_or(0.0) >= 2.0, "{body}");
    assert_eq!(
        runs("good", "verify", "success"),
        Some(0.0),
        "counters start at 0: {body}"
    );
    assert!(
        runs("good", "prune", "success").unwrap() >= 1.0,
        "prune follows a successful backup: {body}"
    );
    assert_eq!(
        runs("bad", "prune", "success"),
        Some(0.0),
        "never after a failed one: {body}"
    );
    assert_eq!(
        metric(&body, "lifeboat_rpo_seconds", &[("source", "good")]),
        Some(3600.0),
        "{body}"
    );
    assert!(
        metric(
            &body,
            "lifeboat_next_run_timestamp_seconds",
            &[("source", "good")]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        metric(
            &body,
            "lifeboat_objective_breach",
            &[("source", "good"), ("objective", "rpo")]
        ),
        Some(0.0),
        "a verified backup within the RPO: {body}"
    );
    assert!(
        metric(&body, "lifeboat_repository_backups", &[("source", "good")]).unwrap() >= 1.0,
        "{body}"
    );
    assert!(body.contains("lifeboat_build_info{version="), "{body}");
    assert!(!body.contains("job="), "no job label: {body}");

    let (status, json) = http_get(port, "/status").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["sources"]["good"]["schedule"], "*/2 * * * * *");
    assert!(v["sources"]["good"]["newest_backup"].is_array(), "{v:#}");
    assert_eq!(
        v["sources"]["bad"]["last_runs"][0]["result"], "failure",
        "{v:#}"
    );
    assert!(
        v["sources"]["bad"]["last_runs"][0]["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{v:#}"
    );
    assert!(v["sources"]["good"]["newest_verified"].is_array(), "{v:#}");
    assert_eq!(
        v["sources"]["good"]["breaches"],
        serde_json::json!([]),
        "{v:#}"
    );

    // Webhooks: the failing source's first failure, the breached objective; no success noise.
    let deadline = Instant::now() + Duration::from_secs(30);
    while hooks.lock().unwrap().len() < 2 {
        if Instant::now() > deadline {
            let (_, stderr, _) = stop(child);
            panic!(
                "webhooks not received: {:?}\nagent log:\n{stderr}",
                hooks.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let got = hooks.lock().unwrap().clone();
    let failures: Vec<_> = got.iter().filter(|h| h["event"] == "failure").collect();
    assert_eq!(
        failures.len(),
        1,
        "one notification per state change, not per run: {got:#?}"
    );
    assert_eq!(failures[0]["source"], "bad");
    assert!(
        failures[0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{got:#?}"
    );
    assert!(
        !got.iter()
            .any(|h| h["event"] == "breach" && h["source"] == "good"),
        "the RPO is met: {got:#?}"
    );
    assert!(
        !got.iter()
            .any(|h| h["source"] == "good" && h["event"] == "failure"),
        "{got:#?}"
    );

    let (code, stderr, took) = stop(child);
    assert_eq!(code, 0, "SIGTERM exits 0: {stderr}");
    assert!(
        !stderr.contains("s3cr3t"),
        "the webhook token is never logged: {stderr}"
    );
    assert!(took < Duration::from_secs(15), "within the grace: {took:?}");
    assert!(stderr.contains("Agent stopped"), "{stderr}");
}

#[test]
fn sigterm_during_a_backup_publishes_nothing_and_exits_0() {
    let pg = postgres();
    let s3 = s3();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bucket = rt.block_on(s3.create_bucket());
    let db = pg.create_db("agentkill");
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = pg.password_file(dir.path());
    let bin = dir.path().join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("pg_dump"),
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 15.18'; exit 0; fi\n\
         i=0; while [ $i -lt 300 ]; do head -c 1048576 /dev/urandom || exit 1; sleep 0.1; i=$((i+1)); done\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(bin.join("pg_dump"))
        .status()
        .unwrap();
    let port = free_port();
    let sources = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"1s\"\n\n\
         [[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nschedule = \"*/2 * * * * *\"\nglobals = false\npg_bin_dir = \"{}\"\n",
        pg.url(&db),
        pwfile.display(),
        bin.display()
    );
    let repo = format!(
        "url = \"s3://{bucket}/p\"\nendpoint = \"{}\"\npart_size = \"5MiB\"",
        s3.endpoint
    );
    let policy = write_policy(dir.path(), &repo, &key.recipient, &sources);
    let child = start_agent(dir.path(), &policy, &s3.env());
    wait_until("a multipart upload in flight", 60, || {
        !rt.block_on(s3.pending_uploads(&bucket)).is_empty()
    });
    let (code, stderr, took) = stop(child);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        took < Duration::from_secs(20),
        "grace 1 s, then cancelled: {took:?}"
    );
    assert!(stderr.contains("Grace period over"), "{stderr}");
    let keys = rt.block_on(s3.keys(&bucket, "p/backups/"));
    assert!(keys.is_empty(), "nothing published: {keys:?}");
    assert!(
        rt.block_on(s3.pending_uploads(&bucket)).is_empty(),
        "the upload was aborted"
    );
}

#[test]
fn two_replicas_with_one_policy_take_each_slot_once() {
    let pg = postgres();
    let db = pg.create_db("replicas");
    pg.psql(
        &db,
        "create table t as select generate_series(1, 100) as id",
    );
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = pg.password_file(dir.path());
    let src = format!(
        "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nschedule = \"*/2 * * * * *\"\nglobals = false\nretention = {{ keep_last = 100 }}\n",
        pg.url(&db),
        pwfile.display()
    );
    let policies: Vec<_> = (0..2)
        .map(|_| {
            let agent = format!("[agent]\nlisten = \"127.0.0.1:{}\"\n\n{src}", free_port());
            write_policy(
                dir.path(),
                "url = \"file://./repo\"",
                &key.recipient,
                &agent,
            )
        })
        .collect();
    let a = start_agent(dir.path(), &policies[0], &[]);
    let b = start_agent(dir.path(), &policies[1], &[]);
    std::thread::sleep(Duration::from_secs(9));
    let (ca, ea, _) = stop(a);
    let (cb, eb, _) = stop(b);
    assert_eq!((ca, cb), (0, 0), "{ea}\n{eb}");
    let r = lifeboat(
        dir.path(),
        &["list", "--policy", policies[0].to_str().unwrap(), "--json"],
        &[],
    );
    let backups: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let slots = std::fs::read_dir(dir.path().join("repo/slots/app-db"))
        .unwrap()
        .count();
    assert!(slots >= 3, "ticks every 2 s for 9 s: {slots}");
    assert_eq!(
        backups.len(),
        slots,
        "one backup per slot, not one per replica\n{ea}\n{eb}"
    );
    assert!(
        ea.contains("Another replica took this slot")
            || eb.contains("Another replica took this slot"),
        "{ea}\n{eb}"
    );
}

#[test]
fn sigterm_stops_the_agent_even_when_its_log_reader_went_away() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let port = free_port();
    // A source that fails every 2 s, so the agent keeps logging into the closed pipe.
    let sources = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\n\n[[sources]]\nname = \"bad\"\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:{}/x\"\nschedule = \"*/2 * * * * *\"\nretries = 0\n",
        free_port()
    );
    let policy = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &sources,
    );
    let mut child = Command::new(lifeboat_bin())
        .args(["agent", "--policy", policy.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first line, then close the pipe: every later log line hits a broken pipe.
    let mut stderr = child.stderr.take().unwrap();
    let mut byte = [0u8; 1];
    while stderr
        .read(&mut byte)
        .map(|n| n == 1 && byte[0] != b'\n')
        .unwrap_or(false)
    {}
    drop(stderr);
    std::thread::sleep(Duration::from_secs(5));
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent ignored SIGTERM after its log reader went away");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn listen_flag_overrides_the_policy_address() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let (in_policy, from_env) = (free_port(), free_port());
    let policy = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &format!(
            "[agent]\nlisten = \"127.0.0.1:{in_policy}\"\n\n[[sources]]\nname = \"db\"\nkind = \"postgres\"\nurl = \"postgres://u@127.0.0.1:1/db\"\nschedule = \"0 3 1 1 *\"\n"
        ),
    );
    let agent = start_agent(
        dir.path(),
        &policy,
        &[("LIFEBOAT_LISTEN".into(), format!("127.0.0.1:{from_env}"))],
    );
    wait_until("/healthz on the LIFEBOAT_LISTEN address", 30, || {
        http_get(from_env, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    assert!(
        http_get(in_policy, "/healthz").is_none(),
        "the policy's address is not served when overridden"
    );
    let (code, stderr, _) = stop(agent);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn secrets_never_reach_logs_status_metrics_notifications_or_the_repository() {
    // Canaries in every place a policy can hold a secret: a password file, a `${VAR}` inside a
    // PostgreSQL and a Redis URL (sources that fail, so the secrets ride through error paths),
    // the index key, and a webhook URL's query.
    const PG_CANARY: &str = "canary-pgpass-51d2";
    const URL_CANARY: &str = "canary-url-8e0b";
    const REDIS_CANARY: &str = "canary-redis-c4a7";
    const INDEX_CANARY: &str = "canary-index-key-0123456789abcdef0123456789";
    const HOOK_CANARY: &str = "canary-hook-6f19";
    let pg = postgres();
    let db = pg.create_db("secrets");
    let role = format!("canary_{}", suffix());
    pg.psql(
        &db,
        &format!(
            "create role {role} login password '{PG_CANARY}' superuser;
             create table t as select generate_series(1, 100) as id"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = dir.path().join("pgpass");
    std::fs::write(&pwfile, PG_CANARY).unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("a.txt"), "a").unwrap();
    let port = free_port();
    let (hook_port, hooks) = webhook();
    let closed = free_port();
    let sources = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"5s\"\nlog_format = \"json\"\n\n\
         [[notify]]\nurl = \"http://127.0.0.1:{hook_port}/hook?token=${{HOOK_TOKEN}}\"\n\n\
         [[sources]]\nname = \"good\"\nkind = \"postgres\"\nurl = \"postgres://{role}@127.0.0.1:{}/{db}\"\npassword_file = \"{}\"\nschedule = \"*/2 * * * * *\"\nretries = 0\n\n\
         [[sources]]\nname = \"badpg\"\nkind = \"postgres\"\nurl = \"${{BAD_PG_URL}}\"\nschedule = \"*/2 * * * * *\"\nretries = 0\n\n\
         [[sources]]\nname = \"badredis\"\nkind = \"redis\"\nurl = \"${{BAD_REDIS_URL}}\"\nschedule = \"*/2 * * * * *\"\nretries = 0\n\n\
         [[sources]]\nname = \"files\"\nkind = \"objects\"\nfrom = \"dir://{}\"\nschedule = \"*/2 * * * * *\"\nretries = 0\n",
        pg.port,
        pwfile.display(),
        files.display(),
    );
    let policy = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &sources,
    );
    let text = std::fs::read_to_string(&policy).unwrap().replace(
        "[defaults]",
        "index_key = \"${LIFEBOAT_INDEX_KEY}\"\n\n[defaults]",
    );
    std::fs::write(&policy, text).unwrap();
    let env = vec![
        (
            "BAD_PG_URL".to_string(),
            format!("postgres://{role}:{URL_CANARY}@127.0.0.1:{closed}/{db}"),
        ),
        (
            "BAD_REDIS_URL".to_string(),
            format!("redis://:{REDIS_CANARY}@127.0.0.1:{closed}"),
        ),
        ("LIFEBOAT_INDEX_KEY".to_string(), INDEX_CANARY.to_string()),
        ("HOOK_TOKEN".to_string(), HOOK_CANARY.to_string()),
        // Everything lifeboat logs, debug included, in the sidecar's JSON format.
        (
            "LIFEBOAT_LOG".to_string(),
            "debug,aws=warn,hyper=warn,h2=warn".to_string(),
        ),
    ];
    let child = start_agent(dir.path(), &policy, &env);
    wait_until("/healthz", 30, || {
        http_get(port, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    let mut metrics = String::new();
    wait_until(
        "a success of good and files, a failure of both bad ones",
        90,
        || {
            metrics = http_get(port, "/metrics").map(|x| x.1).unwrap_or_default();
            let at = |name, source| {
                metric(&metrics, name, &[("source", source), ("op", "backup")]).unwrap_or(0.0) > 0.0
            };
            at("lifeboat_last_success_timestamp_seconds", "good")
                && at("lifeboat_last_success_timestamp_seconds", "files")
                && at("lifeboat_last_failure_timestamp_seconds", "badpg")
                && at("lifeboat_last_failure_timestamp_seconds", "badredis")
        },
    );
    let (_, status) = http_get(port, "/status").unwrap();
    wait_until("failure notifications", 30, || {
        hooks.lock().unwrap().len() >= 2
    });
    let (code, log, _) = stop(child);
    assert_eq!(code, 0, "{log}");
    let notifications = serde_json::to_string(&*hooks.lock().unwrap()).unwrap();
    // The failures really went through the paths that handle the secrets.
    assert!(
        status.matches(":***@127.0.0.1").count() >= 2,
        "both failing URLs are shown, redacted: {status}"
    );
    assert!(notifications.contains("badredis"), "{notifications}");
    let r = lifeboat(
        dir.path(),
        &["list", "--policy", policy.to_str().unwrap()],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut places: Vec<(String, String)> = vec![
        ("agent log".into(), log),
        ("/status".into(), status),
        ("/metrics".into(), metrics),
        ("notifications".into(), notifications),
        ("list".into(), format!("{}{}", r.stdout, r.stderr)),
    ];
    for f in files_under(&dir.path().join("repo")) {
        places.push((
            f.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned(),
        ));
    }
    assert!(
        places.len() > 10,
        "the repository holds backups: {}",
        places.len()
    );
    for (place, text) in &places {
        for canary in [
            PG_CANARY,
            URL_CANARY,
            REDIS_CANARY,
            INDEX_CANARY,
            HOOK_CANARY,
        ] {
            assert!(
                !text.contains(canary),
                "{canary} appears in {place}:\n{text}"
            );
        }
    }
}
