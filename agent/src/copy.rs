//! Copies to a second repository (DESIGN.md "Second repositories"): the stored bytes as they are,
//! so no key is needed and nothing is re-encrypted.
//!
//! What must hold:
//! - A backup becomes visible at a copy only once every object it names is there and checked.
//!   Each object is hashed as it is read from the primary and must match its manifest; it is
//!   written to the copy, read back there and hashed again; the manifest (the primary's own
//!   bytes) is written last. Shared content (blobs, WAL) goes before the manifests that need it.
//! - A copy holds what its own retention keeps: a backup its rules would not keep is not copied,
//!   so catching up never brings back what the copy's prune deleted. Nothing here deletes, so the
//!   copy's writer needs no delete permission.
//! - An interrupted copy aborts its multipart upload; objects already written stay invisible (no
//!   manifest) until the next catch-up completes them, or the copy's prune sweeps them.
//! - Damage a listing shows at the copy (an object missing, of the wrong size, or rewritten after
//!   its manifest) is copied again by the next catch-up, and the manifest written last again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::policy::{CopyConfig, Policy, SourcePolicy};
use crate::repo::catalog::Entry;
use crate::repo::lock::Lease;
use crate::repo::manifest::Manifest;
use crate::repo::{layout, signing, Repository};
use crate::retention::{self, Candidate};
use crate::store::{self, ObjectInfo};

/// How long a copy's lease lasts unless renewed (it is, before each manifest written).
const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// How long `lifeboat list` waits for a copy to say what it holds.
const LIST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Small objects (blobs, WAL segments) copied at once.
const SHARED_AT_ONCE: usize = 4;

/// Content a kind shares between backups that a copy needs: the objects under `prefix` to copy.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Where they are (`objects/`, `wal/<source>/`); the copy is listed there once.
    pub prefix: String,
    /// The primary's objects the copy must hold.
    pub objects: Vec<ObjectInfo>,
}

impl Shared {
    /// The objects under `prefix` at `repo` whose key `wanted` accepts.
    pub async fn listed(
        repo: &Repository,
        prefix: String,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Shared> {
        let objects = repo
            .store
            .list(&prefix)
            .await
            .map_err(|e| Error::from(e).context(format!("listing {prefix}")))?
            .into_iter()
            .filter(|o| wanted(&o.key))
            .collect();
        Ok(Shared { prefix, objects })
    }
}

/// What one catch-up did for one source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceCopy {
    /// The source.
    pub source: String,
    /// Backups copied now, oldest first.
    pub copied: Vec<String>,
    /// Objects of backups already at the copy that were missing or damaged there and were
    /// copied again.
    pub repaired: Vec<String>,
    /// Backups the copy already held intact.
    pub present: usize,
    /// The primary's backups the copy's retention does not keep (not copied).
    pub not_kept: usize,
    /// Shared objects copied (WAL segments, blobs).
    pub shared: u64,
    /// Objects written to the copy.
    pub objects: u64,
    /// Bytes written to the copy.
    pub bytes: u64,
    /// The newest backup the copy holds.
    pub newest: Option<String>,
    /// When it started.
    pub newest_at: Option<DateTime<Utc>>,
    /// The newest point of the primary's data (backup end or WAL upload) the copy holds.
    pub copy_point: Option<DateTime<Utc>>,
    /// The newest point of the primary's data.
    pub primary_point: Option<DateTime<Utc>>,
    /// What failed, if anything did.
    pub error: Option<String>,
    #[serde(skip)]
    /// The failure, for the exit code.
    pub failure: Option<Error>,
}

impl SourceCopy {
    /// How far the copy trails the primary: what would be lost if the primary went away now.
    pub fn lag_seconds(&self) -> Option<f64> {
        match (self.primary_point, self.copy_point) {
            (Some(p), Some(c)) => Some((p - c).num_milliseconds().max(0) as f64 / 1000.0),
            (Some(p), None) => Some((Utc::now() - p).num_milliseconds().max(0) as f64 / 1000.0),
            _ => None,
        }
    }
}

/// What one catch-up did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    /// The copy's name.
    pub repository: String,
    /// Where the copy is.
    pub location: String,
    /// Per source, in policy order.
    pub sources: Vec<SourceCopy>,
}

