//! Restoring an objects snapshot: the snapshot object is spooled and checked first, then each
//! file is written (a temp file renamed into place, or an upload completed) only once its
//! content hash matched, so what is in place is always whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::{Entry, EntryKind, Stored};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::{Manifest, Role};
use crate::repo::Repository;
use crate::restore::{part, spool, Progress};
use crate::sorted;
use crate::store::{self, ObjectStore};

/// Where an objects restore writes.
pub enum ObjectsTarget {
    /// A directory.
    Dir(std::path::PathBuf),
    /// A bucket and prefix, as a store; the string is how to show it.
    Store(std::sync::Arc<dyn crate::store::ObjectStore>, String),
}

/// What of a snapshot a restore writes, and whether it deletes the rest of the target.
pub struct Pick<'a> {
    /// Only this path (a file, or a directory and everything under it).
    pub only: Option<&'a str>,
    /// Delete what the target holds that the snapshot does not (never with `only`).
    pub delete_extra: bool,
}

/// How many entries of each kind a snapshot holds.
#[derive(Default)]
struct Counts {
    files: u64,
    symlinks: u64,
    all: u64,
}

/// A snapshot read as often as a restore needs (each pass decrypts it again: nothing of it is
/// held), filtered to the restored path: spooled and checked whole, or only the frames that
/// can hold the path ([`Frames`]).
pub struct Snapshot<'a> {
    spooled: crate::restore::Spooled,
    identities: &'a [Box<dyn age::Identity + Send + Sync>],
    only: Option<&'a str>,
    frames: Option<Frames>,
}

/// The stretch of a snapshot's plaintext that holds every path at the restored one: whole
/// frames, found by their first paths (recorded in the fingerprint), in path order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Frames {
    /// Where the first frame read starts.
    from: u64,
    /// Where the last one ends; `None` at the snapshot's end.
    to: Option<u64>,
    /// The path of the entry at `from`, read back as a check (`None` at the snapshot's start).
    first: Option<String>,
}

impl Frames {
    /// The frames of a snapshot (cut at `cuts`, each `[plaintext offset, _]`, whose first paths
    /// are `paths`) that hold the paths at `only`: `only` itself, and everything from `only/`
    /// to before `only0` (`0` follows `/`), which path order keeps together; the names between
    /// (`only-x`, `only.y`) are read and filtered out.
    fn at(cuts: &[[u64; 2]], paths: &[String], only: &str) -> Frames {
        let end = format!("{only}0");
        // Frame k (k ≥ 1) starts at cuts[k - 1] with paths[k - 1].
        let first = paths.partition_point(|p| p.as_str() <= only);
        let last = paths.partition_point(|p| p.as_str() < end.as_str());
        Frames {
            from: first.checked_sub(1).map_or(0, |k| cuts[k][0]),
            to: cuts.get(last).map(|c| c[0]),
            first: first.checked_sub(1).map(|k| paths[k].clone()),
        }
    }
}

impl<'a> Snapshot<'a> {
    /// The snapshot `spooled` holds, all of it or what is at `only`.
    pub fn new(
        spooled: crate::restore::Spooled,
        identities: &'a [Box<dyn age::Identity + Send + Sync>],
        only: Option<&'a str>,
    ) -> Self {
        Snapshot {
            spooled,
            identities,
            only,
            frames: None,
        }
    }

