//! Object stores: one trait, one file per backend, one registry function.
//!
//! Backends sort their failures into [`StoreError::NotFound`], [`StoreError::Permanent`] and
//! [`StoreError::Transient`]; only the [`retry::Retry`] decorator decides to retry. Large objects are
//! written as multipart uploads through [`upload_parts`], which keeps at most `parts_in_flight` parts
//! in memory and aborts the upload on any error or cancellation, so an interrupted upload never
//! becomes a visible object. Small objects (manifests, markers) use [`ObjectStore::put`], which is
//! atomic on every backend.

pub mod counted;
pub mod fs;
pub mod retry;
pub mod s3;

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind};
use crate::policy::{Location, RepositoryConfig};

/// A failure of one store operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{key}: no such object")]
    NotFound {
        /// The key.
        key: String,
    },
    /// Retrying will not help (bad credentials, no bucket, refused request).
    #[error("{op} {key}: {message}")]
    Permanent {
        /// The operation, e.g. `put`.
        op: &'static str,
        /// The key.
        key: String,
        /// What the backend said.
        message: String,
        /// True when the failure is about credentials or permissions.
        credential: bool,
    },
    /// Retrying may help (5xx, SlowDown, timeouts, connection resets).
    #[error("{op} {key}: {message} (transient)")]
    Transient {
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// What the backend said.
        message: String,
    },
    /// The storage has no room left (a full disk or quota): retrying will not help.
    #[error("{op} {key}: {message}: the repository's disk is full")]
    Full {
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// What the backend said.
        message: String,
    },
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl StoreError {
    /// Builds a permanent error.
    pub fn permanent(op: &'static str, key: &str, message: impl Into<String>) -> Self {
        StoreError::Permanent {
            op,
            key: key.to_string(),
            message: message.into(),
            credential: false,
        }
    }

    /// Builds a transient error.
    pub fn transient(op: &'static str, key: &str, message: impl Into<String>) -> Self {
        StoreError::Transient {
            op,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// True for errors the retry layer may retry.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { .. } => Error::new(ErrorKind::Integrity, e.to_string())
                .hint("the object is missing from the repository; run `lifeboat check` (RUNBOOK.md#integrity-failure)"),
            StoreError::Permanent {
                credential: true, ..
            } => Error::new(ErrorKind::Credential, e.to_string()).hint(
                "check the storage credentials (AWS_* variables, profile or IRSA role) and the bucket policy (RUNBOOK.md#storage-errors)",
            ),
            StoreError::Permanent { message, .. } if message.to_lowercase().contains("checksum") => {
                Error::failed(e.to_string()).hint(
                    "this server seems to reject checksum headers: set repository.checksums = \"when_required\" (RUNBOOK.md#storage-errors)",
                )
            }
            StoreError::Full { .. } => Error::failed(e.to_string()).cause(crate::error::Cause::NoSpace).hint(
                "free space on the repository's disk, or point repository.url elsewhere; nothing was published (RUNBOOK.md#storage-errors)",
            ),
            StoreError::Permanent { .. } => Error::failed(e.to_string())
                .hint("check repository.url, endpoint and region (RUNBOOK.md#storage-errors)"),
            StoreError::Transient { .. } => Error::failed(e.to_string())
                .hint("the storage kept failing after retries; check its health and the network (RUNBOOK.md#storage-errors)"),
            StoreError::Cancelled => Error::new(ErrorKind::Interrupted, "cancelled"),
        }
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// The store's version tag (S3 ETag), when it has one.
    pub etag: Option<String>,
    /// When it was last written, when the store says.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// An unfinished multipart upload (S3) or temp file (fs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// Key being written.
    pub key: String,
    /// The backend's id for it (S3 upload id; the temp file's key on fs).
    pub upload_id: String,
    /// When it started, if the backend says.
    pub initiated: Option<chrono::DateTime<chrono::Utc>>,
}

/// Objects in a page of [`ObjectStore::list_page`]: S3's own page size.
pub const LIST_PAGE: usize = 1000;

/// A readable object body.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// A store of objects under a repository root. Keys are relative, `/`-separated.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Where this store is, for messages (`file:///x`, `s3://bucket/prefix at http://…`).
    fn describe(&self) -> String;
    /// Writes a small object atomically (whole or not at all).
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    /// Reads a small object whole.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    /// Opens an object for streaming.
    async fn open(&self, key: &str) -> Result<ObjectReader, StoreError>;
    /// The object's own file, open for reading, where the store is a local directory: a restore
    /// hashes and reads it in place rather than copying it. `None` from other stores.
    async fn open_file(&self, _key: &str) -> Result<Option<std::fs::File>, StoreError> {
        Ok(None)
    }
    /// Up to `len` bytes of an object from `offset`: fewer where the object ends, none past its
    /// end. One request, held whole: keep `len` to a few MiB.
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError>;
    /// Ranged GETs to keep in flight when reading a large object (`repository.download_streams`);
    /// 1: read it in one GET.
    fn download_streams(&self) -> usize {
        1
    }
    /// The size of an object, or `None` if it does not exist.
    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    /// The objects under `prefix` whose keys sort after `start_after`, in key order: one page of
    /// them, and whether more follow. Listing page by page holds one page, however many objects
    /// there are (S3 returns up to 1,000 a page; this default lists everything once per page).
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<(Vec<ObjectInfo>, bool), StoreError> {
        let mut all = self.list(prefix).await?;
        if let Some(after) = start_after {
            all.retain(|o| o.key.as_str() > after);
        }
        let more = all.len() > LIST_PAGE;
        all.truncate(LIST_PAGE);
        Ok((all, more))
    }
    /// Deletes an object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Writes a small object only if none exists at `key` (S3 `If-None-Match: *`, fs `link`).
    /// Returns false, writing nothing, when one exists.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StoreError>;
    /// Starts a multipart upload of `key`; nothing is visible until `complete`.
    async fn start_upload(&self, key: &str) -> Result<Arc<dyn Upload>, StoreError>;
    /// Incomplete multipart uploads under the repository.
    async fn pending_uploads(&self) -> Result<Vec<PendingUpload>, StoreError>;
    /// Aborts an incomplete upload found by `pending_uploads`.
    async fn abort_pending(&self, upload: &PendingUpload) -> Result<(), StoreError>;
    /// Whether the bucket has Object Lock enabled (`None`: not applicable to this backend).
    async fn lock_enabled(&self) -> Result<Option<bool>, StoreError> {
        Ok(None)
    }
    /// Until when an object is protected by an Object Lock retention, if it is.
    async fn locked_until(
        &self,
        _key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        Ok(None)
    }
}

