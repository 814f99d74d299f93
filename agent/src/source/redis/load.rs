//! Loading Redis snapshots back: an ephemeral `redis-server` that loads a restored RDB, the move of
//! its keys into a live server, and reading what a server holds.
//!
//! The ephemeral server listens on a unix socket in its own temp dir only (no TCP port, nothing to
//! collide with, nothing reachable from outside), never persists, and is killed when dropped. Keys
//! move with `DUMP` and `RESTORE … REPLACE`, which carries every type (streams with their consumer
//! groups, HyperLogLogs, module types) byte for byte, and the remaining time to live; Redis
//! Functions libraries follow with `FUNCTION DUMP` / `FUNCTION RESTORE`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::error::{Error, ErrorKind, Result};
use crate::policy::Secret;

/// Keys per SCAN batch and per pipeline when moving keys.
const BATCH: usize = 500;
/// Longest one reply may take (a RESTORE of a large value included).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

/// Keys and keys with an expiry, per database number.
pub type Keyspace = BTreeMap<u32, (u64, u64)>;

/// Where a Redis server is, and how to log in.
#[derive(Debug, Clone)]
pub struct Target {
    addr: ConnectionAddr,
    username: Option<String>,
    password: Option<Secret>,
    /// `rediss://`: the PEM CA certificates its certificate is checked against (the system's
    /// roots when `None`).
    tls_ca: Option<Vec<u8>>,
    /// `redis+cluster://`: the nodes given, asked for the cluster's primaries (`addr` is the
    /// first).
    cluster: Option<Vec<(String, u16)>>,
    /// For messages: the address, no secret.
    pub shown: String,
}