impl CopyReport {
    /// The first failure, if any source failed.
    pub fn failure(&self) -> Option<&Error> {
        self.sources.iter().find_map(|s| s.failure.as_ref())
    }
}

/// The primary and one copy, opened.
#[derive(Debug, Clone)]
pub struct Copier {
    name: String,
    from: Repository,
    to: Repository,
    part_size: usize,
    in_flight: usize,
    cancel: CancellationToken,
    /// Per source, the manifests the copy kept at its last catch-up: what a WAL-only pass
    /// needs to know where the copy's WAL starts.
    keeping: Arc<Mutex<HashMap<String, Vec<Manifest>>>>,
}

impl Copier {
    /// Opens the primary (which must exist) and the copy `copy` (created if empty).
    pub async fn open(
        policy: &Policy,
        copy: &CopyConfig,
        cancel: CancellationToken,
    ) -> Result<Self> {
        let from = Repository::open(policy).await?;
        let there = policy.for_repository(&copy.name)?;
        let to = Repository::open_or_init(&there)
            .await
            .map_err(|e| e.context(format!("opening copy `{}`", copy.name)))?;
        Ok(Copier {
            name: copy.name.clone(),
            from,
            to,
            part_size: copy.repository.part_size,
            in_flight: copy.repository.parts_in_flight,
            cancel,
            keeping: Arc::default(),
        })
    }

    /// The copy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Copies to the copy whatever it is missing of `sources` and its retention keeps.
    pub async fn catch_up(
        &self,
        policy: &Policy,
        sources: &[&SourcePolicy],
        now: DateTime<Utc>,
    ) -> Result<CopyReport> {
        let there = policy.for_repository(&self.name)?;
        let mut report = CopyReport {
            repository: self.name.clone(),
            location: self.to.store.describe(),
            sources: Vec::new(),
        };
        let mut lease = self.lease().await?;
        let copied = async {
            for source in sources {
                if self.cancel.is_cancelled() {
                    return Err(Error::new(ErrorKind::Interrupted, "cancelled"));
                }
                let rules = there.source(&source.name).unwrap_or(source);
                let mut done = SourceCopy {
                    source: source.name.clone(),
                    ..SourceCopy::default()
                };
                let copied = self
                    .source(policy, source, rules, now, &mut lease, &mut done)
                    .await;
                if let Err(e) = copied {
                    if matches!(e.kind, ErrorKind::Interrupted | ErrorKind::LockHeld) {
                        return Err(e);
                    }
                    done.error = Some(e.to_string());
                    done.failure = Some(e);
                }
                report.sources.push(done);
            }
            Ok(())
        }
        .await;
        // Given up however the catch-up ended, so a restart need not wait for its expiry.
        release(lease).await;
        copied.map(|()| report)
    }

    /// The lease `copy-<name>` in the primary: one catch-up of a copy at a time, whichever
    /// replica or operator runs it (exit 11 for the others).
    async fn lease(&self) -> Result<Lease> {
        self.from
            .lease(
                &format!("copy-{}", self.name),
                &format!("copying to {}", self.name),
                LEASE_TTL,
            )
            .await
    }

