//! `lifeboat check`: every manifest against the objects it names; with `read_data`, every stored
//! byte re-hashed against the manifest's SHA-256.
//!
//! Each kind may look further than its manifest's objects (an objects backup's blobs: see
//! `SourceKind::check_more`).
//!
//! A check never stops at the first problem: it reports every damaged backup, each with the object
//! key, so an operator knows which backups are still good to restore.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::error::{Error, ErrorKind, Result};
use crate::repo::signing::Seal;
use crate::repo::{layout, Repository};
use crate::store::StoreError;

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Source name.
    pub source: String,
    /// Backup id.
    pub backup: String,
    /// Object key.
    pub object: String,
    /// What is wrong.
    pub detail: String,
}

/// What a check found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// The requests made of the repository, by S3 billing class.
    pub requests: crate::store::counted::RequestCounts,
    /// Backups whose manifest was read.
    pub backups: usize,
    /// Objects checked.
    pub objects: usize,
    /// Stored bytes re-hashed.
    pub bytes_read: u64,
    /// Damaged objects and manifests.
    pub problems: Vec<Problem>,
    /// Manifests stored unsigned before `signing.unsigned_before`: restorable, marked `unsigned`.
    pub unsigned: Vec<String>,
    /// Backup directories without a manifest (interrupted runs; invisible, swept by prune).
    pub incomplete: Vec<String>,
    /// Unfinished multipart uploads.
    pub pending_uploads: Vec<String>,
    /// Why unfinished uploads could not be listed (a server without ListMultipartUploads);
    /// absent when they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploads_unlisted: Option<String>,
    /// What could not be checked, and why (e.g. blobs without an identity).
    pub notes: Vec<String>,
}

/// The keys a check may use beyond the stored bytes' hashes: with an identity an objects
/// backup's snapshot is read and every blob it names re-hashed; with only the index key its
/// blob list says which blobs must exist.
#[derive(Default)]
pub struct Keys {
    /// age identities that decrypt the backups.
    pub identities: Option<Vec<Box<dyn age::Identity + Send + Sync>>>,
    /// The policy's `encryption.index_key`.
    pub index_key: Option<crate::policy::Secret>,
}

/// What a kind's further check works with.
pub struct Context<'a> {
    /// The repository.
    pub repo: &'a Repository,
    /// Re-hash stored bytes, not only sizes.
    pub read_data: bool,
    /// The keys there are.
    pub keys: &'a Keys,
    /// What was found so far.
    pub report: &'a mut CheckReport,
    /// Shared objects already checked in this run (a WAL segment named by many backups is
    /// read once).
    pub seen: std::collections::HashSet<String>,
    /// Blobs already checked in this run (a blob named by many snapshots is read once), sorted
    /// on the temp disk.
    pub blobs_checked: Option<crate::sorted::SortedFile>,
}

impl Context<'_> {
    /// Records a problem with `object` of the backup `manifest`.
    pub fn problem(
        &mut self,
        manifest: &crate::repo::manifest::Manifest,
        object: String,
        detail: String,
    ) {
        self.report.problems.push(Problem {
            source: manifest.source.clone(),
            backup: manifest.id.clone(),
            object,
            detail,
        });
    }
}

impl CheckReport {
    /// Exit 13 naming the damaged objects, if there are any.
    pub fn into_result(self) -> Result<CheckReport> {
        if self.problems.is_empty() {
            return Ok(self);
        }
        let list: Vec<String> = self
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.object, p.detail))
            .collect();
        Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{} problem{} in the repository:\n  {}",
                list.len(),
                if list.len() == 1 { "" } else { "s" },
                list.join("\n  ")
            ),
        )
        .hint("restore from a backup not listed here, and find out what damaged the storage (RUNBOOK.md#integrity-failure)"))
    }
}

