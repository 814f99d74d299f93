//! Reading backups back, for every kind: fetch → check SHA-256 → decrypt → decompress. Each kind's
//! restore (in its folder under `source/`) builds on these.
//!
//! The guarantee, for the verifier and `lifeboat restore` alike: **nothing is applied from an
//! object whose SHA-256 does not match the manifest.** Where applying cannot be undone (pg_restore
//! into a server, a Redis dataset, files written over a target), the object is downloaded to a
//! spool file and its SHA-256 and size checked before a single byte is decrypted ([`spool`]); the
//! spool holds ciphertext only. Where what is written can be removed again, as a physical base
//! backup unpacked into a directory restore created or emptied, the object streams
//! ([`stream_plaintext`]) and its stored SHA-256 is checked at its end; the caller removes what
//! it wrote when the end says it was damaged. Either way the plaintext's SHA-256 is checked as
//! well; age authenticates every 64 KiB chunk, so a plaintext that differs can only come from a
//! manifest that lies, and it stops the restore with exit 13.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::repo::layout;
use crate::repo::manifest::{Manifest, Part, Role, SeekIndex};
use crate::repo::Repository;

/// Reports a long operation's phases and bytes (a progress bar on a terminal, lines otherwise).
pub trait Progress: Send + Sync {
    /// A new phase begins; `total` bytes if known.
    fn phase(&self, what: &str, total: Option<u64>);
    /// `bytes` more of the current phase are done.
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _what: &str, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
}

/// Counts the bytes read through `inner` into `progress`.
pub fn counting(
    inner: Pin<Box<dyn AsyncRead + Send>>,
    progress: std::sync::Arc<dyn Progress>,
) -> Pin<Box<dyn AsyncRead + Send>> {
    Box::pin(Counting { inner, progress })
}

/// Counts the bytes read through it into a [`Progress`].
struct Counting {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    progress: std::sync::Arc<dyn Progress>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = self.inner.as_mut().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            self.progress.advance((buf.filled().len() - before) as u64);
        }
        r
    }
}

/// A stored object whose stored SHA-256 and size were checked, and where it is read from since:
/// a spool file it was downloaded into; in a local directory repository, the object's own file,
/// hashed in place and held open; or, for a reader of parts of it ([`check_where_stored`]), the
/// store itself by ranged GETs. What is read afterwards is what was checked: an open file is the
/// one that was hashed whatever happens to its path (a prune, a rename over it), and a change
/// made in the store or in the file since fails the decryption of the chunk it is in, as age
/// authenticates each one under the header, whose hash a reader checks against the manifest's.
pub struct Spooled {
    /// The part it holds.
    pub part: Part,
    held: Held,
    /// Whether it was read whole and its stored SHA-256 checked ([`checked`]); if not
    /// ([`Spooled::where_stored`]), a whole read checks it at its end, and a reader of frames
    /// relies on the header check of [`Spooled::open_at`].
    whole_checked: bool,
    /// Its age header, read and checked against the seek index's hash at the first
    /// [`Spooled::open_at`]: every reader starts from these bytes, so the file key is the
    /// backup's whatever the store holds since.
    header: std::sync::OnceLock<std::sync::Arc<[u8]>>,
    /// Stored bytes read by its readers (ranges fetched, or read from the file).
    fetched: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// A stretch of the stored object fetched once and read from memory since
    /// ([`Spooled::keep`]), at its offset.
    kept: std::sync::OnceLock<(u64, bytes::Bytes)>,
    /// The spool file, deleted on drop; `None` for the repository's own object.
    _spool: Option<tempfile::NamedTempFile>,
}

/// Where a [`Spooled`] object is read from.
#[derive(Clone)]
enum Held {
    File(std::sync::Arc<std::fs::File>),
    Store {
        store: std::sync::Arc<dyn crate::store::ObjectStore>,
        key: String,
        runtime: tokio::runtime::Handle,
    },
}

/// Reads a [`Spooled`] object from an offset of its own: each reader keeps its position, so any
/// number of them read it at once. From the store, it reads ahead in ranged GETs that double
/// from 256 KiB to [`RANGE`] while it reads on, and holds one range.
pub struct SpooledReader {
    held: Held,
    fetched: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Bytes read from memory instead: the object's start, already read and checked.
    start: Option<std::sync::Arc<[u8]>>,
    /// Bytes read from memory instead, at their offset ([`Spooled::keep`]).
    kept: Option<(u64, bytes::Bytes)>,
    size: u64,
    /// Reads ahead no further than this while before it (what its reader is known to need);
    /// past it, as far as ever.
    ahead_until: u64,
    pos: u64,
    ahead: bytes::Bytes,
    ahead_at: u64,
    next_len: u64,
}