impl Target {
    /// A `redis://[USER@]HOST[:PORT]` target, or `rediss://…` over TLS, its certificate checked
    /// against `tls_ca_file` (the source's) or the system's roots. The password comes from
    /// `REDISCLI_AUTH` (as for redis-cli), never from the URL, which would show it in the process
    /// list.
    ///
    /// `redis+cluster://[USER@]HOST[:PORT][,HOST[:PORT]…]` (or `rediss+cluster://`) is a cluster:
    /// each key goes to the node owning its slot.
    pub fn parse(url: &str, tls_ca_file: Option<&Path>) -> Result<Target> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Invalid,
                format!("--to {}: {why}", crate::policy::redact_url(url)),
            )
        };
        let (scheme, rest) = url.split_once("://").unwrap_or((url, ""));
        let (tls, cluster) = match scheme {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+cluster" => (false, true),
            "rediss+cluster" => (true, true),
            _ => {
                return Err(bad(
                    "restore into a live server takes redis://HOST:PORT, rediss://HOST:PORT or redis+cluster://HOST:PORT[,HOST:PORT…]",
                ))
            }
        };
        let plain = if tls { "rediss" } else { "redis" };
        let (login, hosts) = match rest.split_once('@') {
            Some((login, hosts)) => (format!("{login}@"), hosts),
            None => (String::new(), rest),
        };
        let mut nodes = Vec::new();
        for host in hosts.trim_end_matches('/').split(',') {
            let u = url::Url::parse(&format!("{plain}://{login}{host}"))
                .map_err(|e| bad(&e.to_string()))?;
            if u.password().is_some() {
                return Err(bad("a password in --to would show in the process list")
                    .hint("put the password in the REDISCLI_AUTH environment variable instead"));
            }
            if !cluster && !nodes.is_empty() {
                return Err(bad("a single server takes one HOST:PORT; a cluster is redis+cluster://HOST:PORT,HOST:PORT…"));
            }
            let host = u
                .host_str()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| bad("no host"))?
                .trim_matches(['[', ']'])
                .to_string();
            nodes.push((host, u.port().unwrap_or(6379), u.username().to_string()));
        }
        let (host, port, username) = nodes[0].clone();
        let tls_ca = match tls_ca_file {
            Some(f) if tls => Some(std::fs::read(f).map_err(|e| {
                Error::new(
                    ErrorKind::Credential,
                    format!("tls_ca_file {}: cannot read it: {e}", f.display()),
                )
            })?),
            _ => None,
        };
        let shown = nodes
            .iter()
            .map(|(h, p, _)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(Target {
            shown: format!("{scheme}://{shown}"),
            addr: node_addr(&host, port, tls),
            username: (!username.is_empty()).then_some(username),
            password: std::env::var("REDISCLI_AUTH").ok().map(Secret::new),
            tls_ca,
            cluster: cluster.then(|| nodes.into_iter().map(|(h, p, _)| (h, p)).collect()),
        })
    }

    /// True for a `redis+cluster://` target.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The servers keys are written to: a cluster's primaries (asked of its nodes now), or this
    /// server.
    pub async fn primaries(&self) -> Result<Vec<Target>> {
        let Some(seeds) = &self.cluster else {
            return Ok(vec![self.clone()]);
        };
        let tls = matches!(self.addr, ConnectionAddr::TcpTls { .. });
        let mut why = Vec::new();
        for (host, port) in seeds {
            let node = self.node(host, *port);
            let asked = async {
                let mut con = node.connect(0).await?;
                let reply: redis::Value = redis::cmd("CLUSTER")
                    .arg("SHARDS")
                    .query_async(&mut con)
                    .await
                    .map_err(|e| node.error("CLUSTER SHARDS", e))?;
                super::cluster::Topology::from_shards(&reply_of(&reply), tls).map_err(|m| {
                    Error::failed(format!("{}: its slot map is unreadable: {m}", node.shown))
                })
            };
            match asked.await {
                Ok(t) if !t.shards.is_empty() => {
                    return Ok(t
                        .shards
                        .iter()
                        .map(|s| self.node(&s.primary.host, s.primary.port))
                        .collect())
                }
                Ok(_) => why.push(format!("{}: it serves no slots", node.shown)),
                Err(e) => why.push(e.message),
            }
        }
        Err(Error::failed(format!(
            "{}: no node described the cluster: {}",
            self.shown,
            why.join("; ")
        ))
        .hint("check the nodes in --to, and that they run with cluster-enabled yes"))
    }

    /// The node `host:port` of this cluster, with the same login and TLS.
    fn node(&self, host: &str, port: u16) -> Target {
        let tls = matches!(self.addr, ConnectionAddr::TcpTls { .. });
        Target {
            addr: node_addr(host, port, tls),
            username: self.username.clone(),
            password: self.password.clone(),
            tls_ca: self.tls_ca.clone(),
            cluster: None,
            shown: format!("{}://{host}:{port}", if tls { "rediss" } else { "redis" }),
        }
    }

    /// A connection that sends each key's command to the node owning its slot, following
    /// `MOVED` and `ASK`.
    async fn cluster_connection(&self) -> Result<redis::cluster_async::ClusterConnection> {
        let seeds = self.cluster.as_deref().unwrap_or_default();
        let tls = matches!(self.addr, ConnectionAddr::TcpTls { .. });
        let infos: Vec<ConnectionInfo> = seeds
            .iter()
            .map(|(h, p)| node_addr(h, *p, tls).into_connection_info())
            .collect::<redis::RedisResult<_>>()
            .map_err(|e| self.error("connecting", e))?;
        let mut b = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(Duration::from_secs(10))
            .response_timeout(RESPONSE_TIMEOUT);
        if let Some(u) = &self.username {
            b = b.username(u);
        }
        if let Some(p) = &self.password {
            b = b.password(p.expose());
        }
        if tls {
            b = b.tls(redis::TlsMode::Secure);
            if let Some(pem) = &self.tls_ca {
                b = b.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                });
            }
        }
        b.build()
            .map_err(|e| self.error("connecting", e))?
            .get_async_connection()
            .await
            .map_err(|e| self.error("connecting", e))
    }

    fn unix(path: &Path) -> Target {
        Target {
            addr: ConnectionAddr::Unix(path.to_path_buf()),
            username: None,
            password: None,
            tls_ca: None,
            cluster: None,
            shown: format!("scratch redis-server ({})", path.display()),
        }
    }

    /// A connection to database `db`.
    pub async fn connect(&self, db: u32) -> Result<MultiplexedConnection> {
        let mut settings = redis::RedisConnectionInfo::default().set_db(i64::from(db));
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.password {
            settings = settings.set_password(p.expose());
        }
        let info: ConnectionInfo = self
            .addr
            .clone()
            .into_connection_info()
            .map_err(|e| self.error("connecting", e))?
            .set_redis_settings(settings);
        let client = match &self.tls_ca {
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(info),
        }
        .map_err(|e| self.error("connecting", e))?;
        client
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(10)))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT)),
            )
            .await
            .map_err(|e| self.error("connecting", e))
    }

    /// An error on this server, with a credential hint where it fits.
    pub fn error(&self, what: &str, e: redis::RedisError) -> Error {
        let text = e.to_string();
        let message = format!("{}: {what}: {text}", self.shown);
        if text.contains("WRONGPASS") || text.contains("NOAUTH") || text.contains("NOPERM") {
            Error::new(ErrorKind::Credential, message)
                .hint("set the password in REDISCLI_AUTH, and the user in the URL (redis://USER@HOST:PORT)")
        } else if text.contains("certificate") || text.contains("UnknownIssuer") {
            Error::new(ErrorKind::Credential, message)
                .hint("a rediss:// target's certificate is checked against the source's tls_ca_file (else the system's roots): set it to the CA that signed the target's certificate")
        } else {
            Error::failed(message)
        }
    }

    /// What the server holds, from `INFO keyspace` (a cluster's: its primaries' summed).
    pub async fn keyspace(&self) -> Result<Keyspace> {
        let mut all = Keyspace::new();
        for t in self.primaries().await? {
            let mut con = t.connect(0).await?;
            let info: String = redis::cmd("INFO")
                .arg("keyspace")
                .query_async(&mut con)
                .await
                .map_err(|e| t.error("INFO keyspace", e))?;
            for (db, (keys, expires)) in parse_keyspace(&info) {
                let into = all.entry(db).or_default();
                into.0 += keys;
                into.1 += expires;
            }
        }
        Ok(all)
    }
}