    /// Catches up one source: shared content first, then each missing backup, manifest last.
    async fn source(
        &self,
        policy: &Policy,
        source: &SourcePolicy,
        rules: &SourcePolicy,
        now: DateTime<Utc>,
        lease: &mut Lease,
        done: &mut SourceCopy,
    ) -> Result<()> {
        let name = &source.name;
        let primary = self.from.list(Some(name)).await?;
        let copy = self
            .to
            .list(Some(name))
            .await
            .map_err(|e| e.context(format!("listing copy `{}`", self.name)))?;
        let kept = kept_by_copy(&primary.backups, &copy.backups, rules, policy, now);
        let keeping: Vec<&Manifest> = primary
            .backups
            .iter()
            .filter(|e| kept.contains(&e.manifest.id))
            .map(|e| &e.manifest)
            .collect();
        done.not_kept = primary.backups.len() - keeping.len();
        done.primary_point = primary.backups.first().map(|e| e.manifest.finished_at);

        if let Some(shared) = source
            .config
            .shared_for_copy(&self.from, name, &keeping)
            .await?
        {
            let newest = shared.objects.iter().filter_map(|o| o.modified).max();
            done.primary_point = done.primary_point.max(newest);
            self.shared(&shared, done).await?;
            done.copy_point = newest;
        }

        let at_copy = self
            .to
            .store
            .list(&layout::source_prefix(name))
            .await
            .map_err(|e| Error::from(e).context(format!("listing copy `{}`", self.name)))?;
        let at_copy: HashMap<&str, &ObjectInfo> =
            at_copy.iter().map(|o| (o.key.as_str(), o)).collect();
        // Oldest first: a catch-up cut short leaves the copy's history without holes at its start.
        for manifest in keeping.iter().rev() {
            let id = &manifest.id;
            let manifest_key = layout::manifest(name, id);
            let published = at_copy.get(manifest_key.as_str()).map(|o| o.modified);
            let mut damaged: Vec<(&str, u64, &str)> = Vec::new();
            for (object, size, sha) in manifest.objects() {
                let key = layout::backup_object(name, id, object);
                let intact = match (at_copy.get(key.as_str()), published) {
                    (Some(o), Some(p)) => o.size == size && o.modified <= p,
                    // Left by an interrupted catch-up: kept if it reads back as the manifest says.
                    (Some(o), None) if o.size == size => crate::check::hash_object(&self.to, &key)
                        .await
                        .is_ok_and(|(n, h)| n == size && h == sha),
                    _ => false,
                };
                if !intact {
                    damaged.push((object, size, sha));
                }
            }
            if published.is_some() && damaged.is_empty() {
                done.present += 1;
                continue;
            }
            for (object, size, sha) in &damaged {
                let key = layout::backup_object(name, id, object);
                let bytes = self.copy_object(&key, Some((*size, sha))).await?;
                done.objects += 1;
                done.bytes += bytes;
                if published.is_some() {
                    done.repaired.push(key);
                }
            }
            lease.check().await?;
            self.publish(&manifest_key, done).await?;
            if published.is_none() {
                tracing::info!(copy = %self.name, source = %name, backup = %id, "Copied backup");
                done.copied.push(id.clone());
            }
        }
        self.reports(name, &kept, done).await?;
        if let Ok(mut cache) = self.keeping.lock() {
            cache.insert(name.clone(), keeping.iter().map(|m| (*m).clone()).collect());
        }
        if let Some(newest) = keeping.first() {
            done.newest = Some(newest.id.clone());
            done.newest_at = Some(newest.started_at);
            done.copy_point = done.copy_point.max(Some(newest.finished_at));
        }
        Ok(())
    }

    /// Copies what `source`'s shared content has gained since the last catch-up (a physical
    /// source's newly archived WAL), for the backups that catch-up kept; `None` before a
    /// catch-up of the source or for a kind that shares nothing. Two listings, no manifest read:
    /// cheap enough to run as often as WAL is uploaded.
    pub async fn catch_up_shared(&self, source: &SourcePolicy) -> Result<Option<SourceCopy>> {
        let keeping = match self.keeping.lock() {
            Ok(cache) => cache.get(&source.name).cloned(),
            Err(_) => None,
        };
        let Some(keeping) = keeping else {
            return Ok(None);
        };
        let refs: Vec<&Manifest> = keeping.iter().collect();
        let Some(shared) = source
            .config
            .shared_for_copy(&self.from, &source.name, &refs)
            .await?
        else {
            return Ok(None);
        };
        let mut done = SourceCopy {
            source: source.name.clone(),
            present: keeping.len(),
            newest: keeping.first().map(|m| m.id.clone()),
            newest_at: keeping.first().map(|m| m.started_at),
            ..SourceCopy::default()
        };
        let newest = shared.objects.iter().filter_map(|o| o.modified).max();
        let backup_end = keeping.first().map(|m| m.finished_at);
        self.shared(&shared, &mut done).await?;
        done.primary_point = newest.max(backup_end);
        done.copy_point = done.primary_point;
        Ok(Some(done))
    }

    /// [`Copier::catch_up_shared`] for every source that has shared content, as one report.
    pub async fn catch_up_shared_all(&self, sources: &[&SourcePolicy]) -> Result<CopyReport> {
        let mut report = CopyReport {
            repository: self.name.clone(),
            location: self.to.store.describe(),
            sources: Vec::new(),
        };
        let lease = self.lease().await?;
        for source in sources {
            match self.catch_up_shared(source).await {
                Ok(Some(done)) => report.sources.push(done),
                Ok(None) => {}
                Err(e) if e.kind == ErrorKind::Interrupted => return Err(e),
                Err(e) => report.sources.push(SourceCopy {
                    source: source.name.clone(),
                    error: Some(e.to_string()),
                    failure: Some(e),
                    ..SourceCopy::default()
                }),
            }
        }
        release(lease).await;
        Ok(report)
    }

