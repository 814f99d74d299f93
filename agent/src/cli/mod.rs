//! The operator's interface (DESIGN.md "The operator's interface"). Parses arguments, calls the
//! library, prints results (`--json`: one document on stdout; human text otherwise), and maps every
//! error to its documented exit code.

mod commands;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lifeboat::policy::LogFormat;
use lifeboat::{Cause, Error, ErrorKind};
use tokio_util::sync::CancellationToken;

/// Streamed, encrypted, verified backups of PostgreSQL (and soon Redis and object storage).
#[derive(Debug, Parser)]
#[command(name = "lifeboat", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Take one backup now of every source (or of those named).
    Backup {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        /// Only these sources (repeatable).
        #[arg(long, short = 's')]
        source: Vec<String>,
        /// Print each source's result (the backup's id and sizes, or its error) as one JSON
        /// document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List backups, newest first.
    List {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        #[command(flatten)]
        at: Place,
        /// Only this source.
        #[arg(long, short = 's')]
        source: Option<String>,
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Check manifests against stored objects; --read-data re-hashes every stored byte.
    Check {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        #[command(flatten)]
        at: Place,
        /// Only this source.
        #[arg(long, short = 's')]
        source: Option<String>,
        /// Download and re-hash every object.
        #[arg(long)]
        read_data: bool,
        /// The age identity file (else LIFEBOAT_IDENTITY_FILE, else encryption.identity_file):
        /// with it, the blobs an objects backup's snapshot names are checked (and re-hashed).
        #[arg(long, env = "LIFEBOAT_IDENTITY_FILE")]
        identity: Option<PathBuf>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup of any kind: a database into a PostgreSQL server, a cluster into a
    /// directory (to a point in time with --time/--lsn/--latest), Redis data into a server or a
    /// dump.rdb, objects into a directory or an S3 prefix. The plan comes first; a target holding
    /// data is refused unless --yes.
    Restore(RestoreArgs),
    /// Copy to the policy's `[[copies]]` (or to the one named) whatever they are missing of the
    /// primary's backups and WAL, as stored: no key is needed. Each object is checked against
    /// its manifest as it is read, and read back at the copy; the manifest goes last. The agent
    /// does the same after each backup and every `copy_interval`.
    Copy {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        /// Only this copy.
        #[arg(long, value_name = "NAME")]
        repository: Option<String>,
        /// Only these sources (repeatable).
        #[arg(long, short = 's')]
        source: Vec<String>,
        /// One JSON document per copy on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run the sidecar: scheduled backups and prunes, /healthz, /metrics and /status.
    Agent {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        /// Serve /healthz, /metrics and /status here instead of the policy's `agent.listen`
        /// (e.g. `0.0.0.0:9187` in a pod, where the kubelet probes the pod's address).
        #[arg(long, env = "LIFEBOAT_LISTEN")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Apply retention: delete what the rules no longer keep (a plan with a reason per backup).
    Prune {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        #[command(flatten)]
        at: Place,
        /// Only this source.
        #[arg(long, short = 's')]
        source: Option<String>,
        /// Print the plan and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// One JSON array of plans on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Keep a backup whatever the retention rules say.
    Pin {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        #[command(flatten)]
        at: Place,
        /// The source.
        #[arg(long, short = 's')]
        source: String,
        /// The backup id.
        #[arg(long)]
        backup: String,
    },
    /// Let retention decide about a pinned backup again.
    Unpin {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        #[command(flatten)]
        at: Place,
        /// The source.
        #[arg(long, short = 's')]
        source: String,
        /// The backup id.
        #[arg(long)]
        backup: String,
    },
    /// Policy file tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// WAL archiving of physical PostgreSQL sources.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Print a new age identity on stdout and its recipient on stderr; with --signing, a signing
    /// key (minisign format) and its public key, for `[signing]`.
    Keygen {
        /// A signing key for `signing.key_file` instead; its public key goes in `signing.trusted`.
        #[arg(long)]
        signing: bool,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    /// The policy file.
    #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
    pub policy: PathBuf,
    #[command(flatten)]
    pub at: Place,
    /// The source whose backup to restore.
    #[arg(long, short = 's')]
    pub source: String,
    /// A backup id, or `latest`.
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// The newest backup started before this time (RFC 3339, or `YYYY-MM-DD HH:MM:SS` in UTC).
    #[arg(long)]
    pub before: Option<String>,
    /// Target: a PostgreSQL URL (postgresql://user@host/db; password in PGPASSWORD), or for Redis
    /// redis://[user@]host:port (password in REDISCLI_AUTH) or a directory to write dump.rdb into;
    /// for a physical source, the directory to restore the cluster's files into; for objects, a
    /// directory or s3://bucket/prefix/.
    #[arg(long, visible_alias = "to-dir")]
    pub to: String,
    /// Physical sources: recover to the last transaction committed at or before this time (RFC
    /// 3339, or `YYYY-MM-DD HH:MM:SS` in UTC), from the newest base backup finished before it.
    #[arg(long, group = "recovery_target")]
    pub time: Option<String>,
    /// Physical sources: recover to this WAL location (e.g. 0/5A000028).
    #[arg(long, group = "recovery_target")]
    pub lsn: Option<String>,
    /// Physical sources: recover everything archived, from the newest base backup.
    #[arg(long, group = "recovery_target")]
    pub latest: bool,
    /// Physical sources, with --time, --lsn or --latest: the timeline to recover along (default:
    /// the newest, following every promotion in the archive).
    #[arg(long, requires = "recovery_target")]
    pub timeline: Option<u32>,
    /// Physical sources, with a target: start a server on the restored directory (as the
    /// postgres OS user when run as root) and wait until recovery reached the target and the
    /// cluster was promoted. It keeps running afterwards.
    #[arg(long, requires = "recovery_target")]
    pub start: bool,
    /// The port for --start.
    #[arg(long, requires = "start", default_value_t = 5432)]
    pub port: u16,
    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Restore into a database that already holds data, without asking.
    #[arg(long)]
    pub yes: bool,
    /// Break glass: also offer a backup no trusted key signed (`[signing]`), e.g. after the
    /// signing key was lost. The plan says so. Never for a backup you cannot vouch for.
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Redis: delete every key on the target (FLUSHALL) before restoring, instead of replacing
    /// only the keys the backup holds.
    #[arg(long)]
    pub flush: bool,
    /// Objects: also delete files in the target directory that the snapshot does not hold.
    #[arg(long)]
    pub delete_extra: bool,
    /// Objects: restore only this path of the snapshot (a file, or a directory with everything
    /// under it), at the same place under --to.
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
    /// Connections restoring at once: above 1, different tables' data load at once and
    /// pg_restore builds indexes with as many jobs. A backup from before seekable dumps, or
    /// one with large objects, is decrypted to a plaintext spool file in --spool-dir instead.
    #[arg(long, default_value_t = 1)]
    pub jobs: u32,
    /// Where downloaded (encrypted) objects and a parallel restore's plaintext are spooled
    /// (default: the temp directory). Nothing is spooled from a local directory repository (its
    /// files are checked in place), nor with --jobs on a seekable dump (read by range where it
    /// is stored, once checked). A physical base backup is not spooled: it unpacks as it
    /// downloads, and the directory is emptied again if its end proves it damaged.
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// Also replay roles (pg_dumpall --globals-only) into the target server.
    #[arg(long)]
    pub with_globals: bool,
    /// Do not restore object ownership (when the roles do not exist on the target).
    #[arg(long)]
    pub no_owner: bool,
    /// The age identity file (else LIFEBOAT_IDENTITY_FILE, else encryption.identity_file).
    #[arg(long, env = "LIFEBOAT_IDENTITY_FILE")]
    pub identity: Option<PathBuf>,
    /// Print the plan (and result) as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
enum WalCommand {
    /// Stream a physical source's WAL into the repository until stopped (SIGTERM or Ctrl-C),
    /// as the agent does; for a process of its own.
    Stream {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        /// The `postgres-physical` source (with `wal = { … }`).
        #[arg(long, short = 's')]
        source: String,
    },
    /// Write one WAL file from the archive to DEST, checked against its SHA-256: PostgreSQL's
    /// `restore_command` (`lifeboat wal fetch --policy P --source S %f %p`). Exit 1: not in the
    /// archive (recovery's end); 126: anything else (damaged, unreachable, no key), which stops
    /// recovery; nothing is written to DEST then.
    Fetch {
        #[command(flatten)]
        archive: WalArchive,
        /// The cluster's WAL segment size in bytes (`lifeboat restore` passes it); else it is
        /// read from the source's base backups, which lists them on every call.
        #[arg(long, value_name = "BYTES")]
        segment_size: Option<u64>,
        /// The cluster's system identifier (`lifeboat restore` passes the base backup's): a
        /// segment whose header names another cluster is refused like a damaged one. Read from
        /// the source's base backups when --segment-size is not given either.
        #[arg(long, value_name = "ID")]
        system_id: Option<u64>,
        /// Fetch up to N whole segments after this one in the background, into
        /// `lifeboat-prefetch/` in the data directory, while the server replays this one
        /// (`lifeboat restore` passes 8). Each is checked as this one is.
        #[arg(long, value_name = "N", default_value_t = 0)]
        prefetch: u32,
        /// The WAL file's name, as recovery asks for it (%f): a segment or a `.history` file.
        file: String,
        /// Where to write it (%p).
        dest: PathBuf,
    },
    /// The background half of `wal fetch --prefetch`.
    #[command(hide = true)]
    Prefetch {
        #[command(flatten)]
        archive: WalArchive,
        #[arg(long, value_name = "BYTES")]
        segment_size: u64,
        #[arg(long, value_name = "ID")]
        system_id: Option<u64>,
        #[arg(long)]
        after: String,
        #[arg(long)]
        count: u32,
    },
}

/// Which repository a command works against.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Place {
    /// Work against this copy (a `[[copies]]` name) alone instead of [repository]: for when
    /// the primary's region is down, or to inspect the copy.
    #[arg(long = "repository", value_name = "NAME")]
    pub copy: Option<String>,
}

/// Whose WAL archive `wal fetch` reads, and with which key.
#[derive(Debug, clap::Args)]
pub(crate) struct WalArchive {
    /// The policy file.
    #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
    pub policy: PathBuf,
    #[command(flatten)]
    pub at: Place,
    /// The `postgres-physical` source.
    #[arg(long, short = 's')]
    pub source: String,
    /// The age identity file (else LIFEBOAT_IDENTITY_FILE, else encryption.identity_file).
    #[arg(long, env = "LIFEBOAT_IDENTITY_FILE")]
    pub identity: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate policy files; exit 2 listing every problem with its field path.
    Check {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Treat missing ${VAR}s as empty (for policies whose secrets exist only where they run).
        #[arg(long)]
        allow_missing_env: bool,
    },
    /// Print the policy's JSON Schema (for editors: point a TOML language server at it).
    Schema,
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let mut format = match cli.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    if let Command::Agent { policy, .. } = &cli.command {
        // The sidecar logs as its policy says (json in production).
        if let Ok(p) = lifeboat::policy::load(policy, lifeboat::policy::LoadOptions::default()) {
            format = p.agent.log_format;
        }
    }
    init_tracing(format);
    let restore_command = matches!(
        &cli.command,
        Command::Wal {
            command: WalCommand::Fetch { .. }
        }
    );
    if restore_command {
        // A panic must stop recovery like every other failure: Rust's exit code for one (101)
        // would read to PostgreSQL as "not in the archive", and it would promote short of the
        // target.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            std::process::exit(STOP_RECOVERY);
        }));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    let cancel = CancellationToken::new();
    let result = runtime.block_on(async {
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::terminate(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot watch SIGTERM; only Ctrl-C stops cleanly");
                    let _ = tokio::signal::ctrl_c().await;
                    on_signal.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            on_signal.cancel();
            tracing::warn!("Interrupted: stopping at a safe point");
        });
        commands::run(cli.command, cancel.clone()).await
    });
    // Let aborts and deletes in flight finish, but never hang on exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => 0,
        Err(e) => {
            report(&e);
            match e.cause {
                // PostgreSQL reads exit 1 from restore_command as the end of the archive and
                // ends recovery there; above 125 it stops recovery instead.
                Some(Cause::NotArchived) => 1,
                _ if restore_command => STOP_RECOVERY,
                _ => e.kind.exit_code(),
            }
        }
    }
}

/// `wal fetch`'s exit code for every failure but a file the archive does not hold.
const STOP_RECOVERY: i32 = 126;

fn report(e: &Error) {
    let label = match e.kind {
        ErrorKind::Partial => "partial failure",
        ErrorKind::Interrupted => "interrupted",
        _ => "error",
    };
    eprintln!("{label}: {e}");
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn,hyper=warn"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        // A log reader that went away must not turn every log line into a panic (its default
        // reports write errors with eprintln!, which panics on a closed stderr).
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}
