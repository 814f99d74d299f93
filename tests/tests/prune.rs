//! Retention against a real repository: prune deletes exactly what the plan says, leaves no
//! orphans, keeps the newest verified and pinned backups, refuses a suspicious listing, respects
//! a held lease, and never robs a backup that is still running.

use std::path::{Path, PathBuf};

use lifeboat_tests::*;

struct Fx {
    dir: tempfile::TempDir,
    key: Key,
    policy: PathBuf,
}

fn setup(prefix: &str, retention: &str) -> Fx {
    let pg = postgres();
    let db = pg.create_db(prefix);
    pg.psql(
        &db,
        "create table t as select generate_series(1, 500) as id",
    );
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = pg.password_file(dir.path());
    let src = format!(
        "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nglobals = false\nretention = {{ {retention} }}\n",
        pg.url(&db),
        pwfile.display()
    );
    let policy = write_policy(dir.path(), "url = \"file://./repo\"", &key.recipient, &src);
    Fx { dir, key, policy }
}

impl Fx {
    fn run(&self, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--policy", self.policy.to_str().unwrap()]);
        lifeboat(self.dir.path(), &all, &[])
    }

    fn backups(&self, n: usize) -> Vec<String> {
        for _ in 0..n {
            let r = self.run(&["backup"]);
            assert_eq!(r.code, 0, "{}", r.stderr);
        }
        self.ids()
    }