    /// Its entries, in the order they were written.
    pub fn entries(&self) -> impl futures::Stream<Item = Result<Entry>> + Send + '_ {
        futures::stream::once(async move {
            let plain = match &self.frames {
                None => self.spooled.plaintext(self.identities).await?,
                Some(frames) => self.framed(frames)?,
            };
            let r =
                super::SnapshotReader::new(tokio::io::BufReader::with_capacity(64 << 10, plain));
            let first = self.frames.as_ref().and_then(|f| f.first.clone());
            let name = &self.spooled.part.name;
            Ok::<_, Error>(futures::stream::try_unfold(
                (r, first),
                move |(mut r, first)| async move {
                    let Some(e) = r.next().await? else {
                        return Ok(None);
                    };
                    if let Some(want) = first.filter(|w| *w != e.path) {
                        return Err(Error::new(
                            ErrorKind::Integrity,
                            format!(
                                "{name}: the frame that should start at {want:?} starts at {:?}",
                                e.path
                            ),
                        )
                        .hint("restore without --path, which reads the snapshot whole, and run `lifeboat check --read-data`"));
                    }
                    Ok(Some((e, (r, None))))
                },
            ))
        })
        .try_flatten()
        .try_filter(move |e| futures::future::ready(self.only.is_none_or(|p| under(&e.path, p))))
    }

    /// The plaintext of `frames`: age and zstd read from the frame's chunk on, in a blocking
    /// thread, through a channel of a few chunks.
    fn framed(
        &self,
        frames: &Frames,
    ) -> Result<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>> {
        use std::io::Read;
        let reader = tokio::task::block_in_place(|| {
            self.spooled
                .open_at(self.identities, frames.from, frames.to)
        })?;
        let len = frames.to.map_or(u64::MAX, |to| to - frames.from);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
        tokio::task::spawn_blocking(move || {
            let mut r = reader.take(len);
            loop {
                let mut buf = vec![0u8; 64 << 10];
                let read = match r.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(bytes::Bytes::from(buf))
                    }
                    Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
                };
                let failed = read.is_err();
                if tx.blocking_send(read).is_err() || failed {
                    return;
                }
            }
        });
        let mut rx = rx;
        Ok(Box::pin(tokio_util::io::StreamReader::new(
            futures::stream::poll_fn(move |cx| rx.poll_recv(cx)),
        )))
    }

    /// Its entries of `kind`.
    fn of(&self, kind: EntryKind) -> impl futures::Stream<Item = Result<Entry>> + Send + '_ {
        self.entries()
            .try_filter(move |e| futures::future::ready(e.kind == kind))
    }

    /// Counts its entries, reading it once.
    async fn counts(&self) -> Result<Counts> {
        self.entries()
            .try_fold(Counts::default(), |mut c, e| {
                c.all += 1;
                match e.kind {
                    EntryKind::File => c.files += 1,
                    EntryKind::Symlink => c.symlinks += 1,
                    EntryKind::Dir => {}
                }
                futures::future::ready(Ok(c))
            })
            .await
    }

    /// The paths it holds, for the lookups of `--delete-extra`: their SHA-256s sorted on the
    /// temp disk.
    async fn paths(&self) -> Result<sorted::SortedFile> {
        let io = |e: std::io::Error| Error::failed(format!("sorting paths on the temp disk: {e}"));
        let mut sorter = sorted::Sorter::default();
        let mut all = std::pin::pin!(self.entries());
        while let Some(e) = all.try_next().await? {
            sorter.push(path_id(&e.path)).map_err(io)?;
        }
        sorter.into_file().map_err(io)
    }
}

/// The SHA-256 of a path, as `--delete-extra` looks it up.
fn path_id(path: &str) -> sorted::Id {
    Sha256::digest(path.as_bytes()).into()
}

/// Restores an objects snapshot into `target`: the snapshot is spooled and checked first, then
/// every file is written (through a temp file renamed into place, or an upload completed) only
/// once its content hash matched (exit 13 on the first that does not; what is in place is whole).
/// The snapshot is read as a stream, once per pass: memory does not grow with its size.
pub async fn restore_objects(
    repo: &Repository,
    manifest: &Manifest,
    target: &ObjectsTarget,
    Pick { only, delete_extra }: Pick<'_>,
    spool_dir: &std::path::Path,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    progress: std::sync::Arc<dyn Progress>,
) -> Result<Restored> {
    let part = part(manifest, Role::Snapshot)?;
    let frames = match only {
        Some(only) => frames_at(repo, manifest, part, identities, only).await?,
        None => None,
    };
    let snapshot = match frames {
        Some(frames) => {
            // Only the frames that can hold the path are read, where they are stored; once,
            // for every pass, unless they are many.
            progress.phase("reading the snapshot's frames that hold the path", None);
            let spooled = crate::restore::Spooled::where_stored(repo, manifest, part).await?;
            spooled.keep(frames.from, frames.to).await?;
            Snapshot {
                frames: Some(frames),
                ..Snapshot::new(spooled, identities, only)
            }
        }
        None => {
            progress.phase(
                "downloading and checking the snapshot",
                Some(part.size_stored),
            );
            let spooled = spool(repo, manifest, part, spool_dir, progress.as_ref()).await?;
            Snapshot::new(spooled, identities, only)
        }
    };
    let counts = snapshot.counts().await?;
    if let (Some(path), 0) = (only, counts.all) {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("backup {} holds nothing at {path:?}", manifest.id),
        )
        .hint("a path is relative to the source's root, `/`-separated: a directory or one file; nothing was written"));
    }
    let shown = match target {
        ObjectsTarget::Dir(d) => d.display().to_string(),
        ObjectsTarget::Store(_, s) => s.clone(),
    };
    progress.phase(
        &format!("restoring {} file(s) into {shown}", counts.files),
        Some(counts.files),
    );
    let p = progress.clone();
    let advance = move |n| p.advance(n);
    let mut done = match target {
        ObjectsTarget::Dir(dir) => {
            restore_to_dir(
                repo.store.clone(),
                &snapshot,
                dir,
                8,
                delete_extra,
                &advance,
            )
            .await?
        }
        ObjectsTarget::Store(store, _) => {
            restore_to_store(
                repo.store.clone(),
                &snapshot,
                store.clone(),
                8,
                delete_extra,
                &advance,
            )
            .await?
        }
    };
    if matches!(target, ObjectsTarget::Store(..)) {
        done.symlinks_skipped = counts.symlinks;
    }
    done.snapshot_read = match snapshot.frames {
        Some(_) => snapshot.spooled.fetched(),
        None => part.size_stored,
    };
    Ok(done)
}