impl io::Read for SpooledReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(start) = self.start.as_deref() {
            if let Some(rest) = usize::try_from(self.pos).ok().and_then(|p| start.get(p..)) {
                if !rest.is_empty() {
                    let n = buf.len().min(rest.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.pos += n as u64;
                    return Ok(n);
                }
            }
        }
        if let Some((at, kept)) = &self.kept {
            let from = self
                .pos
                .checked_sub(*at)
                .and_then(|f| usize::try_from(f).ok());
            if let Some(rest) = from.and_then(|f| kept.get(f..)).filter(|r| !r.is_empty()) {
                let n = buf.len().min(rest.len());
                buf[..n].copy_from_slice(&rest[..n]);
                self.pos += n as u64;
                return Ok(n);
            }
        }
        let n = match &self.held {
            Held::File(file) => {
                use std::os::unix::fs::FileExt;
                file.read_at(buf, self.pos)?
            }
            Held::Store {
                store,
                key,
                runtime,
            } => {
                let in_ahead =
                    self.pos >= self.ahead_at && self.pos < self.ahead_at + self.ahead.len() as u64;
                if !in_ahead {
                    if self.pos >= self.size {
                        return Ok(0);
                    }
                    let end = match self.pos < self.ahead_until {
                        true => self.ahead_until.min(self.size),
                        false => self.size,
                    };
                    let len = self.next_len.min(end - self.pos);
                    let got = tokio::task::block_in_place(|| {
                        runtime.block_on(store.get_range(key, self.pos, len))
                    })
                    .map_err(|e| io::Error::other(e.to_string()))?;
                    if got.is_empty() {
                        return Ok(0);
                    }
                    self.fetched
                        .fetch_add(got.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    self.ahead = got;
                    self.ahead_at = self.pos;
                    self.next_len = (self.next_len * 2).min(RANGE);
                }
                let from = (self.pos - self.ahead_at) as usize;
                let n = buf.len().min(self.ahead.len() - from);
                buf[..n].copy_from_slice(&self.ahead[from..from + n]);
                n
            }
        };
        self.pos += n as u64;
        if matches!(self.held, Held::File(_)) {
            self.fetched
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl io::Seek for SpooledReader {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let (base, delta) = match to {
            io::SeekFrom::Start(n) => (n, 0),
            io::SeekFrom::Current(d) => (self.pos, d),
            io::SeekFrom::End(d) => (self.size, d),
        };
        self.pos = base.checked_add_signed(delta).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "a seek before the start")
        })?;
        Ok(self.pos)
    }
}

/// Downloads `part` into a file in `dir`, checking the stored SHA-256 and size (exit 13 on
/// mismatch). From a local directory repository nothing is copied: the object's own file is
/// hashed and held open.
pub async fn spool(
    repo: &Repository,
    manifest: &Manifest,
    part: &Part,
    dir: &std::path::Path,
    progress: &dyn Progress,
) -> Result<Spooled> {
    checked(repo, manifest, part, Some(dir), progress).await
}

/// Checks the stored SHA-256 and size of `part` (exit 13 on mismatch) copying nothing, for a
/// reader of parts of it: it is read again afterwards, by ranged GETs (or, in a local directory
/// repository, through its own file). Costs a second download of what is read, and no disk.
/// Needs a multi-threaded runtime (its reads block); on another it spools into `dir`.
pub async fn check_where_stored(
    repo: &Repository,
    manifest: &Manifest,
    part: &Part,
    dir: &std::path::Path,
    progress: &dyn Progress,
) -> Result<Spooled> {
    let runtime = tokio::runtime::Handle::current();
    let dir = match runtime.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => None,
        _ => Some(dir),
    };
    checked(repo, manifest, part, dir, progress).await
}

