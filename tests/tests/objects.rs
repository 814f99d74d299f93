//! Objects sources against real directories and a real S3 server: snapshots restore exactly
//! (nested paths, unicode and spaces, empty files and directories, modes, a 50 MB file, thousands
//! of small files, packed and read back by stock tools from their offsets); a second run after one
//! change uploads one blob; an older snapshot restores the older content; the shrink guard fires
//! and aborts the pack it started; a damaged pack is caught by restore, the verifier and check;
//! packs and blobs are collected only when no snapshot names them; 100,000 objects are backed up
//! within a memory budget in a few packs, and a content copied from another file is found, with
//! its place in a pack, in the last snapshot's blob list instead of being stored again; a file
//! appended to while it is read is stored as first read, and objects deleted or rewritten while
//! read (held at a fault proxy meanwhile) are named in the snapshot while the run publishes the
//! rest, a 1,024-byte key among them.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use lifeboat_tests::*;

const INDEX_KEY: &str = "0123456789abcdef0123456789abcdef-test-index-key";

struct Fx {
    dir: tempfile::TempDir,
    key: Key,
    policy: PathBuf,
    env: Vec<(String, String)>,
}

fn setup(repository: &str, source: &str, env: Vec<(String, String)>) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let text = format!(
        "[repository]\n{repository}\n\n[encryption]\nrecipients = [\"{}\"]\nindex_key = \"${{LIFEBOAT_INDEX_KEY}}\"\n\n[defaults]\nretention = {{ keep_last = 5 }}\n\n{source}\n",
        key.recipient
    );
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, text).unwrap();
    let mut env = env;
    env.push(("LIFEBOAT_INDEX_KEY".into(), INDEX_KEY.into()));
    Fx {
        dir,
        key,
        policy,
        env,
    }
}

impl Fx {
    fn run(&self, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        let p = self.policy.to_str().unwrap().to_string();
        let id = self.key.identity.to_str().unwrap().to_string();
        if matches!(args[0], "restore") {
            all.extend(["--identity", &id]);
        }
        all.extend(["--policy", &p]);
        lifeboat(self.dir.path(), &all, &self.env)
    }

    /// `lifeboat restore --source files ARGS`.
    fn restore(&self, args: &[&str]) -> Run {
        let mut all = vec!["restore", "--source", "files"];
        all.extend(args);
        self.run(&all)
    }

    fn backup(&self) -> String {
        let r = self.run(&["backup"]);
        assert_eq!(r.code, 0, "backup: {}", r.stderr);
        self.ids()[0].clone()
    }