    /// Copies the shared objects the copy lacks (or holds at another size).
    async fn shared(&self, shared: &Shared, done: &mut SourceCopy) -> Result<()> {
        let there: HashMap<String, u64> = self
            .to
            .store
            .list(&shared.prefix)
            .await
            .map_err(|e| Error::from(e).context(format!("listing copy `{}`", self.name)))?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        let (signatures, objects): (Vec<&ObjectInfo>, Vec<&ObjectInfo>) = shared
            .objects
            .iter()
            .filter(|o| there.get(&o.key) != Some(&o.size))
            .partition(|o| signing::is_signature(&o.key));
        // Signatures first: an object shows at the copy with what vouches for it.
        for group in [signatures, objects] {
            // Owned futures, made before the stream: a lazily mapped stream that borrows `self`
            // makes the agent's task not `Send`.
            let copies: Vec<_> = group
                .into_iter()
                .map(|o| {
                    let (this, key) = (self.clone(), o.key.clone());
                    async move { this.copy_object(&key, None).await }
                })
                .collect();
            let mut copies = futures::stream::iter(copies).buffer_unordered(SHARED_AT_ONCE);
            while let Some(copied) = copies.next().await {
                done.bytes += copied?;
                done.objects += 1;
                done.shared += 1;
            }
        }
        Ok(())
    }

