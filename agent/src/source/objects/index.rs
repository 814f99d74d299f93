//! The change index: what the previous run recorded of each object, read as a stream in path
//! order beside the listing, so that an unchanged object is not read again.
//!
//! What must hold:
//! - The index is `state/<source>/index.age`: a header line (`{"index": 3, "backup": ID}`),
//!   then the snapshot's lines, zstd inside age sealed with the index key (the agent holds no
//!   identity to read its snapshots).
//! - It is trusted only while the backup it describes is published: a run whose manifest never
//!   appeared (or a backup since pruned) may name blobs that blob collection has removed.
//! - It is read as it is merged: one entry is held at a time. A damaged index stops matching
//!   where the damage is; the objects after it are read again.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::{Entry, EntryKind, Listed};
use crate::policy::Secret;
use crate::repo::layout;
use crate::store::ObjectStore;

/// Version of the change index: a header line, then the snapshot's lines, zstd, sealed.
pub(super) const INDEX_FORMAT: u32 = 3;

/// The header line of the index written for backup `id`.
pub(super) fn header(id: &str) -> String {
    serde_json::json!({ "index": INDEX_FORMAT, "backup": id }).to_string() + "\n"
}

/// What the change index remembers of an object: enough to know it unchanged and to name its
/// content without reading it.
#[derive(Debug)]
pub(super) struct Known {
    pub(super) size: u64,
    mtime_ms: Option<i64>,
    etag: Option<String>,
    pub(super) sha256: [u8; 32],
    pub(super) blob: Option<[u8; 32]>,
}

impl Known {
    fn from_entry(e: Entry) -> Option<Known> {
        if e.kind != EntryKind::File {
            return None;
        }
        let blob = match &e.blob {
            Some(b) => Some(super::unhex32(b)?),
            None if e.size == 0 => None,
            None => return None,
        };
        Some(Known {
            size: e.size,
            mtime_ms: e.mtime_ms,
            etag: e.etag,
            sha256: super::unhex32(e.sha256.as_deref()?)?,
            blob,
        })
    }

    /// Same size, and the same ETag (S3) or modification time (directories).
    pub(super) fn unchanged(&self, l: &Listed) -> bool {
        self.size == l.size
            && match (&l.etag, &self.etag) {
                (Some(a), Some(b)) => a == b,
                _ => l.mtime_ms.is_some() && self.mtime_ms == l.mtime_ms,
            }
    }
}

/// The previous run's index, open for a merge in path order.
pub(super) struct Previous {
    lines: tokio::io::Split<BufReader<Box<dyn AsyncRead + Send + Unpin>>>,
    /// The entry read and not yet matched.
    pending: Option<Entry>,
    /// The backup it describes.
    pub(super) backup: String,
    /// Files it names, counted as it is read.
    files: u64,
    /// Where it stopped being readable, once it has.
    broken: bool,
    source: String,
}

impl Previous {
    /// The index of `source`'s last run, if there is one to trust.
    pub(super) async fn open(repo: &dyn ObjectStore, source: &str, key: &Secret) -> Option<Self> {
        let plain = match super::open_sealed(repo, &layout::change_index(source), key).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(source, error = %e.message, "No readable change index: every object is read");
                return None;
            }
        };
        let mut lines = BufReader::with_capacity(64 << 10, plain).split(b'\n');
        let backup = lines
            .next_segment()
            .await
            .ok()
            .flatten()
            .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
            .filter(|h| h["index"] == INDEX_FORMAT)
            .and_then(|h| h["backup"].as_str().map(str::to_string));
        let Some(backup) = backup else {
            tracing::debug!(
                source,
                "Change index unreadable or of another format: every object is read"
            );
            return None;
        };
        if !matches!(
            repo.size(&layout::manifest(source, &backup)).await,
            Ok(Some(_))
        ) {
            tracing::info!(
                source,
                backup,
                "The change index describes a backup that is not published: every object is read"
            );
            return None;
        }
        Some(Previous {
            lines,
            pending: None,
            backup,
            files: 0,
            broken: false,
            source: source.to_string(),
        })
    }

    /// What the index says of `path`. Calls must come in path order.
    pub(super) async fn find(&mut self, path: &str) -> Option<Known> {
        loop {
            if self.pending.is_none() {
                self.pending = Some(self.next().await?);
            }
            let e = self.pending.as_ref()?;
            match e.path.as_str().cmp(path) {
                std::cmp::Ordering::Greater => return None,
                std::cmp::Ordering::Less => self.pending = None,
                std::cmp::Ordering::Equal => return Known::from_entry(self.pending.take()?),
            }
        }
    }

    /// Reads what is left, and returns how many files the index names.
    pub(super) async fn finish(mut self) -> u64 {
        while self.next().await.is_some() {}
        self.files
    }

    async fn next(&mut self) -> Option<Entry> {
        if self.broken {
            return None;
        }
        let line = match self.lines.next_segment().await {
            Ok(Some(line)) => line,
            Ok(None) => return None,
            Err(e) => return self.broke(&e),
        };
        match serde_json::from_slice::<Entry>(&line) {
            Ok(e) => {
                if e.kind == EntryKind::File {
                    self.files += 1;
                }
                Some(e)
            }
            Err(e) => self.broke(&e),
        }
    }

    fn broke(&mut self, e: &dyn std::fmt::Display) -> Option<Entry> {
        tracing::info!(source = %self.source, error = %e, "Damaged change index: the objects after the damage are read again");
        self.broken = true;
        None
    }
}
