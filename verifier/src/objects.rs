//! Verifying an objects backup: the snapshot's integrity first, then every blob it names is
//! downloaded, decrypted and re-hashed against the snapshot, and the tree's hash against the
//! fingerprint taken at capture. Nothing is written anywhere but the report.

use std::collections::BTreeMap;
use std::time::Instant;

use lifeboat::repo::catalog::Entry;
use lifeboat::repo::Repository;
use lifeboat::source::objects::{self, EntryKind, Fingerprint};
use lifeboat::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use crate::checks::Check;
use crate::report::Report;
use crate::verify::{conclude, fail_and_store, new_report, spool_and_fingerprint, Identities};

/// Verifies `entry` of an objects source.
pub async fn verify(
    repo: &Repository,
    cover_days: Option<u32>,
    index_key: Option<&lifeboat::policy::Secret>,
    entry: &Entry,
    identities: &Identities,
    cancel: &CancellationToken,
) -> Result<Report> {
    let (mut report, t0) = new_report(entry);
    report.scratch = "none: blobs are re-hashed in memory".into();
    let (mut report, spooled, fp): (_, _, Fingerprint) = spool_and_fingerprint(
        repo,
        entry,
        lifeboat::repo::manifest::Role::Snapshot,
        identities,
        cancel,
        report,
    )
    .await?;
    let entries = match objects::restore::read_snapshot(&spooled, identities).await {
        Ok(e) => e,
        Err(e) => return Err(fail_and_store(repo, report, e).await),
    };
    report.timings.download_seconds = t0.elapsed().as_secs_f64();
    let files = entries.iter().filter(|e| e.kind == EntryKind::File).count() as u64;
    report.checks.push(Check::eq(
        "files in the snapshot",
        fp.files.to_string(),
        files.to_string(),
    ));
    report.checks.push(Check::eq(
        "tree SHA-256",
        fp.tree_sha256.clone(),
        objects::tree_sha256(&entries),
    ));
    // Each distinct blob once, with the content hash the snapshot expects of it.
    let all: BTreeMap<&str, &str> = entries
        .iter()
        .filter_map(|e| Some((e.blob.as_deref()?, e.sha256.as_deref()?)))
        .collect();
    // The blob list is what blob collection keeps: it must name every blob the snapshot needs.
    match index_key {
        Some(key) => {
            let check = blob_list_check(repo, &entry.manifest, key, &all).await;
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
        if cancel.is_cancelled() {
            return Err(Error::new(ErrorKind::Interrupted, "interrupted"));
        }
        let mut sink = tokio::io::sink();
        if let Err(e) =
            objects::restore::fetch_blob(repo.store.as_ref(), id, sha, identities, &mut sink).await
        {
            if e.kind == ErrorKind::Credential {
                return Err(fail_and_store(repo, report, e).await);
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
        return Err(fail_and_store(repo, report, e).await);
    }
    report
        .checks
        .push(Check::eq("blobs re-hashed", want.clone(), want));
    conclude(repo, report, t0).await
}

/// The backup's blob list against the blobs its snapshot names.
async fn blob_list_check(
    repo: &Repository,
    m: &lifeboat::repo::manifest::Manifest,
    key: &lifeboat::policy::Secret,
    all: &BTreeMap<&str, &str>,
) -> Check {
    let name = "blob list names every blob of the snapshot";
    let want = format!("{} blobs", all.len());
    let Some(part) = m
        .parts
        .iter()
        .find(|p| p.role == lifeboat::repo::manifest::Role::BlobList)
    else {
        return Check::failed(name, want, "no blob list in the manifest".to_string());
    };
    let object = lifeboat::repo::layout::backup_object(&m.source, &m.id, &part.name);
    let listed = match repo.store.get(&object).await {
        Ok(bytes) => objects::parse_blob_list(key, &bytes),
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
