//! Scratch PostgreSQL for verification: an ephemeral cluster that is always torn down.
//!
//! `initdb` into a fresh temp dir, run as an unprivileged OS user when the verifier is root, on a
//! random port with **no TCP listener at all** (`listen_addresses=''`): the only way in is the unix
//! socket inside the cluster's own 0700 directory. fsync is off; nothing here must survive.
//!
//! Teardown cannot be forgotten: the server runs under a small `sh` guard whose stdin is a pipe
//! from this process. Dropping [`Scratch`] closes the pipe, and so does this process dying for any
//! reason (Ctrl-C, panic, kill -9); the guard then stops the server and deletes the directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lifeboat::policy::{FingerprintMode, PostgresConfig, Secret};
use lifeboat::{Error, Result};
use tokio::process::{Child, ChildStdin, Command};

/// The scratch cluster's bootstrap superuser.
pub const SUPERUSER: &str = "lifeboat_verify";

/// A running scratch cluster.
pub struct Scratch {
    /// Its directory (data, socket, log).
    pub dir: PathBuf,
    /// Its port (only names the socket file).
    pub port: u16,
    /// Server binaries used.
    pub bin: PathBuf,
    guard: Option<Child>,
    stdin: Option<ChildStdin>,
}

fn run_as() -> Vec<OsString> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false);
    if !root {
        return Vec::new();
    }
    let user = ["postgres", "nobody"]
        .into_iter()
        .find(|u| {
            std::process::Command::new("id")
                .arg("-u")
                .arg(u)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .unwrap_or("nobody");
    [
        "setpriv",
        &format!("--reuid={user}"),
        &format!("--regid={user}"),
        "--init-groups",
        "--",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

/// Finds server binaries (initdb, postgres) able to load a dump from a `source_major` server.
pub fn find_server_bin(configured: Option<&Path>, source_major: u32) -> Result<PathBuf> {
    if let Some(dir) = configured {
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir.to_path_buf());
        }
        return Err(Error::failed(format!(
            "verify.postgres_bin_dir {} has no initdb and postgres",
            dir.display()
        )));
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(m, p)| *m >= source_major && p.join("initdb").exists())
        .collect();
    candidates.sort_by_key(|(m, _)| *m);
    if let Some((_, p)) = candidates.into_iter().next() {
        return Ok(p);
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Ok(p);
        }
    }
    Err(Error::failed(format!(
        "no PostgreSQL server binaries (initdb, postgres) of version {source_major} or newer for the scratch cluster"
    ))
    .hint("install postgresql-<major> beside the verifier, or set verify.postgres_bin_dir, or verify.scratch_url"))
}

impl Scratch {
    /// Creates and starts a scratch cluster with the binaries in `bin`.
    pub async fn start(bin: &Path) -> Result<Scratch> {
        let base = std::env::temp_dir();
        let base = if base.as_os_str().len() > 60 {
            PathBuf::from("/tmp")
        } else {
            base
        };
        let dir = tempfile::Builder::new()
            .prefix("lbv-")
            .tempdir_in(&base)
            .map_err(|e| {
                Error::failed(format!(
                    "cannot create a scratch dir in {}: {e}",
                    base.display()
                ))
            })?
            .keep();
        let fail = |what: String| {
            let _ = std::fs::remove_dir_all(&dir);
            Error::failed(format!("scratch cluster: {what}"))
        };
        let prefix = run_as();
        if !prefix.is_empty() {
            let user = prefix[1]
                .to_string_lossy()
                .trim_start_matches("--reuid=")
                .to_string();
            let ok = std::process::Command::new("chown")
                .arg(format!("{user}:"))
                .arg(&dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(fail(format!(
                    "cannot hand {} to user {user}",
                    dir.display()
                )));
            }
        }
        let data = dir.join("data");
        let mut initdb: Vec<OsString> = prefix.clone();
        initdb.extend([
            bin.join("initdb").into_os_string(),
            "-D".into(),
            data.clone().into_os_string(),
            "-U".into(),
            SUPERUSER.into(),
            "-A".into(),
            "trust".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C.UTF-8".into(),
            "--no-sync".into(),
        ]);
        let out = Command::new(&initdb[0])
            .args(&initdb[1..])
            .current_dir("/")
            .output()
            .await
            .map_err(|e| fail(format!("cannot run initdb: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| fail(format!("no free port: {e}")))?;
        let mut server: Vec<OsString> = prefix;
        server.extend([
            bin.join("postgres").into_os_string(),
            "-D".into(),
            data.into_os_string(),
            "-p".into(),
            port.to_string().into(),
            "-k".into(),
            dir.clone().into_os_string(),
            "-c".into(),
            "listen_addresses=".into(),
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "full_page_writes=off".into(),
            "-c".into(),
            "synchronous_commit=off".into(),
            // With minimal WAL, a table created and loaded in one transaction (pg_restore
            // --single-transaction) is written once instead of twice.
            "-c".into(),
            "wal_level=minimal".into(),
            "-c".into(),
            "max_wal_senders=0".into(),
            "-c".into(),
            "max_wal_size=4GB".into(),
            "-c".into(),
            "checkpoint_timeout=30min".into(),
            "-c".into(),
            "unix_socket_permissions=0700".into(),
        ]);
        let script = r#"dir=$1; shift; "$@" >"$dir/log" 2>&1 & pid=$!; read _; kill -INT $pid 2>/dev/null; wait $pid; rm -rf "$dir""#;
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("lifeboat-scratch")
            .arg(&dir)
            .args(&server)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            .spawn()
            .map_err(|e| fail(format!("cannot start the server: {e}")))?;
        let stdin = guard.stdin.take();
        let scratch = Scratch {
            dir,
            port,
            bin: bin.to_path_buf(),
            guard: Some(guard),
            stdin,
        };
        scratch.wait_ready().await?;
        Ok(scratch)
    }

    async fn wait_ready(&self) -> Result<()> {
        let socket = self.dir.join(format!(".s.PGSQL.{}", self.port));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if socket.exists() {
                let cfg = self.config("postgres");
                let pg = lifeboat::source::postgres::Postgres::new(cfg);
                if pg.connect().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                return Err(Error::failed(format!(
                    "scratch cluster did not start within 60s: {}",
                    log.trim()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connection settings for database `db` of the scratch cluster, as its superuser.
    pub fn config(&self, db: &str) -> PostgresConfig {
        let url = format!(
            "host={} port={} user={SUPERUSER} dbname={db}",
            self.dir.display(),
            self.port
        );
        PostgresConfig {
            url: Secret::new(url.clone()),
            url_redacted: url,
            password_file: None,
            globals: false,
            fingerprint: FingerprintMode::Full,
            bin_dir: Some(self.bin.clone()),
            tls_ca_file: None,
        }
    }

    /// Stops the server and removes its directory, waiting up to 30 s.
    pub async fn stop(mut self) {
        self.stdin.take();
        if let Some(mut g) = self.guard.take() {
            if tokio::time::timeout(Duration::from_secs(30), g.wait())
                .await
                .is_err()
            {
                let _ = g.kill().await;
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Closing the guard's stdin makes it stop the server and delete the directory.
        self.stdin.take();
    }
}
