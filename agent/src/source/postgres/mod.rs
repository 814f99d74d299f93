//! PostgreSQL sources: `pg_dump` of an exported snapshot, with the fingerprint taken from the same
//! snapshot, plus `pg_dumpall --globals-only`.
//!
//! A tokio-postgres connection opens a REPEATABLE READ, READ ONLY transaction and exports its
//! snapshot; `pg_dump --snapshot` dumps exactly that state while the transaction stays open. Row
//! counts and content hashes come from the dump stream itself ([`pgdump`]), schema object
//! counts from catalog queries inside the snapshot, so the fingerprint adds no table scans.
//! Passwords reach pg_dump through a 0600 passfile named by PGPASSFILE, never argv or logs.

pub mod checks;
pub mod globals;
mod parallel;
pub mod pgdump;
pub mod policy;
mod readback;
pub mod restore;
pub mod scratch;
pub mod verify;

pub use policy::{FingerprintMode, PostgresConfig, RawPostgresSource};

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, NoTls};

use self::pgdump::{DumpFingerprinter, DumpSummary, LargeObjectHasher, SequenceValue, TableData};
use super::child;
use super::{BackupContext, Source, SourceBackup};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, NoObserver};
use crate::policy::Secret;
use crate::repo::layout;
use crate::repo::manifest::Role;
use crate::repo::origin::Origin;

/// Object name of the database dump.
pub const DUMP_OBJECT: &str = "database.dump.zst.age";
/// Object name of the globals dump.
pub const GLOBALS_OBJECT: &str = "globals.sql.zst.age";

/// Session settings that fix how values print, so COPY text from the dump and from a restored
/// database hash the same (libpq `PGOPTIONS` form, for pg_dump and pg_restore).
pub const TEXT_OPTIONS: &str =
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex";

/// The same settings as SQL, for lifeboat's own connections.
pub const TEXT_SETTINGS_SQL: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'";

/// Counts of schema objects, inside the snapshot.
const OBJECT_COUNTS: &str = r#"
with user_ns as (
  select oid from pg_namespace
  where nspname not in ('pg_catalog', 'information_schema')
    and nspname not like 'pg_toast%' and nspname not like 'pg_temp%'
)
select
  (select count(*) from pg_class where relnamespace in (select oid from user_ns) and relkind in ('r', 'p')) as tables,
  (select count(*) from pg_class where relnamespace in (select oid from user_ns) and relkind = 'v') as views,
  (select count(*) from pg_class where relnamespace in (select oid from user_ns) and relkind = 'm') as materialized_views,
  (select count(*) from pg_class where relnamespace in (select oid from user_ns) and relkind in ('i', 'I')) as indexes,
  (select count(*) from pg_class where relnamespace in (select oid from user_ns) and relkind = 'S') as sequences,
  (select count(*) from pg_proc where pronamespace in (select oid from user_ns)) as functions,
  (select count(*) from pg_trigger t join pg_class c on c.oid = t.tgrelid
     where not t.tgisinternal and c.relnamespace in (select oid from user_ns)) as triggers,
  (select count(*) from pg_policy) as policies,
  (select count(*) from pg_extension) as extensions,
  (select count(*) from pg_largeobject_metadata) as large_objects
"#;

const OBJECT_COUNT_NAMES: &[&str] = &[
    "tables",
    "views",
    "materialized_views",
    "indexes",
    "sequences",
    "functions",
    "triggers",
    "policies",
    "extensions",
    "large_objects",
];

/// Environment variables for a child process.
pub(crate) type ChildEnv = Vec<(String, OsString)>;

/// A PostgreSQL source.
#[derive(Debug, Clone)]
pub struct Postgres {
    cfg: PostgresConfig,
}

/// An open connection, with what is needed to point a libpq tool at the same server.
pub struct Connection {
    /// The client.
    pub client: Client,
    config: tokio_postgres::Config,
    password: Option<Secret>,
    /// Server major version (15, 16, …).
    pub server_major: u32,
    /// Server version string.
    pub server_version: String,
}

