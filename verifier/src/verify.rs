//! The one verification skeleton, for every kind: integrity → scratch → restore → observe →
//! checks → report. The kind supplies the steps (`SourceConfig::verify_steps`); timeout,
//! cancellation, teardown and storing the report are written here, once.
//!
//! - `prepare` (integrity and scratch) runs under `verify.timeout`; its failure stores a failed
//!   report and is returned (exit 13 for damage, 12 for keys, 1 otherwise).
//! - `restore_and_check` runs under the same deadline and the kind's guard; a restore that fails,
//!   times out or is stopped by the guard is a failed verification (exit 4).
//! - The scratch is torn down whatever happened; an interruption stores no report.

use lifeboat::policy::{Policy, SourcePolicy};
use lifeboat::repo::catalog::Entry;
use lifeboat::repo::Repository;
use lifeboat::verify::{
    conclude, fail_and_store, new_report, Check, Context, Identities, Report, Verdict,
};
use lifeboat::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

/// A verification's phases on a terminal: a spinner with the phase and the time so far.
pub struct Phases(Option<indicatif::ProgressBar>);

impl Phases {
    /// A spinner for `source` when stderr is a terminal; else nothing is shown.
    pub fn on_terminal(source: &str) -> Phases {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return Phases(None);
        }
        let bar = lifeboat::spinner(source);
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Phases(Some(bar))
    }

    /// Shows nothing (the scheduled verifier, which logs).
    pub fn none() -> Phases {
        Phases(None)
    }

    fn set(&self, what: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(what.to_string());
        }
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Verifies `entry` of `source`. Returns the stored report (pass or fail); an error only when
/// verification could not run at all (integrity, keys, interruption).
pub async fn verify(
    repo: &Repository,
    policy: &Policy,
    source: &SourcePolicy,
    entry: &Entry,
    identities: &Identities,
    cancel: &CancellationToken,
    phases: &Phases,
) -> Result<Report> {
    let kind = entry.manifest.kind;
    if kind != source.config.kind() {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "backup {} of {} is a {kind} backup, but the policy's source {} is {}",
                entry.manifest.id,
                entry.manifest.source,
                source.name,
                source.config.kind()
            ),
        )
        .hint("verify with the policy that wrote it, or fix the source's kind"));
    }
    // Its requests of the repository go into the report.
    let (repo, requests) = repo.counted();
    let repo = &repo;
    let ctx = Context {
        repo,
        policy,
        source,
        entry,
        identities,
        guard_notes: Default::default(),
    };
    let mut steps = source.config.verify_steps();
    let (mut report, t0) = new_report(source, entry);
    judge_origin(source, entry, &mut report);
    let deadline = tokio::time::Instant::now() + source.verify.timeout;
    phases.set("downloading and checking every object");
    let prepared = tokio::select! {
        r = steps.prepare(&ctx, &mut report) => r,
        _ = tokio::time::sleep_until(deadline) => Err(timed_out(source)),
        _ = cancel.cancelled() => Err(interrupted()),
    };
    if let Err(e) = prepared {
        steps.teardown().await;
        report.requests = Some(requests.counts());
        return Err(fail_and_store(repo, report, e).await);
    }
    let guard = steps.guard(&ctx);
    phases.set("restoring into a scratch server and checking what it holds");
    let outcome = tokio::select! {
        r = steps.restore_and_check(&ctx, &mut report) => r,
        e = guard => Ok(Verdict::RestoreFailed(e)),
        _ = tokio::time::sleep_until(deadline) => Ok(Verdict::RestoreFailed(timed_out(source))),
        _ = cancel.cancelled() => Err(interrupted()),
    };
    phases.set("tearing the scratch down and storing the report");
    steps.teardown().await;
    report.notes.extend(ctx.guard_notes.borrow_mut().drain(..));
    report.requests = Some(requests.counts());
    match outcome {
        Ok(Verdict::Checked) => {}
        Ok(Verdict::RestoreFailed(e)) => {
            let (name, expected) = steps.restore_check();
            report
                .checks
                .push(Check::failed(name, expected, e.message.clone()));
            report.error = Some(e.message);
        }
        Err(e) => return Err(fail_and_store(repo, report, e).await),
    }
    conclude(repo, report, t0).await
}

/// A backup taken from another system than the backup before it fails its verification, unless
/// the source's `moved_at` expects the change (then a note says so). For kinds whose ids a restart
/// renews (Redis), the change is a note.
fn judge_origin(source: &SourcePolicy, entry: &Entry, report: &mut Report) {
    let Some(change) = entry.origin_change(source.moved_at) else {
        return;
    };
    let stable = entry.manifest.kind.origin_is_stable();
    if change.moved.is_none() && stable {
        report.checks.push(Check::failed(
            "source identity",
            format!("the system backup {} was taken from: {}", change.previous, change.from),
            format!(
                "{}: another system, or the source moved (set the source's moved_at if it did; RUNBOOK.md#source-changed)",
                change.to
            ),
        ));
    } else if change.moved.is_none() {
        report.notes.push(format!(
            "source identity: {}; a restart that lost the server's replication history looks the same (RUNBOOK.md#source-changed)",
            change.words()
        ));
    } else {
        report
            .notes
            .push(format!("source identity: {}", change.words()));
    }
}

fn interrupted() -> Error {
    Error::new(ErrorKind::Interrupted, "interrupted")
}

fn timed_out(source: &SourcePolicy) -> Error {
    Error::failed(format!(
        "stopped after verify.timeout ({}): the restore or a check did not finish",
        humantime::format_duration(source.verify.timeout)
    ))
}