/// `part`, checked: in a local directory repository its own file; elsewhere copied into a spool
/// file in `dir`, or with no `dir` read where it is stored.
async fn checked(
    repo: &Repository,
    manifest: &Manifest,
    part: &Part,
    dir: Option<&std::path::Path>,
    progress: &dyn Progress,
) -> Result<Spooled> {
    let key = layout::backup_object(&manifest.source, &manifest.id, &part.name);
    let reading = |e: io::Error| Error::failed(format!("reading {key}: {e}"));
    let own = repo
        .store
        .open_file(&key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    if let Some(own) = own {
        let read = own.try_clone().map_err(reading)?;
        let mut r = tokio::io::BufReader::with_capacity(256 << 10, tokio::fs::File::from_std(read));
        let (n, digest) =
            hashed(&mut r, &mut tokio::io::sink(), &reading, &reading, progress).await?;
        check_stored(&key, part, n, &digest)?;
        return Ok(Spooled::new(
            part,
            Held::File(std::sync::Arc::new(own)),
            None,
        ));
    }
    let Some(dir) = dir else {
        let (n, digest) = download(repo, &key, part, None, progress).await?;
        check_stored(&key, part, n, &digest)?;
        let held = Held::Store {
            store: repo.store.clone(),
            key,
            runtime: tokio::runtime::Handle::current(),
        };
        return Ok(Spooled::new(part, held, None));
    };
    let file = tempfile::Builder::new()
        .prefix("lifeboat-spool-")
        .tempfile_in(dir)
        .map_err(|e| {
            Error::failed(format!(
                "cannot create a spool file in {}: {e}",
                dir.display()
            ))
            .hint("pass --spool-dir with room for the stored backup")
        })?;
    let mut out = tokio::fs::File::from_std(
        file.reopen()
            .map_err(|e| Error::failed(format!("cannot open the spool file: {e}")))?,
    );
    let spool_failed = |e: std::io::Error| {
        Error::failed(format!("writing the spool file in {}: {e}", dir.display()))
            .hint("pass --spool-dir with room for the stored backup")
    };
    let mut out = SpoolFile {
        file: &mut out,
        failed: &spool_failed,
    };
    let (n, digest) = download(repo, &key, part, Some(&mut out), progress).await?;
    check_stored(&key, part, n, &digest)?;
    let read = file
        .reopen()
        .map_err(|e| Error::failed(format!("cannot open the spool file: {e}")))?;
    Ok(Spooled::new(
        part,
        Held::File(std::sync::Arc::new(read)),
        Some(file),
    ))
}

/// Reads `key` whole (in ranges where the store reads faster so), into `out` if any; returns its
/// size and SHA-256.
async fn download(
    repo: &Repository,
    key: &str,
    part: &Part,
    out: Option<&mut SpoolFile<'_>>,
    progress: &dyn Progress,
) -> Result<(u64, String)> {
    let streams = repo.store.download_streams();
    if streams > 1 && part.size_stored > 2 * RANGE {
        return download_ranges(repo, key, part.size_stored, streams, out, progress).await;
    }
    let mut r = repo
        .store
        .open(key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    let reading = |e: io::Error| Error::failed(format!("reading {key}: {e}"));
    match out {
        Some(out) => hashed(&mut r, out.file, &reading, out.failed, progress).await,
        None => hashed(&mut r, &mut tokio::io::sink(), &reading, &reading, progress).await,
    }
}

/// Copies `from` to `to`, returning the bytes and their SHA-256.
async fn hashed<R, W>(
    from: &mut R,
    to: &mut W,
    read_failed: &(dyn Fn(io::Error) -> Error + Sync),
    write_failed: &(dyn Fn(io::Error) -> Error + Sync),
    progress: &dyn Progress,
) -> Result<(u64, String)>
where
    R: AsyncRead + Unpin + ?Sized,
    W: tokio::io::AsyncWrite + Unpin + ?Sized,
{
    pipeline::copy_hashed(from, to, |k| progress.advance(k))
        .await
        .map_err(|e| match e {
            pipeline::CopyError::Read(e) => read_failed(e),
            pipeline::CopyError::Write(e) => write_failed(e),
        })
}

/// Exit 13 unless `n` bytes of SHA-256 `digest` are what the manifest says `part` holds.
fn check_stored(key: &str, part: &Part, n: u64, digest: &str) -> Result<()> {
    if digest != part.sha256_stored || n != part.size_stored {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{key}: SHA-256 {digest} ({n} bytes), the manifest says {} ({} bytes)",
                part.sha256_stored, part.size_stored
            ),
        )
        .hint("nothing was applied; use another backup and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)"));
    }
    Ok(())
}

/// A large object is downloaded in ranges of this size, `repository.download_streams` at a
/// time, each retried on its own: several connections fill a link one cannot (S3 serves each at
/// a fraction of the instance's bandwidth), and a dropped connection costs one range. Ranges in
/// flight are held until written in order, so the streams bound the memory too.
const RANGE: u64 = 4 << 20;

/// Bytes of an age payload chunk, and of one stored (with its tag): payload chunk `i` is stored
/// at `header_len + i × AGE_CHUNK_STORED` (see [`SeekIndex`]).
const AGE_CHUNK: u64 = 64 << 10;
const AGE_CHUNK_STORED: u64 = AGE_CHUNK + 16;

/// Most stored bytes [`Spooled::keep`] holds in memory.
const KEEP: u64 = 16 << 20;

/// A spool file, and what a failed write to it is reported as.
struct SpoolFile<'a> {
    file: &'a mut tokio::fs::File,
    failed: &'a (dyn Fn(io::Error) -> Error + Sync),
}

impl SpoolFile<'_> {
    async fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.write_all(bytes).await.map_err(self.failed)
    }

    async fn flush(&mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await.map_err(self.failed)
    }
}

