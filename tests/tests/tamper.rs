//! Corruption and tamper, as a matrix: each damage to a stored backup, and each identity problem,
//! against `check --read-data` and `restore` (PostgreSQL into a new database, Redis into a live
//! server). Every one exits with its documented code and leaves the target untouched: the
//! database is not even created, the Redis server holds no key. (The verifier's own matrix is in
//! verifier.rs.)

use std::path::{Path, PathBuf};

use lifeboat_tests::*;

struct Case {
    name: &'static str,
    damage: fn(&Path, &Path),
    check: i32,
    restore: i32,
}

fn flip(_: &Path, obj: &Path) {
    let mut b = std::fs::read(obj).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x01;
    std::fs::write(obj, b).unwrap();
}

fn truncate(_: &Path, obj: &Path) {
    let b = std::fs::read(obj).unwrap();
    std::fs::write(obj, &b[..b.len() - 100]).unwrap();
}

fn append(_: &Path, obj: &Path) {
    let mut b = std::fs::read(obj).unwrap();
    b.extend_from_slice(b"trailing garbage");
    std::fs::write(obj, b).unwrap();
}

fn delete(_: &Path, obj: &Path) {
    std::fs::remove_file(obj).unwrap();
}

fn swap(other: &Path, obj: &Path) {
    std::fs::copy(other, obj).unwrap();
}

const CASES: &[Case] = &[
    Case {
        name: "one bit flipped",
        damage: flip,
        check: 13,
        restore: 13,
    },
    Case {
        name: "truncated by 100 bytes",
        damage: truncate,
        check: 13,
        restore: 13,
    },
    Case {
        name: "bytes appended",
        damage: append,
        check: 13,
        restore: 13,
    },
    Case {
        name: "object deleted",
        damage: delete,
        check: 13,
        restore: 13,
    },
    Case {
        name: "swapped with the other backup's",
        damage: swap,
        check: 13,
        restore: 13,
    },
];

struct Fx {
    dir: tempfile::TempDir,
    key: Key,
    policy: PathBuf,
    source: &'static str,
}

impl Fx {
    fn new(source: &'static str, sources: &str) -> Fx {
        Fx::in_repository(source, sources, "url = \"file://./repo\"")
    }

    fn in_repository(source: &'static str, sources: &str, repository: &str) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path());
        let policy = write_policy(dir.path(), repository, &key.recipient, sources);
        Fx {
            dir,
            key,
            policy,
            source,
        }
    }

    fn run(&self, args: &[&str], env: &[(String, String)]) -> Run {
        let mut all = args.to_vec();
        let p = self.policy.to_str().unwrap().to_string();
        all.extend(["--policy", &p]);
        lifeboat(self.dir.path(), &all, env)
    }

