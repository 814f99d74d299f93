//! Objects sources: point-in-time snapshots of a directory tree or an S3 prefix, each object's
//! content stored once as a content-addressed blob shared by every snapshot.
//!
//! What must hold:
//! - A blob is `objects/<2 hex>/<id>.age`: the object's content, zstd inside age. Its id is a
//!   keyed hash of the content's SHA-256 (`encryption.index_key`), so ids reveal nothing about
//!   content to whoever holds the bucket, and the same content is stored once.
//! - The snapshot (every path, size, mtime or ETag, mode, SHA-256 and blob id; directories too) is
//!   the backup's data object; the job writes the manifest after it, as for every source.
//! - A run reads only what changed: the last published snapshot is its change index ([`index`]).
//!   The agent holds no identity, so a snapshot is also sealed to an X25519 recipient derived
//!   from the index key. An object whose size and mtime (or ETag) match it is not read again.
//! - A run holds no list of the objects: the listing ([`listing`]) and the previous snapshot
//!   are merged as two streams in path order, entries are written as they come, and the sets
//!   that grow with the object count (blob ids) are sorted on the temp disk ([`crate::sorted`]).
//! - The snapshot is a series of zstd frames of about 4 MiB of whole entries, and the
//!   fingerprint records each frame's first path (`frame_paths`), so that a restore of one path
//!   reads only the frames that can hold it (ARCHITECTURE.md, "Seekable snapshots").
//! - Every blob is uploaded before the snapshot that names it; the content uploaded must hash to
//!   what the first pass read. The second read takes only as many bytes as the first: a file
//!   being appended to is stored as the first read saw it. One rewritten between the reads is
//!   read again; one that changes at every read is left out of the snapshot and named in it.
//! - Guards: an empty listing, or one that shrank by more than `max_shrink_percent` since the
//!   previous snapshot, fails the run instead of recording a snapshot of nothing. It is judged
//!   when the listing ends, before the snapshot is finished.

pub mod blobs;
pub mod check;
mod index;
mod listing;
mod pack;
pub mod policy;
pub mod restore;
pub mod verify;

pub use policy::{ObjectsConfig, ObjectsFrom, RawObjectsSource};

use index::Known;

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{BackupContext, Source, SourceBackup};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, NoObserver};
use crate::policy::Secret;
use crate::repo::layout;
use crate::repo::manifest::Role;
use crate::repo::origin::Origin;
use crate::sorted;
use crate::store::{self, ObjectStore};

/// Object name of the snapshot listing.
pub const SNAPSHOT_OBJECT: &str = "snapshot.jsonl.zst.age";

/// Object name of a snapshot's blob list: every blob id it names, one per line, sorted, sealed
/// with the index key so that the agent (which holds no identity) can collect unused blobs.
pub const BLOB_LIST_OBJECT: &str = "blobs.txt.age";

/// What a snapshot records of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the source root, `/`-separated.
    pub path: String,
    /// `file` or `dir`.
    #[serde(rename = "type")]
    pub kind: EntryKind,
    /// Bytes (files).
    #[serde(default)]
    pub size: u64,
    /// Modification time, Unix milliseconds (directories and S3 objects).
    pub mtime_ms: Option<i64>,
    /// Unix permission bits (directories).
    pub mode: Option<u32>,
    /// ETag (S3).
    pub etag: Option<String>,
    /// SHA-256 of the content, hex (files).
    pub sha256: Option<String>,
    /// The blob holding the content (files).
    pub blob: Option<String>,
    /// What the link points to, as the link holds it (symlinks; never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Where the content is, when it is stored in a pack rather than as a blob of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<PackSlice>,
}

/// A content stored in a pack: the pack's id, and where its age file lies in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackSlice {
    /// The pack, stored as `objects/<2 hex>/<id>.age`.
    pub id: String,
    /// Offset of the content's age file in the pack.
    pub offset: u64,
    /// Length of that age file.
    pub len: u64,
}

/// A [`PackSlice`], raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Packed {
    pub(crate) pack: sorted::Id,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl Packed {
    fn slice(&self) -> PackSlice {
        PackSlice {
            id: hex::encode(self.pack),
            offset: self.offset,
            len: self.len,
        }
    }

    fn of(slice: &PackSlice) -> Option<Packed> {
        Some(Packed {
            pack: unhex32(&slice.id)?,
            offset: slice.offset,
            len: slice.len,
        })
    }
}

/// A file's content as a record sorted on the temp disk: the object it is stored in (its blob,
/// or the pack that holds it), its offset and length in the pack (zeros for a blob of its own),
/// and its SHA-256 (zeros when not known). Sorted, a pack's contents come together, in the
/// order they lie in it.
pub(crate) type ContentRecord = [u8; 80];

/// The record of a file entry's content; `None` for one that names none (an empty file).
pub(crate) fn content_record(e: &Entry) -> Result<Option<ContentRecord>> {
    let Some(stored) = e.stored() else {
        return Ok(None);
    };
    let mut r = [0u8; 80];
    let object = match &stored {
        Stored::Blob(id) => id,
        Stored::Packed(p) => {
            r[32..40].copy_from_slice(&p.offset.to_be_bytes());
            r[40..48].copy_from_slice(&p.len.to_be_bytes());
            &p.id
        }
    };
    let hex_ok = hex::decode_to_slice(object, &mut r[..32]).is_ok()
        && e.sha256
            .as_ref()
            .is_none_or(|sha| hex::decode_to_slice(sha, &mut r[48..80]).is_ok());
    if !hex_ok {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "snapshot entry {}: a blob or pack id, or a SHA-256, that is not hex",
                e.path
            ),
        ));
    }
    Ok(Some(r))
}

/// The record of a stored object alone, its content unknown (from a blob list).
pub(crate) fn object_record(id: sorted::Id) -> ContentRecord {
    let mut r = [0u8; 80];
    r[..32].copy_from_slice(&id);
    r
}

/// Where a [`ContentRecord`]'s content is stored, and its SHA-256 when known.
pub(crate) fn record_parts(r: &ContentRecord) -> (Stored, Option<String>) {
    let object = hex::encode(&r[..32]);
    let len = u64::from_be_bytes(r[40..48].try_into().unwrap_or_default());
    let stored = if len == 0 {
        Stored::Blob(object)
    } else {
        Stored::Packed(PackSlice {
            id: object,
            offset: u64::from_be_bytes(r[32..40].try_into().unwrap_or_default()),
            len,
        })
    };
    let sha = r[48..80]
        .iter()
        .any(|b| *b != 0)
        .then(|| hex::encode(&r[48..80]));
    (stored, sha)
}

/// Where a file's content is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A blob of its own, by id.
    Blob(String),
    /// A slice of a pack.
    Packed(PackSlice),
}

impl Stored {
    /// The object holding the content.
    pub fn key(&self) -> String {
        match self {
            Stored::Blob(id) => layout::blob(id),
            Stored::Packed(p) => layout::blob(&p.id),
        }
    }

    /// The object, and for a pack the bytes of it, for messages.
    pub fn describe(&self) -> String {
        match self {
            Stored::Blob(_) => self.key(),
            Stored::Packed(p) => format!(
                "{} bytes {}–{}",
                self.key(),
                p.offset,
                p.offset + p.len.max(1) - 1
            ),
        }
    }
}

impl Entry {
    /// Where the content is stored; `None` for an empty file (or an entry that names nothing).
    pub fn stored(&self) -> Option<Stored> {
        match (&self.pack, &self.blob) {
            (Some(p), _) => Some(Stored::Packed(p.clone())),
            (None, Some(b)) => Some(Stored::Blob(b.clone())),
            (None, None) => None,
        }
    }
}

/// The kind of a snapshot entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file or an S3 object.
    File,
    /// A directory (kept so that empty ones are restored too).
    Dir,
    /// A symbolic link (directory sources): its target is recorded, never followed.
    Symlink,
}

/// What an objects backup's fingerprint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Format version.
    pub format: u32,
    /// Always `objects`.
    pub kind: super::Kind,
    /// The source as written in the policy.
    pub from: String,
    /// Files (objects).
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Bytes over all files.
    pub bytes: u64,
    /// Distinct contents the snapshot names (blob ids), in packs or of their own.
    pub blobs: u64,
    /// Blobs this run uploaded (the rest were already stored), in packs or of their own.
    pub blobs_uploaded: u64,
    /// Packs holding contents the snapshot names.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub packs: u64,
    /// Packs this run stored.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub packs_uploaded: u64,
    /// Unchanged contents stored again, out of packs the last prune found mostly unused.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repacked: u64,
    /// SHA-256 over every `path NUL sha256 LF` (a symlink's: `path NUL -> target LF`) in path
    /// order: the whole tree's content.
    pub tree_sha256: String,
    /// Symbolic links.
    #[serde(default)]
    pub symlinks: u64,
    /// What the walk found and did not store, by name and why (sockets, devices, FIFOs, a link
    /// whose target is not UTF-8, an object deleted before it could be read or changing at every
    /// read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Not stored either, beyond the first 1,000 named in `skipped`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_more: u64,
    /// The first path of each zstd frame of the snapshot after the first, in the order of the
    /// snapshot part's seek index (one frame per 4 MiB of snapshot or more): a restore of one
    /// path reads only the frames that can hold it. Empty for a snapshot of one frame.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frame_paths: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// SHA-256 of no bytes: an empty file needs no blob.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The blob id of content with SHA-256 `sha` (hex), keyed by the index key.