impl Connection {
    /// The database this connection is to.
    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }
}

impl Postgres {
    /// The source for `cfg`.
    pub fn new(cfg: PostgresConfig) -> Self {
        Postgres { cfg }
    }

    fn where_(&self) -> String {
        format!("PostgreSQL at {}", self.cfg.url_redacted)
    }

    /// The connection settings with the password resolved (url, `password_file`, PGPASSWORD),
    /// and the password apart, for connections lifeboat makes itself.
    pub fn resolved_config(&self) -> Result<(tokio_postgres::Config, Option<Secret>)> {
        let mut config = tokio_postgres::Config::from_str(self.cfg.url.expose()).map_err(|e| {
            Error::new(
                ErrorKind::Invalid,
                format!("{}: invalid connection string: {e}", self.where_()),
            )
        })?;
        if let Some(file) = &self.cfg.password_file {
            config.password(super::read_password_file(file)?.expose());
        }
        if config.get_password().is_none() {
            // libpq tools would read PGPASSWORD; the connection lifeboat makes itself does too.
            if let Ok(pw) = std::env::var("PGPASSWORD") {
                config.password(pw);
            }
        }
        if config.get_application_name().is_none() {
            config.application_name("lifeboat");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        let password = config
            .get_password()
            .map(|p| Secret::new(String::from_utf8_lossy(p).into_owned()));
        Ok((config, password))
    }

    /// Connects to the source's database (or `dbname` instead, e.g. `postgres` for maintenance).
    pub async fn connect_to(&self, dbname: Option<&str>) -> Result<Connection> {
        let (mut config, password) = self.resolved_config()?;
        if let Some(db) = dbname {
            config.dbname(db);
        }
        let client = match self.tls()? {
            None => {
                let (client, connection) = config
                    .connect(NoTls)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                drive(connection);
                client
            }
            Some(tls) => {
                let (client, connection) = config
                    .connect(tls)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                drive(connection);
                client
            }
        };
        let row = client
            .query_one("select current_setting('server_version_num')::int, current_setting('server_version')", &[])
            .await
            .map_err(|e| self.query_error("reading the server version", e))?;
        let num: i32 = row.get(0);
        Ok(Connection {
            client,
            config,
            password,
            server_major: (num / 10000) as u32,
            server_version: row.get(1),
        })
    }

    /// Whether lifeboat's own connection uses TLS, and with which roots. TLS is always verified
    /// here: `sslmode=require` (or `prefer` with `tls_ca_file`) checks the server's certificate
    /// against `tls_ca_file`, else the system's roots; the children then get `verify-full` too.
    fn tls(&self) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>> {
        Ok(self
            .tls_config()?
            .map(tokio_postgres_rustls::MakeRustlsConnect::new))
    }

    /// The TLS settings of lifeboat's own connections (see [`Postgres::tls`]); `None`: plain.
    pub fn tls_config(&self) -> Result<Option<rustls::ClientConfig>> {
        let url = self.cfg.url.expose();
        let required = url.contains("sslmode=require");
        if url.contains("sslmode=disable") || (!required && self.cfg.tls_ca_file.is_none()) {
            return Ok(None);
        }
        crate::tls::client_config(self.cfg.tls_ca_file.as_deref()).map(Some)
    }

    /// Connects to the source's database.
    pub async fn connect(&self) -> Result<Connection> {
        self.connect_to(None).await
    }

    fn connect_error(&self, e: tokio_postgres::Error) -> Error {
        let code = e.as_db_error().map(|d| d.code().code().to_string());
        let detail = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(inner) = src {
                    s.push_str(&format!(": {inner}"));
                    src = inner.source();
                }
                s
            });
        let message = format!("cannot connect to {}: {detail}", self.where_());
        match code.as_deref() {
            Some("28P01") | Some("28000") => Error::new(ErrorKind::Credential, message)
                .hint("check the user and password (password_file or ${VAR} in url) and pg_hba.conf (RUNBOOK.md#source-unreachable)"),
            Some("3D000") => Error::failed(message).hint("the database does not exist: fix the url's /DBNAME"),
            _ if message.contains("certificate") || message.contains("Certificate") => Error::new(ErrorKind::Credential, message)
                .hint("lifeboat verifies the server's TLS certificate: set tls_ca_file to the CA that signed it (RUNBOOK.md#source-unreachable)"),
            _ => Error::failed(message).hint("is the server up and reachable from here? check the url's host and port (RUNBOOK.md#source-unreachable)"),
        }
    }

    pub(crate) fn query_error(&self, what: &str, e: tokio_postgres::Error) -> Error {
        let detail = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        Error::failed(format!("{}: {what} failed: {detail}", self.where_()))
    }

    /// Finds `tool` (pg_dump, pg_dumpall) no older than the server, and returns it with its version.
    /// Finds `tool` (pg_dump, pg_restore, psql…) no older than the server, with its version.
    pub async fn find_tool(&self, tool: &str, server_major: u32) -> Result<(PathBuf, String)> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = &self.cfg.bin_dir {
            candidates.push(dir.join(tool));
        } else {
            let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((major, e.path().join("bin").join(tool)))
                })
                .collect();
            versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
            candidates.extend(versioned.into_iter().map(|(_, p)| p));
            if let Ok(out) = child::output(Path::new("pg_config"), &["--bindir"]).await {
                candidates.push(PathBuf::from(out.trim()).join(tool));
            }
            candidates.push(PathBuf::from(tool));
        }
        let mut last_err = None;
        for path in candidates {
            if path.components().count() > 1 && !path.exists() {
                continue;
            }
            match child::output(&path, &["--version"]).await {
                Ok(v) => {
                    let version = v.trim().to_string();
                    let major = tool_major(&version).unwrap_or(0);
                    if major < server_major {
                        return Err(Error::failed(format!(
                            "{} is version {major}, older than the server ({server_major}) at {}",
                            path.display(),
                            self.cfg.url_redacted
                        ))
                        .hint(format!(
                            "install postgresql-client-{server_major} or newer, or set pg_bin_dir to its bin directory"
                        )));
                    }
                    return Ok((path, version));
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(Error::failed(format!(
            "no {tool} found for the server at {}{}",
            self.cfg.url_redacted,
            last_err
                .map(|e| format!(" ({})", e.message))
                .unwrap_or_default()
        ))
        .hint(format!(
            "install postgresql-client-{server_major} or set pg_bin_dir (RUNBOOK.md#tools-missing)"
        )))
    }

    /// The roles and tablespaces (`pg_dumpall --globals-only`, no passwords), as a part.
    async fn store_globals(
        &self,
        ctx: &BackupContext,
        c: &Connection,
        pg_dumpall: &Path,
        env: &ChildEnv,
    ) -> Result<crate::repo::manifest::Part> {
        let mut args: Vec<OsString> = vec!["--globals-only".into(), "--no-role-passwords".into()];
        if let Some(db) = c.config.get_dbname() {
            args.push(format!("--database={db}").into());
        }
        let running = child::spawn(pg_dumpall, &args, env, "pg_dumpall --globals-only".into())?;
        let key = layout::backup_object(&ctx.source, &ctx.id, GLOBALS_OBJECT);
        let (d, _) = pipeline::run(
            running.stdout,
            running.verdict,
            NoObserver,
            ctx.store.clone(),
            key,
            &ctx.pipeline,
            ctx.cancel.clone(),
        )
        .await
        .map_err(|e| {
            Error::from(e)
                .context("pg_dumpall")
                .hint("the role needs to read pg_roles; or set globals = false for this source")
        })?;
        Ok(d.part(GLOBALS_OBJECT, Role::Globals, "sql"))
    }

    /// libpq environment for a child, and the passfile holding the password (kept until the child is done).
    pub(crate) fn child_env(
        &self,
        c: &Connection,
    ) -> Result<(ChildEnv, Option<tempfile::NamedTempFile>)> {
        let cfg = &c.config;
        let mut env: Vec<(String, OsString)> = Vec::new();
        let hosts: Vec<String> = cfg
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(s) => s.clone(),
                Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        if !hosts.is_empty() {
            env.push(("PGHOST".into(), hosts.join(",").into()));
        }
        let ports: Vec<String> = cfg.get_ports().iter().map(|p| p.to_string()).collect();
        if !ports.is_empty() {
            env.push(("PGPORT".into(), ports.join(",").into()));
        }
        if let Some(u) = cfg.get_user() {
            env.push(("PGUSER".into(), u.into()));
        }
        if let Some(d) = cfg.get_dbname() {
            env.push(("PGDATABASE".into(), d.into()));
        }
        let sslmode = match (cfg.get_ssl_mode(), &self.cfg.tls_ca_file) {
            (SslMode::Disable, _) => "disable",
            // As strict as lifeboat's own connection: with a CA, verify it and the host name.
            (_, Some(ca)) => {
                env.push(("PGSSLROOTCERT".into(), ca.as_os_str().to_owned()));
                "verify-full"
            }
            (SslMode::Require, None) => "require",
            _ => "prefer",
        };
        env.push(("PGSSLMODE".into(), sslmode.into()));
        env.push(("PGAPPNAME".into(), "lifeboat".into()));
        env.push(("PGOPTIONS".into(), TEXT_OPTIONS.into()));
        env.push(("PGCONNECT_TIMEOUT".into(), "10".into()));
        let passfile = match &c.password {
            None => None,
            Some(pw) => {
                sweep_passfiles();
                // tempfile creates the file with mode 0600. The name carries this process's id
                // so that a later run can remove it if this process dies before it does.
                let mut f = tempfile::Builder::new()
                    .prefix(&format!("{PASSFILE_PREFIX}{}-", std::process::id()))
                    .tempfile()
                    .map_err(|e| Error::failed(format!("cannot create a passfile: {e}")))?;
                let escaped = pw.expose().replace('\\', "\\\\").replace(':', "\\:");
                writeln!(f, "*:*:*:*:{escaped}")
                    .and_then(|_| f.flush())
                    .map_err(|e| Error::failed(format!("cannot write the passfile: {e}")))?;
                env.push(("PGPASSFILE".into(), f.path().as_os_str().to_owned()));
                Some(f)
            }
        };
        Ok((env, passfile))
    }
}

const PASSFILE_PREFIX: &str = "lifeboat-pgpass-";

/// Removes the passfiles that lifeboat processes which died without cleaning up (kill -9, the
/// OOM killer) left in the temp dir: a password must not outlive the run that needed it.
fn sweep_passfiles() {
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PASSFILE_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Runs a connection's future on its own task; it ends when its client is dropped.
fn drive<F>(connection: F)
where
    F: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>
        + Send
        + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
}

/// What a PostgreSQL backup's fingerprint holds (`fingerprint.json.age`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Format version.
    pub format: u32,
    /// Always `postgres`.
    pub kind: super::Kind,
    /// Detail recorded.
    pub mode: FingerprintMode,
    /// The database dumped.
    pub database: Option<String>,
    /// The source server's version.
    pub server_version: String,
    /// Schema object counts, taken in the snapshot.
    pub objects: BTreeMap<String, i64>,
    /// Tables, sequences and large objects, taken from the dump stream.
    pub dump: DumpSummary,
}