    fn ids(&self) -> Vec<String> {
        let r = self.run(&["list", "--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        list.iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// What `list --json` says backup `id` was taken from.
    fn origin(&self, id: &str) -> serde_json::Value {
        let r = self.run(&["list", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        list.into_iter().find(|b| b["id"] == id).unwrap()["origin"].clone()
    }

    fn fingerprint(&self, id: &str) -> serde_json::Value {
        let out = std::process::Command::new("age")
            .args(["-d", "-i"])
            .arg(&self.key.identity)
            .arg(
                self.dir
                    .path()
                    .join(format!("repo/backups/files/{id}/fingerprint.json.age")),
            )
            .output()
            .unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `lifeboat check --read-data` with the identity: every content re-hashed.
    fn check_read_data(&self) -> Run {
        let id = self.key.identity.to_str().unwrap().to_string();
        self.run(&["check", "--read-data", "--identity", &id])
    }

    fn verify(&self, id: &str) -> Run {
        let p = self.policy.to_str().unwrap().to_string();
        let key = self.key.identity.to_str().unwrap().to_string();
        verifier(
            self.dir.path(),
            &["verify", "--policy", &p, "--identity", &key, "--backup", id],
            &self.env,
        )
    }
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every file and directory under `root`: path → (content SHA-256 or "dir", mode).
fn tree(root: &Path) -> BTreeMap<String, (String, u32)> {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            let m = std::fs::metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o777;
            if m.is_dir() {
                out.insert(rel, ("dir".to_string(), mode));
                stack.push(p);
            } else {
                let sha = hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap()));
                out.insert(rel, (sha, mode));
            }
        }
    }
    out
}

fn make_tree(root: &Path, small_files: usize) {
    std::fs::create_dir_all(root.join("docs/2026/11")).unwrap();
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    std::fs::create_dir_all(root.join("many")).unwrap();
    std::fs::write(
        root.join("docs/2026/11/report final.pdf"),
        pseudo_random(3000, 1),
    )
    .unwrap();
    std::fs::write(root.join("docs/naïve café ☕.txt"), "unicode names\n").unwrap();
    std::fs::write(root.join("empty.txt"), "").unwrap();
    std::fs::write(root.join("big.bin"), pseudo_random(50 << 20, 7)).unwrap();
    let script = root.join("docs/run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).unwrap();
    for i in 0..small_files {
        std::fs::write(
            root.join(format!("many/f{i:05}.txt")),
            format!("small file {i}\n"),
        )
        .unwrap();
    }
    // The same content twice: stored once.
    std::fs::write(root.join("many/copy-of-f00001.txt"), "small file 1\n").unwrap();
}

#[test]
fn a_directory_snapshot_restores_exactly_and_the_next_run_stores_only_what_changed() {
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path(), 10_000);
    let fx = setup_dir(src.path(), "exclude = [\"**/*.tmp\"]\n");
    std::fs::write(src.path().join("scratch.tmp"), "left out").unwrap();
    let first = fx.backup();
    assert_eq!(
        fx.origin(&first)["identity"],
        format!("directory {}", src.path().display())
    );
    let fp = fx.fingerprint(&first);
    assert_eq!(fp["files"], 10_000 + 6, "{fp}");
    // The duplicate is stored once, the empty file needs no blob. The 10,003 small contents
    // go into one pack; the 50 MB file is an object of its own.
    assert_eq!(fp["blobs"], 10_000 + 4, "{fp}");
    assert_eq!(fp["blobs_uploaded"], 10_000 + 4, "{fp}");
    assert_eq!(fp["packs"], 1, "{fp}");
    assert_eq!(fp["packs_uploaded"], 1, "{fp}");
    let objects = files_under(&fx.dir.path().join("repo/objects"));
    assert_eq!(objects.len(), 2, "{objects:?}");
    let pack = objects
        .iter()
        .find(|p| std::fs::metadata(p).unwrap().len() < 20 << 20)
        .unwrap()
        .clone();

    // Stock tools read a packed content from the offsets its snapshot entry gives.
    let snapshot = stock_plaintext(
        &fx.key.identity,
        &fx.dir
            .path()
            .join(format!("repo/backups/files/{first}/snapshot.jsonl.zst.age")),
    );
    let entry: serde_json::Value = String::from_utf8(snapshot)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["path"] == "docs/run.sh")
        .unwrap();
    let slice = &entry["pack"];
    assert_eq!(
        pack.file_stem().unwrap().to_str().unwrap(),
        slice["id"].as_str().unwrap(),
        "{entry}"
    );
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; dd if=\"$0\" iflag=skip_bytes,count_bytes skip={} count={} bs=1M status=none | age -d -i \"$1\" | zstd -dq",
            slice["offset"], slice["len"]
        ))
        .arg(&pack)
        .arg(&fx.key.identity)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"#!/bin/sh\necho hi\n");

    // Restore into a new directory: the same tree, byte for byte, modes and empty dirs included.
    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--backup", &first, "--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut want = tree(src.path());
    want.remove("scratch.tmp");
    assert_eq!(tree(&out), want);

    // One directory of it, or one file, at the same place under the target.
    let part = fx.dir.path().join("part");
    let r = fx.restore(&[
        "--backup",
        &first,
        "--to",
        part.to_str().unwrap(),
        "--path",
        "docs/",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let docs: BTreeMap<_, _> = want
        .iter()
        .filter(|(p, _)| p.starts_with("docs/"))
        .map(|(p, v)| (p.clone(), v.clone()))
        .collect();
    let mut got = tree(&part);
    assert_eq!(got.remove("docs").map(|d| d.0), Some("dir".to_string()));
    assert_eq!(got, docs);
    let one = fx.dir.path().join("one");
    let r = fx.restore(&["--to", one.to_str().unwrap(), "--path", "docs/run.sh"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(files_under(&one), vec![one.join("docs/run.sh")]);
    let r = fx.restore(&["--to", one.to_str().unwrap(), "--path", "doc", "--yes"]);
    assert_eq!(
        r.code, 2,
        "a prefix of a name is not its path: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("holds nothing at \"doc\""),
        "{}",
        r.stderr
    );
    let r = fx.restore(&[
        "--to",
        one.to_str().unwrap(),
        "--path",
        "docs",
        "--yes",
        "--delete-extra",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("outside the path"), "{}", r.stderr);

    // One change: the next run reads and stores only that file.
    std::fs::write(src.path().join("docs/naïve café ☕.txt"), "changed\n").unwrap();
    let second = fx.backup();
    let fp2 = fx.fingerprint(&second);
    assert_eq!(fp2["blobs_uploaded"], 1, "{fp2}");
    assert_eq!(fp2["packs_uploaded"], 1, "{fp2}");
    assert_eq!(
        fp2["packs"], 2,
        "the first pack still holds the rest: {fp2}"
    );
    assert_eq!(walk_count(&fx.dir.path().join("repo/objects")), 3);

    // The older snapshot still gives the older content.
    let older = fx.dir.path().join("older");
    let r = fx.restore(&["--backup", &first, "--to", older.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(older.join("docs/naïve café ☕.txt")).unwrap(),
        "unicode names\n"
    );
    // A non-empty target needs --yes.
    let r = fx.restore(&["--to", older.to_str().unwrap()]);
    assert_eq!(r.code, 14, "{}", r.stderr);
    // --yes --delete-extra makes it exactly the newer snapshot: the extra file goes.
    std::fs::write(older.join("not in any snapshot.txt"), "extra").unwrap();
    let r = fx.restore(&["--to", older.to_str().unwrap(), "--yes", "--delete-extra"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("1 extra path(s) deleted"), "{}", r.stderr);
    let mut want = tree(src.path());
    want.remove("scratch.tmp");
    assert_eq!(tree(&older), want);
    assert_eq!(fx.verify(&second).code, 0);

    // The shrink guard: an emptied source records nothing. The new contents that run packed
    // (more than a 5 MiB part) are aborted with it: no object, no temp file.
    for i in 0..8 {
        std::fs::write(
            src.path().join(format!("docs/new-{i}.bin")),
            pseudo_random(1000 << 10, 100 + i),
        )
        .unwrap();
    }
    for e in std::fs::read_dir(src.path().join("many"))
        .unwrap()
        .flatten()
    {
        std::fs::remove_file(e.path()).unwrap();
    }
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("down from"), "{}", r.stderr);
    assert_eq!(fx.ids().len(), 2);
    let objects = files_under(&fx.dir.path().join("repo/objects"));
    assert_eq!(objects.len(), 3, "{objects:?}");

    // A damaged pack: restore stops with 13 before that file appears; the verifier says 13.
    let victim = pack;
    let mut b = std::fs::read(&victim).unwrap();
    let i = b.len() - 20;
    b[i] ^= 1;
    std::fs::write(&victim, b).unwrap();
    let damaged = fx.dir.path().join("damaged");
    let r = fx.restore(&["--backup", &second, "--to", damaged.to_str().unwrap()]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        files_under(&damaged).iter().all(|p| !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".lifeboat-restore-")),
        "no temp file left"
    );
    let v = fx.verify(&second);
    assert_eq!(v.code, 13, "{}{}", v.stdout, v.stderr);

    // check --read-data finds it too: with the identity every content a snapshot names is
    // re-hashed; with only the index key, blobs and packs are checked for presence and the
    // output says so.
    let blob = victim.strip_prefix(fx.dir.path().join("repo")).unwrap();
    let blob = blob.to_str().unwrap();
    let identity = fx.key.identity.to_str().unwrap().to_string();
    let r = fx.run(&["check", "--read-data", "--identity", &identity]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains(blob), "names the blob: {}", r.stderr);
    let r = fx.run(&["check", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("presence only"), "{}", r.stderr);
    std::fs::remove_file(&victim).unwrap();
    let r = fx.run(&["check"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(
        r.stderr.contains(blob) && r.stderr.contains("missing (named by the snapshot)"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_s3_prefix_is_snapshotted_into_an_s3_repository_and_changes_go_by_etag() {
    let s3 = s3();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (source_bucket, repo_bucket) = (format!("src-{}", suffix()), format!("repo-{}", suffix()));
    let objects: Vec<(String, Vec<u8>)> = vec![
        ("uploads/a/b/c.txt".into(), b"nested".to_vec()),
        (
            "uploads/with space/naïve.txt".into(),
            "unicode".as_bytes().to_vec(),
        ),
        ("uploads/empty".into(), Vec::new()),
        ("uploads/large.bin".into(), pseudo_random(12 << 20, 3)),
        ("other/not-this.txt".into(), b"outside the prefix".to_vec()),
    ];
    rt.block_on(async {
        let c = s3.client().await;
        for b in [&source_bucket, &repo_bucket] {
            c.create_bucket().bucket(b).send().await.unwrap();
        }
        for (k, v) in &objects {
            c.put_object()
                .bucket(&source_bucket)
                .key(k)
                .body(v.clone().into())
                .send()
                .await
                .unwrap();
        }
    });
    let fx = setup(
        &format!(
            "url = \"s3://{repo_bucket}/lb\"\nendpoint = \"{}\"",
            s3.endpoint
        ),
        &format!(
            "[[sources]]\nname = \"files\"\nkind = \"objects\"\nfrom = \"s3://{source_bucket}/uploads/\"\nendpoint = \"{}\"\n[sources.verify]\ncover_days = 2\n",
            s3.endpoint
        ),
        s3.env(),
    );
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = fx.ids()[0].clone();
    let origin = fx.origin(&first);
    assert_eq!(origin["identity"], format!("s3://{source_bucket}/uploads"));
    assert_eq!(origin["details"]["endpoint"], s3.endpoint.as_str());
    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for (k, v) in objects.iter().filter(|(k, _)| k.starts_with("uploads/")) {
        let rel = k.strip_prefix("uploads/").unwrap();
        assert_eq!(&std::fs::read(out.join(rel)).unwrap(), v, "{rel}");
    }
    assert!(!out.join("not-this.txt").exists());

    // Change one object: one blob uploaded, found by its ETag, the others not even read.
    rt.block_on(async {
        s3.client()
            .await
            .put_object()
            .bucket(&source_bucket)
            .key("uploads/a/b/c.txt")
            .body(b"nested, changed".to_vec().into())
            .send()
            .await
            .unwrap();
    });
    let r = fx.run(&["backup", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The requests of that run: of the source, one listing page and one GET (the changed
    // object, read once); of the repository, one PUT per object it wrote.
    let result: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let requests = &result[0]["requests"];
    assert_eq!(
        requests["source"],
        serde_json::json!({"list": 1, "get": 1, "head": 0, "put": 0, "delete": 0}),
        "{result}"
    );
    let repository = &requests["repository"];
    assert_eq!(repository["delete"], 0, "{result}");
    // The pack holding the changed content, the snapshot and the blob list (then the
    // fingerprint and the manifest, not counted). The snapshot is the next run's change index: nothing else is written.
    assert_eq!(repository["put"], 3, "{result}");
    assert!(repository["get"].as_u64().unwrap() >= 2, "{result}");
    let blobs = rt.block_on(s3.keys(&repo_bucket, "lb/objects/"));
    assert_eq!(
        blobs.len(),
        3,
        "the 2 small contents in a pack, the large one alone (the empty object needs none), \
         and the changed one in a pack of its run: {blobs:?}"
    );
    let v = fx.verify(&first);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);

    // Straight into a bucket: every object back, the large one through a multipart upload.
    let out_bucket = format!("out-{}", suffix());
    rt.block_on(async {
        let c = s3.client().await;
        c.create_bucket().bucket(&out_bucket).send().await.unwrap();
        c.put_object()
            .bucket(&out_bucket)
            .key("back/extra.txt")
            .body(b"not in the snapshot".to_vec().into())
            .send()
            .await
            .unwrap();
    });
    let to = format!("s3://{out_bucket}/back/");
    let r = fx.restore(&["--backup", &first, "--to", &to]);
    assert_eq!(
        r.code, 14,
        "a prefix holding objects needs --yes: {}",
        r.stderr
    );
    let r = fx.restore(&["--backup", &first, "--to", &to, "--yes", "--delete-extra"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    rt.block_on(async {
        let keys = s3.keys(&out_bucket, "back/").await;
        assert_eq!(keys.len(), 4, "{keys:?}");
        for (k, v) in objects.iter().filter(|(k, _)| k.starts_with("uploads/")) {
            let key = format!("back/{}", k.strip_prefix("uploads/").unwrap());
            assert_eq!(&s3.get(&out_bucket, &key).await, v, "{key}");
        }
    });

    // A damaged blob: the object it would become never appears, and no upload is left open.
    let large = rt.block_on(async {
        let c = s3.client().await;
        let mut largest = (String::new(), 0i64);
        for o in c
            .list_objects_v2()
            .bucket(&repo_bucket)
            .prefix("lb/objects/")
            .send()
            .await
            .unwrap()
            .contents()
        {
            if o.size().unwrap_or(0) > largest.1 {
                largest = (o.key().unwrap().to_string(), o.size().unwrap());
            }
        }
        let mut b = s3.get(&repo_bucket, &largest.0).await;
        let i = b.len() / 2;
        b[i] ^= 1;
        c.put_object()
            .bucket(&repo_bucket)
            .key(&largest.0)
            .body(b.into())
            .send()
            .await
            .unwrap();
        largest.0
    });
    assert!(!large.is_empty());
    let r = fx.restore(&[
        "--backup",
        &first,
        "--to",
        &format!("s3://{out_bucket}/damaged/"),
    ]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    rt.block_on(async {
        assert!(!s3
            .keys(&out_bucket, "damaged/")
            .await
            .contains(&"damaged/large.bin".to_string()));
        let open = s3.pending_uploads(&out_bucket).await;
        assert!(open.is_empty(), "{open:?}");
    });
}

#[test]
fn blobs_no_snapshot_names_are_collected_after_a_day_and_content_seen_again_is_stored_again() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("a.txt"), "one\n").unwrap();
    std::fs::write(src.path().join("b.txt"), "two\n").unwrap();
    // Larger than what a run keeps in memory: read twice, checked on the second read.
    std::fs::write(src.path().join("c.bin"), pseudo_random(3 << 20, 5)).unwrap();
    // Every content an object of its own (packs are collected in the next test).
    let fx = setup_dir(
        src.path(),
        "retention = { keep_last = 1 }\npack_size = \"0\"\n",
    );
    let blobs_dir = fx.dir.path().join("repo/objects");
    let first = fx.backup();
    assert_eq!(fx.fingerprint(&first)["blobs_uploaded"], 3);
    std::fs::write(src.path().join("b.txt"), "two, changed\n").unwrap();
    let second = fx.backup();
    assert_eq!(walk_count(&blobs_dir), 4);

    // The first backup goes; its old blob is unreferenced but younger than a day: kept.
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("delete {first}")),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("4 stored, 3 named by snapshots; deleted 0")
            && r.stderr
                .contains("1 unreferenced but younger than a day kept"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.ids(), vec![second.clone()]);

    // A day later it goes; the dry run says so first and deletes nothing.
    two_days_old(&blobs_dir);
    let r = fx.run(&["prune", "--dry-run"]);
    assert!(r.stderr.contains("would delete 1"), "{}", r.stderr);
    assert_eq!(walk_count(&blobs_dir), 4);
    let r = fx.run(&["prune"]);
    assert!(r.stderr.contains("deleted 1 "), "{}", r.stderr);
    assert_eq!(walk_count(&blobs_dir), 3);
    let r = fx.run(&["check", "--read-data"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(tree(&out), tree(src.path()));

    // The old content comes back: its blob is gone, so this run stores it again.
    std::fs::write(src.path().join("b.txt"), "two\n").unwrap();
    let third = fx.backup();
    assert_eq!(fx.fingerprint(&third)["blobs_uploaded"], 1);
    let out = fx.dir.path().join("third");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(out.join("b.txt")).unwrap(), "two\n");

    // A snapshot whose backup never got a manifest is not trusted: the next run compares
    // with the last published one, and stores again the content only the other one named.
    std::fs::remove_file(
        fx.dir
            .path()
            .join(format!("repo/backups/files/{third}/manifest.json")),
    )
    .unwrap();
    let fourth = fx.backup();
    assert_eq!(fx.fingerprint(&fourth)["blobs_uploaded"], 1);

    let v = fx.verify(&fourth);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);

    // A blob list that cannot be read stops collection, whatever else holds.
    std::fs::remove_file(
        fx.dir
            .path()
            .join(format!("repo/backups/files/{fourth}/blobs.txt.age")),
    )
    .unwrap();
    let r = fx.run(&["prune"]);
    assert!(
        r.stderr.contains("none collected") && r.stderr.contains("blobs.txt.age is missing"),
        "{}",
        r.stderr
    );
    // The verifier holds every backup's blob list to its snapshot: a missing one fails.
    let v = fx.verify(&fourth);
    assert_eq!(v.code, 4, "{}{}", v.stdout, v.stderr);
    assert!(
        format!("{}{}", v.stdout, v.stderr).contains("blob list names every blob"),
        "{}{}",
        v.stdout,
        v.stderr
    );
}

#[test]
fn blob_collection_merges_the_blob_lists_of_many_backups_and_misses_none() {
    let src = tempfile::tempdir().unwrap();
    // In the first backup's pack, and named by every backup: that pack stays.
    std::fs::write(src.path().join("same.txt"), "never changes\n").unwrap();
    let fx = setup_dir(src.path(), "retention = { keep_last = 20 }\n");
    // Eleven backups, each naming one content no other names, stored in a pack of its run:
    // more lists than one merge pass takes, so a pass that lost a list would leave its pack
    // unnamed.
    let n = 11;
    for i in 0..n {
        std::fs::write(src.path().join("v.txt"), format!("version {i}\n")).unwrap();
        fx.backup();
    }
    let blobs_dir = fx.dir.path().join("repo/objects");
    assert_eq!(walk_count(&blobs_dir), n);
    two_days_old(&blobs_dir);
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("{n} stored, {n} named by snapshots; deleted 0")),
        "{}",
        r.stderr
    );
    // Keeping only the last: the packs of the nine runs between the first and the last are
    // named by nothing, and old: deleted. The first run's pack holds a content named still.
    let policy = std::fs::read_to_string(&fx.policy).unwrap();
    std::fs::write(
        &fx.policy,
        policy.replace("keep_last = 20", "keep_last = 1"),
    )
    .unwrap();
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "{n} stored, 2 named by snapshots; deleted {}",
            n - 2
        )),
        "{}",
        r.stderr
    );
    assert_eq!(walk_count(&blobs_dir), 2);
    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(out.join("v.txt")).unwrap(),
        format!("version {}\n", n - 1)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("same.txt")).unwrap(),
        "never changes\n"
    );
    let r = fx.check_read_data();
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_pack_mostly_unused_is_noted_by_prune_and_its_contents_packed_again_by_the_next_backup() {
    let src = tempfile::tempdir().unwrap();
    let write = |i: u64, seed: u64| {
        std::fs::write(
            src.path().join(format!("f{i:03}.bin")),
            // Odd seeds: the generator makes a seed odd, so 2k and 2k + 1 would repeat.
            pseudo_random(2000, 2 * seed + 1),
        )
        .unwrap()
    };
    for i in 0..100 {
        write(i, i + 1);
    }
    let fx = setup_dir(src.path(), "retention = { keep_last = 1 }\n");
    let objects = fx.dir.path().join("repo/objects");
    let first = fx.backup();
    assert_eq!(fx.fingerprint(&first)["packs"], 1);
    // 80 contents change: they go into a new pack, and the first one keeps 20 named.
    for i in 0..80 {
        write(i, 1000 + i);
    }
    let second = fx.backup();
    let fp = fx.fingerprint(&second);
    assert_eq!(
        (fp["packs"].as_u64(), fp["packs_uploaded"].as_u64()),
        (Some(2), Some(1)),
        "{fp}"
    );
    assert!(fp.get("repacked").is_none(), "{fp}");

    // Prune deletes the first backup; the first pack stays (named by the second), noted as
    // mostly unused.
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("2 stored, 2 named by snapshots; deleted 0")
            && r.stderr.contains("1 pack(s) less than half named"),
        "{}",
        r.stderr
    );
    assert!(fx.dir.path().join("repo/state/repack.age").exists());

    // The next backup reads the 20 unchanged files again and packs them anew.
    let third = fx.backup();
    let fp = fx.fingerprint(&third);
    assert_eq!(fp["repacked"], 20, "{fp}");
    assert_eq!(fp["blobs_uploaded"], 20, "{fp}");
    assert_eq!(
        (fp["packs"].as_u64(), fp["packs_uploaded"].as_u64()),
        (Some(2), Some(1)),
        "{fp}"
    );
    assert_eq!(walk_count(&objects), 3);

    // Once no snapshot names it (and a day has passed), the first pack is collected; nothing
    // is noted any more, and the next backup repacks nothing.
    two_days_old(&objects);
    let r = fx.run(&["prune"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("3 stored, 2 named by snapshots; deleted 1")
            && !r.stderr.contains("less than half"),
        "{}",
        r.stderr
    );
    assert_eq!(walk_count(&objects), 2);
    assert!(!fx.dir.path().join("repo/state/repack.age").exists());
    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(tree(&out), tree(src.path()));
    let r = fx.check_read_data();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let fourth = fx.backup();
    let fp = fx.fingerprint(&fourth);
    assert!(fp.get("repacked").is_none(), "{fp}");
    assert_eq!(fp["blobs_uploaded"], 0, "{fp}");
}

/// A policy backing `src` up as `files` into a local directory repository, with `extra` lines
/// in the source's table.
fn setup_dir(src: &Path, extra: &str) -> Fx {
    setup(
        "url = \"file://./repo\"",
        &format!(
            "[[sources]]\nname = \"files\"\nkind = \"objects\"\nfrom = \"dir://{}\"\n{}",
            src.display(),
            extra
        ),
        Vec::new(),
    )
}

/// A new bucket of the S3 test server, behind a fault proxy of its own.
fn proxied_bucket(
    name: &str,
) -> (
    &'static S3,
    s3proxy::S3Proxy,
    tokio::runtime::Runtime,
    String,
) {
    let s3 = s3();
    let proxy = s3proxy::S3Proxy::start(&s3.endpoint);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bucket = format!("{name}-{}", suffix());
    rt.block_on(async {
        s3.client()
            .await
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
    });
    (s3, proxy, rt, bucket)
}

/// A policy backing `src` up as `files` into `bucket` through `proxy`.
fn setup_behind(proxy: &s3proxy::S3Proxy, bucket: &str, src: &Path) -> Fx {
    setup(
        &format!(
            "url = \"s3://{bucket}/lb\"\nendpoint = \"{}\"",
            proxy.endpoint
        ),
        &format!(
            "[[sources]]\nname = \"files\"\nkind = \"objects\"\nfrom = \"dir://{}\"\n",
            src.display()
        ),
        s3().env(),
    )
}

#[test]
fn a_pack_whose_upload_fails_is_aborted_and_the_run_publishes_nothing() {
    let (s3, proxy, rt, bucket) = proxied_bucket("packfail");
    // Eight contents of 1,000 KiB: one pack, sent in two parts of a multipart upload.
    let src = tempfile::tempdir().unwrap();
    for i in 0..8 {
        std::fs::write(
            src.path().join(format!("f{i}.bin")),
            pseudo_random(1000 << 10, 2 * i + 1),
        )
        .unwrap();
    }
    std::fs::write(src.path().join("small.txt"), "small\n").unwrap();
    let fx = setup_behind(&proxy, &bucket, src.path());
    proxy.add(s3proxy::Rule::new(
        "PUT",
        "partNumber=2",
        s3proxy::HttpFault::Status(400, "InvalidRequest"),
    ));
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("pack"), "{}", r.stderr);
    assert!(!proxy.fired().is_empty());
    rt.block_on(async {
        let stored = s3.keys(&bucket, "lb/objects/").await;
        assert!(
            stored.is_empty(),
            "nothing of the pack is visible: {stored:?}"
        );
        let backups = s3.keys(&bucket, "lb/backups/").await;
        assert!(
            backups.iter().all(|k| !k.ends_with("manifest.json")),
            "{backups:?}"
        );
        let pending = s3.pending_uploads(&bucket).await;
        assert!(
            pending.is_empty(),
            "the pack's upload was aborted: {pending:?}"
        );
    });

    // Once the store takes parts again, the next run stores it all.
    proxy.clear();
    fx.backup();
    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(tree(&out), tree(src.path()));
}

/// Makes every file under `dir` look written two days ago (past blob collection's grace).
fn two_days_old(dir: &Path) {
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
    for p in files_under(dir) {
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
}

fn walk_count(dir: &Path) -> usize {
    files_under(dir).len()
}

#[test]
fn symlinks_and_odd_names_are_stored_exactly_and_what_cannot_be_is_named() {
    use std::os::unix::fs::symlink;
    let src = tempfile::tempdir().unwrap();
    let root = src.path();
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/real.txt"), "the real file\n").unwrap();
    symlink("sub/real.txt", root.join("link")).unwrap();
    symlink("nowhere/gone.txt", root.join("dangling")).unwrap();
    symlink("sub", root.join("sub-link")).unwrap();
    symlink("/etc/hostname", root.join("sub/absolute")).unwrap();
    let fifo = root.join("a-fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let _socket = std::os::unix::net::UnixListener::bind(root.join("a-socket")).unwrap();
    // A name with a newline is stored exactly; one that is not UTF-8 cannot be, and is named.
    std::fs::write(root.join("two\nlines.txt"), "a newline in the name\n").unwrap();
    use std::os::unix::ffi::OsStrExt;
    std::fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"bad-\xff-name")),
        "x",
    )
    .unwrap();
    let fx = setup(
        "url = \"file://./repo\"",
        &format!(
            "[[sources]]\nname = \"files\"\nkind = \"objects\"\nfrom = \"dir://{}\"\n",
            root.display()
        ),
        Vec::new(),
    );
    let r = fx.run(&["backup"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("a-fifo (a FIFO)"),
        "the run names what it left out: {}",
        r.stderr
    );
    let id = fx.ids()[0].clone();
    let fp = fx.fingerprint(&id);
    assert_eq!(fp["files"], 2, "{fp}");
    assert_eq!(fp["symlinks"], 4, "{fp}");
    assert_eq!(
        fp["skipped"],
        serde_json::json!([
            "a-fifo (a FIFO)",
            "a-socket (a socket)",
            "bad-\u{fffd}-name (a name that is not UTF-8)"
        ]),
        "{fp}"
    );
    let r = fx.verify(&id);
    assert_eq!(r.code, 0, "verify: {}{}", r.stdout, r.stderr);

    // Restored as links to the same targets, never followed (the dangling one too).
    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("4 symlink(s)"), "{}", r.stderr);
    for (link, to) in [
        ("link", "sub/real.txt"),
        ("dangling", "nowhere/gone.txt"),
        ("sub-link", "sub"),
        ("sub/absolute", "/etc/hostname"),
    ] {
        let p = out.join(link);
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{link}"
        );
        assert_eq!(std::fs::read_link(&p).unwrap(), PathBuf::from(to), "{link}");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("link")).unwrap(),
        "the real file\n"
    );
    assert!(!out.join("a-fifo").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("two\nlines.txt")).unwrap(),
        "a newline in the name\n"
    );

    // Restoring again over it (--yes) replaces the links; a link changed since is put back.
    std::fs::remove_file(out.join("link")).unwrap();
    symlink("elsewhere", out.join("link")).unwrap();
    let r = fx.restore(&["--to", out.to_str().unwrap(), "--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        PathBuf::from("sub/real.txt")
    );
}

/// Peak resident memory of an objects run, whatever the object count: a budget, not a timing.
/// 64 MiB for a release build. A debug build (what the tests run by default) takes ~19 MiB more
/// of its own: `lifeboat list` on a repository holding a backup peaks at 34 MiB debug, 16 MiB
/// release.
const RUN_MEMORY_KIB: u64 = if cfg!(debug_assertions) { 88 } else { 64 } << 10;

#[test]
fn a_hundred_thousand_objects_are_backed_up_in_bounded_memory_and_a_shared_content_is_stored_once()
{
    let src = tempfile::tempdir().unwrap();
    let n = 100_000;
    for d in 0..100 {
        let dir = src.path().join(format!("d{d:02}"));
        std::fs::create_dir(&dir).unwrap();
        for i in 0..n / 100 {
            // The last directory holds the first one's contents, 99,000 names later.
            let content = format!("{}/{i}\n", if d == 99 { 0 } else { d });
            std::fs::write(dir.join(format!("f{i:04}")), content).unwrap();
        }
    }
    let distinct = n - n / 100;
    let fx = setup_dir(src.path(), "retention = { keep_last = 1 }\n");
    // Each command within the budget; how long it took is shown, not asserted.
    let within = |what: &str, run: &dyn Fn() -> Run| {
        let t = std::time::Instant::now();
        let r = run();
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        assert!(
            r.peak_rss_kib > 0 && r.peak_rss_kib <= RUN_MEMORY_KIB,
            "{what} over {n} objects: peak RSS {} KiB",
            r.peak_rss_kib
        );
        eprintln!(
            "{what} over {n} objects: peak RSS {} KiB, {:.1} s",
            r.peak_rss_kib,
            t.elapsed().as_secs_f64()
        );
        r
    };
    let r = within("first backup", &|| fx.run(&["backup", "--json"]));
    // The contents go into packs of 16 MiB, each stored in parts of 5 MiB: a few dozen PUTs
    // in all with the snapshot's and the blob list's, not one per content; nothing deleted (no
    // older change index to clear on a first run).
    let result: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let requests = &result[0]["requests"]["repository"];
    let puts = requests["put"].as_u64().unwrap();
    assert!((3..40).contains(&puts), "{requests}");
    assert_eq!(requests["delete"], 0, "{requests}");
    let id = fx.ids()[0].clone();
    let fp = fx.fingerprint(&id);
    assert_eq!(fp["files"], n, "{fp}");
    assert_eq!(fp["dirs"], 100, "{fp}");
    assert_eq!(fp["blobs"], distinct, "{fp}");
    assert_eq!(
        fp["blobs_uploaded"], distinct,
        "a content shared across the run is stored once: {fp}"
    );
    let packs = fp["packs"].as_u64().unwrap();
    assert!((1..5).contains(&packs), "{fp}");
    assert_eq!(
        walk_count(&fx.dir.path().join("repo/objects")) as u64,
        packs
    );

    // 1 % changed: 999 new contents, and one file given the content of another (named by the
    // last snapshot's blob list, with its place in a pack, so not stored again).
    for i in 0..n / 100 - 1 {
        std::fs::write(
            src.path().join(format!("d07/f{i:04}")),
            format!("new {i}\n"),
        )
        .unwrap();
    }
    std::fs::write(src.path().join("d07/f0999"), "3/5\n").unwrap();
    within("backup, 1 % changed", &|| fx.run(&["backup"]));
    let id2 = fx.ids()[0].clone();
    let fp2 = fx.fingerprint(&id2);
    assert_eq!(fp2["files"], n, "{fp2}");
    assert_eq!(fp2["blobs_uploaded"], n / 100 - 1, "{fp2}");
    assert_eq!(fp2["packs_uploaded"], 1, "{fp2}");
    assert_eq!(fp2["packs"], packs + 1, "{fp2}");
    assert_eq!(
        fp2["blobs"],
        distinct - 1,
        "two more files share a content: {fp2}"
    );
    assert_ne!(fp["tree_sha256"], fp2["tree_sha256"]);

    // The snapshot names exactly the source's contents, and every blob it names is stored.
    assert_eq!(fp2["tree_sha256"], tree_sha256(src.path()), "{fp2}");
    let r = within("check", &|| fx.run(&["check", "--json"]));
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    // A HEAD for each distinct pack the two backups name, each once (and the backups' own
    // objects): not one per content.
    let heads = report["requests"]["head"].as_u64().unwrap();
    assert!((packs + 1..100).contains(&heads), "{report}");

    // Restoring, verifying and collecting blobs stream the snapshot and the blob lists too.
    let to = fx.dir.path().join("restored");
    let r = within("restore", &|| {
        fx.restore(&["--to", to.to_str().unwrap(), "--json"])
    });
    let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    // The snapshot, then the packs in windows of 2 MiB, each read once in path order (and a
    // content that crosses a window's end on its own): not one GET per file.
    let gets = done["requests"]["get"].as_u64().unwrap();
    let windows = fx.dir.path().join("repo/objects");
    let stored: u64 = files_under(&windows)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let windows = stored.div_ceil(2 << 20);
    assert!(
        (windows + 1..3 * windows + 3).contains(&gets),
        "{windows} windows: {}",
        done["requests"]
    );
    assert!(tree(&to) == tree(src.path()), "the restored tree differs");
    // One directory: read from the snapshot's frames that hold it, where it is stored.
    let one = fx.dir.path().join("d57");
    let r = within("restore --path", &|| {
        fx.restore(&["--to", one.to_str().unwrap(), "--path", "d57", "--json"])
    });
    let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let read = done["result"]["restored"]["snapshot_read"]
        .as_u64()
        .unwrap();
    let stored = std::fs::metadata(
        fx.dir
            .path()
            .join(format!("repo/backups/files/{id2}/snapshot.jsonl.zst.age")),
    )
    .unwrap()
    .len();
    assert!(read > 0 && read < stored / 2, "read {read} of {stored}");
    let want: BTreeMap<_, _> = tree(src.path())
        .into_iter()
        .filter(|(p, _)| p == "d57" || p.starts_with("d57/"))
        .collect();
    assert_eq!(want.len(), 1001);
    assert!(tree(&one) == want, "the restored directory differs");
    within("verify", &|| fx.verify(&id2));
    // Its report says what it asked: the snapshot, the blob list and the fingerprint, then the
    // packs' windows, each read once: the contents are re-hashed in the order they lie in.
    let reports = files_under(
        &fx.dir
            .path()
            .join(format!("repo/verifications/files/{id2}")),
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&reports[0]).unwrap()).unwrap();
    assert_eq!(report["result"], "pass", "{report}");
    let gets = report["requests"]["get"].as_u64().unwrap();
    assert!(
        (windows + 3..3 * windows + 10).contains(&gets),
        "{windows} windows: {}",
        report["requests"]
    );
    // The first backup goes; the 1,000 contents only it named are in packs that hold contents
    // the second names too, so every pack stays.
    let r = within("prune", &|| fx.run(&["prune"]));
    assert!(
        r.stderr.contains(&format!(
            "{} stored, {} named by snapshots; deleted 0",
            packs + 1,
            packs + 1
        )) && !r.stderr.contains("unreferenced"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.ids(), vec![id2]);
}

/// Of `requests` (as the proxy logs them), the GETs of `key`: the bytes their ranges asked
/// for, how many, and whether every one asked for a range.
fn ranged_bytes(requests: &[String], key: &str) -> (u64, usize, bool) {
    let gets: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains(key))
        .collect();
    let bytes = gets
        .iter()
        .filter_map(|r| r.split_once(" range=bytes="))
        .map(|(_, range)| {
            let (a, b) = range.split_once('-').unwrap();
            b.parse::<u64>().unwrap() + 1 - a.parse::<u64>().unwrap()
        })
        .sum();
    let all_ranged = gets.iter().all(|r| r.contains(" range="));
    (bytes, gets.len(), all_ranged)
}

