//! Verifying an objects backup, the steps the verifier's skeleton runs: the snapshot's integrity
//! first, then every blob it names is downloaded, decrypted and re-hashed against the snapshot,
//! and the tree's hash against the fingerprint taken at capture. Nothing is written anywhere but
//! the report.

use std::collections::BTreeMap;
use std::time::Instant;

use async_trait::async_trait;

use super::{EntryKind, Fingerprint};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::{Manifest, Role};
use crate::repo::Repository;
use crate::verify::{spool_and_fingerprint, Check, Context, Report, Steps, Verdict};

/// The objects steps, and what they found.
#[derive(Default)]
pub struct ObjectsSteps {
    snapshot: Option<(Vec<super::Entry>, Fingerprint)>,
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
        let entries = super::restore::read_snapshot(&spooled, ctx.identities).await?;
        report.timings.download_seconds = t0.elapsed().as_secs_f64();
        self.snapshot = Some((entries, fp));
        Ok(())
    }

    async fn restore_and_check(
        &mut self,
        ctx: &Context<'_>,
        report: &mut Report,
    ) -> Result<Verdict> {
        let Some((entries, fp)) = &self.snapshot else {
            return Err(Error::failed(
                "verification steps out of order: nothing prepared",
            ));
        };
        rehash(ctx, entries, fp, report).await
    }

    async fn teardown(&mut self) {
        self.snapshot = None;
    }
}

/// Every blob the snapshot names (or the day's share of them) re-hashed, the snapshot's counts
/// and tree hash against the fingerprint, and its blob list against the snapshot.
async fn rehash(
    ctx: &Context<'_>,
    entries: &[super::Entry],
    fp: &Fingerprint,
    report: &mut Report,
) -> Result<Verdict> {
    let (repo, identities) = (ctx.repo, ctx.identities);
    let cover_days = ctx.source.verify.cover_days;
    let index_key = ctx.policy.encryption.index_key.as_ref();
    let files = entries.iter().filter(|e| e.kind == EntryKind::File).count() as u64;
    report.checks.push(Check::eq(
        "files in the snapshot",
        fp.files.to_string(),
        files.to_string(),
    ));
    report.checks.push(Check::eq(
        "symlinks in the snapshot",
        fp.symlinks.to_string(),
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
            .count()
            .to_string(),
    ));
    report.checks.push(Check::eq(
        "tree SHA-256",
        fp.tree_sha256.clone(),
        super::tree_sha256(entries),
    ));
    // Each distinct blob once, with the content hash the snapshot expects of it.
    let all: BTreeMap<&str, &str> = entries
        .iter()
        .filter_map(|e| Some((e.blob.as_deref()?, e.sha256.as_deref()?)))
        .collect();
    // The blob list is what blob collection keeps: it must name every blob the snapshot needs.
    match index_key {
        Some(key) => {
            let check = blob_list_check(repo, &ctx.entry.manifest, key, &all).await;
            report.checks.push(check);
        }
        None => report
            .notes
            .push("blob list not checked: the policy has no encryption.index_key".into()),
    }
    // A rolling sample: blob ids are uniform, so their first 32 bits split them into
    // `cover_days` even groups, and today's group is re-hashed; every blob once per cycle.
    let blobs: BTreeMap<&str, &str> = match cover_days {
        Some(n) if n > 1 => {
            let today = (chrono::Utc::now().timestamp() / 86_400) as u64 % u64::from(n);
            let picked: BTreeMap<&str, &str> = all
                .iter()
                .filter(|(id, _)| {
                    u64::from_str_radix(id.get(..8).unwrap_or("0"), 16).unwrap_or(0) % u64::from(n)
                        == today
                })
                .map(|(k, v)| (*k, *v))
                .collect();
            report.notes.push(format!(
                "rolling sample, day {} of {n}: {} of {} blobs re-hashed; every blob is covered every {n} days",
                today + 1,
                picked.len(),
                all.len()
            ));
            picked
        }
        _ => all,
    };
    let t1 = Instant::now();
    let mut failed = Vec::new();
    for (id, sha) in &blobs {
        let mut sink = tokio::io::sink();
        if let Err(e) =
            super::restore::fetch_blob(repo.store.as_ref(), id, sha, identities, &mut sink).await
        {
            if e.kind == ErrorKind::Credential {
                return Err(e);
            }
            failed.push(e.message);
        }
    }
    report.timings.restore_seconds = t1.elapsed().as_secs_f64();
    let want = format!("{} of {} match", blobs.len(), blobs.len());
    if !failed.is_empty() {
        let found = format!("{} of {} match", blobs.len() - failed.len(), blobs.len());
        report
            .checks
            .push(Check::failed("blobs re-hashed", want, found));
        // Damaged stored content is an integrity failure (exit 13), as for any other object.
        let e = Error::new(ErrorKind::Integrity, failed.join("\n  "))
            .hint("restore from another backup; the damaged blobs are named above (RUNBOOK.md#integrity-failure)");
        return Err(e);
    }
    report
        .checks
        .push(Check::eq("blobs re-hashed", want.clone(), want));
    Ok(Verdict::Checked)
}

/// The backup's blob list against the blobs its snapshot names.
async fn blob_list_check(
    repo: &Repository,
    m: &Manifest,
    key: &crate::policy::Secret,
    all: &BTreeMap<&str, &str>,
) -> Check {
    let name = "blob list names every blob of the snapshot";
    let want = format!("{} blobs", all.len());
    let Some(part) = m.parts.iter().find(|p| p.role == Role::BlobList) else {
        return Check::failed(name, want, "no blob list in the manifest".to_string());
    };
    let object = crate::repo::layout::backup_object(&m.source, &m.id, &part.name);
    let listed = match repo.store.get(&object).await {
        Ok(bytes) => super::parse_blob_list(key, &bytes),
        Err(e) => Err(e.to_string()),
    };
    match listed {
        Ok(ids) => {
            let ids: std::collections::BTreeSet<&str> = ids.iter().map(String::as_str).collect();
            let missing = all.keys().filter(|id| !ids.contains(*id)).count();
            if missing == 0 {
                Check::eq(name, want.clone(), want)
            } else {
                Check::failed(name, want, format!("{missing} of them not in {object}"))
            }
        }
        Err(why) => Check::failed(name, want, format!("{object}: {why}")),
    }
}
