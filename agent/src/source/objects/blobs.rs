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
//! - Packs are kept like blobs, while any blob list names them. A pack that less than half of
//!   its bytes are named by its source's newest snapshot is noted (`state/repack.age`, sealed
//!   with the index key) when the collection is applied: the next backups store those contents
//!   again, from the source, into new packs, and the old pack goes once the snapshots naming it
//!   have. The note is rewritten by every applied collection that read every list.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::collect::{Collection, CollectionPlan, Keys};
use crate::error::{Error, Result};
use crate::policy::Secret;
use crate::repo::{layout, Repository};
use crate::sorted;
use crate::source::objects;

/// Unreferenced blobs younger than this are left alone.
pub const GRACE: std::time::Duration = crate::retention::GRACE;

/// Plans the collection of the blobs no published objects backup names, except the backups in
/// `ignoring` (source, id): those a prune is about to delete. Deletes nothing.
///
/// Memory stays bounded: the blob lists are sorted together on the temp disk, and merged in one
/// pass with the stored blobs, listed page by page in the same (key, hence id) order.
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
    let prefix = layout::blobs_prefix();
    let list = |after: Option<String>| {
        let prefix = &prefix;
        async move {
            repo.store
                .list_page(prefix, after.as_deref())
                .await
                .map_err(|e| Error::from(e).context("listing stored blobs"))
        }
    };
    let (mut page, mut more) = list(None).await?;
    let nothing = CollectionPlan::nothing;
    if page.is_empty() {
        return Ok(nothing(out));
    }
    let (referenced, used) = match referenced(repo, index_key, ignoring).await? {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(reason = %why, "Blob collection skipped");
            out.skipped = Some(why);
            return Ok(nothing(out));
        }
    };
    let sort_failed =
        |e: std::io::Error| Error::failed(format!("sorting blob ids on the temp disk: {e}"));
    let mut referenced =
        sorted::Cursor::new(referenced.iter().map_err(sort_failed)?).map_err(sort_failed)?;
    let cutoff = now - chrono::Duration::from_std(GRACE).unwrap_or_default();
    let mut doomed = Keys::default();
    let mut sparse = Vec::new();
    let mut last = None;
    loop {
        for o in &page {
            out.stored += 1;
            let Some(id) = o
                .key
                .rsplit('/')
                .next()
                .and_then(|n| n.strip_suffix(".age"))
                .and_then(objects::unhex32)
            else {
                continue;
            };
            // Only keys this layout writes, in the order the merge relies on: anything else
            // is never deleted, and a listing out of order stops the collection.
            if o.key != layout::blob(&hex::encode(id)) {
                continue;
            }
            if last.is_some_and(|l| l >= id) {
                let why = format!(
                    "the repository listed {} out of order; nothing was collected",
                    o.key
                );
                return Ok(refuse(out, why));
            }
            last = Some(id);
            if referenced.holds(&id).map_err(sort_failed)? {
                out.referenced += 1;
                if used.get(&id).is_some_and(|u| u.saturating_mul(2) < o.size) {
                    sparse.push(id);
                }
            } else if o.modified.is_some_and(|m| m < cutoff) {
                out.deleted += 1;
                out.deleted_bytes += o.size;
                doomed.push(o.key.clone()).map_err(|e| {
                    Error::failed(format!("noting the blobs to delete on the temp disk: {e}"))
                })?;
            } else {
                out.young += 1;
            }
        }
        match (more, page.last()) {
            (true, Some(last)) => (page, more) = list(Some(last.key.clone())).await?,
            _ => break,
        }
    }
    // Named but never listed: missing.
    out.missing = referenced.finish().map_err(sort_failed)?;
    out.referenced += out.missing;
    if out.referenced == 0 && !doomed.is_empty() {
        // Blobs but no snapshot naming any: a listing that came back wrong looks the same.
        let why = format!(
            "{} blobs are stored but no published objects backup names any; refusing to delete them all",
            out.stored
        );
        return Ok(refuse(out, why));
    }
    out.sparse = sparse.len() as u64;
    let note = sparse
        .iter()
        .map(|id| format!("{}\n", hex::encode(id)))
        .collect::<String>();
    let plan = match index_key {
        // No note when there is nothing to repack: the next backup's GET finds none.
        Some(key) => CollectionPlan::new(out, doomed, "blobs").with_note(
            layout::repack_note(),
            (!sparse.is_empty())
                .then(|| objects::seal(key, note.as_bytes()).map(Into::into))
                .transpose()?,
        ),
        None => CollectionPlan::new(out, doomed, "blobs"),
    };
    Ok(plan)
}

