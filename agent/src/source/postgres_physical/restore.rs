//! Restoring a base backup: spooled and its SHA-256 checked first (exit 13, nothing written), then
//! unpacked into a data directory that a PostgreSQL server of the same major version starts on.
//! The server recovers from `backup_label` with the WAL the backup carries in `pg_wal/`, and is
//! consistent at the backup's stop LSN.
//!
//! The directory must be absent or empty; one that holds anything is refused (exit 14) unless the
//! operator confirms, and then only what is inside it is deleted.

use std::path::{Path, PathBuf};

use super::pitr::{self, Recovery, Replay, Target};
use super::BASE_OBJECT;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::{Manifest, Role};
use crate::repo::Repository;
use crate::restore::{counting, part, stream_plaintext, Outcome, Plan, Progress, Refusal, Request};

/// Plans a restore into `--to DIR`: refuses options for other kinds and URLs, looks at the
/// directory, and asks for confirmation when it holds anything.
pub async fn plan(req: &Request<'_>) -> Result<Plan> {
    let o = req.options;
    let m = &req.entry.manifest;
    if o.jobs != 1 || o.with_globals || o.no_owner || o.flush || o.delete_extra {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--jobs, --with-globals, --no-owner, --flush and --delete-extra do not apply to a base backup: it restores the whole cluster into a directory",
        ));
    }
    if req.to.contains("://") {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("--to {}: a base backup restores into a directory, not a server", req.to),
        )
        .hint("give an empty directory: --to /var/lib/postgresql/restore (RUNBOOK.md#restore-a-cluster)"));
    }
    let dir = PathBuf::from(req.to);
    if dir.exists() && !dir.is_dir() {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("--to {}: not a directory", dir.display()),
        )
        .hint("give an empty directory, or one that does not exist yet"));
    }
    let held = entries(&dir)?;
    let part = part(m, Role::Cluster)?;
    let action = if held > 0 {
        format!(
            "delete the {held} entr{} in {}, then unpack the cluster's files into it",
            if held == 1 { "y" } else { "ies" },
            dir.display()
        )
    } else {
        format!("unpack the cluster's files into {}", dir.display())
    };
    let mut details = serde_json::json!({
        "target": { "to": dir, "holds_data": held > 0 },
        "size_plain": part.size_plain,
    });
    if let Some(b) = &m.base_backup {
        details["base_backup"] = serde_json::to_value(b).unwrap_or_default();
    }
    let mut plan_start = None;
    let replay = match (&o.recovery, &m.base_backup) {
        (Some(recovery), Some(base)) => {
            let listed;
            let backups = if recovery.backups.is_empty() {
                listed = req.repo.list(Some(&m.source)).await?.backups;
                &listed
            } else {
                &recovery.backups
            };
            let archive =
                super::archive::Archive::read(req.repo, &m.source, base.wal_segment_size).await?;
            let replay = pitr::plan(req.entry, backups, &archive, recovery)?;
            let drill = newest_drill(backups);
            details["recovery"] = serde_json::json!({
                "target": recovery.target.to_string(),
                "timeline": recovery.timeline,
                "replay": replay,
                "newest_drill": drill,
            });
            Some((recovery.clone(), replay, drill))
        }
        _ => None,
    };
    let start = match (o.start, &replay) {
        (None, _) => None,
        (Some(port), Some(_)) => {
            let configured = req
                .policy
                .sources
                .iter()
                .find(|s| s.name == m.source)
                .and_then(|s| s.verify.postgres_bin_dir.clone());
            let major = crate::source::postgres::source_major(m.source_version.as_deref());
            let bin = super::verify::same_major_bin(configured.as_deref(), major).await?;
            plan_start = Some(format!(
                "a server ({}) on port {port}, waiting until recovery reached the target and promoted",
                bin.display()
            ));
            Some((bin, port))
        }
        (Some(_), None) => {
            return Err(Error::new(
                ErrorKind::Invalid,
                "--start needs a recovery target: --time, --lsn or --latest",
            ))
        }
    };
    let action = match &replay {
        Some((recovery, ..)) => format!("{action}, set to recover to {}", recovery.target),
        None => action,
    };
    let shown = dir.display().to_string();
    let apply = Box::new(Apply {
        manifest: m.clone(),
        dir: dir.clone(),
        recovery: replay
            .clone()
            .map(|(recovery, replay, _)| (recovery, replay)),
        start,
    });
    let mut plan = Plan::new(
        req,
        shown.clone(),
        action,
        details.as_object().cloned().unwrap_or_default(),
        apply,
    );
    if let Some((recovery, replay, drill)) = &replay {
        plan.details.extend(replay_lines(recovery, replay));
        plan.details.push(("drill", drill_line(drill.as_ref())));
        if let Some(start) = plan_start {
            plan.details.push(("start", start));
        }
    } else if let Some(b) = &m.base_backup {
        plan.details.push((
            "recovery",
            format!(
                "consistent at LSN {} on timeline {} (replay starts at {})",
                b.stop_lsn, b.timeline, b.start_lsn
            ),
        ));
    }
    plan.interrupted = match o.start {
        Some(_) => format!(
            "interrupted; if the server had started on {shown}, it goes on recovering on its own \
             (its log: {shown}/{}; stop it with pg_ctl -D {shown} stop); else the directory holds \
             a partial restore: remove what is in it",
            super::start::LOG
        ),
        None => "interrupted; the directory holds a partial restore: remove what is in it".into(),
    };
    if held > 0 {
        plan.refusal = Some(Refusal::new(
            &format!("{shown} is not empty"),
            "restore into an empty or new directory, or pass --yes to delete what it holds first (RUNBOOK.md#restore-a-cluster)",
            "yes",
        ));
    }
    Ok(plan)
}