    /// Copies the verification reports of the backups the copy keeps that it lacks, so its
    /// listing and its retention know which backups were proven.
    async fn reports(
        &self,
        source: &str,
        kept: &HashSet<String>,
        done: &mut SourceCopy,
    ) -> Result<()> {
        let prefix = layout::verifications_prefix(source);
        let list = |repo: &Repository| {
            let store = repo.store.clone();
            let prefix = prefix.clone();
            async move {
                store
                    .list(&prefix)
                    .await
                    .map_err(|e| Error::from(e).context(format!("listing {prefix}")))
            }
        };
        let there: HashSet<String> = list(&self.to).await?.into_iter().map(|o| o.key).collect();
        for report in list(&self.from).await? {
            if signing::is_signature(&report.key) {
                continue;
            }
            let Some((_, id)) = layout::parse_verification_key(&report.key) else {
                continue;
            };
            if !kept.contains(id) || there.contains(&report.key) {
                continue;
            }
            match self.publish(&report.key, done).await {
                Err(e) if e.kind == ErrorKind::Integrity => {
                    tracing::warn!(copy = %self.name, report = %report.key, error = %e.message, "Not copying a verification report no trusted key signed");
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Copies a manifest or a report, its signature first, if the primary trusts it: what no
    /// trusted key signed is never carried into a copy.
    async fn publish(&self, key: &str, done: &mut SourceCopy) -> Result<()> {
        let (body, seal) = self
            .from
            .read_signed(key, None)
            .await
            .map_err(|e| Error::from(e).context(format!("reading {key} at the primary")))?;
        if matches!(seal, signing::Seal::Signed { .. }) {
            let sig_key = signing::signature_key(key);
            let sig = self
                .from
                .store
                .get(&sig_key)
                .await
                .map_err(|e| Error::from(e).context(format!("reading {sig_key}")))?;
            done.bytes += sig.len() as u64;
            self.to
                .store
                .put(&sig_key, sig)
                .await
                .map_err(|e| self.writing(&sig_key, e.into()))?;
            done.objects += 1;
        }
        done.bytes += body.len() as u64;
        self.to
            .store
            .put(key, body)
            .await
            .map_err(|e| self.writing(key, e.into()))?;
        done.objects += 1;
        Ok(())
    }

    /// Streams one object from the primary to the copy, a few parts in flight, and checks it:
    /// what was read must match `expect` (stored size and SHA-256, from the manifest), and what
    /// the copy holds afterwards must read back the same. Returns the bytes copied.
    async fn copy_object(&self, key: &str, expect: Option<(u64, &str)>) -> Result<u64> {
        let mut reader = self
            .from
            .store
            .open(key)
            .await
            .map_err(|e| Error::from(e).context(format!("reading {key} at the primary")))?;
        let stop = self.cancel.child_token();
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let upload = tokio::spawn(store::upload_parts(
            self.to.store.clone(),
            key.to_string(),
            rx,
            self.in_flight,
            stop.clone(),
        ));
        let read = async {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            loop {
                // A part is read only once the upload has taken the previous one: no part waits
                // in the channel while another is read, which bounds memory to the parts in
                // flight plus two.
                let permit = tokio::select! {
                    _ = self.cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "cancelled")),
                    permit = tx.reserve() => permit,
                };
                let Ok(permit) = permit else {
                    // The upload gave up; its error is the one reported.
                    break;
                };
                let mut part = BytesMut::with_capacity(self.part_size);
                while part.len() < self.part_size {
                    let got = tokio::select! {
                        _ = self.cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "cancelled")),
                        got = reader.read_buf(&mut part) => got,
                    }
                    .map_err(|e| Error::failed(format!("reading {key} at the primary: {e}")))?;
                    if got == 0 {
                        break;
                    }
                }
                if part.is_empty() {
                    break;
                }
                hasher.update(&part);
                size += part.len() as u64;
                let last = part.len() < self.part_size;
                permit.send(part.freeze());
                if last {
                    break;
                }
            }
            Ok((size, hex::encode(hasher.finalize())))
        }
        .await;
        let checked = read.and_then(|(size, sha)| match expect {
            Some((want_size, want_sha)) if size != want_size || sha != want_sha => Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{key} at the primary does not match its manifest ({size} bytes, SHA-256 {sha}; the manifest says {want_size} bytes, {want_sha}): it was not copied"
                ),
            )
            .hint("run `lifeboat check --read-data` on the primary; the copy keeps what it had (RUNBOOK.md#integrity-failure)")),
            _ => Ok((size, sha)),
        });
        let (size, sha) = match checked {
            Ok(read) => read,
            Err(e) => {
                stop.cancel();
                drop(tx);
                let _ = upload.await;
                return Err(e);
            }
        };
        drop(tx);
        let uploaded = if size == 0 {
            // Nothing reached the upload, which refuses an empty stream: write the empty object.
            stop.cancel();
            let _ = upload.await;
            self.to.store.put(key, Bytes::new()).await
        } else {
            upload
                .await
                .map_err(|e| Error::failed(format!("copying {key}: the upload task failed: {e}")))?
        };
        uploaded.map_err(|e| self.writing(key, e.into()))?;
        let (back_size, back_sha) = crate::check::hash_object(&self.to, key)
            .await
            .map_err(|e| e.context(format!("reading {key} back from copy `{}`", self.name)))?;
        if (back_size, back_sha.as_str()) != (size, sha.as_str()) {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{key} reads back from copy `{}` as {back_size} bytes, SHA-256 {back_sha}, not the {size} bytes, {sha} written: nothing that needs it was published there",
                    self.name
                ),
            )
            .hint("the copy's storage altered the object; the next catch-up copies it again (RUNBOOK.md#copy-failing)"));
        }
        Ok(size)
    }

    fn writing(&self, key: &str, e: Error) -> Error {
        e.context(format!("writing {key} to copy `{}`", self.name))
    }
}

/// Gives a lease up; one left behind lapses at its expiry.
async fn release(lease: Lease) {
    if let Err(e) = lease.release().await {
        tracing::debug!(error = %e, "Could not release the copy's lease; it lapses at its expiry");
    }
}

/// Which backups each copy holds (by source and id, published there): for `lifeboat list`'s
/// "where" column. A copy that cannot be read is given with why.
pub async fn held_by_copies(
    policy: &Policy,
    source: Option<&str>,
) -> Vec<(String, Result<HashSet<(String, String)>>)> {
    let prefix = match source {
        Some(s) => layout::source_prefix(s),
        None => layout::backups_prefix(),
    };
    let mut out = Vec::new();
    for copy in &policy.copies {
        let held = async {
            let repo = Repository::open(&policy.for_repository(&copy.name)?).await?;
            let listed = repo.store.list(&prefix).await.map_err(Error::from)?;
            Ok(listed
                .iter()
                .filter_map(|o| layout::parse_backup_key(&o.key))
                .filter(|(_, _, name)| *name == layout::MANIFEST)
                .map(|(s, id, _)| (s.to_string(), id.to_string()))
                .collect())
        };
        // A copy's region may be the one that is down: the primary's listing must not wait on it.
        let held = tokio::time::timeout(LIST_WAIT, held)
            .await
            .unwrap_or_else(|_| {
                Err(Error::failed(format!(
                    "no answer within {} s",
                    LIST_WAIT.as_secs()
                )))
            });
        out.push((copy.name.clone(), held));
    }
    out
}

