//! The sidecar daemon (`lifeboat agent`): schedules, runs, prunes, reports.
//!
//! Each scheduled source has its own loop, so a source never overlaps itself; a semaphore bounds
//! runs across sources (`agent.max_concurrent`). A failed run is retried with backoff
//! (`retries`), then recorded; one source's failure never stops another. After a successful
//! backup the source is pruned. On SIGTERM/SIGINT no new run starts; running ones get
//! `agent.shutdown_grace` to finish, then are cancelled cleanly (upload aborted, child killed),
//! and the agent exits 0.

pub mod http;
pub mod notify;
pub mod schedule;
pub mod telemetry;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, ErrorKind, Result};
use crate::policy::{Policy, SourcePolicy};
use crate::repo::Repository;
use crate::{job, retention, store};

use schedule::Cron;
use telemetry::Telemetry;

/// Where "now" comes from: the system clock, or tokio's (pausable) clock in tests.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// `Utc::now()`.
    System,
    /// `base` plus the tokio time elapsed since `since` (follows `tokio::time::pause`).
    Tokio {
        /// Wall time at `since`.
        base: DateTime<Utc>,
        /// The tokio instant that corresponds to `base`.
        since: tokio::time::Instant,
    },
}

impl Clock {
    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Tokio { base, since } => {
                *base + chrono::Duration::from_std(since.elapsed()).unwrap_or_default()
            }
        }
    }
}

/// Runs `run(tick)` on every tick of `cron` (plus `jitter`) until `shutdown`. Never overlaps: a tick
/// that passes while `run` is still going is skipped and reported to `on_skipped`.
#[allow(clippy::too_many_arguments)]
pub async fn schedule_loop<F, Fut>(
    clock: Clock,
    cron: &Cron,
    tz: chrono_tz::Tz,
    jitter: Duration,
    shutdown: &CancellationToken,
    mut on_next: impl FnMut(DateTime<Utc>),
    mut on_skipped: impl FnMut(u64),
    mut run: F,
) where
    F: FnMut(DateTime<Utc>) -> Fut,
    Fut: Future<Output = ()>,
{
    let jitter_c = chrono::Duration::from_std(jitter).unwrap_or_default();
    loop {
        let now = clock.now();
        let Some(tick) = cron.next_after(&tz, now - jitter_c) else {
            return;
        };
        let fire = tick + jitter_c;
        on_next(fire);
        let wait = (fire - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        run(tick).await;
        let skipped = cron.ticks_between(&tz, tick, clock.now() - jitter_c);
        on_skipped(skipped);
    }
}

/// One recorded run.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// backup | prune.
    pub op: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub seconds: f64,
    /// success | failure.
    pub result: String,
    /// The error, on failure.
    pub error: Option<String>,
    /// The backup id, for a successful backup.
    pub backup: Option<String>,
}

/// What /status shows for a source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// Cron expression.
    pub schedule: Option<String>,
    /// Next scheduled run.
    pub next_run: Option<DateTime<Utc>>,
    /// A run is going now.
    pub running: bool,
    /// The latest runs, newest first.
    pub last_runs: VecDeque<RunRecord>,
    /// Newest backup (id, start).
    pub newest_backup: Option<(String, DateTime<Utc>)>,
    /// Newest verified backup (id, start).
    pub newest_verified: Option<(String, DateTime<Utc>)>,
    /// The latest verification's measured RTO ([`crate::verify::Timings::recovery`]).
    pub last_recovery_seconds: Option<f64>,
    /// Objectives currently breached, with why.
    pub breaches: Vec<String>,
    /// The latest tick another replica took.
    pub last_slot_taken_elsewhere: Option<DateTime<Utc>>,
    /// Physical sources streaming WAL: when the stored WAL last reached the server's position.
    pub wal_caught_up: Option<DateTime<Utc>>,
    /// Per copy, where its last catch-up left it.
    pub copies: BTreeMap<String, CopyStatus>,
}

/// What /status shows of a source in one copy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyStatus {
    /// When the last catch-up ended.
    pub at: Option<DateTime<Utc>>,
    /// Its error, if it failed.
    pub error: Option<String>,
    /// The newest backup the copy holds.
    pub newest_backup: Option<String>,
    /// How far the copy trailed the primary then, in seconds.
    pub lag_seconds: Option<f64>,
}

