//! Redis sources: an RDB snapshot taken as a replica takes it (`PSYNC`), or by `BGSAVE` and a
//! shared volume, streamed into the pipeline and checked as it passes.
//!
//! What must hold:
//! - The snapshot never touches the agent's disk: the replication payload goes from the socket into
//!   the pipeline through a small in-memory pipe.
//! - A backup is published only if the payload arrived whole (its length, or its end mark), starts
//!   with an RDB header and ends with a matching CRC64 ([`rdb::Crc64Tail`]). Those checks
//!   are the producer's verdict, so a short or damaged stream fails before the age stream is
//!   finished and nothing becomes visible.
//! - The fingerprint (keys and expiries per database, types, a sample of keys) is counted from the
//!   snapshot's own bytes ([`rdb::parse`]) on a separate thread, so it is exact for the
//!   snapshot and costs the server nothing.
//! - Passwords never appear in argv, logs or errors.

pub mod cluster;
pub mod load;
pub mod policy;
pub mod rdb;
pub mod restore;
pub mod scan;
pub mod verify;

pub use policy::{RawRedisSource, RedisCapture, RedisConfig, RedisEndpoint, RedisMode, Sentinel};

use std::collections::HashMap;
use std::io::Read;
use std::pin::Pin;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use self::rdb::{Crc64Tail, CrcVerdict, RdbError, RdbSummary};
use super::{BackupContext, Source, SourceBackup};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, Observer};
use crate::policy::Secret;
use crate::repo::layout;
use crate::repo::manifest::Role;
use crate::repo::origin::Origin;

/// Object name of the snapshot.
pub const RDB_OBJECT: &str = "dump.rdb.zst.age";

/// Longest the server may stay silent while preparing or sending the payload. It sends a newline
/// every second while it prepares, so silence this long means it is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of payload read at a time.
const READ_CHUNK: usize = 256 << 10;
/// Buffer between the socket and the pipeline.
const PIPE_BUFFER: usize = 1 << 20;
/// Length of the diskless end mark.
const EOF_MARK_LEN: usize = 40;

/// A Redis source.
#[derive(Debug, Clone)]
pub struct Redis {
    cfg: RedisConfig,
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// One reply of the RESP protocol, as far as lifeboat's commands need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+…`
    Status(String),
    /// `-…`
    Error(String),
    /// `:…`
    Int(i64),
    /// `$…` (`None`: the null bulk string).
    Bulk(Option<Vec<u8>>),
    /// `*…` (`None`: the null array).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A string, integer or bulk reply as text.
    fn text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Int(i) => Some(i.to_string()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// An open, authenticated connection.
pub struct Session {
    io: BufReader<Box<dyn Conn>>,
    where_: String,
    /// The server's host and port.
    node: (String, u16),
}

impl Session {
    async fn send(&mut self, args: &[&[u8]]) -> Result<()> {
        let mut out = Vec::new();
        encode(&mut out, args);
        self.write(&out).await
    }

    /// Sends `commands` at once and reads their replies, error replies included.
    async fn pipeline(&mut self, commands: &[Vec<&[u8]>]) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        for args in commands {
            encode(&mut out, args);
        }
        self.write(&out).await?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(self.reply().await?);
        }
        Ok(replies)
    }

    async fn write(&mut self, out: &[u8]) -> Result<()> {
        let io = self.io.get_mut();
        let written = match io.write_all(out).await {
            Ok(()) => io.flush().await,
            Err(e) => Err(e),
        };
        written.map_err(|e| self.io_error(e))
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        Error::failed(format!("{}: connection failed: {e}", self.where_))
            .hint("is the server up and reachable from here? (RUNBOOK.md#source-unreachable)")
    }

