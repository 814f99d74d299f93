//! Restoring a Redis snapshot: spooled and checked first (exit 13, target untouched), then written
//! to `DIR/dump.rdb` through a temp file, or loaded into a scratch redis-server whose keys move
//! into the live target.

use super::load;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::{Manifest, Part, Role};
use crate::repo::Repository;
use crate::restore::{counting, part, spool, Outcome, Plan, Progress, Refusal, Request};
use crate::source::SourceConfig;

/// Where a Redis backup goes.
#[derive(Debug, Clone)]
pub enum RedisDestination {
    /// `DIR/dump.rdb`, for a server to load at start.
    Dir(std::path::PathBuf),
    /// A live server, key by key.
    Live {
        /// The server.
        target: Box<crate::source::redis::load::Target>,
        /// `FLUSHALL` first.
        flush: bool,
    },
}

/// What a Redis restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RedisRestored {
    /// The files written (`Dir`): `dump.rdb`, or one per shard of a cluster.
    pub files: Vec<std::path::PathBuf>,
    /// Keys written per database and keys that had expired (`Live`).
    pub moved: Option<crate::source::redis::load::Moved>,
}

/// The snapshots of a backup: one, or a cluster's shards in slot order.
fn snapshots(manifest: &Manifest) -> Result<Vec<&Part>> {
    let found: Vec<&Part> = manifest
        .parts
        .iter()
        .filter(|p| p.role == Role::Snapshot)
        .collect();
    if found.is_empty() {
        part(manifest, Role::Snapshot)?;
    }
    Ok(found)
}

/// A cluster shard's name (`shard-0`) from its object's; `None` for a single server's snapshot.
fn shard_of(part: &Part) -> Option<&str> {
    part.name
        .strip_suffix(".rdb.zst.age")
        .filter(|n| n.starts_with("shard-"))
}

/// Restores a Redis backup, one snapshot at a time (a cluster's shards in turn): each is spooled
/// and checked first (exit 13, target untouched), then written to `DIR/dump.rdb` (a shard's to
/// `DIR/<shard>/dump.rdb`, with the slot map in `DIR/slots.json`) through a temp file, or loaded
/// into an ephemeral redis-server whose keys move into the live target with `RESTORE … REPLACE`.
pub async fn restore_redis(
    repo: &Repository,
    manifest: &Manifest,
    destination: &RedisDestination,
    redis_bin_dir: Option<&std::path::Path>,
    spool_dir: &std::path::Path,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    progress: std::sync::Arc<dyn Progress>,
) -> Result<RedisRestored> {
    let parts = snapshots(manifest)?;
    let mut done = RedisRestored {
        files: Vec::new(),
        moved: None,
    };
    // Every snapshot is downloaded and checked before the target is touched.
    let mut spooled = Vec::with_capacity(parts.len());
    for part in &parts {
        progress.phase(
            &format!("downloading and checking {}", part.name),
            Some(part.size_stored),
        );
        spooled.push(spool(repo, manifest, part, spool_dir, progress.as_ref()).await?);
    }
    for (i, (part, spooled)) in parts.iter().zip(spooled).enumerate() {
        let shard = shard_of(part)
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        progress.phase(&format!("decrypting{shard}"), Some(part.size_plain));
        let plain = counting(spooled.plaintext(identities).await?, progress.clone());
        match destination {
            RedisDestination::Dir(dir) => {
                let into = match shard_of(part) {
                    Some(name) => dir.join(name),
                    None => dir.clone(),
                };
                std::fs::create_dir_all(&into).map_err(|e| {
                    Error::failed(format!("--to {}: cannot create it: {e}", into.display()))
                })?;
                let file = into.join("dump.rdb");
                load::write_rdb(plain, &file).await?;
                done.files.push(file);
            }
            RedisDestination::Live { target, flush } => {
                let scratch = load::Scratch::start(redis_bin_dir, plain, false).await?;
                let result = async {
                    let loaded = scratch.target().keyspace().await?;
                    if *flush && i == 0 {
                        progress.phase(&format!("FLUSHALL on {}", target.shown), None);
                        load::flush_all(target).await?;
                    }
                    progress.phase(
                        &format!("moving keys{shard} into {}", target.shown),
                        Some(loaded.values().map(|v| v.0).sum()),
                    );
                    let dbs: Vec<u32> = loaded.keys().copied().collect();
                    let p = progress.clone();
                    let mut moved =
                        load::move_keys(scratch.target(), target, &dbs, &move |n| p.advance(n))
                            .await?;
                    // Every shard holds the cluster's libraries: the first replaces the target's.
                    moved.functions =
                        load::move_functions(scratch.target(), target, *flush && i == 0).await?;
                    Ok::<_, Error>(moved)
                }
                .await;
                scratch.stop().await;
                let moved = result?;
                let all = done.moved.get_or_insert_with(Default::default);
                for (db, n) in moved.keys {
                    *all.keys.entry(db).or_default() += n;
                }
                all.expired += moved.expired;
                all.functions = all.functions.max(moved.functions);
            }
        }
    }
    if let (RedisDestination::Dir(dir), true) = (destination, parts.len() > 1) {
        let file = dir.join("slots.json");
        let fp = crate::restore::fingerprint(repo, manifest, identities).await?;
        let map: Vec<serde_json::Value> = fp["cluster"]
            .as_array()
            .map(|shards| {
                shards
                    .iter()
                    .map(|s| serde_json::json!({ "shard": s["name"], "slots": s["slots"], "captured_from": s["node"], "keys": s["rdb"]["databases"]["0"]["keys"] }))
                    .collect()
            })
            .unwrap_or_default();
        let text = serde_json::to_vec_pretty(&map)
            .map_err(|e| Error::failed(format!("cannot encode the slot map: {e}")))?;
        std::fs::write(&file, text)
            .map_err(|e| Error::failed(format!("writing {}: {e}", file.display())))?;
        done.files.push(file);
    }
    Ok(done)
}

