//! `lifeboat check`: manifests against stored objects; `--read-data` re-hashes every stored byte.

use lifeboat::human_bytes;
use lifeboat::repo::Repository;
use lifeboat::{check, Error, Result};

use super::note_unknown_source;

/// Checks, and prints what it found (exit 13 naming every damaged object).
pub async fn check_cmd(
    policy: lifeboat::policy::Policy,
    source: Option<&str>,
    read_data: bool,
    identity: Option<std::path::PathBuf>,
    json: bool,
) -> Result<()> {
    if let Some(s) = source {
        note_unknown_source(&policy, s);
    }
    let (repo, requests) = Repository::open(&policy).await?.counted();
    // An identity given here must open; the policy's may be absent where check runs.
    let mut unread = None;
    let identities = match (identity, &policy.encryption.identity_file) {
        (Some(f), _) => Some(lifeboat::pipeline::read_identities(&f)?),
        (None, Some(f)) => match lifeboat::pipeline::read_identities(f) {
            Ok(i) => Some(i),
            Err(e) => {
                unread = Some(format!("encryption.identity_file not used: {e}"));
                None
            }
        },
        (None, None) => None,
    };
    let keys = check::Keys {
        identities,
        index_key: policy.encryption.index_key.clone(),
    };
    let mut report = check::check(&repo, source, read_data, &keys).await?;
    report.requests = requests.counts();
    report.notes.extend(unread);
    warn_object_lock(&policy, &repo).await;
    if json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::failed(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else {
        eprintln!(
            "checked {} backup(s), {} object(s){}",
            report.backups,
            report.objects,
            if read_data {
                format!(", {} re-hashed", human_bytes(report.bytes_read))
            } else {
                String::new()
            }
        );
        for u in &report.unsigned {
            eprintln!("note: {u} is unsigned, stored before signing.unsigned_before: taken before signing existed");
        }
        for i in &report.incomplete {
            eprintln!("note: {i} has no manifest: an interrupted run, not a backup");
        }
        for u in &report.pending_uploads {
            eprintln!("note: unfinished upload of {u}");
        }
        if let Some(why) = &report.uploads_unlisted {
            eprintln!("warning: unfinished uploads were not listed, the server refused: {why} (RUNBOOK.md#storage-errors)");
        }
        for n in &report.notes {
            eprintln!("note: {n}");
        }
    }
    report.into_result().map(|r| {
        if !json {
            eprintln!(
                "no problems found{}",
                if read_data {
                    ""
                } else {
                    " (sizes only; --read-data re-hashes)"
                }
            );
        }
        drop(r)
    })
}

/// Warns when the policy's `object_lock` and the bucket's Object Lock disagree.
async fn warn_object_lock(policy: &lifeboat::policy::Policy, repo: &Repository) {
    if let lifeboat::policy::Location::S3(s3) = &policy.repository.location {
        match (repo.store.lock_enabled().await, s3.object_lock) {
            (Ok(Some(false)), Some(_)) => eprintln!(
                "warning: repository.object_lock is set but the bucket {} has Object Lock disabled: backups will fail to upload; create the bucket with Object Lock or remove object_lock",
                s3.bucket
            ),
            (Ok(Some(true)), None) => eprintln!(
                "warning: the bucket {} has Object Lock enabled but the policy sets no object_lock: only the bucket's default retention, if any, protects backups; set repository.object_lock to make it explicit",
                s3.bucket
            ),
            (Err(e), _) => eprintln!("warning: cannot read the bucket's Object Lock configuration: {e}"),
            _ => {}
        }
    }
}
