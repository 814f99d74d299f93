//! RUNBOOK.md's commands, run as written: every ```sh block, in order, in bash, against a
//! throwaway PostgreSQL, two redis-servers and moto's S3, with backups of every kind taken first.
//!
//! The variables the runbook tells the reader to set (`POLICY`, `LIFEBOAT_IDENTITY_FILE`, `LIFEBOAT_SIGNING_PUBLIC_KEY`,
//! `TARGET_PG`, `TARGET_REDIS`, `RESTORE_DIR`, `RESTORE_PG_DIR`, `BUCKET`, `PREFIX`, the PG* and
//! AWS_* variables) come from this test; a line `export NAME=…` in a block is the reader's to fill
//! in, so it is skipped here. Afterwards the restored data is compared with the source.

use std::path::{Path, PathBuf};
use std::process::Command;

use lifeboat_tests::*;

/// The ```sh blocks of a Markdown text.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_end() == "```sh" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => out.push(current.take().unwrap_or_default()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    out
}

/// Drops `export NAME=…` lines: the value is the reader's (here: the test's environment).
fn runnable(block: &str, provided: &[(String, String)]) -> String {
    block
        .lines()
        .filter(|l| {
            let Some(rest) = l.trim_start().strip_prefix("export ") else {
                return true;
            };
            let name = rest.split('=').next().unwrap_or("");
            !(rest.contains('…') || provided.iter().any(|(k, _)| k == name))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tools_dir() -> PathBuf {
    std::env::var("MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/moto-venv/bin/moto_server")
        })
        .parent()
        .expect("the tools venv's bin")
        .to_path_buf()
}

#[test]
fn every_runbook_command_works_as_written() {
    let pg = postgres();
    let db = pg.create_db("runbook");
    pg.psql(
        &db,
        "create table users (id serial primary key, name text);
         insert into users (name) select 'user ' || g from generate_series(1, 500) g;",
    );
    let redis = Redis::start(&[]);
    fill_redis(&redis, None);
    let target_redis = Redis::start(&[]);
    let s3 = s3();
    let bucket = rt().block_on(s3.create_bucket());
    let aws = tools_dir().join("aws");
    assert!(
        aws.exists(),
        "the aws CLI is not in the tools venv ({}): scripts/install-deps.sh installs it",
        aws.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let signing = signing_keygen(dir.path(), "signing.key");
    let pwfile = pg.password_file(dir.path());
    let files = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(files.path().join("2026/11")).unwrap();
    std::fs::write(files.path().join("2026/11/invoice 42.pdf"), b"%PDF fake").unwrap();
    std::fs::write(files.path().join("readme.txt"), b"hello").unwrap();
    std::fs::write(files.path().join("empty"), b"").unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[repository]\nurl = \"s3://{bucket}/production\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\n\
             [encryption]\nrecipients = [\"{}\"]\nindex_key = \"runbook-index-key-0123456789abcdef\"\n\n\
             [signing]\n{}\n\n\
             [defaults]\nretention = {{ keep_last = 3 }}\n\n\
             [[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n\n\
             [[sources]]\nname = \"app-cluster\"\nkind = \"postgres-physical\"\nurl = \"{}\"\npassword_file = \"{}\"\ncheckpoint = \"fast\"\n\n\
             [[sources]]\nname = \"sessions\"\nkind = \"redis\"\nurl = \"{}\"\n\n\
             [[sources]]\nname = \"uploads\"\nkind = \"objects\"\nfrom = \"dir://{}\"\n",
            s3.endpoint,
            key.recipient,
            signing.signs(&[&signing.public]),
            pg.url(&db),
            pwfile.display(),
            pg.url("postgres"),
            pwfile.display(),
            redis.url(),
            files.path().display()
        ),
    )
    .unwrap();
    let bin_dir = lifeboat_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}:{}:{}",
        bin_dir.display(),
        pg_bin().display(),
        tools_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut env: Vec<(String, String)> = s3.env();
    env.extend([
        ("PATH".into(), path),
        ("POLICY".into(), policy.display().to_string()),
        (
            "LIFEBOAT_IDENTITY_FILE".into(),
            key.identity.display().to_string(),
        ),
        (
            "TARGET_PG".into(),
            format!("postgresql://postgres@127.0.0.1:{}", pg.port),
        ),
        ("PGPASSWORD".into(), pg.password.clone()),
        ("PGHOST".into(), "127.0.0.1".into()),
        ("PGPORT".into(), pg.port.to_string()),
        ("PGUSER".into(), "postgres".into()),
        ("TARGET_REDIS".into(), target_redis.url()),
        (
            "RESTORE_DIR".into(),
            dir.path().join("redis-restore").display().to_string(),
        ),
        (
            "RESTORE_PG_DIR".into(),
            dir.path().join("cluster-restore").display().to_string(),
        ),
        (
            "RESTORE_FILES_DIR".into(),
            dir.path().join("files-restore").display().to_string(),
        ),
        ("LIFEBOAT_SIGNING_PUBLIC_KEY".into(), signing.public.clone()),
        ("NO_COLOR".into(), "1".into()),
    ]);
    let r = lifeboat(
        dir.path(),
        &["backup", "--policy", policy.to_str().unwrap()],
        &env,
    );
    assert_eq!(r.code, 0, "backup: {}", r.stderr);

    // An interrupted run after the backup: an id with objects but no manifest.json. The
    // runbook's "newest backup" must pass over it.
    rt().block_on(async {
        let client = s3.client().await;
        let put = client
            .put_object()
            .bucket(&bucket)
            .key("production/backups/app-db/29991231T235959Z-ffffff/database.dump.zst.age")
            .body(b"an interrupted upload".to_vec().into());
        put.send().await.unwrap();
    });

    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../RUNBOOK.md"))
        .unwrap();
    let blocks = sh_blocks(&text);
    assert!(
        blocks.len() >= 7,
        "RUNBOOK.md has {} sh blocks",
        blocks.len()
    );
    // "Restore without lifeboat" finds the bucket, prefix, endpoint and region in the policy and
    // writes them to lifeboat-s3.env, which the reader sources in each shell after it: the
    // blocks after that one run with it sourced, and nothing else tells them where S3 is.
    let s3_env = dir.path().join("lifeboat-s3.env");
    for (i, block) in blocks.iter().enumerate() {
        let sourced = if s3_env.exists() {
            format!("set -a; . '{}'; set +a\n", s3_env.display())
        } else {
            String::new()
        };
        let script = format!("set -euo pipefail\n{sourced}{}", runnable(block, &env));
        let cwd = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd.path())
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "RUNBOOK.md sh block {} failed ({}):\n{block}\nstdout:\n{}\nstderr:\n{}",
            i + 1,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if block.contains("> lifeboat-s3.env") {
            std::fs::copy(cwd.path().join("lifeboat-s3.env"), &s3_env).unwrap();
            let written = std::fs::read_to_string(&s3_env).unwrap();
            for want in [
                format!("BUCKET={bucket}\n"),
                "PREFIX=production\n".to_string(),
                format!("AWS_ENDPOINT_URL={}\n", s3.endpoint),
                "AWS_DEFAULT_REGION=us-east-1\n".to_string(),
            ] {
                assert!(written.contains(&want), "{want} not in:\n{written}");
            }
        }
    }
    assert!(s3_env.exists(), "no block wrote lifeboat-s3.env");

    // What the blocks restored is what the sources hold.
    let count = "select count(*) || ':' || md5(string_agg(name, ',' order by id)) from users";
    let want = pg.psql(&db, count);
    assert_eq!(pg.psql("app_restored", count), want, "lifeboat restore");
    assert_eq!(
        pg.psql("app_from_files", count),
        want,
        "restore without lifeboat"
    );
    assert_eq!(
        target_redis.digest(None),
        redis.digest(None),
        "live Redis restore"
    );
    assert!(dir.path().join("redis-restore/dump.rdb").exists());
    assert!(
        dir.path().join("cluster-restore/backup_label").exists(),
        "lifeboat restore of a base backup"
    );
    let restored = dir.path().join("files-restore");
    assert_eq!(
        std::fs::read(restored.join("2026/11/invoice 42.pdf")).unwrap(),
        b"%PDF fake"
    );
    assert_eq!(std::fs::read(restored.join("empty")).unwrap(), b"");
}
