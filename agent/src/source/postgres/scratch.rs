//! Scratch PostgreSQL for verification: an ephemeral cluster that is always torn down.
//!
//! `initdb` into a fresh temp dir, run as an unprivileged OS user when the verifier is root, on a
//! random port with **no TCP listener at all** (`listen_addresses=''`): the only way in is the unix
//! socket inside the cluster's own 0700 directory. The server gets a network namespace of its own
//! where the system allows one, so nothing it runs reaches another host. fsync is off; nothing
//! here must survive. Backups are restored as [`RESTORER`], a role without superuser powers (see
//! [`Scratch::lock_down`]).
//!
//! Teardown cannot be forgotten: the server runs under a small `sh` guard whose stdin is a pipe
//! from this process. Dropping [`Scratch`] closes the pipe, and so does this process dying for any
//! reason (Ctrl-C, panic, kill -9); the guard then stops the server and deletes the directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{FingerprintMode, PostgresConfig};
use crate::error::{Error, Result};
use crate::policy::Secret;
use tokio::process::{Child, ChildStdin, Command};

/// The scratch cluster's bootstrap superuser: the verifier's own connections.
pub const SUPERUSER: &str = "lifeboat_verify";
/// The unprivileged role a backup is restored as.
pub const RESTORER: &str = "lifeboat_restore";

/// A running scratch cluster.
pub struct Scratch {
    /// Its directory (data, socket, log).
    pub dir: PathBuf,
    /// Its port (only names the socket file).
    pub port: u16,
    /// Server binaries used.
    pub bin: PathBuf,
    /// The superuser the verifier connects as.
    pub superuser: String,
    /// Why the server shares the host's network (`None`: it has none).
    pub shared_network: Option<String>,
    guard: Option<Child>,
    stdin: Option<ChildStdin>,
}

/// How the scratch server is fenced off: the command prefix that starts it, the OS user it runs
/// as (when the verifier is root), and whether it has a network namespace of its own.
#[derive(Default)]
struct Isolation {
    prefix: Vec<OsString>,
    user: Option<String>,
    /// `None`: no network at all (loopback only, down). `Some(why)`: the host's network.
    shared_network: Option<String>,
}

fn succeeds(cmd: &str, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn isolation() -> Isolation {
    let root = crate::source::child::running_as_root();
    // A network namespace of its own: whatever a restored dump makes the server do, it cannot
    // reach another host. The unix socket, a file, still connects the verifier to it.
    let unshare: &[&str] = if root {
        &["--net"]
    } else {
        &["--user", "--map-current-user", "--net"]
    };
    let mut probe = unshare.to_vec();
    probe.extend(["--", "true"]);
    let (mut prefix, shared_network) = if succeeds("unshare", &probe) {
        let mut p = vec![OsString::from("unshare")];
        p.extend(unshare.iter().map(OsString::from));
        p.push("--".into());
        (p, None)
    } else {
        (
            Vec::new(),
            Some(format!(
                "`unshare {}` is not permitted here",
                unshare.join(" ")
            )),
        )
    };
    if !root {
        return Isolation {
            prefix,
            user: None,
            shared_network,
        };
    }
    let user = ["postgres", "nobody"]
        .into_iter()
        .find(|u| succeeds("id", &["-u", u]))
        .unwrap_or("nobody");
    prefix.extend(crate::source::child::as_user(user));
    Isolation {
        prefix,
        user: Some(user.to_string()),
        shared_network,
    }
}

/// A statement on the scratch cluster failed while `what`.
fn failed(what: &str, e: tokio_postgres::Error) -> Error {
    Error::failed(format!(
        "scratch cluster: {what}: {}",
        e.as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string())
    ))
}

/// Disk use of a scratch directory and room left on its filesystem.
pub struct DiskUse {
    /// Bytes allocated below the directory (0 unless asked for).
    pub used: u64,
    /// Bytes available to unprivileged writers on its filesystem.
    pub available: u64,
    /// Bytes always to be left free: 5 % of the filesystem, within 256 MiB–2 GiB.
    pub reserve: u64,
}

