//! What `lifeboat check` reads of an objects backup beyond its manifest's objects: the blobs its
//! snapshot names. With an identity, the snapshot is decrypted and every blob it names must be
//! stored (and, with `--read-data`, decrypt to its recorded SHA-256); with only the index key, the
//! blob list says which blobs must be stored. A blob named by several snapshots is read once.

use super::{parse_blob_list, BLOB_LIST_OBJECT};
use crate::check::Context;
use crate::error::{ErrorKind, Result};
use crate::repo::layout;
use crate::repo::manifest::{Manifest, Role};
use crate::restore::{self, NoProgress};

/// Checks the blobs `manifest`'s snapshot names, recording each damaged or missing one.
pub async fn check_blobs(ctx: &mut Context<'_>, manifest: &Manifest) -> Result<()> {
    let Some(blobs) = named_blobs(ctx, manifest).await? else {
        return Ok(());
    };
    if ctx.read_data && ctx.keys.identities.is_none() {
        ctx.report.notes.push(
            "objects blobs were checked for presence only: re-hashing them needs the identity (--identity or LIFEBOAT_IDENTITY_FILE)".into(),
        );
    }
    for (id, sha) in blobs {
        if !ctx.seen.insert(id.clone()) {
            continue;
        }
        let key = layout::blob(&id);
        ctx.report.objects += 1;
        let Some(size) = ctx
            .repo
            .store
            .size(&key)
            .await
            .map_err(crate::Error::from)?
        else {
            ctx.problem(manifest, key, "missing (named by the snapshot)".into());
            continue;
        };
        let (Some(identities), Some(sha), true) = (&ctx.keys.identities, sha, ctx.read_data) else {
            continue;
        };
        let mut sink = tokio::io::sink();
        match super::restore::fetch_blob(ctx.repo.store.as_ref(), &id, &sha, identities, &mut sink)
            .await
        {
            Ok(_) => ctx.report.bytes_read += size,
            Err(e) if e.kind == ErrorKind::Credential => {
                ctx.report.notes.push(format!(
                    "backup {} of {}: the identity does not open blob {key}; its blobs were not re-hashed",
                    manifest.id, manifest.source
                ));
                return Ok(());
            }
            Err(e) => ctx.problem(manifest, key, e.message),
        }
    }
    Ok(())
}

/// The blobs the backup names, with their content SHA-256 when the snapshot could be read;
/// `None` (with a note or a problem recorded) when neither key is there or what names them is
/// damaged.
async fn named_blobs(
    ctx: &mut Context<'_>,
    m: &Manifest,
) -> Result<Option<Vec<(String, Option<String>)>>> {
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
            super::restore::read_snapshot(&spooled, identities).await
        };
        return match read.await {
            Ok(entries) => Ok(Some(
                entries
                    .into_iter()
                    .filter_map(|e| e.blob.map(|b| (b, e.sha256)))
                    .collect(),
            )),
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
    let key = layout::backup_object(&m.source, &m.id, BLOB_LIST_OBJECT);
    let listed = match ctx.repo.store.get(&key).await {
        Ok(bytes) => parse_blob_list(index_key, &bytes),
        Err(e) => Err(e.to_string()),
    };
    match listed {
        Ok(ids) => Ok(Some(ids.into_iter().map(|id| (id, None)).collect())),
        Err(why) => {
            // Present and of its recorded hash (checked with the manifest's objects): a list
            // sealed with another policy's index key, most likely.
            ctx.report.notes.push(format!(
                "backup {} of {}: its blob list cannot be read ({why}); its blobs were not checked",
                m.id, m.source
            ));
            Ok(None)
        }
    }
}
