//! What `lifeboat check` reads of an objects backup beyond its manifest's objects: the blobs its
//! snapshot names. With an identity, the snapshot is decrypted and every blob it names must be
//! stored (and, with `--read-data`, decrypt to its recorded SHA-256); with only the index key, the
//! blob list says which blobs and packs must be stored. A blob or pack named by several
//! snapshots is checked once: backups are checked oldest first, and a later snapshot names no
//! content of a pack that the snapshot before it did not (a run finds contents only through the
//! last published snapshot), so the oldest backup naming a pack names all that any names.

use futures::{StreamExt, TryStreamExt};

use crate::check::Context;
use crate::error::{ErrorKind, Result};
use crate::repo::layout;
use crate::repo::manifest::{Manifest, Role};
use crate::restore::{self, NoProgress};
use crate::sorted;

use super::ContentRecord;

/// Checks the blobs `manifest`'s snapshot names, recording each damaged or missing one. The
/// names come sorted from the temp disk and are merged with those checked for earlier backups
/// (also sorted there): memory does not grow with the number of blobs.
pub async fn check_blobs(ctx: &mut Context<'_>, manifest: &Manifest) -> Result<()> {
    let Some(named) = named_blobs(ctx, manifest).await? else {
        return Ok(());
    };
    if ctx.read_data && ctx.keys.identities.is_none() {
        ctx.report.notes.push(
            "objects blobs were checked for presence only: re-hashing them needs the identity (--identity or LIFEBOAT_IDENTITY_FILE)".into(),
        );
    }
    let sort_failed =
        |e: std::io::Error| crate::Error::failed(format!("sorting blob ids on the temp disk: {e}"));
    // The union of what earlier backups named and what this one names, for the next.
    let earlier = ctx.blobs_checked.take();
    let mut union = sorted::Union::new(earlier.as_ref()).map_err(sort_failed)?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut rehash = ctx.keys.identities.is_some();
    let contents = super::restore::Contents::new(ctx.repo.store.clone());
    let (mut last, mut object, mut fresh) = (None, None, false);
    for named in named {
        let named: ContentRecord = named.map_err(sort_failed)?;
        if last == Some(named) {
            continue;
        }
        last = Some(named);
        let id: sorted::Id = named[..32].try_into().unwrap_or_default();
        let first = object != Some(id);
        if first {
            object = Some(id);
            // Not fresh: checked for an earlier backup.
            fresh = union.add(id).map_err(sort_failed)?;
        }
        let (stored, sha) = super::record_parts(&named);
        // A pack's presence is asked once; with `--read-data`, each content of it is read,
        // until the identity turns out not to open them.
        let read_each = ctx.read_data && rehash && matches!(stored, super::Stored::Packed(_));
        if !fresh || !(first || read_each) {
            continue;
        }
        batch.push((stored, sha));
        if batch.len() == BATCH {
            check_batch(ctx, manifest, &contents, &mut batch, &mut rehash).await?;
        }
    }
    check_batch(ctx, manifest, &contents, &mut batch, &mut rehash).await?;
    ctx.blobs_checked = Some(union.finish().map_err(sort_failed)?);
    Ok(())
}

/// Blobs checked at a time, [`CONCURRENCY`] at once: a store's latency is paid in parallel.
const BATCH: usize = 256;

/// Blobs checked at once.
const CONCURRENCY: usize = 8;

/// What checking one blob found.
enum Found {
    Missing,
    /// Stored, of this size; and, when it was read, what reading it said.
    Stored(u64, Option<Result<u64>>),
}

