//! The retry decorator: the only place that decides to retry a store operation.
//!
//! Backends classify their errors; this layer retries [`StoreError::Transient`] ones with capped
//! exponential backoff and full jitter, and passes everything else straight through. It wraps
//! uploads too, so each part and the completion are retried on their own. Parts are `Bytes`, so a
//! retry resends the same buffer without copying it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use super::{ObjectInfo, ObjectReader, ObjectStore, PendingUpload, StoreError, Upload};

/// Backoff settings.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Attempts in all, including the first.
    pub attempts: u32,
    /// Delay before the first retry.
    pub base: Duration,
    /// Longest delay between attempts.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let ms = rand::rng().random_range(0..=exp.as_millis().max(1) as u64);
        Duration::from_millis(ms)
    }

    async fn run<T, F, Fut>(&self, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send,
    {
        let mut attempt = 0;
        loop {
            match f().await {
                Err(e) if e.is_transient() && attempt + 1 < self.attempts => {
                    let d = self.delay(attempt);
                    tracing::debug!(error = %e, attempt, delay_ms = d.as_millis() as u64, "Retrying store operation");
                    tokio::time::sleep(d).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

/// Retries transient failures of the wrapped store.
#[derive(Debug)]
pub struct Retry {
    inner: Arc<dyn ObjectStore>,
    backoff: Backoff,
    download_streams: usize,
}

impl Retry {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, backoff: Backoff) -> Self {
        Retry {
            inner,
            backoff,
            download_streams: 1,
        }
    }

    /// Reads large objects with `n` ranged GETs in flight.
    pub fn with_download_streams(mut self, n: usize) -> Self {
        self.download_streams = n.max(1);
        self
    }
}

#[async_trait]
impl ObjectStore for Retry {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.backoff.run(|| self.inner.put(key, data.clone())).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.backoff.run(|| self.inner.get(key)).await
    }
    async fn open(&self, key: &str) -> Result<ObjectReader, StoreError> {
        self.backoff.run(|| self.inner.open(key)).await
    }
    async fn open_file(&self, key: &str) -> Result<Option<std::fs::File>, StoreError> {
        self.backoff.run(|| self.inner.open_file(key)).await
    }
    fn download_streams(&self) -> usize {
        self.download_streams
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.backoff
            .run(|| self.inner.get_range(key, offset, len))
            .await
    }
    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.backoff.run(|| self.inner.size(key)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.backoff.run(|| self.inner.list(prefix)).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<(Vec<ObjectInfo>, bool), StoreError> {
        self.backoff
            .run(|| self.inner.list_page(prefix, start_after))
            .await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.backoff.run(|| self.inner.delete(key)).await
    }
    async fn start_upload(&self, key: &str) -> Result<Arc<dyn Upload>, StoreError> {
        let inner = self.backoff.run(|| self.inner.start_upload(key)).await?;
        Ok(Arc::new(RetryUpload {
            inner,
            backoff: self.backoff,
        }))
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StoreError> {
        self.backoff
            .run(|| self.inner.put_if_absent(key, data.clone()))
            .await
    }
    async fn pending_uploads(&self) -> Result<Vec<PendingUpload>, StoreError> {
        self.backoff.run(|| self.inner.pending_uploads()).await
    }
    async fn abort_pending(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        self.backoff.run(|| self.inner.abort_pending(upload)).await
    }
    async fn lock_enabled(&self) -> Result<Option<bool>, StoreError> {
        self.backoff.run(|| self.inner.lock_enabled()).await
    }
    async fn locked_until(
        &self,
        key: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        self.backoff.run(|| self.inner.locked_until(key)).await
    }
}

#[derive(Debug)]
struct RetryUpload {
    inner: Arc<dyn Upload>,
    backoff: Backoff,
}

#[async_trait]
impl Upload for RetryUpload {
    fn key(&self) -> &str {
        self.inner.key()
    }
    async fn put_part(&self, number: u32, offset: u64, data: Bytes) -> Result<(), StoreError> {
        self.backoff
            .run(|| self.inner.put_part(number, offset, data.clone()))
            .await
    }
    async fn complete(&self) -> Result<(), StoreError> {
        self.backoff.run(|| self.inner.complete()).await
    }
    async fn abort(&self) -> Result<(), StoreError> {
        self.backoff.run(|| self.inner.abort()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_only() {
        let b = Backoff::default();
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = b
            .run(|| async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 2 {
                    Err(StoreError::transient("put", "k", "503 SlowDown"))
                } else {
                    Ok(())
                }
            })
            .await;
        assert!(r.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = b
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::permanent("put", "k", "AccessDenied"))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "permanent errors are not retried"
        );

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = b
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::transient("put", "k", "timeout"))
            })
            .await;
        assert!(r.unwrap_err().is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), b.attempts);
    }
}
