//! Objects sources: point-in-time snapshots of a directory tree or an S3 prefix, each object's
//! content stored once as a content-addressed blob shared by every snapshot.
//!
//! What must hold:
//! - A blob is `objects/<2 hex>/<id>.age`: the object's content, zstd inside age. Its id is a
//!   keyed hash of the content's SHA-256 (`encryption.index_key`), so ids reveal nothing about
//!   content to whoever holds the bucket, and the same content is stored once.
//! - The snapshot (every path, size, mtime or ETag, mode, SHA-256 and blob id; directories too) is
//!   the backup's data object; the job writes the manifest after it, as for every source.
//! - A run reads only what changed: the agent keeps a change index (`state/<source>/index.age`,
//!   encrypted with the index key, because the agent holds no identity to read its snapshots).
//!   An object whose size and mtime (or ETag) match the index is not read again.
//! - Every blob is uploaded before the snapshot that names it; the content uploaded must hash to
//!   what the first pass read, or the object changed while being read and is retried, then reported.
//! - Guards: an empty listing, or one that shrank by more than `max_shrink_percent` since the
//!   previous snapshot, fails the run instead of recording a snapshot of nothing.

pub mod blobs;
pub mod check;
pub mod policy;
pub mod restore;
pub mod verify;

pub use policy::{ObjectsConfig, ObjectsFrom, RawObjectsSource};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
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
    /// Distinct blobs the snapshot names.
    pub blobs: u64,
    /// Blobs this run uploaded (the rest were already stored).
    pub blobs_uploaded: u64,
    /// SHA-256 over every `path NUL sha256 LF` (a symlink's: `path NUL -> target LF`) in path
    /// order: the whole tree's content.
    pub tree_sha256: String,
    /// Symbolic links.
    #[serde(default)]
    pub symlinks: u64,
    /// What the walk found and did not store, by name and why (sockets, devices, FIFOs, a link
    /// whose target is not UTF-8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
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
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let e: Entry = serde_json::from_slice(line).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("snapshot line {}: {e}", i + 1),
            )
        })?;
        if !safe_path(&e.path) {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "snapshot line {}: the path {:?} leaves the target",
                    i + 1,
                    e.path
                ),
            ));
        }
        out.push(e);
    }
    Ok(out)
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

    async fn source_store(&self) -> Result<Option<Arc<dyn ObjectStore>>> {
        match &self.cfg.from {
            ObjectsFrom::S3(cfg) => {
                let inner: Arc<dyn ObjectStore> = Arc::new(store::s3::S3Store::new(cfg).await?);
                Ok(Some(Arc::new(store::retry::Retry::new(
                    inner,
                    store::retry::Backoff::default(),
                ))))
            }
            ObjectsFrom::Dir(_) => Ok(None),
        }
    }

    /// Lists the source, filtered, and what it holds that is not stored (by name and why).
    async fn list(&self, s3: Option<&Arc<dyn ObjectStore>>) -> Result<(Vec<Listed>, Vec<String>)> {
        let (include, exclude) = self.filter()?;
        let wanted = |p: &str| (include.is_empty() || include.is_match(p)) && !exclude.is_match(p);
        let mut skipped = Vec::new();
        let mut out = match (&self.cfg.from, s3) {
            (ObjectsFrom::Dir(root), _) => {
                let root = root.clone();
                let (listed, found) = tokio::task::spawn_blocking(move || {
                    let mut skipped = Vec::new();
                    walk_dir(&root, &mut skipped).map(|l| (l, skipped))
                })
                .await
                .map_err(|e| Error::failed(format!("listing failed: {e}")))??;
                skipped = found;
                listed
            }
            (ObjectsFrom::S3(_), Some(s3)) => s3
                .list("")
                .await
                .map_err(|e| Error::from(e).context(format!("listing {}", self.cfg.from_shown)))?
                .into_iter()
                .filter(|o| !o.key.ends_with('/'))
                .map(|o| Listed {
                    path: o.key,
                    kind: EntryKind::File,
                    size: o.size,
                    mtime_ms: None,
                    mode: None,
                    etag: o.etag,
                    target: None,
                })
                .collect(),
            (ObjectsFrom::S3(_), None) => Vec::new(),
        };
        out.retain(|l| l.kind == EntryKind::Dir && !exclude.is_match(&l.path) || wanted(&l.path));
        out.sort_by(|a, b| a.path.cmp(&b.path));
        skipped.retain(|s| wanted(s.rsplit_once(" (").map_or(s.as_str(), |(p, _)| p)));
        skipped.sort();
        Ok((out, skipped))
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
                Ok(Box::pin(tokio::io::BufReader::with_capacity(256 << 10, f)))
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

    /// Reads a new or changed object, and stores its content as a blob unless the last published
    /// snapshot already names that blob or this run stored it. An object whose content changes
    /// between the hashing read and the upload is read again (3 attempts).
    #[allow(clippy::too_many_arguments)]
    /// The shrink guard: an empty listing, or one that lost more than `max_shrink_percent` of
    /// the last snapshot's objects, is refused rather than recorded.
    fn shrink_guard(&self, files: usize, previous: usize) -> Result<()> {
        if let Some(max) = self.cfg.max_shrink_percent {
            if files == 0 {
                return Err(Error::failed(format!(
                "{} lists no objects: refusing to record an empty snapshot",
                self.cfg.from_shown
            ))
            .hint("if the source really is empty now, set allow_shrink = true for one run (RUNBOOK.md#objects-shrink-guard)"));
            }
            if previous > 0 && files * 100 < previous * (100 - max as usize) {
                return Err(Error::failed(format!(
                "{} lists {files} objects, down from {previous} in the last snapshot (more than {max}% fewer): refusing to record it",
                self.cfg.from_shown
            ))
            .hint("if the deletions are intended, set allow_shrink = true for one run (RUNBOOK.md#objects-shrink-guard)"));
            }
        }
        Ok(())
    }

    fn index_object(source: &str) -> String {
        layout::change_index(source)
    }

    /// The change index from the previous run, or an empty one. It is trusted only while the
    /// backup it describes is published: a run whose manifest never appeared (or a backup since
    /// pruned) may name blobs that blob collection has removed.
    async fn load_index(&self, repo: &dyn ObjectStore, source: &str) -> HashMap<String, Known> {
        use std::io::BufRead;
        let Ok(key) = self.key() else {
            return HashMap::new();
        };
        let Ok(bytes) = repo.get(&Self::index_object(source)).await else {
            return HashMap::new();
        };
        let Some(packed) = unseal(key, &bytes) else {
            tracing::debug!(source, "No readable change index: every object is read");
            return HashMap::new();
        };
        drop(bytes);
        let Ok(decoder) = zstd::stream::read::Decoder::new(&packed[..]) else {
            return HashMap::new();
        };
        let mut lines = std::io::BufReader::new(decoder).split(b'\n');
        let backup = lines
            .next()
            .and_then(|l| l.ok())
            .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
            .filter(|h| h["index"] == INDEX_FORMAT)
            .and_then(|h| h["backup"].as_str().map(str::to_string));
        let Some(backup) = backup else {
            tracing::debug!(
                source,
                "Change index of another format: every object is read"
            );
            return HashMap::new();
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
            return HashMap::new();
        }
        let mut out = HashMap::new();
        for line in lines {
            let Some(e) = line
                .ok()
                .and_then(|l| serde_json::from_slice::<Entry>(&l).ok())
            else {
                tracing::debug!(source, "Damaged change index: every object is read");
                return HashMap::new();
            };
            let path = e.path.clone();
            if let Some(k) = Known::from_entry(e) {
                out.insert(path, k);
            }
        }
        out
    }
}

