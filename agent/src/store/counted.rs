//! The requests a run makes of a store, counted by the class S3 bills them in.
//!
//! What must hold:
//! - Every call that is one S3 request counts one: `put`, `put_if_absent`, each multipart part,
//!   its start and its completion are PUTs (S3 bills POST as PUT); `get` and `open` are GETs;
//!   `size` is a HEAD; `delete` and aborts are DELETEs; a listing counts one LIST per page of
//!   1,000 keys.
//! - Counted above the retry layer: a retried request counts once (retries are logged).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ObjectInfo, ObjectReader, ObjectStore, PendingUpload, StoreError, Upload, LIST_PAGE};

/// Requests made so far, by class.
#[derive(Debug, Default)]
pub struct Requests {
    list: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    put: AtomicU64,
    delete: AtomicU64,
}

/// Requests by class, as a run reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// LIST (a page of up to 1,000 keys each).
    pub list: u64,
    /// GET.
    pub get: u64,
    /// HEAD.
    pub head: u64,
    /// PUT, and the POSTs of multipart uploads.
    pub put: u64,
    /// DELETE.
    pub delete: u64,
}

impl RequestCounts {
    /// Each class with its name, as `/metrics` labels them.
    pub fn by_op(&self) -> [(&'static str, u64); 5] {
        [
            ("list", self.list),
            ("get", self.get),
            ("head", self.head),
            ("put", self.put),
            ("delete", self.delete),
        ]
    }

    /// No request at all.
    pub fn is_empty(&self) -> bool {
        *self == RequestCounts::default()
    }
}

impl Requests {
    /// What has been counted.
    pub fn counts(&self) -> RequestCounts {
        RequestCounts {
            list: self.list.load(Relaxed),
            get: self.get.load(Relaxed),
            head: self.head.load(Relaxed),
            put: self.put.load(Relaxed),
            delete: self.delete.load(Relaxed),
        }
    }
}

/// A store whose requests are counted into `requests`.
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn ObjectStore>,
    requests: Arc<Requests>,
}

impl Counted {
    /// Counts `inner`'s requests into `requests`.
    pub fn new(inner: Arc<dyn ObjectStore>, requests: Arc<Requests>) -> Self {
        Counted { inner, requests }
    }
}

fn one(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

#[async_trait]
impl ObjectStore for Counted {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        one(&self.requests.put);
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        one(&self.requests.get);
        self.inner.get(key).await
    }
    async fn open(&self, key: &str) -> Result<ObjectReader, StoreError> {
        one(&self.requests.get);
        self.inner.open(key).await
    }
    async fn open_file(&self, key: &str) -> Result<Option<std::fs::File>, StoreError> {
        // A read where the store has files; no request where it has none.
        let file = self.inner.open_file(key).await;
        if !matches!(file, Ok(None)) {
            one(&self.requests.get);
        }
        file
    }
    fn download_streams(&self) -> usize {
        self.inner.download_streams()
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        one(&self.requests.get);
        self.inner.get_range(key, offset, len).await
    }
    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        one(&self.requests.head);
        self.inner.size(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let all = self.inner.list(prefix).await?;
        let pages = all.len().div_ceil(LIST_PAGE).max(1) as u64;
        self.requests.list.fetch_add(pages, Relaxed);
        Ok(all)
    }
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<(Vec<ObjectInfo>, bool), StoreError> {
        one(&self.requests.list);
        self.inner.list_page(prefix, start_after).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        one(&self.requests.delete);
        self.inner.delete(key).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StoreError> {
        one(&self.requests.put);
        self.inner.put_if_absent(key, data).await
    }
    async fn start_upload(&self, key: &str) -> Result<Arc<dyn Upload>, StoreError> {
        one(&self.requests.put);
        let inner = self.inner.start_upload(key).await?;
        Ok(Arc::new(CountedUpload {
            inner,
            requests: self.requests.clone(),
        }))
    }
    async fn pending_uploads(&self) -> Result<Vec<PendingUpload>, StoreError> {
        one(&self.requests.list);
        self.inner.pending_uploads().await
    }
    async fn abort_pending(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        one(&self.requests.delete);
        self.inner.abort_pending(upload).await
    }
    async fn lock_enabled(&self) -> Result<Option<bool>, StoreError> {
        one(&self.requests.get);
        self.inner.lock_enabled().await
    }
    async fn locked_until(
        &self,
        key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        one(&self.requests.get);
        self.inner.locked_until(key).await
    }
}

#[derive(Debug)]
struct CountedUpload {
    inner: Arc<dyn Upload>,
    requests: Arc<Requests>,
}

#[async_trait]
impl Upload for CountedUpload {
    fn key(&self) -> &str {
        self.inner.key()
    }
    async fn put_part(&self, number: u32, offset: u64, data: Bytes) -> Result<(), StoreError> {
        one(&self.requests.put);
        self.inner.put_part(number, offset, data).await
    }
    async fn complete(&self) -> Result<(), StoreError> {
        one(&self.requests.put);
        self.inner.complete().await
    }
    async fn abort(&self) -> Result<(), StoreError> {
        one(&self.requests.delete);
        self.inner.abort().await
    }
}