fn object_counts(row: &tokio_postgres::Row) -> BTreeMap<String, i64> {
    OBJECT_COUNT_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| (name.to_string(), row.get::<_, i64>(i)))
        .collect()
}

/// What a restored database holds, measured the way its fingerprint was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Observed {
    /// Each expected table as found (rows 0 and no hash when the table is missing).
    pub tables: Vec<TableData>,
    /// Expected tables that do not exist in the restored database.
    pub missing_tables: Vec<String>,
    /// Tables in the restored database that the fingerprint does not name.
    pub unexpected_tables: Vec<String>,
    /// Each expected sequence as found (`None`: missing).
    pub sequences: Vec<(String, Option<SequenceValue>)>,
    /// Large objects.
    pub large_objects: u64,
    /// Their hash (full mode).
    pub large_objects_hash: Option<String>,
    /// Schema object counts.
    pub objects: BTreeMap<String, i64>,
    /// How the tables were read.
    #[serde(skip)]
    pub spread: readback::Spread,
}

/// `CREATE DATABASE name` as the dumped database was: its encoding and locale (from template0,
/// as a database of another encoding must be), or the server's defaults when the backup did not
/// record them. `locale = false` keeps the encoding but takes `C` for collation and ctype, which
/// every server has and which fits every encoding.
pub fn create_database(
    name: &str,
    like: Option<&crate::repo::manifest::DatabaseInfo>,
    owner: Option<&str>,
    locale: bool,
) -> String {
    let mut sql = format!("CREATE DATABASE {}", quote_ident(name));
    if let Some(owner) = owner {
        sql.push_str(&format!(" OWNER {}", quote_ident(owner)));
    }
    if let Some(d) = like {
        let (collate, ctype) = if locale {
            (d.collate.as_str(), d.ctype.as_str())
        } else {
            ("C", "C")
        };
        sql.push_str(&format!(
            " TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
            quote_literal(&d.encoding),
            quote_literal(collate),
            quote_literal(ctype)
        ));
    }
    sql
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal (standard_conforming_strings on, as on every supported server).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Measures a restored database against `expected`: COPY of every table with the same columns
/// and text settings as the dump, sequences, large objects and schema object counts.
pub async fn observe(pg: &Postgres, conn: &Connection, expected: &Fingerprint) -> Result<Observed> {
    let q = query_error;
    let client = &conn.client;
    readback::text_session(client).await?;
    let full = expected.mode == FingerprintMode::Full;
    // Each table with its size in blocks, which the read-back cuts large ones by.
    let present: readback::Present = client
        .query(
            "select n.nspname, c.relname, \
                    pg_relation_size(c.oid) / current_setting('block_size')::bigint \
             from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema') \
             and n.nspname not like 'pg_toast%' and n.nspname not like 'pg_temp%' \
             and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass \
                             and d.objid = c.oid and d.deptype = 'e')",
            &[],
        )
        .await
        .map_err(|e| q("listing tables", e))?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let (tables, missing_tables, spread) =
        readback::tables(pg, client, conn.server_major, expected, &present, full).await?;
    let dumped: std::collections::HashSet<(&str, &str)> = expected
        .dump
        .tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .collect();
    let mut unexpected_tables: Vec<String> = present
        .keys()
        .filter(|(s, n)| !dumped.contains(&(s.as_str(), n.as_str())))
        .map(|(s, n)| format!("{}.{}", quote_ident(s), quote_ident(n)))
        .collect();
    unexpected_tables.sort();
    let sequences = observe_sequences(client, expected).await?;
    let (lo_count, lo_hash) = observe_large_objects(client).await?;
    let counts = client
        .query_one(OBJECT_COUNTS, &[])
        .await
        .map_err(|e| q("counting schema objects", e))?;
    Ok(Observed {
        tables,
        missing_tables,
        unexpected_tables,
        sequences,
        large_objects: lo_count,
        large_objects_hash: full.then_some(lo_hash),
        objects: object_counts(&counts),
        spread,
    })
}

/// A failed query of the restored database, named by `what`.
fn query_error(what: &str, e: tokio_postgres::Error) -> Error {
    Error::failed(format!(
        "restored database: {what}: {}",
        e.as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string())
    ))
}