    /// Reads one line without its line end, skipping the bare newlines a master sends to keep a
    /// waiting replica's connection alive.
    async fn line(&mut self) -> Result<Vec<u8>> {
        loop {
            let mut line = Vec::new();
            let read = tokio::time::timeout(
                IDLE_TIMEOUT,
                (&mut self.io).take(64 << 10).read_until(b'\n', &mut line),
            )
            .await
            .map_err(|_| {
                Error::failed(format!(
                    "{}: no answer for {} s",
                    self.where_,
                    IDLE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| self.io_error(e))?;
            if read == 0 || line.last() != Some(&b'\n') {
                return Err(Error::failed(format!(
                    "{}: the server closed the connection",
                    self.where_
                ))
                .hint("check the server's log; is this a Redis server? (RUNBOOK.md#source-unreachable)"));
            }
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            if !line.is_empty() {
                return Ok(line);
            }
        }
    }

    async fn reply(&mut self) -> Result<Reply> {
        let line = self.line().await?;
        let text = String::from_utf8_lossy(&line[1..]).into_owned();
        match line[0] {
            b'+' => Ok(Reply::Status(text)),
            b'-' => Ok(Reply::Error(text)),
            b':' => text
                .parse()
                .map(Reply::Int)
                .map_err(|_| self.protocol(&line)),
            b'$' => {
                let n: i64 = text.parse().map_err(|_| self.protocol(&line))?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                if n > 64 << 20 {
                    return Err(Error::failed(format!(
                        "{}: a reply of {n} bytes is larger than the 64 MiB lifeboat reads at once",
                        self.where_
                    )));
                }
                let mut v = vec![0u8; n as usize + 2];
                self.io
                    .read_exact(&mut v)
                    .await
                    .map_err(|e| self.io_error(e))?;
                v.truncate(n as usize);
                Ok(Reply::Bulk(Some(v)))
            }
            b'*' => {
                let n: i64 = text.parse().map_err(|_| self.protocol(&line))?;
                if n < 0 {
                    return Ok(Reply::Array(None));
                }
                if n > 1 << 16 {
                    return Err(self.protocol(&line));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(Box::pin(self.reply()).await?);
                }
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(self.protocol(&line)),
        }
    }

    /// The next reply as an array of strings (`None`: null).
    async fn strings(&mut self) -> Result<Option<Vec<String>>> {
        match self.reply().await? {
            Reply::Array(Some(items)) => Ok(Some(items.iter().filter_map(Reply::text).collect())),
            Reply::Array(None) | Reply::Bulk(None) => Ok(None),
            Reply::Error(e) => Err(Error::failed(e)),
            other => Err(Error::failed(format!("unexpected answer {other:?}"))),
        }
    }

    /// The next reply as an array of field/value arrays (`SENTINEL REPLICAS`).
    async fn maps(&mut self) -> Result<Vec<HashMap<String, String>>> {
        match self.reply().await? {
            Reply::Array(Some(items)) => Ok(items
                .iter()
                .map(|item| match item {
                    Reply::Array(Some(kv)) => kv
                        .chunks(2)
                        .filter_map(|pair| Some((pair.first()?.text()?, pair.get(1)?.text()?)))
                        .collect(),
                    _ => HashMap::new(),
                })
                .collect()),
            Reply::Error(e) => Err(Error::failed(e)),
            other => Err(Error::failed(format!("unexpected answer {other:?}"))),
        }
    }

    fn protocol(&self, line: &[u8]) -> Error {
        let shown: String = String::from_utf8_lossy(line).chars().take(60).collect();
        Error::failed(format!(
            "{}: unexpected answer {shown:?}: is this a Redis server?",
            self.where_
        ))
    }

    /// Sends a command and reads its reply; an error reply becomes an error naming the command.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply> {
        self.send(args).await?;
        match self.reply().await? {
            Reply::Error(e) => Err(self.refused(args, &e)),
            r => Ok(r),
        }
    }

    fn refused(&self, args: &[&[u8]], e: &str) -> Error {
        let cmd = String::from_utf8_lossy(args[0]).to_uppercase();
        let message = format!("{}: {cmd} was refused: {e}", self.where_);
        if e.starts_with("NOAUTH") {
            Error::new(ErrorKind::Credential, message)
                .hint("the server needs a password: set password_file, or put it in the url as ${VAR} (RUNBOOK.md#source-unreachable)")
        } else if e.starts_with("NOPERM") {
            Error::new(ErrorKind::Credential, message).hint(
                "the ACL user needs +psync +replconf +sync (replication) or +bgsave +info (file mode)",
            )
        } else {
            Error::failed(message)
        }
    }

    /// `INFO section` as `field → value`.
    pub async fn info(&mut self, section: &str) -> Result<Vec<(String, String)>> {
        match self.call(&[b"INFO", section.as_bytes()]).await? {
            Reply::Bulk(Some(body)) => Ok(String::from_utf8_lossy(&body)
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect()),
            other => Err(Error::failed(format!(
                "{}: INFO answered {other:?}",
                self.where_
            ))),
        }
    }
}

/// A command in RESP.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// The first replica `SENTINEL REPLICAS` lists as up and linked to its primary.
fn healthy_replica(replicas: &[HashMap<String, String>]) -> Option<(String, u16)> {
    replicas.iter().find_map(|r| {
        let flags = r.get("flags")?;
        let down = ["s_down", "o_down", "disconnected"]
            .iter()
            .any(|f| flags.split(',').any(|g| g == *f));
        if down || r.get("master-link-status").map(String::as_str) != Some("ok") {
            return None;
        }
        Some((r.get("ip")?.clone(), r.get("port")?.parse().ok()?))
    })
}

/// Checks that the server the sentinels named has the role asked for: a failover under way can
/// leave a sentinel's answer stale. A server that refuses `ROLE` is taken as named.
async fn check_role(s: &mut Session, sentinel: &Sentinel) -> Result<()> {
    let role = match s.call(&[b"ROLE"]).await {
        Ok(Reply::Array(Some(items))) => items.first().and_then(Reply::text),
        _ => None,
    };
    let want = if sentinel.replica { "slave" } else { "master" };
    match role {
        Some(r) if r != want => Err(Error::failed(format!(
            "{}: the sentinels named it, but it is now a {}: a failover is under way",
            s.where_,
            if r == "master" { "primary" } else { "replica" }
        ))
        .hint("the next attempt asks the sentinels again (retries)")),
        _ => Ok(()),
    }
}

fn field<'a>(info: &'a [(String, String)], name: &str) -> Option<&'a str> {
    info.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// How the payload is framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `$<len>`: exactly this many bytes.
    Length(u64),
    /// `$EOF:<mark>`: bytes up to the 40-byte mark.
    EndMark(Vec<u8>),
}

pub(crate) fn framing(line: &[u8]) -> Option<Framing> {
    let rest = line.strip_prefix(b"$")?;
    if let Some(mark) = rest.strip_prefix(b"EOF:") {
        return (mark.len() == EOF_MARK_LEN).then(|| Framing::EndMark(mark.to_vec()));
    }
    std::str::from_utf8(rest)
        .ok()?
        .parse()
        .ok()
        .map(Framing::Length)
}

impl Redis {
    /// The source for `cfg`.
    pub fn new(cfg: RedisConfig) -> Self {
        Redis { cfg }
    }