/// The primary's backups (by id) the copy keeps: its retention rules, applied to what it holds
/// and what the primary holds together, decide. A backup the copy's prune deleted is thus not
/// copied again while the primary still holds it.
fn kept_by_copy(
    primary: &[Entry],
    copy: &[Entry],
    rules: &SourcePolicy,
    policy: &Policy,
    now: DateTime<Utc>,
) -> HashSet<String> {
    let mut all: BTreeMap<&str, Candidate> = BTreeMap::new();
    for e in copy.iter().chain(primary) {
        let verified = e.verification.as_ref().map(|v| v.result == "pass");
        let c = all.entry(&e.manifest.id).or_insert_with(|| Candidate {
            id: e.manifest.id.clone(),
            started_at: e.manifest.started_at,
            verified,
            pinned: false,
        });
        c.verified = c.verified.or(verified);
    }
    let candidates: Vec<Candidate> = all.into_values().collect();
    let primary_ids: HashSet<&str> = primary.iter().map(|e| e.manifest.id.as_str()).collect();
    retention::plan(&candidates, &rules.retention, &policy.timezone, now)
        .into_iter()
        .filter(|d| d.keep && primary_ids.contains(d.id.as_str()))
        .map(|d| d.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, started: &str) -> Entry {
        let m = serde_json::json!({
            "format": 1, "id": id, "source": "db", "kind": "postgres",
            "started_at": started, "finished_at": started, "tool_version": "t",
            "source_version": null, "dump_tool_version": null,
            "compression": { "algorithm": "zstd", "level": 3 },
            "encryption": { "algorithm": "age-v1", "recipients": [] },
            "size_plain": 1, "size_stored": 1, "parts": [], "fingerprint": null,
        });
        Entry {
            manifest: serde_json::from_value(m).expect("a manifest"),
            verification: None,
            seal: crate::repo::signing::Seal::Unchecked,
            lineage: crate::repo::origin::Lineage::Unrecorded,
        }
    }

    fn day(d: u32) -> Entry {
        entry(
            &format!("202611{d:02}T030000Z-aaaaaa"),
            &format!("2026-11-{d:02}T03:00:00Z"),
        )
    }

    fn kept(primary: &[Entry], copy: &[Entry], rules: &str) -> Vec<String> {
        let text = format!(
            "{}\n[[copies]]\nname = \"dr\"\nurl = \"file:///dr\"\nretention = {rules}\n",
            crate::policy::tests::good()
        );
        let policy = crate::policy::parse(
            &text,
            "p.toml",
            &crate::policy::tests::env,
            crate::policy::LoadOptions::default(),
        )
        .expect("valid")
        .for_repository("dr")
        .expect("the copy");
        let now = "2026-11-30T12:00:00Z".parse().expect("a time");
        let mut ids: Vec<String> = kept_by_copy(primary, copy, &policy.sources[0], &policy, now)
            .into_iter()
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_copy_takes_what_its_own_rules_keep_and_never_what_its_prune_deleted() {
        let primary: Vec<Entry> = (20..=29).map(day).collect();
        // An empty copy with a shorter history takes only what its rules keep.
        let ids = kept(&primary, &[], "{ keep_last = 3 }");
        assert_eq!(ids, [day(27), day(28), day(29)].map(|e| e.manifest.id));
        // Its prune deleted days 20–26 while the primary kept them: they are not copied again,
        // whatever the primary still holds.
        let copy: Vec<Entry> = (27..=29).map(day).collect();
        let primary: Vec<Entry> = (20..=30).map(day).collect();
        let ids = kept(&primary, &copy, "{ keep_last = 3 }");
        assert_eq!(ids, [day(28), day(29), day(30)].map(|e| e.manifest.id));
        // A copy that keeps longer than the primary takes all the primary has.
        let ids = kept(&primary[5..], &copy, "{ keep_daily = 60 }");
        assert_eq!(ids.len(), 6, "{ids:?}");
    }
}