/// The last value of each sequence `expected` names (`None`: not restored).
async fn observe_sequences(
    client: &Client,
    expected: &Fingerprint,
) -> Result<Vec<(String, Option<SequenceValue>)>> {
    let q = query_error;
    let mut sequences = Vec::new();
    for seq in &expected.dump.sequences {
        let row = client
            .query_opt(
                "select pg_sequence_last_value(c.oid) from pg_class c where c.oid = to_regclass($1)",
                &[&seq.name],
            )
            .await
            .map_err(|e| q(&format!("reading sequence {}", seq.name), e))?;
        let found = row.map(|r| {
            let last: Option<i64> = r.get(0);
            SequenceValue {
                name: seq.name.clone(),
                // An uncalled sequence reports no last value; restored by setval(…, false) it holds `value`.
                value: last.unwrap_or(seq.value),
                is_called: last.is_some(),
            }
        });
        sequences.push((seq.name.clone(), found));
    }
    Ok(sequences)
}

/// Count and hash of the large objects.
async fn observe_large_objects(client: &Client) -> Result<(u64, String)> {
    let q = query_error;
    let mut lo = LargeObjectHasher::default();
    let los = client
        .query(
            "select oid::int8, lo_get(oid) from pg_largeobject_metadata order by oid",
            &[],
        )
        .await
        .map_err(|e| q("reading large objects", e))?;
    for r in &los {
        lo.start(r.get::<_, i64>(0));
        lo.feed(r.get::<_, &[u8]>(1));
        lo.end();
    }
    Ok(lo.finish())
}