/// The frames of the snapshot `part` that hold the paths at `only`, when its backup recorded
/// where its frames start (a snapshot of more than one frame), its fingerprint can be read, and
/// this runtime may block in its reads; `None`: read it whole.
async fn frames_at(
    repo: &Repository,
    manifest: &Manifest,
    part: &crate::repo::manifest::Part,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    only: &str,
) -> Result<Option<Frames>> {
    let Some(seek) = &part.seek else {
        return Ok(None);
    };
    if tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::MultiThread
    {
        return Ok(None);
    }
    // Without the fingerprint, the snapshot is still read whole (and checked whole).
    let fingerprint = match crate::restore::fingerprint(repo, manifest, identities).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(backup = %manifest.id, error = %e.message, "The fingerprint cannot be read: the whole snapshot is read to find the path");
            return Ok(None);
        }
    };
    let paths: Vec<String> = fingerprint
        .get("frame_paths")
        .and_then(|p| serde_json::from_value(p.clone()).ok())
        .unwrap_or_default();
    if paths.is_empty() || paths.len() != seek.frames.len() {
        return Ok(None);
    }
    Ok(Some(Frames::at(&seek.frames, &paths, only)))
}

/// Whether snapshot path `path` is `prefix` or under it.
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Bytes of a pack read at once by [`Contents`], aligned: contents read in pack order cost a
/// GET per window instead of one each.
const WINDOW: u64 = 2 << 20;

/// Windows [`Contents`] keeps, the most recent: enough for a restore's few files at once.
const WINDOWS_KEPT: usize = 4;

/// The repository's stored contents, for a reader that takes many in a row (a restore, the
/// verifier, `check --read-data`): a blob is read whole, and a content in a pack is cut from a
/// window of the pack read in one ranged GET, the last [`WINDOWS_KEPT`] windows kept (8 MiB at
/// most). A content that crosses a window's end is read on its own.
pub struct Contents {
    store: Arc<dyn ObjectStore>,
    windows: std::sync::Mutex<std::collections::VecDeque<Window>>,
}

/// A window of a pack: its pack id and number, and its bytes once read.
type Window = (String, u64, Arc<tokio::sync::OnceCell<bytes::Bytes>>);

