//! Listing and finding backups. A backup exists when its manifest does; a backup directory without
//! a manifest is an interrupted run, reported as incomplete and never offered for restore.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::layout;
use super::manifest::Manifest;
use super::origin::{Change, Lineage};
use super::signing::{self, Seal};
use super::Repository;
use crate::error::{Error, ErrorKind, Result};

/// (source, backup id).
type BackupKey = (String, String);

/// An object's key, and when the repository stored it.
type Stored = (String, Option<DateTime<Utc>>);

/// Manifests and verification reports read at once while listing.
const READS_AT_ONCE: usize = 16;

/// The latest verification of a backup.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verification {
    /// `pass` or `fail`.
    pub result: String,
    /// The report's id (sortable by time).
    pub id: String,
    /// Measured restore time, seconds: the data and the indexes.
    pub restore_seconds: Option<f64>,
    /// Each phase of the verification, as its report gives them.
    pub timings: Option<crate::verify::Timings>,
    /// Whether its scratch server ran without network; `Some(false)`: it ran uncontained.
    pub contained: Option<bool>,
}

/// One backup as listed.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its latest verification, if any.
    pub verification: Option<Verification>,
    /// Who published it.
    pub seal: Seal,
    /// Whether it was taken from the same source as the backup before it.
    pub lineage: Lineage,
}

impl Entry {
    /// True when the latest verification passed.
    pub fn verified(&self) -> bool {
        self.verification
            .as_ref()
            .is_some_and(|v| v.result == "pass")
    }

    /// A change of origin from the backup before it, judged against the source's `moved_at`.
    pub fn origin_change(&self, moved_at: Option<DateTime<Utc>>) -> Option<Change> {
        let m = &self.manifest;
        self.lineage
            .change(m.origin.as_ref(), m.started_at, moved_at)
    }
}

/// What a listing found.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Complete backups, newest first.
    pub backups: Vec<Entry>,
    /// `backups/<source>/<id>/` directories with objects but no manifest.
    pub incomplete: Vec<(String, String)>,
    /// Backups whose manifest is damaged: (source, id, what is wrong). Not offered for restore;
    /// `lifeboat check` names them, and the rest of the listing stays usable.
    pub damaged: Vec<(String, String, String)>,
    /// Verification reports no trusted key signed: (key, why). Never counted.
    pub untrusted_reports: Vec<(String, String)>,
}

impl Repository {
    /// Lists the backups of `source` (or of every source), newest first.
    pub async fn list(&self, source: Option<&str>) -> Result<Listing> {
        let prefix = match source {
            Some(s) => layout::source_prefix(s),
            None => layout::backups_prefix(),
        };
        let objects = self
            .store
            .list(&prefix)
            .await
            .map_err(|e| Error::from(e).context("listing backups"))?;
        let reports = self.list_verifications(source).await?;
        // Manifests and reports are read through the sources' catalog caches.
        let reads = std::sync::Arc::new(
            super::cache::Reads::load(self.store.as_ref(), &[&objects, &reports]).await,
        );
        let this = self.reading_through(reads.clone());
        let listing = this.list_read(objects, reports).await;
        drop(this);
        if let Some(reads) = std::sync::Arc::into_inner(reads) {
            reads.save(self.store.as_ref()).await;
        }
        listing
    }