/// Where pg_restore reads the archive from.
pub enum RestoreInput {
    /// Streamed into its stdin (one job).
    Stream(std::pin::Pin<Box<dyn AsyncRead + Send>>),
    /// A spooled plaintext archive (any number of jobs).
    File(std::path::PathBuf),
}

/// pg_restore settings.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Parallel jobs (needs [`RestoreInput::File`] above 1).
    pub jobs: u32,
    /// Do not restore ownership.
    pub no_owner: bool,
    /// Do not restore grants (when the roles they name may not exist).
    pub no_privileges: bool,
    /// Do not restore tablespace assignments.
    pub no_tablespaces: bool,
    /// All in one transaction (one job only): all or nothing, and faster on a minimal-WAL server.
    pub single_transaction: bool,
    /// Only these sections (`pre-data`, `data`, `post-data`); all when empty.
    pub sections: &'static [&'static str],
    /// Only the entries this file lists (`--use-list`).
    pub use_list: Option<std::path::PathBuf>,
}

impl RestoreOptions {
    /// The same settings for `sections` only, and only `list`'s entries if given.
    pub fn sections(
        &self,
        sections: &'static [&'static str],
        list: Option<std::path::PathBuf>,
    ) -> Self {
        RestoreOptions {
            sections,
            use_list: list,
            ..self.clone()
        }
    }
}