fn node_addr(host: &str, port: u16, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_string(), port)
    }
}

/// A `redis` crate reply as lifeboat's own, for the cluster map parser.
fn reply_of(v: &redis::Value) -> super::Reply {
    use super::Reply;
    match v {
        redis::Value::Nil => Reply::Bulk(None),
        redis::Value::Int(i) => Reply::Int(*i),
        redis::Value::BulkString(b) => Reply::Bulk(Some(b.clone())),
        redis::Value::SimpleString(s) => Reply::Status(s.clone()),
        redis::Value::Okay => Reply::Status("OK".into()),
        redis::Value::Array(items) | redis::Value::Set(items) => {
            Reply::Array(Some(items.iter().map(reply_of).collect()))
        }
        redis::Value::Map(pairs) => Reply::Array(Some(
            pairs
                .iter()
                .flat_map(|(k, v)| [reply_of(k), reply_of(v)])
                .collect(),
        )),
        other => Reply::Status(format!("{other:?}")),
    }
}

/// Parses `INFO keyspace` (`db0:keys=3,expires=1,avg_ttl=0`).
pub fn parse_keyspace(info: &str) -> Keyspace {
    let mut out = Keyspace::new();
    for line in info.lines() {
        let Some((db, rest)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(db) = db.strip_prefix("db").and_then(|d| d.parse().ok()) else {
            continue;
        };
        let get = |name: &str| {
            rest.split(',')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(db, (get("keys"), get("expires")));
    }
    out
}

/// Finds a Redis tool (redis-server, redis-check-rdb) in `bin_dir` or on PATH.
pub fn find_tool(bin_dir: Option<&Path>, tool: &str) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match bin_dir {
        Some(d) => vec![d.join(tool)],
        None => std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(tool)).collect())
            .unwrap_or_default(),
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::failed(format!("{tool} not found{}", match bin_dir {
                Some(d) => format!(" in {}", d.display()),
                None => " on PATH".into(),
            }))
            .hint("install Redis's server package (Debian: redis-server and redis-tools) or set redis_bin_dir on the source (RUNBOOK.md#tools-missing)")
        })
}

