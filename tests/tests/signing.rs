//! Signed manifests and reports against a bucket writer who forges backups: no signature, another
//! key, a signature over other bytes, a signed manifest replayed under a new id, and an unsigned
//! "pass" report. `check`, `list`, `restore`, the verifier and `prune` refuse or ignore each one;
//! the break-glass flag says what it does. Key rotation with two trusted keys, backups from before
//! signing, and the secret key never showing in output.

use std::path::{Path, PathBuf};

use lifeboat_tests::*;

const SOURCE: &str = "cache";

struct Fx {
    dir: tempfile::TempDir,
    key: Key,
    redis: Redis,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path());
        let redis = Redis::start(&[]);
        fill_redis(&redis, None);
        Fx { dir, key, redis }
    }

    /// A policy on `./repo` backing up `redis` as `cache`, with `[signing]` lines if given.
    fn policy(&self, redis: &Redis, signing: Option<&str>, keep_last: u32) -> PathBuf {
        let mut b = PolicyBuilder::new(&self.key.recipient).source(
            SOURCE,
            "redis",
            &format!(
                "url = \"{}\"\nretention = {{ keep_last = {keep_last} }}",
                redis.url()
            ),
        );
        if let Some(s) = signing {
            b = b.signing(s);
        }
        b.write(self.dir.path())
    }

    fn run(&self, policy: &Path, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--policy", policy.to_str().unwrap()]);
        lifeboat(self.dir.path(), &all, &[])
    }

    /// `restore --dry-run` of `backup` (an id or `latest`): the plan only.
    fn plan(&self, policy: &Path, backup: &str, extra: &[&str]) -> Run {
        let to = self.dir.path().join("plan-target");
        let mut args = vec![
            "restore",
            "--source",
            SOURCE,
            "--backup",
            backup,
            "--to",
            to.to_str().unwrap(),
            "--dry-run",
        ];
        args.extend_from_slice(extra);
        self.run(policy, &args)
    }

    fn verify(&self, policy: &Path, args: &[&str]) -> Run {
        let mut all = vec![
            "verify",
            "--policy",
            policy.to_str().unwrap(),
            "--identity",
            self.key.identity.to_str().unwrap(),
            "--json",
        ];
        all.extend_from_slice(args);
        verifier(self.dir.path(), &all, &[])
    }

    /// Takes a backup and returns its id.
    fn backup(&self, policy: &Path) -> String {
        let before = self.ids_on_disk();
        let r = self.run(policy, &["backup", "--json"]);
        assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
        let mut new: Vec<String> = self
            .ids_on_disk()
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        assert_eq!(new.len(), 1, "one new backup");
        // Ids sort by the second they were taken in: the next one starts in a later second.
        std::thread::sleep(std::time::Duration::from_millis(1000));
        new.pop().unwrap()
    }

    /// Backup ids on disk, oldest first (signed or not).
    fn ids_on_disk(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.dir.path().join("repo/backups/cache"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    fn backup_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("repo/backups/cache").join(id)
    }

    fn list(&self, policy: &Path) -> (Vec<serde_json::Value>, String) {
        let r = self.run(policy, &["list", "--json"]);
        assert_eq!(r.code, 0, "list failed: {}", r.stderr);
        (serde_json::from_str(&r.stdout).unwrap(), r.stderr)
    }
}

