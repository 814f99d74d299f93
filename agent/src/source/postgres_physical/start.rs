//! `lifeboat restore … --start`: starts a server on a restored data directory that is set to
//! recover to a target, and waits until recovery reached it and the cluster was promoted.
//!
//! The server is started with `pg_ctl`, so it keeps running after lifeboat exits, on the port
//! given and with its socket in the data directory. As root, the directory is given to the
//! `postgres` OS user and the server runs as it. The wait reads only the server's log (its
//! messages in English, `lc_messages=C`) and `postmaster.pid`, so it needs no credentials for the
//! restored cluster's roles.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// The server's log, beside its files.
pub const LOG: &str = "lifeboat-start.log";

/// A server running on the restored directory, out of recovery.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Started {
    /// Its port.
    pub port: u16,
    /// Its log.
    pub log: PathBuf,
    /// The OS user it runs as, when lifeboat ran as root.
    pub user: Option<String>,
    /// What recovery logged about where it stopped.
    pub recovery: Vec<String>,
}

/// Starts the server in `bin` on `dir` at `port` and waits until it is promoted, telling
/// `progress` of each segment of `segment_size` bytes the server restored from the archive.
pub async fn start(
    bin: &Path,
    dir: &Path,
    port: u16,
    progress: &dyn crate::restore::Progress,
    segment_size: u64,
) -> Result<Started> {
    use crate::source::child;
    let user = child::running_as_root().then(|| "postgres".to_string());
    let mut command: Vec<std::ffi::OsString> = Vec::new();
    if let Some(u) = &user {
        child::hand_over(dir, u, true).map_err(|why| {
            Error::failed(format!("{why}, whom the server must run as"))
            .hint("create the postgres OS user (the server refuses to run as root), or run lifeboat as the server's own user")
        })?;
        command.extend(child::as_user(u));
    }
    let log = dir.join(LOG);
    let socket_dir = super::pitr::shell_word(&dir.display().to_string());
    command.extend([
        bin.join("pg_ctl").into_os_string(),
        "-D".into(),
        dir.as_os_str().to_owned(),
        "-l".into(),
        log.as_os_str().to_owned(),
        "-W".into(),
        "-o".into(),
        format!("-p {port} -k {socket_dir} -c lc_messages=C").into(),
        "start".into(),
    ]);
    let out = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::failed(format!("cannot run {}: {e}", command[0].to_string_lossy())))?;
    if !out.status.success() {
        return Err(Error::failed(format!(
            "pg_ctl start on {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let started = std::time::Instant::now();
    let pid = dir.join("postmaster.pid");
    let mut seen_pid = false;
    let mut restored = 0;
    // A recovery that restores nothing for this long is said to be stalled (it may only be
    // replaying a heavy segment): the operator is told where to look, and the wait goes on.
    const STALL: Duration = Duration::from_secs(300);
    let mut moved = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let now = text.matches("restored log file \"").count() as u64;
        progress.advance(now.saturating_sub(restored) * segment_size);
        if now > restored {
            moved = std::time::Instant::now();
        } else if moved.elapsed() >= STALL {
            tracing::warn!(
                log = %log.display(),
                restored = now,
                "No WAL restored from the archive for 5 minutes; still waiting (Ctrl-C stops the wait, not the server). The server's log says what it does"
            );
            moved = std::time::Instant::now();
        }
        restored = restored.max(now);
        if text.contains("database system is ready to accept connections") {
            // Recovery is over: what `wal fetch --prefetch` fetched ahead is not needed.
            let _ = std::fs::remove_dir_all(dir.join(super::fetch::PREFETCH_DIR));
            let recovery = text
                .lines()
                .filter(|l| {
                    [
                        "recovery stopping",
                        "redo done at",
                        "last completed transaction",
                        "selected new timeline ID",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
                })
                .map(|l| l.split_once(":  ").map_or(l, |(_, m)| m).to_string())
                .collect();
            return Ok(Started {
                port,
                log,
                user,
                recovery,
            });
        }
        seen_pid |= pid.exists();
        let gone = if seen_pid {
            !pid.exists()
        } else {
            started.elapsed() > Duration::from_secs(30)
        };
        if gone || text.contains("database system is shut down") {
            return Err(failed_recovery(dir, &text));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The error for a server that stopped before it was promoted, from its log.
fn failed_recovery(dir: &Path, log: &str) -> Error {
    let mut tail = crate::source::child::last_lines(log, 15);
    let ahead = dir
        .join(super::fetch::PREFETCH_DIR)
        .join(super::fetch::PREFETCH_LOG);
    if let Some(said) = std::fs::read_to_string(&ahead)
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        let said = crate::source::child::last_lines(&said, 5);
        tail = format!("{tail}\nfetching ahead ({}):\n{said}", ahead.display());
    }
    let d = dir.display();
    let damaged = log.contains("SHA-256") || log.contains("WAL of another cluster");
    if log.contains("could not restore file") && damaged {
        Error::new(
            ErrorKind::Integrity,
            format!("recovery on {d} stopped at a damaged WAL object; the server did not open:\n{tail}"),
        )
        .hint("restore again to a target before it (or from an older base backup), and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)")
    } else if log.contains("recovery ended before configured recovery target was reached") {
        Error::failed(format!(
            "recovery on {d} reached the end of the archive before the target; the server did not open:\n{tail}"
        ))
        .hint("no commit after the target reached the archive: restore with --latest (RUNBOOK.md#to-a-point-in-time)")
    } else {
        Error::failed(format!(
            "the server on {d} stopped before recovery ended:\n{tail}"
        ))
        .hint("its log says why; fix that and start it with pg_ctl, or restore again (RUNBOOK.md#to-a-point-in-time)")
    }
}
