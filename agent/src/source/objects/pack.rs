//! Packs: small contents stored together, so that a million small files become a few dozen
//! repository objects instead of a million.
//!
//! What must hold:
//! - A pack is `objects/<2 hex>/<id>.age`, beside the blobs, under a random id. Its bytes are
//!   the age files of its contents end to end. Each content is sealed whole, exactly as a blob
//!   of its own would be, so the slice a snapshot entry names (`pack`: id, offset, length) is an
//!   age file that `age -d | zstd -d` reads (RUNBOOK.md, "Restoring a file by hand").
//! - Contents a run holds in memory anyway (up to 1 MiB) are packed; larger ones stay blobs of
//!   their own.
//! - A pack goes up as it fills, one part at a time (a multipart upload), so one part is the
//!   most it holds in memory. It is completed once it holds the policy's `pack_size`, or when the
//!   run's last content is in. A pack a failed run leaves open is aborted, never completed.
//! - Every pack is complete before the snapshot that names its contents: the run completes its
//!   last pack before it lets the snapshot's upload finish, and the manifest comes after both.
//! - A blob list names each pack its snapshot needs (`<id> pack`), so blob collection keeps a
//!   pack while any published snapshot names any content of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;

use super::Packed;
use crate::error::{Error, Result};
use crate::repo::layout;
use crate::sorted;
use crate::store::{ObjectStore, Upload};

/// Appends sealed contents to the open pack, completing each pack at its size.
pub(super) struct Packer {
    store: Arc<dyn ObjectStore>,
    /// Bytes at which a pack is completed.
    size: u64,
    /// Bytes of a part of the upload.
    part: usize,
    open: tokio::sync::Mutex<Option<Open>>,
    completed: AtomicU64,
}

/// The pack being written.
struct Open {
    id: sorted::Id,
    key: String,
    /// What is not yet sent in a part.
    buf: BytesMut,
    /// Bytes appended so far.
    written: u64,
    /// Bytes sent in parts.
    sent: u64,
    upload: Option<Arc<dyn Upload>>,
    parts: u32,
}

impl Open {
    fn new() -> Open {
        let id: sorted::Id = rand::random();
        Open {
            id,
            key: layout::blob(&hex::encode(id)),
            buf: BytesMut::new(),
            written: 0,
            sent: 0,
            upload: None,
            parts: 0,
        }
    }

    /// Sends what is buffered as the next part, starting the upload at the first.
    async fn send_part(&mut self, store: &dyn ObjectStore) -> Result<()> {
        let upload = match &self.upload {
            Some(u) => u.clone(),
            None => {
                let u = store.start_upload(&self.key).await.map_err(Error::from)?;
                self.upload = Some(u.clone());
                u
            }
        };
        self.parts += 1;
        let data = self.buf.split().freeze();
        let len = data.len() as u64;
        upload
            .put_part(self.parts, self.sent, data)
            .await
            .map_err(Error::from)?;
        self.sent += len;
        Ok(())
    }

    /// Stores what is left and completes the pack: one PUT for a pack that never filled a part.
    async fn complete(mut self, store: &dyn ObjectStore) -> Result<()> {
        let done = async {
            if self.upload.is_none() {
                return store
                    .put(&self.key, self.buf.split().freeze())
                    .await
                    .map_err(Error::from);
            }
            if !self.buf.is_empty() {
                self.send_part(store).await?;
            }
            match &self.upload {
                Some(u) => u.complete().await.map_err(Error::from),
                None => Ok(()),
            }
        }
        .await;
        if done.is_err() {
            self.abort();
        }
        done.map_err(|e| e.context(format!("storing the pack {}", self.key)))
    }

    /// Aborts the upload, if one was started, in the background (from `Drop` too).
    fn abort(&mut self) {
        if let Some(upload) = self.upload.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(abort_upload(upload));
            }
        }
    }
}

/// Aborts a pack's multipart upload; one left open is swept by the next prune.
async fn abort_upload(upload: Arc<dyn Upload>) {
    if let Err(e) = upload.abort().await {
        tracing::warn!(key = upload.key(), error = %e, "Could not abort a pack's upload; the next prune sweeps it");
    }
}

impl Packer {
    /// Packs of `size` bytes into `store`, sent in parts of `part` bytes.
    pub(super) fn new(store: Arc<dyn ObjectStore>, size: u64, part: usize) -> Packer {
        Packer {
            store,
            size,
            part: part.max(1),
            open: tokio::sync::Mutex::new(None),
            completed: AtomicU64::new(0),
        }
    }

    /// Appends one content's age file; where it lies. It is stored once the pack is complete
    /// (at its size, or at [`Packer::finish`]).
    pub(super) async fn add(&self, sealed: &[u8]) -> Result<Packed> {
        let mut open = self.open.lock().await;
        let p = open.get_or_insert_with(Open::new);
        let at = Packed {
            pack: p.id,
            offset: p.written,
            len: sealed.len() as u64,
        };
        if p.buf.capacity() == 0 {
            // A part and the content that crosses its end (at most a sealed content kept in
            // memory: its bytes, zstd's frame and age's header and tags), in one allocation.
            p.buf
                .reserve(self.part + super::KEEP_IN_MEMORY + (64 << 10));
        }
        p.buf.extend_from_slice(sealed);
        p.written += at.len;
        if p.written >= self.size {
            if let Some(full) = open.take() {
                full.complete(self.store.as_ref()).await?;
                self.completed.fetch_add(1, Ordering::SeqCst);
            }
        } else if p.buf.len() >= self.part {
            if let Err(e) = p.send_part(self.store.as_ref()).await {
                if let Some(mut broken) = open.take() {
                    broken.abort();
                }
                return Err(e.context("storing a pack"));
            }
        }
        Ok(at)
    }

    /// Completes the open pack, if any: every content added is then stored.
    pub(super) async fn finish(&self) -> Result<()> {
        let open = self.open.lock().await.take();
        if let Some(p) = open {
            p.complete(self.store.as_ref()).await?;
            self.completed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Aborts the open pack, if any, for a run that failed: nothing of it becomes visible.
    pub(super) async fn abandon(&self) {
        let open = self.open.lock().await.take();
        if let Some(upload) = open.and_then(|mut p| p.upload.take()) {
            abort_upload(upload).await;
        }
    }

    /// Packs completed so far.
    pub(super) fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        // A run that failed, or was cancelled, with a pack open: it is aborted, never completed.
        if let Some(mut p) = self.open.get_mut().take() {
            p.abort();
        }
    }
}