/// Measures `dir`: its filesystem always, the bytes below it when `walk`.
pub fn disk_use(dir: &Path, walk: bool) -> std::io::Result<DiskUse> {
    let st = rustix::fs::statvfs(dir)?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let mut used = 0;
    if walk {
        use std::os::unix::fs::MetadataExt;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            // Files come and go under a running server: what vanished is skipped.
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    used += m.blocks() * 512;
                }
            }
        }
    }
    Ok(DiskUse {
        used,
        available: st.f_bavail.saturating_mul(st.f_frsize),
        reserve: (total / 20).clamp(256 << 20, 2 << 30),
    })
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

/// A fresh directory for a scratch cluster, under a short path (socket paths are limited).
fn scratch_dir() -> Result<PathBuf> {
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
    Ok(dir)
}

/// Creates the cluster in `data`, its bootstrap superuser [`SUPERUSER`], trusted on the socket.
async fn initdb(prefix: &[OsString], bin: &Path, data: &Path) -> std::result::Result<(), String> {
    let mut initdb: Vec<OsString> = prefix.to_vec();
    initdb.extend([
        bin.join("initdb").into_os_string(),
        "-D".into(),
        data.as_os_str().to_os_string(),
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
        .map_err(|e| format!("cannot run initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The settings of a fresh scratch cluster: nothing in it must survive, so durability is off, and
/// minimal WAL (a table created and loaded in one transaction, as pg_restore
/// --single-transaction does, is written once instead of twice).
const FRESH_SETTINGS: &[&str] = &[
    "fsync=off",
    "full_page_writes=off",
    "synchronous_commit=off",
    "wal_level=minimal",
    "max_wal_senders=0",
    "max_wal_size=4GB",
    "checkpoint_timeout=30min",
];

/// Starts the server under a shell that stops it and removes `dir` when its stdin closes, so
/// the cluster goes even if the verifier is killed. `settings` are `name=value` pairs.
fn spawn_server(
    prefix: Vec<OsString>,
    bin: &Path,
    data: &Path,
    dir: &Path,
    port: u16,
    settings: &[String],
) -> std::result::Result<Child, String> {
    let mut server: Vec<OsString> = prefix;
    server.extend([
        bin.join("postgres").into_os_string(),
        "-D".into(),
        data.as_os_str().to_os_string(),
        "-p".into(),
        port.to_string().into(),
        "-k".into(),
        dir.as_os_str().to_os_string(),
        "-c".into(),
        "listen_addresses=".into(),
        "-c".into(),
        "unix_socket_permissions=0700".into(),
    ]);
    for s in settings {
        server.push("-c".into());
        server.push(s.into());
    }
    // A log left by an earlier start would be read as this server's until the shell truncates it.
    match std::fs::remove_file(dir.join("log")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot remove the earlier server log: {e}"))
        }
        _ => {}
    }
    // `keep` on stdin (the server already down) leaves the directory for another start.
    let script = r#"dir=$1; shift; "$@" >"$dir/log" 2>&1 & pid=$!; read cmd; kill -INT $pid 2>/dev/null; wait $pid; [ "$cmd" = keep ] || rm -rf "$dir""#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("lifeboat-scratch")
        .arg(dir)
        .args(&server)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))
}

fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// The scratch server's `restore_command` (`sh wal-get.sh WALDIR %f %p`, run in the data
/// directory). A feeder fills WALDIR while recovery runs: `.queue` names every segment it will
/// deliver, in order, each file appears whole (renamed into place), `.end` says all were
/// delivered and `.failed` that one could not be. A segment is moved, not copied, so the
/// scratch holds only what is fetched ahead; recovery keeps what it restored in `pg_wal` (until a
/// restartpoint), and after a restart reads it there. History files are all there before the
/// start. Exit 1 is "not in the archive" (recovery's end); 126 stops recovery.
pub const WAL_GET: &str = r#"w=$1 f=$2 p=$3
case "$f" in
  *.history) [ -e "$w/$f" ] && exec cp "$w/$f" "$p"; exit 1 ;;
esac
grep -qxF "$f" "$w/.queue" 2>/dev/null || exit 1
while :; do
  [ -e "$w/$f" ] && exec mv "$w/$f" "$p"
  [ -e "pg_wal/$f" ] && exit 1
  [ -e "$w/.failed" ] && exit 126
  [ -e "$w/.end" ] && exit 1
  sleep 0.05
done
"#;

/// A scratch directory whose `data/` a caller fills with a cluster's files (a base backup) before
/// a server starts on them. Dropped unstarted, it is removed.
pub struct Unstarted {
    dir: PathBuf,
    isolation: Isolation,
}

impl Unstarted {
    /// A fresh scratch directory with an empty `data/` (mode 0700).
    pub fn new() -> Result<Unstarted> {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch_dir()?;
        let data = dir.join("data");
        std::fs::create_dir(&data)
            .and_then(|_| std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                Error::failed(format!(
                    "scratch cluster: cannot create {}: {e}",
                    data.display()
                ))
            })?;
        Ok(Unstarted {
            dir,
            isolation: isolation(),
        })
    }

    /// Where the cluster's files go.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The OS user the server will run as, when it is not this process's.
    pub fn server_user(&self) -> Option<&str> {
        self.isolation.user.as_deref()
    }

    /// Starts a server on the files in [`Unstarted::data`], whose bootstrap superuser is
    /// `superuser`, and waits up to `ready_within` for it to recover and accept connections. The
    /// cluster's own configuration is set aside: the server reads a `postgresql.conf` and a
    /// `pg_hba.conf` (trust on the socket, nothing else) written here, and `-c` settings turn off
    /// what would reach outside (archiving, TLS files, preloaded libraries, replication).
    pub async fn start(
        self,
        bin: &Path,
        superuser: &str,
        ready_within: Duration,
    ) -> Result<Scratch> {
        self.start_with(bin, superuser, ready_within, None).await
    }

    /// [`Unstarted::start`], but the server first replays the WAL in `wal` (a directory in the
    /// scratch, see [`WAL_GET`]) to its end, then promotes: archive recovery, and no connections
    /// until it is over (`hot_standby=off`).
    pub async fn start_replaying(
        self,
        bin: &Path,
        superuser: &str,
        ready_within: Duration,
        wal: &Path,
    ) -> Result<Scratch> {
        self.start_with(bin, superuser, ready_within, Some(wal))
            .await
    }

    /// Replays the WAL files in `wal` up to and including the record at `target` (an LSN),
    /// then shuts the server down still in recovery, so that a later start replays on from
    /// there. Returns where the server said recovery stopped (`recovery stopping after WAL
    /// location`), with the log.
    pub async fn replay_to(
        &self,
        bin: &Path,
        wal: &Path,
        target: &str,
        within: Duration,
    ) -> Result<(String, String)> {
        let fail = |what: String| Error::failed(format!("scratch cluster: {what}"));
        let mut settings = self.configure(Some(wal)).map_err(fail)?;
        settings.extend([
            format!("recovery_target_lsn={target}"),
            "recovery_target_action=shutdown".into(),
        ]);
        let port = free_port().map_err(|e| fail(format!("no free port: {e}")))?;
        let prefix = self.isolation.prefix.clone();
        let mut guard =
            spawn_server(prefix, bin, &self.data(), &self.dir, port, &settings).map_err(fail)?;
        let log_file = self.dir.join("log");
        let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
        let deadline = Instant::now() + within;
        while !log().contains("database system is shut down") {
            if Instant::now() > deadline {
                // Dropping the guard's stdin stops the server and removes the scratch.
                return Err(fail(format!(
                    "replay to {target} did not end within {}",
                    humantime::format_duration(within)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The server is down: the guard leaves the directory for the next start.
        if let Some(mut stdin) = guard.stdin.take() {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(b"keep\n").await;
        }
        let _ = guard.wait().await;
        let logged = log();
        let reached = logged
            .lines()
            .filter_map(|l| {
                l.split("recovery stopping after WAL location (LSN) \"")
                    .nth(1)
            })
            .filter_map(|rest| rest.split('"').next())
            .next_back()
            .map(str::to_string);
        // Kept for a look afterwards; the next start writes a log of its own.
        let _ = std::fs::rename(&log_file, self.dir.join("log.point"));
        match reached {
            Some(at) => Ok((at, logged)),
            None => Err(fail(format!(
                "replay to {target} stopped without reaching it: {}",
                crate::source::child::last_lines(&logged, 12)
            ))),
        }
    }

    /// Writes the scratch's own configuration beside `data/` and readies the files for a server
    /// start (replaying `wal` when given). Returns the server's `-c` settings.
    fn configure(&self, wal: Option<&Path>) -> std::result::Result<Vec<String>, String> {
        let dir = &self.dir;
        let data = dir.join("data");
        let conf = dir.join("postgresql.conf");
        let hba = dir.join("pg_hba.conf");
        let ident = dir.join("pg_ident.conf");
        let written = std::fs::write(
            &hba,
            "local all all trust
",
        )
        .and_then(|_| std::fs::write(&ident, ""))
        .and_then(|_| {
            std::fs::write(
                &conf,
                format!(
                    "hba_file = '{}'\nident_file = '{}'\n",
                    hba.display(),
                    ident.display()
                ),
            )
        });
        written.map_err(|e| format!("cannot write its configuration: {e}"))?;
        // A backup of a standby carries its signal file; the scratch must open, not follow.
        for f in ["standby.signal", "recovery.signal", "postmaster.pid"] {
            let _ = std::fs::remove_file(data.join(f));
        }
        let restore_command = match wal {
            Some(wal) => {
                std::fs::write(data.join("recovery.signal"), "")
                    .map_err(|e| format!("cannot write recovery.signal: {e}"))?;
                let script = dir.join("wal-get.sh");
                std::fs::write(&script, WAL_GET)
                    .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
                let word = |p: &Path| {
                    crate::source::postgres_physical::pitr::shell_word(&p.display().to_string())
                };
                format!("restore_command=sh {} {} %f %p", word(&script), word(wal))
            }
            None => "restore_command=".into(),
        };
        if let Some(user) = &self.isolation.user {
            crate::source::child::hand_over(dir, user, true)?;
        }
        let mut settings: Vec<String> = [
            format!("config_file={}", conf.display()),
            "fsync=off".into(),
            "synchronous_commit=off".into(),
            "shared_preload_libraries=".into(),
            "archive_mode=off".into(),
            "ssl=off".into(),
            "max_wal_senders=0".into(),
            "max_replication_slots=0".into(),
            "primary_conninfo=".into(),
            restore_command,
        ]
        .into();
        if wal.is_some() {
            settings.extend([
                "hot_standby=off".into(),
                "recovery_target_timeline=latest".into(),
            ]);
        }
        Ok(settings)
    }

    async fn start_with(
        self,
        bin: &Path,
        superuser: &str,
        ready_within: Duration,
        wal: Option<&Path>,
    ) -> Result<Scratch> {
        let configured = self.configure(wal);
        let mut this = self;
        // Drop then has nothing to remove: from here the guard or `fail` does.
        let dir = std::mem::take(&mut this.dir);
        let isolation = std::mem::take(&mut this.isolation);
        let guard_dir = dir.clone();
        let fail = move |what: String| {
            let _ = std::fs::remove_dir_all(&guard_dir);
            Error::failed(format!("scratch cluster: {what}"))
        };
        let mut settings = configured.map_err(&fail)?;
        if wal.is_some() {
            settings.push("recovery_target_action=promote".into());
        }
        let data = dir.join("data");
        let port = free_port().map_err(|e| fail(format!("no free port: {e}")))?;
        let mut guard =
            spawn_server(isolation.prefix, bin, &data, &dir, port, &settings).map_err(&fail)?;
        let stdin = guard.stdin.take();
        let scratch = Scratch {
            dir,
            port,
            bin: bin.to_path_buf(),
            superuser: superuser.to_string(),
            shared_network: isolation.shared_network,
            guard: Some(guard),
            stdin,
        };
        scratch.wait_ready(ready_within).await?;
        Ok(scratch)
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Scratch {
    /// Creates and starts a scratch cluster with the binaries in `bin`.
    pub async fn start(bin: &Path) -> Result<Scratch> {
        let dir = scratch_dir()?;
        let fail = |what: String| {
            let _ = std::fs::remove_dir_all(&dir);
            Error::failed(format!("scratch cluster: {what}"))
        };
        let isolation = isolation();
        let prefix = isolation.prefix;
        if let Some(user) = &isolation.user {
            crate::source::child::hand_over(&dir, user, false).map_err(fail)?;
        }
        let data = dir.join("data");
        initdb(&prefix, bin, &data).await.map_err(fail)?;
        let port = free_port().map_err(|e| fail(format!("no free port: {e}")))?;
        let settings: Vec<String> = FRESH_SETTINGS.iter().map(|s| s.to_string()).collect();
        let mut guard = spawn_server(prefix, bin, &data, &dir, port, &settings).map_err(fail)?;
        let stdin = guard.stdin.take();
        let scratch = Scratch {
            dir,
            port,
            bin: bin.to_path_buf(),
            superuser: SUPERUSER.to_string(),
            shared_network: isolation.shared_network,
            guard: Some(guard),
            stdin,
        };
        scratch.wait_ready(Duration::from_secs(60)).await?;
        Ok(scratch)
    }

    async fn wait_ready(&self, within: Duration) -> Result<()> {
        let socket = self.dir.join(format!(".s.PGSQL.{}", self.port));
        let deadline = Instant::now() + within;
        loop {
            if socket.exists() {
                let cfg = self.config("template1");
                let pg = super::Postgres::new(cfg);
                if pg.connect().await.is_ok() {
                    return Ok(());
                }
            }
            let log = || std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            if Instant::now() > deadline {
                return Err(Error::failed(format!(
                    "scratch cluster did not start within {}: {}",
                    humantime::format_duration(within),
                    log().trim()
                )));
            }
            // A failed recovery shuts the server down: no use waiting for it.
            let logged = log();
            if logged.contains("database system is shut down") {
                return Err(Error::failed(format!(
                    "scratch cluster shut down before accepting connections: {}",
                    crate::source::child::last_lines(&logged, 12)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connection settings for database `db` of the scratch cluster, as its superuser.
    pub fn config(&self, db: &str) -> PostgresConfig {
        self.config_as(db, &self.superuser)
    }

    /// Connection settings for database `db` of the scratch cluster, as `user`.
    pub fn config_as(&self, db: &str, user: &str) -> PostgresConfig {
        let url = format!(
            "host={} port={} user={user} dbname={db}",
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

    /// Makes [`RESTORER`], the unprivileged role a backup is restored as, after the backup's roles
    /// were replayed (`client` is the superuser's). No role but the verifier's own keeps a power a
    /// dump could turn against the host: SUPERUSER, CREATEROLE and REPLICATION are taken from
    /// every replayed role, and so is membership in the roles that run programs or touch the
    /// server's files. [`RESTORER`] then becomes a member of every replayed role, so grants and
    /// default privileges that name them restore, and may bypass row security to read every row.
    /// Returns a note for the report when a replayed role lost a power.
    pub async fn lock_down(&self, client: &tokio_postgres::Client) -> Result<Vec<String>> {
        let ident = super::quote_ident;
        client
            .batch_execute(&format!(
                "CREATE ROLE {} LOGIN BYPASSRLS; ALTER ROLE ALL RESET ALL",
                ident(RESTORER)
            ))
            .await
            .map_err(|e| failed(&format!("creating the role {RESTORER}"), e))?;
        let roles = client
            .query(
                "SELECT rolname, rolsuper OR rolcreaterole OR rolreplication FROM pg_roles \
                 WHERE rolname NOT LIKE 'pg\\_%' AND rolname <> ALL($1) ORDER BY rolname",
                &[&vec![SUPERUSER, RESTORER]],
            )
            .await
            .map_err(|e| failed("listing the replayed roles", e))?;
        let mut demoted = Vec::new();
        let mut sql = String::new();
        for r in &roles {
            let name: String = r.get(0);
            if r.get::<_, bool>(1) {
                sql.push_str(&format!(
                    "ALTER ROLE {} NOSUPERUSER NOCREATEROLE NOREPLICATION;",
                    ident(&name)
                ));
                demoted.push(name.clone());
            }
            sql.push_str(&format!("GRANT {} TO {};", ident(&name), ident(RESTORER)));
        }
        let grants = client
            .query(
                "SELECT r.rolname, m.rolname, g.rolname FROM pg_auth_members a \
                 JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member \
                 JOIN pg_roles g ON g.oid = a.grantor \
                 WHERE r.rolname IN ('pg_execute_server_program', 'pg_read_server_files', 'pg_write_server_files')",
                &[],
            )
            .await
            .map_err(|e| failed("listing memberships", e))?;
        for g in &grants {
            let (role, member, grantor): (String, String, String) = (g.get(0), g.get(1), g.get(2));
            sql.push_str(&format!(
                "REVOKE {} FROM {} GRANTED BY {};",
                ident(&role),
                ident(&member),
                ident(&grantor)
            ));
        }
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| failed("taking powers from the replayed roles", e))?;
        let row = client
            .query_one(
                "SELECT pg_has_role($1, 'pg_execute_server_program', 'MEMBER') \
                   OR pg_has_role($1, 'pg_read_server_files', 'MEMBER') \
                   OR pg_has_role($1, 'pg_write_server_files', 'MEMBER') \
                   OR EXISTS (SELECT 1 FROM pg_roles WHERE (rolsuper OR rolcreaterole) AND rolname <> $2)",
                &[&RESTORER, &SUPERUSER],
            )
            .await
            .map_err(|e| failed("checking the restore role", e))?;
        if row.get::<_, bool>(0) {
            return Err(Error::failed(format!(
                "scratch cluster: the role {RESTORER} could still act as a superuser after the backup's roles were replayed; not restoring"
            )));
        }
        let mut notes = Vec::new();
        if !demoted.is_empty() {
            notes.push(format!(
                "in the scratch cluster these roles lost SUPERUSER, CREATEROLE and REPLICATION: {}",
                demoted.join(", ")
            ));
        }
        if !grants.is_empty() {
            notes.push(format!(
                "in the scratch cluster {} membership(s) in pg_execute_server_program, pg_read_server_files or pg_write_server_files were revoked",
                grants.len()
            ));
        }
        Ok(notes)
    }

    /// Creates, as the superuser, the extensions of `wanted` that [`RESTORER`] may not create
    /// itself (untrusted ones such as pg_stat_statements), in database `db`, and makes
    /// [`RESTORER`] their owner so the dump's `COMMENT ON EXTENSION` applies. Their scripts come
    /// from the server's installation, not from the dump. Never created: extensions that reach
    /// other servers or the server's files, untrusted languages, and extensions in a schema the
    /// dump has yet to create. Returns the names created.
    pub async fn precreate_extensions(
        &self,
        db: &str,
        wanted: &[super::pgdump::ArchiveExtension],
    ) -> Result<Vec<String>> {
        const NEVER: &[&str] = &[
            "adminpack",
            "dblink",
            "file_fdw",
            "postgres_fdw",
            "plperlu",
            "plpython2u",
            "plpython3u",
            "plpythonu",
            "pltclu",
        ];
        let candidates: Vec<&str> = wanted
            .iter()
            .filter(|e| !NEVER.contains(&e.name.as_str()))
            .filter(|e| matches!(e.schema.as_deref(), None | Some("public")))
            .map(|e| e.name.as_str())
            .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let conn = super::Postgres::new(self.config(db)).connect().await?;
        let untrusted = conn
            .client
            .query(
                "SELECT a.name FROM pg_available_extensions a \
                 JOIN pg_available_extension_versions v ON v.name = a.name AND v.version = a.default_version \
                 WHERE a.name = ANY($1) AND NOT v.trusted AND a.installed_version IS NULL ORDER BY a.name",
                &[&candidates],
            )
            .await
            .map_err(|e| failed("listing extensions", e))?;
        let ident = super::quote_ident;
        let mut created = Vec::new();
        for row in untrusted {
            let name: String = row.get(0);
            let sql = format!(
                "CREATE EXTENSION {} WITH SCHEMA public; \
                 UPDATE pg_catalog.pg_extension SET extowner = {}::regrole WHERE extname = {}",
                ident(&name),
                super::quote_literal(RESTORER),
                super::quote_literal(&name),
            );
            conn.client
                .batch_execute(&sql)
                .await
                .map_err(|e| failed(&format!("creating extension {name}"), e))?;
            created.push(name);
        }
        Ok(created)
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
