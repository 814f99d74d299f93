//! Verifying an objects backup, the steps the verifier's skeleton runs: the snapshot's integrity
//! first, then every blob it names is downloaded, decrypted and re-hashed against the snapshot,
//! and the tree's hash against the fingerprint taken at capture. Nothing is written anywhere but
//! the report.

use std::time::Instant;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::restore::Snapshot;
use super::{EntryKind, Fingerprint};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::{Manifest, Role};
use crate::repo::Repository;
use crate::restore::Spooled;
use crate::sorted;
use crate::verify::{spool_and_fingerprint, Check, Context, Report, Steps, Verdict};

/// The objects steps, and what they found.
#[derive(Default)]
pub struct ObjectsSteps {
    snapshot: Option<(Spooled, Fingerprint)>,
}

#[async_trait(?Send)]
impl Steps for ObjectsSteps {
    fn restore_check(&self) -> (&'static str, &'static str) {
        ("blobs re-hashed", "every blob matches")
    }

    async fn prepare(&mut self, ctx: &Context<'_>, report: &mut Report) -> Result<()> {
        let t0 = Instant::now();
        report.scratch = "none: blobs are re-hashed in memory".into();
        let (spooled, fp): (_, Fingerprint) = spool_and_fingerprint(ctx, Role::Snapshot).await?;
        report.timings.download_seconds = t0.elapsed().as_secs_f64();
        self.snapshot = Some((spooled, fp));
        Ok(())
    }

    async fn restore_and_check(
        &mut self,
        ctx: &Context<'_>,
        report: &mut Report,
    ) -> Result<Verdict> {
        let Some((spooled, fp)) = self.snapshot.take() else {
            return Err(Error::failed(
                "verification steps out of order: nothing prepared",
            ));
        };
        let snapshot = Snapshot::new(spooled, ctx.identities, None);
        rehash(ctx, &snapshot, &fp, report).await
    }

    async fn teardown(&mut self) {
        self.snapshot = None;
    }
}

/// What one read of the snapshot finds: its counts, its tree hash, and each blob it names.
struct Read {
    files: u64,
    symlinks: u64,
    tree: Sha256,
    blobs: sorted::Sorter<80>,
}

/// Reads the snapshot once, as a stream.
async fn read(snapshot: &Snapshot<'_>) -> Result<Read> {
    let mut r = Read {
        files: 0,
        symlinks: 0,
        tree: Sha256::new(),
        blobs: sorted::Sorter::default(),
    };
    let mut entries = std::pin::pin!(snapshot.entries());
    while let Some(e) = entries.try_next().await? {
        super::tree_line(&mut r.tree, &e);
        match e.kind {
            EntryKind::File => r.files += 1,
            EntryKind::Symlink => r.symlinks += 1,
            EntryKind::Dir => {}
        }
        if e.sha256.is_none() {
            continue;
        }
        let Some(named) = super::content_record(&e)? else {
            continue;
        };
        r.blobs
            .push(named)
            .map_err(|e| Error::failed(format!("sorting blob ids on the temp disk: {e}")))?;
    }
    Ok(r)
}

