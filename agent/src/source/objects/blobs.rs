//! Blob collection: deleting the objects-source blobs that no published snapshot names.
//!
//! What must hold:
//! - A blob named by the blob list of any published objects backup in the repository stays,
//!   whichever source or policy wrote it. The lists are read, not the snapshots, so the agent
//!   (which holds the index key but no identity) can collect.
//! - When any objects backup's blob list cannot be read (missing, damaged, sealed with another
//!   index key, or a manifest that cannot be read at all), nothing is collected: an unread list
//!   may name any blob. The report says which backup stopped it.
//! - A blob written less than [`GRACE`] ago stays: it may belong to a backup still running.
//!   Backups reuse only the blobs their source's last published snapshot names (which retention
//!   never deletes) and upload anything else again, which renews an old blob's age. So a blob
//!   old enough to collect is one no running backup relies on.
//! - Deletions run under the `blobs` lease, checked before each one.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::collect::{Collection, CollectionPlan};
use crate::error::{Error, Result};
use crate::policy::Secret;
use crate::repo::manifest::Role;
use crate::repo::{layout, Repository};
use crate::source::objects;

/// Unreferenced blobs younger than this are left alone.
pub const GRACE: std::time::Duration = crate::retention::GRACE;

/// Plans the collection of the blobs no published objects backup names, except the backups in
/// `ignoring` (source, id): those a prune is about to delete. Deletes nothing.
pub async fn plan(
    repo: &Repository,
    index_key: Option<&Secret>,
    now: DateTime<Utc>,
    ignoring: &HashSet<(String, String)>,
) -> Result<CollectionPlan> {
    let mut out = Collection {
        what: "blobs",
        referenced_as: "named by snapshots",
        ..Collection::default()
    };
    let stored = repo
        .store
        .list(&layout::blobs_prefix())
        .await
        .map_err(|e| Error::from(e).context("listing stored blobs"))?;
    out.stored = stored.len() as u64;
    let nothing = CollectionPlan::nothing;
    if stored.is_empty() {
        return Ok(nothing(out));
    }
    let referenced = match referenced(repo, index_key, ignoring).await? {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(reason = %why, "Blob collection skipped");
            out.skipped = Some(why);
            return Ok(nothing(out));
        }
    };
    out.referenced = referenced.len() as u64;
    let cutoff = now - chrono::Duration::from_std(GRACE).unwrap_or_default();
    let mut doomed = Vec::new();
    let mut present = HashSet::new();
    for o in &stored {
        let Some(id) = o
            .key
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_suffix(".age"))
        else {
            continue;
        };
        present.insert(id);
        if referenced.contains(id) {
            continue;
        }
        if o.modified.is_some_and(|m| m < cutoff) {
            out.deleted += 1;
            out.deleted_bytes += o.size;
            doomed.push(o.key.clone());
        } else {
            out.young += 1;
        }
    }
    out.missing = referenced
        .iter()
        .filter(|id| !present.contains(id.as_str()))
        .count() as u64;
    if referenced.is_empty() && !doomed.is_empty() {
        // Blobs but no snapshot naming any: a listing that came back wrong looks the same.
        out.skipped = Some(format!(
            "{} blobs are stored but no published objects backup names any; refusing to delete them all",
            out.stored
        ));
        out.deleted = 0;
        out.deleted_bytes = 0;
        return Ok(nothing(out));
    }
    Ok(CollectionPlan::new(out, doomed, "blobs"))
}

/// Every blob the published objects backups name, or why that cannot be known.
async fn referenced(
    repo: &Repository,
    index_key: Option<&Secret>,
    ignoring: &HashSet<(String, String)>,
) -> Result<std::result::Result<BTreeSet<String>, String>> {
    let listing = repo.list(None).await?;
    if let Some((source, id, why)) = listing.damaged.first() {
        return Ok(Err(format!(
            "the manifest of {source}/{id} cannot be read ({why}); run `lifeboat check`"
        )));
    }
    let mut all = BTreeSet::new();
    for e in listing
        .backups
        .iter()
        .filter(|e| e.manifest.kind == crate::source::Kind::Objects)
    {
        let m = &e.manifest;
        if ignoring.contains(&(m.source.clone(), m.id.clone())) {
            continue;
        }
        let Some(key) = index_key else {
            return Ok(Err(
                "the policy sets no encryption.index_key, which blob lists are sealed with".into(),
            ));
        };
        let Some(part) = m.parts.iter().find(|p| p.role == Role::BlobList) else {
            return Ok(Err(format!(
                "backup {}/{} has no blob list (written by an older version); collection resumes once it is pruned",
                m.source, m.id
            )));
        };
        let object = layout::backup_object(&m.source, &m.id, &part.name);
        let bytes = match repo.store.get(&object).await {
            Ok(b) => b,
            Err(crate::store::StoreError::NotFound { .. }) => {
                return Ok(Err(format!("{object} is missing; run `lifeboat check`")))
            }
            Err(e) => return Err(Error::from(e).context(format!("reading {object}"))),
        };
        if hex::encode(Sha256::digest(&bytes)) != part.sha256_stored {
            return Ok(Err(format!(
                "{object} does not match its manifest; run `lifeboat check`"
            )));
        }
        match objects::parse_blob_list(key, &bytes) {
            Ok(ids) => all.extend(ids),
            Err(why) => return Ok(Err(format!("{object}: {why}"))),
        }
    }
    Ok(Ok(all))
}