/// Downloads `key`, expected to be `size` bytes, in ranges, `streams` at a time, hashing in
/// order, into `out` if any.
/// Returns the bytes and the SHA-256 of what the store holds: the last range asks for one byte
/// more than `size`, so an object that grew is seen as well as one that shrank.
async fn download_ranges(
    repo: &Repository,
    key: &str,
    size: u64,
    streams: usize,
    mut out: Option<&mut SpoolFile<'_>>,
    progress: &dyn Progress,
) -> Result<(u64, String)> {
    use futures::StreamExt;
    let ranges = (0..size.div_ceil(RANGE)).map(|i| {
        let offset = i * RANGE;
        let len = RANGE.min(size - offset) + u64::from(offset + RANGE >= size);
        (offset, len)
    });
    let mut pieces = futures::stream::iter(ranges)
        .map(|(offset, len)| async move {
            let got = repo.store.get_range(key, offset, len).await;
            got.map(|b| (offset, len, b))
                .map_err(|e| Error::from(e).context(format!("reading {key}")))
        })
        .buffered(streams);
    let mut hasher = Sha256::new();
    let mut n = 0;
    while let Some(piece) = pieces.next().await {
        let (offset, len, bytes) = piece?;
        hasher.update(&bytes);
        n += bytes.len() as u64;
        if let Some(out) = out.as_mut() {
            out.write_all(&bytes).await?;
        }
        progress.advance(bytes.len() as u64);
        // A short range ends the object: what follows is not there.
        if (bytes.len() as u64) < len && offset + len <= size {
            break;
        }
    }
    if let Some(out) = out.as_mut() {
        out.flush().await?;
    }
    Ok((n, hex::encode(hasher.finalize())))
}

/// Checks the SHA-256 and size of what is read through it at EOF; a mismatch is a read error
/// (InvalidData), so a consumer such as pg_restore is stopped instead of finishing on the wrong
/// data.
struct Checked<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
    want_sha: String,
    want_size: u64,
    /// What is read, for the error: "base.tar.zst.age: plaintext", "KEY: stored".
    name: String,
}

