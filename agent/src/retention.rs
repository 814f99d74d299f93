//! Retention: which backups to keep and why. `plan` is pure (time is a parameter) and gives a
//! reason for every decision; `prune` in the CLI applies it.
//!
//! The buckets follow restic: walking from newest to oldest, a `keep_daily = 7` rule keeps the
//! newest backup of each of the 7 most recent days that have a backup, in the policy's time zone.
//! Whatever the rules say, these are never deleted: the newest backup, the newest
//! `keep_last_verified` verified backups, and pinned backups. If the newest backup failed its
//! latest verification, nothing is deleted at all: the older backups may be the only good ones.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::Serialize;

use crate::policy::Retention;

/// A backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Backup id.
    pub id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Latest verification: `Some(true)` passed, `Some(false)` failed, `None` never verified.
    pub verified: Option<bool>,
    /// Pinned by an operator.
    pub pinned: bool,
}

/// Keep or delete, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Backup id.
    pub id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Keep it?
    pub keep: bool,
    /// Every rule that keeps it, or why it goes.
    pub reasons: Vec<String>,
}

/// Decides for every backup (any order in, newest first out).
pub fn plan<Tz: TimeZone>(
    backups: &[Candidate],
    rules: &Retention,
    tz: &Tz,
    now: DateTime<Utc>,
) -> Vec<Decision>
where
    Tz::Offset: Copy,
{
    let mut sorted: Vec<&Candidate> = backups.iter().collect();
    sorted.sort_by(|a, b| (b.started_at, &b.id).cmp(&(a.started_at, &a.id)));
    let newest_failed = sorted.first().is_some_and(|b| b.verified == Some(false));

    type Key = fn(&DateTime<chrono::FixedOffset>) -> String;
    let buckets: [(&str, Option<u32>, Key); 5] = [
        ("hourly", rules.keep_hourly, |t| {
            t.format("%Y-%m-%d %H:00").to_string()
        }),
        ("daily", rules.keep_daily, |t| {
            t.format("%Y-%m-%d").to_string()
        }),
        ("weekly", rules.keep_weekly, |t| {
            format!("{}-W{:02}", t.iso_week().year(), t.iso_week().week())
        }),
        ("monthly", rules.keep_monthly, |t| {
            t.format("%Y-%m").to_string()
        }),
        ("yearly", rules.keep_yearly, |t| t.format("%Y").to_string()),
    ];
    let mut left: Vec<u32> = buckets.iter().map(|b| b.1.unwrap_or(0)).collect();
    let mut last_key: Vec<Option<String>> = vec![None; buckets.len()];
    let mut verified_left = rules.keep_last_verified;

    let mut out = Vec::with_capacity(sorted.len());
    for (i, b) in sorted.iter().enumerate() {
        let mut reasons = Vec::new();
        if i == 0 {
            reasons.push("newest".to_string());
        }
        if b.pinned {
            reasons.push("pinned".to_string());
        }
        if b.verified == Some(true) && verified_left > 0 {
            verified_left -= 1;
            reasons.push("newest verified".to_string());
        }
        if rules.keep_last.is_some_and(|n| (i as u32) < n) {
            reasons.push(format!("last {}", i + 1));
        }
        if let Some(d) = rules.keep_within {
            let age = now.signed_duration_since(b.started_at);
            if age.to_std().map(|a| a <= d).unwrap_or(true) {
                reasons.push(format!("within {}", humantime::format_duration(d)));
            }
        }
        let local = b.started_at.with_timezone(tz).fixed_offset();
        for (j, (name, _, key)) in buckets.iter().enumerate() {
            let k = key(&local);
            if left[j] > 0 && last_key[j].as_deref() != Some(k.as_str()) {
                left[j] -= 1;
                reasons.push(format!("{name} {k}"));
                last_key[j] = Some(k);
            }
        }
        let keep = !reasons.is_empty() || newest_failed;
        if reasons.is_empty() {
            reasons.push(if newest_failed {
                "kept: the newest backup failed verification, so nothing is deleted".to_string()
            } else {
                "no rule keeps it".to_string()
            });
        }
        out.push(Decision {
            id: b.id.clone(),
            started_at: b.started_at,
            keep,
            reasons,
        });
    }
    out
}