impl Contents {
    /// The contents stored in `store`.
    pub fn new(store: Arc<dyn ObjectStore>) -> Contents {
        Contents {
            store,
            windows: std::sync::Mutex::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &dyn ObjectStore {
        self.store.as_ref()
    }

    /// The stored bytes of the content at `p`: its age file. Short if the pack is.
    async fn slice(
        &self,
        p: &super::PackSlice,
        key: &str,
    ) -> std::result::Result<bytes::Bytes, store::StoreError> {
        let w = p.offset / WINDOW;
        if p.len == 0 || (p.offset + p.len - 1) / WINDOW != w {
            return self.store.get_range(key, p.offset, p.len).await;
        }
        let cell = {
            let mut windows = self
                .windows
                .lock()
                .map_err(|_| store::StoreError::permanent("get", key, "pack windows poisoned"))?;
            match windows.iter().find(|(id, n, _)| *id == p.id && *n == w) {
                Some((_, _, cell)) => cell.clone(),
                None => {
                    let cell = Arc::new(tokio::sync::OnceCell::new());
                    windows.push_back((p.id.clone(), w, cell.clone()));
                    if windows.len() > WINDOWS_KEPT {
                        windows.pop_front();
                    }
                    cell
                }
            }
        };
        let window = cell
            .get_or_try_init(|| self.store.get_range(key, w * WINDOW, WINDOW))
            .await?;
        let start = ((p.offset - w * WINDOW) as usize).min(window.len());
        let end = (start + p.len as usize).min(window.len());
        Ok(window.slice(start..end))
    }
}

/// Streams the content stored at `stored` (a blob, or a slice of a pack) decrypted into `out`,
/// checking its SHA-256 against `sha256` at the end. Returns the bytes written. A missing object
/// or a different hash is an integrity error.
pub async fn fetch_blob(
    contents: &Contents,
    stored: &Stored,
    sha256: &str,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    out: &mut (dyn tokio::io::AsyncWrite + Send + Unpin),
) -> Result<u64> {
    use tokio::io::AsyncWriteExt;
    let key = stored.describe();
    let object = stored.key();
    let missing = |e: store::StoreError| {
        match e {
        store::StoreError::NotFound { .. } => Error::new(
            ErrorKind::Integrity,
            format!("{object} is missing"),
        )
        .hint("the snapshot names content the repository no longer holds; use another backup (RUNBOOK.md#integrity-failure)"),
        other => Error::from(other).context(format!("reading {key}")),
    }
    };
    let reader: store::ObjectReader = match stored {
        Stored::Blob(_) => contents.store.open(&object).await.map_err(missing)?,
        Stored::Packed(p) => {
            let bytes = contents.slice(p, &object).await.map_err(missing)?;
            if bytes.len() as u64 != p.len {
                return Err(Error::new(
                    ErrorKind::Integrity,
                    format!("{key}: the pack ends {} bytes short", p.len - bytes.len() as u64),
                )
                .hint("the pack is damaged; use another backup and run the verifier (RUNBOOK.md#integrity-failure)"));
            }
            Box::pin(std::io::Cursor::new(bytes))
        }
    };
    let mut plain = crate::pipeline::decrypt_stream(reader, identities)
        .await
        .map_err(|e| e.context(&key))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let got = plain
            .read(&mut buf)
            .await
            .map_err(|e| Error::new(ErrorKind::Integrity, format!("{key}: {e}")))?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        n += got as u64;
        out.write_all(&buf[..got])
            .await
            .map_err(|e| Error::failed(format!("writing {key}'s content: {e}")))?;
    }
    out.flush()
        .await
        .map_err(|e| Error::failed(format!("writing {key}'s content: {e}")))?;
    let got = hex::encode(h.finalize());
    if got != sha256 {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("{key}: content SHA-256 {got}, the snapshot says {sha256}"),
        )
        .hint("the stored content is damaged; use another backup and run the verifier (RUNBOOK.md#integrity-failure)"));
    }
    Ok(n)
}

/// What restoring a snapshot did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Restored {
    /// Files written.
    pub files: u64,
    /// Directories created or kept.
    pub dirs: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Paths removed because the snapshot does not hold them (`--delete-extra`).
    pub deleted: u64,
    /// Symbolic links made.
    pub symlinks: u64,
    /// Symbolic links not restored: a bucket has none.
    pub symlinks_skipped: u64,
    /// Stored bytes of the snapshot read from the repository: all of it, or with `--path` on a
    /// snapshot of several frames, those that can hold the path.
    pub snapshot_read: u64,
}

/// Writes the snapshot's entries under `target`: directories, then every file through a temp
/// file beside it that is renamed into place only after its content hash matched, then links;
/// modes and mtimes restored. Never writes through a symbolic link.
pub async fn restore_to_dir(
    store: Arc<dyn ObjectStore>,
    snapshot: &Snapshot<'_>,
    target: &Path,
    concurrency: usize,
    delete_extra: bool,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Restored> {
    use std::os::unix::fs::PermissionsExt;
    let mut done = Restored::default();
    let identities = snapshot.identities;
    tokio::fs::create_dir_all(target)
        .await
        .map_err(|e| Error::failed(format!("creating {}: {e}", target.display())))?;
    let mut dirs = std::pin::pin!(snapshot.of(EntryKind::Dir));
    while let Some(e) = dirs.try_next().await? {
        let p = inside(target, &e.path)?;
        tokio::fs::create_dir_all(&p)
            .await
            .map_err(|err| Error::failed(format!("creating {}: {err}", p.display())))?;
        done.dirs += 1;
    }
    let contents = Arc::new(Contents::new(store));
    let files = snapshot.of(EntryKind::File).map_ok(|e| {
        let contents = contents.clone();
        async move {
            let (sha, blob) = checked_entry(&e)?;
            let blob = blob.as_ref();
            let path = inside(target, &e.path)?;
            let dir = path.parent().unwrap_or(target).to_path_buf();
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|err| Error::failed(format!("creating {}: {err}", dir.display())))?;
            let tmp = tempfile::Builder::new()
                .prefix(".lifeboat-restore-")
                .tempfile_in(&dir)
                .map_err(|err| Error::failed(format!("writing in {}: {err}", dir.display())))?;
            let mut out =
                tokio::fs::File::from_std(tmp.reopen().map_err(|err| {
                    Error::failed(format!("writing in {}: {err}", dir.display()))
                })?);
            let n = match blob {
                Some(blob) => fetch_blob(&contents, blob, sha, identities, &mut out).await?,
                None => 0,
            };
            drop(out);
            let file = tmp.persist(&path).map_err(|err| {
                Error::failed(format!("writing {}: {}", path.display(), err.error))
            })?;
            if let Some(ms) = e.mtime_ms {
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
                let _ = file.set_modified(t);
            }
            let mode = e.mode.unwrap_or(0o644);
            let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
            progress(1);
            Ok::<u64, Error>(n)
        }
    });
    (done.files, done.bytes) = run_writes(files, concurrency).await?;
    // Links after every file: nothing is ever written through one.
    let mut links = std::pin::pin!(snapshot.of(EntryKind::Symlink));
    while let Some(e) = links.try_next().await? {
        make_symlink(target, &e)?;
        done.symlinks += 1;
    }
    if delete_extra {
        let keep = snapshot.paths().await?;
        done.deleted = delete_extra_paths(target, target, &keep)?;
    }
    // Directory modes last: a read-only directory would have refused its files.
    let mut dirs = std::pin::pin!(snapshot.of(EntryKind::Dir));
    while let Some(e) = dirs.try_next().await? {
        if let Some(mode) = e.mode {
            let _ = std::fs::set_permissions(
                inside(target, &e.path)?,
                std::fs::Permissions::from_mode(mode),
            );
        }
    }
    Ok(done)
}