/// Every blob the snapshot names (or the day's share of them) re-hashed, the snapshot's counts
/// and tree hash against the fingerprint, and its blob list against the snapshot. The snapshot
/// is read once as a stream, and its blobs come back from the temp disk sorted, each once.
async fn rehash(
    ctx: &Context<'_>,
    snapshot: &Snapshot<'_>,
    fp: &Fingerprint,
    report: &mut Report,
) -> Result<Verdict> {
    let repo = ctx.repo;
    let cover_days = ctx.source.verify.cover_days;
    let index_key = ctx.policy.encryption.index_key.as_ref();
    let read = read(snapshot).await?;
    report.checks.push(Check::eq(
        "files in the snapshot",
        fp.files.to_string(),
        read.files.to_string(),
    ));
    report.checks.push(Check::eq(
        "symlinks in the snapshot",
        fp.symlinks.to_string(),
        read.symlinks.to_string(),
    ));
    report.checks.push(Check::eq(
        "tree SHA-256",
        fp.tree_sha256.clone(),
        hex::encode(read.tree.finalize()),
    ));
    let sort_failed =
        |e: std::io::Error| Error::failed(format!("sorting blob ids on the temp disk: {e}"));
    // The blob list is what blob collection keeps: it must name every blob the snapshot needs.
    let mut listed = match index_key {
        Some(key) => Some(blob_list(repo, &ctx.entry.manifest, key).await?),
        None => {
            report
                .notes
                .push("blob list not checked: the policy has no encryption.index_key".into());
            None
        }
    };
    // A rolling sample: blob and pack ids are uniform, so their first 32 bits split them into
    // `cover_days` even groups, and today's group is re-hashed; every blob once per cycle (a
    // pack's contents on the same day).
    let sample = cover_days.filter(|n| *n > 1).map(|n| {
        let today = (chrono::Utc::now().timestamp() / 86_400) as u64 % u64::from(n);
        (u64::from(n), today)
    });
    let t1 = Instant::now();
    let (mut all, mut objects, mut picked, mut missing) = (0u64, 0u64, 0u64, 0u64);
    let mut failed = Failed::default();
    let mut batch = Vec::with_capacity(BATCH);
    let contents = super::restore::Contents::new(repo.store.clone());
    let mut last: Option<[u8; 32]> = None;
    for named in read.blobs.merged().map_err(sort_failed)? {
        let named: super::ContentRecord = named.map_err(sort_failed)?;
        let id: [u8; 32] = named[..32].try_into().unwrap_or_default();
        // A blob named with two content hashes comes twice: both are re-hashed (one fails).
        all += 1;
        if last != Some(id) {
            last = Some(id);
            objects += 1;
            if let Some(Ok(list)) = &mut listed {
                if !list.holds(&id).map_err(sort_failed)? {
                    missing += 1;
                }
            }
        }
        let first32 = u64::from(u32::from_be_bytes([id[0], id[1], id[2], id[3]]));
        if sample.is_some_and(|(n, today)| first32 % n != today) {
            continue;
        }
        picked += 1;
        let (stored, sha) = super::record_parts(&named);
        batch.push((stored, sha.unwrap_or_default()));
        if batch.len() == BATCH {
            rehash_batch(ctx, &contents, &mut batch, &mut failed).await?;
        }
    }
    rehash_batch(ctx, &contents, &mut batch, &mut failed).await?;
    report.timings.restore_seconds = t1.elapsed().as_secs_f64();
    if let Some(listed) = listed {
        let (name, want) = (
            "blob list names every blob and pack of the snapshot",
            format!("{objects} blobs and packs"),
        );
        report.checks.push(match listed {
            Ok(_) if missing == 0 => Check::eq(name, want.clone(), want),
            Ok(_) => Check::failed(
                name,
                want,
                format!("{missing} of them not in the blob list"),
            ),
            Err(why) => Check::failed(name, want, why),
        });
    }
    if let Some((n, today)) = sample {
        report.notes.push(format!(
            "rolling sample, day {} of {n}: {picked} of {all} blobs re-hashed; every blob is covered every {n} days",
            today + 1,
        ));
    }
    let want = format!("{picked} of {picked} match");
    if failed.count > 0 {
        let found = format!("{} of {picked} match", picked - failed.count);
        report
            .checks
            .push(Check::failed("blobs re-hashed", want, found));
        let mut named = failed.named;
        if failed.count > named.len() as u64 {
            named.push(format!(
                "and {} more blob(s)",
                failed.count - named.len() as u64
            ));
        }
        // Damaged stored content is an integrity failure (exit 13), as for any other object.
        let e = Error::new(ErrorKind::Integrity, named.join("\n  "))
            .hint("restore from another backup; the damaged blobs are named above (RUNBOOK.md#integrity-failure)");
        return Err(e);
    }
    report
        .checks
        .push(Check::eq("blobs re-hashed", want.clone(), want));
    Ok(Verdict::Checked)
}

/// Blobs re-hashed at a time: fetched [`CONCURRENCY`] at once, so that the stores' latency is
/// paid in parallel, and never more than this many held.
const BATCH: usize = 256;

/// Blobs fetched at once.
const CONCURRENCY: usize = 8;

/// Re-hash failures: the first [`FAILED_NAMED`] named, all counted.
#[derive(Default)]
struct Failed {
    named: Vec<String>,
    count: u64,
}

/// Failures named in the report; the rest are counted.
const FAILED_NAMED: usize = 100;

/// Re-hashes the contents of `batch` (where stored, content SHA-256), emptying it; a credential
/// error (the identity does not open them) ends the verification.
async fn rehash_batch(
    ctx: &Context<'_>,
    contents: &super::restore::Contents,
    batch: &mut Vec<(super::Stored, String)>,
    failed: &mut Failed,
) -> Result<()> {
    let identities = ctx.identities;
    let results: Vec<Result<u64>> = futures::stream::iter(batch.drain(..))
        .map(|(stored, sha)| async move {
            let mut sink = tokio::io::sink();
            super::restore::fetch_blob(contents, &stored, &sha, identities, &mut sink).await
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    for e in results.into_iter().filter_map(Result::err) {
        if e.kind == ErrorKind::Credential {
            return Err(e);
        }
        failed.count += 1;
        if failed.named.len() < FAILED_NAMED {
            failed.named.push(e.message);
        }
    }
    Ok(())
}

/// The backup's blob list, sorted on the temp disk, or why it cannot be read.
async fn blob_list(
    repo: &Repository,
    m: &Manifest,
    key: &crate::policy::Secret,
) -> Result<std::result::Result<sorted::Cursor<sorted::Merged>, String>> {
    let sort_failed =
        |e: std::io::Error| Error::failed(format!("sorting blob ids on the temp disk: {e}"));
    let mut sorter = sorted::Sorter::default();
    if let Err(why) = super::read_blob_list(repo, m, key, |id| sorter.push(id)).await? {
        return Ok(Err(why));
    }
    let merged = sorter.merged().map_err(sort_failed)?;
    Ok(Ok(sorted::Cursor::new(merged).map_err(sort_failed)?))
}