    fn where_(&self) -> String {
        format!("Redis at {}", self.cfg.url_redacted)
    }

    fn password(&self) -> Result<Option<Secret>> {
        if let Some(pw) = &self.cfg.endpoint.password {
            return Ok(Some(pw.clone()));
        }
        self.cfg
            .password_file
            .as_deref()
            .map(super::read_password_file)
            .transpose()
    }

    /// Connects, with TLS for `rediss://`, and authenticates: to the server the url names, or to
    /// the one the sentinels name now.
    pub async fn connect(&self) -> Result<Session> {
        let ep = &self.cfg.endpoint;
        let (host, port, where_) = match &ep.sentinel {
            None => (ep.host.clone(), ep.port, self.where_()),
            Some(sentinel) => {
                let (host, port) = self.ask_sentinels(sentinel).await?;
                let role = if sentinel.replica {
                    "replica"
                } else {
                    "primary"
                };
                let where_ = format!(
                    "{} ({role} {host}:{port} of {})",
                    self.where_(),
                    sentinel.master
                );
                (host, port, where_)
            }
        };
        let mut s = self.connect_node(&host, port, where_).await?;
        if let Some(sentinel) = &ep.sentinel {
            check_role(&mut s, sentinel).await?;
        }
        Ok(s)
    }

    /// A session with the server at `host:port`, logged in (`where_` names it in messages).
    pub(crate) async fn connect_node(
        &self,
        host: &str,
        port: u16,
        where_: String,
    ) -> Result<Session> {
        let conn = self.open(host, port, &where_).await?;
        let mut s = Session {
            io: BufReader::with_capacity(READ_CHUNK, conn),
            where_,
            node: (host.to_string(), port),
        };
        self.login(&mut s).await?;
        Ok(s)
    }