/// Version of the change index: a header line, then the snapshot's lines, zstd, sealed.
const INDEX_FORMAT: u32 = 3;

/// Encrypts `plain` with the index key (age, scrypt recipient).
pub fn seal(key: &Secret, plain: &[u8]) -> Result<Vec<u8>> {
    let fail =
        |e: &dyn std::fmt::Display| Error::failed(format!("encrypting with the index key: {e}"));
    let mut r = age::scrypt::Recipient::new(key.expose().to_string().into());
    r.set_work_factor(INDEX_WORK_FACTOR);
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
    let mut id = age::scrypt::Identity::new(key.expose().to_string().into());
    id.set_max_work_factor(INDEX_WORK_FACTOR + 2);
    let mut r = age::Decryptor::new(sealed)
        .ok()?
        .decrypt(std::iter::once(&id as &dyn age::Identity))
        .ok()?;
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut v).ok()?;
    Some(v)
}

/// Reads a blob list written by a backup: the ids, or why it cannot be read.
pub fn parse_blob_list(key: &Secret, sealed: &[u8]) -> std::result::Result<Vec<String>, String> {
    let plain = unseal(key, sealed).ok_or("it does not open with this policy's index key")?;
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

/// scrypt work factor of the index encryption: the key is a high-entropy secret, not a
/// passphrase, so stretching it buys nothing.
const INDEX_WORK_FACTOR: u8 = 10;

/// Every directory, file and symlink under `root`; what is none of those goes into `skipped`,
/// by name and why.
fn walk_dir(root: &Path, skipped: &mut Vec<String>) -> Result<Vec<Listed>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(root).map_err(|e| {
        Error::failed(format!("{}: {e}", root.display()))
            .hint("is the volume mounted here? check `from`")
    })?;
    if !meta.is_dir() {
        return Err(Error::failed(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed since its parent was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
                skipped.push(format!("{} (removed during the walk)", rel.display()));
                continue;
            }
            Err(e) => return Err(Error::failed(format!("listing {}: {e}", dir.display()))),
        };
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::failed(format!("listing {}: {e}", dir.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                // Paths are text in a snapshot (and in S3): such a name cannot be stored exactly.
                let shown = rel.join(&name).to_string_lossy().into_owned();
                skipped.push(format!("{shown} (a name that is not UTF-8)"));
                continue;
            };
            let child = rel.join(name);
            let path = child.to_string_lossy().to_string();
            let m = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    skipped.push(format!("{path} (removed during the walk)"));
                    continue;
                }
                Err(e) => return Err(Error::failed(format!("{}: {e}", dir.join(name).display()))),
            };
            let mtime_ms = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64);
            let mode = Some(m.permissions().mode() & 0o7777);
            let listed = |kind, size, target| Listed {
                path: path.clone(),
                kind,
                size,
                mtime_ms,
                mode,
                etag: None,
                target,
            };
            let t = m.file_type();
            if t.is_dir() {
                out.push(listed(EntryKind::Dir, 0, None));
                stack.push(child);
            } else if t.is_file() {
                out.push(listed(EntryKind::File, m.len(), None));
            } else if t.is_symlink() {
                let link = dir.join(name);
                let target = std::fs::read_link(&link)
                    .map_err(|e| Error::failed(format!("{}: {e}", link.display())))?;
                match target.to_str() {
                    Some(to) => out.push(Listed {
                        mode: None,
                        ..listed(EntryKind::Symlink, 0, Some(to.to_string()))
                    }),
                    None => skipped.push(format!("{path} (a symlink whose target is not UTF-8)")),
                }
            } else {
                use std::os::unix::fs::FileTypeExt;
                let what = if t.is_socket() {
                    "a socket"
                } else if t.is_fifo() {
                    "a FIFO"
                } else if t.is_block_device() || t.is_char_device() {
                    "a device"
                } else {
                    "not a file, directory or symlink"
                };
                skipped.push(format!("{path} ({what})"));
            }
        }
    }
    Ok(out)
}