pub fn blob_id(index_key: &Secret, sha: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"lifeboat-blob-v1\0");
    h.update(index_key.expose().as_bytes());
    h.update(b"\0");
    h.update(sha.as_bytes());
    hex::encode(h.finalize())
}

/// SHA-256 over the tree: each file's path and content hash, and each symlink's path and
/// target, in path order.
pub fn tree_sha256(entries: &[Entry]) -> String {
    let mut h = Sha256::new();
    for e in entries {
        tree_line(&mut h, e);
    }
    hex::encode(h.finalize())
}

/// Adds `e` to a tree hash: `path NUL sha256 LF` for a file, `path NUL -> target LF` for a
/// symlink, nothing for a directory.
fn tree_line(h: &mut Sha256, e: &Entry) {
    let value = match e.kind {
        EntryKind::Dir => return,
        EntryKind::File => e.sha256.as_deref().unwrap_or("").to_string(),
        EntryKind::Symlink => format!("-> {}", e.target.as_deref().unwrap_or("")),
    };
    h.update(e.path.as_bytes());
    h.update(b"\0");
    h.update(value.as_bytes());
    h.update(b"\n");
}

/// Serializes a snapshot as JSON lines.
pub fn encode_snapshot(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut out, e)
            .map_err(|e| Error::failed(format!("cannot encode the snapshot: {e}")))?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Parses a snapshot; every path must stay inside the target (no `..`, not absolute).
pub fn decode_snapshot(bytes: &[u8]) -> Result<Vec<Entry>> {
    bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| decode_line(i + 1, line))
        .collect()
}

/// Parses line `n` of a snapshot.
fn decode_line(n: usize, line: &[u8]) -> Result<Entry> {
    let e: Entry = serde_json::from_slice(line)
        .map_err(|e| Error::new(ErrorKind::Integrity, format!("snapshot line {n}: {e}")))?;
    if !safe_path(&e.path) {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("snapshot line {n}: the path {:?} leaves the target", e.path),
        ));
    }
    Ok(e)
}

/// A snapshot's entries read one at a time from its plaintext, each checked as
/// [`decode_snapshot`] checks them: a snapshot of any size is never held whole.
pub struct SnapshotReader<R> {
    r: R,
    line: Vec<u8>,
    n: usize,
}

impl<R: tokio::io::AsyncBufRead + Unpin> SnapshotReader<R> {
    /// Reads the snapshot `r` holds.
    pub fn new(r: R) -> Self {
        SnapshotReader {
            r,
            line: Vec::new(),
            n: 0,
        }
    }

    /// The next entry, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Entry>> {
        use tokio::io::AsyncBufReadExt;
        loop {
            self.line.clear();
            let got = self
                .r
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|e| Error::new(ErrorKind::Integrity, format!("the snapshot: {e}")))?;
            if got == 0 {
                return Ok(None);
            }
            self.n += 1;
            let line = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            if !line.is_empty() {
                return decode_line(self.n, line).map(Some);
            }
        }
    }
}

fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// One listed object, before hashing.
#[derive(Debug, Clone)]
struct Listed {
    path: String,
    kind: EntryKind,
    size: u64,
    mtime_ms: Option<i64>,
    mode: Option<u32>,
    etag: Option<String>,
    /// A symlink's target.
    target: Option<String>,
}

/// An objects source.
pub struct Objects {
    cfg: ObjectsConfig,
    index_key: Option<Secret>,
}

impl Objects {
    /// The source for `cfg`; `index_key` from `[encryption]`.
    pub fn new(cfg: ObjectsConfig, index_key: Option<Secret>) -> Self {
        Objects { cfg, index_key }
    }

    /// What a snapshot is taken from: the bucket and prefix (its endpoint a detail), or the
    /// directory's absolute path.
    fn origin(&self) -> Origin {
        match &self.cfg.from {
            ObjectsFrom::S3(s3) => {
                let origin = Origin::new(format!("s3://{}/{}", s3.bucket, s3.prefix));
                match &s3.endpoint {
                    Some(e) => origin.detail("endpoint", e.clone()),
                    None => origin,
                }
            }
            ObjectsFrom::Dir(dir) => {
                let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
                Origin::new(format!("directory {}", dir.display()))
            }
        }
    }

    fn key(&self) -> Result<&Secret> {
        self.index_key.as_ref().ok_or_else(|| {
            Error::new(ErrorKind::Invalid, "objects sources need encryption.index_key")
                .hint("set encryption.index_key = \"${LIFEBOAT_INDEX_KEY}\" (a secret of at least 32 characters)")
        })
    }

    fn filter(&self) -> Result<(globset::GlobSet, globset::GlobSet)> {
        let build = |globs: &[String]| {
            let mut b = globset::GlobSetBuilder::new();
            for g in globs {
                b.add(
                    globset::Glob::new(g)
                        .map_err(|e| Error::new(ErrorKind::Invalid, format!("glob `{g}`: {e}")))?,
                );
            }
            b.build()
                .map_err(|e| Error::new(ErrorKind::Invalid, format!("globs: {e}")))
        };
        Ok((build(&self.cfg.include)?, build(&self.cfg.exclude)?))
    }

    /// The S3 source's store, its requests counted into `requests`.
    async fn source_store(
        &self,
        requests: Arc<store::counted::Requests>,
    ) -> Result<Option<Arc<dyn ObjectStore>>> {
        match &self.cfg.from {
            ObjectsFrom::S3(cfg) => {
                let inner: Arc<dyn ObjectStore> = Arc::new(store::s3::S3Store::new(cfg).await?);
                let retried = Arc::new(store::retry::Retry::new(
                    inner,
                    store::retry::Backoff::default(),
                ));
                Ok(Some(Arc::new(store::counted::Counted::new(
                    retried, requests,
                ))))
            }
            ObjectsFrom::Dir(_) => Ok(None),
        }
    }

    async fn open(
        &self,
        s3: Option<&Arc<dyn ObjectStore>>,
        path: &str,
    ) -> Result<Pin<Box<dyn AsyncRead + Send>>> {
        match (&self.cfg.from, s3) {
            (ObjectsFrom::Dir(root), _) => {
                let f = tokio::fs::File::open(root.join(path)).await.map_err(|e| {
                    Error::failed(format!("{}: reading {path}: {e}", self.cfg.from_shown))
                })?;
                // Read in large pieces by both readers: no buffer of its own.
                Ok(Box::pin(f))
            }
            (_, Some(s3)) => s3
                .open(path)
                .await
                .map(|r| Box::pin(r) as Pin<Box<dyn AsyncRead + Send>>)
                .map_err(|e| {
                    Error::from(e).context(format!("reading {path} from {}", self.cfg.from_shown))
                }),
            _ => Err(Error::failed("no source store")),
        }
    }

    /// True when `path` no longer exists in the source.
    async fn gone(&self, s3: Option<&Arc<dyn ObjectStore>>, path: &str) -> bool {
        match (&self.cfg.from, s3) {
            (ObjectsFrom::Dir(root), _) => tokio::fs::symlink_metadata(root.join(path))
                .await
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound),
            (_, Some(s3)) => matches!(s3.size(path).await, Ok(None)),
            _ => false,
        }
    }

    /// The shrink guard: an empty listing, or one that lost more than `max_shrink_percent` of
    /// the last snapshot's objects, is refused rather than recorded.
    fn shrink_guard(&self, files: u64, previous: u64) -> Result<()> {
        if let Some(max) = self.cfg.max_shrink_percent {
            if files == 0 {
                return Err(Error::failed(format!(
                "{} lists no objects: refusing to record an empty snapshot",
                self.cfg.from_shown
            ))
            .hint("if the source really is empty now, set allow_shrink = true for one run (RUNBOOK.md#objects-shrink-guard)"));
            }
            if previous > 0 && files * 100 < previous * (100 - u64::from(max)) {
                return Err(Error::failed(format!(
                "{} lists {files} objects, down from {previous} in the last snapshot (more than {max}% fewer): refusing to record it",
                self.cfg.from_shown
            ))
            .hint("if the deletions are intended, set allow_shrink = true for one run (RUNBOOK.md#objects-shrink-guard)"));
            }
        }
        Ok(())
    }
}