impl Postgres {
    /// Runs pg_restore into the database `conn` is connected to. Any error pg_restore reports
    /// fails the restore, with the tail of its stderr. Returns when a streamed dump had been read
    /// to its end (the data was in and the post-data section began).
    pub async fn pg_restore(
        &self,
        conn: &Connection,
        input: RestoreInput,
        opts: &RestoreOptions,
    ) -> Result<Option<std::time::Instant>> {
        let (tool, _) = self.find_tool("pg_restore", conn.server_major).await?;
        let (env, _passfile) = self.child_env(conn)?;
        let mut args: Vec<OsString> = vec!["--exit-on-error".into()];
        if let Some(db) = conn.dbname() {
            args.push(format!("--dbname={db}").into());
        }
        if opts.no_owner {
            args.push("--no-owner".into());
        }
        if opts.no_privileges {
            args.push("--no-privileges".into());
        }
        if opts.no_tablespaces {
            args.push("--no-tablespaces".into());
        }
        if opts.single_transaction && opts.jobs <= 1 {
            args.push("--single-transaction".into());
        }
        for section in opts.sections {
            args.push(format!("--section={section}").into());
        }
        if let Some(list) = &opts.use_list {
            let mut arg = OsString::from("--use-list=");
            arg.push(list);
            args.push(arg);
        }
        let ran = match input {
            RestoreInput::Stream(reader) => {
                child::run_with_input(&tool, &args, &env, "pg_restore".into(), Some(reader)).await
            }
            RestoreInput::File(path) => {
                args.push(format!("--jobs={}", opts.jobs.max(1)).into());
                args.push(path.into_os_string());
                child::run_with_input(&tool, &args, &env, "pg_restore".into(), None).await
            }
        };
        ran.map(|(_, input_read)| input_read)
            .map_err(|e| match needs_superuser(&e.message) {
                true => e.cause(crate::error::Cause::NeedsSuperuser),
                false => e,
            })
    }