    /// A TCP connection to `host:port`, with TLS for `rediss://`.
    async fn open(&self, host: &str, port: u16, where_: &str) -> Result<Box<dyn Conn>> {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| {
            Error::failed(format!(
                "cannot connect to {where_}: no answer in {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| {
            Error::failed(format!("cannot connect to {where_}: {e}"))
                .hint("is the server up and reachable from here? check the url's host and port (RUNBOOK.md#source-unreachable)")
        })?;
        let _ = tcp.set_nodelay(true);
        if !self.cfg.endpoint.tls {
            return Ok(Box::new(tcp));
        }
        let config = crate::tls::client_config(self.cfg.tls_ca_file.as_deref())?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| Error::new(ErrorKind::Invalid, format!("{where_}: host name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Credential, format!("{where_}: TLS handshake failed: {e}"))
                    .hint("lifeboat verifies the server's certificate: set tls_ca_file to the CA that signed it (RUNBOOK.md#source-unreachable)")
            })?;
        Ok(Box::new(tls))
    }

    /// Asks each sentinel in turn for the server to capture: the primary, or a healthy replica.
    async fn ask_sentinels(&self, sentinel: &Sentinel) -> Result<(String, u16)> {
        let mut why = Vec::new();
        for (host, port) in &sentinel.sentinels {
            let where_ = format!("sentinel {host}:{port}");
            let asked = async {
                let conn = self.open(host, *port, &where_).await?;
                let mut s = Session {
                    io: BufReader::with_capacity(READ_CHUNK, conn),
                    where_: where_.clone(),
                    node: (host.clone(), *port),
                };
                if sentinel.replica {
                    s.send(&[b"SENTINEL", b"REPLICAS", sentinel.master.as_bytes()])
                        .await?;
                    let replicas = s.maps().await?;
                    healthy_replica(&replicas).ok_or_else(|| {
                        Error::failed(format!(
                            "it knows no healthy replica of {}",
                            sentinel.master
                        ))
                    })
                } else {
                    s.send(&[
                        b"SENTINEL",
                        b"GET-MASTER-ADDR-BY-NAME",
                        sentinel.master.as_bytes(),
                    ])
                    .await?;
                    match s.strings().await?.as_deref() {
                        Some([host, port]) => port
                            .parse()
                            .map(|p| (host.clone(), p))
                            .map_err(|_| Error::failed(format!("it answered the port `{port}`"))),
                        _ => Err(Error::failed(format!(
                            "it monitors no primary named {}",
                            sentinel.master
                        ))),
                    }
                }
            };
            match tokio::time::timeout(CONNECT_TIMEOUT * 2, asked).await {
                Ok(Ok(found)) => return Ok(found),
                Ok(Err(e)) => why.push(format!("{where_}: {}", e.message)),
                Err(_) => why.push(format!("{where_}: no answer")),
            }
        }
        Err(Error::failed(format!(
            "{}: no sentinel named a {} of {}: {}",
            self.where_(),
            if sentinel.replica { "replica" } else { "primary" },
            sentinel.master,
            why.join("; ")
        ))
        .hint("check the url's sentinels and the name the sentinels monitor (SENTINEL MASTERS) (RUNBOOK.md#source-unreachable)"))
    }

    /// Authenticates `s` with the url's login or the password file, then pings.
    async fn login(&self, s: &mut Session) -> Result<()> {
        let ep = &self.cfg.endpoint;

        if let Some(pw) = self.password()? {
            let pw = pw.expose().as_bytes().to_vec();
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &ep.username {
                args.push(user.as_bytes());
            }
            args.push(&pw);
            s.send(&args).await?;
            if let Reply::Error(e) = s.reply().await? {
                return Err(Error::new(
                    ErrorKind::Credential,
                    format!("{}: authentication failed: {e}", s.where_),
                )
                .hint("check the user and password (password_file or ${VAR} in url) (RUNBOOK.md#source-unreachable)"));
            }
        }
        s.call(&[b"PING"]).await?;
        Ok(())
    }

    /// Opens a replication stream and returns the payload's framing.
    async fn start_sync(s: &mut Session) -> Result<Framing> {
        s.call(&[b"REPLCONF", b"listening-port", b"0"]).await?;
        s.call(&[b"REPLCONF", b"capa", b"eof", b"capa", b"psync2"])
            .await?;
        // Redis 7+: a replica that only wants the snapshot; the master keeps no backlog for it.
        // Older servers refuse it, and that is fine.
        if let Err(e) = s.call(&[b"REPLCONF", b"rdb-only", b"1"]).await {
            tracing::debug!(error = %e, "The server does not take REPLCONF rdb-only");
        }
        s.send(&[b"PSYNC", b"?", b"-1"]).await?;
        let mut line = s.line().await?;
        if line.starts_with(b"-") {
            let first = String::from_utf8_lossy(&line[1..]).into_owned();
            if first.starts_with("NOAUTH") || first.starts_with("NOPERM") {
                return Err(s.refused(&[b"PSYNC"], &first));
            }
            // Older servers and proxies may still take SYNC.
            s.send(&[b"SYNC"]).await?;
            line = s.line().await?;
            if line.starts_with(b"-") {
                let second = String::from_utf8_lossy(&line[1..]).into_owned();
                return Err(Error::failed(format!(
                    "{} refused to serve a replica: PSYNC: {first}; SYNC: {second}",
                    s.where_
                ))
                .hint("managed services (ElastiCache, Memorystore, Azure Cache) refuse replication: use mode = \"file\" where the server's RDB file is on a shared volume (RUNBOOK.md#redis-sync-refused)"));
            }
        } else if line.starts_with(b"+FULLRESYNC") || line.starts_with(b"+CONTINUE") {
            line = s.line().await?;
        }
        framing(&line).ok_or_else(|| s.protocol(&line))
    }

    /// `BGSAVE`, and waits until it has finished and succeeded.
    async fn bgsave(
        &self,
        s: &mut Session,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<i64> {
        let counts = |info: &[(String, String)]| {
            let saves = field(info, "rdb_saves").and_then(|v| v.parse::<u64>().ok());
            let last = field(info, "rdb_last_save_time")
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            (saves, last)
        };
        let (mut saves_before, mut last_before) = counts(&s.info("persistence").await?);
        // SCHEDULE: if an AOF rewrite runs, the save starts when it ends instead of failing.
        // "Already in progress" may be a replica's sync, which writes no file and counts no
        // save: wait for that child to end, then ask again, so that the save waited for is one.
        loop {
            match s.call(&[b"BGSAVE", b"SCHEDULE"]).await {
                Ok(_) => break,
                Err(e) if e.message.contains("already in progress") => loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "cancelled")),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    let now = s.info("persistence").await?;
                    if field(&now, "rdb_bgsave_in_progress") != Some("1") {
                        // What that child saved is not ours.
                        (saves_before, last_before) = counts(&now);
                        break;
                    }
                },
                Err(e) => return Err(e),
            }
        }
        let started = std::time::Instant::now();
        let mut waiting_since = started;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "cancelled")),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let now = s.info("persistence").await?;
            let in_progress = field(&now, "rdb_bgsave_in_progress") == Some("1");
            let (saves, last) = counts(&now);
            let moved = match (saves_before, saves) {
                (Some(a), Some(b)) => b > a,
                // Older servers: LASTSAVE has one-second resolution.
                _ => last > last_before && started.elapsed() > Duration::from_secs(1),
            };
            let rewriting = field(&now, "aof_rewrite_in_progress") == Some("1");
            if in_progress || rewriting {
                waiting_since = std::time::Instant::now();
                continue;
            }
            if !moved {
                // Neither saving nor saved: a scheduled save that never started, or one that failed.
                if waiting_since.elapsed() > IDLE_TIMEOUT {
                    return Err(Error::failed(format!(
                        "{}: BGSAVE did not complete within {} s (rdb_last_bgsave_status:{})",
                        s.where_,
                        IDLE_TIMEOUT.as_secs(),
                        field(&now, "rdb_last_bgsave_status").unwrap_or("?")
                    ))
                    .hint("read the server's log: usually disk space or fork memory (RUNBOOK.md#backup-failing)"));
                }
                continue;
            }
            if field(&now, "rdb_last_bgsave_status") != Some("ok") {
                return Err(Error::failed(format!(
                    "{}: BGSAVE failed (rdb_last_bgsave_status:{})",
                    s.where_,
                    field(&now, "rdb_last_bgsave_status").unwrap_or("?")
                ))
                .hint("read the server's log: usually disk space or fork memory (RUNBOOK.md#backup-failing)"));
            }
            return Ok(last);
        }
    }
}