/// Runs `redis-check-rdb` on a file; returns its summary lines, or its complaint as an error.
pub async fn check_rdb(bin_dir: Option<&Path>, rdb: &Path) -> Result<String> {
    let tool = find_tool(bin_dir, "redis-check-rdb")?;
    let out = tokio::process::Command::new(&tool)
        .arg(rdb)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::failed(format!("cannot run {}: {e}", tool.display())))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(6).collect();
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "redis-check-rdb rejects the restored snapshot: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        ));
    }
    Ok(text
        .lines()
        .filter(|l| l.contains("keys read") || l.contains("expires"))
        .map(|l| l.trim_start_matches("[info] ").to_string())
        .collect::<Vec<_>>()
        .join(", "))
}

/// Writes `plain` to `path` through a temp file in the same directory, renamed only once the
/// whole stream arrived and checked; a read error (damaged or altered plaintext) leaves nothing.
pub async fn write_rdb(mut plain: impl AsyncRead + Unpin, path: &Path) -> Result<u64> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".lifeboat-restore-")
        .tempfile_in(dir)
        .map_err(|e| Error::failed(format!("cannot write in {}: {e}", dir.display())))?;
    let mut out = tokio::fs::File::from_std(
        tmp.reopen()
            .map_err(|e| Error::failed(format!("cannot write in {}: {e}", dir.display())))?,
    );
    let n = tokio::io::copy(&mut plain, &mut out).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            Error::new(ErrorKind::Integrity, e.to_string())
                .hint("nothing was written; use another backup and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)")
        } else {
            Error::failed(format!("writing {}: {e}", path.display()))
        }
    })?;
    out.flush()
        .await
        .and(out.sync_all().await)
        .map_err(|e| Error::failed(format!("writing {}: {e}", path.display())))?;
    tmp.persist(path).map_err(|e| {
        Error::failed(format!(
            "cannot rename into {}: {}",
            path.display(),
            e.error
        ))
    })?;
    Ok(n)
}

/// An ephemeral `redis-server` holding a restored snapshot.
pub struct Scratch {
    dir: tempfile::TempDir,
    child: tokio::process::Child,
    target: Target,
    /// The server binary.
    pub bin: PathBuf,
}

impl Scratch {
    /// Writes `plain` into a temp dir as `dump.rdb` and starts a server that loads it.
    ///
    /// `keep_expired`: start as a replica (of nothing), which loads keys whose expiry has passed
    /// instead of dropping them, so that key counts match the snapshot exactly (the verifier);
    /// a restore wants them dropped.
    pub async fn start(
        bin_dir: Option<&Path>,
        plain: impl AsyncRead + Unpin,
        keep_expired: bool,
    ) -> Result<Scratch> {
        let bin = find_tool(bin_dir, "redis-server")?;
        let dir = tempfile::Builder::new()
            .prefix("lifeboat-redis-")
            .tempdir()
            .map_err(|e| Error::failed(format!("cannot create a scratch directory: {e}")))?;
        write_rdb(plain, &dir.path().join("dump.rdb")).await?;
        let socket = dir.path().join("redis.sock");
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--dir")
            .arg(dir.path())
            .arg("--dbfilename")
            .arg("dump.rdb")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--logfile")
            .arg(dir.path().join("log"));
        if keep_expired {
            // Port 1 on loopback: nothing answers, so it never syncs and never flushes.
            cmd.arg("--replicaof").arg("127.0.0.1").arg("1");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::failed(format!("cannot start {}: {e}", bin.display())))?;
        let mut s = Scratch {
            target: Target::unix(&socket),
            dir,
            child,
            bin,
        };
        s.wait_loaded().await?;
        Ok(s)
    }