/// The first bytes of a zstd frame (never those of a hex line).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Encrypts `plain` with the index key (age, scrypt recipient).
pub fn seal(key: &Secret, plain: &[u8]) -> Result<Vec<u8>> {
    let fail =
        |e: &dyn std::fmt::Display| Error::failed(format!("encrypting with the index key: {e}"));
    let r = pipeline::index_recipient(key);
    let enc = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
        .map_err(|e| fail(&e))?;
    let mut out = Vec::new();
    let mut w = enc.wrap_output(&mut out).map_err(|e| fail(&e))?;
    std::io::Write::write_all(&mut w, plain)
        .and_then(|_| w.finish().map(|_| ()))
        .map_err(|e| fail(&e))?;
    Ok(out)
}

/// Decrypts what [`seal`] wrote; `None` for a wrong key or damaged bytes.
pub fn unseal(key: &Secret, sealed: &[u8]) -> Option<Vec<u8>> {
    let id = pipeline::index_identity(key);
    let mut r = age::Decryptor::new(sealed)
        .ok()?
        .decrypt(std::iter::once(&id as &dyn age::Identity))
        .ok()?;
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut v).ok()?;
    Some(v)
}

/// Opens `object`, which a run streamed sealed with the index key (its scrypt recipient, or
/// the X25519 recipient derived from it beside the policy's), as its plaintext.
pub(crate) async fn open_sealed(
    store: &dyn ObjectStore,
    object: &str,
    key: &Secret,
) -> Result<Box<dyn AsyncRead + Send + Unpin>> {
    let stored = store.open(object).await.map_err(Error::from)?;
    let identities: Vec<Box<dyn age::Identity + Send + Sync>> = vec![
        Box::new(pipeline::index_x25519(key)),
        Box::new(pipeline::index_identity(key)),
    ];
    Ok(Box::new(
        pipeline::decrypt_stream(stored, &identities).await?,
    ))
}

/// A line of a blob list. Lines are sorted by their id, each id once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListLine {
    /// A blob of its own: `<id>`.
    Blob(sorted::Id),
    /// A pack that holds contents the snapshot names: `<id> pack`.
    Pack(sorted::Id),
    /// A content stored in a pack: `<content id> <pack id> <offset> <len>`.
    Packed(sorted::Id, Packed),
}

/// A [`ListLine`] as a record sorted on the temp disk: id, kind, pack, offset, length.
pub(crate) type ListRecord = [u8; 81];

impl ListLine {
    /// The id the line is sorted by.
    pub(crate) fn id(&self) -> sorted::Id {
        match self {
            ListLine::Blob(id) | ListLine::Pack(id) | ListLine::Packed(id, _) => *id,
        }
    }

    /// The stored object the line names (a blob or a pack): what must stay stored. A content
    /// in a pack names none; its pack has a line of its own.
    pub(crate) fn object(&self) -> Option<sorted::Id> {
        match self {
            ListLine::Blob(id) | ListLine::Pack(id) => Some(*id),
            ListLine::Packed(..) => None,
        }
    }

    /// Parses a line (without its newline).
    fn parse(line: &[u8]) -> Option<ListLine> {
        let line = std::str::from_utf8(line).ok()?;
        let mut words = line.split(' ');
        let id = unhex32(words.next()?)?;
        let got = match (words.next(), words.next(), words.next()) {
            (None, ..) => ListLine::Blob(id),
            (Some("pack"), None, _) => ListLine::Pack(id),
            (Some(pack), Some(offset), Some(len)) => ListLine::Packed(
                id,
                Packed {
                    pack: unhex32(pack)?,
                    offset: offset.parse().ok()?,
                    len: len.parse().ok().filter(|n| *n > 0)?,
                },
            ),
            _ => return None,
        };
        words.next().is_none().then_some(got)
    }

    /// The line, with its newline.
    fn text(&self) -> String {
        match self {
            ListLine::Blob(id) => format!("{}\n", hex::encode(id)),
            ListLine::Pack(id) => format!("{} pack\n", hex::encode(id)),
            ListLine::Packed(id, p) => format!(
                "{} {} {} {}\n",
                hex::encode(id),
                hex::encode(p.pack),
                p.offset,
                p.len
            ),
        }
    }

    fn record(&self) -> ListRecord {
        let mut r = [0u8; 81];
        r[..32].copy_from_slice(&self.id());
        match self {
            ListLine::Blob(_) => {}
            ListLine::Pack(_) => r[32] = 1,
            ListLine::Packed(_, p) => {
                r[32] = 2;
                r[33..65].copy_from_slice(&p.pack);
                r[65..73].copy_from_slice(&p.offset.to_be_bytes());
                r[73..81].copy_from_slice(&p.len.to_be_bytes());
            }
        }
        r
    }

    fn of_record(r: &ListRecord) -> ListLine {
        let id = r[..32].try_into().unwrap_or_default();
        match r[32] {
            0 => ListLine::Blob(id),
            1 => ListLine::Pack(id),
            _ => ListLine::Packed(
                id,
                Packed {
                    pack: r[33..65].try_into().unwrap_or_default(),
                    offset: u64::from_be_bytes(r[65..73].try_into().unwrap_or_default()),
                    len: u64::from_be_bytes(r[73..81].try_into().unwrap_or_default()),
                },
            ),
        }
    }
}

/// Where a stored content is, for lookups by its id: the id, then the pack, offset and length
/// (zeros for a blob of its own).
type KnownRecord = [u8; 80];

fn known_record(id: &sorted::Id, at: Option<Packed>) -> KnownRecord {
    let mut r: KnownRecord = [0u8; 80];
    r[..32].copy_from_slice(id);
    if let Some(p) = at {
        r[32..64].copy_from_slice(&p.pack);
        r[64..72].copy_from_slice(&p.offset.to_be_bytes());
        r[72..80].copy_from_slice(&p.len.to_be_bytes());
    }
    r
}

/// Where the content of record `r` is: `None` for a blob of its own.
fn known_place(r: &KnownRecord) -> Option<Packed> {
    let len = u64::from_be_bytes(r[72..80].try_into().unwrap_or_default());
    (len > 0).then(|| Packed {
        pack: r[32..64].try_into().unwrap_or_default(),
        offset: u64::from_be_bytes(r[64..72].try_into().unwrap_or_default()),
        len,
    })
}

/// Calls `each` with every line of a blob list's plaintext, in its order; returns how many.
async fn each_line(
    plain: impl AsyncRead + Unpin,
    mut each: impl FnMut(ListLine) -> std::io::Result<()>,
) -> Result<u64> {
    let io = |e: std::io::Error| Error::failed(format!("reading the blob list: {e}"));
    let mut lines = tokio::io::AsyncBufReadExt::split(tokio::io::BufReader::new(plain), b'\n');
    let mut n = 0;
    while let Some(line) = lines.next_segment().await.map_err(io)? {
        let line = ListLine::parse(&line)
            .ok_or_else(|| Error::new(ErrorKind::Integrity, "a line that is not a blob list's"))?;
        each(line).map_err(|e| Error::failed(format!("sorting blob ids on the temp disk: {e}")))?;
        n += 1;
    }
    Ok(n)
}

/// Reads the blob list of backup `m` as a stream (checked against the manifest, decrypted with
/// the index key), calling `each` with every stored object it names (blobs and packs); returns
/// how many. `Ok(Err(why))` when the list is missing, damaged or sealed with another key; `Err`
/// when the repository cannot be read.
pub(crate) async fn read_blob_list(
    repo: &crate::repo::Repository,
    m: &crate::repo::manifest::Manifest,
    key: &Secret,
    mut each: impl FnMut(sorted::Id) -> std::io::Result<()>,
) -> Result<std::result::Result<u64, String>> {
    let mut list = match BlobList::open(repo, m, key).await? {
        Ok(list) => list,
        Err(why) => return Ok(Err(why)),
    };
    let mut n = 0;
    loop {
        match list.next().await? {
            Ok(Some(line)) => {
                if let Some(id) = line.object() {
                    each(id).map_err(|e| Error::failed(format!("sorting blob ids: {e}")))?;
                    n += 1;
                }
            }
            Ok(None) => return Ok(Ok(n)),
            Err(why) => return Ok(Err(why)),
        }
    }
}

/// A backup's blob list, open: its lines in increasing order of id, read as a stream (lists an
/// older version wrote whole are read whole, and sorted).
pub(crate) struct BlobList {
    ids: BlobIds,
    object: String,
    last: Option<sorted::Id>,
    /// When counted: the bytes of each pack its contents take ([`BlobList::counting_packs`]).
    packed: Option<HashMap<sorted::Id, u64>>,
}

enum BlobIds {
    Whole(std::vec::IntoIter<sorted::Id>),
    Stream(tokio::io::Split<tokio::io::BufReader<Pin<Box<dyn AsyncRead + Send>>>>),
}