/// The plan's lines for a point-in-time restore.
fn replay_lines(recovery: &Recovery, replay: &Replay) -> Vec<(&'static str, String)> {
    let until = match &recovery.target {
        Target::Time(_) if replay.to_end => format!(
            "the end of the archive ({}): the target is after the newest WAL stored ({}), so every change archived is replayed and none after it exists in the repository",
            replay.until_lsn,
            replay
                .reach
                .to_time
                .map_or("?".into(), |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        ),
        Target::Time(t) => format!(
            "the last commit at or before {} (recovery_target_time)",
            t.format("%Y-%m-%d %H:%M:%S%.3fZ")
        ),
        Target::Lsn(l) => format!("{l} (recovery_target_lsn)"),
        Target::Latest => format!("the end of the archive ({})", replay.until_lsn),
    };
    let timeline = recovery
        .timeline
        .map_or("the newest (latest)".to_string(), |t| t.to_string());
    let mut lines = vec![
        ("recover", until),
        (
            "replay",
            format!(
                "WAL from {} (consistent at {}) up to {}: {} segment{} in the archive, {} stored; timeline {timeline}; then promote",
                replay.from_lsn,
                replay.consistent_at,
                replay.until_lsn,
                replay.segments,
                if replay.segments == 1 { "" } else { "s" },
                crate::human_bytes(replay.bytes_stored)
            ),
        ),
    ];
    for w in &replay.windows {
        lines.push(("window", w.to_string()));
    }
    lines
}

/// The newest verification of any of the source's backups: the last time a base backup of it
/// was restored and its archived WAL replayed in scratch.
fn newest_drill(backups: &[crate::repo::catalog::Entry]) -> Option<serde_json::Value> {
    backups
        .iter()
        .filter_map(|e| Some((e, e.verification.as_ref()?)))
        .max_by(|a, b| a.1.id.cmp(&b.1.id))
        .map(|(e, v)| {
            serde_json::json!({
                "backup": e.manifest.id, "verification": v.id, "result": v.result,
                "restore_seconds": v.restore_seconds,
            })
        })
}

fn drill_line(drill: Option<&serde_json::Value>) -> String {
    let Some(d) = drill else {
        return "none: this source was never restored and replayed by lifeboat-verifier (RUNBOOK.md#alert-verificationstale)".into();
    };
    let s = |k: &str| d[k].as_str().unwrap_or("?").to_string();
    format!(
        "newest {}: verification {} of base backup {}{}",
        if d["result"] == "pass" {
            "passed"
        } else {
            "FAILED"
        },
        s("verification"),
        s("backup"),
        d["restore_seconds"]
            .as_f64()
            .map_or(String::new(), |t| format!(", restore and replay {t:.1} s"))
    )
}

/// How many entries `dir` holds (0 when it does not exist).
fn entries(dir: &Path) -> Result<usize> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(rd.count()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::failed(format!(
            "--to {}: cannot read it: {e}",
            dir.display()
        ))),
    }
}

