//! The commands: each loads what it needs, calls the library and prints.

use std::io::Write;
use std::path::Path;

use lifeboat::policy::{self, LoadOptions, Policy};
use lifeboat::repo::Repository;
use lifeboat::{check, job, store, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::{Command, PolicyCommand};

pub async fn run(command: Command, cancel: CancellationToken) -> Result<()> {
    match command {
        Command::Backup { policy, source } => backup(&policy, &source, cancel).await,
        Command::List {
            policy,
            source,
            json,
        } => list(&policy, source.as_deref(), json).await,
        Command::Check {
            policy,
            source,
            read_data,
            json,
        } => check_cmd(&policy, source.as_deref(), read_data, json).await,
        Command::Policy {
            command:
                PolicyCommand::Check {
                    files,
                    allow_missing_env,
                },
        } => policy_check(&files, allow_missing_env),
        Command::Keygen => keygen(),
    }
}

fn load(path: &Path) -> Result<Policy> {
    Ok(policy::load(path, LoadOptions::default())?)
}

/// Sources no longer in the policy may still have backups: say so, but let the operator see them.
fn note_unknown_source(policy: &Policy, name: &str) {
    if policy.source(name).is_none() {
        eprintln!("note: `{name}` is not a source in this policy; showing what the repository holds for it");
    }
}

fn select_source(policy: &Policy, name: &str) -> Result<()> {
    if policy.source(name).is_none() {
        let names: Vec<&str> = policy.sources.iter().map(|s| s.name.as_str()).collect();
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "no source named `{name}` in the policy; it has: {}",
                names.join(", ")
            ),
        ));
    }
    Ok(())
}

async fn backup(path: &Path, only: &[String], cancel: CancellationToken) -> Result<()> {
    let policy = load(path)?;
    for name in only {
        select_source(&policy, name)?;
    }
    let repo = Repository::open_or_init(&policy).await?;
    store::probe(repo.store.as_ref()).await?;
    let selected: Vec<_> = policy
        .sources
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect();
    let mut failures: Vec<Error> = Vec::new();
    for source in &selected {
        if cancel.is_cancelled() {
            failures.push(Error::new(
                ErrorKind::Interrupted,
                format!("source {}: not started", source.name),
            ));
            continue;
        }
        match job::backup(&repo, &policy, source, chrono::Utc::now(), cancel.clone()).await {
            Ok(m) => eprintln!(
                "{}: backup {} stored ({} plain, {} stored)",
                m.source,
                m.id,
                human_bytes(m.size_plain),
                human_bytes(m.size_stored)
            ),
            Err(e) => {
                if selected.len() > 1 {
                    eprintln!("error: {e}");
                }
                failures.push(e);
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 if selected.len() == 1 => Err(failures.remove(0)),
        n if n == selected.len() => {
            let kind = if failures.iter().any(|e| e.kind == ErrorKind::Interrupted) {
                ErrorKind::Interrupted
            } else {
                ErrorKind::Failed
            };
            Err(Error::new(kind, format!("all {n} backups failed")))
        }
        n => Err(Error::new(
            ErrorKind::Partial,
            format!("{n} of {} backups failed", selected.len()),
        )),
    }
}

async fn list(path: &Path, source: Option<&str>, json: bool) -> Result<()> {
    let policy = load(path)?;
    if let Some(s) = source {
        note_unknown_source(&policy, s);
    }
    let repo = Repository::open(&policy).await?;
    let listing = repo.list(source).await?;
    let mut out = std::io::stdout().lock();
    if json {
        let items: Vec<serde_json::Value> = listing
            .backups
            .iter()
            .map(|e| {
                let m = &e.manifest;
                serde_json::json!({
                    "id": m.id,
                    "source": m.source,
                    "kind": m.kind,
                    "started_at": m.started_at,
                    "finished_at": m.finished_at,
                    "size_plain": m.size_plain,
                    "size_stored": m.size_stored,
                    "verified": e.verified(),
                    "verification": e.verification,
                    "source_version": m.source_version,
                    "parts": m.parts.iter().map(|p| &p.name).collect::<Vec<_>>(),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&items)
            .map_err(|e| Error::failed(format!("cannot encode the listing: {e}")))?;
        writeln!(out, "{text}").map_err(print_error)?;
    } else {
        writeln!(
            out,
            "{:<16} {:<24} {:<9} {:<20} {:>10} {:>10} {:<8}",
            "SOURCE", "ID", "KIND", "STARTED (UTC)", "PLAIN", "STORED", "VERIFIED"
        )
        .map_err(print_error)?;
        for e in &listing.backups {
            let m = &e.manifest;
            writeln!(
                out,
                "{:<16} {:<24} {:<9} {:<20} {:>10} {:>10} {:<8}",
                m.source,
                m.id,
                m.kind,
                m.started_at.format("%Y-%m-%d %H:%M:%S"),
                human_bytes(m.size_plain),
                human_bytes(m.size_stored),
                match e.verification.as_ref().map(|v| v.result.as_str()) {
                    Some("pass") => "yes",
                    Some(_) => "FAILED",
                    None => "no",
                }
            )
            .map_err(print_error)?;
        }
        if listing.backups.is_empty() {
            eprintln!("no backups yet");
        }
    }
    if !listing.incomplete.is_empty() {
        eprintln!(
            "note: {} interrupted run(s) without a manifest (not backups; prune removes them)",
            listing.incomplete.len()
        );
    }
    Ok(())
}

async fn check_cmd(path: &Path, source: Option<&str>, read_data: bool, json: bool) -> Result<()> {
    let policy = load(path)?;
    if let Some(s) = source {
        note_unknown_source(&policy, s);
    }
    let repo = Repository::open(&policy).await?;
    let report = check::check(&repo, source, read_data).await?;
    if json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::failed(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else {
        eprintln!(
            "checked {} backup(s), {} object(s){}",
            report.backups,
            report.objects,
            if read_data {
                format!(", {} re-hashed", human_bytes(report.bytes_read))
            } else {
                String::new()
            }
        );
        for i in &report.incomplete {
            eprintln!("note: {i} has no manifest: an interrupted run, not a backup");
        }
        for u in &report.pending_uploads {
            eprintln!("note: unfinished upload of {u}");
        }
    }
    report.into_result().map(|r| {
        if !json {
            eprintln!(
                "no problems found{}",
                if read_data {
                    ""
                } else {
                    " (sizes only; --read-data re-hashes)"
                }
            );
        }
        drop(r)
    })
}

fn policy_check(files: &[std::path::PathBuf], allow_missing_env: bool) -> Result<()> {
    let mut bad = 0;
    for f in files {
        match policy::load(f, LoadOptions { allow_missing_env }) {
            Ok(p) => {
                let missing = if p.missing_env.is_empty() {
                    String::new()
                } else {
                    format!(" (unset here: {})", p.missing_env.join(", "))
                };
                eprintln!(
                    "{}: ok, {} source(s){missing}",
                    f.display(),
                    p.sources.len()
                );
            }
            Err(e) => {
                bad += 1;
                eprintln!("{e}");
            }
        }
    }
    if bad > 0 {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("{bad} of {} policy file(s) invalid", files.len()),
        ));
    }
    Ok(())
}

fn keygen() -> Result<()> {
    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# created: {}\n# public key: {recipient}\n{}",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        identity.to_string().expose_secret()
    )
    .map_err(print_error)?;
    eprintln!("Public key: {recipient}");
    Ok(())
}

fn print_error(e: std::io::Error) -> Error {
    Error::failed(format!("cannot write to stdout: {e}"))
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