/// Plans a restore into a live server (`redis://…`) or a directory (`DIR/dump.rdb`): refuses
/// options for other kinds, looks at the target, and asks for confirmation when it holds data.
pub async fn plan(req: &Request<'_>) -> Result<Plan> {
    let o = req.options;
    let m = &req.entry.manifest;
    let (bin_dir, tls_ca_file) = match req.policy.source(&m.source).map(|s| &s.config) {
        Some(SourceConfig::Redis(c)) => (c.bin_dir.clone(), c.tls_ca_file.clone()),
        _ => (None, None),
    };
    if o.jobs != 1 || o.with_globals || o.no_owner {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--jobs, --with-globals and --no-owner apply to PostgreSQL restores",
        ));
    }
    let live = [
        "redis://",
        "rediss://",
        "redis+cluster://",
        "rediss+cluster://",
    ]
    .iter()
    .any(|scheme| req.to.starts_with(scheme));
    let shards: Vec<&str> = snapshots(m)?.into_iter().filter_map(shard_of).collect();
    let (destination, shown, existing, action) = if live {
        let target = load::Target::parse(req.to, tls_ca_file.as_deref())?;
        let keyspace = target.keyspace().await?;
        let keys: u64 = keyspace.values().map(|v| v.0).sum();
        let libraries = load::function_libraries(&target).await?;
        let mut action = match (shards.len(), target.is_cluster()) {
            (0, true) => "each key goes to the node owning its slot; ".to_string(),
            (n, true) => format!("the {n} shards in turn, each key to the node owning its slot (any number of shards); "),
            (n, false) if n > 0 => format!("the {n} shards in turn, merged into this one server; "),
            _ => String::new(),
        };
        action.push_str(&match (keys, o.flush) {
            (0, _) => "load the snapshot into a scratch redis-server, then copy every key with its TTL (RESTORE … REPLACE)".to_string(),
            (n, true) => format!("FLUSHALL: delete the {n} key(s) the target holds, then copy every key of the backup with its TTL"),
            (n, false) => format!("the target holds {n} key(s): keys of the same name are replaced, the others stay (--flush deletes them first)"),
        });
        action.push_str(&match (libraries, o.flush) {
            (0, _) => "; then any Redis Functions libraries it holds (FUNCTION RESTORE)".to_string(),
            (n, true) => format!("; then any Redis Functions libraries it holds, deleting the target's {n} first (FUNCTION RESTORE FLUSH)"),
            (n, false) => format!("; then any Redis Functions libraries it holds: the target holds {n}, those of the same name are replaced (FUNCTION RESTORE REPLACE)"),
        });
        action.push_str(
            ". Not restored: ACL users and configuration, which live outside the snapshot",
        );
        let keys = keys + libraries;
        let shown = target.shown.clone();
        let destination = RedisDestination::Live {
            target: Box::new(target),
            flush: o.flush,
        };
        (destination, shown, keys, action)
    } else {
        if o.flush {
            return Err(Error::new(
                ErrorKind::Invalid,
                "--flush applies to a live target (redis://…), not to a directory",
            ));
        }
        let dir = std::path::PathBuf::from(req.to);
        if dir.exists() && !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("--to {}: not a directory", dir.display()),
            )
            .hint("give a directory (dump.rdb is written into it), redis://HOST:PORT or redis+cluster://HOST:PORT"));
        }
        let files: Vec<std::path::PathBuf> = match shards.as_slice() {
            [] => vec![dir.join("dump.rdb")],
            names => names
                .iter()
                .map(|n| dir.join(n).join("dump.rdb"))
                .chain([dir.join("slots.json")])
                .collect(),
        };
        let existing: Vec<String> = files
            .iter()
            .filter(|f| f.exists())
            .map(|f| f.display().to_string())
            .collect();
        let shown_files = match files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} (one dump.rdb per shard) and the slot map {}",
                many[..many.len() - 1]
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                many[many.len() - 1].display()
            ),
        };
        let action = if existing.is_empty() {
            format!("write {shown_files}")
        } else {
            format!("write {shown_files}, replacing {}", existing.join(", "))
        };
        let shown = dir.display().to_string();
        (
            RedisDestination::Dir(dir),
            shown,
            existing.len() as u64,
            action,
        )
    };
    let details = serde_json::json!({
        "target": { "to": shown, "live": live, "holds_data": existing > 0 },
        "flush": o.flush,
    });
    let apply = Box::new(Apply {
        manifest: m.clone(),
        destination,
        bin_dir,
        spool_dir: o.spool_dir.clone(),
        shown: shown.clone(),
    });
    let mut plan = Plan::new(
        req,
        shown.clone(),
        action,
        details.as_object().cloned().unwrap_or_default(),
        apply,
    );
    if existing > 0 {
        plan.refusal = Some(Refusal::new(
            &format!("{shown} already holds data"),
            "restore into an empty server or directory, or pass --yes (and --flush to delete what the server holds first) (RUNBOOK.md#restore)",
            "yes",
        ));
    }
    Ok(plan)
}

