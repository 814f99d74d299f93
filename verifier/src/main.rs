//! `lifeboat-verifier`: proves backups restore, by restoring them into scratch databases and
//! comparing what comes back with the fingerprint taken at backup time.

mod verify;

/// The allocator `lifeboat` uses, for the same reason (freed part buffers stayed resident in
/// glibc's per-thread arenas).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lifeboat::policy;
use lifeboat::repo::Repository;
use lifeboat::{pipeline, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

/// Proves lifeboat backups restore.
#[derive(Debug, Parser)]
#[command(name = "lifeboat-verifier", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify one backup of each source (default: the newest).
    Verify {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        /// Verify from this copy (a `[[copies]]` name) alone instead of [repository]: proves the
        /// copy restores by itself, with the primary unreachable.
        #[arg(long, value_name = "NAME")]
        repository: Option<String>,
        /// Only this source.
        #[arg(long, short = 's')]
        source: Option<String>,
        /// A backup id, or `latest`.
        #[arg(long, default_value = "latest")]
        backup: String,
        /// The age identity file (else LIFEBOAT_IDENTITY_FILE, else encryption.identity_file).
        #[arg(long, env = "LIFEBOAT_IDENTITY_FILE")]
        identity: Option<PathBuf>,
        /// Print the reports as one JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Verify the newest backup of each source on its `[sources.verify] schedule`, until SIGTERM.
    Run {
        /// The policy file.
        #[arg(long, short = 'p', env = "LIFEBOAT_POLICY")]
        policy: PathBuf,
        /// Verify from this copy (a `[[copies]]` name) alone instead of [repository]: proves the
        /// copy restores by itself, with the primary unreachable.
        #[arg(long, value_name = "NAME")]
        repository: Option<String>,
        /// The age identity file (else LIFEBOAT_IDENTITY_FILE, else encryption.identity_file).
        #[arg(long, env = "LIFEBOAT_IDENTITY_FILE")]
        identity: Option<PathBuf>,
    },
}

fn identities(
    policy: &lifeboat::policy::Policy,
    identity: Option<PathBuf>,
) -> Result<lifeboat::verify::Identities> {
    let identity = identity
        .or_else(|| policy.encryption.identity_file.clone())
        .ok_or_else(|| {
            Error::new(ErrorKind::Credential, "no age identity to decrypt with").hint(
                "pass --identity FILE, set LIFEBOAT_IDENTITY_FILE or encryption.identity_file",
            )
        })?;
    pipeline::read_identities(&identity)
}

/// How many passed checks the human output shows (every one is in `--json`).
const SHOWN: usize = 12;

/// Prints what a report proved (the first passed checks: tables with their rows, keys, files),
/// its failed checks, and its summary line.
fn print_report(source: &str, report: &lifeboat::verify::Report) {
    let passed: Vec<_> = report.checks.iter().filter(|c| c.passed).collect();
    for c in passed.iter().take(SHOWN) {
        // A table's content hash matched when the check passed: say so instead of the hash.
        let found = match c.found.split_once(", content ") {
            Some((rows, _)) => format!("{rows}, content hash matched"),
            None if c.found.chars().count() > 80 => {
                format!("{}…", c.found.chars().take(79).collect::<String>())
            }
            None => c.found.clone(),
        };
        eprintln!("  ok   {}: {found}", c.name);
    }
    if passed.len() > SHOWN {
        eprintln!(
            "  ok   … and {} more (--json lists every check)",
            passed.len() - SHOWN
        );
    }
    for c in report.checks.iter().filter(|c| !c.passed) {
        eprintln!(
            "FAIL {}: expected {}, found {}",
            c.name, c.expected, c.found
        );
    }
    let rto = match (report.rto_objective_seconds, report.rto_met) {
        (Some(rto), Some(met)) => format!(
            "; RTO objective {} {}",
            humantime::format_duration(std::time::Duration::from_secs_f64(rto)),
            if met { "met" } else { "MISSED" }
        ),
        _ => String::new(),
    };
    eprintln!(
        "{} {}: {} ({} checks, restore {:.1} s, total {:.1} s{rto})",
        source,
        report.backup_id,
        if report.result == "pass" {
            "verified"
        } else {
            "VERIFICATION FAILED"
        },
        report.checks.len(),
        report.timings.restore_total(),
        report.timings.total_seconds
    );
    let split: Vec<String> = report
        .timings
        .phases()
        .iter()
        .filter(|(_, s)| *s >= 0.05)
        .map(|(phase, s)| format!("{} {s:.1} s", phase.replace('_', " ")))
        .collect();
    eprintln!("  time: {}", split.join(", "));
}

/// The scheduled verifier: one loop per source with a verify schedule, one verification at a time.
async fn run_scheduled(
    policy: PathBuf,
    repository: Option<String>,
    identity: Option<PathBuf>,
    cancel: CancellationToken,
) -> Result<i32> {
    use lifeboat::daemon::{schedule::Cron, schedule_loop, Clock};
    let policy = policy::load_at(&policy, repository.as_deref())?;
    let identities = identities(&policy, identity)?;
    // It signs its reports: a verifier whose reports every reader would refuse stops here.
    lifeboat::repo::signing::Trust::new(policy.signing.as_ref()).signer()?;
    // A daemon outlives a repository that is not there yet (the first backup has not run) or
    // not reachable right now: each tick opens it afresh, and says why it could not.
    if let Err(e) = Repository::open(&policy).await {
        tracing::warn!(error = %e.message, "The repository cannot be opened yet; each scheduled verification tries again");
    }
    let scheduled: Vec<_> = policy
        .sources
        .iter()
        .filter_map(|s| {
            s.verify
                .schedule
                .as_ref()
                .map(|c| (s, c.expression.clone()))
        })
        .collect();
    if scheduled.is_empty() {
        return Err(Error::new(ErrorKind::Invalid, "no source has a [sources.verify] schedule")
            .hint("add `schedule = \"30 4 * * *\"` under [sources.verify], or use `lifeboat-verifier verify`"));
    }
    let one_at_a_time = tokio::sync::Semaphore::new(1);
    let loops = scheduled.iter().map(|(src, expr)| {
        let (policy, identities, cancel, one_at_a_time) = (&policy, &identities, &cancel, &one_at_a_time);
        async move {
            let cron = Cron::parse(expr)?;
            tracing::info!(source = %src.name, schedule = %expr, "Scheduled verification");
            schedule_loop(Clock::System, &cron, policy.timezone, std::time::Duration::ZERO, cancel, |_| {}, |_| {}, |_tick| async move {
                let Ok(_permit) = one_at_a_time.acquire().await else { return };
                let outcome = async {
                    let repo = Repository::open(policy).await?;
                    let entry = repo.find(&src.name, "latest", None).await?;
                    verify::verify(&repo, policy, src, &entry, identities, cancel, &verify::Phases::none()).await
                }
                .await;
                match outcome {
                    Ok(report) => print_report(&src.name, &report),
                    Err(e) => tracing::error!(source = %src.name, error = %e.message, "Verification could not run"),
                }
            })
            .await;
            Ok::<(), Error>(())
        }
    });
    for r in futures::future::join_all(loops).await {
        r?;
    }
    tracing::info!("Verifier stopped");
    Ok(0)
}

fn main() {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        // A log reader that went away must not turn every log line into a panic (its default
        // reports write errors with eprintln!, which panics on a closed stderr).
        .log_internal_errors(false)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn")),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let cancel = CancellationToken::new();
    let code = runtime.block_on(async {
        let on_signal = cancel.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            on_signal.cancel();
            tracing::warn!("Interrupted: tearing down the scratch database");
        });
        match run(cli.command, cancel.clone()).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                e.kind.exit_code()
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    std::process::exit(code);
}

async fn run(command: Command, cancel: CancellationToken) -> Result<i32> {
    let (policy, source, backup, identity, json, repository) = match command {
        Command::Verify {
            policy,
            repository,
            source,
            backup,
            identity,
            json,
        } => (policy, source, backup, identity, json, repository),
        Command::Run {
            policy,
            repository,
            identity,
        } => return run_scheduled(policy, repository, identity, cancel).await,
    };
    let policy = policy::load_at(&policy, repository.as_deref())?;
    let identities = identities(&policy, identity)?;
    // It signs its reports: a verifier whose reports every reader would refuse stops here.
    lifeboat::repo::signing::Trust::new(policy.signing.as_ref()).signer()?;
    let repo = Repository::open(&policy).await?;
    let sources: Vec<_> = match &source {
        Some(name) => vec![policy.source(name).ok_or_else(|| {
            Error::new(
                ErrorKind::Invalid,
                format!("no source named `{name}` in the policy"),
            )
        })?],
        None => policy.sources.iter().collect(),
    };
    let mut code = 0;
    let mut reports = Vec::new();
    for src in sources {
        let entry = repo.find(&src.name, &backup, None).await?;
        let m = &entry.manifest;
        tracing::info!(source = %src.name, backup = %m.id, "Verifying");
        let phases = verify::Phases::on_terminal(&src.name);
        let report =
            verify::verify(&repo, &policy, src, &entry, &identities, &cancel, &phases).await?;
        drop(phases);
        print_report(&src.name, &report);
        if report.result != "pass" {
            code = ErrorKind::VerificationMismatch.exit_code();
        }
        reports.push(report);
    }
    if json {
        let text = serde_json::to_string_pretty(&reports)
            .map_err(|e| Error::failed(format!("cannot encode: {e}")))?;
        println!("{text}");
    }
    Ok(code)
}
