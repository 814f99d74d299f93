//! Running a dump tool as a child process: stream its stdout, drain its stderr at the same time,
//! and turn a non-zero exit into an error that carries the tail of stderr.
//!
//! Secrets never go on the command line (it is visible in `ps`); callers pass them through the
//! environment or a 0600 file. The child is killed if the run is dropped or cancelled.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::process::{ChildStdout, Command};

use crate::error::{Error, Result};

/// Bytes of stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// A running child: its stdout, and a future that resolves to its verdict once it has exited.
pub struct Running {
    /// The child's standard output.
    pub stdout: ChildStdout,
    /// Resolves to `Ok` only if the child exited 0.
    pub verdict: std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>,
}

/// Starts `program` with `args` and extra environment `env`; `what` names it in errors.
pub fn spawn(
    program: &Path,
    args: &[OsString],
    env: &[(String, OsString)],
    what: String,
) -> Result<Running> {
    let mut child = start(program, args, env, &what, Stdio::null(), Stdio::piped())?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::failed(format!("{what}: no stdout pipe")))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| Error::failed(format!("{what}: no stderr pipe")))?;
    let drain = drain_tail(stderr, STDERR_TAIL);
    let verdict = Box::pin(async move {
        let status = child
            .wait()
            .await
            .map_err(|e| Error::failed(format!("{what}: waiting for it failed: {e}")))?;
        let tail = drain.await.unwrap_or_default();
        if status.success() {
            if !tail.trim().is_empty() {
                tracing::debug!(tool = %what, stderr = %tail.trim(), "Child wrote to stderr");
            }
            Ok(())
        } else {
            Err(exit_error(&what, status, &tail))
        }
    });
    Ok(Running { stdout, verdict })
}

/// Runs `program` to completion, feeding `input` (if any) to its stdin, and returns its stderr
/// and when it had read all of `input` (pg_restore: when the data was in and the post-data
/// section began).
///
/// A read error on `input` (for a restore: damaged or unauthenticated plaintext) kills the child
/// and is returned as an integrity error; a non-zero exit is an error carrying stderr's tail.
pub async fn run_with_input(
    program: &Path,
    args: &[OsString],
    env: &[(String, OsString)],
    what: String,
    input: Option<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
) -> Result<(String, Option<std::time::Instant>)> {
    use tokio::io::AsyncWriteExt;
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = start(program, args, env, &what, stdin, Stdio::null())?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| Error::failed(format!("{what}: no stderr pipe")))?;
    // Keep more: psql's errors are parsed from it.
    let drain = drain_tail(stderr, STDERR_TAIL * 4);
    let mut input_read = None;
    if let (Some(mut reader), Some(mut stdin)) = (input, child.stdin.take()) {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = child.kill().await;
                    return Err(Error::new(
                        crate::error::ErrorKind::Integrity,
                        format!("{what} stopped: the backup stream failed: {e}"),
                    ));
                }
            };
            if n == 0 {
                break;
            }
            if stdin.write_all(&buf[..n]).await.is_err() {
                break; // The child stopped reading: its exit status says why.
            }
        }
        // Closing stdin waits for nothing: the pipe holds at most 64 KiB the child has not read.
        drop(stdin);
        input_read = Some(std::time::Instant::now());
    }
    let status = child
        .wait()
        .await
        .map_err(|e| Error::failed(format!("{what}: waiting for it failed: {e}")))?;
    let tail = drain.await.unwrap_or_default();
    if status.success() {
        Ok((tail, input_read))
    } else {
        Err(exit_error(&what, status, &tail))
    }
}

/// Starts `program` with stderr piped and killed if dropped; nothing secret goes on its command line.
fn start(
    program: &Path,
    args: &[OsString],
    env: &[(String, OsString)],
    what: &str,
    stdin: Stdio,
    stdout: Stdio,
) -> Result<tokio::process::Child> {
    Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            Error::failed(format!("cannot start {} ({what}): {e}", program.display())).hint(
                "install the PostgreSQL client tools, or set pg_bin_dir in the source (RUNBOOK.md#tools-missing)",
            )
        })
}