impl BlobList {
    /// The blob list of `m`; `Ok(Err(why))` when it is missing, or cannot be read with `key`.
    pub(crate) async fn open(
        repo: &crate::repo::Repository,
        m: &crate::repo::manifest::Manifest,
        key: &Secret,
    ) -> Result<std::result::Result<BlobList, String>> {
        let Some(part) = m.parts.iter().find(|p| p.role == Role::BlobList) else {
            return Ok(Err(format!(
                "backup {}/{} has no blob list (written by an older version)",
                m.source, m.id
            )));
        };
        let object = layout::backup_object(&m.source, &m.id, &part.name);
        let unreadable = |e: Error| match e.kind {
            ErrorKind::Integrity | ErrorKind::Credential => Ok(Err(e.message)),
            _ => Err(e.context(format!("reading {object}"))),
        };
        let list = |ids| BlobList {
            ids,
            object: object.clone(),
            last: None,
            packed: None,
        };
        if !part.format.contains("zstd") {
            // An empty list, or one written whole by an older version: read whole.
            let bytes = match repo.store.get(&object).await {
                Ok(b) => b,
                Err(crate::store::StoreError::NotFound { .. }) => {
                    return Ok(Err(format!("{object} is missing")))
                }
                Err(e) => return unreadable(Error::from(e).context(&object)),
            };
            if hex::encode(Sha256::digest(&bytes)) != part.sha256_stored {
                return Ok(Err(format!("{object} does not match its manifest")));
            }
            let mut ids = match parse_blob_list(key, &bytes) {
                Ok(ids) => ids.iter().filter_map(|id| unhex32(id)).collect::<Vec<_>>(),
                Err(why) => return Ok(Err(format!("{object}: {why}"))),
            };
            ids.sort_unstable();
            ids.dedup();
            return Ok(Ok(list(BlobIds::Whole(ids.into_iter()))));
        }
        let stored = match repo.store.open(&object).await {
            Ok(r) => r,
            Err(crate::store::StoreError::NotFound { .. }) => {
                return Ok(Err(format!("{object} is missing")))
            }
            Err(e) => return Err(Error::from(e).context(format!("reading {object}"))),
        };
        let identities: Vec<Box<dyn age::Identity + Send + Sync>> =
            vec![Box::new(pipeline::index_identity(key))];
        match crate::restore::checked_plaintext(stored, &object, part, &identities).await {
            Ok(plain) => Ok(Ok(list(BlobIds::Stream(
                tokio::io::AsyncBufReadExt::split(tokio::io::BufReader::new(plain), b'\n'),
            )))),
            Err(e) => unreadable(e),
        }
    }

    /// The next line; `Ok(Err(why))` when the list turns out damaged (its hash is checked at
    /// its end) or not in increasing order.
    pub(crate) async fn next(&mut self) -> Result<std::result::Result<Option<ListLine>, String>> {
        let line = match &mut self.ids {
            BlobIds::Whole(ids) => ids.next().map(ListLine::Blob),
            BlobIds::Stream(lines) => match lines.next_segment().await {
                Ok(Some(line)) => match ListLine::parse(&line) {
                    Some(line) => Some(line),
                    None => {
                        return Ok(Err(format!(
                            "{}: a line that is not a blob list's",
                            self.object
                        )))
                    }
                },
                Ok(None) => None,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Ok(Err(format!("{}: {e}", self.object)))
                }
                Err(e) => return Err(Error::failed(format!("reading {}: {e}", self.object))),
            },
        };
        let id = line.as_ref().map(ListLine::id);
        if let (Some(id), Some(last)) = (id, self.last) {
            if id <= last {
                return Ok(Err(format!(
                    "{}: its ids are not in increasing order",
                    self.object
                )));
            }
        }
        if id.is_some() {
            self.last = id;
        }
        if let (Some(packed), Some(ListLine::Packed(_, p))) = (&mut self.packed, &line) {
            *packed.entry(p.pack).or_default() += p.len;
        }
        Ok(Ok(line))
    }

    /// From now on, counts the bytes of each pack the list's contents take.
    pub(crate) fn counting_packs(mut self) -> Self {
        self.packed = Some(HashMap::new());
        self
    }

    /// The bytes of each pack the contents read so far take (when counted).
    pub(crate) fn packed_bytes(&mut self) -> HashMap<sorted::Id, u64> {
        self.packed.take().unwrap_or_default()
    }

    /// The next stored object the list names (a blob or a pack), skipping the lines of
    /// contents in packs; as [`BlobList::next`] otherwise.
    pub(crate) async fn next_object(
        &mut self,
    ) -> Result<std::result::Result<Option<sorted::Id>, String>> {
        loop {
            match self.next().await? {
                Ok(Some(line)) => {
                    if let Some(id) = line.object() {
                        return Ok(Ok(Some(id)));
                    }
                }
                Ok(None) => return Ok(Ok(None)),
                Err(why) => return Ok(Err(why)),
            }
        }
    }
}

/// Reads a blob list written by a backup: the ids, or why it cannot be read.
pub fn parse_blob_list(key: &Secret, sealed: &[u8]) -> std::result::Result<Vec<String>, String> {
    let plain = unseal(key, sealed).ok_or("it does not open with this policy's index key")?;
    let plain = if plain.starts_with(&ZSTD_MAGIC) {
        zstd::stream::decode_all(&plain[..]).map_err(|_| "its zstd stream is damaged")?
    } else {
        plain
    };
    let text = String::from_utf8(plain).map_err(|_| "it is not text")?;
    let ids: Vec<String> = text.lines().map(str::to_string).collect();
    if ids
        .iter()
        .any(|id| id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err("it holds a line that is not a blob id".into());
    }
    Ok(ids)
}

/// Contents up to this size are read once and kept in memory for the upload; larger ones are
/// read a second time to upload them.
const KEEP_IN_MEMORY: usize = 1 << 20;

/// The first read of an object listed at `listed` bytes: its SHA-256, its size and, when
/// small, its bytes. The buffers are sized by the listing: a million files of a few bytes
/// each must not cost a million 256 KiB buffers zeroed and freed.
async fn first_read(
    mut r: Pin<Box<dyn AsyncRead + Send>>,
    listed: u64,
) -> std::io::Result<(String, u64, Option<Bytes>)> {
    let mut read = FirstRead::new(listed);
    let mut buf = read.buffer();
    loop {
        match r.read(&mut buf).await? {
            0 => return Ok(read.finish()),
            got => read.add(&buf[..got]),
        }
    }
}