/// Sees the snapshot's bytes: the CRC check inline, the structural walk on its own thread.
struct RdbWatch {
    state: Arc<Mutex<WatchState>>,
}

struct WatchState {
    crc: Option<Crc64Tail>,
    walker: Option<std_mpsc::SyncSender<Bytes>>,
    outcome: Option<(CrcVerdict, RdbSummary)>,
}

impl Observer for RdbWatch {
    fn observe(&mut self, chunk: &[u8]) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if let Some(crc) = st.crc.as_mut() {
            crc.update(chunk);
        }
        // The walker stops reading at the snapshot's end mark; it is then gone, and so is this.
        let gone = match &st.walker {
            Some(tx) => tx.send(Bytes::copy_from_slice(chunk)).is_err(),
            None => false,
        };
        if gone {
            st.walker = None;
        }
    }
}

/// Reads the chunks the watch forwards, for the walker thread.
struct ChannelReader {
    rx: std_mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

type Verdict = Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// Starts the walker thread; returns the observer, and a verdict that wraps `framed` (the
/// payload's own verdict) with the CRC and structure checks.
fn watch(framed: Verdict, where_: String) -> (RdbWatch, Verdict) {
    let (tx, rx) = std_mpsc::sync_channel::<Bytes>(8);
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut summary = RdbSummary::default();
        let r = rdb::parse_into(
            ChannelReader {
                rx,
                cur: Bytes::new(),
            },
            &mut summary,
        );
        let _ = done_tx.send((summary, r));
    });
    let state = Arc::new(Mutex::new(WatchState {
        crc: Some(Crc64Tail::default()),
        walker: Some(tx),
        outcome: None,
    }));
    let shared = state.clone();
    let verdict = Box::pin(async move {
        framed.await?;
        let crc = {
            let mut st = shared
                .lock()
                .map_err(|_| Error::failed("snapshot check state poisoned"))?;
            st.walker = None; // ends the walker's input
            st.crc.take()
        }
        .ok_or_else(|| Error::failed("the snapshot was checked twice"))?;
        let total = crc.total();
        let damaged = |m: String| {
            Error::new(
                ErrorKind::Integrity,
                format!("the snapshot from {where_} is not a whole RDB file: {m}"),
            )
            .hint("nothing was published; retry, and read the server's log if it repeats (RUNBOOK.md#backup-failing)")
        };
        let crc = crc.finish().map_err(damaged)?;
        let (mut summary, walked) = done_rx
            .await
            .map_err(|_| Error::failed("the snapshot walker stopped"))?;
        match walked {
            Ok(()) if summary.bytes != total => {
                return Err(damaged(format!(
                    "{} bytes follow its end",
                    total - summary.bytes
                )))
            }
            Ok(()) => {}
            Err(
                e @ (RdbError::Truncated(_) | RdbError::Malformed { .. } | RdbError::Header(_)),
            ) if crc == CrcVerdict::Disabled => {
                return Err(damaged(format!(
                    "{e} (the server saves without a checksum)"
                )))
            }
            Err(e) => summary.incomplete = Some(e.to_string()),
        }
        let mut st = shared
            .lock()
            .map_err(|_| Error::failed("snapshot check state poisoned"))?;
        st.outcome = Some((crc, summary));
        Ok(())
    });
    (RdbWatch { state }, verdict)
}

