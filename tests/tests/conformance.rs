//! The source conformance suite: every registered kind (`lifeboat::source::Kind::ALL`) against the
//! same promises, on real servers. For each kind: a backup publishes its manifest last; a failed
//! producer publishes nothing; restore refuses a target that holds data without `--yes` and
//! leaves it as it was; `check --read-data` finds a flipped byte in every object a manifest
//! names; the verifier fails a tampered backup and passes it once repaired. A new kind cannot
//! compile without a fixture here (`fixture` matches every kind).

use std::path::{Path, PathBuf};

use lifeboat::source::Kind;
use lifeboat_tests::*;

/// What a kind brings to the suite.
struct Fixture {
    /// The `[[sources]]` fields of a source that backs up.
    fields: String,
    /// The same source, with its producer made to fail.
    broken: String,
    /// A `--to` that holds data.
    target: String,
    /// Whether the target still holds exactly what it held.
    untouched: Box<dyn Fn() -> bool>,
    /// Environment for reaching the target (its password).
    env: Vec<(String, String)>,
    /// Names that differ from run to run (a database's random suffix), for snapshots.
    volatile: Vec<String>,
    /// Servers and directories the fixture keeps alive.
    _keep: Vec<Box<dyn std::any::Any>>,
}

fn fixture(kind: Kind, dir: &Path) -> Fixture {
    match kind {
        Kind::Postgres => {
            let pg = postgres();
            let db = pg.create_db("conf");
            pg.psql(
                &db,
                "create table t as select g, md5(g::text) from generate_series(1, 5000) g",
            );
            let target = pg.create_db("conf_target");
            let volatile = vec![target.clone()];
            pg.psql(
                &target,
                "create table keep_me (x int); insert into keep_me values (7)",
            );
            let pw = pg.password_file(dir).display().to_string();
            let closed = free_port();
            let url = pg.url(&target);
            Fixture {
                volatile,
                fields: format!("url = \"{}\"\npassword_file = \"{pw}\"", pg.url(&db)),
                broken: format!(
                    "url = \"postgres://postgres@127.0.0.1:{closed}/{db}\"\nretries = 0"
                ),
                untouched: Box::new(move || {
                    let p = postgres();
                    p.psql(
                        &target,
                        "select count(*) from pg_class where relnamespace = 'public'::regnamespace",
                    )
                    .trim()
                        == "1"
                        && p.psql(&target, "select x from keep_me").trim() == "7"
                }),
                target: url,
                env: vec![("PGPASSWORD".into(), pg.password.clone())],
                _keep: Vec::new(),
            }
        }
        Kind::PostgresPhysical => {
            let pg = postgres();
            let db = pg.create_db("conf_phys");
            pg.psql(
                &db,
                "create table t as select g, md5(g::text) from generate_series(1, 5000) g",
            );
            let pw = pg.password_file(dir).display().to_string();
            let closed = free_port();
            let target = dir.join("data-dir");
            std::fs::create_dir_all(&target).unwrap();
            std::fs::write(target.join("keep-me.txt"), "7\n").unwrap();
            let watched = target.clone();
            Fixture {
                volatile: Vec::new(),
                fields: format!(
                    "url = \"{}\"\npassword_file = \"{pw}\"\ncheckpoint = \"fast\"",
                    pg.url("postgres")
                ),
                broken: format!(
                    "url = \"postgres://postgres@127.0.0.1:{closed}/postgres\"\nretries = 0"
                ),
                target: target.display().to_string(),
                untouched: Box::new(move || {
                    files_under(&watched) == vec![watched.join("keep-me.txt")]
                        && std::fs::read_to_string(watched.join("keep-me.txt")).unwrap() == "7\n"
                }),
                env: Vec::new(),
                _keep: Vec::new(),
            }
        }
        Kind::Redis => {
            let src = Redis::start(&[]);
            fill_redis(&src, None);
            let target = Redis::start(&[]);
            let mut c = target.conn(0, None);
            let () = redis::cmd("SET")
                .arg("keep-me")
                .arg("7")
                .query(&mut c)
                .unwrap();
            let before = target.digest(None);
            let url = target.url();
            let closed = free_port();
            Fixture {
                volatile: Vec::new(),
                fields: format!("url = \"{}\"", src.url()),
                broken: format!("url = \"redis://127.0.0.1:{closed}\"\nretries = 0"),
                target: url,
                untouched: Box::new(move || target.digest(None) == before),
                env: Vec::new(),
                _keep: vec![Box::new(src)],
            }
        }
        Kind::Objects => {
            let src = dir.join("src");
            std::fs::create_dir_all(src.join("nested")).unwrap();
            for i in 0..20 {
                std::fs::write(src.join(format!("nested/f{i}.txt")), format!("file {i}\n"))
                    .unwrap();
            }
            std::fs::write(src.join("big.bin"), vec![7u8; 300_000]).unwrap();
            let target = dir.join("target");
            std::fs::create_dir_all(&target).unwrap();
            std::fs::write(target.join("keep-me.txt"), "7\n").unwrap();
            let watched = target.clone();
            Fixture {
                volatile: Vec::new(),
                fields: format!("from = \"dir://{}\"", src.display()),
                broken: format!(
                    "from = \"dir://{}\"\nretries = 0",
                    dir.join("no-such-dir").display()
                ),
                target: target.display().to_string(),
                untouched: Box::new(move || {
                    files_under(&watched) == vec![watched.join("keep-me.txt")]
                        && std::fs::read_to_string(watched.join("keep-me.txt")).unwrap() == "7\n"
                }),
                env: Vec::new(),
                _keep: Vec::new(),
            }
        }
    }
}

