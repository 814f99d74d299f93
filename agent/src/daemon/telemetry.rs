//! Telemetry: every event goes through one function here, which writes the log line and updates
//! the metrics together, so logs and /metrics never disagree.
//!
//! Labels are `source`, `op` (backup|verify|prune), `result` and `stage`; never `job` (Prometheus'
//! own) and never a backup id (unbounded). Every counter starts at 0 for every source.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::verify::Timings;

/// The operations the agent reports on.
pub const OPS: [&str; 3] = ["backup", "verify", "prune"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceOp {
    source: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourcePhase {
    source: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceOpResult {
    source: String,
    op: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceStage {
    source: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceShard {
    source: String,
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceTargetOp {
    source: String,
    /// `repository` or `source`.
    target: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceShardStage {
    source: String,
    shard: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceObjective {
    source: String,
    objective: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CopyLabel {
    copy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CopySource {
    copy: String,
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CopySourceResult {
    copy: String,
    source: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: String,
}

type FGauge = Gauge<f64, AtomicU64>;
type HistFamily = Family<SourceOp, Histogram, fn() -> Histogram>;

/// The agent's metrics.
pub struct Telemetry {
    registry: Registry,
    last_success: Family<SourceOp, FGauge>,
    last_failure: Family<SourceOp, FGauge>,
    runs: Family<SourceOpResult, Counter>,
    duration: HistFamily,
    bytes: Family<SourceStage, Gauge>,
    shard_keys: Family<SourceShard, Gauge>,
    shard_bytes: Family<SourceShardStage, Gauge>,
    requests: Family<SourceTargetOp, Counter>,
    next_run: Family<SourceLabel, FGauge>,
    rpo: Family<SourceLabel, FGauge>,
    rto: Family<SourceLabel, FGauge>,
    restore_duration: Family<SourceLabel, FGauge>,
    verification_phases: Family<SourcePhase, FGauge>,
    contained: Family<SourceLabel, Gauge>,
    backups: Family<SourceLabel, Gauge>,
    skipped: Family<SourceLabel, Counter>,
    breach: Family<SourceObjective, Gauge>,
    wal_archived: Family<SourceLabel, Gauge>,
    wal_lag: Family<SourceLabel, Gauge>,
    wal_caught_up: Family<SourceLabel, FGauge>,
    wal_gaps: Family<SourceLabel, Counter>,
    copy_runs: Family<CopySourceResult, Counter>,
    copy_last_success: Family<CopySource, FGauge>,
    copy_last_failure: Family<CopySource, FGauge>,
    copy_newest: Family<CopySource, FGauge>,
    copy_point: Family<CopySource, FGauge>,
    copy_lag: Family<CopySource, FGauge>,
    copy_objects: Family<CopyLabel, Counter>,
    copy_bytes: Family<CopyLabel, Counter>,
}

fn duration_histogram() -> Histogram {
    // 1 s … ~9 h.
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

fn so(source: &str, op: &str) -> SourceOp {
    SourceOp {
        source: source.to_string(),
        op: op.to_string(),
    }
}

fn sl(source: &str) -> SourceLabel {
    SourceLabel {
        source: source.to_string(),
    }
}

impl Telemetry {
    /// Metrics for these sources, every counter at 0; objectives from the policy.
    pub fn new(
        sources: &[(String, Option<Duration>, Option<Duration>)],
        copies: &[String],
    ) -> Telemetry {
        let mut registry = Registry::default();
        let t = Telemetry {
            last_success: Family::default(),
            last_failure: Family::default(),
            runs: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            bytes: Family::default(),
            shard_keys: Family::default(),
            shard_bytes: Family::default(),
            requests: Family::default(),
            next_run: Family::default(),
            rpo: Family::default(),
            rto: Family::default(),
            restore_duration: Family::default(),
            verification_phases: Family::default(),
            contained: Family::default(),
            backups: Family::default(),
            skipped: Family::default(),
            breach: Family::default(),
            wal_archived: Family::default(),
            wal_lag: Family::default(),
            wal_caught_up: Family::default(),
            wal_gaps: Family::default(),
            copy_runs: Family::default(),
            copy_last_success: Family::default(),
            copy_last_failure: Family::default(),
            copy_newest: Family::default(),
            copy_point: Family::default(),
            copy_lag: Family::default(),
            copy_objects: Family::default(),
            copy_bytes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "lifeboat_last_success_timestamp_seconds",
            "When the operation last succeeded (Unix time)",
            t.last_success.clone(),
        );
        registry.register(
            "lifeboat_last_failure_timestamp_seconds",
            "When the operation last failed (Unix time)",
            t.last_failure.clone(),
        );
        registry.register("lifeboat_runs", "Runs by result", t.runs.clone());
        registry.register(
            "lifeboat_run_duration_seconds",
            "Run duration",
            t.duration.clone(),
        );
        registry.register(
            "lifeboat_last_backup_bytes",
            "Size of the last backup (stage plain or stored)",
            t.bytes.clone(),
        );
        registry.register(
            "lifeboat_last_backup_shard_keys",
            "Keys in each shard of the last backup of a Redis Cluster",
            t.shard_keys.clone(),
        );
        registry.register(
            "lifeboat_last_backup_shard_bytes",
            "Size of each shard of the last backup of a Redis Cluster (stage plain or stored)",
            t.shard_bytes.clone(),
        );
        registry.register(
            "lifeboat_requests",
            "Requests backups made of the repository and of object-store sources, by S3 class (list, get, head, put, delete)",
            t.requests.clone(),
        );
        registry.register(
            "lifeboat_next_run_timestamp_seconds",
            "When the source runs next (Unix time)",
            t.next_run.clone(),
        );
        registry.register(
            "lifeboat_rpo_seconds",
            "Recovery point objective from the policy",
            t.rpo.clone(),
        );
        registry.register(
            "lifeboat_rto_seconds",
            "Recovery time objective from the policy",
            t.rto.clone(),
        );
        registry.register(
            "lifeboat_last_restore_duration_seconds",
            "Measured restore time of the latest verification",
            t.restore_duration.clone(),
        );
        registry.register(
            "lifeboat_last_verification_phase_seconds",
            "The latest verification's time by phase: download, restore, index_build, readback, checks, other (together its measured RTO)",
            t.verification_phases.clone(),
        );
        registry.register(
            "lifeboat_verification_contained",
            "1 if the latest verification's scratch server ran without network (a namespace of its own), 0 if it shared the host's",
            t.contained.clone(),
        );
        registry.register(
            "lifeboat_repository_backups",
            "Backups of the source in the repository",
            t.backups.clone(),
        );
        registry.register(
            "lifeboat_skipped_runs",
            "Scheduled runs skipped because the previous run was still going",
            t.skipped.clone(),
        );
        registry.register(
            "lifeboat_objective_breach",
            "1 while an objective (rpo, rto) is breached",
            t.breach.clone(),
        );
        registry.register(
            "lifeboat_wal_archived_lsn",
            "Physical sources: the end of the WAL stored in the repository, as a byte position",
            t.wal_archived.clone(),
        );
        registry.register(
            "lifeboat_wal_lag_bytes",
            "Physical sources: WAL the server has and the repository not yet (what the slot holds for the archive)",
            t.wal_lag.clone(),
        );
        registry.register(
            "lifeboat_wal_caught_up_timestamp_seconds",
            "Physical sources: when the stored WAL last reached the server's position (Unix time); now minus this is the archive's recovery point",
            t.wal_caught_up.clone(),
        );
        registry.register(
            "lifeboat_wal_gaps",
            "Physical sources: gaps found in the WAL archive while streaming (WAL the server removed before it was stored); each triggers a base backup",
            t.wal_gaps.clone(),
        );
        registry.register(
            "lifeboat_copy_runs",
            "Copies: catch-ups of a source to a copy, by result",
            t.copy_runs.clone(),
        );
        registry.register(
            "lifeboat_copy_last_success_timestamp_seconds",
            "Copies: when a catch-up of the source to the copy last succeeded (Unix time)",
            t.copy_last_success.clone(),
        );
        registry.register(
            "lifeboat_copy_last_failure_timestamp_seconds",
            "Copies: when a catch-up of the source to the copy last failed (Unix time)",
            t.copy_last_failure.clone(),
        );
        registry.register(
            "lifeboat_copy_newest_backup_timestamp_seconds",
            "Copies: when the newest backup the copy holds started (Unix time)",
            t.copy_newest.clone(),
        );
        registry.register(
            "lifeboat_copy_recovery_point_timestamp_seconds",
            "Copies: the newest point of the primary's data the copy holds (a backup's end, a WAL upload; Unix time)",
            t.copy_point.clone(),
        );
        registry.register(
            "lifeboat_copy_lag_seconds",
            "Copies: how far the copy trailed the primary at its last catch-up: what losing the primary's region would have lost",
            t.copy_lag.clone(),
        );
        registry.register(
            "lifeboat_copy_objects",
            "Copies: objects written to the copy",
            t.copy_objects.clone(),
        );
        registry.register(
            "lifeboat_copy_bytes",
            "Copies: bytes written to the copy",
            t.copy_bytes.clone(),
        );
        let build: Family<Version, Gauge> = Family::default();
        build
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("lifeboat_build_info", "lifeboat's version", build);
        for (name, rpo, rto) in sources {
            for op in OPS {
                for result in ["success", "failure"] {
                    // Created now so every counter is exported at 0 from the start.
                    let _ = t.runs.get_or_create(&SourceOpResult {
                        source: name.clone(),
                        op: op.to_string(),
                        result: result.to_string(),
                    });
                }
                let _ = t.last_success.get_or_create(&so(name, op));
                let _ = t.last_failure.get_or_create(&so(name, op));
            }
            let _ = t.skipped.get_or_create(&sl(name));
            if let Some(r) = rpo {
                t.rpo.get_or_create(&sl(name)).set(r.as_secs_f64());
            }
            if let Some(r) = rto {
                t.rto.get_or_create(&sl(name)).set(r.as_secs_f64());
            }
        }
        for copy in copies {
            let _ = t
                .copy_objects
                .get_or_create(&CopyLabel { copy: copy.clone() });
            let _ = t
                .copy_bytes
                .get_or_create(&CopyLabel { copy: copy.clone() });
            for (name, _, _) in sources {
                let label = CopySource {
                    copy: copy.clone(),
                    source: name.clone(),
                };
                // At 0 from the start, so "failed since it last succeeded" holds before a success.
                let _ = t.copy_last_success.get_or_create(&label);
                let _ = t.copy_last_failure.get_or_create(&label);
                for result in ["success", "failure"] {
                    let _ = t.copy_runs.get_or_create(&CopySourceResult {
                        copy: copy.clone(),
                        source: name.clone(),
                        result: result.to_string(),
                    });
                }
            }
        }
        Telemetry { registry, ..t }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// A run of `op` on `source` ended; logs one line and updates the metrics.
    pub fn run_finished(
        &self,
        source: &str,
        op: &str,
        result: std::result::Result<Option<(u64, u64)>, &crate::Error>,
        took: Duration,
        at: DateTime<Utc>,
    ) {
        let ts = at.timestamp_millis() as f64 / 1000.0;
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.runs
            .get_or_create(&SourceOpResult {
                source: source.to_string(),
                op: op.to_string(),
                result: outcome.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&so(source, op))
            .observe(took.as_secs_f64());
        match result {
            Ok(sizes) => {
                self.last_success.get_or_create(&so(source, op)).set(ts);
                if let Some((plain, stored)) = sizes {
                    for (stage, v) in [("plain", plain), ("stored", stored)] {
                        self.bytes
                            .get_or_create(&SourceStage {
                                source: source.to_string(),
                                stage: stage.to_string(),
                            })
                            .set(v as i64);
                    }
                    tracing::info!(
                        source,
                        op,
                        result = outcome,
                        plain,
                        stored,
                        seconds = took.as_secs_f64(),
                        "Run finished"
                    );
                } else {
                    tracing::info!(
                        source,
                        op,
                        result = outcome,
                        seconds = took.as_secs_f64(),
                        "Run finished"
                    );
                }
            }
            Err(e) => {
                self.last_failure.get_or_create(&so(source, op)).set(ts);
                tracing::error!(source, op, result = outcome, seconds = took.as_secs_f64(), error = %e.message, "Run failed");
            }
        }
    }

    /// A backup was stored: the requests it made, added to the counters.
    pub fn requests(&self, m: &crate::repo::manifest::Manifest) {
        let Some(r) = &m.requests else {
            return;
        };
        let targets = [("repository", Some(r.repository)), ("source", r.source)];
        for (target, counts) in targets {
            for (op, n) in counts.iter().flat_map(|c| c.by_op()) {
                self.requests
                    .get_or_create(&SourceTargetOp {
                        source: m.source.clone(),
                        target: target.to_string(),
                        op: op.to_string(),
                    })
                    .inc_by(n);
            }
        }
    }

    /// A backup of a Redis Cluster was stored: each shard's keys and sizes.
    pub fn shards(&self, m: &crate::repo::manifest::Manifest) {
        for shard in &m.shards {
            let label = SourceShard {
                source: m.source.clone(),
                shard: shard.name.clone(),
            };
            self.shard_keys.get_or_create(&label).set(shard.keys as i64);
            let Some(part) = m.parts.iter().find(|p| p.name == shard.object) else {
                continue;
            };
            for (stage, v) in [("plain", part.size_plain), ("stored", part.size_stored)] {
                self.shard_bytes
                    .get_or_create(&SourceShardStage {
                        source: m.source.clone(),
                        shard: shard.name.clone(),
                        stage: stage.to_string(),
                    })
                    .set(v as i64);
            }
        }
    }

    /// The source's next run is at `at`.
    pub fn next_run(&self, source: &str, at: DateTime<Utc>) {
        self.next_run
            .get_or_create(&sl(source))
            .set(at.timestamp_millis() as f64 / 1000.0);
        tracing::debug!(source, next = %at, "Next run scheduled");
    }

    /// `n` ticks were skipped because a run was still going.
    pub fn skipped(&self, source: &str, n: u64) {
        if n > 0 {
            self.skipped.get_or_create(&sl(source)).inc_by(n);
            tracing::warn!(
                source,
                skipped = n,
                "A run outlasted its schedule; ticks were skipped"
            );
        }
    }

    /// The latest verification (from the verifier's report in the repository): pass or fail,
    /// when, and whether its scratch server was contained (when it started one).
    pub fn verification(
        &self,
        source: &str,
        passed: bool,
        at: DateTime<Utc>,
        contained: Option<bool>,
    ) {
        if let Some(c) = contained {
            self.contained.get_or_create(&sl(source)).set(i64::from(c));
        }
        let ts = at.timestamp_millis() as f64 / 1000.0;
        let family = if passed {
            &self.last_success
        } else {
            &self.last_failure
        };
        family.get_or_create(&so(source, "verify")).set(ts);
    }

    /// What the repository holds for the source now, and the latest verification's phases.
    pub fn repository(&self, source: &str, backups: usize, last: Option<&Timings>) {
        self.backups.get_or_create(&sl(source)).set(backups as i64);
        if let Some(t) = last {
            self.restore_duration
                .get_or_create(&sl(source))
                .set(t.restore_total());
            for (phase, seconds) in t.phases() {
                let label = SourcePhase {
                    source: source.to_string(),
                    phase: phase.to_string(),
                };
                self.verification_phases.get_or_create(&label).set(seconds);
            }
        }
    }

    /// Where a physical source's WAL archive stands: stored up to `archived` of the server's
    /// `server_end`; `caught_up` when the two last met. Logged at debug (it changes every
    /// flush interval).
    pub fn wal_progress(
        &self,
        source: &str,
        archived: u64,
        server_end: u64,
        caught_up: Option<DateTime<Utc>>,
    ) {
        let lag = server_end.saturating_sub(archived);
        self.wal_archived
            .get_or_create(&sl(source))
            .set(archived as i64);
        self.wal_lag.get_or_create(&sl(source)).set(lag as i64);
        if let Some(t) = caught_up {
            self.wal_caught_up
                .get_or_create(&sl(source))
                .set(t.timestamp_millis() as f64 / 1000.0);
        }
        tracing::debug!(source, archived, lag, "WAL archive progress");
    }

    /// `n` gaps in a physical source's WAL archive: WAL the server removed before it was
    /// stored. The streamer logged each; this counts them.
    pub fn wal_gaps(&self, source: &str, n: u32) {
        self.wal_gaps
            .get_or_create(&sl(source))
            .inc_by(u64::from(n));
    }

    /// A catch-up of `copy` ended: one line per source and the copy's metrics. `Err` is a
    /// failure before any source was copied (the copy could not be opened); `quiet` logs a
    /// success at debug (the passes that follow the WAL archive).
    pub fn copy_finished(
        &self,
        copy: &str,
        sources: &[&str],
        result: std::result::Result<&crate::copy::CopyReport, &crate::Error>,
        took: Duration,
        at: DateTime<Utc>,
        quiet: bool,
    ) {
        let ts = |t: DateTime<Utc>| t.timestamp_millis() as f64 / 1000.0;
        let cs = |source: &str| CopySource {
            copy: copy.to_string(),
            source: source.to_string(),
        };
        let ran = |source: &str, ok: bool| {
            self.copy_runs
                .get_or_create(&CopySourceResult {
                    copy: copy.to_string(),
                    source: source.to_string(),
                    result: if ok { "success" } else { "failure" }.to_string(),
                })
                .inc();
            let family = if ok {
                &self.copy_last_success
            } else {
                &self.copy_last_failure
            };
            family.get_or_create(&cs(source)).set(ts(at));
        };
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                for source in sources {
                    ran(source, false);
                }
                tracing::warn!(copy, seconds = took.as_secs_f64(), error = %e, "Copy failed; backups go on, and the next catch-up tries again");
                return;
            }
        };
        let label = CopyLabel {
            copy: copy.to_string(),
        };
        for s in &report.sources {
            self.copy_objects.get_or_create(&label).inc_by(s.objects);
            self.copy_bytes.get_or_create(&label).inc_by(s.bytes);
            ran(&s.source, s.error.is_none());
            if let Some(t) = s.newest_at {
                self.copy_newest.get_or_create(&cs(&s.source)).set(ts(t));
            }
            if let Some(t) = s.copy_point {
                self.copy_point.get_or_create(&cs(&s.source)).set(ts(t));
            }
            if let Some(lag) = s.lag_seconds() {
                self.copy_lag.get_or_create(&cs(&s.source)).set(lag);
            }
            match &s.error {
                None if quiet => tracing::debug!(
                    copy,
                    source = %s.source,
                    shared = s.shared,
                    bytes = s.bytes,
                    "Copy caught up with the WAL archive"
                ),
                None => tracing::info!(
                    copy,
                    source = %s.source,
                    copied = s.copied.len(),
                    repaired = s.repaired.len(),
                    shared = s.shared,
                    objects = s.objects,
                    bytes = s.bytes,
                    lag_seconds = s.lag_seconds().unwrap_or(0.0),
                    seconds = took.as_secs_f64(),
                    "Copy caught up"
                ),
                Some(e) => {
                    tracing::warn!(copy, source = %s.source, error = %e, "Copy failed; backups go on, and the next catch-up tries again")
                }
            }
        }
    }

    /// Whether an objective is breached; logs when it changes, and returns true then.
    pub fn breach(&self, source: &str, objective: &str, breached: bool, why: &str) -> bool {
        let g = self.breach.get_or_create(&SourceObjective {
            source: source.to_string(),
            objective: objective.to_string(),
        });
        let was = g.get() == 1;
        g.set(i64::from(breached));
        if breached && !was {
            tracing::error!(source, objective, reason = why, "Objective breached");
        } else if !breached && was {
            tracing::info!(source, objective, "Objective met again");
        }
        breached != was
    }
}
