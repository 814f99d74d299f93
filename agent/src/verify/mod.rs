//! Verification, kind-neutral: the report and its checks, and the steps each kind supplies to the
//! verifier's one skeleton (integrity → scratch → restore → observe → checks → report, with
//! timeout, cancellation and teardown written once, in `lifeboat-verifier`).
//!
//! What must hold, for every kind: nothing is decrypted before every object it needs was
//! downloaded and its SHA-256 checked; the scratch is torn down whatever happened; the report is
//! stored, pass or fail, unless the verification was interrupted.

mod report;

use std::time::Instant;

use async_trait::async_trait;
use chrono::Utc;

pub use report::{Check, Replay, ReplayTarget, Report, Timings};

use crate::error::{Error, ErrorKind, Result};
use crate::policy::{Policy, SourcePolicy};
use crate::repo::catalog::Entry;
use crate::repo::manifest::{Manifest, Role};
use crate::repo::{layout, Repository};
use crate::restore;

/// Identities that decrypt the backups.
pub type Identities = Vec<Box<dyn age::Identity + Send + Sync>>;

/// What every step may read.
pub struct Context<'a> {
    /// The repository.
    pub repo: &'a Repository,
    /// The policy.
    pub policy: &'a Policy,
    /// The source whose backup is verified.
    pub source: &'a SourcePolicy,
    /// The backup.
    pub entry: &'a Entry,
    /// Keys to decrypt it.
    pub identities: &'a Identities,
    /// What the guard could not watch (e.g. the scratch disk's free space), for the report.
    pub guard_notes: GuardNotes,
}

/// Notes the guard leaves for the report: it runs beside the restore and owns nothing of it.
pub type GuardNotes = std::rc::Rc<std::cell::RefCell<Vec<String>>>;

/// How a restore-and-observe step ended, when it could run.
#[derive(Debug)]
pub enum Verdict {
    /// Everything was restored, observed and recorded as checks.
    Checked,
    /// The restore itself failed: a failed verification (exit 4), recorded under the kind's
    /// [`Steps::restore_check`].
    RestoreFailed(Error),
}

/// A kind's steps, holding what they found (spooled objects, the fingerprint, the scratch).
#[async_trait(?Send)]
pub trait Steps {
    /// What a failed restore is recorded as: (check name, what was expected).
    fn restore_check(&self) -> (&'static str, &'static str);

    /// Integrity (every object the restore needs downloaded and checked, the fingerprint read)
    /// and the scratch started, possibly at once. An error here stores a failed report and is
    /// returned (exit by its kind: 13 for damage, 12 for keys).
    async fn prepare(&mut self, ctx: &Context<'_>, report: &mut Report) -> Result<()>;

    /// Restores into the scratch, observes, compares with the fingerprint and runs the policy's
    /// checks, each recorded in `report`. An error is stored as a failed report and returned.
    async fn restore_and_check(
        &mut self,
        ctx: &Context<'_>,
        report: &mut Report,
    ) -> Result<Verdict>;

    /// A watchdog over the restore, made once the scratch is up: resolves with the reason the
    /// restore must stop (a scratch disk filling up). Never, by default.
    fn guard(&self, _ctx: &Context<'_>) -> futures::future::LocalBoxFuture<'static, Error> {
        Box::pin(std::future::pending())
    }

    /// Stops and removes the scratch, whatever happened.
    async fn teardown(&mut self);
}

/// A failing report for `entry` of `source`, to be filled in, and the clock it started.
pub fn new_report(source: &SourcePolicy, entry: &Entry) -> (Report, Instant) {
    let m = &entry.manifest;
    let started_at = Utc::now();
    let report = Report {
        format: 1,
        verify_id: layout::new_backup_id(started_at),
        source: m.source.clone(),
        backup_id: m.id.clone(),
        result: "fail".into(),
        error: None,
        started_at,
        finished_at: started_at,
        timings: Timings::default(),
        scratch: String::new(),
        notes: Vec::new(),
        versions: serde_json::json!({
            "lifeboat": crate::repo::tool_version(),
            "source_server": m.source_version,
            "dump_tool": m.dump_tool_version,
        }),
        checks: Vec::new(),
        replay: None,
        rto_objective_seconds: source.objectives.rto.map(|d| d.as_secs_f64()),
        rto_met: None,
        contained: None,
        requests: None,
    };
    (report, Instant::now())
}

/// Sets the result from the checks and stores the report.
pub async fn conclude(repo: &Repository, mut report: Report, t0: Instant) -> Result<Report> {
    report.timings.total_seconds = t0.elapsed().as_secs_f64();
    report.rto_met = report
        .rto_objective_seconds
        .map(|rto| report.timings.recovery() <= rto);
    report.finished_at = Utc::now();
    report.result = if report.error.is_none() && report.checks.iter().all(|c| c.passed) {
        "pass".into()
    } else {
        "fail".into()
    };
    report.store(repo).await?;
    Ok(report)
}

/// Stores `report` as failed by `e` (unless `e` is an interruption) and returns `e`.
pub async fn fail_and_store(repo: &Repository, mut report: Report, e: Error) -> Error {
    if e.kind != ErrorKind::Interrupted {
        report.error = Some(e.message.clone());
        report.finished_at = Utc::now();
        if let Err(store_err) = report.store(repo).await {
            tracing::warn!(error = %store_err, "Could not store the failed verification's report");
        }
    }
    e
}

/// A backup's fingerprint, decrypted (its stored SHA-256 checked first) and read as `F`.
pub async fn typed_fingerprint<F: serde::de::DeserializeOwned>(
    repo: &Repository,
    m: &Manifest,
    identities: &Identities,
) -> Result<F> {
    serde_json::from_value(restore::fingerprint(repo, m, identities).await?).map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("fingerprint of {}: {e}", m.id),
        )
    })
}

/// Integrity first: downloads the part with `role` to a spool file (its SHA-256 checked) and reads
/// the fingerprint.
pub async fn spool_and_fingerprint<F: serde::de::DeserializeOwned>(
    ctx: &Context<'_>,
    role: Role,
) -> Result<(restore::Spooled, F)> {
    let m = &ctx.entry.manifest;
    let part = restore::part(m, role)?;
    let spooled = restore::spool(
        ctx.repo,
        m,
        part,
        &std::env::temp_dir(),
        &restore::NoProgress,
    )
    .await?;
    let fingerprint: F = typed_fingerprint(ctx.repo, m, ctx.identities).await?;
    Ok((spooled, fingerprint))
}