/// What a planned Redis restore carries to its apply step.
struct Apply {
    manifest: Manifest,
    destination: RedisDestination,
    bin_dir: Option<std::path::PathBuf>,
    spool_dir: std::path::PathBuf,
    shown: String,
}

#[async_trait::async_trait(?Send)]
impl crate::restore::Apply for Apply {
    async fn apply(
        self: Box<Self>,
        repo: &Repository,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        progress: std::sync::Arc<dyn Progress>,
    ) -> Result<Outcome> {
        let started = std::time::Instant::now();
        if let RedisDestination::Dir(dir) = &self.destination {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::failed(format!("--to {}: cannot create it: {e}", dir.display()))
            })?;
        }
        let done = restore_redis(
            repo,
            &self.manifest,
            &self.destination,
            self.bin_dir.as_deref(),
            &self.spool_dir,
            identities,
            progress,
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        let id = &self.manifest.id;
        let lines = match (done.files.as_slice(), &done.moved) {
            ([file], _) => vec![
                format!(
                    "restored backup {id} into {} in {seconds:.1} s",
                    file.display()
                ),
                "  next: stop the server, put this file at its dir/dbfilename, and start it with"
                    .into(),
                "        appendonly no (with AOF on, Redis loads the AOF instead of dump.rdb);"
                    .into(),
                "        then CONFIG SET appendonly yes if you use AOF (RUNBOOK.md#restore-redis)"
                    .into(),
            ],
            ([_, ..], _) => vec![
                format!(
                    "restored backup {id} into {}: {} shard(s) in {seconds:.1} s",
                    self.shown,
                    done.files.len() - 1
                ),
                "  next: slots.json says which slots each shard's dump.rdb holds: load each into a"
                    .into(),
                "        node owning those slots (appendonly no), or use restore --to redis+cluster://"
                    .into(),
                "        to send every key to the node owning it in a cluster of any shape (RUNBOOK.md#restore-redis)"
                    .into(),
            ],
            ([], Some(moved)) => {
                let total: u64 = moved.keys.values().sum();
                vec![format!(
                    "restored backup {id} into {}: {total} key(s) in {} database(s){} in {seconds:.1} s{}",
                    self.shown,
                    moved.keys.len(),
                    match moved.functions {
                        0 => String::new(),
                        n => format!(" and {n} Redis Functions librar{}", if n == 1 { "y" } else { "ies" }),
                    },
                    if moved.expired > 0 {
                        format!(", {} key(s) skipped because their TTL had run out", moved.expired)
                    } else {
                        String::new()
                    }
                )]
            }
            ([], None) => Vec::new(),
        };
        Ok(Outcome {
            result: serde_json::json!({ "restored": true, "seconds": seconds, "file": done.files.first(), "files": done.files, "moved": done.moved }),
            lines,
        })
    }
}
