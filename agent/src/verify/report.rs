//! The verification report, stored beside the backup at
//! `verifications/<source>/<backup-id>/<verify-id>.json`; `lifeboat list` reads the latest one.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::repo::Repository;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// What the backup (or the policy) says.
    pub expected: String,
    /// What the restored database holds.
    pub found: String,
}

impl Check {
    /// A check that passed when `expected == found`.
    pub fn eq(
        name: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Check {
        let (expected, found) = (expected.into(), found.into());
        Check {
            name: name.into(),
            passed: expected == found,
            expected,
            found,
        }
    }

    /// A check that failed outright.
    pub fn failed(
        name: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            passed: false,
            expected: expected.into(),
            found: found.into(),
        }
    }
}

/// How long each phase took. The phases run one after the other, so they and the scratch's start
/// and teardown make up the total; the measured RTO is [`Timings::recovery`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timings {
    /// Download and integrity check of every stored object (the scratch starts meanwhile).
    pub download_seconds: f64,
    /// The restore into the scratch up to its data: globals, schema and rows (PostgreSQL: until
    /// pg_restore has read the dump's last byte).
    pub restore_seconds: f64,
    /// What the restore does after the data: PostgreSQL's post-data section (indexes,
    /// constraints, triggers) and its commit. 0 for kinds without one.
    pub index_build_seconds: f64,
    /// Reading back what the scratch holds and comparing it with the fingerprint.
    pub readback_seconds: f64,
    /// The policy's own checks (`verify.checks`).
    pub checks_seconds: f64,
    /// Everything.
    pub total_seconds: f64,
}

impl Timings {
    /// The restore's whole time: data, then indexes.
    pub fn restore_total(&self) -> f64 {
        self.restore_seconds + self.index_build_seconds
    }

    /// The measured RTO: what a real recovery of the backup does (download, restore, indexes),
    /// which the RTO objective is judged by; the read-back and checks only a verification does.
    pub fn recovery(&self) -> f64 {
        self.download_seconds + self.restore_total()
    }

    /// Each phase by name, as the dashboard shows them (`other`: the scratch's start and
    /// teardown, and storing the report).
    pub fn phases(&self) -> [(&'static str, f64); 6] {
        let named = [
            ("download", self.download_seconds),
            ("restore", self.restore_seconds),
            ("index_build", self.index_build_seconds),
            ("readback", self.readback_seconds),
            ("checks", self.checks_seconds),
        ];
        let other = self.total_seconds - named.iter().map(|(_, s)| s).sum::<f64>();
        let [a, b, c, d, e] = named;
        [a, b, c, d, e, ("other", other.max(0.0))]
    }
}

/// The WAL replay drill of a physical backup: what was replayed from the archive, to which
/// targets, and how fast.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Replay {
    /// Where the base backup ends: replay of archived WAL starts here.
    pub from: String,
    /// Where the archive ends.
    pub archive_end: String,
    /// Archived segments fetched (each checked against its SHA-256).
    pub segments: u64,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Fetching them into the scratch.
    pub download_seconds: f64,
    /// Every replay, from the first server start to the last promotion.
    pub replay_seconds: f64,
    /// WAL bytes replayed per second of `replay_seconds`.
    pub bytes_per_second: f64,
    /// The targets replayed to, in order.
    pub targets: Vec<ReplayTarget>,
}

/// One target of the replay drill.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayTarget {
    /// `random point in the window` or `archive end`.
    pub kind: String,
    /// The target LSN.
    pub target: String,
    /// Where the server's recovery stopped, from its log; absent when it did not say.
    pub reached: Option<String>,
    /// Server start to stop (a random point) or to promotion (the archive's end).
    pub seconds: f64,
}

/// One verification of one backup.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Report format.
    pub format: u32,
    /// This verification's id.
    pub verify_id: String,
    /// Source name.
    pub source: String,
    /// Backup id.
    pub backup_id: String,
    /// `pass` or `fail`.
    pub result: String,
    /// Why it failed, when it did before the checks could run.
    pub error: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// Phase timings.
    pub timings: Timings,
    /// Where it restored: `ephemeral cluster` or the scratch server.
    pub scratch: String,
    /// What this verification could not cover, and why.
    pub notes: Vec<String>,
    /// Whether the scratch server ran without network (a namespace of its own); absent where
    /// the verifier does not start one (a shared scratch server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contained: Option<bool>,
    /// Versions involved.
    pub versions: serde_json::Value,
    /// Every check, passed or not.
    pub checks: Vec<Check>,
    /// The WAL replay drill (physical backups with an archive past their end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
    /// The source's recovery-time objective, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rto_objective_seconds: Option<f64>,
    /// Whether `timings.total_seconds` (the measured RTO) was within it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rto_met: Option<bool>,
    /// What the verification asked of the repository, by S3 billing class (the report's own
    /// PUT aside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<crate::store::counted::RequestCounts>,
}

impl Report {
    /// Stores the report in the repository, signed when the policy has `[signing]`, and returns
    /// its key.
    pub async fn store(&self, repo: &Repository) -> Result<String> {
        let key = crate::repo::layout::verification(&self.source, &self.backup_id, &self.verify_id);
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::failed(format!("cannot encode the report: {e}")))?;
        let signer = repo.trust.signer()?;
        repo.publish(&key, Bytes::from(body), signer.as_ref())
            .await?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::Timings;

    #[test]
    fn the_measured_rto_is_what_a_recovery_does_and_the_phases_make_up_the_total() {
        let t = Timings {
            download_seconds: 1.0,
            restore_seconds: 2.0,
            index_build_seconds: 3.0,
            readback_seconds: 4.0,
            checks_seconds: 5.0,
            total_seconds: 16.5,
        };
        assert_eq!(t.restore_total(), 5.0);
        assert_eq!(t.recovery(), 6.0, "not the read-back or the checks");
        let phases = t.phases();
        assert_eq!(phases[5], ("other", 1.5));
        assert_eq!(phases.iter().map(|(_, s)| s).sum::<f64>(), 16.5);
    }
}