impl<R> Checked<R> {
    fn new(inner: R, name: String, want_sha: &str, want_size: u64) -> Self {
        Checked {
            inner,
            hasher: Sha256::new(),
            size: 0,
            want_sha: want_sha.to_string(),
            want_size,
            name,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Checked<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new_len = buf.filled().len() - before;
                if new_len == 0 {
                    let digest = hex::encode(self.hasher.clone().finalize());
                    if digest != self.want_sha || self.size != self.want_size {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{} SHA-256 {digest} ({} bytes), the manifest says {} ({} bytes)",
                                self.name, self.size, self.want_sha, self.want_size
                            ),
                        )));
                    }
                } else {
                    let this = &mut *self;
                    this.hasher.update(&buf.filled()[before..]);
                    this.size += new_len as u64;
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl Spooled {
    /// `part`, read whole and checked, held by `held`.
    fn new(part: &Part, held: Held, spool: Option<tempfile::NamedTempFile>) -> Spooled {
        Spooled {
            part: part.clone(),
            held,
            whole_checked: true,
            header: std::sync::OnceLock::new(),
            fetched: std::sync::Arc::default(),
            kept: std::sync::OnceLock::new(),
            _spool: spool,
        }
    }

    /// `part` of `manifest` where it is stored (its own file in a local directory repository),
    /// neither read nor checked yet: for a reader of some of its frames through
    /// [`Spooled::open_at`], which checks the age header against the manifest's hash, under
    /// which age authenticates every chunk read. A whole read checks the stored SHA-256 at its
    /// end. Its reads block: use it on a multi-threaded runtime, or from a blocking thread.
    pub async fn where_stored(
        repo: &Repository,
        manifest: &Manifest,
        part: &Part,
    ) -> Result<Spooled> {
        let key = layout::backup_object(&manifest.source, &manifest.id, &part.name);
        let own = repo
            .store
            .open_file(&key)
            .await
            .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
        let held = match own {
            Some(file) => Held::File(std::sync::Arc::new(file)),
            None => Held::Store {
                store: repo.store.clone(),
                key,
                runtime: tokio::runtime::Handle::current(),
            },
        };
        Ok(Spooled {
            whole_checked: false,
            ..Spooled::new(part, held, None)
        })
    }

    /// Stored bytes its readers have read so far.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The age header, read and checked on the first call: the manifest's hash of it means the
    /// file key is the backup's, and so is every chunk age accepts under it.
    fn header(&self, seek: &SeekIndex) -> Result<std::sync::Arc<[u8]>> {
        if let Some(h) = self.header.get() {
            return Ok(h.clone());
        }
        let name = &self.part.name;
        let mut header = vec![0; seek.header_len as usize];
        let mut reader = SpooledReader {
            ahead_until: seek.header_len,
            ..self.reader()
        };
        io::Read::read_exact(&mut reader, &mut header)
            .map_err(|e| Error::failed(format!("{name}: reading its header: {e}")))?;
        let sha = hex::encode(Sha256::digest(&header));
        if sha != seek.header_sha256 {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{name}: the age header's SHA-256 is {sha}, the manifest says {}",
                    seek.header_sha256
                ),
            )
            .hint("the stored object is not the one its manifest describes; use another backup and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)"));
        }
        Ok(self.header.get_or_init(|| header.into()).clone())
    }

    /// The decoded plaintext from `offset` on, decoded from the start of the zstd frame that
    /// holds it: age seeks to the chunk that frame starts in. With `until` (a frame start),
    /// the reader means to stop there, and the store is not read ahead past the chunk that
    /// frame starts in. The part must have a seek index. Its reads block.
    pub fn open_at(
        &self,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        offset: u64,
        until: Option<u64>,
    ) -> Result<impl io::BufRead + Send> {
        use io::{BufReader, Read, Seek};
        let name = &self.part.name;
        let seek = self.part.seek.as_ref().ok_or_else(|| {
            Error::failed(format!(
                "{name}: no seek index, so it is read from its start"
            ))
        })?;
        let mut file = self.reader_after(self.header(seek)?);
        if let Some(until) = until {
            let [_, at] = seek.frame_of(until);
            file.ahead_until = seek.header_len + at.div_ceil(AGE_CHUNK) * AGE_CHUNK_STORED;
        }
        let mut stream = age::Decryptor::new(BufReader::with_capacity(256 << 10, file))
            .and_then(|d| d.decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity)))
            .map_err(|e| {
                Error::new(ErrorKind::Integrity, format!("{name}: cannot decrypt: {e}"))
            })?;
        let [plain, at] = seek.frame_of(offset);
        let damaged = |e: io::Error| {
            Error::new(
                ErrorKind::Integrity,
                format!("{name}: reading at plaintext offset {offset}: {e}"),
            )
        };
        stream.seek(io::SeekFrom::Start(at)).map_err(damaged)?;
        let zstd = zstd::stream::read::Decoder::new(stream).map_err(damaged)?;
        let mut r = BufReader::with_capacity(256 << 10, zstd);
        io::copy(&mut r.by_ref().take(offset - plain), &mut io::sink()).map_err(damaged)?;
        Ok(r)
    }

    /// Fetches the stored chunks that hold the plaintext from `from` to `until` (frame starts,
    /// `None`: the end) once, and keeps them for every reader made after, when they come to at
    /// most [`KEEP`] bytes: a restore that passes over a few frames several times reads them
    /// from the repository once. Returns whether it kept them.
    pub async fn keep(&self, from: u64, until: Option<u64>) -> Result<bool> {
        let Some(seek) = &self.part.seek else {
            return Ok(false);
        };
        let chunk = |plain: u64| seek.frame_of(plain)[1] / AGE_CHUNK;
        let start = seek.header_len + chunk(from) * AGE_CHUNK_STORED;
        let end = until.map_or(self.part.size_stored, |until| {
            let [_, at] = seek.frame_of(until);
            (seek.header_len + at.div_ceil(AGE_CHUNK) * AGE_CHUNK_STORED).min(self.part.size_stored)
        });
        if end <= start || end - start > KEEP {
            return Ok(false);
        }
        let got = match &self.held {
            Held::Store { store, key, .. } => store
                .get_range(key, start, end - start)
                .await
                .map_err(|e| Error::from(e).context(format!("reading {key}")))?,
            Held::File(file) => {
                let file = file.clone();
                let name = self.part.name.clone();
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut got = vec![0; (end - start) as usize];
                    file.read_exact_at(&mut got, start)
                        .map(|_| bytes::Bytes::from(got))
                        .map_err(|e| match e.kind() {
                            io::ErrorKind::UnexpectedEof => Error::new(
                                ErrorKind::Integrity,
                                format!("{name}: shorter than its manifest says"),
                            ),
                            _ => Error::failed(format!("reading {name}: {e}")),
                        })
                })
                .await
                .map_err(|e| Error::failed(format!("reading {}: {e}", self.part.name)))??
            }
        };
        self.fetched
            .fetch_add(got.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let _ = self.kept.set((start, got));
        Ok(true)
    }

    /// `file` opened again, with an offset of its own at its start: through `/proc/self/fd`
    /// (the same file, whatever its path now names), else a duplicate moved to the start
    /// (sharing its offset with other duplicates: one stream at a time).
    fn reopen(&self, file: &std::fs::File) -> Result<std::fs::File> {
        use std::io::Seek;
        use std::os::fd::AsRawFd;
        let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
        if let Ok(f) = std::fs::File::open(proc) {
            return Ok(f);
        }
        let reopening = |e: io::Error| Error::failed(format!("{}: reopening: {e}", self.part.name));
        let mut f = file.try_clone().map_err(reopening)?;
        f.rewind().map_err(reopening)?;
        Ok(f)
    }

    /// The checked ciphertext from its start.
    pub fn reader(&self) -> SpooledReader {
        SpooledReader {
            held: self.held.clone(),
            fetched: self.fetched.clone(),
            start: None,
            kept: self.kept.get().cloned(),
            size: self.part.size_stored,
            ahead_until: 0,
            pos: 0,
            ahead: bytes::Bytes::new(),
            ahead_at: 0,
            next_len: 256 << 10,
        }
    }

    /// The checked ciphertext from its start, its first bytes taken from `start` (its age
    /// header, read and checked once) rather than read again.
    pub fn reader_after(&self, start: std::sync::Arc<[u8]>) -> SpooledReader {
        SpooledReader {
            start: Some(start),
            ..self.reader()
        }
    }

    /// The plaintext, decrypted and decompressed from the checked ciphertext, checked at EOF
    /// (and, read again from the store, the ciphertext too).
    pub async fn plaintext(
        &self,
        identities: &[Box<dyn age::Identity + Send + Sync>],
    ) -> Result<Pin<Box<dyn AsyncRead + Send>>> {
        let stored: Pin<Box<dyn AsyncRead + Send>> = match &self.held {
            Held::File(file) if self.whole_checked => {
                Box::pin(tokio::io::BufReader::with_capacity(
                    256 << 10,
                    tokio::fs::File::from_std(self.reopen(file)?),
                ))
            }
            Held::File(file) => Box::pin(Checked::new(
                tokio::io::BufReader::with_capacity(
                    256 << 10,
                    tokio::fs::File::from_std(self.reopen(file)?),
                ),
                format!("{}: stored", self.part.name),
                &self.part.sha256_stored,
                self.part.size_stored,
            )),
            Held::Store { store, key, .. } => {
                let r = store
                    .open(key)
                    .await
                    .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
                Box::pin(Checked::new(
                    r,
                    format!("{key}: stored"),
                    &self.part.sha256_stored,
                    self.part.size_stored,
                ))
            }
        };
        let reader = pipeline::decrypt_stream(stored, identities)
            .await
            .map_err(|e| e.context(&self.part.name))?;
        Ok(Box::pin(plain_checked(reader, &self.part)))
    }

    /// Whether `identities` open it, found before anything is applied. Where it is read by
    /// range from the store, only its age header is read (the one its seek index checks),
    /// not a whole download dropped after its header.
    pub async fn opens_with(
        &self,
        identities: &[Box<dyn age::Identity + Send + Sync>],
    ) -> Result<()> {
        match (&self.held, &self.part.seek) {
            (Held::Store { .. }, Some(seek)) => {
                let header = tokio::task::block_in_place(|| self.header(seek))?;
                let header = io::Cursor::new(header.to_vec());
                pipeline::decrypt_stream(Box::pin(header), identities)
                    .await
                    .map(drop)
                    .map_err(|e| e.context(&self.part.name))
            }
            _ => self.plaintext(identities).await.map(drop),
        }
    }

    /// Writes the checked plaintext to a file in `dir` (for parallel pg_restore).
    pub async fn plaintext_file(
        &self,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        dir: &std::path::Path,
        progress: std::sync::Arc<dyn Progress>,
    ) -> Result<tempfile::NamedTempFile> {
        let file = tempfile::Builder::new()
            .prefix("lifeboat-plain-")
            .tempfile_in(dir)
            .map_err(|e| {
                Error::failed(format!(
                    "cannot create a spool file in {}: {e}",
                    dir.display()
                ))
            })?;
        let mut out = tokio::fs::File::from_std(
            file.reopen()
                .map_err(|e| Error::failed(format!("cannot open the spool file: {e}")))?,
        );
        let mut r = Counting {
            inner: self.plaintext(identities).await?,
            progress,
        };
        tokio::io::copy(&mut r, &mut out).await.map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                Error::new(ErrorKind::Integrity, e.to_string())
            } else {
                Error::failed(format!("spooling the plaintext in {}: {e}", dir.display()))
            }
        })?;
        Ok(file)
    }
}