async fn read_some(s: &mut Session, buf: &mut [u8], got: u64) -> Result<usize> {
    match tokio::time::timeout(IDLE_TIMEOUT, s.io.read(buf)).await {
        Err(_) => Err(Error::failed(format!(
            "{}: the snapshot stalled after {got} bytes (no data for {} s)",
            s.where_,
            IDLE_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) => Err(Error::failed(format!(
            "{}: the connection failed after {got} bytes of the snapshot: {e}",
            s.where_
        ))),
        Ok(Ok(n)) => Ok(n),
    }
}

/// Copies the payload from the socket into the pipe, exactly as framed.
async fn pump(mut s: Session, framing: Framing, mut out: tokio::io::DuplexStream) -> Result<()> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut got = 0u64;
    let write_err = |e: std::io::Error| Error::failed(format!("the pipeline stopped reading: {e}"));
    match framing {
        Framing::Length(len) => {
            while got < len {
                let want = buf.len().min((len - got) as usize);
                let n = read_some(&mut s, &mut buf[..want], got).await?;
                if n == 0 {
                    return Err(Error::failed(format!(
                        "{}: the connection closed after {got} of {len} bytes of the snapshot",
                        s.where_
                    )));
                }
                out.write_all(&buf[..n]).await.map_err(write_err)?;
                got += n as u64;
            }
        }
        Framing::EndMark(mark) => {
            let mut pending: Vec<u8> = Vec::with_capacity(READ_CHUNK + EOF_MARK_LEN);
            loop {
                let n = read_some(&mut s, &mut buf, got).await?;
                if n == 0 {
                    return Err(Error::failed(format!(
                        "{}: the connection closed after {got} bytes, before the snapshot's end mark",
                        s.where_
                    )));
                }
                pending.extend_from_slice(&buf[..n]);
                if let Some(end) = memchr::memmem::find(&pending, &mark) {
                    out.write_all(&pending[..end]).await.map_err(write_err)?;
                    break;
                }
                let keep = pending.len().min(EOF_MARK_LEN - 1);
                let cut = pending.len() - keep;
                out.write_all(&pending[..cut]).await.map_err(write_err)?;
                got += cut as u64;
                pending.drain(..cut);
            }
        }
    }
    out.shutdown().await.map_err(write_err)?;
    // Dropping the session closes the replica connection: the payload is all lifeboat wants.
    Ok(())
}

/// A whole replica session over `conn`, whatever answers on its other end: the replication
/// handshake, then the payload as framed. Returns the payload.
#[cfg(test)]
pub(crate) async fn replicate_over<C: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    conn: C,
) -> Result<Vec<u8>> {
    let mut s = Session {
        io: BufReader::with_capacity(READ_CHUNK, Box::new(conn)),
        where_: "the test server".into(),
        node: (String::new(), 0),
    };
    let framing = Redis::start_sync(&mut s).await?;
    let (tx, mut rx) = tokio::io::duplex(64 << 10);
    let read = async {
        let mut v = Vec::new();
        rx.read_to_end(&mut v).await.map(|_| v)
    };
    let (pumped, read) = tokio::join!(pump(s, framing, tx), read);
    pumped?;
    read.map_err(|e| Error::failed(format!("reading the pumped payload: {e}")))
}

/// What a Redis backup's fingerprint holds (`fingerprint.json.age`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Format version.
    pub format: u32,
    /// Always `redis`.
    pub kind: super::Kind,
    /// `replication`, `file` or `scan`.
    pub mode: String,
    /// `scan`: keys stored and keys that vanished during the walk (not a point in time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<scan::ScanOutcome>,
    /// The server's version (from the snapshot's `redis-ver`).
    pub server_version: Option<String>,
    /// The snapshot's CRC64, hex; `None` when the server saves without one.
    pub crc64: Option<String>,
    /// What the snapshot holds (a cluster's: every shard's together).
    pub rdb: RdbSummary,
    /// `redis+cluster://`: each shard's snapshot and the slots it owned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Vec<cluster::ShardRecord>>,
}