/// The running agent's shared state.
pub struct Agent {
    policy: Policy,
    /// Metrics.
    pub telemetry: Telemetry,
    notifier: Arc<notify::Notifier>,
    status: Mutex<BTreeMap<String, SourceStatus>>,
    /// False once a scheduler loop died.
    pub alive: AtomicBool,
    /// This pod's name (hostname), for jitter and /status.
    pub pod: String,
    clock: Clock,
    /// One per source: held by its run, so a run started out of schedule (after a WAL gap)
    /// never overlaps a scheduled one.
    runs: BTreeMap<String, tokio::sync::Mutex<()>>,
    /// One per copy, in policy order: rung when a backup is published, so the copy catches up
    /// at once.
    copy_nudges: Vec<tokio::sync::Notify>,
    /// One per copy: rung when a physical source's WAL archive grew.
    wal_nudges: Vec<tokio::sync::Notify>,
}

const KEEP_RUNS: usize = 10;

fn pod_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "lifeboat".into())
}

impl Agent {
    fn new(policy: Policy, clock: Clock) -> Agent {
        let objectives: Vec<_> = policy
            .sources
            .iter()
            .map(|s| (s.name.clone(), s.objectives.rpo, s.objectives.rto))
            .collect();
        let status = policy
            .sources
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    SourceStatus {
                        schedule: s.schedule.as_ref().map(|c| c.expression.clone()),
                        ..Default::default()
                    },
                )
            })
            .collect();
        let copies: Vec<String> = policy.copies.iter().map(|c| c.name.clone()).collect();
        let pod = pod_name();
        let runs = policy
            .sources
            .iter()
            .map(|s| (s.name.clone(), tokio::sync::Mutex::new(())))
            .collect();
        Agent {
            runs,
            telemetry: Telemetry::new(&objectives, &copies),
            copy_nudges: policy.copies.iter().map(|_| Default::default()).collect(),
            wal_nudges: policy.copies.iter().map(|_| Default::default()).collect(),
            notifier: Arc::new(notify::Notifier::new(policy.notify.clone(), pod.clone())),
            policy,
            status: Mutex::new(status),
            alive: AtomicBool::new(true),
            pod,
            clock,
        }
    }

    /// A copy of every source's status.
    pub fn status_snapshot(&self) -> BTreeMap<String, SourceStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, source: &str, f: impl FnOnce(&mut SourceStatus)) {
        if let Ok(mut s) = self.status.lock() {
            if let Some(st) = s.get_mut(source) {
                f(st);
            }
        }
    }

    fn record(&self, source: &str, run: RunRecord) {
        self.update(source, |st| {
            st.last_runs.push_front(run);
            st.last_runs.truncate(KEEP_RUNS);
        });
    }

    /// Re-reads what the repository holds for `source` and re-evaluates its objectives.
    async fn refresh(&self, src: &SourcePolicy) {
        match self.repo().await {
            Ok(repo) => match repo.list(Some(&src.name)).await {
                Ok(listing) => {
                    let newest = listing
                        .backups
                        .first()
                        .map(|e| (e.manifest.id.clone(), e.manifest.started_at));
                    let verified = listing.backups.iter().find(|e| e.verified());
                    let newest_verified =
                        verified.map(|e| (e.manifest.id.clone(), e.manifest.started_at));
                    let last_timings = listing
                        .backups
                        .iter()
                        .find_map(|e| e.verification.as_ref().and_then(|v| v.timings.as_ref()));
                    let last_recovery = last_timings.map(|t| t.recovery());
                    self.telemetry
                        .repository(&src.name, listing.backups.len(), last_timings);
                    // The verifier runs elsewhere; its reports in the repository say how it went.
                    if let Some(v) = listing
                        .backups
                        .iter()
                        .filter_map(|e| e.verification.as_ref())
                        .max_by(|a, b| a.id.cmp(&b.id))
                    {
                        if let Some(at) = crate::repo::layout::id_time(&v.id) {
                            self.telemetry.verification(
                                &src.name,
                                v.result == "pass",
                                at,
                                v.contained,
                            );
                        }
                    }
                    self.update(&src.name, |st| {
                        st.newest_backup = newest;
                        st.newest_verified = newest_verified;
                        st.last_recovery_seconds = last_recovery;
                    });
                }
                Err(e) => {
                    tracing::warn!(source = %src.name, error = %e.message, "Cannot list the repository")
                }
            },
            Err(e) => {
                tracing::warn!(source = %src.name, error = %e.message, "Cannot open the repository")
            }
        }
        self.evaluate_objectives(src);
    }

    fn evaluate_objectives(&self, src: &SourcePolicy) {
        let now = self.clock.now();
        let st = self.status_snapshot().remove(&src.name).unwrap_or_default();
        let mut breaches = Vec::new();
        let streams_wal = matches!(&src.config, crate::source::SourceConfig::PostgresPhysical(c) if c.wal.is_some());
        if let Some(rpo) = src.objectives.rpo {
            let why = match &st.newest_verified {
                None => Some("no verified backup".to_string()),
                // With WAL archived, the recovery point is where the archive last caught up.
                Some(_) if streams_wal => match st.wal_caught_up {
                    None => Some(
                        "the WAL archive has not caught up with the server since the agent started"
                            .to_string(),
                    ),
                    Some(t) => (now - t).to_std().ok().filter(|age| *age > rpo).map(|age| {
                        format!(
                            "the WAL archive last caught up with the server {} ago, the RPO is {}",
                            humantime::format_duration(Duration::from_secs(age.as_secs())),
                            humantime::format_duration(rpo)
                        )
                    }),
                },
                Some((id, t)) => (now - *t)
                    .to_std()
                    .ok()
                    .filter(|age| *age > rpo)
                    .map(|age| {
                        format!(
                            "newest verified backup {id} is {} old, the RPO is {}",
                            humantime::format_duration(Duration::from_secs(age.as_secs())),
                            humantime::format_duration(rpo)
                        )
                    }),
            };
            let why_text = why.as_deref().unwrap_or("");
            if self
                .telemetry
                .breach(&src.name, "rpo", why.is_some(), why_text)
            {
                self.notifier
                    .objective(&src.name, "rpo", why.is_some(), why_text);
            }
            breaches.extend(why.map(|w| format!("rpo: {w}")));
        }
        if let Some(rto) = src.objectives.rto {
            let why = st
                .last_recovery_seconds
                .filter(|s| *s > rto.as_secs_f64())
                .map(|s| {
                    format!(
                        "the last measured recovery (download, restore and index build) took {s:.0} s, the RTO is {}",
                        humantime::format_duration(rto)
                    )
                });
            let why_text = why.as_deref().unwrap_or("");
            if self
                .telemetry
                .breach(&src.name, "rto", why.is_some(), why_text)
            {
                self.notifier
                    .objective(&src.name, "rto", why.is_some(), why_text);
            }
            breaches.extend(why.map(|w| format!("rto: {w}")));
        }
        self.update(&src.name, |s| s.breaches = breaches);
    }

    async fn repo(&self) -> Result<Repository> {
        Repository::open_or_init(&self.policy).await
    }

    /// The one place a finished run is reported: log line and metrics, /status, and (if
    /// `notify`) a webhook when the source's state changed.
    #[allow(clippy::too_many_arguments)]
    fn finished(
        &self,
        src: &SourcePolicy,
        op: &str,
        started_at: DateTime<Utc>,
        took: Duration,
        result: std::result::Result<Option<(u64, u64)>, &Error>,
        backup: Option<String>,
        notify: bool,
    ) {
        self.telemetry
            .run_finished(&src.name, op, result, took, self.clock.now());
        let error = result.err().map(|e| e.to_string());
        if notify {
            self.notifier.run_result(&src.name, op, error.as_deref());
        }
        self.record(
            &src.name,
            RunRecord {
                op: op.into(),
                started_at,
                seconds: took.as_secs_f64(),
                result: if error.is_none() {
                    "success"
                } else {
                    "failure"
                }
                .into(),
                error,
                backup,
            },
        );
    }

    /// The one place a catch-up of `copy` is reported: log lines and metrics, and a webhook per
    /// source whose copying failed or works again. `quiet`: a WAL pass, logged at debug.
    fn copied(
        &self,
        copy: &crate::policy::CopyConfig,
        sources: &[&SourcePolicy],
        result: std::result::Result<&crate::copy::CopyReport, &Error>,
        took: Duration,
        quiet: bool,
    ) {
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        self.telemetry
            .copy_finished(&copy.name, &names, result, took, self.clock.now(), quiet);
        let op = format!("copy to {}", copy.name);
        let now = self.clock.now();
        for name in &names {
            let state = match result {
                Ok(r) => match r.sources.iter().find(|s| s.source == *name) {
                    Some(s) => CopyStatus {
                        at: Some(now),
                        error: s.error.clone(),
                        newest_backup: s.newest.clone(),
                        lag_seconds: s.lag_seconds(),
                    },
                    // Not in this pass (a WAL pass covers physical sources only).
                    None => continue,
                },
                Err(e) => CopyStatus {
                    at: Some(now),
                    error: Some(e.to_string()),
                    ..CopyStatus::default()
                },
            };
            self.notifier.run_result(name, &op, state.error.as_deref());
            self.update(name, |st| {
                let was = st.copies.entry(copy.name.clone()).or_default();
                // A failed pass knows nothing new of what the copy holds.
                let newest = state.newest_backup.clone().or(was.newest_backup.take());
                *was = CopyStatus {
                    newest_backup: newest,
                    ..state
                };
            });
        }
    }

    /// Several replicas may carry the same policy: the first to write `slots/<source>/<tick>`
    /// (create-only) takes the tick; the others skip it. If the repository cannot be reached the
    /// run goes ahead (and reports the failure).
    async fn claim_slot(&self, src: &SourcePolicy, tick: DateTime<Utc>) -> bool {
        let key = crate::repo::layout::slot(&src.name, tick);
        let claim = serde_json::json!({ "pod": self.pod, "at": self.clock.now() }).to_string();
        match self.repo().await {
            Ok(repo) => match repo
                .store
                .put_if_absent(&key, bytes::Bytes::from(claim))
                .await
            {
                Ok(true) => true,
                Ok(false) => {
                    tracing::info!(source = %src.name, slot = %tick, "Another replica took this slot");
                    self.update(&src.name, |s| s.last_slot_taken_elsewhere = Some(tick));
                    false
                }
                Err(e) => {
                    tracing::debug!(source = %src.name, error = %e, "Cannot claim the slot; running anyway");
                    true
                }
            },
            Err(_) => true,
        }
    }

    /// One scheduled run of `src`: backup with retries, then prune on success.
    async fn run_source(
        &self,
        src: &SourcePolicy,
        shutdown: &CancellationToken,
        cancel: &CancellationToken,
    ) {
        let _running = match self.runs.get(&src.name) {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        self.update(&src.name, |s| s.running = true);
        let mut attempt = 0u32;
        loop {
            let at = self.clock.now();
            let started = std::time::Instant::now();
            let result = async {
                let repo = self.repo().await?;
                let m = job::backup(&repo, &self.policy, src, at, cancel.clone(), None).await?;
                Ok::<_, Error>((repo, m))
            }
            .await;
            let took = started.elapsed();
            match result {
                Ok((repo, m)) => {
                    let sizes = Some((m.size_plain, m.size_stored));
                    self.telemetry.shards(&m);
                    self.telemetry.requests(&m);
                    self.finished(src, "backup", at, took, Ok(sizes), Some(m.id.clone()), true);
                    for nudge in &self.copy_nudges {
                        nudge.notify_one();
                    }
                    let at = self.clock.now();
                    let started = std::time::Instant::now();
                    let pruned = match retention::plan_prune(&repo, &self.policy, src, at).await {
                        Ok(plan) => retention::apply_prune(&repo, &self.policy, src, plan).await,
                        Err(e) => Err(e),
                    };
                    self.finished(
                        src,
                        "prune",
                        at,
                        started.elapsed(),
                        pruned.as_ref().map(|_| None),
                        None,
                        true,
                    );
                    break;
                }
                Err(e) => {
                    let retryable = e.kind == ErrorKind::Failed;
                    let last = !retryable || attempt >= src.retries || shutdown.is_cancelled();
                    // Only the final failure notifies: a retry that succeeds is not news.
                    self.finished(src, "backup", at, took, Err(&e), None, last);
                    if last {
                        break;
                    }
                    attempt += 1;
                    let backoff =
                        Duration::from_secs(30u64.saturating_mul(1 << (attempt - 1).min(5)))
                            .min(Duration::from_secs(600));
                    tracing::info!(source = %src.name, attempt, retry_in = %humantime::format_duration(backoff), "Retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
        self.update(&src.name, |s| s.running = false);
        self.refresh(src).await;
    }
}

/// Runs the agent until `shutdown` fires.
pub async fn run(policy: Policy, shutdown: CancellationToken) -> Result<()> {
    let listen = policy.agent.listen;
    let grace = policy.agent.shutdown_grace;
    // Every backup it publishes is signed: an agent without a key readers trust never starts.
    if let Some(signer) = crate::repo::signing::Trust::new(policy.signing.as_ref()).signer()? {
        tracing::info!(key = %signer.id(), "Signing with key");
    }
    let agent = Arc::new(Agent::new(policy, Clock::System));
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        Error::failed(format!("cannot listen on {listen} (agent.listen): {e}"))
            .hint("pick a free address in agent.listen")
    })?;
    tracing::info!(listen = %listen, sources = agent.policy.sources.len(), "Agent started");

    sweep_on_start(&agent).await;

    let http_stop = CancellationToken::new();
    let server = {
        let stop = http_stop.clone();
        let app = http::router(agent.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };

    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(agent.policy.agent.max_concurrent));
    let runs_cancel = CancellationToken::new();
    for idx in 0..agent.policy.sources.len() {
        tracker.spawn(source_loop(
            agent.clone(),
            idx,
            shutdown.clone(),
            runs_cancel.clone(),
            slots.clone(),
        ));
    }
    // WAL streams all the time in between a physical source's base backups.
    for idx in 0..agent.policy.sources.len() {
        tracker.spawn(wal_loop(
            agent.clone(),
            idx,
            shutdown.clone(),
            runs_cancel.clone(),
            slots.clone(),
        ));
    }
    // Copies catch up on their own, so a slow or unreachable copy never holds up a backup.
    for idx in 0..agent.policy.copies.len() {
        tracker.spawn(copy_loop(agent.clone(), idx, shutdown.clone()));
    }
    // Objectives age as time passes, even without runs.
    tracker.spawn(objectives_loop(agent.clone(), shutdown.clone()));
    tracker.close();

    shutdown.cancelled().await;
    tracing::info!(grace = %humantime::format_duration(grace), "Shutting down: no new runs; waiting for running ones");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("Grace period over: cancelling running backups (uploads are aborted)");
        runs_cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(60), tracker.wait()).await;
    }
    http_stop.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
    }
    tracing::info!("Agent stopped");
    Ok(())
}