fn plain_checked<R>(plain: R, part: &Part) -> Checked<R> {
    Checked::new(
        plain,
        format!("{}: plaintext", part.name),
        &part.sha256_plain,
        part.size_plain,
    )
}

/// The plaintext of `part`, streamed from the repository: decrypted and decompressed as it
/// arrives, its stored and its plaintext SHA-256 and size checked at the end (a mismatch is a
/// read error of kind InvalidData). Only for a consumer that removes what it wrote when the
/// stream ends in an error; else [`spool`] first.
pub async fn stream_plaintext(
    repo: &Repository,
    manifest: &Manifest,
    part: &Part,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<Pin<Box<dyn AsyncRead + Send>>> {
    let key = layout::backup_object(&manifest.source, &manifest.id, &part.name);
    let stored = repo
        .store
        .open(&key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    checked_plaintext(stored, &key, part, identities).await
}

/// The plaintext of `part`, stored at `key`, from `stored` (its bytes as read), checked as
/// [`stream_plaintext`] checks it.
pub async fn checked_plaintext(
    stored: crate::store::ObjectReader,
    key: &str,
    part: &Part,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<Pin<Box<dyn AsyncRead + Send>>> {
    let stored = Checked::new(
        stored,
        format!("{key}: stored"),
        &part.sha256_stored,
        part.size_stored,
    );
    let reader = pipeline::decrypt_stream(
        Box::pin(tokio::io::BufReader::with_capacity(256 << 10, stored)),
        identities,
    )
    .await
    .map_err(|e| e.context(&part.name))?;
    Ok(Box::pin(plain_checked(reader, part)))
}

/// The part of `manifest` with `role` (`database`, `snapshot`…); missing is an integrity failure.
pub fn part(manifest: &Manifest, role: Role) -> Result<&Part> {
    manifest
        .parts
        .iter()
        .find(|p| p.role == role)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Integrity,
                format!("backup {} has no {role} part", manifest.id),
            )
        })
}