/// Writes the snapshot's files as objects of `target` (a bucket and prefix; directories have
/// no objects there). Each object is completed only after its content hash matched: small ones
/// are held in memory until then, larger ones go up as a multipart upload that is aborted on a
/// mismatch. With `delete_extra`, objects under the prefix the snapshot does not hold go too.
pub async fn restore_to_store(
    store: Arc<dyn ObjectStore>,
    snapshot: &Snapshot<'_>,
    target: Arc<dyn ObjectStore>,
    concurrency: usize,
    delete_extra: bool,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Restored> {
    let mut done = Restored::default();
    let identities = snapshot.identities;
    let contents = Arc::new(Contents::new(store));
    let files = snapshot.of(EntryKind::File).map_ok(|e| {
        let (contents, target) = (contents.clone(), target.clone());
        async move {
            let (sha, blob) = checked_entry(&e)?;
            let n = match &blob {
                None => {
                    target
                        .put(&e.path, bytes::Bytes::new())
                        .await
                        .map_err(|err| Error::from(err).context(format!("writing {}", e.path)))?;
                    0
                }
                Some(blob) if e.size <= UPLOAD_PART as u64 => {
                    let mut buf = Vec::with_capacity(e.size as usize);
                    let n = fetch_blob(&contents, blob, sha, identities, &mut buf).await?;
                    target
                        .put(&e.path, bytes::Bytes::from(buf))
                        .await
                        .map_err(|err| Error::from(err).context(format!("writing {}", e.path)))?;
                    n
                }
                Some(blob) => {
                    put_large(&contents, blob, sha, identities, target.as_ref(), &e.path).await?
                }
            };
            progress(1);
            Ok::<u64, Error>(n)
        }
    });
    (done.files, done.bytes) = run_writes(files, concurrency).await?;
    if delete_extra {
        let keep = snapshot.paths().await?;
        let sort_failed = |e: std::io::Error| Error::failed(format!("reading sorted paths: {e}"));
        let mut after: Option<String> = None;
        loop {
            let (page, more) = target
                .list_page("", after.as_deref())
                .await
                .map_err(|e| Error::from(e).context("listing the target"))?;
            for o in &page {
                if keep.contains(&path_id(&o.key)).map_err(sort_failed)? {
                    continue;
                }
                target
                    .delete(&o.key)
                    .await
                    .map_err(|e| Error::from(e).context(format!("removing {}", o.key)))?;
                done.deleted += 1;
            }
            match (more, page.last()) {
                (true, Some(last)) => after = Some(last.key.clone()),
                _ => break,
            }
        }
    }
    Ok(done)
}

/// Runs a restore's per-file writes, `concurrency` at a time: (files, bytes) written.
async fn run_writes(
    writes: impl futures::Stream<Item = Result<impl std::future::Future<Output = Result<u64>>>>,
    concurrency: usize,
) -> Result<(u64, u64)> {
    writes
        .try_buffer_unordered(concurrency.max(1))
        .try_fold((0, 0), |(files, bytes), n| {
            futures::future::ready(Ok((files + 1, bytes + n)))
        })
        .await
}

/// Part size of a restore's multipart uploads (S3 wants at least 5 MiB).
const UPLOAD_PART: usize = 8 << 20;

/// Streams the content at `blob` into a multipart upload of `key`, completed only if the hash
/// matched.
async fn put_large(
    contents: &Contents,
    blob: &Stored,
    sha: &str,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    target: &dyn ObjectStore,
    key: &str,
) -> Result<u64> {
    let upload = target
        .start_upload(key)
        .await
        .map_err(|e| Error::from(e).context(format!("writing {key}")))?;
    let (w, mut r) = tokio::io::duplex(1 << 20);
    let fetch = async move {
        let mut w = w;
        fetch_blob(contents, blob, sha, identities, &mut w).await
    };
    let send = async {
        let (mut number, mut offset) = (0u32, 0u64);
        loop {
            let mut part = bytes::BytesMut::with_capacity(UPLOAD_PART);
            while part.len() < UPLOAD_PART {
                if r.read_buf(&mut part)
                    .await
                    .map_err(|e| Error::failed(format!("writing {key}: {e}")))?
                    == 0
                {
                    break;
                }
            }
            if part.is_empty() {
                return Ok::<(), Error>(());
            }
            number += 1;
            let len = part.len() as u64;
            upload
                .put_part(number, offset, part.freeze())
                .await
                .map_err(|e| Error::from(e).context(format!("writing {key}")))?;
            offset += len;
        }
    };
    let (fetched, sent) = tokio::join!(fetch, send);
    let completed = match (fetched, sent) {
        (Ok(n), Ok(())) => upload
            .complete()
            .await
            .map(|_| n)
            .map_err(|e| Error::from(e).context(format!("writing {key}"))),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    if completed.is_err() {
        let _ = upload.abort().await;
    }
    completed
}

/// The content hash of a file entry and where the content is stored, or why the snapshot entry
/// is unusable.
fn checked_entry(e: &Entry) -> Result<(&str, Option<Stored>)> {
    let Some(sha) = &e.sha256 else {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("snapshot entry {} has no content hash", e.path),
        ));
    };
    if e.blob.is_none() && sha != super::EMPTY_SHA256 {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("snapshot entry {} names no blob", e.path),
        ));
    }
    Ok((sha, e.stored()))
}

