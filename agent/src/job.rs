//! One backup run of one source: probe → stream → pipeline → store → manifest last.
//!
//! What must hold: the manifest is written only after every data object and the fingerprint are
//! stored; any failure (producer, storage, timeout, cancel) publishes nothing, and the objects the
//! run did store are deleted again, best effort (without a manifest they are invisible anyway).

use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, PipelineConfig};
use crate::policy::{Policy, SourcePolicy};
use crate::repo::layout;
use crate::repo::manifest::{CompressionInfo, EncryptionInfo, Manifest, RunRequests, StoredObject};
use crate::repo::{tool_version, Repository};
use crate::source::{self, BackupContext};
use crate::store::counted::{Counted, Requests};

/// Takes one backup of `source` into `repo`. `now` becomes the backup's start time and id.
pub async fn backup(
    repo: &Repository,
    policy: &Policy,
    source: &SourcePolicy,
    now: DateTime<Utc>,
    cancel: CancellationToken,
    meter: Option<std::sync::Arc<pipeline::Meter>>,
) -> Result<Manifest> {
    let name = &source.name;
    let started = Instant::now();
    let id = layout::new_backup_id(now);
    let pipeline = PipelineConfig {
        meter,
        ..pipeline_config(policy, source)?
    };
    let recipients = pipeline.recipients.clone();
    // Before anything is stored: a writer whose manifests every reader would refuse stops here.
    let signer = repo
        .trust
        .signer()
        .map_err(|e| e.context(format!("source {name}")))?;
    // The run's requests for its data objects (the fingerprint and the manifest follow).
    let repo_requests = std::sync::Arc::new(Requests::default());
    let source_requests = std::sync::Arc::new(Requests::default());
    let counted = std::sync::Arc::new(Counted::new(repo.store.clone(), repo_requests.clone()));
    let ctx = BackupContext {
        store: counted,
        source_requests: source_requests.clone(),
        pipeline,
        source: name.clone(),
        id: id.clone(),
        cancel: cancel.child_token(),
    };
    tracing::debug!(source = %name, backup = %id, kind = %source.config.kind(), "Backup started");
    let src = source.config.source(&policy.encryption);
    let run = src.backup(&ctx);
    tokio::pin!(run);
    let result = tokio::select! {
        r = &mut run => r,
        _ = tokio::time::sleep(source.timeout) => {
            // Stop the run and wait for it to clean up (kill the child, abort the upload).
            ctx.cancel.cancel();
            let _ = run.await;
            Err(Error::failed(format!(
                "timed out after {}",
                humantime::format_duration(source.timeout)
            ))
            .hint("raise the source's timeout, or find out why the dump is slow (RUNBOOK.md#backup-failing)"))
        }
    };
    let published = match result {
        Ok(out) => {
            let source_requests = source_requests.counts();
            let signed = Signed {
                recipients: &recipients,
                signer: signer.as_ref(),
                requests: RunRequests {
                    repository: repo_requests.counts(),
                    source: (!source_requests.is_empty()).then_some(source_requests),
                },
            };
            publish(repo, source, &id, now, signed, policy, out).await
        }
        Err(e) => Err(e),
    };
    match published {
        Ok(manifest) => {
            tracing::debug!(
                source = %name,
                backup = %id,
                size_plain = manifest.size_plain,
                size_stored = manifest.size_stored,
                seconds = started.elapsed().as_secs_f64(),
                "Backup stored"
            );
            Ok(manifest)
        }
        Err(e) => {
            discard(repo, name, &id).await;
            let e = if cancel.is_cancelled() && e.kind != ErrorKind::Interrupted {
                Error::new(ErrorKind::Interrupted, "interrupted")
            } else {
                e
            };
            Err(e
                .context(format!("source {name}: backup {id}"))
                .with_default_hint("nothing was published; the previous backups are untouched (RUNBOOK.md#backup-failing)"))
        }
    }
}

/// How `source`'s streams are compressed, encrypted and uploaded.
pub fn pipeline_config(policy: &Policy, source: &SourcePolicy) -> Result<PipelineConfig> {
    Ok(PipelineConfig {
        level: source.compression.level,
        workers: source.compression.workers,
        recipients: pipeline::parse_recipients(&policy.encryption.recipients)?,
        part_size: policy.repository.part_size,
        parts_in_flight: policy.repository.parts_in_flight,
        meter: None,
        index_key: None,
    })
}

/// Who can read a backup, who vouches for it, and what the run asked of the stores.
struct Signed<'a> {
    recipients: &'a [age::x25519::Recipient],
    signer: Option<&'a crate::repo::signing::Signer>,
    requests: RunRequests,
}

async fn publish(
    repo: &Repository,
    source: &SourcePolicy,
    id: &str,
    now: DateTime<Utc>,
    Signed {
        recipients,
        signer,
        requests,
    }: Signed<'_>,
    policy: &Policy,
    out: source::SourceBackup,
) -> Result<Manifest> {
    let name = &source.name;
    let fp_plain = serde_json::to_vec(&out.fingerprint)
        .map_err(|e| Error::failed(format!("cannot encode the fingerprint: {e}")))?;
    let fp = pipeline::encrypt_small(recipients, &fp_plain)?;
    let fingerprint = StoredObject {
        name: layout::FINGERPRINT.to_string(),
        size_stored: fp.len() as u64,
        sha256_stored: hex::encode(Sha256::digest(&fp)),
    };
    repo.store
        .put(
            &layout::backup_object(name, id, layout::FINGERPRINT),
            Bytes::from(fp),
        )
        .await
        .map_err(|e| Error::from(e).context("storing the fingerprint"))?;
    let manifest = Manifest {
        format: layout::FORMAT_VERSION,
        id: id.to_string(),
        source: name.clone(),
        kind: source.config.kind(),
        started_at: now,
        finished_at: Utc::now(),
        tool_version: tool_version(),
        source_version: out.source_version,
        dump_tool_version: out.dump_tool_version,
        compression: CompressionInfo {
            algorithm: "zstd".into(),
            level: source.compression.level,
        },
        encryption: EncryptionInfo {
            algorithm: "age-v1".into(),
            recipients: policy.encryption.recipients.clone(),
        },
        size_plain: out.parts.iter().map(|p| p.size_plain).sum(),
        size_stored: out.parts.iter().map(|p| p.size_stored).sum::<u64>() + fingerprint.size_stored,
        parts: out.parts,
        fingerprint: Some(fingerprint),
        base_backup: out.base_backup,
        database: out.database,
        origin: out.origin,
        shards: out.shards,
        requests: Some(requests),
    };
    let body = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::failed(format!("cannot encode the manifest: {e}")))?;
    // Last (its signature just before): from this write on, the backup exists.
    repo.publish(&layout::manifest(name, id), Bytes::from(body), signer)
        .await?;
    Ok(manifest)
}

/// Deletes what a failed run stored under its backup prefix.
async fn discard(repo: &Repository, source: &str, id: &str) {
    let prefix = layout::backup_prefix(source, id);
    match repo.store.list(&prefix).await {
        Ok(objects) => {
            for o in objects {
                if let Err(e) = repo.store.delete(&o.key).await {
                    tracing::debug!(key = %o.key, error = %e, "Could not delete an object of a failed run");
                }
            }
        }
        Err(e) => {
            tracing::debug!(prefix = %prefix, error = %e, "Could not list a failed run's objects")
        }
    }
}