/// What a prune did (or, dry, would do).
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// Source name.
    pub source: String,
    /// Every decision, newest first.
    pub decisions: Vec<Decision>,
    /// Whether anything was deleted.
    pub applied: bool,
    /// Objects deleted.
    pub deleted_objects: Vec<String>,
    /// Interrupted runs (no manifest) removed, older than the grace period.
    pub swept_incomplete: Vec<String>,
    /// Stale unfinished uploads aborted.
    pub aborted_uploads: Vec<String>,
    /// Why unfinished uploads could not be listed (a server without ListMultipartUploads);
    /// absent when they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploads_unlisted: Option<String>,
    /// What was collected of the content the kind shares between backups (objects' blobs).
    pub collected: Option<crate::collect::Collection>,
    /// The requests made of the repository for this source, by S3 billing class (set by the
    /// command that ran the prune).
    pub requests: crate::store::counted::RequestCounts,
}

/// Interrupted runs and unfinished uploads younger than this are left alone: they may belong to
/// a backup that is running right now.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A prune, planned: every decision with its reason and the interrupted runs to sweep. Nothing is
/// deleted until [`apply_prune`]; [`PrunePlan::preview`] adds what the kind would collect.
#[derive(Debug, Clone)]
pub struct PrunePlan {
    /// What the prune will do, as a report with nothing applied yet (`--dry-run` prints it).
    pub report: PruneReport,
    stale_incomplete: Vec<String>,
    now: DateTime<Utc>,
}

/// Plans retention for `source` at `now`, reading the repository and deleting nothing.
pub async fn plan_prune(
    repo: &crate::repo::Repository,
    policy: &crate::policy::Policy,
    source: &crate::policy::SourcePolicy,
    now: DateTime<Utc>,
) -> crate::Result<PrunePlan> {
    use crate::error::Error;
    use crate::repo::layout;
    let name = &source.name;
    let listing = repo.list(Some(name)).await?;
    refuse_lost_listing(repo, name, listing.backups.len()).await?;
    let pins: std::collections::BTreeSet<String> = repo
        .store
        .list(&layout::pins_prefix(name))
        .await
        .map_err(|e| Error::from(e).context("listing pins"))?
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
        .collect();
    let candidates: Vec<Candidate> = listing
        .backups
        .iter()
        .map(|e| Candidate {
            id: e.manifest.id.clone(),
            started_at: e.manifest.started_at,
            verified: e.verification.as_ref().map(|v| v.result == "pass"),
            pinned: pins.contains(&e.manifest.id),
        })
        .collect();
    let mut decisions = plan(&candidates, &source.retention, &policy.timezone, now);
    honour_object_lock(repo, name, &mut decisions).await?;
    let grace = chrono::Duration::from_std(GRACE).unwrap_or_default();
    let stale_incomplete: Vec<String> = listing
        .incomplete
        .iter()
        .filter(|(_, id)| layout::id_time(id).is_some_and(|t| t < now - grace))
        .map(|(_, id)| id.clone())
        .collect();
    let report = PruneReport {
        source: name.clone(),
        decisions,
        applied: false,
        deleted_objects: Vec::new(),
        swept_incomplete: stale_incomplete.clone(),
        aborted_uploads: Vec::new(),
        uploads_unlisted: None,
        collected: None,
        requests: Default::default(),
    };
    Ok(PrunePlan {
        report,
        stale_incomplete,
        now,
    })
}