/// Removes what is under `dir` but not in `keep` (paths relative to `root`); never follows a
/// symbolic link (a link itself is removed if the snapshot does not hold its path).
fn delete_extra_paths(root: &Path, dir: &Path, keep: &sorted::SortedFile) -> Result<u64> {
    let mut n = 0;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::failed(format!("listing {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let p = entry.path();
        let rel = p
            .strip_prefix(root)
            .map(|r| r.to_string_lossy().to_string())
            .unwrap_or_default();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let kept = keep
            .contains(&path_id(&rel))
            .map_err(|e| Error::failed(format!("reading sorted paths: {e}")))?;
        if kept {
            if is_dir {
                n += delete_extra_paths(root, &p, keep)?;
            }
            continue;
        }
        let removed = if is_dir {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.map_err(|e| Error::failed(format!("removing {}: {e}", p.display())))?;
        n += 1;
    }
    Ok(n)
}

/// Makes the symlink `e` under `target`, pointing where it pointed (never followed), replacing a
/// file or link of that name (a directory there is an error).
fn make_symlink(target: &Path, e: &Entry) -> Result<()> {
    let (parent, name) = match e.path.rsplit_once('/') {
        Some((dir, name)) => (inside(target, dir)?, name),
        None => (target.to_path_buf(), e.path.as_str()),
    };
    let to = e.target.as_deref().ok_or_else(|| {
        Error::new(
            ErrorKind::Integrity,
            format!("snapshot: the symlink {} has no target", e.path),
        )
    })?;
    std::fs::create_dir_all(&parent)
        .map_err(|err| Error::failed(format!("creating {}: {err}", parent.display())))?;
    let path = parent.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {
            return Err(Error::failed(format!(
                "{} is a directory where the snapshot has a symlink",
                path.display()
            ))
            .hint("restore into an empty directory, or remove it"))
        }
        Ok(_) => std::fs::remove_file(&path)
            .map_err(|err| Error::failed(format!("replacing {}: {err}", path.display())))?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(to, &path)
        .map_err(|err| Error::failed(format!("making the symlink {}: {err}", path.display())))
}

/// `target/path`, refusing any existing component that is a symbolic link.
fn inside(target: &Path, path: &str) -> Result<PathBuf> {
    let mut p = target.to_path_buf();
    for c in path.split('/') {
        p.push(c);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "{} is a symbolic link: refusing to write through it",
                    p.display()
                ),
            ));
        }
    }
    Ok(p)
}

