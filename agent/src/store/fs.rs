//! A local directory as a store: the embedded default (`file://PATH`).
//!
//! Every object is written to a hidden temp file beside its final name, fsynced, renamed into place
//! and its directory fsynced, so a crash leaves either the whole object or a temp file that listings
//! skip and `pending_uploads` reports. Multipart parts are written at their offsets in one temp file.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectInfo, ObjectReader, ObjectStore, PendingUpload, StoreError, Upload};
use crate::repo::layout::random_suffix;

const TEMP_MARK: &str = ".tmp-";

/// A repository in a local directory.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: PathBuf) -> Self {
        FsStore { root }
    }

    /// The file for `key`. A key is relative and never leaves the root: an absolute key or one
    /// with `..` (from a damaged or hostile manifest) is refused, never resolved.
    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let p = Path::new(key);
        let inside = !key.is_empty()
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(StoreError::permanent(
                "resolve",
                key,
                "the key leaves the repository (absolute or `..`); refusing it",
            ));
        }
        Ok(self.root.join(p))
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    path.with_file_name(format!(".{name}{TEMP_MARK}{}", random_suffix(8)))
}

/// `.name.tmp-xxxx` → `name`.
fn visible_name(temp: &str) -> String {
    let t = temp.strip_prefix('.').unwrap_or(temp);
    t.rsplit_once(TEMP_MARK)
        .map(|(n, _)| n)
        .unwrap_or(t)
        .to_string()
}

fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARK)
}

fn classify(op: &'static str, key: &str, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound {
            key: key.to_string(),
        },
        io::ErrorKind::PermissionDenied => StoreError::Permanent {
            op,
            key: key.to_string(),
            message: e.to_string(),
            credential: true,
        },
        io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            StoreError::transient(op, key, e.to_string())
        }
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge | io::ErrorKind::QuotaExceeded => {
            StoreError::Full {
                op,
                key: key.to_string(),
                message: e.to_string(),
            }
        }
        _ => StoreError::permanent(op, key, e.to_string()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `data` to a temp file beside `path`, fsyncs it, puts it in place with `publish`
/// (rename: replace; hard link: create-only), fsyncs the directory, and never leaves the temp file.
fn write_via_temp(
    path: &Path,
    data: &[u8],
    publish: fn(&Path, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    let result = (|| {
        let f = create_beside(&tmp)?;
        f.write_all_at(data, 0)?;
        f.sync_all()?;
        publish(&tmp, path)?;
        sync_dir(dir)
    })();
    // After a rename the temp name is gone already; after a link or a failure it must go.
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Creates file `path` and the directories it needs. A delete may remove a directory it found
/// empty between the two steps (see `delete`): then it is created again.
fn create_beside(path: &Path) -> io::Result<std::fs::File> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tries = 0;
    loop {
        std::fs::create_dir_all(dir)?;
        match std::fs::File::create(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 3 => tries += 1,
            other => return other,
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_via_temp(path, data, |tmp, path| std::fs::rename(tmp, path))
}

/// Like `write_atomic`, but fails with `AlreadyExists` instead of replacing: `link` is create-only.
fn write_exclusive(path: &Path, data: &[u8]) -> io::Result<()> {
    write_via_temp(path, data, |tmp, path| std::fs::hard_link(tmp, path))
}

/// Every file under `dir`: objects go to `out` when it is given (their metadata read), the
/// temp files of unfinished writes to `temps`.
fn walk(
    root: &Path,
    dir: &Path,
    mut out: Option<&mut Vec<ObjectInfo>>,
    temps: &mut Vec<String>,
) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let ft = entry.file_type()?;
        let rel = || {
            path.strip_prefix(root)
                .map(|p| p.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default()
        };
        if ft.is_dir() {
            walk(root, &path, out.as_deref_mut(), temps)?;
        } else if ft.is_file() {
            if is_temp(&entry.file_name().to_string_lossy()) {
                temps.push(rel());
            } else if let Some(out) = out.as_deref_mut() {
                let meta = entry.metadata()?;
                out.push(ObjectInfo {
                    key: rel(),
                    size: meta.len(),
                    etag: None,
                    modified: meta.modified().ok().map(chrono::DateTime::from),
                });
            }
        }
    }
    Ok(())
}

/// One page of keys under `prefix` after `after`, in byte order: directories are read sorted
/// (a directory's name sorting as `name/`, as its keys do) and those wholly at or before
/// `after` are not entered, so a page costs about one directory read, not a walk of the tree.
fn walk_page(
    root: &Path,
    dir: &Path,
    prefix: &str,
    after: Option<&str>,
    out: &mut Vec<ObjectInfo>,
    limit: usize,
) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut sorted = Vec::new();
    for entry in entries {
        let entry = entry?;
        let ft = entry.file_type()?;
        if !ft.is_dir() && !ft.is_file() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().replace('\\', "/"))
            .unwrap_or_default();
        let key = if ft.is_dir() { format!("{rel}/") } else { rel };
        sorted.push((key, entry));
    }
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, entry) in sorted {
        if out.len() >= limit {
            break;
        }
        if key.ends_with('/') {
            let before = after.is_some_and(|a| a > key.as_str() && !a.starts_with(&key));
            let outside = !key.starts_with(prefix) && !prefix.starts_with(&key);
            if !before && !outside {
                walk_page(root, &entry.path(), prefix, after, out, limit)?;
            }
        } else if key.starts_with(prefix)
            && after.is_none_or(|a| key.as_str() > a)
            && !is_temp(&entry.file_name().to_string_lossy())
        {
            let meta = entry.metadata()?;
            out.push(ObjectInfo {
                key,
                size: meta.len(),
                etag: None,
                modified: meta.modified().ok().map(chrono::DateTime::from),
            });
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    key: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    let k = key.to_string();
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| classify(op, &k, e)),
        Err(e) => Err(StoreError::permanent(op, &k, format!("worker failed: {e}"))),
    }
}