/// Deletes what `dir` holds, and nothing outside it (symlinks are removed, not followed).
fn empty(dir: &Path) -> Result<()> {
    let fail =
        |e: std::io::Error| Error::failed(format!("--to {}: cannot empty it: {e}", dir.display()));
    for e in std::fs::read_dir(dir).map_err(fail)? {
        let e = e.map_err(fail)?;
        let kind = e.file_type().map_err(fail)?;
        if kind.is_dir() {
            std::fs::remove_dir_all(e.path()).map_err(fail)?;
        } else {
            std::fs::remove_file(e.path()).map_err(fail)?;
        }
    }
    Ok(())
}

/// Creates `dir` (mode 0700, as the server demands) or empties it.
fn ready_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if dir.exists() {
        empty(dir)?;
    } else {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::failed(format!("--to {}: cannot create it: {e}", dir.display())))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::failed(format!("--to {}: cannot set mode 0700: {e}", dir.display())))
}

/// Unpacks the base backup into `dir`, which must exist and be empty, as it downloads: the
/// stored and the plaintext SHA-256 are checked at the end, and on any failure `dir` is emptied
/// again, so nothing short of a whole, checked base backup is left there. Returns the number of
/// entries written.
pub async fn unpack_into(
    repo: &Repository,
    manifest: &Manifest,
    dir: &Path,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    progress: std::sync::Arc<dyn Progress>,
) -> Result<u64> {
    let part = part(manifest, Role::Cluster)?;
    progress.phase(
        &format!("downloading, checking and unpacking {BASE_OBJECT}"),
        Some(part.size_plain),
    );
    let unpacked = async {
        let plain = stream_plaintext(repo, manifest, part, identities).await?;
        super::tar::unpack(counting(plain, progress), dir).await
    }
    .await;
    if let Err(mut e) = unpacked {
        if let Err(left) = empty(dir) {
            e.message = format!(
                "{}; {} holds part of a base backup: remove it before starting a server there",
                e.message, left.message
            );
        }
        return Err(e);
    }
    unpacked
}