/// The packs the last applied collection found mostly unused (`state/repack.age`), which this
/// backup stores the contents of again; none when there is no note or it cannot be read.
pub(crate) async fn repack_note(
    store: &dyn crate::store::ObjectStore,
    key: &Secret,
) -> HashSet<sorted::Id> {
    let note = layout::repack_note();
    let sealed = match store.get(&note).await {
        Ok(b) => b,
        Err(crate::store::StoreError::NotFound { .. }) => return HashSet::new(),
        Err(e) => {
            tracing::debug!(error = %Error::from(e).message, "The repack note cannot be read: no pack is repacked");
            return HashSet::new();
        }
    };
    let Some(plain) = objects::unseal(key, &sealed) else {
        tracing::debug!("The repack note does not open with the index key: no pack is repacked");
        return HashSet::new();
    };
    String::from_utf8_lossy(&plain)
        .lines()
        .filter_map(objects::unhex32)
        .collect()
}

/// A plan that deletes nothing, saying why.
fn refuse(mut out: Collection, why: String) -> CollectionPlan {
    out.skipped = Some(why);
    out.deleted = 0;
    out.deleted_bytes = 0;
    CollectionPlan::nothing(out)
}

/// Blob lists merged at once into the union: each open list holds a zstd window and buffers
/// (about 2.5 MiB), and each pass reads and writes the whole union.
const LISTS_AT_ONCE: usize = 8;

/// Every blob and pack the published objects backups name, sorted on the temp disk, each once,
/// and the bytes of each pack that the newest backup of each source names; or why that cannot
/// be known. Blob lists are stored sorted: [`LISTS_AT_ONCE`] of them are streamed at a time
/// and merged with the union so far into a new one, so the temp disk holds each distinct id
/// once (twice during a pass), and the union is rewritten once per that many backups, not once
/// per backup.
async fn referenced(
    repo: &Repository,
    index_key: Option<&Secret>,
    ignoring: &HashSet<(String, String)>,
) -> Result<std::result::Result<(sorted::SortedFile, HashMap<sorted::Id, u64>), String>> {
    let sort_failed =
        |e: std::io::Error| Error::failed(format!("sorting blob ids on the temp disk: {e}"));
    let listing = repo.list(None).await?;
    if let Some((source, id, why)) = listing.damaged.first() {
        return Ok(Err(format!(
            "the manifest of {source}/{id} cannot be read ({why}); run `lifeboat check`"
        )));
    }
    let mut all = sorted::SortedWriter::new()
        .and_then(sorted::SortedWriter::finish)
        .map_err(sort_failed)?;
    let named: Vec<_> = listing
        .backups
        .iter()
        .map(|e| &e.manifest)
        .filter(|m| m.kind == crate::source::Kind::Objects)
        .filter(|m| !ignoring.contains(&(m.source.clone(), m.id.clone())))
        .collect();
    let mut used = HashMap::new();
    if named.is_empty() {
        return Ok(Ok((all, used)));
    }
    // The newest backup of each source: the next backup's index, whose packs are judged.
    let mut newest: HashMap<&str, &str> = HashMap::new();
    for m in &named {
        let id = newest.entry(m.source.as_str()).or_insert(m.id.as_str());
        if m.id.as_str() > *id {
            *id = m.id.as_str();
        }
    }
    let Some(key) = index_key else {
        return Ok(Err(
            "the policy sets no encryption.index_key, which blob lists are sealed with".into(),
        ));
    };
    let unreadable = |why: String| {
        format!("{why}; collection resumes once `lifeboat check` passes or that backup is pruned")
    };
    for batch in named.chunks(LISTS_AT_ONCE) {
        let mut lists = Vec::with_capacity(batch.len());
        for m in batch {
            match objects::BlobList::open(repo, m, key).await? {
                Ok(list) if newest.get(m.source.as_str()) == Some(&m.id.as_str()) => {
                    lists.push(list.counting_packs())
                }
                Ok(list) => lists.push(list),
                Err(why) => return Ok(Err(unreadable(why))),
            }
        }
        // A k-way merge of the lists, smallest id first, each id added once.
        let mut heads = std::collections::BinaryHeap::new();
        for (i, list) in lists.iter_mut().enumerate() {
            match list.next_object().await? {
                Ok(Some(id)) => heads.push(std::cmp::Reverse((id, i))),
                Ok(None) => {}
                Err(why) => return Ok(Err(unreadable(why))),
            }
        }
        let mut union = sorted::Union::new(Some(&all)).map_err(sort_failed)?;
        let mut last = None;
        while let Some(std::cmp::Reverse((id, i))) = heads.pop() {
            if last != Some(id) {
                union.add(id).map_err(sort_failed)?;
                last = Some(id);
            }
            match lists[i].next_object().await? {
                Ok(Some(next)) => heads.push(std::cmp::Reverse((next, i))),
                Ok(None) => {}
                Err(why) => return Ok(Err(unreadable(why))),
            }
        }
        all = union.finish().map_err(sort_failed)?;
        for list in &mut lists {
            for (pack, bytes) in list.packed_bytes() {
                *used.entry(pack).or_default() += bytes;
            }
        }
    }
    Ok(Ok((all, used)))
}
