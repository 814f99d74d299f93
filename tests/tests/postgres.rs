//! PostgreSQL backups end to end, against a real server, a real S3 server (moto) and the stock
//! age, zstd and pg_restore tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use lifeboat_tests::*;

fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{name}` is not installed: scripts/test.sh installs it (apt-get install {name})"
    );
}

/// What most tests start from: the shared cluster, a fresh database, a temp dir with a key made by
/// `lifeboat keygen`, and a file holding the database password.
struct Fx {
    pg: &'static Postgres,
    db: String,
    dir: tempfile::TempDir,
    key: Key,
    pwfile: PathBuf,
}

fn setup(prefix: &str) -> Fx {
    let pg = postgres();
    let db = pg.create_db(prefix);
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = pg.password_file(dir.path());
    Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    }
}

fn load_schema(pg: &Postgres, db: &str) {
    let sql =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/schema.sql"))
            .expect("fixtures/schema.sql");
    pg.psql(db, &sql);
}

/// `age -d -i KEY FILE | zstd -d | pg_restore -d DB`, with no lifeboat involved.
fn stock_restore(pg: &Postgres, key: &Path, object: &Path, db: &str) {
    require_tool("age");
    require_tool("zstd");
    let script = format!(
        "set -o pipefail; age -d -i '{}' '{}' | zstd -d -q | '{}' --exit-on-error --no-owner -h 127.0.0.1 -p {} -U postgres -d {db}",
        key.display(),
        object.display(),
        pg.bin.join("pg_restore").display(),
        pg.port
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PGPASSWORD", &pg.password)
        .output()
        .expect("run the stock restore");
    assert!(
        out.status.success(),
        "stock restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stock_decrypt(key: &Path, object: &Path) -> Vec<u8> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; age -d -i '{}' '{}'",
            key.display(),
            object.display()
        ))
        .output()
        .expect("age -d");
    assert!(
        out.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn pg_source(pg: &Postgres, db: &str, password_file: &Path, extra: &str) -> String {
    format!(
        "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n{extra}\n",
        pg.url(db),
        password_file.display()
    )
}

/// A policy backing up `db` as `app-db` into `./repo` under `dir`.
fn fs_policy(
    pg: &Postgres,
    db: &str,
    dir: &tempfile::TempDir,
    key: &Key,
    pwfile: &Path,
) -> PathBuf {
    write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &pg_source(pg, db, pwfile, ""),
    )
}

fn list_json(dir: &Path, policy: &Path, env: &[(String, String)]) -> Vec<serde_json::Value> {
    let r = lifeboat(
        dir,
        &["list", "--policy", policy.to_str().unwrap(), "--json"],
        env,
    );
    assert_eq!(r.code, 0, "list failed: {}", r.stderr);
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("list --json is not JSON ({e}): {}", r.stdout))
}

fn backup_dir(repo: &Path, source: &str, id: &str) -> PathBuf {
    repo.join("backups").join(source).join(id)
}

#[test]
fn fs_round_trip_restores_with_stock_tools_table_by_table() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("rt");
    load_schema(pg, &db);
    let policy = fs_policy(pg, &db, &dir, &key, &pwfile);
    let p = policy.to_str().unwrap();

    let r = lifeboat(dir.path(), &["policy", "check", p], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", p, "--source", "app-db"],
        &[],
    );
    assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
    assert!(
        !r.stderr.contains(&pg.password),
        "the password leaked into the output"
    );

    let list = list_json(dir.path(), &policy, &[]);
    assert_eq!(list.len(), 1);
    let b = &list[0];
    for field in [
        "id",
        "source",
        "kind",
        "started_at",
        "finished_at",
        "size_plain",
        "size_stored",
        "verified",
    ] {
        assert!(b.get(field).is_some(), "list --json lacks {field}: {b}");
    }
    assert_eq!(b["source"], "app-db");
    assert_eq!(b["kind"], "postgres");
    assert_eq!(b["verified"], false);
    let id = b["id"].as_str().unwrap().to_string();
    assert!(b["size_stored"].as_u64().unwrap() < b["size_plain"].as_u64().unwrap());

    let r = lifeboat(dir.path(), &["check", "--policy", p, "--read-data"], &[]);
    assert_eq!(r.code, 0, "check failed: {}", r.stderr);
    assert!(
        r.stderr.contains("checked 1 backup(s), 3 object(s)"),
        "{}",
        r.stderr
    );

    // The manifest records what was stored, and names no secret.
    let bdir = backup_dir(&dir.path().join("repo"), "app-db", &id);
    let manifest_text = std::fs::read_to_string(bdir.join("manifest.json")).unwrap();
    assert!(!manifest_text.contains(&pg.password));
    let manifest: serde_json::Value = serde_json::from_str(&manifest_text).unwrap();
    assert_eq!(
        manifest["encryption"]["recipients"][0],
        key.recipient.as_str()
    );
    assert_eq!(manifest["parts"][0]["name"], "database.dump.zst.age");
    assert_eq!(manifest["parts"][1]["name"], "globals.sql.zst.age");

    // Restore with stock tools only, into a new database, and compare everything.
    let restored = pg.create_db("restored");
    stock_restore(
        pg,
        &key.identity,
        &bdir.join("database.dump.zst.age"),
        &restored,
    );
    let want = pg.digest(&db);
    let got = pg.digest(&restored);
    assert!(
        want.len() >= 8,
        "the digest covers the schema's tables: {want:?}"
    );
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "{k} differs after the stock restore");
    }
    assert_eq!(want, got);

    // Globals: roles without passwords.
    let globals = stock_decrypt(&key.identity, &bdir.join("globals.sql.zst.age"));
    let out = Command::new("zstd")
        .args(["-d", "-q", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&globals)?;
            c.wait_with_output()
        })
        .unwrap();
    let globals = String::from_utf8_lossy(&out.stdout);
    assert!(globals.contains("CREATE ROLE lifeboat_reader"), "{globals}");
    assert!(
        !globals.contains("PASSWORD 'SCRAM"),
        "role passwords are never stored"
    );

    // The fingerprint (decrypted with the stock CLI) holds the exact row count of every table.
    let fp: serde_json::Value = serde_json::from_slice(&stock_decrypt(
        &key.identity,
        &bdir.join("fingerprint.json.age"),
    ))
    .unwrap();
    assert!(fp["dump"]["error"].is_null(), "{fp}");
    let tables = fp["dump"]["tables"].as_array().unwrap();
    let mut checked = 0;
    for t in tables {
        let name = format!(
            "{}.{}",
            quote_ident(t["schema"].as_str().unwrap()),
            quote_ident(t["name"].as_str().unwrap())
        );
        let count: u64 = pg
            .psql(&db, &format!("select count(*) from {name}"))
            .parse()
            .unwrap();
        assert_eq!(t["rows"].as_u64(), Some(count), "row count of {name}");
        checked += 1;
    }
    let names: Vec<&str> = tables.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "accounts",
            "empty_table",
            "measurements_2025",
            "measurements_2026",
            "no_columns",
            "Tâble ✓"
        ],
        "every table with data: partition leaves, unicode names, no columns"
    );
    assert_eq!(checked, 6);
    assert_eq!(fp["dump"]["large_objects"], 2);
    assert_eq!(fp["objects"]["policies"], 1);
    assert_eq!(fp["objects"]["triggers"], 1);
    assert_eq!(fp["objects"]["materialized_views"], 1);
    let seqs = fp["dump"]["sequences"].as_array().unwrap();
    assert!(
        seqs.iter()
            .any(|s| s["name"] == "public.standalone_seq" && s["value"] == 101),
        "{seqs:?}"
    );

    // --json: one result per source. On a terminal, a live line says what was read and stored.
    let r = lifeboat(dir.path(), &["backup", "--policy", p, "--json"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let results: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(results.len(), 1, "{}", r.stdout);
    assert_eq!(results[0]["source"], "app-db");
    assert!(results[0]["backup_id"].as_str().is_some_and(|b| b != id));
    assert!(results[0]["size_stored"].as_u64().unwrap() > 0);
    let command = format!("{} backup --policy {p}", lifeboat_bin().display());
    let tty = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains("app-db: read ") && shown.contains(", stored "),
        "no progress line on a terminal: {shown}"
    );
    assert!(shown.contains("app-db: backup "), "{shown}");
}

/// `zstd -d` of `input`, by the stock CLI.
fn stock_unzstd(input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut c = Command::new("zstd")
        .args(["-d", "-q", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = c.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "zstd -d failed");
    out.stdout
}

#[test]
fn a_dump_is_stored_in_frames_that_start_where_large_tables_begin() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("frames");
    pg.psql(
        &db,
        "create table big_a as select g, md5(g::text) || md5((g * 7)::text) as t from generate_series(1, 100000) g; \
         create table small as select 1 as x; \
         create table big_b as select g, md5(g::text) || md5((g * 3)::text) as t from generate_series(1, 100000) g;",
    );
    let policy = fs_policy(pg, &db, &dir, &key, &pwfile);
    let p = policy.to_str().unwrap();
    let r = lifeboat(dir.path(), &["backup", "--policy", p], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = list_json(dir.path(), &policy, &[])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bdir = backup_dir(&dir.path().join("repo"), "app-db", &id);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bdir.join("manifest.json")).unwrap()).unwrap();
    let part = &manifest["parts"][0];
    assert_eq!(part["name"], "database.dump.zst.age");
    let seek = &part["seek"];
    let object = bdir.join("database.dump.zst.age");
    let stored = std::fs::read(&object).unwrap();
    let header_len = seek["header_len"].as_u64().unwrap() as usize;
    use sha2::{Digest, Sha256};
    assert_eq!(
        hex::encode(Sha256::digest(&stored[..header_len])),
        seek["header_sha256"].as_str().unwrap()
    );

    let fp: serde_json::Value = serde_json::from_slice(&stock_decrypt(
        &key.identity,
        &bdir.join("fingerprint.json.age"),
    ))
    .unwrap();
    let zst = stock_decrypt(&key.identity, &object);
    let dump = stock_unzstd(&zst);
    let toc_end = fp["dump"]["toc_end"].as_u64().unwrap() as usize;
    assert_eq!(&dump[..5], b"PGDMP");
    let mut blocks = std::collections::BTreeMap::new();
    for t in fp["dump"]["tables"].as_array().unwrap() {
        let [at, len] = [0, 1].map(|i| t["block"][i].as_u64().unwrap() as usize);
        assert!(at >= toc_end);
        assert_eq!(dump[at], 1, "{t}: a data block starts there");
        assert_eq!(
            &dump[at + len - 5..at + len],
            &[0, 0, 0, 0, 0],
            "{t}: it ends with its empty chunk"
        );
        blocks.insert(t["name"].as_str().unwrap().to_string(), at);
    }
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    // Each of the large tables is over 4 MiB: whichever comes second in the dump starts a frame.
    let frames = seek["frames"].as_array().unwrap();
    assert!(!frames.is_empty(), "{seek}");
    for f in frames {
        let [plain, at] = [0, 1].map(|i| f[i].as_u64().unwrap() as usize);
        assert!(blocks.values().any(|b| *b == plain), "{f} starts no table");
        let from_here = stock_unzstd(&zst[at..]);
        assert!(from_here[..] == dump[plain..], "frame {f} decodes alone");
    }
}

fn quote_ident(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

fn s3_round_trip(checksums: &str) {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("s3rt");
    let s3 = s3();
    let rt = rt();
    let bucket = rt.block_on(s3.create_bucket());
    // Enough incompressible data for several 5 MiB parts.
    pg.psql(
        &db,
        "create table big as select g as id, md5(g::text) || md5((g * 7)::text) as a, gen_random_uuid()::text as b from generate_series(1, 250000) g",
    );
    pg.psql(&db, "create extension if not exists pgcrypto");
    let repo = format!(
        "url = \"s3://{bucket}/team/lifeboat\"\nendpoint = \"{}\"\nchecksums = \"{checksums}\"\npart_size = \"5MiB\"\nparts_in_flight = 2",
        s3.endpoint
    );
    let policy = write_policy(
        dir.path(),
        &repo,
        &key.recipient,
        &pg_source(pg, &db, &pwfile, "globals = false"),
    );
    let p = policy.to_str().unwrap();
    let env = s3.env();

    let r = lifeboat(dir.path(), &["backup", "--policy", p], &env);
    assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
    let list = list_json(dir.path(), &policy, &env);
    assert_eq!(list.len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_string();
    let size_stored = list[0]["size_stored"].as_u64().unwrap();
    assert!(
        size_stored > 10 << 20,
        "several parts were needed: {size_stored}"
    );

    let keys = rt.block_on(s3.keys(&bucket, ""));
    let prefix = format!("team/lifeboat/backups/app-db/{id}/");
    for name in [
        "manifest.json",
        "database.dump.zst.age",
        "fingerprint.json.age",
    ] {
        assert!(
            keys.contains(&format!("{prefix}{name}")),
            "{name} missing in {keys:?}"
        );
    }
    assert!(keys.contains(&"team/lifeboat/lifeboat.json".to_string()));
    assert!(
        !keys.iter().any(|k| k.contains("probe/")),
        "the probe cleans up: {keys:?}"
    );
    assert!(rt.block_on(s3.pending_uploads(&bucket)).is_empty());

    let r = lifeboat(dir.path(), &["check", "--policy", p, "--read-data"], &env);
    assert_eq!(r.code, 0, "check failed: {}", r.stderr);

    // Download with a plain S3 client and restore with stock tools.
    let object = dir.path().join("dump.zst.age");
    let body = rt.block_on(async {
        let out = s3
            .client()
            .await
            .get_object()
            .bucket(&bucket)
            .key(format!("{prefix}database.dump.zst.age"))
            .send()
            .await
            .unwrap();
        out.body.collect().await.unwrap().into_bytes()
    });
    std::fs::write(&object, &body).unwrap();
    let restored = pg.create_db("s3restored");
    stock_restore(pg, &key.identity, &object, &restored);
    assert_eq!(pg.digest(&db), pg.digest(&restored));
}

#[test]
fn s3_round_trip_with_multipart_upload_and_no_checksum_headers() {
    s3_round_trip("when_required");
}

#[test]
fn s3_round_trip_with_sha256_checksums_on_every_part() {
    s3_round_trip("always");
}

/// A stand-in pg_dump: `--version` answers like the real one; otherwise it runs `body`, after
/// recording its arguments and the passfile's mode.
fn fake_bin(dir: &Path, version: &str, body: &str) -> PathBuf {
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) {version}'; exit 0; fi\n\
         echo \"$@\" > '{args}'\nstat -c %a \"$PGPASSFILE\" > '{mode}'\n{body}\n",
        args = dir.join("args").display(),
        mode = dir.join("passfile-mode").display(),
    );
    let path = bin.join("pg_dump");
    std::fs::write(&path, script).unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    bin
}

fn repo_files(repo: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(d: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    walk(repo, repo, &mut out);
    out.sort();
    out
}

#[test]
fn a_failing_producer_publishes_nothing_and_keeps_earlier_backups() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("fail");
    pg.psql(
        &db,
        "create table t as select generate_series(1, 1000) as id",
    );
    let good = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &pg_source(pg, &db, &pwfile, "globals = false"),
    );
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", good.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let before = repo_files(&dir.path().join("repo"));

    let cases = [
        (
            "head -c 300000 /dev/urandom; echo 'pg_dump: error: connection to server lost' >&2; exit 1",
            "pg_dump failed (exit status 1): pg_dump: error: connection to server lost",
        ),
        ("exit 0", "produced no data"),
        ("head -c 1000 /dev/urandom; kill -9 $$", "pg_dump failed (killed by signal 9"),
    ];
    for (body, want) in cases {
        let bin = fake_bin(dir.path(), "15.18", body);
        let extra = format!("globals = false\npg_bin_dir = \"{}\"", bin.display());
        let policy = write_policy(
            dir.path(),
            "url = \"file://./repo\"",
            &key.recipient,
            &pg_source(pg, &db, &pwfile, &extra),
        );
        let r = lifeboat(
            dir.path(),
            &["backup", "--policy", policy.to_str().unwrap()],
            &[],
        );
        assert_eq!(r.code, 1, "a failed producer exits 1: {}", r.stderr);
        assert!(
            r.stderr.contains("source app-db"),
            "the error names the source: {}",
            r.stderr
        );
        assert!(r.stderr.contains(want), "want {want:?} in: {}", r.stderr);
        assert!(r.stderr.contains("nothing was published"), "{}", r.stderr);
        assert_eq!(
            repo_files(&dir.path().join("repo")),
            before,
            "nothing new in the repository"
        );
        // The password reached pg_dump through a 0600 passfile, never its arguments.
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert!(!args.contains(&pg.password), "password in argv: {args}");
        assert!(args.contains("--snapshot="), "{args}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("passfile-mode"))
                .unwrap()
                .trim(),
            "600"
        );
    }
    let r = lifeboat(
        dir.path(),
        &["check", "--policy", good.to_str().unwrap(), "--read-data"],
        &[],
    );
    assert_eq!(r.code, 0, "the earlier backup is intact: {}", r.stderr);
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", good.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.code, 0, "the next run succeeds: {}", r.stderr);
    assert_eq!(list_json(dir.path(), &good, &[]).len(), 2);
}

#[test]
fn an_older_pg_dump_is_refused_with_what_to_install() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("old");
    let bin = fake_bin(dir.path(), "9.6.24", "exit 0");
    let extra = format!("globals = false\npg_bin_dir = \"{}\"", bin.display());
    let policy = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &pg_source(pg, &db, &pwfile, &extra),
    );
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", policy.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("is version 9, older than the server (15)")
            || r.stderr.contains("older than the server"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("postgresql-client-"), "{}", r.stderr);
}

fn pid_of(child: &std::process::Child) -> String {
    child.id().to_string()
}

#[test]
fn an_upload_stopped_half_way_leaves_no_manifest_and_no_open_upload() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("kill");
    let s3 = s3();
    let rt = rt();
    let env = s3.env();
    // A slow producer: 1 MiB of random bytes every 100 ms, for up to 12 s.
    let bin = fake_bin(
        dir.path(),
        "15.18",
        "i=0; while [ $i -lt 120 ]; do head -c 1048576 /dev/urandom || exit 1; sleep 0.1; i=$((i+1)); done",
    );
    for signal in ["TERM", "INT", "KILL"] {
        let bucket = rt.block_on(s3.create_bucket());
        let repo = format!(
            "url = \"s3://{bucket}/p\"\nendpoint = \"{}\"\npart_size = \"5MiB\"",
            s3.endpoint
        );
        let extra = format!("globals = false\npg_bin_dir = \"{}\"", bin.display());
        let policy = write_policy(
            dir.path(),
            &repo,
            &key.recipient,
            &pg_source(pg, &db, &pwfile, &extra),
        );
        let child = Command::new(lifeboat_bin())
            .args(["backup", "--policy", policy.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until a multipart upload is open: the backup is half-way.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while rt.block_on(s3.pending_uploads(&bucket)).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no multipart upload started"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid_of(&child))
            .status()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let keys = rt.block_on(s3.keys(&bucket, "p/backups/"));
        assert!(
            !keys.iter().any(|k| k.ends_with("manifest.json")),
            "{signal}: a manifest appeared: {keys:?}"
        );
        assert!(keys.is_empty(), "{signal}: objects left behind: {keys:?}");
        let pending = rt.block_on(s3.pending_uploads(&bucket));
        if signal == "KILL" {
            // kill -9 gives no chance to abort: the upload stays open, invisible, and check reports it.
            assert_eq!(pending.len(), 1, "{pending:?}");
            let r = lifeboat(
                dir.path(),
                &["check", "--policy", policy.to_str().unwrap()],
                &env,
            );
            assert_eq!(r.code, 0, "{}", r.stderr);
            assert!(
                r.stderr.contains("unfinished upload of backups/app-db/"),
                "{}",
                r.stderr
            );
        } else {
            assert_eq!(
                out.status.code(),
                Some(130),
                "{signal}: exit 130 on interruption: {stderr}"
            );
            assert!(
                pending.is_empty(),
                "{signal}: the multipart upload was aborted: {pending:?}"
            );
        }
    }
}

#[test]
fn check_read_data_catches_a_flipped_byte_and_a_truncation() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("flip");
    pg.psql(
        &db,
        "create table t as select g, md5(g::text) from generate_series(1, 20000) g",
    );
    let policy = fs_policy(pg, &db, &dir, &key, &pwfile);
    let p = policy.to_str().unwrap();
    assert_eq!(
        lifeboat(dir.path(), &["backup", "--policy", p], &[]).code,
        0
    );
    let id = list_json(dir.path(), &policy, &[])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let object = backup_dir(&dir.path().join("repo"), "app-db", &id).join("database.dump.zst.age");
    let original = std::fs::read(&object).unwrap();
    let id_arg = |k: &Path| k.to_str().unwrap().to_string();
    let r = verifier(
        dir.path(),
        &[
            "verify",
            "--policy",
            p,
            "--identity",
            &id_arg(&key.identity),
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("app-db {id}: verified")),
        "{}",
        r.stderr
    );
    let other = tempfile::tempdir().unwrap();
    let other_key = keygen(other.path());
    let r = verifier(
        dir.path(),
        &[
            "verify",
            "--policy",
            p,
            "--identity",
            &id_arg(&other_key.identity),
        ],
        &[],
    );
    assert_eq!(
        r.code, 12,
        "an identity for another recipient: {}",
        r.stderr
    );
    let r = verifier(
        dir.path(),
        &[
            "verify",
            "--policy",
            p,
            "--identity",
            "/nonexistent/key.txt",
        ],
        &[],
    );
    assert_eq!(r.code, 12, "a missing identity file: {}", r.stderr);

    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    std::fs::write(&object, &flipped).unwrap();
    let r = lifeboat(dir.path(), &["check", "--policy", p], &[]);
    assert_eq!(
        r.code, 0,
        "sizes alone cannot see a flipped byte: {}",
        r.stderr
    );
    let r = lifeboat(dir.path(), &["check", "--policy", p, "--read-data"], &[]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    let key_name = format!("backups/app-db/{id}/database.dump.zst.age");
    assert!(
        r.stderr.contains(&format!("{key_name}: SHA-256")),
        "names the object: {}",
        r.stderr
    );
    let r = lifeboat(
        dir.path(),
        &["check", "--policy", p, "--read-data", "--json"],
        &[],
    );
    assert_eq!(r.code, 13);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["problems"][0]["object"], key_name.as_str());
    let r = verifier(
        dir.path(),
        &[
            "verify",
            "--policy",
            p,
            "--identity",
            &id_arg(&key.identity),
        ],
        &[],
    );
    assert_eq!(
        r.code, 13,
        "the verifier catches the flipped byte: {}",
        r.stderr
    );
    assert!(r.stderr.contains(&key_name), "{}", r.stderr);

    std::fs::write(&object, &original[..original.len() - 100]).unwrap();
    let r = lifeboat(dir.path(), &["check", "--policy", p], &[]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("the manifest says"), "{}", r.stderr);

    std::fs::remove_file(&object).unwrap();
    let r = lifeboat(dir.path(), &["check", "--policy", p], &[]);
    assert_eq!(r.code, 13);
    assert!(
        r.stderr.contains(&format!("{key_name}: missing")),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_input_gets_one_clear_error_and_its_exit_code() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("bad");
    let s3 = s3();
    let fs_repo = "url = \"file://./repo\"";

    // Nothing listens on this port.
    let port = free_port();
    let literal = format!("[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"postgres://postgres:hunter2secret@127.0.0.1:{port}/x\"\n");
    // Written out in the policy, a password is refused before anything runs: exit 2, the field
    // named, the fix given, the password not repeated.
    let policy = write_policy(dir.path(), fs_repo, &key.recipient, &literal);
    for args in [
        vec!["policy", "check", policy.to_str().unwrap()],
        vec!["backup", "--policy", policy.to_str().unwrap()],
    ] {
        let r = lifeboat(dir.path(), &args, &[]);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("sources[0].url") && r.stderr.contains("password_file"),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains("hunter2secret"), "{}", r.stderr);
    }
    // From the environment it is allowed, and still never shown.
    let src = format!("[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"postgres://postgres:${{APP_DB_PW}}@127.0.0.1:{port}/x\"\n");
    let pw_env = [("APP_DB_PW".to_string(), "hunter2secret".to_string())];
    let policy = write_policy(dir.path(), fs_repo, &key.recipient, &src);
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", policy.to_str().unwrap()],
        &pw_env,
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "cannot connect to PostgreSQL at postgres://postgres:***@127.0.0.1:{port}/x"
        )),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("hunter2secret"),
        "the password leaked: {}",
        r.stderr
    );
    assert!(r.stderr.contains("hint:"), "{}", r.stderr);

    // Wrong password: a credential error, exit 12, password not shown.
    let src = format!("[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"postgres://postgres:${{APP_DB_PW}}@127.0.0.1:{}/{db}\"\n", pg.port);
    let policy = write_policy(dir.path(), fs_repo, &key.recipient, &src);
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", policy.to_str().unwrap()],
        &[("APP_DB_PW".to_string(), "wrong-pw-xyz".to_string())],
    );
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(
        r.stderr.contains("password authentication failed"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("wrong-pw-xyz"), "{}", r.stderr);

    // A password_file that is not there.
    let missing = dir.path().join("nope");
    let policy = write_policy(
        dir.path(),
        fs_repo,
        &key.recipient,
        &pg_source(pg, &db, &missing, ""),
    );
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", policy.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot read password_file"),
        "{}",
        r.stderr
    );

    // A bucket that does not exist.
    let repo = format!(
        "url = \"s3://no-such-bucket-{}/x\"\nendpoint = \"{}\"",
        suffix(),
        s3.endpoint
    );
    let policy = write_policy(
        dir.path(),
        &repo,
        &key.recipient,
        &pg_source(pg, &db, &pwfile, ""),
    );
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", policy.to_str().unwrap()],
        &s3.env(),
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("bucket does not exist"), "{}", r.stderr);
    let r = lifeboat(
        dir.path(),
        &["list", "--policy", policy.to_str().unwrap()],
        &s3.env(),
    );
    assert_eq!(r.code, 1, "{}", r.stderr);

    // An S3 endpoint where nothing listens: retried, then one clear error.
    let repo = format!(
        "url = \"s3://bucket-x/x\"\nendpoint = \"http://127.0.0.1:{}\"",
        free_port()
    );
    let policy = write_policy(
        dir.path(),
        &repo,
        &key.recipient,
        &pg_source(pg, &db, &pwfile, ""),
    );
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", policy.to_str().unwrap()],
        &s3.env(),
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("at s3://bucket-x/x"),
        "names the storage: {}",
        r.stderr
    );
    assert!(r.stderr.contains("Connection refused"), "{}", r.stderr);

    // No repository there yet: list and check exit 10.
    let policy = write_policy(
        dir.path(),
        "url = \"file://./empty-repo\"",
        &key.recipient,
        &pg_source(pg, &db, &pwfile, ""),
    );
    for cmd in ["list", "check"] {
        let r = lifeboat(
            dir.path(),
            &[cmd, "--policy", policy.to_str().unwrap()],
            &[],
        );
        assert_eq!(r.code, 10, "{cmd}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("no lifeboat repository at file://./empty-repo"),
            "{}",
            r.stderr
        );
    }

    // An unknown source name: usage error.
    let r = lifeboat(
        dir.path(),
        &[
            "backup",
            "--policy",
            policy.to_str().unwrap(),
            "--source",
            "nope",
        ],
        &[],
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no source named `nope`; it has: app-db")
            || r.stderr.contains("it has: app-db"),
        "{}",
        r.stderr
    );

    // An invalid policy: exit 2 with field paths, for backup and for policy check.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("[repository]\nurl = \"file://./r\"\n[encryption]\nrecipients = [\"{}\"]\n[defaults]\nretention = {{ keep_last = 1 }}\n[[sources]]\nname = \"a\"\nkind = \"postgres\"\nurl = \"postgres://x@h/d\"\nschedul = \"* * * * *\"\n", key.recipient)).unwrap();
    for args in [
        vec!["policy", "check", bad.to_str().unwrap()],
        vec!["backup", "--policy", bad.to_str().unwrap()],
    ] {
        let r = lifeboat(dir.path(), &args, &[]);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("sources[0].schedul: unknown field, expected one of"),
            "{}",
            r.stderr
        );
    }
    // Usage errors are exit 2 too.
    assert_eq!(lifeboat(dir.path(), &["backup"], &[]).code, 2);
}

#[test]
fn one_failing_source_of_two_is_a_partial_failure_and_the_other_is_stored() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("partial");
    pg.psql(
        &db,
        "create table t as select generate_series(1, 100) as id",
    );
    let good = pg_source(pg, &db, &pwfile, "globals = false");
    let bad = format!(
        "[[sources]]\nname = \"gone-db\"\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:{}/x\"\n",
        free_port()
    );
    let policy = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &format!("{good}\n{bad}"),
    );
    let p = policy.to_str().unwrap();
    let r = lifeboat(
        dir.path(),
        &["--log-format", "json", "backup", "--policy", p],
        &[],
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("1 of 2 backups failed"), "{}", r.stderr);
    assert!(r.stderr.contains("source gone-db"), "{}", r.stderr);
    // JSON logs: every log line is one JSON object.
    let json_lines = r.stderr.lines().filter(|l| l.starts_with('{')).count();
    assert!(json_lines >= 1, "{}", r.stderr);
    for l in r.stderr.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
    let list = list_json(dir.path(), &policy, &[]);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["source"], "app-db");
}

#[test]
fn tls_is_verified_against_the_configured_ca_end_to_end() {
    let Fx {
        pg,
        db,
        dir,
        key,
        pwfile,
    } = setup("tls");
    pg.psql(&db, "create table t as select generate_series(1, 50) as id");
    // tlsuser may only connect over TLS (pg_hba: hostnossl … reject).
    let src = |extra: &str, mode: &str| {
        format!(
            "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"postgres://tlsuser@127.0.0.1:{}/{db}?sslmode={mode}\"\npassword_file = \"{}\"\n{extra}\n",
            pg.port,
            pwfile.display()
        )
    };
    let ca = format!("tls_ca_file = \"{}\"", pg.ca_file.display());
    let ok = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &src(&ca, "require"),
    );
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", ok.to_str().unwrap()],
        &[],
    );
    assert_eq!(
        r.code, 0,
        "TLS with the CA works for lifeboat and pg_dump alike: {}",
        r.stderr
    );

    let unverified = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &src("", "require"),
    );
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", unverified.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.code, 12, "an unknown CA is refused: {}", r.stderr);
    assert!(
        r.stderr.contains("tls_ca_file"),
        "says what to do: {}",
        r.stderr
    );

    let plain = write_policy(
        dir.path(),
        "url = \"file://./repo\"",
        &key.recipient,
        &src("", "disable"),
    );
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", plain.to_str().unwrap()],
        &[],
    );
    assert_eq!(
        r.code, 12,
        "the server refuses plaintext for this role: {}",
        r.stderr
    );
    assert_eq!(list_json(dir.path(), &ok, &[]).len(), 1);
}