/// What a planned base backup restore carries to its apply step.
struct Apply {
    manifest: Manifest,
    dir: PathBuf,
    recovery: Option<(Recovery, Replay)>,
    start: Option<(PathBuf, u16)>,
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
        ready_dir(&self.dir)?;
        let files = unpack_into(
            repo,
            &self.manifest,
            &self.dir,
            identities,
            progress.clone(),
        )
        .await?;
        if let Some((recovery, replay)) = &self.recovery {
            configure_recovery(&self.dir, recovery, replay)?;
            let mut outcome = recovery_outcome(
                &self.dir,
                &self.manifest,
                recovery,
                replay,
                files,
                started.elapsed().as_secs_f64(),
            );
            if let Some((bin, port)) = &self.start {
                let size = self
                    .manifest
                    .base_backup
                    .as_ref()
                    .map_or(16 << 20, |b| b.wal_segment_size);
                progress.phase(
                    &format!(
                        "replaying WAL from the archive ({} segment{} to the target)",
                        replay.segments,
                        if replay.segments == 1 { "" } else { "s" }
                    ),
                    Some(replay.segments * size),
                );
                let running =
                    super::start::start(bin, &self.dir, *port, progress.as_ref(), size).await?;
                let d = self.dir.display();
                outcome.lines.truncate(1);
                outcome.lines.push(format!(
                    "  recovered and promoted in {:.1} s in all; the server runs on port {port} (log: {})",
                    started.elapsed().as_secs_f64(),
                    running.log.display()
                ));
                outcome
                    .lines
                    .extend(running.recovery.iter().map(|l| format!("    {l}")));
                outcome.lines.push(format!(
                    "  connect: psql -h {d} -p {port} (the source's roles and passwords); stop: pg_ctl -D {d} stop"
                ));
                outcome.result["started"] = serde_json::to_value(&running).unwrap_or_default();
                outcome.result["seconds"] = started.elapsed().as_secs_f64().into();
            }
            return Ok(outcome);
        }
        let seconds = started.elapsed().as_secs_f64();
        let d = self.dir.display();
        let mut lines = vec![
            format!(
                "restored base backup {} into {d} ({files} entries) in {seconds:.1} s",
                self.manifest.id
            ),
            format!("  next: give it to the server's OS user (chown -R postgres: {d}), and start"),
            format!("        a server of the same major version on it: pg_ctl -D {d} start"),
            "        (copy postgresql.conf and pg_hba.conf in first if the source kept them outside"
                .into(),
            "        its data directory, as Debian does) (RUNBOOK.md#restore-a-cluster)".into(),
        ];
        if let Some(b) = &self.manifest.base_backup {
            lines.insert(
                1,
                format!(
                    "  it recovers from backup_label with the WAL in pg_wal/ and is consistent at LSN {}",
                    b.stop_lsn
                ),
            );
        }
        Ok(Outcome {
            result: serde_json::json!({
                "restored": true, "seconds": seconds, "dir": self.dir, "entries": files,
                "base_backup": self.manifest.base_backup,
            }),
            lines,
        })
    }
}

/// Makes the restored cluster in `dir` recover to the target: `recovery.signal`, and the
/// settings appended to `postgresql.auto.conf` (which the server reads last, so they win). A
/// `standby.signal` from a backup of a standby goes: the cluster must recover and open.
fn configure_recovery(dir: &Path, recovery: &Recovery, replay: &Replay) -> Result<()> {
    use std::io::Write;
    let fail = |what: &str, e: std::io::Error| {
        Error::failed(format!("--to {}: cannot write {what}: {e}", dir.display()))
    };
    match std::fs::remove_file(dir.join("standby.signal")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(fail("standby.signal", e))
        }
        _ => {}
    }
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("postgresql.auto.conf"))
        .map_err(|e| fail("postgresql.auto.conf", e))?;
    conf.write_all(pitr::recovery_settings(recovery, replay).as_bytes())
        .and_then(|_| conf.sync_all())
        .map_err(|e| fail("postgresql.auto.conf", e))?;
    // Last: only a directory whose settings are all written is declared recoverable.
    std::fs::write(dir.join("recovery.signal"), "").map_err(|e| fail("recovery.signal", e))
}

/// What a point-in-time restore tells the operator.
fn recovery_outcome(
    dir: &Path,
    manifest: &Manifest,
    recovery: &Recovery,
    replay: &Replay,
    files: u64,
    seconds: f64,
) -> Outcome {
    let d = dir.display();
    let lines = vec![
        format!(
            "restored base backup {} into {d} ({files} entries) in {seconds:.1} s, set to recover to {}",
            manifest.id, recovery.target
        ),
        "  recovery.signal and postgresql.auto.conf make the server fetch and check WAL from the".into(),
        "  repository (lifeboat wal fetch) and replay it to the target, then promote".into(),
        format!("  next: give it to the server's OS user (chown -R postgres: {d}), and start a server"),
        format!("        of the same major version on it: pg_ctl -D {d} start"),
        "        with the environment this command had (the repository's credentials), and wait for".into(),
        "        `select pg_is_in_recovery()` to say f (RUNBOOK.md#to-a-point-in-time)".into(),
    ];
    Outcome {
        result: serde_json::json!({
            "restored": true, "seconds": seconds, "dir": dir, "entries": files,
            "base_backup": manifest.base_backup,
            "recovery": { "target": recovery.target.to_string(), "replay": replay },
        }),
        lines,
    }
}
