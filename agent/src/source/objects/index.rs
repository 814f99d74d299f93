//! The change index: what the previous run recorded of each object, read as a stream in path
//! order beside the listing, so that an unchanged object is not read again.
//!
//! What must hold:
//! - The index is the source's last published snapshot: it is sealed to an X25519 recipient
//!   derived from the index key as well as to the policy's recipients, so the agent (which holds
//!   no identity) reads it back. One stream serves both: no second copy is written.
//! - Only a published snapshot is trusted: a run whose manifest never appeared may name blobs
//!   that blob collection has removed. The last published one is the greatest backup id with a
//!   manifest (ids sort by time).
//! - Snapshots stored before the derived recipient cannot be opened so; for them the separate
//!   index an older run kept (`state/<source>/index.age`: a header line naming its backup, then
//!   the snapshot's lines, sealed with the index key) is read instead, if it describes that same
//!   backup. The next run's snapshot replaces it, and it is deleted.
//! - It is read as it is merged: one entry is held at a time. A damaged index stops matching
//!   where the damage is; the objects after it are read again.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::{Entry, EntryKind, Listed};
use crate::policy::Secret;
use crate::repo::layout;
use crate::store::ObjectStore;

/// Version of the separate change index older runs kept: a header line, then the snapshot's
/// lines, zstd, sealed.
const INDEX_FORMAT: u32 = 3;