    /// Replays a globals script (roles) into the server `conn` points at, statement by statement
    /// and only its role statements (see [`globals`]), with privileges on server
    /// parameters when `parameters`; statements naming a role in `protected` are refused. Returns what was refused or failed, other than "already exists".
    pub async fn replay_globals(
        &self,
        conn: &Connection,
        mut script: std::pin::Pin<Box<dyn AsyncRead + Send>>,
        protected: &[&str],
        parameters: bool,
    ) -> Result<Vec<String>> {
        use tokio::io::AsyncReadExt;
        // Roles only: a few KiB, even for thousands of roles. A larger part is not a globals script.
        const LIMIT: u64 = 64 << 20;
        let mut text = Vec::new();
        (&mut script)
            .take(LIMIT + 1)
            .read_to_end(&mut text)
            .await
            .map_err(|e| Error::failed(format!("reading the globals (roles) part: {e}")))?;
        if text.len() as u64 > LIMIT {
            return Err(Error::new(
                ErrorKind::Integrity,
                "the globals (roles) part is larger than 64 MiB: it is not a roles script; refusing to replay it",
            ));
        }
        let text = String::from_utf8_lossy(&text);
        Ok(globals::replay(&conn.client, &text, protected, parameters).await)
    }
}

/// Whether pg_restore's error output says it lacked a superuser's powers.
fn needs_superuser(stderr: &str) -> bool {
    [
        "permission denied",
        "must be superuser",
        "must be owner",
        "only superuser",
        "must have privileges of",
    ]
    .iter()
    .any(|p| stderr.contains(p))
}