impl Redis {
    /// What a snapshot is taken from: the server's run id and its replication ids (its history,
    /// which a restart from its RDB or a promoted replica carries on). Read after the capture,
    /// on a new connection: the capture's own ends with its payload, and a server that made a
    /// replication backlog for it has new ids. `(host, port)`: the server captured, not whichever
    /// the sentinels name by now.
    async fn origin(&self, (host, port): &(String, u16)) -> Result<Origin> {
        let mut s = self
            .connect_node(host, *port, format!("{} ({host}:{port})", self.where_()))
            .await?;
        let server = s.info("server").await?;
        let replication = s.info("replication").await?;
        let run = field(&server, "run_id")
            .ok_or_else(|| Error::failed(format!("{}: INFO server has no run_id", s.where_)))?;
        let mut origin = Origin::new(format!("redis run {run}"));
        for id in ["master_replid", "master_replid2"] {
            match field(&replication, id) {
                Some(r) if r.bytes().any(|b| b != b'0') => {
                    origin.history.push(format!("redis replication {r}"));
                }
                _ => {}
            }
        }
        Ok(origin.detail("role", field(&replication, "role").unwrap_or("unknown")))
    }
}

#[async_trait]
impl Source for Redis {
    async fn probe(&self) -> Result<()> {
        if self.cfg.endpoint.cluster.is_some() {
            return cluster::probe(self).await;
        }
        let s = self.connect().await?;
        self.probe_session(s).await
    }

    async fn backup(&self, ctx: &BackupContext) -> Result<SourceBackup> {
        if self.cfg.endpoint.cluster.is_some() {
            return cluster::backup(self, ctx).await;
        }
        let s = self.connect().await?;
        let node = s.node.clone();
        let key = layout::backup_object(&ctx.source, &ctx.id, RDB_OBJECT);
        let captured = self
            .capture(s, key, RDB_OBJECT, ctx, &ctx.pipeline, ctx.cancel.clone())
            .await?;
        // Read after the capture: the ids it was taken under (a server that made a replication
        // backlog for it has new ones).
        let origin = match self.origin(&node).await {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(source = %ctx.source, backup = %ctx.id, error = %e, "The backup records no origin: the server's ids could not be read (an ACL user needs +info)");
                None
            }
        };
        let server_version = captured.server_version();
        let fingerprint = serde_json::to_value(Fingerprint {
            format: 1,
            kind: super::Kind::Redis,
            mode: captured.mode.into(),
            scan: captured.scan,
            server_version: server_version.clone(),
            crc64: captured.crc64,
            rdb: captured.summary,
            cluster: None,
        })
        .map_err(|e| Error::failed(format!("cannot encode the fingerprint: {e}")))?;
        Ok(SourceBackup {
            parts: vec![captured.part],
            fingerprint,
            source_version: server_version.map(|v| format!("Redis {v}")),
            dump_tool_version: None,
            base_backup: None,
            shards: Vec::new(),
            database: None,
            origin,
        })
    }
}

impl Redis {
    /// Checks that the server `s` is logged in to serves a capture the policy's way.
    pub(crate) async fn probe_session(&self, mut s: Session) -> Result<()> {
        match &self.cfg.capture {
            RedisCapture::Replication => {
                s.call(&[b"REPLCONF", b"listening-port", b"0"]).await?;
            }
            RedisCapture::Scan { .. } => {
                s.call(&[b"SCAN", b"0", b"COUNT", b"1"]).await?;
            }
            RedisCapture::File { rdb_path } => {
                s.info("persistence").await?;
                let dir = rdb_path.parent().unwrap_or(std::path::Path::new("."));
                if !dir.is_dir() {
                    return Err(Error::failed(format!(
                        "rdb_path {}: the directory does not exist here",
                        rdb_path.display()
                    ))
                    .hint("mount the server's data volume into this pod and point rdb_path at its dump.rdb"));
                }
            }
        }
        Ok(())
    }
}

/// One server's snapshot, stored and checked.
pub(crate) struct Captured {
    /// The stored object.
    pub part: crate::repo::manifest::Part,
    /// `replication`, `file` or `scan`.
    pub mode: &'static str,
    /// The snapshot's CRC64, hex; `None` when the server saves without one.
    pub crc64: Option<String>,
    /// What the snapshot holds.
    pub summary: RdbSummary,
    /// `scan`: keys stored and keys that vanished.
    pub scan: Option<scan::ScanOutcome>,
}

impl Captured {
    /// The server's version, from the snapshot's `redis-ver`.
    pub fn server_version(&self) -> Option<String> {
        self.summary.aux.get("redis-ver").cloned()
    }
}

