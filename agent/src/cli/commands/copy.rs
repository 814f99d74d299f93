//! `lifeboat copy`: catches the policy's copies up with the primary, and says what each holds.

use std::io::Write;

use lifeboat::copy::{Copier, CopyReport};
use lifeboat::policy::{CopyConfig, Policy};
use lifeboat::{human_bytes, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::{print_error, select_source};

/// Catches up every copy (or the one named) on every source (or those named). A copy that
/// fails does not stop the others; the first failure sets the exit code.
pub async fn copy(
    policy: &Policy,
    only: Option<&str>,
    sources: &[String],
    json: bool,
    cancel: CancellationToken,
) -> Result<()> {
    for s in sources {
        select_source(policy, s)?;
    }
    let copies: Vec<&CopyConfig> = match only {
        Some(name) => vec![policy.copy(name)?],
        None => policy.copies.iter().collect(),
    };
    if copies.is_empty() {
        return Err(
            Error::new(ErrorKind::Invalid, "the policy has no [[copies]]")
                .hint("add a [[copies]] table naming the second repository (policies/README.md)"),
        );
    }
    let chosen: Vec<_> = policy
        .sources
        .iter()
        .filter(|s| sources.is_empty() || sources.contains(&s.name))
        .collect();
    let mut first_failure = None;
    for copy in copies {
        let report = match Copier::open(policy, copy, cancel.clone()).await {
            Ok(copier) => copier.catch_up(policy, &chosen, chrono::Utc::now()).await,
            Err(e) => Err(e),
        };
        match report {
            Ok(report) => {
                print(&report, json)?;
                if let Some(e) = report.failure() {
                    first_failure.get_or_insert_with(|| e.clone());
                }
            }
            Err(e) if e.kind == ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                eprintln!("error: {e}");
                first_failure.get_or_insert(e);
            }
        }
    }
    match first_failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn print(report: &CopyReport, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string(report)
            .map_err(|e| Error::failed(format!("cannot encode the report: {e}")))?;
        return writeln!(out, "{text}").map_err(print_error);
    }
    for s in &report.sources {
        let state = match &s.error {
            Some(e) => format!("FAILED: {e}"),
            None => format!(
                "{} copied, {} already there{}{}, {} not kept by its retention; {} objects, {} written",
                s.copied.len(),
                s.present,
                if s.repaired.is_empty() {
                    String::new()
                } else {
                    format!(" ({} objects repaired)", s.repaired.len())
                },
                if s.shared > 0 {
                    format!(", {} shared objects", s.shared)
                } else {
                    String::new()
                },
                s.not_kept,
                s.objects,
                human_bytes(s.bytes),
            ),
        };
        writeln!(out, "{} → {}: {state}", s.source, report.repository).map_err(print_error)?;
    }
    Ok(())
}