/// What the change index remembers of an object: enough to know it unchanged and to name its
/// content without reading it.
#[derive(Debug)]
pub(super) struct Known {
    pub(super) size: u64,
    mtime_ms: Option<i64>,
    etag: Option<String>,
    pub(super) sha256: [u8; 32],
    pub(super) blob: Option<[u8; 32]>,
    /// Where in a pack the content is, when it is in one.
    pub(super) pack: Option<super::Packed>,
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
        let pack = match &e.pack {
            Some(slice) => Some(super::Packed::of(slice)?),
            None => None,
        };
        Some(Known {
            pack,
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
    lines: Lines,
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
    /// The snapshot of `source`'s last published backup, if there is one to read; and whether
    /// an older version's change index may be left in the repository (that snapshot does not
    /// open with the index key: this run's will).
    pub(super) async fn open(
        repo: &dyn ObjectStore,
        source: &str,
        key: &Secret,
    ) -> (Option<Self>, bool) {
        let backup = match last_published(repo, source).await {
            Ok(Some(b)) => b,
            Ok(None) => return (None, false),
            Err(e) => {
                tracing::info!(source, error = %e.message, "Cannot list the source's backups: every object is read");
                return (None, false);
            }
        };
        let snapshot = layout::backup_object(source, &backup, super::SNAPSHOT_OBJECT);
        let (lines, older) = match super::open_sealed(repo, &snapshot, key).await {
            Ok(plain) => (lines(plain), false),
            Err(e) => match older_index(repo, source, key, &backup).await {
                Some(lines) => (lines, true),
                None => {
                    tracing::info!(source, backup, error = %e.message, "The last snapshot cannot be read as the change index (a changed index key, or damage), nor does an older change index describe it: every object is read");
                    return (None, true);
                }
            },
        };
        let previous = Previous {
            lines,
            pending: None,
            backup,
            files: 0,
            broken: false,
            source: source.to_string(),
        };
        (Some(previous), older)
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

type Lines = tokio::io::Split<BufReader<Box<dyn AsyncRead + Send + Unpin>>>;

fn lines(plain: Box<dyn AsyncRead + Send + Unpin>) -> Lines {
    BufReader::with_capacity(64 << 10, plain).split(b'\n')
}

/// The greatest backup id of `source` with a manifest, listed a page at a time.
async fn last_published(
    repo: &dyn ObjectStore,
    source: &str,
) -> crate::error::Result<Option<String>> {
    let prefix = layout::source_prefix(source);
    let mut last = None;
    let mut after: Option<String> = None;
    loop {
        let page = repo
            .list_page(&prefix, after.as_deref())
            .await
            .map_err(crate::error::Error::from)?;
        for o in &page.0 {
            if let Some((_, id, name)) = layout::parse_backup_key(&o.key) {
                if name == layout::MANIFEST && last.as_deref().is_none_or(|l: &str| id > l) {
                    last = Some(id.to_string());
                }
            }
        }
        match page.0.last() {
            Some(o) if page.1 => after = Some(o.key.clone()),
            _ => return Ok(last),
        }
    }
}

/// The separate change index an older run kept, when it describes `backup`: its lines, past
/// the header line that names that backup.
async fn older_index(
    repo: &dyn ObjectStore,
    source: &str,
    key: &Secret,
    backup: &str,
) -> Option<Lines> {
    let plain = super::open_sealed(repo, &layout::change_index(source), key)
        .await
        .ok()?;
    let mut lines = lines(plain);
    let described = lines
        .next_segment()
        .await
        .ok()
        .flatten()
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .filter(|h| h["index"] == INDEX_FORMAT)
        .and_then(|h| h["backup"].as_str().map(str::to_string));
    if described.as_deref() != Some(backup) {
        tracing::info!(
            source,
            backup,
            "The change index does not describe the last published backup: every object is read"
        );
        return None;
    }
    Some(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline;
    use crate::store::fs::FsStore;

    const LINE: &str = r#"{"path":"a.txt","type":"file","size":3,"mtime_ms":1,"sha256":"0000000000000000000000000000000000000000000000000000000000000000","blob":"1111111111111111111111111111111111111111111111111111111111111111"}"#;

    fn sealed(recipients: &[age::x25519::Recipient], plain: &str) -> bytes::Bytes {
        let z = zstd::bulk::compress(plain.as_bytes(), 3).unwrap();
        pipeline::encrypt_small(recipients, &z).unwrap().into()
    }

    async fn publish(store: &FsStore, id: &str, snapshot: bytes::Bytes) {
        let put = |k: String, b: bytes::Bytes| async move { store.put(&k, b).await.unwrap() };
        put(
            layout::backup_object("s", id, super::super::SNAPSHOT_OBJECT),
            snapshot,
        )
        .await;
        put(layout::manifest("s", id), "{}".into()).await;
    }

    #[tokio::test]
    async fn the_last_published_snapshot_is_the_index_and_an_older_runs_index_only_for_its_own_backup(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().to_path_buf());
        let key = Secret::new("an index key of at least thirty-two characters");
        let user = age::x25519::Identity::generate().to_public();
        let derived = pipeline::index_x25519(&key).to_public();
        assert!(matches!(
            Previous::open(&store, "s", &key).await,
            (None, false)
        ));

        // A snapshot stored before the derived recipient, and the index its run kept.
        let id1 = "20261201T000000Z-aaaa";
        publish(&store, id1, sealed(std::slice::from_ref(&user), LINE)).await;
        let index = |backup: &str| {
            let plain = format!("{{\"index\":3,\"backup\":\"{backup}\"}}\n{LINE}\n");
            bytes::Bytes::from(
                super::super::seal(&key, &zstd::bulk::compress(plain.as_bytes(), 3).unwrap())
                    .unwrap(),
            )
        };
        store
            .put(&layout::change_index("s"), index(id1))
            .await
            .unwrap();
        let (p, older) = Previous::open(&store, "s", &key).await;
        let mut p = p.expect("the older index");
        assert!(older, "the older index is to be deleted");
        assert_eq!(p.backup, id1);
        assert_eq!(p.find("a.txt").await.map(|k| k.size), Some(3));

        // An index describing another backup is not trusted.
        store
            .put(&layout::change_index("s"), index("20261130T000000Z-bbbb"))
            .await
            .unwrap();
        assert!(matches!(
            Previous::open(&store, "s", &key).await,
            (None, true)
        ));

        // A snapshot sealed to the derived recipient is read itself.
        let id2 = "20261202T000000Z-cccc";
        publish(&store, id2, sealed(&[user.clone(), derived.clone()], LINE)).await;
        let (p, older) = Previous::open(&store, "s", &key).await;
        let mut p = p.expect("the snapshot");
        assert!(!older);
        assert_eq!(p.backup, id2);
        assert_eq!(p.find("a.txt").await.map(|k| k.size), Some(3));
        assert_eq!(p.finish().await, 1);

        // A newer run that never got its manifest is not the last published.
        store
            .put(
                &layout::backup_object("s", "20261203T000000Z-dddd", super::super::SNAPSHOT_OBJECT),
                sealed(&[user, derived], LINE),
            )
            .await
            .unwrap();
        let p = Previous::open(&store, "s", &key)
            .await
            .0
            .expect("the snapshot");
        assert_eq!(p.backup, id2);

        // Another index key opens nothing.
        let other = Secret::new("another index key of thirty-two characters");
        assert!(Previous::open(&store, "s", &other).await.0.is_none());
    }
}