/// Plans a restore into a directory (`dir:///path` or a path) or a bucket (`s3://bucket/prefix/`):
/// refuses options for other kinds, counts what the target holds, and asks for confirmation when
/// it is not empty.
pub async fn plan(req: &crate::restore::Request<'_>) -> Result<crate::restore::Plan> {
    use crate::restore::{Plan, Refusal};
    let o = req.options;
    let m = &req.entry.manifest;
    if o.jobs != 1 || o.with_globals || o.no_owner || o.flush {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--jobs, --with-globals, --no-owner and --flush do not apply to objects restores",
        ));
    }
    let only = match o.path.as_deref().map(|p| p.trim_end_matches('/')) {
        None => None,
        Some(p)
            if p.is_empty()
                || p.starts_with('/')
                || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") =>
        {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "--path {:?}: not a path of the snapshot",
                    o.path.as_deref().unwrap_or_default()
                ),
            )
            .hint(
                "write it relative to the source's root, `/`-separated, e.g. --path reports/2026",
            ))
        }
        Some(_) if o.delete_extra => {
            return Err(Error::new(
                ErrorKind::Invalid,
                "--delete-extra with --path would delete everything outside the path",
            )
            .hint("restore the path without --delete-extra, or the whole snapshot with it"))
        }
        Some(p) => Some(p.to_string()),
    };
    let (target, shown, existing) = match req.to.strip_prefix("s3://") {
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!(
                        "--to {}: names no bucket; write s3://BUCKET/PREFIX/",
                        req.to
                    ),
                ));
            }
            let cfg = restore_s3_config(req.policy, &m.source, bucket, prefix);
            let store: Arc<dyn ObjectStore> = Arc::new(store::s3::S3Store::new(&cfg).await?);
            // One page tells whether it is empty; a bucket is never listed whole here.
            let (page, more) = store
                .list_page("", None)
                .await
                .map_err(|e| Error::from(e).context(format!("listing {}", req.to)))?;
            let existing = match (page.len(), more) {
                (n, false) => n.to_string(),
                (n, true) => format!("{n} or more"),
            };
            let shown = req.to.to_string();
            (ObjectsTarget::Store(store, shown.clone()), shown, existing)
        }
        None => {
            let dir = match req.to.strip_prefix("dir://") {
                Some(d) => PathBuf::from(d),
                None if req.to.contains("://") => {
                    return Err(Error::new(
                        ErrorKind::Invalid,
                        format!(
                            "--to {}: objects restore into a directory (dir:///path or a path) or a bucket (s3://bucket/prefix/)",
                            req.to
                        ),
                    ))
                }
                None => PathBuf::from(req.to),
            };
            let existing = std::fs::read_dir(&dir)
                .map(|d| d.count())
                .unwrap_or(0)
                .to_string();
            let shown = dir.display().to_string();
            (ObjectsTarget::Dir(dir), shown, existing)
        }
    };
    let what = match &only {
        Some(p) => format!("the snapshot's files at {p:?}"),
        None => "the snapshot's files".to_string(),
    };
    let empty = existing == "0";
    let action = match (empty, o.delete_extra) {
        (true, _) => format!("write {what} into {shown}"),
        (false, false) => format!(
            "{shown} holds {existing} entr(ies): files of the same path are replaced, others stay (--delete-extra removes them)"
        ),
        (false, true) => format!(
            "{shown} holds {existing} entr(ies): files of the same path are replaced, and everything the snapshot does not hold is DELETED"
        ),
    };
    let mut details = serde_json::json!({ "target": { "to": shown, "holds_data": !empty } });
    if let Some(p) = &only {
        details["path"] = p.as_str().into();
    }
    let apply = Box::new(Apply {
        manifest: m.clone(),
        target,
        only: only.clone(),
        delete_extra: o.delete_extra,
        spool_dir: o.spool_dir.clone(),
        shown: shown.clone(),
    });
    let mut plan = Plan::new(
        req,
        shown.clone(),
        action,
        details.as_object().cloned().unwrap_or_default(),
        apply,
    );
    plan.interrupted = "interrupted; the target may hold part of the files (each one whole)".into();
    if !empty {
        plan.refusal = Some(Refusal::new(
            &format!("{shown} is not empty"),
            "restore into a new directory or prefix, or pass --yes to replace same-named files (RUNBOOK.md#restore-objects)",
            "yes",
        ));
    }
    Ok(plan)
}

/// What a planned objects restore carries to its apply step.
struct Apply {
    manifest: Manifest,
    target: ObjectsTarget,
    only: Option<String>,
    delete_extra: bool,
    spool_dir: PathBuf,
    shown: String,
}