#[test]
fn a_path_is_restored_from_the_snapshot_frames_that_hold_it_and_no_others() {
    let (s3, proxy, rt, bucket) = proxied_bucket("frames");
    // 48,000 empty files with long names of little redundancy: a snapshot of several 4 MiB
    // frames, stored in several age chunks each, and no blob to store but for the few files
    // with content.
    let src = tempfile::tempdir().unwrap();
    for d in 0..48 {
        let dir = src.path().join(format!("d{d:02}"));
        std::fs::create_dir(&dir).unwrap();
        for i in 0..1000 {
            use sha2::Digest;
            let name = hex::encode(sha2::Sha512::digest(format!("{d}/{i}")));
            std::fs::write(dir.join(format!("{i:04}-{name}")), "").unwrap();
        }
    }
    std::fs::create_dir(src.path().join("d23/sub")).unwrap();
    std::fs::write(src.path().join("d23/hello.txt"), "hello\n").unwrap();
    std::fs::write(src.path().join("d23/sub/deep.txt"), "deep\n").unwrap();
    std::fs::write(src.path().join("d23-x.txt"), "beside d23, not under it\n").unwrap();
    let fx = setup_behind(&proxy, &bucket, src.path());
    let id = fx.backup();
    let manifest: serde_json::Value = serde_json::from_slice(
        &rt.block_on(s3.get(&bucket, &format!("lb/backups/files/{id}/manifest.json"))),
    )
    .unwrap();
    let part = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "snapshot")
        .unwrap()
        .clone();
    let stored = part["size_stored"].as_u64().unwrap();
    let frames = part["seek"]["frames"].as_array().map_or(0, Vec::len);
    assert!(frames >= 3, "the snapshot's frames: {part}");
    let snapshot = format!("{id}/snapshot.jsonl.zst.age");

    // One file: the fingerprint (its frames' first paths), one frame of the snapshot, one blob.
    let before = proxy.requests().len();
    let one = fx.dir.path().join("one");
    let r = fx.restore(&[
        "--to",
        one.to_str().unwrap(),
        "--path",
        "d23/hello.txt",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(one.join("d23/hello.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(walk_count(&one), 1, "only the path is restored");
    let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let read = done["result"]["restored"]["snapshot_read"]
        .as_u64()
        .unwrap();
    let requests = proxy.requests().split_off(before);
    let (bytes, gets, all_ranged) = ranged_bytes(&requests, &snapshot);
    assert!(all_ranged, "the snapshot is never read whole: {requests:?}");
    assert_eq!(gets, 2, "its header, then its frame: {requests:?}");
    assert!(
        bytes < stored / 2 && read <= bytes,
        "read {read} ({bytes} in ranges) of the snapshot's {stored} stored bytes: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("/lb/objects/"))
            .count()
            == 1,
        "one blob read: {requests:?}"
    );

    // A directory: exactly what is under it, across a frame's end, and not `d23-x.txt`.
    for d in ["d00", "d23", "d47"] {
        let to = fx.dir.path().join(format!("dir-{d}"));
        let r = fx.restore(&["--to", to.to_str().unwrap(), "--path", d, "--json"]);
        assert_eq!(r.code, 0, "{d}: {}", r.stderr);
        let want: BTreeMap<_, _> = tree(src.path())
            .into_iter()
            .filter(|(p, _)| p == d || p.starts_with(&format!("{d}/")))
            .map(|(p, (sha, _))| (p, sha))
            .collect();
        let got: BTreeMap<_, _> = tree(&to)
            .into_iter()
            .map(|(p, (sha, _))| (p, sha))
            .collect();
        assert_eq!(got.len(), want.len(), "{d}");
        assert!(got == want, "{d}: the restored tree differs");
        let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert!(
            done["result"]["restored"]["snapshot_read"]
                .as_u64()
                .unwrap()
                < stored,
            "{d}: {done}"
        );
    }

    // A path the snapshot does not hold is refused, whichever frames are read for it.
    let none = fx.dir.path().join("none");
    let r = fx.restore(&["--to", none.to_str().unwrap(), "--path", "d23/nope"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("holds nothing at \"d23/nope\""),
        "{}",
        r.stderr
    );

    // A fingerprint that cannot be read leaves the snapshot to be read whole, and checked
    // whole: the path still restores.
    let fingerprint = format!("lb/backups/files/{id}/fingerprint.json.age");
    let kept = rt.block_on(s3.get(&bucket, &fingerprint));
    let put = |body: Vec<u8>| rt.block_on(s3.put(&bucket, &fingerprint, body));
    put(b"damaged".to_vec());
    let whole = fx.dir.path().join("whole");
    let r = fx.restore(&[
        "--to",
        whole.to_str().unwrap(),
        "--path",
        "d23/hello.txt",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("fingerprint cannot be read"),
        "{}",
        r.stderr
    );
    let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        done["result"]["restored"]["snapshot_read"], stored,
        "{done}"
    );
    assert_eq!(
        std::fs::read_to_string(whole.join("d23/hello.txt")).unwrap(),
        "hello\n"
    );
    put(kept);

    // The whole snapshot still restores whole.
    let all = fx.dir.path().join("all");
    let r = fx.restore(&["--to", all.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        done["result"]["restored"]["snapshot_read"], stored,
        "{done}"
    );
    assert!(tree(&all) == tree(src.path()), "the restored tree differs");
}

/// The tree hash a snapshot of the files under `root` must carry: `path NUL sha256 LF` of each
/// file, in byte order of the paths.
fn tree_sha256(root: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (path, (sha, _)) in tree(root) {
        if sha != "dir" {
            h.update(format!("{path}\0{sha}\n"));
        }
    }
    hex::encode(h.finalize())
}

/// `backup` while `meanwhile` runs on a thread of its own, its flag set once the run ends: the
/// run, and what `meanwhile` returned.
fn backup_while<T: Send + 'static>(
    fx: &Fx,
    meanwhile: impl FnOnce(std::sync::Arc<std::sync::atomic::AtomicBool>) -> T + Send + 'static,
) -> (Run, T) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        std::thread::spawn(move || meanwhile(stop))
    };
    let r = fx.run(&["backup"]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    (r, worker.join().unwrap())
}

/// A source that changes under the run: what it read whole is stored exactly, what it could
/// not read consistently is named in the snapshot, and the run still publishes.
#[test]
fn a_file_appended_to_during_the_run_is_stored_as_its_first_read_saw_it() {
    use std::io::Write;
    let src = tempfile::tempdir().unwrap();
    let root = src.path().to_path_buf();
    std::fs::write(root.join("steady.txt"), "steady\n").unwrap();
    // Over 1 MiB: hashed by one read, stored by a second one.
    let first = pseudo_random(3 << 20, 11);
    std::fs::write(root.join("growing.log"), &first).unwrap();
    let fx = setup_dir(&root, "");
    let path = root.join("growing.log");
    let (r, lines) = backup_while(&fx, move |stop| {
        let mut log = std::fs::File::options().append(true).open(path).unwrap();
        let mut lines = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            lines += 1;
            writeln!(log, "line {lines}").unwrap();
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        lines
    });
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(lines > 0);
    let id = fx.ids()[0].clone();
    let fp = fx.fingerprint(&id);
    assert_eq!(fp["files"], 2, "{fp}");
    assert!(fp.get("skipped").is_none(), "nothing left out: {fp}");

    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let stored = std::fs::read(out.join("growing.log")).unwrap();
    let now = std::fs::read(root.join("growing.log")).unwrap();
    assert!(
        stored.len() >= first.len() && now.starts_with(&stored),
        "stored {} bytes of a log now {} bytes long: a prefix of it, at least what it held first",
        stored.len(),
        now.len()
    );
    let r = fx.verify(&id);
    assert_eq!(r.code, 0, "verify: {}{}", r.stdout, r.stderr);

    // The next run stores what was appended since.
    fx.backup();
    let r = fx.restore(&["--to", out.to_str().unwrap(), "--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(out.join("growing.log")).unwrap(), now);
}

/// An S3 source read through a proxy that holds each GET of two objects for a moment, while the
/// test deletes one and rewrites the other on the real server: the deleted one is named as
/// gone, the rewritten one as changing at every read, and the run publishes the rest, a
/// 1,024-byte key among them, exactly.
#[test]
fn objects_deleted_or_rewritten_while_read_are_named_and_a_1024_byte_key_is_stored_exactly() {
    let (s3, proxy, rt, bucket) = proxied_bucket("changing");
    // S3's longest key, in path components a directory can hold (255 bytes at most each).
    let dir = "d".repeat(200);
    let long = format!(
        "up/{dir}/{dir}/{dir}/{dir}/{}",
        "t".repeat(1024 - 3 - 4 * 201)
    );
    assert_eq!(long.len(), 1024);
    let objects: Vec<(String, Vec<u8>)> = vec![
        ("up/steady.txt".into(), b"steady\n".to_vec()),
        (long.clone(), b"the longest key\n".to_vec()),
        // Over 1 MiB: each is read twice, hashed then stored.
        ("up/gone.bin".into(), pseudo_random(2 << 20, 21)),
        ("up/churn.bin".into(), pseudo_random(2 << 20, 22)),
    ];
    rt.block_on(async {
        for (k, v) in &objects {
            s3.put(&bucket, k, v.clone()).await;
        }
    });
    let fx = setup(
        "url = \"file://./repo\"",
        &format!(
            "[[sources]]\nname = \"files\"\nkind = \"objects\"\nfrom = \"s3://{bucket}/up/\"\nendpoint = \"{}\"\n",
            proxy.endpoint
        ),
        s3.env(),
    );
    for key in ["gone.bin", "churn.bin"] {
        proxy.add(s3proxy::Rule::new(
            "GET",
            &format!("/up/{key}"),
            s3proxy::HttpFault::Delay(std::time::Duration::from_millis(700)),
        ));
    }
    let (proxy_fired, bucket_changed) = (proxy.clone(), bucket.clone());
    let (r, rewrites) = backup_while(&fx, move |done| {
        let rt = lifeboat_tests::rt();
        let (mut deleted, mut rewrites) = (false, 0usize);
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let fired = proxy_fired.fired();
            if !deleted && fired.iter().any(|f| f.contains("/up/gone.bin")) {
                rt.block_on(s3.delete(&bucket_changed, "up/gone.bin"));
                deleted = true;
            }
            // A new content for every read of it, while that read is held.
            let reads = fired.iter().filter(|f| f.contains("/up/churn.bin")).count();
            while rewrites < reads {
                rewrites += 1;
                let new = pseudo_random(2 << 20, 100 + rewrites as u64);
                rt.block_on(s3.put(&bucket_changed, "up/churn.bin", new));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        rewrites
    });
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(rewrites, 6, "two reads in each of three attempts");
    assert!(r.stderr.contains("gone.bin"), "{}", r.stderr);
    let id = fx.ids()[0].clone();
    let fp = fx.fingerprint(&id);
    assert_eq!(fp["files"], 2, "{fp}");
    assert_eq!(
        fp["skipped"],
        serde_json::json!([
            "churn.bin (changed while it was read, 3 times)",
            "gone.bin (deleted before it could be read)"
        ]),
        "{fp}"
    );
    let out = fx.dir.path().join("restored");
    let r = fx.restore(&["--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(out.join("steady.txt")).unwrap(), b"steady\n");
    let long_path = out.join(long.strip_prefix("up/").unwrap());
    assert_eq!(std::fs::read(&long_path).unwrap(), b"the longest key\n");
    assert!(!out.join("gone.bin").exists() && !out.join("churn.bin").exists());

    // Once it holds still, the next run stores it.
    proxy.clear();
    let second = fx.backup();
    let fp = fx.fingerprint(&second);
    assert_eq!(fp["files"], 3, "{fp}");
    assert!(fp.get("skipped").is_none(), "{fp}");
    let r = fx.restore(&["--to", out.to_str().unwrap(), "--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read(out.join("churn.bin")).unwrap(),
        pseudo_random(2 << 20, 100 + rewrites as u64)
    );
}