impl Redis {
    /// Takes the snapshot of the server `s` is logged in to, the policy's way, and streams it
    /// through the pipeline into `key` (`name` in the manifest), checking it as it passes.
    pub(crate) async fn capture(
        &self,
        mut s: Session,
        key: String,
        name: &str,
        ctx: &BackupContext,
        pipeline: &pipeline::PipelineConfig,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<Captured> {
        let where_ = s.where_.clone();
        let scanned: Arc<Mutex<Option<scan::ScanOutcome>>> = Arc::default();
        let (mode, input, framed): (&str, Pin<Box<dyn AsyncRead + Send>>, Verdict) = match &self
            .cfg
            .capture
        {
            RedisCapture::Replication => {
                let framing = Self::start_sync(&mut s).await?;
                tracing::debug!(source = %ctx.source, backup = %ctx.id, server = %where_, framing = ?framing, "Receiving the snapshot");
                let (writer, reader) = tokio::io::duplex(PIPE_BUFFER);
                let task = tokio::spawn(pump(s, framing, writer));
                let verdict: Verdict = Box::pin(async move {
                    task.await
                        .map_err(|e| Error::failed(format!("snapshot reader failed: {e}")))?
                });
                ("replication", Box::pin(reader), verdict)
            }
            RedisCapture::Scan { rate } => {
                let (writer, reader) = tokio::io::duplex(PIPE_BUFFER);
                let task = tokio::spawn(scan::scan_into(s, writer, *rate, cancel.clone()));
                let done = scanned.clone();
                let verdict: Verdict = Box::pin(async move {
                    let outcome = task
                        .await
                        .map_err(|e| Error::failed(format!("snapshot scan failed: {e}")))??;
                    if let Ok(mut d) = done.lock() {
                        *d = Some(outcome);
                    }
                    Ok(())
                });
                ("scan", Box::pin(reader), verdict)
            }
            RedisCapture::File { rdb_path } => {
                let saved_at = self.bgsave(&mut s, &cancel).await?;
                let file = tokio::fs::File::open(rdb_path).await.map_err(|e| {
                        Error::failed(format!("rdb_path {}: {e}", rdb_path.display()))
                            .hint("point rdb_path at the server's dir/dbfilename (CONFIG GET dir) on a volume shared with this pod")
                    })?;
                let modified = file
                    .metadata()
                    .await
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64);
                if modified.is_some_and(|m| m + 1 < saved_at) {
                    return Err(Error::failed(format!(
                            "rdb_path {} is older than the save the server just made",
                            rdb_path.display()
                        ))
                        .hint("rdb_path is not the file the server writes: check CONFIG GET dir and dbfilename"));
                }
                ("file", Box::pin(file), Box::pin(async { Ok(()) }))
            }
        };
        let (observer, verdict) = watch(framed, where_.clone());
        let (digests, observer) = pipeline::run(
            input,
            verdict,
            observer,
            ctx.store.clone(),
            key,
            pipeline,
            cancel,
        )
        .await
        .map_err(Error::from)?;
        let (crc, summary) = observer
            .state
            .lock()
            .ok()
            .and_then(|mut st| st.outcome.take())
            .ok_or_else(|| Error::failed("the snapshot's checks left no result"))?;
        if let Some(why) = &summary.incomplete {
            tracing::warn!(source = %ctx.source, backup = %ctx.id, server = %where_, reason = %why, "Snapshot stored, but its key counts are incomplete");
        }
        if crc == CrcVerdict::Disabled {
            tracing::warn!(source = %ctx.source, backup = %ctx.id, server = %where_, "The server saves without a checksum (rdbchecksum no): damage in transit cannot be detected");
        }
        let scan = scanned.lock().ok().and_then(|mut s| s.take());
        if let Some(o) = scan.as_ref().filter(|o| o.vanished > 0) {
            tracing::warn!(source = %ctx.source, backup = %ctx.id, server = %where_, vanished = o.vanished, "Keys were deleted or expired while the scan read them; the snapshot is not a point in time");
        }
        Ok(Captured {
            // A scan is an RDB file too, but not of one instant: the manifest says so.
            part: digests.part(
                name,
                Role::Snapshot,
                if mode == "scan" {
                    "rdb-scan-not-point-in-time"
                } else {
                    "rdb"
                },
            ),
            mode,
            crc64: match crc {
                CrcVerdict::Ok(v) => Some(format!("{v:016x}")),
                CrcVerdict::Disabled => None,
            },
            summary,
            scan,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_framing_is_read() {
        assert_eq!(framing(b"$1234"), Some(Framing::Length(1234)));
        let mark = [b'a'; 40];
        let mut line = b"$EOF:".to_vec();
        line.extend_from_slice(&mark);
        assert_eq!(framing(&line), Some(Framing::EndMark(mark.to_vec())));
        assert_eq!(framing(b"$EOF:short"), None);
        assert_eq!(framing(b"+OK"), None);
        assert_eq!(framing(b"$-1x"), None);
    }
}