/// Reads and decrypts a backup's fingerprint, checking its stored SHA-256 first.
pub async fn fingerprint(
    repo: &Repository,
    manifest: &Manifest,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<serde_json::Value> {
    let Some(f) = &manifest.fingerprint else {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("backup {} has no fingerprint", manifest.id),
        ));
    };
    let key = layout::backup_object(&manifest.source, &manifest.id, &f.name);
    let bytes = repo
        .store
        .get(&key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    if digest != f.sha256_stored {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{key}: SHA-256 {digest}, the manifest says {}",
                f.sha256_stored
            ),
        ));
    }
    let decryptor = age::Decryptor::new(&bytes[..])
        .map_err(|e| Error::new(ErrorKind::Integrity, format!("{key}: not an age file: {e}")))?;
    let mut r = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| Error::new(ErrorKind::Credential, format!("{key}: cannot decrypt: {e}")))?;
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut plain)
        .map_err(|e| Error::new(ErrorKind::Integrity, format!("{key}: {e}")))?;
    serde_json::from_slice(&plain)
        .map_err(|e| Error::new(ErrorKind::Integrity, format!("{key}: not JSON: {e}")))
}

/// What an operator asked to restore, and how: everything a kind needs to plan.
pub struct Request<'a> {
    /// The policy (a kind reads its source's settings from it, when the source is still there).
    pub policy: &'a crate::policy::Policy,
    /// The repository holding the backup.
    pub repo: &'a Repository,
    /// The backup.
    pub entry: &'a crate::repo::catalog::Entry,
    /// `--to`, as written.
    pub to: &'a str,
    /// The options, as given; a kind refuses those that do not apply to it.
    pub options: &'a Options,
}

/// Restore options. Each applies to some kinds only; the others refuse it (exit 2).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// PostgreSQL: parallel pg_restore jobs (the plaintext is spooled when above 1).
    pub jobs: u32,
    /// PostgreSQL: also replay roles.
    pub with_globals: bool,
    /// PostgreSQL: do not restore ownership.
    pub no_owner: bool,
    /// Redis: FLUSHALL a live target first.
    pub flush: bool,
    /// Objects: delete what the snapshot does not hold.
    pub delete_extra: bool,
    /// Objects: restore only this path (a file, or a directory and what is under it), to the
    /// same place under the target.
    pub path: Option<String>,
    /// Where downloaded objects (and a parallel restore's plaintext) are spooled.
    pub spool_dir: std::path::PathBuf,
    /// Physical PostgreSQL: recover to a point in time from the WAL archive.
    pub recovery: Option<crate::source::postgres_physical::pitr::Recovery>,
    /// Physical PostgreSQL, with `recovery`: start a server on this port and wait until it is
    /// promoted.
    pub start: Option<u16>,
}

/// Why a restore must be confirmed: the target holds data. Without confirmation, `error` (exit 14).
#[derive(Debug)]
pub struct Refusal {
    /// The refusal, with what to do instead.
    pub error: Error,
    /// What to ask on a terminal.
    pub question: String,
    /// What the operator must type to go on.
    pub word: String,
}

