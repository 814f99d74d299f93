//! Listing and finding backups. A backup exists when its manifest does; a backup directory without
//! a manifest is an interrupted run, reported as incomplete and never offered for restore.

use std::collections::{BTreeMap, BTreeSet};

use super::layout;
use super::manifest::Manifest;
use super::Repository;
use crate::error::{Error, ErrorKind, Result};

/// One backup as listed.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its manifest.
    pub manifest: Manifest,
    /// Whether a passing verification report exists for it.
    pub verified: bool,
}

/// What a listing found.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Complete backups, newest first.
    pub backups: Vec<Entry>,
    /// `backups/<source>/<id>/` directories with objects but no manifest.
    pub incomplete: Vec<(String, String)>,
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
        let mut dirs: BTreeMap<(String, String), bool> = BTreeMap::new();
        for o in &objects {
            if let Some((s, id, name)) = layout::parse_backup_key(&o.key) {
                let has = dirs.entry((s.to_string(), id.to_string())).or_insert(false);
                *has |= name == layout::MANIFEST;
            }
        }
        let verified = self.verified_backups(source).await?;
        let mut listing = Listing::default();
        for ((s, id), has_manifest) in dirs {
            if !has_manifest {
                listing.incomplete.push((s, id));
                continue;
            }
            let manifest = self.manifest(&s, &id).await?;
            let verified = verified.contains(&(s.clone(), id.clone()));
            listing.backups.push(Entry { manifest, verified });
        }
        listing.backups.sort_by(|a, b| {
            (b.manifest.started_at, &b.manifest.id).cmp(&(a.manifest.started_at, &a.manifest.id))
        });
        Ok(listing)
    }

    /// Reads and parses one manifest.
    pub async fn manifest(&self, source: &str, id: &str) -> Result<Manifest> {
        let key = layout::manifest(source, id);
        let bytes = self.store.get(&key).await.map_err(|e| match e {
            crate::store::StoreError::NotFound { .. } => Error::new(
                ErrorKind::Failed,
                format!("no backup {id} of source {source} (no {key})"),
            )
            .hint("`lifeboat list` shows the backups there are"),
            other => Error::from(other).context(format!("reading {key}")),
        })?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(ErrorKind::Integrity, format!("{key} is not a valid manifest: {e}"))
                .hint("the manifest is damaged; use another backup and run `lifeboat check` (RUNBOOK.md#integrity-failure)")
        })?;
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

    /// (source, id) of every backup with a passing verification report.
    async fn verified_backups(&self, source: Option<&str>) -> Result<BTreeSet<(String, String)>> {
        let prefix = match source {
            Some(s) => layout::verifications_prefix(s),
            None => "verifications/".to_string(),
        };
        let objects = self
            .store
            .list(&prefix)
            .await
            .map_err(|e| Error::from(e).context("listing verification reports"))?;
        let mut out = BTreeSet::new();
        for o in objects {
            let mut it = o
                .key
                .strip_prefix("verifications/")
                .unwrap_or("")
                .splitn(3, '/');
            if let (Some(s), Some(id), Some(_)) = (it.next(), it.next(), it.next()) {
                if out.contains(&(s.to_string(), id.to_string())) {
                    continue;
                }
                let report = self.store.get(&o.key).await.map_err(Error::from)?;
                let passed = serde_json::from_slice::<serde_json::Value>(&report)
                    .ok()
                    .and_then(|v| {
                        v.get("result")
                            .and_then(|r| r.as_str())
                            .map(|r| r == "pass")
                    })
                    .unwrap_or(false);
                if passed {
                    out.insert((s.to_string(), id.to_string()));
                }
            }
        }
        Ok(out)
    }
}