impl PrunePlan {
    /// The report of a prune that is not applied (`--dry-run`), with what the kind would collect
    /// once the backups this plan deletes are gone. Applying reads that afresh instead, after the
    /// deletions, so a real prune reads the shared content once.
    pub async fn preview(
        self,
        repo: &crate::repo::Repository,
        policy: &crate::policy::Policy,
        source: &crate::policy::SourcePolicy,
    ) -> crate::Result<PruneReport> {
        let mut report = self.report;
        let doomed: std::collections::HashSet<(String, String)> = report
            .decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| (source.name.clone(), d.id.clone()))
            .collect();
        report.collected = source
            .config
            .plan_shared_collection(repo, &source.name, policy, self.now, &doomed)
            .await?
            .map(|c| c.summary);
        Ok(report)
    }
}

/// Refuses to prune when the listing shows no backups but the last prune kept some: a wrong
/// prefix or credentials look like that, and pruning "nothing" would record it as the truth.
async fn refuse_lost_listing(
    repo: &crate::repo::Repository,
    name: &str,
    listed: usize,
) -> crate::Result<()> {
    use crate::error::Error;
    let state_key = crate::repo::layout::prune_state(name);
    let before: Option<u64> = match repo.store.get(&state_key).await {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
            .ok()
            .and_then(|v| v["backups"].as_u64()),
        Err(crate::store::StoreError::NotFound { .. }) => None,
        Err(e) => return Err(Error::from(e).context("reading the prune state")),
    };
    if listed == 0 && before.unwrap_or(0) > 0 {
        return Err(Error::failed(format!(
            "source {name}: the listing shows no backups, but the last prune saw {}; refusing to prune",
            before.unwrap_or(0)
        ))
        .hint("check the repository url, prefix and credentials before anything else (RUNBOOK.md#prune-refused)"));
    }
    Ok(())
}

/// Object Lock outranks the rules: a backup still locked stays, and the plan says until when.
async fn honour_object_lock(
    repo: &crate::repo::Repository,
    name: &str,
    decisions: &mut [Decision],
) -> crate::Result<()> {
    use crate::error::Error;
    for d in decisions.iter_mut().filter(|d| !d.keep) {
        if let Some(until) = repo
            .store
            .locked_until(&crate::repo::layout::manifest(name, &d.id))
            .await
            .map_err(|e| Error::from(e).context("reading object lock retention"))?
        {
            d.keep = true;
            d.reasons = vec![format!(
                "object lock until {}",
                until.format("%Y-%m-%d %H:%M UTC")
            )];
        }
    }
    Ok(())
}

/// Applies `plan`: each doomed backup's manifest first, then its objects and reports, then
/// interrupted runs and unfinished uploads older than [`GRACE`], all under the `prune-<source>`
/// lease checked before every deletion; then what the kind collects, planned again now that those
/// backups are gone.
pub async fn apply_prune(
    repo: &crate::repo::Repository,
    policy: &crate::policy::Policy,
    source: &crate::policy::SourcePolicy,
    plan: PrunePlan,
) -> crate::Result<PruneReport> {
    let PrunePlan {
        mut report,
        stale_incomplete,
        now,
    } = plan;
    let grace = chrono::Duration::from_std(GRACE).unwrap_or_default();
    let state_key = crate::repo::layout::prune_state(&source.name);
    report.applied = true;
    apply(
        repo,
        &source.name,
        &mut report,
        &stale_incomplete,
        now - grace,
        &state_key,
        now,
    )
    .await?;
    let none = std::collections::HashSet::new();
    report.collected = match source
        .config
        .plan_shared_collection(repo, &source.name, policy, now, &none)
        .await?
    {
        Some(c) => Some(c.apply(repo).await?),
        None => None,
    };
    Ok(report)
}