/// Checks the backups of `source` (or all). `read_data` re-hashes every stored byte.
pub async fn check(
    repo: &Repository,
    source: Option<&str>,
    read_data: bool,
    keys: &Keys,
) -> Result<CheckReport> {
    let prefix = source
        .map(layout::source_prefix)
        .unwrap_or_else(layout::backups_prefix);
    let objects = repo
        .store
        .list(&prefix)
        .await
        .map_err(|e| Error::from(e).context("listing backups"))?;
    let mut dirs: BTreeSet<(String, String)> = BTreeSet::new();
    let mut with_manifest = std::collections::BTreeMap::new();
    for o in &objects {
        if let Some((s, id, name)) = layout::parse_backup_key(&o.key) {
            dirs.insert((s.to_string(), id.to_string()));
            if name == layout::MANIFEST {
                with_manifest.insert((s.to_string(), id.to_string()), o.modified);
            }
        }
    }
    let mut report = CheckReport::default();
    let mut seen = std::collections::HashSet::new();
    let mut blobs_checked = None;
    for (s, id) in &dirs {
        let Some(stored) = with_manifest.get(&(s.clone(), id.clone())) else {
            report.incomplete.push(layout::backup_prefix(s, id));
            continue;
        };
        let manifest = match repo.sealed_manifest(s, id, *stored).await {
            Ok((m, seal)) => {
                if seal == Seal::Legacy {
                    report.unsigned.push(layout::manifest(s, id));
                }
                m
            }
            Err(e) if e.kind == ErrorKind::Integrity => {
                report.problems.push(Problem {
                    source: s.clone(),
                    backup: id.clone(),
                    object: layout::manifest(s, id),
                    detail: e.message,
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        report.backups += 1;
        check_objects(repo, &manifest, read_data, &mut report).await?;
        let mut ctx = Context {
            repo,
            read_data,
            keys,
            report: &mut report,
            seen: std::mem::take(&mut seen),
            blobs_checked: blobs_checked.take(),
        };
        manifest.kind.check_more(&mut ctx, &manifest).await?;
        (seen, blobs_checked) = (ctx.seen, ctx.blobs_checked);
    }
    for (key, detail) in repo.verifications(source).await?.1 {
        let (s, id) = layout::parse_verification_key(&key).unwrap_or_default();
        report.problems.push(Problem {
            source: s.to_string(),
            backup: id.to_string(),
            object: key.clone(),
            detail,
        });
    }
    report.notes.dedup();
    // Only the sweep needs this listing: a server that cannot give it leaves the rest checked.
    match repo.store.pending_uploads().await {
        Ok(uploads) => report.pending_uploads = uploads.into_iter().map(|u| u.key).collect(),
        Err(StoreError::Permanent {
            message,
            credential: false,
            ..
        }) => report.uploads_unlisted = Some(message),
        Err(e) => return Err(Error::from(e).context("listing unfinished uploads")),
    }
    Ok(report)
}

/// Every object `manifest` names: present, of its size, and with `read_data` of its SHA-256.
async fn check_objects(
    repo: &Repository,
    manifest: &crate::repo::manifest::Manifest,
    read_data: bool,
    report: &mut CheckReport,
) -> Result<()> {
    let (s, id) = (&manifest.source, &manifest.id);
    for (name, size, sha) in manifest.objects() {
        let key = layout::backup_object(s, id, name);
        report.objects += 1;
        let problem = |detail: String| Problem {
            source: s.clone(),
            backup: id.clone(),
            object: key.clone(),
            detail,
        };
        match repo.store.size(&key).await.map_err(Error::from)? {
            None => {
                report.problems.push(problem("missing".into()));
                continue;
            }
            Some(n) if n != size => {
                report
                    .problems
                    .push(problem(format!("size {n} bytes, the manifest says {size}")));
                continue;
            }
            Some(_) => {}
        }
        if read_data {
            let (n, digest) = hash_object(repo, &key).await?;
            report.bytes_read += n;
            if digest != sha {
                report.problems.push(problem(format!(
                    "SHA-256 {digest}, the manifest says {sha}"
                )));
            } else if n != size {
                report
                    .problems
                    .push(problem(format!("read {n} bytes, the manifest says {size}")));
            }
        }
    }
    Ok(())
}

/// Streams an object and returns its size and SHA-256.
pub async fn hash_object(repo: &Repository, key: &str) -> Result<(u64, String)> {
    let mut r = repo
        .store
        .open(key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let got = r
            .read(&mut buf)
            .await
            .map_err(|e| Error::failed(format!("reading {key}: {e}")))?;
        if got == 0 {
            break;
        }
        hasher.update(&buf[..got]);
        n += got as u64;
    }
    Ok((n, hex::encode(hasher.finalize())))
}