/// Reads a child's stderr to its end in the background, keeping the last `cap` bytes.
fn drain_tail(
    mut stderr: tokio::process::ChildStderr,
    cap: usize,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut tail: VecDeque<u8> = VecDeque::with_capacity(cap);
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if tail.len() == cap {
                    tail.pop_front();
                }
                tail.push_back(b);
            }
        }
        String::from_utf8_lossy(&tail.into_iter().collect::<Vec<_>>()).into_owned()
    })
}

/// The error for a child that exited non-zero: its status and the end of its stderr.
fn exit_error(what: &str, status: std::process::ExitStatus, tail: &str) -> Error {
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(9)) => "killed by signal 9 (SIGKILL: the OOM killer, or kill -9)".to_string(),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "killed by a signal".to_string(),
    };
    let tail = tail.trim();
    // The last STDERR_TAIL characters, cut at a character boundary.
    let start = tail
        .char_indices()
        .rev()
        .nth(STDERR_TAIL.saturating_sub(1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    let short = &tail[start..];
    if short.is_empty() {
        return Error::failed(format!("{what} failed ({code})"));
    }
    Error::failed(format!("{what} failed ({code}): {short}"))
}

/// Runs a tool to completion and returns its stdout (for `--version` and similar).
pub async fn output(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::failed(format!("cannot run {}: {e}", program.display())))?;
    if !out.status.success() {
        return Err(Error::failed(format!(
            "{} {} failed: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `text` (a server log, a tool's output), for an error message.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// True when this process runs as root: a PostgreSQL server it starts must then run as another
/// OS user (the server refuses root).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The command prefix that runs what follows it as OS user `user`, with that user's groups.
pub fn as_user(user: &str) -> Vec<OsString> {
    [
        "setpriv".to_string(),
        format!("--reuid={user}"),
        format!("--regid={user}"),
        "--init-groups".into(),
        "--".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

/// Gives `dir` (and everything below it, when `recursive`) to OS user `user`.
pub fn hand_over(dir: &Path, user: &str, recursive: bool) -> std::result::Result<(), String> {
    let ok = std::process::Command::new("chown")
        .args(recursive.then_some("-R"))
        .arg(format!("{user}:"))
        .arg(dir)
        .stdin(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cannot give {} to the OS user {user}",
            dir.display()
        ))
    }
}

/// The uid and gid of OS user `user` (`id -u`, `id -g`), for a caller that gives it many files:
/// [`std::os::unix::fs::chown`] then needs no process per file.
pub fn ids_of(user: &str) -> std::result::Result<(u32, u32), String> {
    let id = |flag: &str| {
        std::process::Command::new("id")
            .args([flag, user])
            .stdin(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
            .ok_or_else(|| format!("no OS user {user}"))
    };
    Ok((id("-u")?, id("-g")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn non_zero_exit_carries_the_stderr_tail() {
        let args: Vec<OsString> = vec![
            "-c".into(),
            "echo partial; echo 'pg_dump: error: boom' >&2; exit 3".into(),
        ];
        let mut r = spawn(Path::new("/bin/sh"), &args, &[], "pg_dump".into()).unwrap();
        let mut out = String::new();
        r.stdout.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "partial\n");
        let e = r.verdict.await.unwrap_err();
        assert_eq!(
            e.message,
            "pg_dump failed (exit status 3): pg_dump: error: boom"
        );
    }

    #[tokio::test]
    async fn a_missing_program_says_what_to_install() {
        let e = spawn(
            Path::new("/nonexistent/pg_dump"),
            &[],
            &[],
            "pg_dump".into(),
        )
        .err()
        .unwrap();
        assert!(
            e.message.contains("cannot start /nonexistent/pg_dump"),
            "{e}"
        );
        assert!(e.hint.unwrap().contains("pg_bin_dir"));
    }
}