/// The major version in a manifest's `PostgreSQL 15.18 (Debian …)` (0 when unreadable).
pub(crate) fn source_major(version: Option<&str>) -> u32 {
    version
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The major version in a tool's `--version` line.
pub(crate) fn tool_major(version: &str) -> Option<u32> {
    // "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    let after = version.split(") ").nth(1)?;
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[async_trait]
impl Source for Postgres {
    async fn probe(&self) -> Result<()> {
        let c = self.connect().await?;
        self.find_tool("pg_dump", c.server_major).await?;
        if self.cfg.globals {
            self.find_tool("pg_dumpall", c.server_major).await?;
        }
        Ok(())
    }

    async fn backup(&self, ctx: &BackupContext) -> Result<SourceBackup> {
        let c = self.connect().await?;
        let (pg_dump, dump_version) = self.find_tool("pg_dump", c.server_major).await?;
        let pg_dumpall = match self.cfg.globals {
            true => Some(self.find_tool("pg_dumpall", c.server_major).await?.0),
            false => None,
        };
        c.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(|e| self.query_error("opening the snapshot transaction", e))?;
        let snapshot: String = c
            .client
            .query_one("select pg_export_snapshot()", &[])
            .await
            .map_err(|e| self.query_error("exporting the snapshot", e))?
            .get(0);
        let counts_row = c
            .client
            .query_one(OBJECT_COUNTS, &[])
            .await
            .map_err(|e| self.query_error("counting schema objects", e))?;
        let objects = object_counts(&counts_row);
        let db_row = c
            .client
            .query_one(
                "select pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text, \
                 datname::text, (select system_identifier::text from pg_control_system()), \
                 (select timeline_id::text from pg_control_checkpoint()) \
                 from pg_database where datname = current_database()",
                &[],
            )
            .await
            .map_err(|e| self.query_error("reading the database's encoding", e))?;
        let database = crate::repo::manifest::DatabaseInfo {
            encoding: db_row.get(0),
            collate: db_row.get(1),
            ctype: db_row.get(2),
        };
        // The cluster (its system identifier, kept by replicas and restored copies) and the
        // database: what the source's backups are compared by.
        let origin = Origin::new(format!(
            "postgresql system {} database {}",
            db_row.get::<_, String>(4),
            db_row.get::<_, String>(3)
        ))
        .detail("timeline", db_row.get::<_, String>(5));

        let (env, _passfile) = self.child_env(&c)?;
        tracing::debug!(source = %ctx.source, backup = %ctx.id, tool = %pg_dump.display(), "Dumping database");
        let mut args: Vec<OsString> = vec![
            format!("--snapshot={snapshot}").into(),
            "--format=custom".into(),
            "--compress=0".into(),
            "--no-sync".into(),
        ];
        // Whatever the database's encoding, the dump (and so its content fingerprint) is UTF-8,
        // as the verifier reads the restored tables back; a restore converts it to the target's
        // encoding. Not for SQL_ASCII, whose bytes need not be UTF-8: a dump that says UTF-8
        // would then be refused by the server it is restored into.
        if database.encoding != "SQL_ASCII" {
            args.push("--encoding=UTF8".into());
        }
        let running = child::spawn(&pg_dump, &args, &env, "pg_dump".into())?;
        let key = layout::backup_object(&ctx.source, &ctx.id, DUMP_OBJECT);
        let (digests, fingerprinter) = pipeline::run(
            running.stdout,
            running.verdict,
            DumpFingerprinter::new(self.cfg.fingerprint),
            ctx.store.clone(),
            key,
            &ctx.pipeline,
            ctx.cancel.clone(),
        )
        .await
        .map_err(Error::from)?;
        // The dump is complete; the snapshot may go.
        c.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| self.query_error("closing the snapshot transaction", e))?;
        let mut parts = vec![digests.part(DUMP_OBJECT, Role::Database, "pg_dump-custom")];

        if let Some(pg_dumpall) = pg_dumpall {
            parts.push(self.store_globals(ctx, &c, &pg_dumpall, &env).await?);
        }

        let summary = fingerprinter.finish();
        if let Some(err) = &summary.error {
            tracing::warn!(source = %ctx.source, backup = %ctx.id, error = %err, "Dump stored, but its content fingerprint is incomplete");
        }
        let fingerprint = serde_json::to_value(Fingerprint {
            format: 1,
            kind: super::Kind::Postgres,
            mode: self.cfg.fingerprint,
            database: c.config.get_dbname().map(str::to_string),
            server_version: c.server_version.clone(),
            objects,
            dump: summary,
        })
        .map_err(|e| Error::failed(format!("cannot encode the fingerprint: {e}")))?;
        Ok(SourceBackup {
            parts,
            fingerprint,
            source_version: Some(format!("PostgreSQL {}", c.server_version)),
            dump_tool_version: Some(dump_version),
            base_backup: None,
            shards: Vec::new(),
            database: Some(database),
            origin: Some(origin),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_versions_parse() {
        assert_eq!(
            tool_major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(tool_major("pg_dumpall (PostgreSQL) 17.2"), Some(17));
        assert_eq!(tool_major("garbage"), None);
    }
}