    fn backup(&self) -> String {
        assert_eq!(self.run(&["backup"], &[]).code, 0);
        let r = self.run(&["list", "--json", "--source", self.source], &[]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        list[0]["id"].as_str().unwrap().to_string()
    }

    fn object(&self, id: &str, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("repo/backups")
            .join(self.source)
            .join(id)
            .join(name)
    }

    /// Runs every case against backup `second` (restored from a pristine copy each time), with
    /// `restore(extra_args) -> (code, target untouched)`.
    fn matrix(
        &self,
        first: &str,
        second: &str,
        object: &str,
        restore: &dyn Fn(&[&str]) -> (i32, bool),
    ) {
        let pristine = std::fs::read(self.object(second, object)).unwrap();
        let id = self.key.identity.to_str().unwrap().to_string();
        for case in CASES {
            std::fs::write(self.object(second, object), &pristine).unwrap();
            (case.damage)(&self.object(first, object), &self.object(second, object));
            let r = self.run(&["check", "--read-data", "--source", self.source], &[]);
            assert_eq!(
                r.code, case.check,
                "{} {}: check: {}",
                self.source, case.name, r.stderr
            );
            assert!(
                r.stderr.contains(second),
                "{}: check names the backup: {}",
                case.name,
                r.stderr
            );
            let (code, untouched) = restore(&["--backup", second, "--identity", &id]);
            assert_eq!(code, case.restore, "{} {}: restore", self.source, case.name);
            assert!(
                untouched,
                "{} {}: the target was touched",
                self.source, case.name
            );
            eprintln!(
                "{} / {}: check {} restore {}, target untouched",
                self.source, case.name, case.check, code
            );
        }
        std::fs::write(self.object(second, object), &pristine).unwrap();

        // Identity problems: exit 12 before anything is applied.
        let stranger = tempfile::tempdir().unwrap();
        let other = keygen(stranger.path());
        let missing = stranger.path().join("no-such-identity.txt");
        for (what, file) in [
            (
                "another recipient's identity",
                other.identity.to_str().unwrap(),
            ),
            ("a missing identity file", missing.to_str().unwrap()),
        ] {
            let (code, untouched) = restore(&["--backup", second, "--identity", file]);
            assert_eq!(code, 12, "{} {what}", self.source);
            assert!(untouched, "{} {what}: the target was touched", self.source);
            eprintln!("{} / {what}: restore {code}, target untouched", self.source);
        }
        // And the pristine backup restores.
        let (code, _) = restore(&["--backup", second, "--identity", &id]);
        assert_eq!(code, 0, "{}: the undamaged backup restores", self.source);
    }
}

/// The matrix for a PostgreSQL source in `repository`: a database made by `create`, backed up,
/// changed by `change` and backed up again; every damage is done to the second backup's dump,
/// which must be stored in at least `min_stored` bytes.
fn postgres_matrix(create: &str, change: &str, repository: &str, min_stored: u64) {
    let pg = postgres();
    let db = pg.create_db("tamper");
    pg.psql(&db, create);
    let fx = Fx::in_repository(
        "app-db",
        &format!(
            "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
            pg.url(&db),
            pg.password_file(&tempfile::tempdir().unwrap().keep()).display()
        ),
        repository,
    );
    let first = fx.backup();
    pg.psql(&db, change);
    let second = fx.backup();
    let stored = std::fs::metadata(fx.object(&second, "database.dump.zst.age"))
        .unwrap()
        .len();
    assert!(stored >= min_stored, "{stored} bytes stored");
    let env = [("PGPASSWORD".to_string(), pg.password.clone())];
    let restore = |extra: &[&str]| {
        let target = format!("tamper_target_{}", suffix());
        let to = pg.url(&target);
        let mut args = vec!["restore", "--source", "app-db", "--to", &to];
        args.extend_from_slice(extra);
        let r = fx.run(&args, &env);
        let exists = pg.psql(
            "postgres",
            &format!("select count(*) from pg_database where datname = '{target}'"),
        );
        (r.code, exists == "0" || r.code == 0)
    };
    fx.matrix(&first, &second, "database.dump.zst.age", &restore);
}

#[test]
fn every_damage_and_identity_problem_is_caught_before_postgres_sees_a_byte() {
    postgres_matrix(
        "create table t as select g, md5(g::text) from generate_series(1, 20000) g",
        "insert into t select g, 'new' from generate_series(1, 10) g",
        "url = \"file://./repo\"",
        0,
    );
}

/// The same matrix for a part downloaded in ranges (about 10 MiB stored: three ranges of 4 MiB,
/// four at a time, as on S3).
#[test]
fn every_damage_to_a_part_downloaded_in_ranges_is_caught_before_postgres_sees_a_byte() {
    postgres_matrix(
        "create table t as select g, md5(random()::text) || md5(random()::text) as h from generate_series(1, 350000) g",
        "delete from t where g % 10 = 0",
        "url = \"file://./repo\"\ndownload_streams = 4",
        (8 << 20) + 1,
    );
}

#[test]
fn every_damage_and_identity_problem_is_caught_before_redis_sees_a_key() {
    let src = Redis::start(&[]);
    fill_redis(&src, None);
    let fx = Fx::new(
        "cache",
        &format!(
            "[[sources]]\nname = \"cache\"\nkind = \"redis\"\nurl = \"{}\"\n",
            src.url()
        ),
    );
    let first = fx.backup();
    let _: () = redis::cmd("SET")
        .arg("one-more")
        .arg("x")
        .query(&mut src.conn(0, None))
        .unwrap();
    let second = fx.backup();
    let restore = |extra: &[&str]| {
        let target = Redis::start(&[]);
        let to = target.url();
        let mut args = vec!["restore", "--source", "cache", "--to", &to];
        args.extend_from_slice(extra);
        let r = fx.run(&args, &[]);
        let keys: u64 = target.keyspace(None).values().map(|v| v.0).sum();
        (r.code, keys == 0 || r.code == 0)
    };
    fx.matrix(&first, &second, "dump.rdb.zst.age", &restore);
}

#[test]
fn a_manifest_naming_files_outside_its_backup_is_refused_and_the_rest_still_lists() {
    let pg = postgres();
    let db = pg.create_db("hostile");
    pg.psql(
        &db,
        "create table t as select g from generate_series(1, 100) g",
    );
    let fx = Fx::new(
        "app-db",
        &format!(
            "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
            pg.url(&db),
            pg.password_file(&tempfile::tempdir().unwrap().keep()).display()
        ),
    );
    let good = fx.backup();
    let bad = fx.backup();
    // A file outside the repository that a resolved `..` would reach.
    let secret = fx.dir.path().join("outside.txt");
    std::fs::write(&secret, "not a backup").unwrap();
    let path = fx.object(&bad, "manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["parts"][0]["name"] = "../../../../outside.txt".into();
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();

    let r = fx.run(&["check", "--read-data"], &[]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        r.stderr.contains("names an object outside its backup"),
        "{}",
        r.stderr
    );
    let r = fx.run(&["list", "--json"], &[]);
    assert_eq!(
        r.code, 0,
        "one damaged manifest does not hide the others: {}",
        r.stderr
    );
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], good.as_str());
    assert!(
        r.stderr.contains(&bad),
        "the damaged one is named: {}",
        r.stderr
    );
    let id = fx.key.identity.to_str().unwrap().to_string();
    let to = pg.url(&format!("hostile_{}", suffix()));
    let env = [("PGPASSWORD".to_string(), pg.password.clone())];
    let r = fx.run(
        &[
            "restore",
            "--source",
            "app-db",
            "--backup",
            &bad,
            "--to",
            &to,
            "--identity",
            &id,
        ],
        &env,
    );
    assert_eq!(r.code, 13, "{}", r.stderr);
    let r = fx.run(
        &[
            "restore",
            "--source",
            "app-db",
            "--to",
            &to,
            "--identity",
            &id,
        ],
        &env,
    );
    assert_eq!(r.code, 0, "latest skips the damaged backup: {}", r.stderr);
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "not a backup");
}