/// An unfinished multipart upload. Parts may be uploaded concurrently.
#[async_trait]
pub trait Upload: Send + Sync + std::fmt::Debug {
    /// The key being written.
    fn key(&self) -> &str;
    /// Uploads part `number` (1-based) that starts at byte `offset` of the object.
    async fn put_part(&self, number: u32, offset: u64, data: Bytes) -> Result<(), StoreError>;
    /// Makes the object visible, made of every part uploaded so far, in order.
    async fn complete(&self) -> Result<(), StoreError>;
    /// Discards the parts; the object never becomes visible.
    async fn abort(&self) -> Result<(), StoreError>;
}

/// Opens the store a policy's repository names, wrapped in the retry decorator.
pub async fn open(config: &RepositoryConfig) -> Result<Arc<dyn ObjectStore>, Error> {
    let inner: Arc<dyn ObjectStore> = match &config.location {
        Location::Fs { root } => Arc::new(fs::FsStore::new(root.clone())),
        Location::S3(s3) => Arc::new(s3::S3Store::new(s3).await?),
    };
    Ok(Arc::new(
        retry::Retry::new(inner, retry::Backoff::default())
            .with_download_streams(config.download_streams),
    ))
}

/// Checks that the store accepts a write, a read and a delete under its root, the operations a
/// backup needs, and says exactly which failed.
pub async fn probe(store: &dyn ObjectStore) -> Result<(), Error> {
    let key = crate::repo::layout::probe();
    let payload = Bytes::from_static(b"lifeboat probe\n");
    let place = store.describe();
    let step = |what: &str, e: StoreError| {
        Error::from(e.clone()).context(format!("storage probe at {place}: {what} failed"))
    };
    store
        .put(&key, payload.clone())
        .await
        .map_err(|e| step("write", e))?;
    let back = store.get(&key).await.map_err(|e| step("read back", e))?;
    if back != payload {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("storage probe at {place}: read back different bytes than were written"),
        ));
    }
    store.delete(&key).await.map_err(|e| step("delete", e))?;
    Ok(())
}