/// SHA-256 and size of a stream.
/// Contents up to this size are read once and kept in memory for the upload; larger ones are
/// read a second time to upload them.
const KEEP_IN_MEMORY: usize = 1 << 20;

/// The first read of an object: its SHA-256, its size and, when small, its bytes.
async fn first_read(
    mut r: Pin<Box<dyn AsyncRead + Send>>,
) -> std::io::Result<(String, u64, Option<Bytes>)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut kept = Some(Vec::new());
    let mut n = 0u64;
    loop {
        let got = r.read(&mut buf).await?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        n += got as u64;
        if let Some(k) = &mut kept {
            if k.len() + got <= KEEP_IN_MEMORY {
                k.extend_from_slice(&buf[..got]);
            } else {
                kept = None;
            }
        }
    }
    Ok((hex::encode(h.finalize()), n, kept.map(Bytes::from)))
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

/// Writes each entry as it comes, as one JSON line, into the snapshot's stream and into the
/// next change index (zstd, in memory: a line per object, a fraction of the snapshot).
async fn write_snapshot(
    id: &str,
    entries: &mut (impl futures::Stream<Item = Result<Option<Entry>>> + Unpin),
    plain_w: &mut tokio::io::DuplexStream,
) -> Result<(Tally, Vec<u8>)> {
    use std::io::Write;
    use tokio::io::AsyncWriteExt;
    let io = |e: std::io::Error| Error::failed(format!("writing the snapshot: {e}"));
    let mut next_index = zstd::stream::write::Encoder::new(Vec::new(), 3).map_err(io)?;
    let header = serde_json::json!({ "index": INDEX_FORMAT, "backup": id });
    writeln!(next_index, "{header}").map_err(io)?;
    let mut t = Tally::default();
    while let Some(e) = entries.try_next().await? {
        let Some(e) = e else {
            continue; // gone since it was listed
        };
        let mut line = serde_json::to_vec(&e)
            .map_err(|e| Error::failed(format!("cannot encode the snapshot: {e}")))?;
        line.push(b'\n');
        plain_w.write_all(&line).await.map_err(io)?;
        next_index.write_all(&line).map_err(io)?;
        t.add(&e);
    }
    plain_w.shutdown().await.map_err(io)?;
    Ok((t, next_index.finish().map_err(io)?))
}