/// Deletes what `report` decided, under the `prune-<source>` lease: each doomed backup's manifest
/// first, then its objects and reports; then stale interrupted runs and unfinished uploads older
/// than `cutoff`; then records how many backups are kept.
async fn apply(
    repo: &crate::repo::Repository,
    name: &str,
    report: &mut PruneReport,
    stale_incomplete: &[String],
    cutoff: DateTime<Utc>,
    state_key: &str,
    now: DateTime<Utc>,
) -> crate::Result<()> {
    use crate::error::Error;
    use crate::repo::layout;
    let mut lease = repo
        .lease(
            &format!("prune-{name}"),
            "prune",
            std::time::Duration::from_secs(600),
        )
        .await?;
    let result = async {
        let doomed: Vec<String> = report
            .decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.id.clone())
            .collect();
        for id in doomed.iter().chain(stale_incomplete.iter()) {
            lease.check().await?;
            // The manifest first: from then on the backup no longer exists for anyone.
            let manifest = layout::manifest(name, id);
            repo.store.delete(&manifest).await.map_err(Error::from)?;
            report.deleted_objects.push(manifest);
            let objects = repo
                .store
                .list(&layout::backup_prefix(name, id))
                .await
                .map_err(Error::from)?;
            let reports = repo
                .store
                .list(&layout::backup_verifications_prefix(name, id))
                .await
                .map_err(Error::from)?;
            for o in objects.into_iter().chain(reports) {
                repo.store.delete(&o.key).await.map_err(Error::from)?;
                report.deleted_objects.push(o.key);
            }
        }
        // A server that cannot list unfinished uploads leaves them to its own lifecycle rule;
        // the prune itself is done.
        match crate::store::sweep_stale_uploads(repo.store.as_ref(), cutoff).await {
            Ok(aborted) => report.aborted_uploads = aborted,
            Err(crate::store::StoreError::Permanent {
                message,
                credential: false,
                ..
            }) => {
                tracing::warn!(source = %name, error = %message, "Unfinished uploads cannot be listed; none were swept");
                report.uploads_unlisted = Some(message);
            }
            Err(e) => return Err(Error::from(e)),
        }
        let kept = report.decisions.iter().filter(|d| d.keep).count();
        let state = serde_json::json!({ "backups": kept, "pruned_at": now });
        repo.store
            .put(state_key, bytes::Bytes::from(state.to_string()))
            .await
            .map_err(Error::from)?;
        Ok::<(), Error>(())
    }
    .await;
    let released = lease.release().await;
    result?;
    released?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn b(id: &str, t: &str) -> Candidate {
        Candidate {
            id: id.into(),
            started_at: at(t),
            verified: None,
            pinned: false,
        }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect()
    }

    /// Four backups a day, every 6 hours, for 40 days before `now`.
    fn history() -> (Vec<Candidate>, DateTime<Utc>) {
        let now = at("2026-11-27T12:00:00Z");
        let mut v = Vec::new();
        for h in (6..40 * 24).step_by(6) {
            let t = now - chrono::Duration::hours(h);
            v.push(Candidate {
                id: t.format("%Y%m%dT%H%M%SZ").to_string(),
                started_at: t,
                verified: None,
                pinned: false,
            });
        }
        (v, now)
    }

    #[test]
    fn an_empty_history_plans_nothing() {
        assert!(plan(
            &[],
            &Retention {
                keep_last: Some(1),
                ..Default::default()
            },
            &Utc,
            Utc::now()
        )
        .is_empty());
    }

    #[test]
    fn keep_last_keeps_exactly_n() {
        let (h, now) = history();
        let d = plan(
            &h,
            &Retention {
                keep_last: Some(3),
                ..Default::default()
            },
            &Utc,
            now,
        );
        assert_eq!(
            kept(&d),
            vec!["20261127T060000Z", "20261127T000000Z", "20261126T180000Z"]
        );
        assert_eq!(d[0].reasons, vec!["newest", "last 1"]);
        assert_eq!(d[3].reasons, vec!["no rule keeps it"]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_like_restic() {
        let (h, now) = history();
        let d = plan(
            &h,
            &Retention {
                keep_daily: Some(3),
                ..Default::default()
            },
            &Utc,
            now,
        );
        assert_eq!(
            kept(&d),
            vec!["20261127T060000Z", "20261126T180000Z", "20261125T180000Z"]
        );
        assert_eq!(d[0].reasons, vec!["newest", "daily 2026-11-27"]);
        assert_eq!(d[2].reasons, vec!["daily 2026-11-26"]);
    }

    #[test]
    fn buckets_are_counted_in_the_policy_time_zone() {
        // 23:30 UTC on the 26th is already the 27th in Berlin.
        let h = vec![
            b("late", "2026-11-26T23:30:00Z"),
            b("earlier", "2026-11-26T20:00:00Z"),
        ];
        let now = at("2026-11-27T12:00:00Z");
        let rules = Retention {
            keep_daily: Some(2),
            ..Default::default()
        };
        let utc = plan(&h, &rules, &Utc, now);
        assert_eq!(kept(&utc), vec!["late"], "one UTC day");
        let berlin = plan(&h, &rules, &chrono_tz::Europe::Berlin, now);
        assert_eq!(kept(&berlin), vec!["late", "earlier"], "two Berlin days");
        assert_eq!(berlin[0].reasons, vec!["newest", "daily 2026-11-27"]);
    }

    #[test]
    fn combined_rules_give_every_reason() {
        let (h, now) = history();
        let rules = Retention {
            keep_last: Some(2),
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(2),
            keep_within: Some(Duration::from_secs(36 * 3600)),
            ..Default::default()
        };
        let d = plan(&h, &rules, &Utc, now);
        let summary: Vec<String> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| format!("{} {}", d.id, d.reasons.join(", ")))
            .collect();
        insta::assert_snapshot!(summary.join("\n"), @r"
        20261127T060000Z newest, last 1, within 1day 12h, daily 2026-11-27, weekly 2026-W48, monthly 2026-11
        20261127T000000Z last 2, within 1day 12h
        20261126T180000Z within 1day 12h, daily 2026-11-26
        20261126T120000Z within 1day 12h
        20261126T060000Z within 1day 12h
        20261126T000000Z within 1day 12h
        20261125T180000Z daily 2026-11-25
        20261124T180000Z daily 2026-11-24
        20261123T180000Z daily 2026-11-23
        20261122T180000Z daily 2026-11-22, weekly 2026-W47
        20261121T180000Z daily 2026-11-21
        20261115T180000Z weekly 2026-W46
        20261108T180000Z weekly 2026-W45
        20261031T180000Z monthly 2026-10
        ");
    }

    #[test]
    fn pinned_and_newest_verified_are_never_deleted() {
        let mut h = vec![
            b("new", "2026-11-27T06:00:00Z"),
            b("verified-old", "2026-11-20T06:00:00Z"),
            b("pinned-old", "2026-11-10T06:00:00Z"),
            b("plain-old", "2026-11-05T06:00:00Z"),
        ];
        h[1].verified = Some(true);
        h[2].pinned = true;
        h[3].verified = Some(true);
        let d = plan(
            &h,
            &Retention {
                keep_last: Some(1),
                keep_last_verified: 1,
                ..Default::default()
            },
            &Utc,
            at("2026-11-27T12:00:00Z"),
        );
        assert_eq!(kept(&d), vec!["new", "verified-old", "pinned-old"]);
        assert_eq!(d[1].reasons, vec!["newest verified"]);
        assert_eq!(d[2].reasons, vec!["pinned"]);
    }

    #[test]
    fn nothing_is_deleted_while_the_newest_backup_failed_verification() {
        let mut h = vec![
            b("new", "2026-11-27T06:00:00Z"),
            b("old", "2026-11-01T06:00:00Z"),
        ];
        h[0].verified = Some(false);
        let d = plan(
            &h,
            &Retention {
                keep_last: Some(1),
                ..Default::default()
            },
            &Utc,
            at("2026-11-27T12:00:00Z"),
        );
        assert_eq!(kept(&d), vec!["new", "old"]);
        assert!(d[1].reasons[0].contains("failed verification"));
    }
}