/// Backup ids of `src` in the repository under `dir`.
fn ids(dir: &Path, policy: &Path, env: &[(String, String)]) -> Vec<String> {
    let r = lifeboat(
        dir,
        &["list", "--json", "--policy", policy.to_str().unwrap()],
        env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    list.iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

fn flip(path: &Path) -> Vec<u8> {
    let pristine = std::fs::read(path).unwrap();
    let mut b = pristine.clone();
    let i = b.len() / 2;
    b[i] ^= 0x01;
    std::fs::write(path, b).unwrap();
    pristine
}

/// Replaces what differs between runs (the backup id, the temp dir, times, digests, sizes,
/// ports) with placeholders, so plans and messages can be compared with a snapshot.
struct Stable {
    id: String,
    dir: String,
    volatile: Vec<String>,
}

impl Stable {
    fn new(id: &str, dir: &Path, volatile: &[String]) -> Stable {
        Stable {
            id: id.to_string(),
            dir: dir.display().to_string(),
            volatile: volatile.to_vec(),
        }
    }

    fn text(&self, s: &str) -> String {
        let mut s = s.replace(&self.id, "[id]").replace(&self.dir, "[dir]");
        for v in &self.volatile {
            s = s.replace(v, "[name]");
        }
        // The plan's human line: "(3s ago, never verified, 104.1 KiB stored)".
        let s = s
            .split('\n')
            .map(|line| match (line.find(" ago, "), line.rfind(" stored)")) {
                (Some(a), Some(b)) if line.contains("  backup ") => {
                    let open = line[..a].rfind('(').unwrap_or(a);
                    let size = line[..b].rfind(", ").unwrap_or(b);
                    format!(
                        "{}([age] ago{}, [size] stored)",
                        &line[..open],
                        &line[a + 4..size]
                    )
                }
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut out = String::new();
        for word in s.split_inclusive(|c: char| !c.is_ascii_alphanumeric() && c != '-') {
            let core = word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-');
            let rest = &word[core.len()..];
            if core.len() >= 4 && core.chars().all(|c| c.is_ascii_digit()) {
                out.push_str("[n]");
            } else if core.len() == 64 && core.chars().all(|c| c.is_ascii_hexdigit()) {
                out.push_str("[sha256]");
            } else {
                out.push_str(core);
            }
            out.push_str(rest);
        }
        out
    }

    fn json(&self, v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    let volatile = k.starts_with("size")
                        || k == "source_version"
                        || k.ends_with("_at")
                        || k.ends_with("bytes")
                        || k.starts_with("sha256");
                    if volatile && !v.is_null() {
                        *v = serde_json::Value::String(format!("[{k}]"));
                    } else {
                        self.json(v);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| self.json(v)),
            serde_json::Value::String(s) => *s = self.text(s),
            _ => {}
        }
    }
}

fn conformance(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let fx = fixture(kind, dir.path());
    let mut env = index_key_env();
    env.extend(fx.env.iter().cloned());
    let builder = |fields: &str| {
        PolicyBuilder::new(&key.recipient)
            .index_key()
            .source("src", kind.name(), fields)
            .write(dir.path())
    };
    let policy = builder(&fx.fields);
    let p = policy.to_str().unwrap();
    let identity = key.identity.to_str().unwrap();
    let run = |args: &[&str]| lifeboat(dir.path(), args, &env);

    // A backup publishes its manifest last.
    let r = run(&["backup", "--policy", p]);
    assert_eq!(r.code, 0, "{kind}: backup: {}", r.stderr);
    let id = ids(dir.path(), &policy, &env).remove(0);
    let backup_dir = dir.path().join("repo/backups/src").join(&id);
    let mtime = |f: &PathBuf| std::fs::metadata(f).unwrap().modified().unwrap();
    let manifest = backup_dir.join("manifest.json");
    let objects: Vec<PathBuf> = files_under(&backup_dir)
        .into_iter()
        .filter(|f| *f != manifest)
        .collect();
    assert!(!objects.is_empty(), "{kind}: data objects");
    for o in &objects {
        assert!(
            mtime(o) <= mtime(&manifest),
            "{kind}: {} was written after the manifest",
            o.display()
        );
    }

    // A failed producer publishes nothing.
    let broken = builder(&fx.broken);
    let before = files_under(&dir.path().join("repo/backups"));
    let r = run(&["backup", "--policy", broken.to_str().unwrap()]);
    assert_ne!(r.code, 0, "{kind}: a broken source must fail: {}", r.stderr);
    assert_eq!(
        files_under(&dir.path().join("repo/backups")),
        before,
        "{kind}: a failed run left objects behind: {}",
        r.stderr
    );
    assert_eq!(ids(dir.path(), &policy, &env), vec![id.clone()], "{kind}");

    // Restore refuses a target that holds data, and leaves it as it was.
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            "--policy",
            p,
            "--source",
            "src",
            "--to",
            &fx.target,
            "--identity",
            identity,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let r = restore(&[]);
    assert_eq!(r.code, 14, "{kind}: restore into data: {}", r.stderr);
    assert!(r.stderr.contains("refusing"), "{kind}: {}", r.stderr);
    assert!((fx.untouched)(), "{kind}: the target was changed");
    let refusal = r.stderr.clone();

    // The plan a dry run prints, and the refusal's words, are the operator's contract.
    let r = restore(&["--dry-run", "--json"]);
    assert_eq!(r.code, 0, "{kind}: dry run: {}", r.stderr);
    let mut plan: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    // What the backup was taken from: a server's own ids, different on every run.
    assert!(
        plan["origin"]["identity"].is_string(),
        "{kind}: the plan names the backup's origin: {plan}"
    );
    plan["origin"] = "[origin]".into();
    let stable = Stable::new(&id, dir.path(), &fx.volatile);
    stable.json(&mut plan);
    insta::assert_snapshot!(
        format!("{kind}_restore_plan"),
        serde_json::to_string_pretty(&plan).unwrap()
    );
    insta::assert_snapshot!(format!("{kind}_restore_refusal"), stable.text(&refusal));

    // check --read-data finds a flipped byte in every object the manifest names.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let mut names: Vec<String> = m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    names.extend(m["fingerprint"]["name"].as_str().map(str::to_string));
    for name in &names {
        let object = backup_dir.join(name);
        let pristine = flip(&object);
        let r = run(&["check", "--read-data", "--policy", p]);
        assert_eq!(
            r.code, 13,
            "{kind}: check with {name} flipped: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains(&format!("backups/src/{id}/{name}")),
            "{kind}: check names {name}: {}",
            r.stderr
        );
        std::fs::write(&object, pristine).unwrap();
    }
    let r = run(&[
        "check",
        "--read-data",
        "--policy",
        p,
        "--identity",
        identity,
    ]);
    assert_eq!(
        r.code, 0,
        "{kind}: check of the repaired backup: {}",
        r.stderr
    );

    // The verifier fails a tampered backup, and passes it repaired.
    let verify = || {
        verifier(
            dir.path(),
            &["verify", "--policy", p, "--identity", identity],
            &env,
        )
    };
    let first = backup_dir.join(&names[0]);
    let pristine = flip(&first);
    let v = verify();
    assert_eq!(
        v.code, 13,
        "{kind}: verify tampered: {}{}",
        v.stdout, v.stderr
    );
    std::fs::write(&first, pristine).unwrap();
    let v = verify();
    assert_eq!(
        v.code, 0,
        "{kind}: verify repaired: {}{}",
        v.stdout, v.stderr
    );
    eprintln!(
        "{kind}: conforms ({} objects flipped one by one)",
        names.len()
    );
}

#[test]
fn every_kind_keeps_the_promises_of_a_source() {
    for kind in Kind::ALL {
        conformance(*kind);
    }
}