/// Aborts uploads left by a process that died (kill -9, OOM); never stops the agent: S3 may be
/// down right now.
async fn sweep_on_start(agent: &Agent) {
    match agent.repo().await {
        Ok(repo) => {
            // No run outlives its source's timeout (it is cancelled and its upload aborted), so
            // an upload older than the longest timeout, plus a minute for clocks that differ
            // between pods, belongs to a process that died (kill -9, OOM): abort it now.
            let longest = agent
                .policy
                .sources
                .iter()
                .map(|s| s.timeout)
                .max()
                .unwrap_or(retention::GRACE)
                + std::time::Duration::from_secs(60);
            let older = agent.clock.now()
                - chrono::Duration::from_std(longest.min(retention::GRACE)).unwrap_or_default();
            if let Err(e) = store::sweep_stale_uploads(repo.store.as_ref(), older).await {
                tracing::warn!(error = %e, "Cannot sweep stale uploads");
            }
        }
        Err(e) => {
            tracing::error!(error = %e.message, "The repository is not reachable; runs will fail until it is")
        }
    }
}

/// Streams a physical source's WAL (when it has `wal` settings) until shutdown. A failure no
/// reconnect mends (a credential, another cluster) is an error in the log, a failed `wal` run
/// (metric, webhook), and streaming is tried again a minute later: it never stops silently. A
/// gap the streamer finds is counted, notified, and answered with a base backup at once.
async fn wal_loop(
    agent: Arc<Agent>,
    idx: usize,
    shutdown: CancellationToken,
    runs_cancel: CancellationToken,
    slots: Arc<Semaphore>,
) {
    let src = &agent.policy.sources[idx];
    let crate::source::SourceConfig::PostgresPhysical(cfg) = &src.config else {
        return;
    };
    let Some(wal) = cfg.wal.clone() else {
        return;
    };
    while !shutdown.is_cancelled() {
        let started_at = agent.clock.now();
        let started = std::time::Instant::now();
        let streamed = async {
            let repo = agent.repo().await?;
            let pipeline = crate::job::pipeline_config(&agent.policy, src)?;
            let streamer = crate::source::postgres_physical::wal::Streamer::new(
                repo,
                &src.name,
                cfg.clone(),
                wal.clone(),
                pipeline,
            );
            let (gap_tx, gap_rx) = tokio::sync::mpsc::channel(1);
            let watch = tokio::spawn(watch_wal(agent.clone(), idx, streamer.progress(), gap_tx));
            let done = shutdown.child_token();
            let stream = async {
                let ran = streamer.run(shutdown.clone()).await;
                done.cancel();
                ran
            };
            let backups = backups_after_gaps(&agent, src, gap_rx, &done, &runs_cancel, &slots);
            let (ran, ()) = tokio::join!(stream, backups);
            watch.abort();
            ran
        }
        .await;
        match streamed {
            Ok(()) => return,
            Err(e) if e.kind == ErrorKind::Interrupted => return,
            Err(e) => {
                agent.finished(
                    src,
                    "wal",
                    started_at,
                    started.elapsed(),
                    Err(&e),
                    None,
                    true,
                );
                tracing::error!(source = %src.name, error = %e, "WAL streaming stopped; trying again in 60 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        }
    }
}

/// Takes a base backup of `src` after each gap the streamer reports, until `done`: the chain
/// from older base backups stops at the gap, and a new one starts a whole chain again.
async fn backups_after_gaps(
    agent: &Agent,
    src: &SourcePolicy,
    mut gaps: tokio::sync::mpsc::Receiver<()>,
    done: &CancellationToken,
    runs_cancel: &CancellationToken,
    slots: &Semaphore,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            gap = gaps.recv() => if gap.is_none() { return },
        }
        tracing::warn!(source = %src.name, "Taking a base backup now: the WAL archive has a gap");
        let permit = tokio::select! {
            p = slots.acquire() => p.ok(),
            _ = done.cancelled() => None,
        };
        if let Some(_permit) = permit {
            agent.run_source(src, done, runs_cancel).await;
        }
    }
}

/// Reports a streamer's progress: metrics, the source's status for its RPO, and each new gap
/// (a metric, a webhook, and a base backup asked of `gaps`).
async fn watch_wal(
    agent: Arc<Agent>,
    idx: usize,
    mut progress: tokio::sync::watch::Receiver<crate::source::postgres_physical::wal::Progress>,
    gaps: tokio::sync::mpsc::Sender<()>,
) {
    let name = agent.policy.sources[idx].name.clone();
    let mut seen_gaps = 0;
    let mut archived = crate::source::postgres_physical::Lsn(0);
    while progress.changed().await.is_ok() {
        let p = *progress.borrow_and_update();
        if p.gaps > seen_gaps {
            // The watch keeps only the latest value: count every gap found since the last look.
            agent.telemetry.wal_gaps(&name, p.gaps - seen_gaps);
            seen_gaps = p.gaps;
            if let Some((from, to)) = p.last_gap {
                agent.notifier.wal_gap(
                    &name,
                    format!("WAL of {name} from {from} to {to} was lost before it was archived; point-in-time recovery cannot cross it. A base backup is being taken now (RUNBOOK.md#wal-slot)"),
                );
            }
            // One waiting request is enough: a backup that starts after it covers every gap.
            let _ = gaps.try_send(());
        }
        if p.archived > archived {
            archived = p.archived;
            for nudge in &agent.wal_nudges {
                nudge.notify_one();
            }
        }
        let caught_up = (p.archived >= p.server_end && p.archived.0 > 0).then(|| agent.clock.now());
        agent
            .telemetry
            .wal_progress(&name, p.archived.0, p.server_end.0, caught_up);
        if let Some(t) = caught_up {
            agent.update(&name, |s| s.wal_caught_up = Some(t));
            // Streaming that had failed works again (sent only after a failure).
            agent.notifier.run_result(&name, "wal", None);
        }
    }
}

/// One source's schedule: a catch-up run at start if asked and due, then every tick, each run
/// waiting for a free slot.
async fn source_loop(
    agent: Arc<Agent>,
    idx: usize,
    shutdown: CancellationToken,
    runs_cancel: CancellationToken,
    slots: Arc<Semaphore>,
) {
    let src = &agent.policy.sources[idx];
    agent.refresh(src).await;
    let Some(schedule) = &src.schedule else {
        tracing::info!(source = %src.name, "No schedule: this source only runs with `lifeboat backup`");
        return;
    };
    let cron = match Cron::parse(&schedule.expression) {
        Ok(c) => c,
        Err(e) => {
            agent.alive.store(false, Ordering::Relaxed);
            tracing::error!(source = %src.name, error = %e.message, "Cannot schedule");
            return;
        }
    };
    let tz = agent.policy.timezone;
    if src.run_on_start {
        let newest = agent
            .status_snapshot()
            .get(&src.name)
            .and_then(|s| s.newest_backup.clone());
        let interval = cron.interval(&tz, agent.clock.now()).unwrap_or_default();
        let stale = newest.is_none_or(|(_, t)| {
            (agent.clock.now() - t)
                .to_std()
                .map(|a| a > interval)
                .unwrap_or(false)
        });
        if stale {
            tracing::info!(source = %src.name, "Newest backup is older than the schedule's interval: backing up now");
            if let Ok(_permit) = slots.acquire().await {
                agent.run_source(src, &shutdown, &runs_cancel).await;
            }
        }
    }
    let jitter = schedule::jitter(src.jitter, &agent.pod, &src.name);
    let name = src.name.clone();
    schedule_loop(
        agent.clock,
        &cron,
        tz,
        jitter,
        &shutdown,
        |t| {
            agent.telemetry.next_run(&name, t);
            agent.update(&name, |s| s.next_run = Some(t));
        },
        |n| agent.telemetry.skipped(&name, n),
        |tick| {
            let (agent, slots, shutdown, runs_cancel) = (&agent, &slots, &shutdown, &runs_cancel);
            async move {
                let permit = tokio::select! {
                    p = slots.acquire() => p.ok(),
                    _ = shutdown.cancelled() => None,
                };
                if let Some(_permit) = permit {
                    if agent.claim_slot(src, tick).await {
                        agent.run_source(src, shutdown, runs_cancel).await;
                    }
                }
            }
        },
    )
    .await;
}

/// Keeps one copy caught up until shutdown: a whole catch-up at start, right after each
/// published backup, and every `copy_interval`; and, as a physical source's WAL is archived, a
/// pass over the WAL alone, so the copy's recovery point trails the primary's by about one upload.
/// A failed catch-up is reported (log, metrics, webhook) and tried again at the next of those.
/// Shutdown stops a catch-up at once: its upload is aborted, and the next start copies it again.
async fn copy_loop(agent: Arc<Agent>, idx: usize, shutdown: CancellationToken) {
    let copy = &agent.policy.copies[idx];
    let sources: Vec<&SourcePolicy> = agent.policy.sources.iter().collect();
    let mut copier: Option<crate::copy::Copier> = None;
    let mut whole = true;
    loop {
        let started = std::time::Instant::now();
        if copier.is_none() {
            match crate::copy::Copier::open(&agent.policy, copy, shutdown.clone()).await {
                Ok(c) => copier = Some(c),
                Err(e) if e.kind == ErrorKind::Interrupted => return,
                // Nothing to copy before the first backup made the primary.
                Err(e) if e.kind == ErrorKind::RepositoryMissing => {
                    tracing::debug!(copy = %copy.name, "No primary repository yet; nothing to copy")
                }
                Err(e) => agent.copied(copy, &sources, Err(&e), started.elapsed(), false),
            }
        }
        if let Some(copier) = &copier {
            let result = if whole {
                copier
                    .catch_up(&agent.policy, &sources, agent.clock.now())
                    .await
            } else {
                copier.catch_up_shared_all(&sources).await
            };
            match result {
                Err(e) if e.kind == ErrorKind::Interrupted => return,
                Err(e) if e.kind == ErrorKind::LockHeld => {
                    tracing::debug!(copy = %copy.name, reason = %e.message, "Another replica is copying");
                }
                result => agent.copied(copy, &sources, result.as_ref(), started.elapsed(), !whole),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = agent.copy_nudges[idx].notified() => whole = true,
            _ = agent.wal_nudges[idx].notified() => whole = copier.is_none(),
            _ = tokio::time::sleep(copy.interval) => whole = true,
        }
    }
}

/// Re-evaluates every source's objectives each minute, re-reading the repository before an RPO
/// is called breached.
async fn objectives_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        for src in &agent.policy.sources {
            // The verifier runs elsewhere and the agent re-reads the repository after its
            // own runs only: a run waiting to retry, or no schedule at all, would leave
            // a newer verification unseen. Look again before calling an RPO breached.
            let st = agent
                .status_snapshot()
                .remove(&src.name)
                .unwrap_or_default();
            if rpo_lapsed(
                src.objectives.rpo,
                st.newest_verified.as_ref(),
                agent.clock.now(),
            ) {
                agent.refresh(src).await;
            } else {
                agent.evaluate_objectives(src);
            }
        }
    }
}