    async fn wait_loaded(&mut self) -> Result<()> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "the scratch redis-server exited ({status}) while loading the snapshot: {}",
                        self.log_tail()
                    ),
                ));
            }
            if self.target.addr_exists() {
                if let Ok(mut con) = self.target.connect(0).await {
                    let info: redis::RedisResult<String> = redis::cmd("INFO")
                        .arg("persistence")
                        .query_async(&mut con)
                        .await;
                    if let Ok(info) = info {
                        if info.contains("loading:0") {
                            return Ok(());
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(4).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// The server, to read from.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The restored file.
    pub fn rdb_path(&self) -> PathBuf {
        self.dir.path().join("dump.rdb")
    }

    /// Stops the server and removes its directory.
    pub async fn stop(mut self) {
        if let Ok(mut con) = self.target.connect(0).await {
            let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN")
                .arg("NOSAVE")
                .query_async(&mut con)
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

impl Target {
    fn addr_exists(&self) -> bool {
        match &self.addr {
            ConnectionAddr::Unix(p) => p.exists(),
            _ => true,
        }
    }
}

/// What moving keys did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Moved {
    /// Keys written, per database.
    pub keys: BTreeMap<u32, u64>,
    /// Redis Functions libraries written.
    pub functions: u64,
    /// Keys that expired before they could be written.
    pub expired: u64,
}

/// Copies every key of `from` into `to` with `DUMP` / `RESTORE … REPLACE`, keeping the time to
/// live. `progress` gets the number of keys written after each batch.
pub async fn move_keys(
    from: &Target,
    to: &Target,
    dbs: &[u32],
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Moved> {
    let mut moved = Moved::default();
    if let Some(db) = dbs.iter().find(|&&db| db != 0).filter(|_| to.is_cluster()) {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("the backup holds keys in database {db}, and a cluster has database 0 only"),
        )
        .hint("restore into a single server (redis://…) or a directory instead"));
    }
    for &db in dbs {
        let mut src = from.connect(db).await?;
        let mut dst = match to.is_cluster() {
            true => Writer::Cluster(to.cluster_connection().await?),
            false => Writer::One(to.connect(db).await?),
        };
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut src)
                .await
                .map_err(|e| from.error("SCAN", e))?;
            if !keys.is_empty() {
                let mut read = redis::pipe();
                for k in &keys {
                    read.cmd("DUMP").arg(k).cmd("PTTL").arg(k);
                }
                let values: Vec<redis::Value> = read
                    .query_async(&mut src)
                    .await
                    .map_err(|e| from.error("DUMP", e))?;
                let mut write = Vec::with_capacity(keys.len());
                for (k, pair) in keys.iter().zip(values.chunks(2)) {
                    let (payload, ttl) = match (&pair[0], &pair[1]) {
                        (redis::Value::BulkString(p), redis::Value::Int(t)) => (p, t),
                        // Expired since SCAN listed it: DUMP answers nil.
                        (redis::Value::Nil, _) => {
                            moved.expired += 1;
                            continue;
                        }
                        // Anything else is an answer nobody expected: never skip a key silently.
                        (dump, ttl) => {
                            return Err(Error::failed(format!(
                                "{}: DUMP/PTTL of {:?} answered {dump:?} / {ttl:?}",
                                from.shown,
                                String::from_utf8_lossy(k)
                            )))
                        }
                    };
                    if *ttl == -2 || *ttl == 0 {
                        moved.expired += 1;
                        continue;
                    }
                    let mut restore = redis::cmd("RESTORE");
                    restore
                        .arg(k)
                        .arg((*ttl).max(0))
                        .arg(payload.as_slice())
                        .arg("REPLACE");
                    write.push(restore);
                }
                let n = write.len() as u64;
                if n > 0 {
                    dst.run(write).await.map_err(|e| {
                        let err = to.error("RESTORE", e);
                        if err.message.contains("payload version") {
                            err.hint("the target runs an older Redis than the snapshot's: restore --to DIR and load the file with a server of the source's version")
                        } else {
                            err
                        }
                    })?;
                }
                *moved.keys.entry(db).or_default() += n;
                progress(n);
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    Ok(moved)
}

/// Where moved keys are written.
enum Writer {
    /// One server: each batch in one pipeline.
    One(MultiplexedConnection),
    /// A cluster: each command to the node owning its key, many at a time.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Writer {
    async fn run(&mut self, commands: Vec<redis::Cmd>) -> redis::RedisResult<()> {
        match self {
            Writer::One(con) => {
                let mut pipe = redis::pipe();
                for c in commands {
                    pipe.add_command(c).ignore();
                }
                pipe.query_async(con).await
            }
            Writer::Cluster(con) => {
                use futures::{StreamExt, TryStreamExt};
                futures::stream::iter(commands)
                    .map(|c| {
                        let mut con = con.clone();
                        async move { c.query_async::<()>(&mut con).await }
                    })
                    .buffer_unordered(64)
                    .try_collect()
                    .await
            }
        }
    }
}

/// The Redis Functions libraries `target` holds (`FUNCTION LIST`); 0 on a server without
/// Functions (before 7.0). A cluster's: the most any primary holds.
pub async fn function_libraries(target: &Target) -> Result<u64> {
    let mut most = 0;
    for t in target.primaries().await? {
        most = most.max(server_function_libraries(&t).await?);
    }
    Ok(most)
}

async fn server_function_libraries(target: &Target) -> Result<u64> {
    let mut con = target.connect(0).await?;
    match redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async::<Vec<redis::Value>>(&mut con)
        .await
    {
        Ok(libraries) => Ok(libraries.len() as u64),
        Err(e) if e.to_string().contains("unknown command") => Ok(0),
        Err(e) => Err(target.error("FUNCTION LIST", e)),
    }
}

/// Copies the Redis Functions libraries of `from` into `to` (`FUNCTION DUMP` / `FUNCTION
/// RESTORE`): with `flush` the target's own libraries are deleted first, else libraries of the
/// same name are replaced and the others stay, as keys are. Returns how many were copied.
pub async fn move_functions(from: &Target, to: &Target, flush: bool) -> Result<u64> {
    let count = server_function_libraries(from).await?;
    if count == 0 {
        return Ok(0);
    }
    let mut src = from.connect(0).await?;
    let payload: Vec<u8> = redis::cmd("FUNCTION")
        .arg("DUMP")
        .query_async(&mut src)
        .await
        .map_err(|e| from.error("FUNCTION DUMP", e))?;
    // Every primary of a cluster runs the scripts: each gets the libraries.
    for t in to.primaries().await? {
        let mut dst = t.connect(0).await?;
        redis::cmd("FUNCTION")
            .arg("RESTORE")
            .arg(&payload)
            .arg(if flush { "FLUSH" } else { "REPLACE" })
            .query_async::<()>(&mut dst)
            .await
            .map_err(|e| t.error("FUNCTION RESTORE", e))?;
    }
    Ok(count)
}

/// Deletes everything on `target` (`FLUSHALL`; on each primary of a cluster), for
/// `restore --flush`.
pub async fn flush_all(target: &Target) -> Result<()> {
    for t in target.primaries().await? {
        let mut con = t.connect(0).await?;
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| t.error("FLUSHALL", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspace_lines_parse() {
        let ks = parse_keyspace(
            "# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=0\r\ndb12:keys=7,expires=0,avg_ttl=0\r\n",
        );
        assert_eq!(ks[&0], (3, 1));
        assert_eq!(ks[&12], (7, 0));
        assert_eq!(ks.len(), 2);
    }

    #[test]
    fn target_passwords_stay_out_of_argv() {
        let e = Target::parse("redis://u:secret@h:6379", None).unwrap_err();
        assert!(!e.message.contains("secret"), "{e}");
        assert!(e.hint.unwrap().contains("REDISCLI_AUTH"));
        assert_eq!(
            Target::parse("redis://h", None).unwrap().shown,
            "redis://h:6379"
        );
        assert_eq!(
            Target::parse("rediss://h", None).unwrap().shown,
            "rediss://h:6379"
        );
        assert!(Target::parse("http://h", None).is_err());
    }
}