/// [`first_read`] of a file of a directory source, in one blocking call: open, read and
/// close, where reading through the runtime's file would be a blocking call for each.
async fn first_read_file(
    path: std::path::PathBuf,
    listed: u64,
) -> std::io::Result<(String, u64, Option<Bytes>)> {
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(path)?;
        let mut read = FirstRead::new(listed);
        let mut buf = read.buffer();
        loop {
            match std::io::Read::read(&mut f, &mut buf)? {
                0 => return Ok(read.finish()),
                got => read.add(&buf[..got]),
            }
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// What a first read has seen so far.
struct FirstRead {
    hash: Sha256,
    len: u64,
    kept: Option<Vec<u8>>,
    listed: u64,
}

impl FirstRead {
    fn new(listed: u64) -> FirstRead {
        FirstRead {
            hash: Sha256::new(),
            len: 0,
            kept: Some(Vec::with_capacity((listed as usize).min(KEEP_IN_MEMORY))),
            listed,
        }
    }

    /// A read buffer for it: one byte more than listed, so that a file read whole sees its end
    /// in the next read.
    fn buffer(&self) -> Vec<u8> {
        vec![
            0u8;
            (self.listed as usize)
                .saturating_add(1)
                .clamp(4 << 10, 256 << 10)
        ]
    }

    fn add(&mut self, chunk: &[u8]) {
        self.hash.update(chunk);
        self.len += chunk.len() as u64;
        if let Some(k) = &mut self.kept {
            if k.len() + chunk.len() <= KEEP_IN_MEMORY {
                k.extend_from_slice(chunk);
            } else {
                self.kept = None;
            }
        }
    }

    fn finish(self) -> (String, u64, Option<Bytes>) {
        (
            hex::encode(self.hash.finalize()),
            self.len,
            self.kept.map(Bytes::from),
        )
    }
}

/// The second read of a large object: ends in an error instead of its end if the content is
/// not what the first read hashed, so that the upload is abandoned and nothing is stored.
struct ExpectSha256 {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    hasher: Sha256,
    expected: String,
    changed: Arc<std::sync::atomic::AtomicBool>,
}

impl AsyncRead for ExpectSha256 {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let (before, room) = (buf.filled().len(), buf.remaining() > 0);
        std::task::ready!(self.inner.as_mut().poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            self.hasher.update(new);
        } else if room && hex::encode(self.hasher.clone().finalize()) != self.expected {
            self.changed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "the content changed while it was read",
            )));
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// Reads of an object that changes between the two reads of each, before it is left out.
const READ_ATTEMPTS: u32 = 3;

/// Claims a run keeps before it drops the finished ones: those are in its table of stored
/// contents, and the claims left are the uploads in flight.
const CLAIMS_KEPT: usize = 1024;

/// Names of what a run did not store, kept for the fingerprint: the first [`SKIPPED_NAMED`] in
/// path order, and a count of the rest.
#[derive(Default)]
struct Skipped {
    named: Vec<String>,
    more: u64,
}

/// Skipped paths named in a fingerprint; the rest are counted.
const SKIPPED_NAMED: usize = 1000;

impl Skipped {
    fn add(&mut self, what: String) {
        if self.named.len() < SKIPPED_NAMED {
            self.named.push(what);
        } else {
            self.more += 1;
        }
    }

    fn merge(&mut self, other: Skipped) {
        self.more += other.more;
        for what in other.named {
            self.add(what);
        }
        self.named.sort();
    }
}

/// What the merge of the listing with the previous index learnt.
struct Merged {
    /// Files the previous snapshot named (for the shrink guard).
    previous_files: u64,
    skipped: Skipped,
}

/// Merges the listing with the previous change index, both in path order: each listed object,
/// filtered, goes to `work` with what the index knows of it.
async fn merge(
    mut listing: tokio::sync::mpsc::Receiver<Result<listing::Found>>,
    mut previous: Option<index::Previous>,
    (include, exclude): (globset::GlobSet, globset::GlobSet),
    work: tokio::sync::mpsc::Sender<(Listed, Option<Known>)>,
) -> Result<Merged> {
    let wanted = |p: &str| (include.is_empty() || include.is_match(p)) && !exclude.is_match(p);
    let mut skipped = Skipped::default();
    let mut last = String::new();
    while let Some(found) = listing.recv().await {
        let l = match found {
            Ok(listing::Found::Entry(l)) => l,
            Ok(listing::Found::Skipped(what)) => {
                if wanted(what.rsplit_once(" (").map_or(what.as_str(), |(p, _)| p)) {
                    skipped.add(what);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if l.path <= last {
            return Err(Error::failed(format!(
                "the source listed {:?} after {last:?}: a listing must come in key order",
                l.path
            )));
        }
        last.clone_from(&l.path);
        if !(l.kind == EntryKind::Dir && !exclude.is_match(&l.path) || wanted(&l.path)) {
            continue;
        }
        let known = match &mut previous {
            Some(p) if l.kind == EntryKind::File => p.find(&l.path).await,
            _ => None,
        };
        if work.send((l, known)).await.is_err() {
            break; // the run failed, and says why
        }
    }
    let previous_files = match previous {
        Some(p) => p.finish().await,
        None => 0,
    };
    Ok(Merged {
        previous_files,
        skipped,
    })
}

/// The contents the blob list of `backup` (the last published snapshot) names, and where each
/// is stored, sorted in a temp file; `None` when there is none or it cannot be read, and then
/// every content read is stored again.
async fn known_blobs(
    ctx: &BackupContext,
    key: &Secret,
    backup: Option<&str>,
) -> Option<sorted::SortedFile<80>> {
    let backup = backup?;
    let object = layout::backup_object(&ctx.source, backup, BLOB_LIST_OBJECT);
    let io = |e: std::io::Error| Error::failed(e.to_string());
    let read = async {
        let plain = open_sealed(ctx.store.as_ref(), &object, key).await?;
        let mut file = sorted::SortedWriter::<80>::new().map_err(io)?;
        each_line(plain, |line| match line {
            ListLine::Pack(_) => Ok(()),
            ListLine::Blob(id) => file.push(known_record(&id, None)),
            ListLine::Packed(id, p) => file.push(known_record(&id, Some(p))),
        })
        .await?;
        file.finish().map_err(io)
    };
    match read.await {
        Ok(file) => Some(file),
        Err(e) => {
            tracing::info!(source = %ctx.source, object, error = %e.message, "The last snapshot's blob list cannot be read: contents it names are stored again");
            None
        }
    }
}

/// Writes each entry as it comes, as one JSON line, into the snapshot's stream. Where the
/// current zstd frame holds [`pipeline::MIN_FRAME`] bytes, the next line's start is offered to
/// the pipeline through `marks` as a frame start, and its path noted in the tally.
async fn write_snapshot(
    entries: &mut (impl futures::Stream<Item = Result<Option<Entry>>> + Unpin),
    plain_w: &mut tokio::io::DuplexStream,
    marks: &Mutex<std::collections::VecDeque<u64>>,
) -> Result<Tally> {
    use tokio::io::AsyncWriteExt;
    let io = |e: std::io::Error| Error::failed(format!("writing the snapshot: {e}"));
    let mut t = Tally::default();
    let (mut offset, mut frame) = (0u64, 0u64);
    while let Some(e) = entries.try_next().await? {
        let Some(e) = e else {
            continue; // gone since it was listed
        };
        let mut line = serde_json::to_vec(&e)
            .map_err(|e| Error::failed(format!("cannot encode the snapshot: {e}")))?;
        line.push(b'\n');
        if offset - frame >= pipeline::MIN_FRAME {
            // Offered before a byte of the line is written: the pipeline reads none before.
            marks
                .lock()
                .map_err(|_| Error::failed("frame marks poisoned"))?
                .push_back(offset);
            t.marked.push((offset, e.path.clone()));
            frame = offset;
        }
        offset += line.len() as u64;
        plain_w.write_all(&line).await.map_err(io)?;
        t.add(&e)
            .map_err(|e| Error::failed(format!("sorting blob ids on the temp disk: {e}")))?;
    }
    plain_w.shutdown().await.map_err(io)?;
    Ok(t)
}

/// One backup run's shared state: what every entry's future reads or updates.
struct Run<'a> {
    objects: &'a Objects,
    ctx: &'a BackupContext,
    key: &'a Secret,
    s3: Option<&'a Arc<dyn ObjectStore>>,
    /// The backup the previous run's index describes: its snapshot is the last published.
    previous_backup: Option<&'a str>,
    /// Contents the last published snapshot names, and where: stored, and safe from collection.
    known: tokio::sync::OnceCell<Option<sorted::SortedFile<80>>>,
    /// One upload per blob id, and where it went: a blob of its own, or a slice of a pack.
    claims: Mutex<HashMap<sorted::Id, Arc<tokio::sync::OnceCell<Option<Packed>>>>>,
    /// Every content this run stored, and where, on the temp disk: a content that several
    /// objects share is stored once however far apart they are listed.
    stored: Mutex<sorted::Table<80>>,
    /// Where small contents go, unless the policy stores each as a blob of its own.
    packer: Option<pack::Packer>,
    /// Packs the last prune found mostly unused: their contents are stored again.
    repack: std::collections::HashSet<sorted::Id>,
    /// Contents stored again out of those packs.
    repacked: std::sync::atomic::AtomicU64,
    uploaded: std::sync::atomic::AtomicU64,
    semaphore: tokio::sync::Semaphore,
    /// Objects listed and not stored: gone before they could be read, or changing at every read.
    unread: Mutex<Skipped>,
}

impl Run<'_> {
    /// The snapshot entry for `l`: from the index when unchanged, else read and stored; `None`
    /// when it was deleted since the listing or kept changing (recorded in `unread`).
    async fn entry(&self, l: Listed, known: Option<Known>) -> Result<Option<Entry>> {
        let l = &l;
        if l.kind != EntryKind::File {
            return Ok(Some(entry(l, None, None, None)));
        }
        let known = known.filter(|k| k.unchanged(l));
        if let Some(k) = known.as_ref().filter(|k| !self.repacking(k.pack)) {
            return Ok(Some(entry(
                l,
                Some(hex::encode(k.sha256)),
                k.blob.map(hex::encode),
                k.pack,
            )));
        }
        if known.is_some() {
            self.repacked
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let _permit = self
            .semaphore
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Interrupted, "cancelled"))?;
        match self.store_object(l).await {
            Ok(e) => Ok(e),
            Err(e) if self.objects.gone(self.s3, &l.path).await => {
                tracing::debug!(path = %l.path, error = %e, "Deleted since it was listed");
                self.unread(format!("{} (deleted before it could be read)", l.path))?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Notes an object listed and not stored, by name and why.
    fn unread(&self, what: String) -> Result<()> {
        self.unread
            .lock()
            .map_err(|_| Error::failed("list of unread objects poisoned"))?
            .add(what);
        Ok(())
    }

    /// Reads `l`, and stores its content as a blob unless a stored blob has it already; `None`
    /// when it changed between the two reads of every attempt (recorded in `unread`).
    async fn store_object(&self, l: &Listed) -> Result<Option<Entry>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let read = match &self.objects.cfg.from {
                ObjectsFrom::Dir(root) if l.size <= KEEP_IN_MEMORY as u64 => {
                    first_read_file(root.join(&l.path), l.size).await
                }
                _ => first_read(self.objects.open(self.s3, &l.path).await?, l.size).await,
            };
            let (sha, size, kept) = read.map_err(|e| {
                Error::failed(format!(
                    "{}: reading {}: {e}",
                    self.objects.cfg.from_shown, l.path
                ))
            })?;
            let sized = |blob, pack| {
                let mut e = entry(l, Some(sha.clone()), blob, pack);
                e.size = size;
                e
            };
            if size == 0 {
                return Ok(Some(sized(None, None)));
            }
            let id = blob_id(self.key, &sha);
            let raw = unhex32(&id).ok_or_else(|| Error::failed("blob id is not hex"))?;
            if let Some(at) = self.known(&raw).await.filter(|at| !self.repacking(*at)) {
                return Ok(Some(sized(Some(id), at)));
            }
            let cell = self.claim(raw)?;
            let changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stored_now = cell
                .get_or_try_init(|| async {
                    if let Some(at) = self.stored_earlier(&raw) {
                        return Ok(at);
                    }
                    let at = self
                        .upload(l, &id, &sha, size, kept, changed.clone())
                        .await?;
                    self.remember(&raw, at);
                    Ok(at)
                })
                .await;
            match stored_now {
                Ok(at) => return Ok(Some(sized(Some(id), *at))),
                // It changed between the two reads: nothing was stored; read it again.
                Err(_) if changed.load(std::sync::atomic::Ordering::SeqCst) => {
                    if attempt < READ_ATTEMPTS {
                        continue;
                    }
                    self.unread(format!(
                        "{} (changed while it was read, {attempt} times)",
                        l.path
                    ))?;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether a content stored at `at` is to be stored again: it is in a pack the last prune
    /// found mostly unused.
    fn repacking(&self, at: Option<Packed>) -> bool {
        at.is_some_and(|p| self.repack.contains(&p.pack))
    }

    /// Where the last published snapshot has the content of blob id `id` stored, if it names
    /// it: `Some(None)` for a blob of its own, `Some(Some(slice))` in a pack. Its blob list is
    /// fetched into a temp file at the first question: a run where nothing new is read never
    /// fetches it.
    async fn known(&self, id: &sorted::Id) -> Option<Option<Packed>> {
        let list = self
            .known
            .get_or_init(|| known_blobs(self.ctx, self.key, self.previous_backup))
            .await;
        match list.as_ref().map(|l| l.find(id)) {
            Some(Ok(Some(r))) => Some(known_place(&r)),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "Blob list lookup failed: the content is stored again");
                None
            }
            Some(Ok(None)) | None => None,
        }
    }

    /// Where this run stored the content of blob `id`, if it did and its table still holds it
    /// (a content it forgot, or cannot read back, is stored again: harmless).
    fn stored_earlier(&self, id: &sorted::Id) -> Option<Option<Packed>> {
        let table = self.stored.lock().ok()?;
        match table.get(id) {
            Ok(found) => found.map(|r| known_place(&r)),
            Err(e) => {
                tracing::debug!(error = %e, "Stored-contents lookup failed: the content is stored again");
                None
            }
        }
    }

    /// Notes that this run stored the content of blob `id` at `at`.
    fn remember(&self, id: &sorted::Id, at: Option<Packed>) {
        let Ok(mut table) = self.stored.lock() else {
            return;
        };
        if let Err(e) = table.insert(known_record(id, at)) {
            tracing::debug!(error = %e, "Cannot note a stored content on the temp disk: a later copy is stored again");
        }
    }

    /// The one upload of blob `id` in this run: a second object with the same content waits for
    /// the first one's upload, and makes its own if that one failed. Finished claims are
    /// dropped past [`CLAIMS_KEPT`]: the table of stored contents has them.
    fn claim(&self, id: sorted::Id) -> Result<Arc<tokio::sync::OnceCell<Option<Packed>>>> {
        let mut claims = self
            .claims
            .lock()
            .map_err(|_| Error::failed("blob claims poisoned"))?;
        if claims.len() >= CLAIMS_KEPT {
            claims.retain(|_, cell| !cell.initialized());
        }
        Ok(claims.entry(id).or_default().clone())
    }

    /// Stores blob `id`: the bytes kept from the first read (into the open pack, when the
    /// policy packs), or a second read that must hash to `sha` (else `changed` is set and
    /// nothing is stored). Where it went: `None` for a blob of its own.
    async fn upload(
        &self,
        l: &Listed,
        id: &str,
        sha: &str,
        size: u64,
        kept: Option<bytes::Bytes>,
        changed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Option<Packed>> {
        let input: Pin<Box<dyn AsyncRead + Send>> = match kept {
            // Small content, already in memory: sealed whole and stored with one PUT. zstd
            // sized to the content keeps its tables small, which a stream cannot know to do.
            Some(bytes) => {
                let cfg = self.ctx.pipeline.clone();
                let sealed =
                    tokio::task::spawn_blocking(move || pipeline::seal_whole(&bytes, &cfg))
                        .await
                        .map_err(|e| Error::failed(format!("sealing {}: {e}", l.path)))??;
                if let Some(packer) = &self.packer {
                    let at = tokio::select! {
                        _ = self.ctx.cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "cancelled")),
                        r = packer.add(&sealed) => r.map_err(|e| e.context(format!("storing {}", l.path)))?,
                    };
                    self.uploaded
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return Ok(Some(at));
                }
                let object = layout::blob(id);
                let put = self.ctx.store.put(&object, sealed);
                tokio::select! {
                    _ = self.ctx.cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "cancelled")),
                    r = put => r.map_err(|e| Error::from(e).context(format!("storing {}", l.path)))?,
                }
                self.uploaded
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Ok(None);
            }
            // As many bytes as the first read hashed: a file appended to since is stored as
            // that read saw it.
            None => Box::pin(ExpectSha256 {
                inner: Box::pin(tokio::io::AsyncReadExt::take(
                    self.objects.open(self.s3, &l.path).await?,
                    size,
                )),
                hasher: Sha256::new(),
                expected: sha.to_string(),
                changed,
            }),
        };
        // zstd's worker threads pay off only on large inputs.
        let mut cfg = self.ctx.pipeline.clone();
        if size < (4 << 20) {
            cfg.workers = 0;
        }
        pipeline::run(
            input,
            async { Ok(()) },
            NoObserver,
            self.ctx.store.clone(),
            layout::blob(id),
            &cfg,
            self.ctx.cancel.clone(),
        )
        .await
        .map_err(|e| Error::from(e).context(format!("storing {}", l.path)))?;
        self.uploaded
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(None)
    }
}

#[async_trait]
impl Source for Objects {
    async fn probe(&self) -> Result<()> {
        self.key()?;
        let s3 = self.source_store(Arc::default()).await?;
        match (&self.cfg.from, &s3) {
            (ObjectsFrom::Dir(root), _) => {
                std::fs::read_dir(root).map_err(|e| {
                    Error::failed(format!("{}: {e}", self.cfg.from_shown))
                        .hint("is the volume mounted here? check `from`")
                })?;
            }
            (_, Some(s)) => {
                s.list_page("", None).await.map_err(|e| {
                    Error::from(e).context(format!("listing {}", self.cfg.from_shown))
                })?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn backup(&self, ctx: &BackupContext) -> Result<SourceBackup> {
        let key = self.key()?.clone();
        let filter = self.filter()?;
        let s3 = self.source_store(ctx.source_requests.clone()).await?;
        let listing = match (&self.cfg.from, &s3) {
            (ObjectsFrom::Dir(root), _) => listing::walk(root),
            (_, Some(s3)) => listing::pages(s3.clone(), self.cfg.from_shown.clone()),
            (ObjectsFrom::S3(_), None) => return Err(Error::failed("no source store")),
        };
        let (previous, older_index) =
            index::Previous::open(ctx.store.as_ref(), &ctx.source, &key).await;
        let previous_backup = previous.as_ref().map(|p| p.backup.clone());
        // Only blobs the last published snapshot names count as stored: blob collection never
        // removes those, while any other blob may be on its way out. Content found nowhere
        // else is uploaded again (which also renews an old copy's age).
        let run = Run {
            objects: self,
            ctx,
            key: &key,
            s3: s3.as_ref(),
            previous_backup: previous_backup.as_deref(),
            known: tokio::sync::OnceCell::new(),
            claims: Mutex::default(),
            stored: Mutex::default(),
            packer: (self.cfg.pack_size > 0).then(|| {
                pack::Packer::new(
                    ctx.store.clone(),
                    self.cfg.pack_size,
                    ctx.pipeline.small().part_size,
                )
            }),
            uploaded: std::sync::atomic::AtomicU64::new(0),
            repack: match self.cfg.pack_size {
                0 => Default::default(),
                _ => blobs::repack_note(ctx.store.as_ref(), &key).await,
            },
            repacked: std::sync::atomic::AtomicU64::new(0),
            semaphore: tokio::sync::Semaphore::new(self.cfg.concurrency),
            unread: Mutex::default(),
        };
        // The listing and the previous index are merged as two streams in path order; entries
        // come out in that order: unchanged objects from the index at once, changed ones read
        // and stored, at most `concurrency` at a time. Nothing holds the whole snapshot: each
        // entry goes straight into the snapshot's stream.
        let window = (self.cfg.concurrency * 32).max(64);
        let (work_tx, work_rx) = tokio::sync::mpsc::channel(window);
        let merged = merge(listing, previous, filter, work_tx);
        let run_ref = &run;
        let mut work_rx = work_rx;
        let work = futures::stream::poll_fn(move |cx| work_rx.poll_recv(cx));
        // Boxed: the futures borrow this run's state, which the Send-checked trait method
        // cannot express through a closure's anonymous future.
        let mut entries = work
            .map(
                move |(l, k)| -> futures::future::BoxFuture<'_, Result<Option<Entry>>> {
                    Box::pin(run_ref.entry(l, k))
                },
            )
            .buffered(window);

        // The snapshot is the next run's change index too: the agent reads it back with the
        // X25519 identity derived from the index key, so it is sealed to that recipient as well.
        let mut small = ctx.pipeline.small();
        small
            .recipients
            .push(pipeline::index_x25519(&key).to_public());
        let marks = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let observer = Marks {
            queue: marks.clone(),
            seen: 0,
        };
        let (plain_w, verdict_tx, snapshot) = piped(
            ctx,
            layout::backup_object(&ctx.source, &ctx.id, SNAPSHOT_OBJECT),
            &small,
            "the snapshot",
            observer,
        );
        let produce = async {
            let mut plain_w = plain_w;
            let (merged, written) =
                tokio::join!(merged, write_snapshot(&mut entries, &mut plain_w, &marks));
            let mut done = merged.and_then(|m| {
                let tally = written?;
                self.shrink_guard(tally.files, m.previous_files)?;
                Ok((m, tally))
            });
            // The last pack is complete before the snapshot that names its contents; a failed
            // run's is aborted.
            if let Some(packer) = &run_ref.packer {
                match &done {
                    Ok(_) => {
                        if let Err(e) = packer.finish().await {
                            done = Err(e);
                        }
                    }
                    Err(_) => packer.abandon().await,
                }
            }
            let _ = verdict_tx.send(done.is_ok());
            done
        };
        let (done, stored) = tokio::join!(produce, snapshot);
        let (merged, tally) = done?;
        let (digests, _) = stored.map_err(Error::from)?;
        if older_index {
            // This snapshot replaces the separate change index an older run may have kept.
            if let Err(e) = ctx.store.delete(&layout::change_index(&ctx.source)).await {
                tracing::debug!(source = %ctx.source, error = %Error::from(e).message, "Could not delete the older change index");
            }
        }
        drop(entries);
        let uploaded = run.uploaded.load(std::sync::atomic::Ordering::SeqCst);
        let packs_uploaded = run.packer.as_ref().map_or(0, pack::Packer::completed);
        let repacked = run.repacked.load(std::sync::atomic::Ordering::SeqCst);
        if let Ok(t) = run.stored.lock() {
            tracing::debug!(source = %ctx.source, remembered = t.len(), forgotten = t.forgotten(), "Contents this run stored, as its table of them holds them");
        }
        let unread = std::mem::take(
            &mut *run
                .unread
                .lock()
                .map_err(|_| Error::failed("list of unread objects poisoned"))?,
        );
        drop(run);
        let mut skipped = merged.skipped;
        if !skipped.named.is_empty() {
            tracing::warn!(source = %ctx.source, skipped = skipped.named.len() as u64 + skipped.more, first = %skipped.named.iter().take(10).cloned().collect::<Vec<_>>().join(", "), "Not stored: neither files, directories nor symlinks (the snapshot's fingerprint names them)");
        }
        if !unread.named.is_empty() {
            tracing::warn!(source = %ctx.source, unread = unread.named.len() as u64 + unread.more, first = %unread.named[0], "Listed, then deleted or changing at every read: not in the snapshot (its fingerprint names them)");
        }
        skipped.merge(unread);

        let (list_part, named) = store_blob_list(ctx, &key, tally.blobs).await?;
        let fingerprint = Fingerprint {
            format: 1,
            kind: super::Kind::Objects,
            from: self.cfg.from_shown.clone(),
            files: tally.files,
            dirs: tally.dirs,
            bytes: tally.bytes,
            blobs: named.contents,
            blobs_uploaded: uploaded,
            packs: named.packs,
            packs_uploaded,
            repacked,
            tree_sha256: hex::encode(tally.tree.finalize()),
            symlinks: tally.symlinks,
            skipped: skipped.named,
            skipped_more: skipped.more,
            frame_paths: digests
                .seek
                .as_ref()
                .map(|seek| frame_paths(&seek.frames, tally.marked))
                .unwrap_or_default(),
        };
        tracing::debug!(source = %ctx.source, files = fingerprint.files, uploaded = fingerprint.blobs_uploaded, "Snapshot taken");
        Ok(SourceBackup {
            parts: vec![
                digests.part(SNAPSHOT_OBJECT, Role::Snapshot, "lifeboat-objects-jsonl"),
                list_part,
            ],
            fingerprint: serde_json::to_value(&fingerprint)
                .map_err(|e| Error::failed(format!("cannot encode the fingerprint: {e}")))?,
            source_version: None,
            dump_tool_version: None,
            base_backup: None,
            shards: Vec::new(),
            database: None,
            origin: Some(self.origin()),
        })
    }
}
/// A pipeline into object `key`, fed through the returned writer. The object is completed only
/// once `true` is sent on the returned sender; `false`, or dropping it, abandons the upload.
fn piped<'a, O: pipeline::Observer + 'a>(
    ctx: &'a BackupContext,
    key: String,
    config: &'a pipeline::PipelineConfig,
    what: &'static str,
    observer: O,
) -> (
    tokio::io::DuplexStream,
    tokio::sync::oneshot::Sender<bool>,
    impl std::future::Future<
            Output = std::result::Result<(pipeline::Digests, O), pipeline::PipelineError>,
        > + 'a,
) {
    let (w, r) = tokio::io::duplex(256 << 10);
    let (finish, finished) = tokio::sync::oneshot::channel::<bool>();
    let verdict = async move {
        match finished.await {
            Ok(true) => Ok(()),
            _ => Err(Error::failed(format!("{what} was not finished"))),
        }
    };
    let stored = pipeline::run(
        r,
        verdict,
        observer,
        ctx.store.clone(),
        key,
        config,
        ctx.cancel.clone(),
    );
    (w, finish, stored)
}

/// Format of a blob list written as a stream: a line per id, sorted ([`ListLine`]: a blob,
/// a pack, or a content in a pack and where), zstd inside age sealed with the index key. An
/// empty list is sealed plain text ([`seal`]), as lists were before; [`parse_blob_list`] reads
/// both.
const BLOB_LIST_FORMAT: &str = "lifeboat-blob-ids+zstd+index-key";

/// What a blob list names.
struct Named {
    /// Distinct contents.
    contents: u64,
    /// Packs.
    packs: u64,
}

/// Stores the backup's blob list (every content it names and where, and every pack, sealed
/// with the index key, for blob collection and the next run), streamed from the sorted runs;
/// returns its manifest part and what it names.
async fn store_blob_list(
    ctx: &BackupContext,
    key: &Secret,
    blobs: sorted::Sorter<81>,
) -> Result<(crate::repo::manifest::Part, Named)> {
    let sort_failed =
        |e: std::io::Error| Error::failed(format!("sorting blob ids on the temp disk: {e}"));
    let object = layout::backup_object(&ctx.source, &ctx.id, BLOB_LIST_OBJECT);
    let mut merged = blobs.merged().map_err(sort_failed)?.peekable();
    let mut named = Named {
        contents: 0,
        packs: 0,
    };
    if merged.peek().is_none() {
        let list = seal(key, b"")?;
        let part = crate::repo::manifest::Part {
            name: BLOB_LIST_OBJECT.into(),
            role: Role::BlobList,
            format: "lifeboat-blob-ids+index-key".into(),
            size_plain: 0,
            sha256_plain: hex::encode(Sha256::digest(b"")),
            size_stored: list.len() as u64,
            sha256_stored: hex::encode(Sha256::digest(&list)),
            seek: None,
        };
        ctx.store
            .put(&object, Bytes::from(list))
            .await
            .map_err(|e| Error::from(e).context("storing the blob list"))?;
        return Ok((part, named));
    }
    let sealed = ctx.pipeline.small().sealed_with(key);
    let (mut w, verdict_tx, stored) = piped(ctx, object, &sealed, "the blob list", NoObserver);
    let write = async {
        use tokio::io::AsyncWriteExt;
        let mut last = None;
        let written = async {
            for r in merged {
                let line = ListLine::of_record(&r.map_err(sort_failed)?);
                // One line per id: a content stored twice (in two packs, or in a pack and as
                // a blob of its own) is listed where it was met first; both places are kept.
                if last == Some(line.id()) {
                    continue;
                }
                last = Some(line.id());
                match line {
                    ListLine::Pack(_) => named.packs += 1,
                    _ => named.contents += 1,
                }
                w.write_all(line.text().as_bytes())
                    .await
                    .map_err(|e| Error::failed(format!("writing the blob list: {e}")))?;
            }
            let _ = w.shutdown().await;
            Ok::<_, Error>(())
        }
        .await;
        let _ = verdict_tx.send(written.is_ok());
        written
    };
    let (n, stored) = tokio::join!(write, stored);
    n?;
    let (digests, _) = stored.map_err(|e| Error::from(e).context("storing the blob list"))?;
    Ok((
        digests.part(BLOB_LIST_OBJECT, Role::BlobList, BLOB_LIST_FORMAT),
        named,
    ))
}

/// What a snapshot adds up to, counted as its entries pass in path order.
#[derive(Default)]
struct Tally {
    files: u64,
    dirs: u64,
    symlinks: u64,
    bytes: u64,
    /// Every content named and where, and every pack, as blob list records sorted on the temp
    /// disk.
    blobs: sorted::Sorter<81>,
    /// [`tree_sha256`], incrementally.
    tree: Sha256,
    /// The frame starts offered, and the path of the entry at each.
    marked: Vec<(u64, String)>,
    /// The pack of the last packed content: entries in a row mostly share one, noted once.
    last_pack: Option<sorted::Id>,
}

/// Offers the pipeline the frame starts [`write_snapshot`] marked, each as the chunk holding it
/// passes.
struct Marks {
    queue: Arc<Mutex<std::collections::VecDeque<u64>>>,
    seen: u64,
}

impl pipeline::Observer for Marks {
    fn observe(&mut self, chunk: &[u8]) {
        self.seen += chunk.len() as u64;
    }

    fn frame_starts(&mut self, out: &mut Vec<u64>) {
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        while let Some(start) = queue.front().copied().filter(|s| *s < self.seen) {
            out.push(start);
            queue.pop_front();
        }
    }
}

/// The first path of each frame the pipeline cut (`frames`, from the seek index), from the
/// starts `marked`; empty unless every cut is one of them.
fn frame_paths(frames: &[[u64; 2]], marked: Vec<(u64, String)>) -> Vec<String> {
    let mut marked = marked.into_iter();
    let paths: Vec<String> = frames
        .iter()
        .map_while(|[at, _]| marked.find(|(m, _)| m == at).map(|(_, p)| p))
        .collect();
    if paths.len() == frames.len() {
        paths
    } else {
        Vec::new()
    }
}

impl Tally {
    fn add(&mut self, e: &Entry) -> std::io::Result<()> {
        tree_line(&mut self.tree, e);
        match e.kind {
            EntryKind::Dir => self.dirs += 1,
            EntryKind::Symlink => self.symlinks += 1,
            EntryKind::File => {
                self.files += 1;
                self.bytes += e.size;
                let Some(b) = e.blob.as_deref().and_then(unhex32) else {
                    return Ok(());
                };
                match e.pack.as_ref().and_then(Packed::of) {
                    Some(p) => {
                        self.blobs.push(ListLine::Packed(b, p).record())?;
                        if self.last_pack != Some(p.pack) {
                            self.blobs.push(ListLine::Pack(p.pack).record())?;
                            self.last_pack = Some(p.pack);
                        }
                    }
                    None => self.blobs.push(ListLine::Blob(b).record())?,
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn entry(l: &Listed, sha256: Option<String>, blob: Option<String>, pack: Option<Packed>) -> Entry {
    Entry {
        path: l.path.clone(),
        kind: l.kind,
        size: l.size,
        mtime_ms: l.mtime_ms,
        mode: l.mode,
        etag: l.etag.clone(),
        sha256,
        blob,
        target: l.target.clone(),
        pack: pack.as_ref().map(Packed::slice),
    }
}

/// Counts per blob id in a snapshot, for checks.
pub fn blob_counts(entries: &[Entry]) -> BTreeMap<&str, u64> {
    let mut m = BTreeMap::new();
    for e in entries {
        if let Some(b) = &e.blob {
            *m.entry(b.as_str()).or_default() += 1;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_paths_never_leave_the_target() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "a//b", "", "./a"] {
            let line = format!("{{\"path\":{bad:?},\"type\":\"file\",\"size\":1}}\n");
            assert!(decode_snapshot(line.as_bytes()).is_err(), "{bad}");
        }
        let ok = decode_snapshot(b"{\"path\":\"a b/\xc3\xa9.txt\",\"type\":\"file\",\"size\":0}\n")
            .unwrap();
        assert_eq!(ok[0].path, "a b/é.txt");
    }

    #[test]
    fn frame_paths_are_those_of_the_starts_the_pipeline_cut_at_or_none() {
        let marked = || {
            [(10, "b"), (20, "c"), (30, "d")]
                .map(|(at, p)| (at, p.to_string()))
                .to_vec()
        };
        assert_eq!(frame_paths(&[[10, 1], [30, 3]], marked()), ["b", "d"]);
        assert_eq!(frame_paths(&[], marked()), Vec::<String>::new());
        // A cut at a start not offered: no paths, and a `--path` restore reads the snapshot whole.
        assert!(frame_paths(&[[10, 1], [25, 2]], marked()).is_empty());
        assert!(frame_paths(&[[40, 1]], marked()).is_empty());
    }

    #[test]
    fn blob_list_lines_read_back_as_written_and_nothing_else_reads() {
        let (a, b) = ([0xabu8; 32], [0x01u8; 32]);
        let lines = [
            ListLine::Blob(a),
            ListLine::Pack(b),
            ListLine::Packed(
                a,
                Packed {
                    pack: b,
                    offset: 123_456,
                    len: 789,
                },
            ),
        ];
        for line in lines {
            let text = line.text();
            assert_eq!(
                ListLine::parse(text.trim_end().as_bytes()),
                Some(line),
                "{text}"
            );
            assert_eq!(ListLine::of_record(&line.record()), line);
        }
        assert_eq!(lines[0].object(), Some(a));
        assert_eq!(lines[1].object(), Some(b));
        assert_eq!(lines[2].object(), None, "its pack has a line of its own");
        let id = hex::encode(a);
        for bad in [
            format!("{id} packs"),
            format!("{id} pack extra"),
            format!("{id} {id} 1"),
            format!("{id} {id} 1 0"),
            format!("{id} {id} -1 5"),
            format!("{id} {id} 1 5 6"),
            id[..63].to_string(),
        ] {
            assert_eq!(ListLine::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn a_content_record_says_where_the_entry_has_its_content() {
        let mut e =
            decode_snapshot(b"{\"path\":\"a\",\"type\":\"file\",\"size\":3}\n").unwrap()[0].clone();
        e.sha256 = Some("cd".repeat(32));
        e.blob = Some("ab".repeat(32));
        let r = content_record(&e).unwrap().unwrap();
        assert_eq!(
            record_parts(&r),
            (Stored::Blob("ab".repeat(32)), Some("cd".repeat(32)))
        );
        let slice = PackSlice {
            id: "ef".repeat(32),
            offset: 10,
            len: 200,
        };
        e.pack = Some(slice.clone());
        let r = content_record(&e).unwrap().unwrap();
        assert_eq!(
            record_parts(&r),
            (Stored::Packed(slice), Some("cd".repeat(32)))
        );
        e.blob = None;
        e.pack = None;
        assert_eq!(content_record(&e).unwrap(), None);
        e.blob = Some("not hex".into());
        assert!(content_record(&e).is_err());
    }

    #[test]
    fn blob_ids_depend_on_the_key_and_the_content_only() {
        let k1 = Secret::new("k".repeat(32));
        let k2 = Secret::new("j".repeat(32));
        let sha = "ab".repeat(32);
        assert_eq!(blob_id(&k1, &sha), blob_id(&k1, &sha));
        assert_ne!(blob_id(&k1, &sha), blob_id(&k2, &sha));
        assert_ne!(blob_id(&k1, &sha), sha, "the id is not the content hash");
        assert!(layout::blob(&blob_id(&k1, &sha)).starts_with("objects/"));
    }
}