/// Whether the newest verified backup known is older than `rpo` (or there is none).
fn rpo_lapsed(
    rpo: Option<Duration>,
    newest_verified: Option<&(String, DateTime<Utc>)>,
    now: DateTime<Utc>,
) -> bool {
    match (rpo, newest_verified) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(rpo), Some((_, t))) => (now - *t).to_std().is_ok_and(|age| age > rpo),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn an_rpo_lapses_only_past_its_length() {
        let now = Utc::now();
        let rpo = Some(Duration::from_secs(120));
        let at = |secs: i64| ("b".to_string(), now - chrono::Duration::seconds(secs));
        assert!(!rpo_lapsed(None, None, now));
        assert!(rpo_lapsed(rpo, None, now));
        assert!(!rpo_lapsed(rpo, Some(&at(119)), now));
        assert!(rpo_lapsed(rpo, Some(&at(121)), now));
        // A backup from the future (clock skew between hosts) is not lapsed.
        assert!(!rpo_lapsed(rpo, Some(&at(-30)), now));
    }

    #[tokio::test(start_paused = true)]
    async fn runs_fire_on_schedule_never_overlap_and_skip_missed_ticks() {
        let base = DateTime::parse_from_rfc3339("2026-11-27T03:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let clock = Clock::Tokio {
            base,
            since: tokio::time::Instant::now(),
        };
        let cron = Cron::parse("*/10 * * * * *").unwrap();
        let shutdown = CancellationToken::new();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let skipped = AtomicU64::new(0);
        let running = AtomicBool::new(false);
        let n = AtomicU64::new(0);
        let stop = shutdown.clone();
        let s2 = starts.clone();
        schedule_loop(
            clock,
            &cron,
            chrono_tz::UTC,
            Duration::ZERO,
            &shutdown,
            |_| {},
            |k| {
                skipped.fetch_add(k, Ordering::SeqCst);
            },
            |_tick| {
                let s2 = s2.clone();
                let (running, n, stop) = (&running, &n, stop.clone());
                async move {
                    assert!(
                        !running.swap(true, Ordering::SeqCst),
                        "a run overlapped another"
                    );
                    s2.lock().unwrap().push(clock.now());
                    // The second run takes 25 s: the ticks at +30 s and +40 s pass meanwhile.
                    let k = n.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(if k == 1 { 25 } else { 1 })).await;
                    running.store(false, Ordering::SeqCst);
                    if k == 3 {
                        stop.cancel();
                    }
                }
            },
        )
        .await;
        let secs: Vec<i64> = starts
            .lock()
            .unwrap()
            .iter()
            .map(|t| (*t - base).num_seconds())
            .collect();
        assert_eq!(secs, vec![10, 20, 50, 60]);
        assert_eq!(skipped.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_delays_every_tick_by_the_same_offset() {
        let base = DateTime::parse_from_rfc3339("2026-11-27T03:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let clock = Clock::Tokio {
            base,
            since: tokio::time::Instant::now(),
        };
        let cron = Cron::parse("0 * * * *").unwrap();
        let shutdown = CancellationToken::new();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let s2 = starts.clone();
        let stop = shutdown.clone();
        schedule_loop(
            clock,
            &cron,
            chrono_tz::UTC,
            Duration::from_secs(90),
            &shutdown,
            |_| {},
            |_| {},
            |_tick| {
                let s2 = s2.clone();
                let stop = stop.clone();
                async move {
                    let mut v = s2.lock().unwrap();
                    v.push(clock.now());
                    if v.len() == 3 {
                        stop.cancel();
                    }
                }
            },
        )
        .await;
        let mins: Vec<String> = starts
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.format("%H:%M:%S").to_string())
            .collect();
        // The 03:00 tick plus 90 s is still ahead at 03:00:00, so it is the first.
        assert_eq!(mins, vec!["03:01:30", "04:01:30", "05:01:30"]);
    }
}