/// Aborts incomplete uploads that started before `older_than` (crashed runs; a running upload is
/// younger). Returns the keys swept.
pub async fn sweep_stale_uploads(
    store: &dyn ObjectStore,
    older_than: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<String>, StoreError> {
    let mut swept = Vec::new();
    for u in store.pending_uploads().await? {
        if u.initiated.is_some_and(|t| t < older_than) {
            store.abort_pending(&u).await?;
            tracing::info!(key = %u.key, "Aborted a stale unfinished upload");
            swept.push(u.key);
        }
    }
    Ok(swept)
}

/// Uploads the parts arriving on `parts` as one object at `key`.
///
/// A single part is written with a plain atomic `put`; more become a multipart upload with at most
/// `in_flight` parts uploading at once. On any error, or when `cancel` fires, the multipart upload
/// is aborted and nothing becomes visible. Returns once the object is complete.
pub async fn upload_parts(
    store: Arc<dyn ObjectStore>,
    key: String,
    mut parts: mpsc::Receiver<Bytes>,
    in_flight: usize,
    cancel: CancellationToken,
) -> Result<(), StoreError> {
    let Some(first) = recv(&mut parts, &cancel).await? else {
        return Err(StoreError::permanent("upload", &key, "no data to upload"));
    };
    let Some(second) = recv(&mut parts, &cancel).await? else {
        if cancel.is_cancelled() {
            return Err(StoreError::Cancelled);
        }
        return store.put(&key, first).await;
    };
    let upload = store.start_upload(&key).await?;
    let result = async {
        let mut tasks = JoinSet::new();
        let mut offset = 0u64;
        let mut number = 0u32;
        let mut next = Some(first);
        let mut pending_second = Some(second);
        loop {
            // A part is taken only when it can go at once: one taken early and held would be
            // a buffer more than `in_flight`.
            while tasks.len() >= in_flight {
                join_one(&mut tasks).await?;
            }
            let part = match next.take() {
                Some(p) => p,
                None => match pending_second.take() {
                    Some(p) => p,
                    None => match recv(&mut parts, &cancel).await? {
                        Some(p) => p,
                        None => break,
                    },
                },
            };
            number += 1;
            let len = part.len() as u64;
            let up = upload.clone();
            tasks.spawn(async move { up.put_part(number, offset, part).await });
            offset += len;
        }
        while !tasks.is_empty() {
            join_one(&mut tasks).await?;
        }
        if cancel.is_cancelled() {
            return Err(StoreError::Cancelled);
        }
        upload.complete().await
    }
    .await;
    if let Err(e) = &result {
        tracing::debug!(key = %key, error = %e, "Aborting multipart upload");
        if let Err(abort) = upload.abort().await {
            tracing::warn!(key = %key, error = %abort, "Could not abort multipart upload; the next prune sweeps it");
        }
    }
    result
}

/// The next part, or `None` at the end; a cancellation wins over both, so a producer that fails
/// and then drops its sender can never be mistaken for a finished stream.
async fn recv(
    parts: &mut mpsc::Receiver<Bytes>,
    cancel: &CancellationToken,
) -> Result<Option<Bytes>, StoreError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(StoreError::Cancelled),
        p = parts.recv() => Ok(p),
    }
}

async fn join_one(tasks: &mut JoinSet<Result<(), StoreError>>) -> Result<(), StoreError> {
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(StoreError::permanent(
            "upload",
            "",
            format!("upload task failed: {e}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_exit_codes_and_hints() {
        let e = Error::from(StoreError::permanent(
            "put",
            "k",
            "InvalidArgument: x-amz-checksum-sha256 is not supported",
        ));
        assert!(e.hint.unwrap().contains("checksums = \"when_required\""));
        let e = Error::from(StoreError::Permanent {
            op: "put",
            key: "k".into(),
            message: "AccessDenied".into(),
            credential: true,
        });
        assert_eq!(e.kind, ErrorKind::Credential);
        assert_eq!(
            Error::from(StoreError::NotFound { key: "k".into() }).kind,
            ErrorKind::Integrity
        );
        assert_eq!(
            Error::from(StoreError::Cancelled).kind,
            ErrorKind::Interrupted
        );
    }

    async fn send_parts(parts: Vec<&'static [u8]>) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(parts.len().max(1));
        for p in parts {
            tx.send(Bytes::from_static(p)).await.unwrap();
        }
        rx
    }

    #[tokio::test]
    async fn parts_become_one_object_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(fs::FsStore::new(dir.path().to_path_buf()));
        let rx = send_parts(vec![b"aaa", b"bb", b"c"]).await;
        upload_parts(
            store.clone(),
            "x/obj".into(),
            rx,
            2,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(&store.get("x/obj").await.unwrap()[..], b"aaabbc");
        let rx = send_parts(vec![b"single"]).await;
        upload_parts(
            store.clone(),
            "x/one".into(),
            rx,
            2,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(&store.get("x/one").await.unwrap()[..], b"single");
    }

    #[tokio::test]
    async fn a_cancelled_upload_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(fs::FsStore::new(dir.path().to_path_buf()));
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"one")).await.unwrap();
        tx.send(Bytes::from_static(b"two")).await.unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(upload_parts(
            store.clone(),
            "x/obj".into(),
            rx,
            2,
            cancel.clone(),
        ));
        tokio::task::yield_now().await;
        cancel.cancel();
        assert!(matches!(task.await.unwrap(), Err(StoreError::Cancelled)));
        drop(tx);
        assert!(
            store.list("").await.unwrap().is_empty(),
            "no object, no temp file"
        );
    }
}