#[async_trait]
impl ObjectStore for FsStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        blocking("put", key, move || write_atomic(&path, &data)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        tokio::fs::read(self.path(key)?)
            .await
            .map(Bytes::from)
            .map_err(|e| classify("get", key, e))
    }

    async fn open(&self, key: &str) -> Result<ObjectReader, StoreError> {
        let f = tokio::fs::File::open(self.path(key)?)
            .await
            .map_err(|e| classify("open", key, e))?;
        Ok(Box::pin(tokio::io::BufReader::with_capacity(256 << 10, f)))
    }

    async fn open_file(&self, key: &str) -> Result<Option<std::fs::File>, StoreError> {
        let path = self.path(key)?;
        blocking("open", key, move || std::fs::File::open(&path).map(Some)).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut f = tokio::fs::File::open(self.path(key)?)
            .await
            .map_err(|e| classify("get", key, e))?;
        f.seek(io::SeekFrom::Start(offset))
            .await
            .map_err(|e| classify("get", key, e))?;
        // Read into exactly `len` bytes: `read_to_end` would double the buffer to look for
        // the end.
        let mut out = vec![0; len.min(64 << 20) as usize];
        let mut filled = 0;
        while filled < out.len() {
            match f.read(&mut out[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Err(classify("get", key, e)),
            }
        }
        out.truncate(filled);
        Ok(Bytes::from(out))
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match tokio::fs::metadata(self.path(key)?).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(classify("size", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let root = self.root.clone();
        // Walk from the deepest directory the prefix names, then filter by the full prefix.
        let dir_part = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let start = root.join(dir_part);
        let prefix_owned = prefix.to_string();
        blocking("list", prefix, move || {
            let mut out = Vec::new();
            let mut temps = Vec::new();
            walk(&root, &start, Some(&mut out), &mut temps)?;
            out.retain(|o| o.key.starts_with(&prefix_owned));
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<(Vec<ObjectInfo>, bool), StoreError> {
        let root = self.root.clone();
        let dir_part = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let start = root.join(dir_part);
        let (prefix, after) = (prefix.to_string(), start_after.map(str::to_string));
        let shown = prefix.clone();
        blocking("list", &shown, move || {
            let mut out = Vec::new();
            let limit = super::LIST_PAGE + 1;
            walk_page(&root, &start, &prefix, after.as_deref(), &mut out, limit)?;
            let more = out.len() > super::LIST_PAGE;
            out.truncate(super::LIST_PAGE);
            Ok((out, more))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(classify("delete", key, e)),
        }
        // A pruned backup's directory goes with its last object, and so does each parent left
        // empty: `rmdir` removes only an empty directory, atomically, so a writer's file is
        // never lost (a writer that finds its directory gone creates it again).
        let root = self.root.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut dir = path.parent();
            while let Some(d) = dir.filter(|d| *d != root && d.starts_with(&root)) {
                if std::fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
        })
        .await;
        Ok(())
    }

    async fn start_upload(&self, key: &str) -> Result<Arc<dyn Upload>, StoreError> {
        let path = self.path(key)?;
        let tmp = temp_path(&path);
        let tmp2 = tmp.clone();
        let file = blocking("start upload", key, move || create_beside(&tmp2)).await?;
        Ok(Arc::new(FsUpload {
            key: key.to_string(),
            path,
            tmp,
            file: Arc::new(file),
        }))
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        blocking("put if absent", key, move || {
            match write_exclusive(&path, &data) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn pending_uploads(&self) -> Result<Vec<PendingUpload>, StoreError> {
        let root = self.root.clone();
        blocking("list", "", move || {
            let mut temps = Vec::new();
            walk(&root, &root, None, &mut temps)?;
            Ok(temps
                .into_iter()
                .map(|t| {
                    let initiated = std::fs::metadata(root.join(&t))
                        .and_then(|m| m.modified())
                        .ok()
                        .map(chrono::DateTime::<chrono::Utc>::from);
                    // The visible key is the final name the temp file stands for.
                    let key = match t.rsplit_once('/') {
                        Some((dir, name)) => format!("{dir}/{}", visible_name(name)),
                        None => visible_name(&t),
                    };
                    PendingUpload {
                        key,
                        upload_id: t,
                        initiated,
                    }
                })
                .collect())
        })
        .await
    }

    async fn abort_pending(&self, upload: &PendingUpload) -> Result<(), StoreError> {
        let path = self.path(&upload.upload_id)?;
        blocking(
            "abort upload",
            &upload.key,
            move || match std::fs::remove_file(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        )
        .await
    }
}

/// A multipart upload into a temp file.
#[derive(Debug)]
struct FsUpload {
    key: String,
    path: PathBuf,
    tmp: PathBuf,
    file: Arc<std::fs::File>,
}

#[async_trait]
impl Upload for FsUpload {
    fn key(&self) -> &str {
        &self.key
    }

    async fn put_part(&self, _number: u32, offset: u64, data: Bytes) -> Result<(), StoreError> {
        let file = self.file.clone();
        blocking("upload part", &self.key, move || {
            file.write_all_at(&data, offset)
        })
        .await
    }

    async fn complete(&self) -> Result<(), StoreError> {
        let (file, tmp, path) = (self.file.clone(), self.tmp.clone(), self.path.clone());
        blocking("complete upload", &self.key, move || {
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(path.parent().unwrap_or(Path::new(".")))
        })
        .await
    }

    async fn abort(&self) -> Result<(), StoreError> {
        let tmp = self.tmp.clone();
        blocking(
            "abort upload",
            &self.key,
            move || match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            },
        )
        .await
    }
}