    /// Backup ids, newest first.
    fn ids(&self) -> Vec<String> {
        let r = self.run(&["list", "--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        list.iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn backup_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.repo().join("backups/app-db"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.reverse();
        v
    }
}

#[test]
fn prune_deletes_exactly_the_plan_and_leaves_no_orphans() {
    let fx = setup("prplan", "keep_last = 2");
    let ids = fx.backups(4);
    assert_eq!(ids.len(), 4);

    let r = fx.run(&["prune", "--dry-run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plans: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let d = plans[0]["decisions"].as_array().unwrap();
    let keep: Vec<bool> = d.iter().map(|x| x["keep"].as_bool().unwrap()).collect();
    assert_eq!(keep, vec![true, true, false, false]);
    assert_eq!(d[0]["reasons"], serde_json::json!(["newest", "last 1"]));
    assert_eq!(d[3]["reasons"], serde_json::json!(["no rule keeps it"]));
    assert_eq!(fx.ids(), ids, "a dry run deletes nothing");

    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("delete {}", ids[3])),
        "{}",
        r.stderr
    );
    assert_eq!(fx.ids(), ids[..2].to_vec());
    // Two backups may start in the same second: compare as sets.
    let mut kept = ids[..2].to_vec();
    kept.sort();
    let mut dirs = fx.backup_dirs();
    dirs.sort();
    assert_eq!(
        dirs, kept,
        "no objects or directories of deleted backups remain"
    );
    fn empty_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        if entries.is_empty() {
            out.push(dir.to_path_buf());
        }
        for e in entries.iter().filter(|e| e.path().is_dir()) {
            empty_dirs(&e.path(), out);
        }
    }
    let mut empty = Vec::new();
    empty_dirs(&fx.repo(), &mut empty);
    assert!(empty.is_empty(), "empty directories left: {empty:?}");
    let r = fx.run(&["check", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !fx.repo().join("locks/prune-app-db.json").exists(),
        "the lease is released"
    );
}

#[test]
fn the_newest_verified_and_pinned_backups_are_kept() {
    let fx = setup("prkeep", "keep_last = 1");
    let ids = fx.backups(4);
    let (oldest, second_oldest) = (&ids[3], &ids[2]);
    let r = verifier(
        fx.dir.path(),
        &[
            "verify",
            "--policy",
            fx.policy.to_str().unwrap(),
            "--backup",
            oldest,
            "--identity",
            fx.key.identity.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = fx.run(&["pin", "--source", "app-db", "--backup", second_oldest]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("keep   {oldest}")) && r.stderr.contains("newest verified"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("pinned"), "{}", r.stderr);
    assert_eq!(
        fx.ids(),
        vec![ids[0].clone(), second_oldest.clone(), oldest.clone()]
    );

    let r = fx.run(&["unpin", "--source", "app-db", "--backup", second_oldest]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fx.run(&["prune"]).code, 0);
    assert_eq!(fx.ids(), vec![ids[0].clone(), oldest.clone()]);
}

#[test]
fn a_listing_that_lost_every_backup_stops_the_prune() {
    let fx = setup("prempty", "keep_last = 2");
    let ids = fx.backups(2);
    assert_eq!(fx.run(&["prune"]).code, 0, "records that 2 backups exist");
    for id in &ids {
        std::fs::remove_file(
            fx.repo()
                .join("backups/app-db")
                .join(id)
                .join("manifest.json"),
        )
        .unwrap();
    }
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("the listing shows no backups, but the last prune saw 2; refusing"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.backup_dirs().len(), 2, "nothing deleted");
}

fn write_lease(repo: &Path, expires: &str) {
    std::fs::create_dir_all(repo.join("locks")).unwrap();
    std::fs::write(
        repo.join("locks/prune-app-db.json"),
        format!("{{\"owner\":\"other-host pid 7\",\"purpose\":\"prune\",\"token\":\"t\",\"acquired_at\":\"2026-01-01T00:00:00Z\",\"expires_at\":\"{expires}\"}}"),
    )
    .unwrap();
}

#[test]
fn a_held_lease_is_respected_and_an_expired_one_taken_over() {
    let fx = setup("prlease", "keep_last = 1");
    fx.backups(2);
    write_lease(&fx.repo(), "2999-01-01T00:00:00Z");
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 11, "{}", r.stderr);
    assert!(
        r.stderr.contains("held by other-host pid 7"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.ids().len(), 2);
    // The dry run needs no lease.
    assert_eq!(fx.run(&["prune", "--dry-run"]).code, 0);

    write_lease(&fx.repo(), "2020-01-01T00:00:00Z");
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fx.ids().len(), 1);
}

#[test]
fn a_running_backup_is_never_robbed_but_old_leftovers_are_swept() {
    let fx = setup("prrun", "keep_last = 5");
    fx.backups(1);
    let base = fx.repo().join("backups/app-db");
    // A backup in progress: objects, no manifest yet, started now.
    let now = chrono_now_id(0);
    std::fs::create_dir_all(base.join(&now)).unwrap();
    std::fs::write(base.join(&now).join("database.dump.zst.age"), b"partial").unwrap();
    std::fs::write(
        base.join(&now).join(".database.dump.zst.age.tmp-abcd1234"),
        b"in flight",
    )
    .unwrap();
    // A crashed run from two days ago, with a temp file left behind.
    let old = chrono_now_id(2 * 24 * 3600);
    std::fs::create_dir_all(base.join(&old)).unwrap();
    std::fs::write(base.join(&old).join("database.dump.zst.age"), b"junk").unwrap();
    let stale_tmp = base.join(&old).join(".globals.sql.zst.age.tmp-ffff0000");
    std::fs::write(&stale_tmp, b"junk").unwrap();
    std::process::Command::new("touch")
        .args(["-d", "3 days ago"])
        .arg(&stale_tmp)
        .status()
        .unwrap();

    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        base.join(&now).join("database.dump.zst.age").exists(),
        "the running backup's object stays"
    );
    assert!(
        base.join(&now)
            .join(".database.dump.zst.age.tmp-abcd1234")
            .exists(),
        "its upload in flight stays"
    );
    assert!(
        !base.join(&old).join("database.dump.zst.age").exists(),
        "the crashed run is swept: {}",
        r.stderr
    );
    assert!(
        !stale_tmp.exists(),
        "the stale temp file is aborted: {}",
        r.stderr
    );
    assert_eq!(fx.ids().len(), 1);
}

fn chrono_now_id(seconds_ago: u64) -> String {
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("{seconds_ago} seconds ago"),
            "+%Y%m%dT%H%M%SZ",
        ])
        .output()
        .unwrap();
    format!("{}-abcdef", String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn object_locked_backups_are_kept_and_cannot_be_deleted_without_bypass() {
    let pg = postgres();
    let s3 = s3();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bucket = rt.block_on(s3.create_locked_bucket());
    let db = pg.create_db("prlock");
    pg.psql(
        &db,
        "create table t as select generate_series(1, 100) as id",
    );
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = pg.password_file(dir.path());
    let src = format!(
        "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\nglobals = false\nretention = {{ keep_last = 1 }}\n",
        pg.url(&db),
        pwfile.display()
    );
    let repo = format!(
        "url = \"s3://{bucket}/p\"\nendpoint = \"{}\"\nobject_lock = {{ mode = \"governance\", days = 1 }}",
        s3.endpoint
    );
    let policy = write_policy(dir.path(), &repo, &key.recipient, &src);
    let p = policy.to_str().unwrap();
    let env = s3.env();
    for _ in 0..2 {
        let r = lifeboat(dir.path(), &["backup", "--policy", p], &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let r = lifeboat(dir.path(), &["list", "--policy", p, "--json"], &env);
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let oldest = list[1]["id"].as_str().unwrap().to_string();
    let manifest = format!("p/backups/app-db/{oldest}/manifest.json");

    let head = rt.block_on(async {
        s3.client()
            .await
            .head_object()
            .bucket(&bucket)
            .key(&manifest)
            .send()
            .await
            .unwrap()
    });
    assert_eq!(
        head.object_lock_mode().map(|m| m.as_str()),
        Some("GOVERNANCE")
    );
    let until = head.object_lock_retain_until_date().unwrap().secs();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        until > now + 23 * 3600,
        "locked for a day: {until} vs {now}"
    );

    let r = lifeboat(
        dir.path(),
        &["prune", "--policy", p, "--dry-run", "--json"],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plans: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let d = &plans[0]["decisions"][1];
    assert_eq!(d["keep"], true, "{d}");
    assert!(
        d["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("object lock until"),
        "{d}"
    );
    let r = lifeboat(dir.path(), &["prune", "--policy", p], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = lifeboat(dir.path(), &["list", "--policy", p, "--json"], &env);
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(list.len(), 2, "the locked backup stays");

    // check compares the bucket's configuration with the policy.
    let r = lifeboat(dir.path(), &["check", "--policy", p], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let unlocked = write_policy(
        dir.path(),
        &format!("url = \"s3://{bucket}/p\"\nendpoint = \"{}\"", s3.endpoint),
        &key.recipient,
        &src,
    );
    let r = lifeboat(
        dir.path(),
        &["check", "--policy", unlocked.to_str().unwrap()],
        &env,
    );
    assert!(
        r.stderr
            .contains("has Object Lock enabled but the policy sets no object_lock"),
        "{}",
        r.stderr
    );

    // Even with storage rights, the locked version cannot be deleted without the bypass.
    let denied = rt.block_on(async {
        let c = s3.client().await;
        let versions = c
            .list_object_versions()
            .bucket(&bucket)
            .prefix(&manifest)
            .send()
            .await
            .unwrap();
        let version = versions.versions()[0].version_id().unwrap().to_string();
        c.delete_object()
            .bucket(&bucket)
            .key(&manifest)
            .version_id(version)
            .send()
            .await
    });
    assert!(
        denied.is_err(),
        "a governance-locked version is deleted only with the bypass"
    );
}
