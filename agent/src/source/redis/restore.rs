//! Restoring a Redis snapshot: spooled and checked first (exit 13, target untouched), then written
//! to `DIR/dump.rdb` through a temp file, or loaded into a scratch redis-server whose keys move
//! into the live target.

use super::load;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::{Manifest, Role};
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
        target: crate::source::redis::load::Target,
        /// `FLUSHALL` first.
        flush: bool,
    },
}

/// What a Redis restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RedisRestored {
    /// The file written (`Dir`).
    pub file: Option<std::path::PathBuf>,
    /// Keys written per database and keys that had expired (`Live`).
    pub moved: Option<crate::source::redis::load::Moved>,
}

/// Restores a Redis backup: the snapshot is spooled and checked first (exit 13, target untouched),
/// then written to `DIR/dump.rdb` through a temp file, or loaded into an ephemeral redis-server
/// whose keys move into the live target with `RESTORE … REPLACE`.
pub async fn restore_redis(
    repo: &Repository,
    manifest: &Manifest,
    destination: &RedisDestination,
    redis_bin_dir: Option<&std::path::Path>,
    spool_dir: &std::path::Path,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    progress: std::sync::Arc<dyn Progress>,
) -> Result<RedisRestored> {
    let part = part(manifest, Role::Snapshot)?;
    progress.phase(
        &format!("downloading and checking {}", part.name),
        Some(part.size_stored),
    );
    let spooled = spool(repo, manifest, part, spool_dir, progress.as_ref()).await?;
    progress.phase("decrypting", Some(part.size_plain));
    let plain = counting(spooled.plaintext(identities).await?, progress.clone());
    match destination {
        RedisDestination::Dir(dir) => {
            let file = dir.join("dump.rdb");
            load::write_rdb(plain, &file).await?;
            Ok(RedisRestored {
                file: Some(file),
                moved: None,
            })
        }
        RedisDestination::Live { target, flush } => {
            let scratch = load::Scratch::start(redis_bin_dir, plain, false).await?;
            let result = async {
                let loaded = scratch.target().keyspace().await?;
                if *flush {
                    progress.phase(&format!("FLUSHALL on {}", target.shown), None);
                    load::flush_all(target).await?;
                }
                progress.phase(
                    &format!("moving keys into {}", target.shown),
                    Some(loaded.values().map(|v| v.0).sum()),
                );
                let dbs: Vec<u32> = loaded.keys().copied().collect();
                let p = progress.clone();
                let mut moved =
                    load::move_keys(scratch.target(), target, &dbs, &move |n| p.advance(n)).await?;
                moved.functions = load::move_functions(scratch.target(), target, *flush).await?;
                Ok::<_, Error>(moved)
            }
            .await;
            scratch.stop().await;
            Ok(RedisRestored {
                file: None,
                moved: Some(result?),
            })
        }
    }
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
    let live = req.to.starts_with("redis://") || req.to.starts_with("rediss://");
    let (destination, shown, existing, action) = if live {
        let target = load::Target::parse(req.to, tls_ca_file.as_deref())?;
        let keyspace = target.keyspace().await?;
        let keys: u64 = keyspace.values().map(|v| v.0).sum();
        let libraries = load::function_libraries(&target).await?;
        let mut action = match (keys, o.flush) {
            (0, _) => "load the snapshot into a scratch redis-server, then copy every key with its TTL (RESTORE … REPLACE)".to_string(),
            (n, true) => format!("FLUSHALL: delete the {n} key(s) the target holds, then copy every key of the backup with its TTL"),
            (n, false) => format!("the target holds {n} key(s): keys of the same name are replaced, the others stay (--flush deletes them first)"),
        };
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
            target,
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
            .hint("give a directory (dump.rdb is written into it) or redis://HOST:PORT"));
        }
        let file = dir.join("dump.rdb");
        let exists = file.exists();
        let action = if exists {
            format!("replace {} (it exists)", file.display())
        } else {
            format!("write {}", file.display())
        };
        let shown = dir.display().to_string();
        (RedisDestination::Dir(dir), shown, u64::from(exists), action)
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
        let lines = match (&done.file, &done.moved) {
            (Some(file), _) => vec![
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
            (None, Some(moved)) => {
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
            (None, None) => Vec::new(),
        };
        Ok(Outcome {
            result: serde_json::json!({ "restored": true, "seconds": seconds, "file": done.file, "moved": done.moved }),
            lines,
        })
    }
}