#[async_trait::async_trait(?Send)]
impl crate::restore::Apply for Apply {
    async fn apply(
        self: Box<Self>,
        repo: &Repository,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        progress: Arc<dyn Progress>,
    ) -> Result<crate::restore::Outcome> {
        let started = std::time::Instant::now();
        let done = restore_objects(
            repo,
            &self.manifest,
            &self.target,
            Pick {
                only: self.only.as_deref(),
                delete_extra: self.delete_extra,
            },
            &self.spool_dir,
            identities,
            progress,
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        let line = format!(
            "restored backup {} into {}: {} file(s), {} director(ies), {}{} in {seconds:.1} s{}",
            self.manifest.id,
            self.shown,
            done.files,
            done.dirs,
            match done.symlinks {
                0 => String::new(),
                n => format!("{n} symlink(s), "),
            },
            crate::human_bytes(done.bytes),
            if self.delete_extra {
                format!("; {} extra path(s) deleted", done.deleted)
            } else {
                String::new()
            }
        );
        let mut lines = vec![line];
        if done.symlinks_skipped > 0 {
            lines.push(format!(
                "  {} symlink(s) not restored: a bucket has no symlinks (restore into a directory to get them)",
                done.symlinks_skipped
            ));
        }
        Ok(crate::restore::Outcome {
            result: serde_json::json!({ "restored": done, "seconds": seconds }),
            lines,
        })
    }
}

/// The S3 settings for restoring into `bucket`/`prefix`: the source's own endpoint, region and
/// addressing when it is an S3 source, else the repository's when that is S3; credentials come
/// from the environment as for both.
fn restore_s3_config(
    policy: &crate::policy::Policy,
    source: &str,
    bucket: &str,
    prefix: &str,
) -> crate::policy::S3Config {
    use crate::policy::{ChecksumMode, Location, S3Config};
    let from_source = match policy.source(source).map(|s| &s.config) {
        Some(crate::source::SourceConfig::Objects(o)) => match &o.from {
            super::ObjectsFrom::S3(c) => Some(c.clone()),
            super::ObjectsFrom::Dir(_) => None,
        },
        _ => None,
    };
    let base = from_source.or_else(|| match &policy.repository.location {
        Location::S3(c) => Some(c.clone()),
        _ => None,
    });
    let mut cfg = base.unwrap_or_else(|| S3Config {
        bucket: String::new(),
        prefix: String::new(),
        endpoint: None,
        credentials_profile: None,
        region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        force_path_style: false,
        checksums: ChecksumMode::WhenRequired,
        storage_class: None,
        object_lock: None,
        server_side_encryption: None,
    });
    cfg.bucket = bucket.to_string();
    cfg.prefix = prefix.trim_matches('/').to_string();
    cfg.storage_class = None;
    cfg.object_lock = None;
    cfg.server_side_encryption = None;
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames starting at 0, 100, 200, 300 and 400, after the first with these paths.
    fn cuts() -> (Vec<[u64; 2]>, Vec<String>) {
        let paths = ["b/5", "c", "c/m", "d"].map(String::from).to_vec();
        let cuts = (1..=4).map(|k| [k * 100, k * 10]).collect();
        (cuts, paths)
    }

    fn frames(from: u64, to: Option<u64>, first: Option<&str>) -> Frames {
        Frames {
            from,
            to,
            first: first.map(String::from),
        }
    }

    #[test]
    fn a_path_is_read_from_the_frames_that_can_hold_it_and_no_others() {
        let (cuts, paths) = cuts();
        let at = |p| Frames::at(&cuts, &paths, p);
        // Before the first cut: the first frame only.
        assert_eq!(at("a"), frames(0, Some(100), None));
        // Across a cut: b/1 is in the first frame, b/5 on in the second; `c` starts the third.
        assert_eq!(at("b"), frames(0, Some(200), None));
        // A path that starts a frame: from that frame, and `c/…` runs into the next.
        assert_eq!(at("c"), frames(200, Some(400), Some("c")));
        assert_eq!(at("c/m"), frames(300, Some(400), Some("c/m")));
        // `c/a` sorts before the frame starting at `c/m`.
        assert_eq!(at("c/a"), frames(200, Some(300), Some("c")));
        // After the last cut: to the end.
        assert_eq!(at("d"), frames(400, None, Some("d")));
        assert_eq!(at("z"), frames(400, None, Some("d")));
        // `c-x` sorts between `c` and `c/`: read with them, and filtered out.
        assert_eq!(at("c-x"), frames(200, Some(300), Some("c")));
    }

    #[test]
    fn names_that_sort_between_a_directory_and_its_entries_stay_in_the_range() {
        // `a`, `a-b` and `a.c` sort before `a/`; `a0` after everything under `a/`.
        let paths = ["a-b", "a.c", "a/x", "a0"].map(String::from).to_vec();
        let cuts: Vec<[u64; 2]> = (1..=4).map(|k| [k * 100, k]).collect();
        let f = Frames::at(&cuts, &paths, "a");
        assert_eq!(f, frames(0, Some(400), None));
        assert!(under("a/x", "a") && under("a", "a") && !under("a-b", "a") && !under("a0", "a"));
    }
}