    /// [`Repository::list`] over what was listed.
    async fn list_read(
        &self,
        objects: Vec<crate::store::ObjectInfo>,
        reports: Vec<crate::store::ObjectInfo>,
    ) -> Result<Listing> {
        // (source, id) → when its manifest was stored, if it has one.
        let mut dirs: BTreeMap<(String, String), Option<Option<DateTime<Utc>>>> = BTreeMap::new();
        for o in &objects {
            if let Some((s, id, name)) = layout::parse_backup_key(&o.key) {
                let has = dirs.entry((s.to_string(), id.to_string())).or_insert(None);
                if name == layout::MANIFEST {
                    *has = Some(o.modified);
                }
            }
        }
        let (mut verifications, untrusted_reports) = self.judge_verifications(&reports).await?;
        let mut listing = Listing {
            untrusted_reports,
            ..Listing::default()
        };
        // Manifests are read [`READS_AT_ONCE`] at a time: one after another, a source with
        // thousands of backups took a minute to list from S3 (a round trip each).
        let mut read = futures::stream::iter(dirs)
            .map(|((s, id), stored)| -> futures::future::BoxFuture<'_, _> {
                // Boxed: the daemon's spawned loops must be Send for every lifetime.
                Box::pin(async move {
                    let read = match stored {
                        Some(stored) => Some(self.sealed_manifest(&s, &id, stored).await),
                        None => None,
                    };
                    (s, id, read)
                })
            })
            .buffered(READS_AT_ONCE);
        while let Some((s, id, read)) = read.next().await {
            let (manifest, seal) = match read {
                None => {
                    listing.incomplete.push((s, id));
                    continue;
                }
                Some(Ok(m)) => m,
                Some(Err(e)) if e.kind == ErrorKind::Integrity => {
                    listing.damaged.push((s, id, e.message));
                    continue;
                }
                Some(Err(e)) => return Err(e),
            };
            let verification = verifications.remove(&(s.clone(), id.clone()));
            listing.backups.push(Entry {
                manifest,
                verification,
                seal,
                lineage: Lineage::Unrecorded,
            });
        }
        listing.backups.sort_by(|a, b| {
            (b.manifest.started_at, &b.manifest.id).cmp(&(a.manifest.started_at, &a.manifest.id))
        });
        trace_lineage(&mut listing.backups);
        Ok(listing)
    }

    /// Reads and parses one manifest; its object names must be plain names inside the backup,
    /// and a trusted key must have signed it (when the policy has `[signing]`).
    pub async fn manifest(&self, source: &str, id: &str) -> Result<Manifest> {
        Ok(self.sealed_manifest(source, id, None).await?.0)
    }

    /// [`Repository::manifest`], with who published it. `stored` is when the repository stored
    /// the manifest, when a listing said.
    pub async fn sealed_manifest(
        &self,
        source: &str,
        id: &str,
        stored: Option<DateTime<Utc>>,
    ) -> Result<(Manifest, Seal)> {
        let key = layout::manifest(source, id);
        let (bytes, seal) = self.read_signed(&key, stored).await.map_err(|e| match e {
            super::ReadSignedError::Store(crate::store::StoreError::NotFound { .. }) => Error::new(
                ErrorKind::Failed,
                format!("no backup {id} of source {source} (no {key})"),
            )
            .hint("`lifeboat list` shows the backups there are"),
            super::ReadSignedError::Store(other) => {
                Error::from(other).context(format!("reading {key}"))
            }
            super::ReadSignedError::Judged(e) => e,
        })?;
        Ok((parse_manifest(&key, &bytes, source, id)?, seal))
    }

    /// Finds a backup of `source`: `latest`, an id, or the newest started before `before`.
    /// A requested id whose directory has objects but no manifest is an integrity failure.
    pub async fn find(
        &self,
        source: &str,
        backup: &str,
        before: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Entry> {
        let listing = self.list(Some(source)).await?;
        let found = listing.backups.into_iter().find(|e| {
            let m = &e.manifest;
            (backup == "latest" || m.id == backup) && before.is_none_or(|b| m.started_at < b)
        });
        if let Some(e) = found {
            return Ok(e);
        }
        if let Some((_, _, why)) = listing
            .damaged
            .iter()
            .find(|(s, id, _)| s == source && id == backup)
        {
            return Err(Error::new(ErrorKind::Integrity, why.clone())
                .hint("use another backup; `lifeboat check` lists the damage (RUNBOOK.md#integrity-failure)"));
        }
        if listing
            .incomplete
            .iter()
            .any(|(s, id)| s == source && id == backup)
        {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!("backup {backup} of source {source} has objects but no manifest: an interrupted run or a deleted manifest"),
            )
            .hint("it cannot be trusted; pick another with `lifeboat list` (RUNBOOK.md#integrity-failure)"));
        }
        let what = match (backup, before) {
            ("latest", None) => format!("no backups of source {source}"),
            ("latest", Some(b)) => format!("no backup of source {source} started before {b}"),
            (id, _) => format!("no backup {id} of source {source}"),
        };
        Err(Error::failed(what).hint("`lifeboat list` shows the backups there are"))
    }

    /// The latest trusted verification of every backup of `source` (or all), by (source, id),
    /// and the reports no trusted key signed, with why.
    pub async fn verifications(
        &self,
        source: Option<&str>,
    ) -> Result<(
        BTreeMap<(String, String), Verification>,
        Vec<(String, String)>,
    )> {
        let reports = self.list_verifications(source).await?;
        self.judge_verifications(&reports).await
    }

    /// The verification reports of `source` (or of every source), as listed.
    async fn list_verifications(
        &self,
        source: Option<&str>,
    ) -> Result<Vec<crate::store::ObjectInfo>> {
        let prefix = match source {
            Some(s) => layout::verifications_prefix(s),
            None => layout::all_verifications_prefix(),
        };
        self.store
            .list(&prefix)
            .await
            .map_err(|e| Error::from(e).context("listing verification reports"))
    }

    /// The latest trusted report of each backup among `objects`, and those no trusted key
    /// signed.
    async fn judge_verifications(
        &self,
        objects: &[crate::store::ObjectInfo],
    ) -> Result<(
        BTreeMap<(String, String), Verification>,
        Vec<(String, String)>,
    )> {
        // Keys sort by verify id, which sorts by time: the last trusted one per backup is the
        // latest.
        let mut reports: BTreeMap<BackupKey, Vec<Stored>> = BTreeMap::new();
        for o in objects {
            if signing::is_signature(&o.key) {
                continue;
            }
            if let Some((s, id)) = layout::parse_verification_key(&o.key) {
                reports
                    .entry((s.to_string(), id.to_string()))
                    .or_default()
                    .push((o.key.clone(), o.modified));
            }
        }
        let mut out = BTreeMap::new();
        let mut untrusted = Vec::new();
        // Each backup's reports newest first, until one is trusted; backups READS_AT_ONCE at a
        // time.
        let mut read = futures::stream::iter(reports)
            .map(|(k, keys)| -> futures::future::BoxFuture<'_, _> {
                Box::pin(async move {
                    let mut untrusted = Vec::new();
                    for (key, modified) in keys.into_iter().rev() {
                        match self.read_signed(&key, modified).await {
                            Ok((body, _)) => return Ok((k, Some(body), untrusted)),
                            Err(super::ReadSignedError::Judged(e))
                                if e.kind == ErrorKind::Integrity =>
                            {
                                untrusted.push((key, e.message));
                            }
                            Err(e) => return Err(Error::from(e)),
                        }
                    }
                    Ok((k, None, untrusted))
                })
            })
            .buffered(READS_AT_ONCE);
        while let Some(r) = read.next().await {
            let (k, trusted, mut rejected) = r?;
            untrusted.append(&mut rejected);
            let Some(report) = trusted else { continue };
            let v: serde_json::Value = serde_json::from_slice(&report).unwrap_or_default();
            let timings: Option<crate::verify::Timings> =
                serde_json::from_value(v["timings"].clone()).ok();
            out.insert(
                k,
                Verification {
                    result: v["result"].as_str().unwrap_or("unreadable").to_string(),
                    id: v["verify_id"].as_str().unwrap_or("").to_string(),
                    restore_seconds: timings.as_ref().map(|t| t.restore_total()),
                    timings,
                    contained: v["contained"].as_bool(),
                },
            );
        }
        Ok((out, untrusted))
    }
}