/// Checks the contents of `batch` (where stored, content SHA-256 when known), emptying it:
/// each must be stored and, with `--read-data` and an identity, decrypt to its SHA-256. A
/// content in a pack that is read is not asked for first: reading it finds it missing.
/// `rehash` turns false when the identity does not open a blob (the rest are checked for
/// presence only).
async fn check_batch(
    ctx: &mut Context<'_>,
    manifest: &Manifest,
    contents: &super::restore::Contents,
    batch: &mut Vec<(super::Stored, Option<String>)>,
    rehash: &mut bool,
) -> Result<()> {
    let store = contents.store();
    let identities = ctx
        .keys
        .identities
        .as_deref()
        .filter(|_| ctx.read_data && *rehash);
    let found: Vec<Result<(String, Found)>> = futures::stream::iter(batch.drain(..))
        .map(|(stored, sha)| async move {
            let key = stored.key();
            let read = |identities, sha: String| {
                let stored = &stored;
                async move {
                    let mut sink = tokio::io::sink();
                    super::restore::fetch_blob(contents, stored, &sha, identities, &mut sink).await
                }
            };
            if let (super::Stored::Packed(p), Some(identities), Some(sha)) =
                (&stored, identities, sha.clone())
            {
                let got = read(identities, sha).await;
                return Ok((stored.describe(), Found::Stored(p.len, Some(got))));
            }
            let Some(size) = store.size(&key).await.map_err(crate::Error::from)? else {
                return Ok((key, Found::Missing));
            };
            let read = match (identities, sha) {
                (Some(identities), Some(sha)) => Some(read(identities, sha).await),
                _ => None,
            };
            Ok((key, Found::Stored(size, read)))
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    for f in found {
        let (key, found) = f?;
        ctx.report.objects += 1;
        match found {
            Found::Missing => ctx.problem(manifest, key, "missing (named by the snapshot)".into()),
            Found::Stored(_, None) => {}
            Found::Stored(size, Some(Ok(_))) => ctx.report.bytes_read += size,
            Found::Stored(_, Some(Err(e))) if e.kind == ErrorKind::Credential => {
                if *rehash {
                    ctx.report.notes.push(format!(
                        "backup {} of {}: the identity does not open blob {key}; its blobs were not re-hashed",
                        manifest.id, manifest.source
                    ));
                }
                *rehash = false;
            }
            Found::Stored(_, Some(Err(e))) => ctx.problem(manifest, key, e.message),
        }
    }
    Ok(())
}

/// The blobs the backup names, with their content SHA-256 when the snapshot could be read;
/// `None` (with a note or a problem recorded) when neither key is there or what names them is
/// damaged.
async fn named_blobs(ctx: &mut Context<'_>, m: &Manifest) -> Result<Option<sorted::Merged<80>>> {
    let sort_failed =
        |e: std::io::Error| crate::Error::failed(format!("sorting blob ids on the temp disk: {e}"));
    let mut named = sorted::Sorter::<80>::default();
    if let Some(identities) = &ctx.keys.identities {
        let Ok(part) = restore::part(m, Role::Snapshot) else {
            ctx.problem(
                m,
                layout::manifest(&m.source, &m.id),
                "names no snapshot".into(),
            );
            return Ok(None);
        };
        let read = async {
            let spooled =
                restore::spool(ctx.repo, m, part, &std::env::temp_dir(), &NoProgress).await?;
            let snapshot = super::restore::Snapshot::new(spooled, identities, None);
            let mut entries = std::pin::pin!(snapshot.entries());
            while let Some(e) = entries.try_next().await? {
                if let Some(r) = super::content_record(&e)? {
                    named.push(r).map_err(sort_failed)?;
                }
            }
            Ok::<(), crate::Error>(())
        };
        return match read.await {
            Ok(()) => Ok(Some(named.merged().map_err(sort_failed)?)),
            Err(e) if e.kind == ErrorKind::Credential => {
                ctx.report.notes.push(format!(
                    "backup {} of {}: the identity does not open its snapshot (another policy's keys?); its blobs were not checked",
                    m.id, m.source
                ));
                Ok(None)
            }
            Err(e) => {
                let key = layout::backup_object(&m.source, &m.id, &part.name);
                ctx.problem(m, key, e.message);
                Ok(None)
            }
        };
    }
    let Some(index_key) = &ctx.keys.index_key else {
        ctx.report.notes.push(
            "objects blobs were not checked: that needs the identity (--identity or LIFEBOAT_IDENTITY_FILE) or encryption.index_key".into(),
        );
        return Ok(None);
    };
    let listed = super::read_blob_list(ctx.repo, m, index_key, |id| {
        named.push(super::object_record(id))
    })
    .await?;
    match listed {
        Ok(_) => Ok(Some(named.merged().map_err(sort_failed)?)),
        Err(why) => {
            // A list sealed with another policy's index key, most likely; a damaged one is
            // named by the manifest's own check.
            ctx.report.notes.push(format!(
                "backup {} of {}: its blob list cannot be read ({why}); its blobs were not checked",
                m.id, m.source
            ));
            Ok(None)
        }
    }
}