/// One backup run's shared state: what every entry's future reads or updates.
struct Run<'a> {
    objects: &'a Objects,
    ctx: &'a BackupContext,
    key: &'a Secret,
    s3: Option<&'a Arc<dyn ObjectStore>>,
    /// The previous run's change index.
    index: &'a HashMap<String, Known>,
    /// Blobs the last published snapshot names: stored, and safe from collection.
    known: &'a HashSet<[u8; 32]>,
    /// One upload per blob id.
    claims: Mutex<HashMap<[u8; 32], Arc<tokio::sync::OnceCell<()>>>>,
    uploaded: std::sync::atomic::AtomicU64,
    semaphore: tokio::sync::Semaphore,
    /// Objects listed, then gone before they could be read.
    vanished: Mutex<Vec<String>>,
}

impl Run<'_> {
    /// The snapshot entry for `l`: from the index when unchanged, else read and stored; `None`
    /// when it was deleted since the listing (recorded in `vanished`).
    async fn entry(&self, l: &Listed) -> Result<Option<Entry>> {
        if l.kind != EntryKind::File {
            return Ok(Some(entry(l, None, None)));
        }
        if let Some(k) = self.index.get(&l.path).filter(|k| k.unchanged(l)) {
            return Ok(Some(entry(
                l,
                Some(hex::encode(k.sha256)),
                k.blob.map(hex::encode),
            )));
        }
        let _permit = self
            .semaphore
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Interrupted, "cancelled"))?;
        match self.store_object(l).await {
            Ok(e) => Ok(Some(e)),
            Err(e) if self.objects.gone(self.s3, &l.path).await => {
                tracing::debug!(path = %l.path, error = %e, "Deleted since it was listed");
                self.vanished
                    .lock()
                    .map_err(|_| Error::failed("vanished list poisoned"))?
                    .push(format!("{} (deleted before it could be read)", l.path));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads `l`, and stores its content as a blob unless a stored blob has it already.
    async fn store_object(&self, l: &Listed) -> Result<Entry> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (sha, size, kept) = first_read(self.objects.open(self.s3, &l.path).await?)
                .await
                .map_err(|e| Error::failed(format!("reading {}: {e}", l.path)))?;
            let sized = |blob| {
                let mut e = entry(l, Some(sha.clone()), blob);
                e.size = size;
                e
            };
            if size == 0 {
                return Ok(sized(None));
            }
            let id = blob_id(self.key, &sha);
            let raw = unhex32(&id).ok_or_else(|| Error::failed("blob id is not hex"))?;
            if self.known.contains(&raw) {
                return Ok(sized(Some(id)));
            }
            // One upload per blob: a second object with the same content waits for the first
            // one's upload, and makes its own if that one failed.
            let cell = self
                .claims
                .lock()
                .map_err(|_| Error::failed("blob claims poisoned"))?
                .entry(raw)
                .or_default()
                .clone();
            let changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stored_now = cell
                .get_or_try_init(|| self.upload(l, &id, &sha, size, kept, changed.clone()))
                .await;
            match stored_now {
                Ok(()) => return Ok(sized(Some(id))),
                // It changed between the two reads: nothing was stored; read it again.
                Err(_) if changed.load(std::sync::atomic::Ordering::SeqCst) => {
                    if attempt < 3 {
                        continue;
                    }
                    return Err(Error::failed(format!(
                        "{} kept changing while it was read ({attempt} attempts)",
                        l.path
                    ))
                    .hint("back it up when it is not being written, or exclude it"));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores blob `id`: the bytes kept from the first read, or a second read that must hash to
    /// `sha` (else `changed` is set and nothing is stored).
    async fn upload(
        &self,
        l: &Listed,
        id: &str,
        sha: &str,
        size: u64,
        kept: Option<bytes::Bytes>,
        changed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<()> {
        let input: Pin<Box<dyn AsyncRead + Send>> = match kept {
            Some(bytes) => Box::pin(std::io::Cursor::new(bytes)),
            None => Box::pin(ExpectSha256 {
                inner: self.objects.open(self.s3, &l.path).await?,
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
        Ok(())
    }
}

#[async_trait]
impl Source for Objects {
    async fn probe(&self) -> Result<()> {
        self.key()?;
        let s3 = self.source_store().await?;
        match (&self.cfg.from, &s3) {
            (ObjectsFrom::Dir(root), _) => {
                std::fs::read_dir(root).map_err(|e| {
                    Error::failed(format!("{}: {e}", self.cfg.from_shown))
                        .hint("is the volume mounted here? check `from`")
                })?;
            }
            (_, Some(s)) => {
                s.list("").await.map_err(|e| {
                    Error::from(e).context(format!("listing {}", self.cfg.from_shown))
                })?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn backup(&self, ctx: &BackupContext) -> Result<SourceBackup> {
        let key = self.key()?.clone();
        let s3 = self.source_store().await?;
        let (listed, skipped) = self.list(s3.as_ref()).await?;
        if !skipped.is_empty() {
            let shown: Vec<&str> = skipped.iter().take(10).map(String::as_str).collect();
            tracing::warn!(source = %ctx.source, skipped = skipped.len(), first = %shown.join(", "), "Not stored: neither files, directories nor symlinks (the snapshot's fingerprint lists them all)");
        }
        let files = listed.iter().filter(|l| l.kind == EntryKind::File).count();
        let index = self.load_index(ctx.store.as_ref(), &ctx.source).await;
        self.shrink_guard(files, index.len())?;
        // Only blobs the last published snapshot names count as stored: blob collection never
        // removes those, while any other blob may be on its way out. Content found nowhere
        // else is uploaded again (which also renews an old copy's age).
        let known: HashSet<[u8; 32]> = index.values().filter_map(|k| k.blob).collect();
        let run = Run {
            objects: self,
            ctx,
            key: &key,
            s3: s3.as_ref(),
            index: &index,
            known: &known,
            claims: Mutex::default(),
            uploaded: std::sync::atomic::AtomicU64::new(0),
            semaphore: tokio::sync::Semaphore::new(self.cfg.concurrency),
            vanished: Mutex::default(),
        };
        // Entries come out in path order: unchanged objects from the index at once, changed
        // ones read and stored, at most `concurrency` at a time. Nothing holds the whole
        // snapshot: each entry goes straight into the snapshot's stream and the next index.
        // By position and boxed: the futures borrow this run's state, which the Send-checked
        // trait method cannot express through a closure over `&Listed`. Made lazily.
        let (all, run_ref) = (&listed, &run);
        let items = (0..listed.len()).map(
            move |i| -> futures::future::BoxFuture<'_, Result<Option<Entry>>> {
                Box::pin(run_ref.entry(&all[i]))
            },
        );
        let window = (self.cfg.concurrency * 32).max(64);
        let mut entries = futures::stream::iter(items).buffered(window);

        let (plain_w, plain_r) = tokio::io::duplex(256 << 10);
        let (verdict_tx, verdict_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        let snapshot = pipeline::run(
            plain_r,
            async move {
                verdict_rx
                    .await
                    .unwrap_or_else(|_| Err(Error::failed("the snapshot was not finished")))
            },
            NoObserver,
            ctx.store.clone(),
            layout::backup_object(&ctx.source, &ctx.id, SNAPSHOT_OBJECT),
            &ctx.pipeline,
            ctx.cancel.clone(),
        );
        let produce = async {
            let mut plain_w = plain_w;
            let written = write_snapshot(&ctx.id, &mut entries, &mut plain_w).await;
            let _ = verdict_tx.send(match &written {
                Ok(_) => Ok(()),
                Err(_) => Err(Error::failed("the snapshot was not finished")),
            });
            written
        };
        let (written, stored) = tokio::join!(produce, snapshot);
        let (tally, next_index) = written?;
        let (digests, _) = stored.map_err(Error::from)?;
        drop(entries);
        let uploaded = run.uploaded.load(std::sync::atomic::Ordering::SeqCst);
        let vanished = std::mem::take(
            &mut *run
                .vanished
                .lock()
                .map_err(|_| Error::failed("vanished list poisoned"))?,
        );
        drop(run);
        if !vanished.is_empty() {
            tracing::warn!(source = %ctx.source, vanished = vanished.len(), first = %vanished[0], "Deleted between the listing and its read: not in the snapshot");
        }
        let mut skipped = skipped;
        skipped.extend(vanished);
        skipped.sort();
        drop(index);

        let list_part = store_blob_list(ctx, &key, &tally).await?;
        store_index(ctx, &key, &next_index).await;
        let fingerprint = Fingerprint {
            format: 1,
            kind: super::Kind::Objects,
            from: self.cfg.from_shown.clone(),
            files: tally.files,
            dirs: tally.dirs,
            bytes: tally.bytes,
            blobs: tally.blobs.len() as u64,
            blobs_uploaded: uploaded,
            tree_sha256: hex::encode(tally.tree.finalize()),
            symlinks: tally.symlinks,
            skipped,
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

/// Stores the backup's blob list (every blob id it names, sealed with the index key, for blob
/// collection) and returns its manifest part.
async fn store_blob_list(
    ctx: &BackupContext,
    key: &Secret,
    tally: &Tally,
) -> Result<crate::repo::manifest::Part> {
    let list_plain: String = tally.blobs.iter().map(|b| hex::encode(b) + "\n").collect();
    let list = seal(key, list_plain.as_bytes())?;
    let list_part = crate::repo::manifest::Part {
        name: BLOB_LIST_OBJECT.into(),
        role: Role::BlobList,
        format: "lifeboat-blob-ids+index-key".into(),
        size_plain: list_plain.len() as u64,
        sha256_plain: hex::encode(Sha256::digest(list_plain.as_bytes())),
        size_stored: list.len() as u64,
        sha256_stored: hex::encode(Sha256::digest(&list)),
    };
    ctx.store
        .put(
            &layout::backup_object(&ctx.source, &ctx.id, BLOB_LIST_OBJECT),
            Bytes::from(list),
        )
        .await
        .map_err(|e| Error::from(e).context("storing the blob list"))?;
    Ok(list_part)
}

/// Stores the next run's change index: a cache of what this snapshot names, valid once its
/// manifest exists. Best effort: without it the next run reads every object.
async fn store_index(ctx: &BackupContext, key: &Secret, next_index: &[u8]) {
    let stored_index = async {
        let sealed = seal(key, next_index)?;
        ctx.store
            .put(&Objects::index_object(&ctx.source), Bytes::from(sealed))
            .await
            .map_err(|e| Error::from(e).context("storing the change index"))
    };
    if let Err(e) = stored_index.await {
        tracing::warn!(source = %ctx.source, error = %e.message, "Could not store the change index; the next run reads every object");
    }
}

/// What a snapshot adds up to, counted as its entries pass in path order.
#[derive(Default)]
struct Tally {
    files: u64,
    dirs: u64,
    symlinks: u64,
    bytes: u64,
    blobs: std::collections::BTreeSet<[u8; 32]>,
    /// [`tree_sha256`], incrementally.
    tree: Sha256,
}

impl Tally {
    fn add(&mut self, e: &Entry) {
        tree_line(&mut self.tree, e);
        match e.kind {
            EntryKind::Dir => self.dirs += 1,
            EntryKind::Symlink => self.symlinks += 1,
            EntryKind::File => {
                self.files += 1;
                self.bytes += e.size;
                if let Some(b) = e.blob.as_deref().and_then(unhex32) {
                    self.blobs.insert(b);
                }
            }
        }
    }
}

/// What the change index remembers of an object: enough to know it unchanged and to name its
/// content without reading it (about a third of a full entry in memory).
struct Known {
    size: u64,
    mtime_ms: Option<i64>,
    etag: Option<Box<str>>,
    sha256: [u8; 32],
    blob: Option<[u8; 32]>,
}

impl Known {
    fn from_entry(e: Entry) -> Option<Known> {
        if e.kind != EntryKind::File {
            return None;
        }
        let blob = match &e.blob {
            Some(b) => Some(unhex32(b)?),
            None if e.size == 0 => None,
            None => return None,
        };
        Some(Known {
            size: e.size,
            mtime_ms: e.mtime_ms,
            etag: e.etag.map(String::into_boxed_str),
            sha256: unhex32(e.sha256.as_deref()?)?,
            blob,
        })
    }

    /// Same size, and the same ETag (S3) or modification time (directories).
    fn unchanged(&self, l: &Listed) -> bool {
        self.size == l.size
            && match (&l.etag, &self.etag) {
                (Some(a), Some(b)) => a.as_str() == &**b,
                _ => l.mtime_ms.is_some() && self.mtime_ms == l.mtime_ms,
            }
    }
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn entry(l: &Listed, sha256: Option<String>, blob: Option<String>) -> Entry {
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