impl Refusal {
    /// Refuses because `what` (e.g. "database app" or "/restore/dir is not empty;"): "`what`;
    /// refusing to restore into it (nothing was changed)", with `hint`; on a terminal the operator
    /// may type `word` instead.
    pub fn new(what: &str, hint: &str, word: &str) -> Refusal {
        Refusal {
            error: Error::new(
                ErrorKind::Refused,
                format!("{what}; refusing to restore into it (nothing was changed)"),
            )
            .hint(hint),
            question: if word == "yes" {
                "Type yes to restore into it anyway: ".to_string()
            } else {
                format!("Type the database name ({word}) to restore into it anyway: ")
            },
            word: word.to_string(),
        }
    }
}

/// A restore, planned: what it will do, shown before anything changes. Planning only looks at the
/// target; [`Plan::apply`] changes it.
pub struct Plan {
    /// The plan as one JSON document (`--json`).
    pub document: serde_json::Value,
    /// The backup's verification status, for people.
    pub verification: String,
    /// The target, for people (passwords redacted).
    pub target: String,
    /// What will happen.
    pub action: String,
    /// Further lines of the plan: (label, text).
    pub details: Vec<(&'static str, String)>,
    /// Set when the target holds data: the restore needs confirmation.
    pub refusal: Option<Refusal>,
    /// What an interruption leaves behind.
    pub interrupted: String,
    apply: Box<dyn Apply>,
}

/// What a restore did.
#[derive(Debug)]
pub struct Outcome {
    /// The plan document's `result` member (`--json`).
    pub result: serde_json::Value,
    /// What to tell the operator, line by line.
    pub lines: Vec<String>,
}

/// A kind's apply step, holding what its plan found. Its future need not be `Send`: a restore
/// runs on the caller's task.
#[async_trait::async_trait(?Send)]
pub trait Apply: Send + Sync {
    /// Restores. Every object is checked before anything is applied.
    async fn apply(
        self: Box<Self>,
        repo: &Repository,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        progress: std::sync::Arc<dyn Progress>,
    ) -> Result<Outcome>;
}

impl Plan {
    /// A plan of `action` on `target`, carried out by `apply`.
    pub fn new(
        request: &Request<'_>,
        target: String,
        action: String,
        details: serde_json::Map<String, serde_json::Value>,
        apply: Box<dyn Apply>,
    ) -> Plan {
        let verification = verification_state(request.entry);
        let m = &request.entry.manifest;
        let mut document = serde_json::json!({
            "backup": {
                "id": m.id, "source": m.source, "kind": m.kind, "started_at": m.started_at,
                "finished_at": m.finished_at, "size_plain": m.size_plain,
                "size_stored": m.size_stored, "verification": verification,
                "source_version": m.source_version,
            },
        });
        for (k, v) in details {
            document[k] = v;
        }
        document["action"] = serde_json::Value::String(action.clone());
        Plan {
            document,
            verification,
            target,
            action,
            details: Vec::new(),
            refusal: None,
            interrupted: "interrupted; the target may hold a partial restore".into(),
            apply,
        }
    }

    /// Restores, as planned.
    pub async fn apply(
        self,
        repo: &Repository,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        progress: std::sync::Arc<dyn Progress>,
    ) -> Result<Outcome> {
        self.apply.apply(repo, identities, progress).await
    }
}

/// Plans the restore of `request.entry` with its kind's code.
pub async fn plan(request: &Request<'_>) -> Result<Plan> {
    let kind = request.entry.manifest.kind;
    if request.options.recovery.is_some() && kind != crate::source::Kind::PostgresPhysical {
        return Err(no_recovery_for(&request.entry.manifest.source, kind));
    }
    if request.options.path.is_some() && kind != crate::source::Kind::Objects {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "--path picks files out of an objects snapshot; {} is a {kind} source",
                request.entry.manifest.source
            ),
        ));
    }
    kind.plan_restore(request).await
}

/// A recovery target given for a source of `kind`, which has no WAL archive.
pub fn no_recovery_for(source: &str, kind: crate::source::Kind) -> Error {
    Error::new(
        ErrorKind::Invalid,
        format!(
            "--time, --lsn, --latest and --timeline recover a physical PostgreSQL source from its WAL archive; {source} is a {kind} source"
        ),
    )
    .hint("restore one of its backups by --backup ID or --before TIME instead")
}

/// `verified`, `LAST VERIFICATION FAILED` or `never verified`.
pub fn verification_state(entry: &crate::repo::catalog::Entry) -> String {
    match &entry.verification {
        Some(v) if v.result == "pass" => "verified".to_string(),
        Some(_) => "LAST VERIFICATION FAILED".to_string(),
        None => "never verified".to_string(),
    }
}