fn ids(list: &[serde_json::Value]) -> Vec<&str> {
    list.iter().map(|b| b["id"].as_str().unwrap()).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn forged_backups_are_refused_everywhere_and_never_move_prune() {
    let fx = Fx::new();
    let writer_key = signing_keygen(fx.dir.path(), "writer.key");
    let writer = fx.policy(&fx.redis, Some(&writer_key.signs(&[&writer_key.public])), 2);
    let b1 = fx.backup(&writer);
    let b2 = fx.backup(&writer);
    assert!(fx.backup_dir(&b2).join("manifest.json.minisig").exists());

    // The stock tool checks a manifest with the public key alone, and names what was signed.
    let out = std::process::Command::new("minisign")
        .args(["-V", "-P", &writer_key.public, "-m"])
        .arg(fx.backup_dir(&b2).join("manifest.json"))
        .output()
        .expect("minisign (scripts/install-deps.sh installs it)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "minisign -V: {said}");
    assert!(
        said.contains(&format!("lifeboat backups/cache/{b2}/manifest.json")),
        "{said}"
    );

    // Someone else who can write to the bucket and knows the recipient backs up another server.
    let other = Redis::start(&[]);
    redis::cmd("SET")
        .arg("planted")
        .arg(1)
        .query::<()>(&mut other.conn(0, None))
        .unwrap();
    let forger = fx.policy(&other, None, 100);
    let unsigned = fx.backup(&forger);
    let forger_key = signing_keygen(fx.dir.path(), "forger.key");
    let forger_signed = fx.policy(&other, Some(&forger_key.signs(&[&forger_key.public])), 100);
    let other_key = fx.backup(&forger_signed);
    let other_bytes = fx.backup(&forger);
    std::fs::copy(
        fx.backup_dir(&b2).join("manifest.json.minisig"),
        fx.backup_dir(&other_bytes).join("manifest.json.minisig"),
    )
    .unwrap();
    let replayed = "20991231T000000Z-fffff0".to_string();
    copy_dir(&fx.backup_dir(&b1), &fx.backup_dir(&replayed));
    // A "pass" report for b1 that nobody trusted signed.
    let report_dir = fx.dir.path().join("repo/verifications/cache").join(&b1);
    std::fs::create_dir_all(&report_dir).unwrap();
    std::fs::write(
        report_dir.join("20991231T000000Z-aaaaaa.json"),
        format!(r#"{{"format":1,"verify_id":"20991231T000000Z-aaaaaa","source":"cache","backup_id":"{b1}","result":"pass"}}"#),
    )
    .unwrap();
    let forged = [
        (&unsigned, "is not signed"),
        (&other_key, "which is not in signing.trusted"),
        (&other_bytes, "does not match its bytes"),
        (&replayed, "moved or replayed"),
    ];

    // check: exit 13, naming every forged manifest and why, and the report.
    let r = fx.run(&writer, &["check", "--json"]);
    assert_eq!(r.code, 13, "check: {}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    for (id, why) in forged {
        let key = format!("backups/cache/{id}/manifest.json");
        assert!(
            problems
                .iter()
                .any(|p| p["object"] == key && p["detail"].as_str().unwrap().contains(why)),
            "check does not name {key} ({why}): {problems:?}"
        );
    }
    assert!(
        problems.iter().any(|p| p["object"]
            .as_str()
            .unwrap()
            .ends_with("20991231T000000Z-aaaaaa.json")),
        "{problems:?}"
    );
    assert_eq!(report["backups"], 2, "only the two signed backups count");

    // list: only the signed backups, marked; the forged ones and the report are warned about.
    let (list, warnings) = fx.list(&writer);
    assert_eq!(ids(&list), vec![b2.as_str(), b1.as_str()]);
    assert_eq!(list[0]["seal"]["status"], "signed");
    assert_eq!(
        list[1]["verified"], false,
        "a forged report counts for nothing"
    );
    for (id, _) in forged {
        assert!(
            warnings.contains(id.as_str()),
            "list does not warn of {id}: {warnings}"
        );
    }
    let human = fx.run(&writer, &["list"]);
    assert!(human.stdout.contains("SIGNED") && human.stdout.contains("signed"));

    // restore: each forged backup exits 13 and writes nothing; latest is the newest signed one.
    for (id, why) in forged {
        let to = fx.dir.path().join(format!("restore-{id}"));
        let r = fx.run(
            &writer,
            &[
                "restore",
                "--source",
                SOURCE,
                "--backup",
                id,
                "--to",
                to.to_str().unwrap(),
                "--identity",
                fx.key.identity.to_str().unwrap(),
            ],
        );
        assert_eq!(r.code, 13, "restore of forged {id}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{}", r.stderr);
        assert!(!to.join("dump.rdb").exists());
    }
    let r = fx.plan(&writer, "latest", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plan: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(plan["backup"]["id"], b2.as_str());
    assert_eq!(plan["seal"]["status"], "signed");

    // Break glass: offered, and the plan says in words that nobody vouches for it.
    let r = fx.plan(&writer, "latest", &["--allow-unsigned"]);
    assert_eq!(
        r.code, 2,
        "break glass never picks the newest for you: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("--allow-unsigned needs --backup ID"),
        "{}",
        r.stderr
    );
    let r = fx.plan(&writer, &unsigned, &["--allow-unsigned"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("NO, restoring only because of --allow-unsigned"),
        "{}",
        r.stderr
    );

    // The verifier: a forged backup is integrity damage; latest verifies the newest signed one.
    let v = fx.verify(&writer, &["--backup", &other_key]);
    assert_eq!(v.code, 13, "{}{}", v.stdout, v.stderr);
    let v = fx.verify(&writer, &[]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains(&b2), "{}", v.stdout);
    let (list, _) = fx.list(&writer);
    assert_eq!(
        list[0]["verified"], true,
        "the verifier's own report is signed"
    );

    // A copy carries the signed backups with their signatures, and none of the forged ones.
    let with_copy = PolicyBuilder::new(&fx.key.recipient)
        .source(
            SOURCE,
            "redis",
            &format!(
                "url = \"{}\"\nretention = {{ keep_last = 2 }}",
                fx.redis.url()
            ),
        )
        .signing(&writer_key.signs(&[&writer_key.public]))
        .copy("dr", "url = \"file://./copy\"")
        .write(fx.dir.path());
    let r = fx.run(&with_copy, &["copy", "--json"]);
    assert_eq!(r.code, 0, "copy: {}", r.stderr);
    let r = fx.run(&with_copy, &["list", "--json", "--repository", "dr"]);
    assert_eq!(r.code, 0, "list at the copy: {}", r.stderr);
    let at_copy: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(ids(&at_copy), vec![b2.as_str(), b1.as_str()]);
    assert!(at_copy.iter().all(|b| b["seal"]["status"] == "signed"));
    assert_eq!(at_copy[0]["verified"], true, "the signed report came along");
    let copied = files_under(&fx.dir.path().join("copy"));
    for (id, _) in forged {
        assert!(
            !copied
                .iter()
                .any(|f| f.to_string_lossy().contains(id.as_str())),
            "the copy holds forged {id}"
        );
    }
    assert!(
        !copied
            .iter()
            .any(|f| f.to_string_lossy().contains("20991231T000000Z-aaaaaa")),
        "the copy holds the forged report"
    );

    // prune (keep_last = 2): four newer forged manifests must not push the real ones out.
    let r = fx.run(&writer, &["prune", "--json"]);
    assert_eq!(r.code, 0, "prune: {}", r.stderr);
    for id in [&b1, &b2, &unsigned, &other_key, &other_bytes, &replayed] {
        assert!(
            fx.backup_dir(id).join("manifest.json").exists(),
            "prune deleted {id}: {}",
            r.stdout
        );
    }
}

#[test]
fn rotation_keeps_old_backups_trusted_and_pre_signing_backups_stay_restorable_marked() {
    let fx = Fx::new();
    let unsigned_policy = fx.policy(&fx.redis, None, 10);
    let b0 = fx.backup(&unsigned_policy);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let cut = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let k1 = signing_keygen(fx.dir.path(), "k1.key");
    let p1 = fx.policy(
        &fx.redis,
        Some(&format!(
            "{}\nunsigned_before = \"{cut}\"",
            k1.signs(&[&k1.public])
        )),
        10,
    );
    let b1 = fx.backup(&p1);
    // Rotation: the new key signs, both are trusted.
    let k2 = signing_keygen(fx.dir.path(), "k2.key");
    let both = format!(
        "{}\nunsigned_before = \"{cut}\"",
        k2.signs(&[&k1.public, &k2.public])
    );
    let p2 = fx.policy(&fx.redis, Some(&both), 10);
    let b2 = fx.backup(&p2);

    let (list, warnings) = fx.list(&p2);
    assert_eq!(
        ids(&list),
        vec![b2.as_str(), b1.as_str(), b0.as_str()],
        "{warnings}"
    );
    let key_of = |v: &serde_json::Value| v["seal"]["key"].as_str().unwrap().to_string();
    assert_ne!(key_of(&list[0]), key_of(&list[1]), "signed by k2 and k1");
    assert_eq!(list[2]["seal"]["status"], "legacy");
    let r = fx.run(&p2, &["check"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("backups/cache/{b0}/manifest.json is unsigned")),
        "check lists the backups from before signing: {}",
        r.stderr
    );
    let v = fx.verify(&p2, &["--backup", &b1]);
    assert_eq!(
        v.code, 0,
        "a backup signed by the old key verifies: {}",
        v.stderr
    );
    let r = fx.plan(&p2, &b0, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("NO: stored before signing.unsigned_before"),
        "{}",
        r.stderr
    );

    // An unsigned backup written after the cut is not "from before signing".
    let late = fx.backup(&unsigned_policy);
    let r = fx.run(&p2, &["check", "--json"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r
        .stdout
        .contains(&format!("backups/cache/{late}/manifest.json")));

    // The old key retired: what only it signed is refused.
    let p3 = fx.policy(&fx.redis, Some(&k2.signs(&[&k2.public])), 10);
    let (list, _) = fx.list(&p3);
    assert_eq!(ids(&list), vec![b2.as_str()]);
}

#[test]
fn a_writer_without_a_trusted_key_stops_before_storing_and_the_key_never_shows() {
    let fx = Fx::new();
    let good = signing_keygen(fx.dir.path(), "good.key");
    let stranger = signing_keygen(fx.dir.path(), "stranger.key");
    let port = free_port();

    // Each misconfiguration: exit 12 naming the field, nothing stored.
    let cases = [
        (stranger.signs(&[&good.public]), "is not in signing.trusted"),
        (
            format!("trusted = [\"{}\"]", good.public),
            "signing.key_file is not",
        ),
        (
            format!(
                "key_file = \"{}/missing.key\"\ntrusted = [\"{}\"]",
                fx.dir.path().display(),
                good.public
            ),
            "cannot read it",
        ),
    ];
    let mut outputs = String::new();
    for (lines, says) in &cases {
        let p = fx.policy(&fx.redis, Some(lines), 3);
        let r = fx.run(&p, &["backup"]);
        assert_eq!(r.code, 12, "{lines}: {}", r.stderr);
        assert!(
            r.stderr.contains(says) && r.stderr.contains("signing"),
            "{}",
            r.stderr
        );
        let v = fx.verify(&p, &[]);
        assert_eq!(v.code, 12, "the verifier signs its reports: {}", v.stderr);
        outputs += &(r.stderr + &v.stderr);
    }
    assert!(fx.ids_on_disk().is_empty(), "nothing was stored");
    let p = PolicyBuilder::new(&fx.key.recipient)
        .signing(&stranger.signs(&[&good.public]))
        .source(SOURCE, "redis", &format!("url = \"{}\"", fx.redis.url()))
        .write(fx.dir.path());
    let p = listening(&p, port);
    let r = fx.run(&p, &["agent"]);
    assert_eq!(r.code, 12, "the agent refuses to start: {}", r.stderr);
    outputs += &r.stderr;

    // A working agent, logging at debug: its logs, /status and /metrics never hold the key.
    let p = PolicyBuilder::new(&fx.key.recipient)
        .signing(&good.signs(&[&good.public]))
        .source(
            SOURCE,
            "redis",
            &format!("url = \"{}\"\nschedule = \"* * * * * *\"", fx.redis.url()),
        )
        .write(fx.dir.path());
    let p = listening(&p, port);
    let agent = std::process::Command::new(lifeboat_bin())
        .args(["agent", "--policy", p.to_str().unwrap()])
        .env("LIFEBOAT_LOG", "debug")
        .current_dir(fx.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while fx.ids_on_disk().is_empty()
        || !fx
            .backup_dir(fx.ids_on_disk().last().unwrap())
            .join("manifest.json")
            .exists()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no backup from the agent"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for path in ["/status", "/metrics"] {
        let (code, body) = http_get(port, path).expect("the agent answers");
        assert_eq!(code, 200);
        outputs += &body;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let out = agent.wait_with_output().unwrap();
    let logs =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(logs.contains("Signing with key"), "{logs}");
    outputs += &logs;
    let (list, _) = fx.list(&p);
    assert_eq!(list[0]["seal"]["status"], "signed");
    for secret in [&good.secret_line, &stranger.secret_line] {
        assert!(
            !outputs.contains(secret.as_str()),
            "a signing key was printed"
        );
    }
}

/// The one report `lifeboat-verifier verify --json` printed.
fn only_report(r: &Run) -> serde_json::Value {
    let reports: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    reports[0].clone()
}

/// Whether `report` has a note containing `text`.
fn noted(report: &serde_json::Value, text: &str) -> bool {
    report["notes"]
        .as_array()
        .is_some_and(|n| n.iter().any(|n| n.as_str().unwrap_or("").contains(text)))
}

/// Runs `backup --json` for `policy` and returns the id of the one backup of `source` it added.
fn backup_of(fx: &Fx, policy: &Path, source: &str) -> String {
    let listed = |fx: &Fx| -> Vec<String> {
        let r = fx.run(policy, &["list", "--json", "--source", source]);
        if r.code == 10 {
            return Vec::new(); // No repository yet: the first backup makes it.
        }
        assert_eq!(r.code, 0, "list: {}", r.stderr);
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        ids(&list).into_iter().map(str::to_string).collect()
    };
    let before = listed(fx);
    let r = fx.run(policy, &["backup", "--json", "--source", source]);
    assert_eq!(r.code, 0, "backup: {}", r.stderr);
    let new: Vec<String> = listed(fx)
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert_eq!(new.len(), 1, "one new backup of {source}: {new:?}");
    std::thread::sleep(std::time::Duration::from_millis(1000));
    new.into_iter().next().unwrap()
}

#[test]
fn a_backup_taken_from_another_system_is_marked_fails_verification_and_the_plan_says_so() {
    let fx = Fx::new();
    let pg = postgres();
    let (a, b) = (pg.create_db("origin_a"), pg.create_db("origin_b"));
    for db in [&a, &b] {
        pg.psql(db, "create table t as select generate_series(1, 100) as i");
    }
    let password = pg.password_file(fx.dir.path());
    let app = |db: &str, extra: &str| {
        PolicyBuilder::new(&fx.key.recipient)
            .source(
                "app",
                "postgres",
                &format!(
                    "url = \"{}\"\npassword_file = \"{}\"\nglobals = false\n{extra}",
                    pg.url(db),
                    password.display()
                ),
            )
            .write(fx.dir.path())
    };
    let (on_a, on_b) = (app(&a, ""), app(&b, ""));
    let a1 = backup_of(&fx, &on_a, "app");
    let a2 = backup_of(&fx, &on_a, "app");
    // A second policy reusing the source name (or staging pointed at production's prefix).
    let b1 = backup_of(&fx, &on_b, "app");
    let system = pg.psql(
        "postgres",
        "select system_identifier from pg_control_system()",
    );

    let r = fx.run(&on_a, &["list", "--json", "--source", "app"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let by_id = |id: &str| list.iter().find(|e| e["id"] == id).unwrap().clone();
    assert_eq!(
        by_id(&a1)["origin"]["identity"],
        format!("postgresql system {system} database {a}")
    );
    assert_eq!(by_id(&a1)["lineage"]["state"], "first");
    assert_eq!(by_id(&a2)["lineage"]["state"], "same");
    assert!(by_id(&a2)["origin_change"].is_null());
    let change = &by_id(&b1)["origin_change"];
    assert_eq!(change["previous"], a2.as_str());
    assert_eq!(
        change["from"],
        format!("postgresql system {system} database {a}")
    );
    assert_eq!(
        change["to"],
        format!("postgresql system {system} database {b}")
    );
    assert!(change["moved"].is_null());
    // On a terminal's table: an ORIGIN column marks it, and a warning says it in words.
    let r = fx.run(&on_a, &["list", "--source", "app"]);
    assert!(
        r.stdout.lines().next().unwrap().contains("ORIGIN"),
        "{}",
        r.stdout
    );
    let row = r.stdout.lines().find(|l| l.contains(&b1)).unwrap();
    assert!(row.contains(" changed"), "{row}");
    let row = r.stdout.lines().find(|l| l.contains(&a2)).unwrap();
    assert!(!row.contains("changed"), "{row}");
    assert!(
        r.stderr.contains(&format!("backup {b1} of app was taken from postgresql system {system} database {b}, but the backup before it ({a2})"))
            && r.stderr.contains("RUNBOOK.md#source-changed"),
        "{}",
        r.stderr
    );

    // The verifier restores it (the dump is sound) but fails it on the identity.
    let r = fx.verify(&on_a, &["--source", "app", "--backup", &b1]);
    assert_eq!(r.code, 4, "verify of the changed backup: {}", r.stderr);
    let report = only_report(&r);
    let checks = report["checks"].as_array().unwrap();
    let identity = checks
        .iter()
        .find(|c| c["name"] == "source identity")
        .expect("a source identity check");
    assert_eq!(identity["passed"], false);
    assert!(identity["found"]
        .as_str()
        .unwrap()
        .contains(&format!("database {b}")));
    assert!(
        checks
            .iter()
            .filter(|c| c["name"] != "source identity")
            .all(|c| c["passed"] == true),
        "only the identity fails: {checks:?}"
    );
    let r = fx.verify(&on_a, &["--source", "app", "--backup", &a2]);
    assert_eq!(
        r.code, 0,
        "verify of a backup that carries on: {}",
        r.stderr
    );

    // The restore plan says it in words before anything is applied.
    let target = pg.create_db("origin_target");
    let r = lifeboat(
        fx.dir.path(),
        &[
            "restore",
            "--policy",
            on_a.to_str().unwrap(),
            "--source",
            "app",
            "--backup",
            &b1,
            "--to",
            &pg.url(&target),
            "--dry-run",
        ],
        &[("PGPASSWORD".into(), pg.password.clone())],
    );
    assert_eq!(r.code, 0, "plan: {}", r.stderr);
    assert!(
        r.stderr.contains(&format!("origin   WARNING: taken from postgresql system {system} database {b}, but the backup before it ({a2}) from postgresql system {system} database {a}")),
        "{}",
        r.stderr
    );

    // The source moved: with moved_at between the two backups the change is expected.
    let started = by_id(&b1)["started_at"].as_str().unwrap().to_string();
    let moved = app(&b, &format!("moved_at = \"{started}\""));
    let r = fx.run(&moved, &["list", "--json", "--source", "app"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let change = &list.iter().find(|e| e["id"] == b1.as_str()).unwrap()["origin_change"];
    assert!(change["moved"].is_string(), "{change}");
    assert!(
        !r.stderr.contains("RUNBOOK.md#source-changed"),
        "{}",
        r.stderr
    );
    let r = fx.verify(&moved, &["--source", "app", "--backup", &b1]);
    assert_eq!(r.code, 0, "verify of an expected move: {}", r.stderr);
    let report = only_report(&r);
    assert!(noted(&report, "the source moved at"), "{report}");
    // The next backup carries on from the new system.
    let b2 = backup_of(&fx, &moved, "app");
    let r = fx.run(&moved, &["list", "--json", "--source", "app"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let entry = list.iter().find(|e| e["id"] == b2.as_str()).unwrap();
    assert_eq!(entry["lineage"]["state"], "same", "{entry}");
}

#[test]
fn a_redis_backup_records_its_server_and_another_server_is_a_note_not_a_failure() {
    let fx = Fx::new();
    let policy = fx.policy(&fx.redis, None, 10);
    let r1 = fx.backup(&policy);
    let r2 = fx.backup(&policy);
    let (list, _) = fx.list(&policy);
    let origin = &list.iter().find(|e| e["id"] == r1.as_str()).unwrap()["origin"];
    assert_eq!(
        origin["identity"],
        format!("redis run {}", fx.redis.info("server", "run_id"))
    );
    assert!(
        origin["history"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(format!(
                "redis replication {}",
                fx.redis.info("replication", "master_replid")
            ))),
        "{origin}"
    );
    let second = list.iter().find(|e| e["id"] == r2.as_str()).unwrap();
    assert_eq!(second["lineage"]["state"], "same", "{second}");

    // Another server under the same source name: marked, and a note in the verification.
    let other = Redis::start(&[]);
    fill_redis(&other, None);
    let r3 = fx.backup(&fx.policy(&other, None, 10));
    let (list, stderr) = fx.list(&policy);
    let third = list.iter().find(|e| e["id"] == r3.as_str()).unwrap();
    assert_eq!(third["origin_change"]["previous"], r2.as_str(), "{third}");
    assert!(
        stderr.contains(&format!("backup {r3} of cache was taken from redis run")),
        "{stderr}"
    );
    let r = fx.verify(&policy, &["--backup", &r3]);
    assert_eq!(r.code, 0, "a Redis origin change is a note: {}", r.stderr);
    let report = only_report(&r);
    assert!(noted(&report, "replication history"), "{report}");
}