/// Sets each backup's lineage: its origin against the one before it of the same source, over
/// backups sorted newest first.
fn trace_lineage(backups: &mut [Entry]) {
    let mut by_source: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, e) in backups.iter().enumerate().rev() {
        by_source
            .entry(e.manifest.source.clone())
            .or_default()
            .push(i);
    }
    for oldest_first in by_source.values() {
        let lineage = Lineage::of(oldest_first.iter().map(|&i| {
            let m = &backups[i].manifest;
            (m.id.as_str(), m.started_at, m.origin.as_ref())
        }));
        for (&i, l) in oldest_first.iter().zip(lineage) {
            backups[i].lineage = l;
        }
    }
}

/// A plain object name: one path segment, no separators, not `.` or `..`.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
}

/// Parses the manifest stored at `key`, which must describe backup `source`/`id` and name only
/// plain objects inside that backup. Bytes from the repository are untrusted: anything else is
/// an integrity error, never a panic.
pub fn parse_manifest(key: &str, bytes: &[u8], source: &str, id: &str) -> Result<Manifest> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| {
        Error::new(ErrorKind::Integrity, format!("{key} is not a valid manifest: {e}"))
            .hint("the manifest is damaged; use another backup and run `lifeboat check` (RUNBOOK.md#integrity-failure)")
    })?;
    if let Some((name, _, _)) = m.objects().into_iter().find(|(n, _, _)| !plain_name(n)) {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("{key} names an object outside its backup: {name:?}"),
        )
        .hint(
            "the manifest was tampered with; use another backup (RUNBOOK.md#integrity-failure)",
        ));
    }
    if m.source != source || m.id != id {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{key} describes backup {}/{}, not {source}/{id}",
                m.source, m.id
            ),
        )
        .hint("the manifest was moved or tampered with (RUNBOOK.md#integrity-failure)"));
    }
    Ok(m)
}
