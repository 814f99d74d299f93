//! The backup pipeline, in fixed order: SHA-256 and size of the plaintext → zstd → age → SHA-256
//! and size of the stored bytes → upload parts.
//!
//! What must hold:
//! - The age stream is finished (its last chunk written) only after the source reached EOF *and*
//!   the producer's verdict (e.g. pg_dump's exit status) came back good. Any failure before that
//!   cancels the upload, so a truncated stream never becomes an object, let alone a backup.
//! - Memory is bounded: one read buffer, zstd's window, the part being filled, one queued part and
//!   `parts_in_flight` uploading parts. Nothing grows with the size of the backup.
//! - The CPU-heavy chain runs on a blocking thread (via `Handle::block_on`), never on a reactor
//!   worker; zstd's own workers use the second core.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use async_compression::tokio::write::ZstdEncoder;
use async_compression::zstd::CParameter;
use async_compression::Level;
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::compat::{FuturesAsyncWriteCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::{CancellationToken, PollSender};

use crate::error::{Error, ErrorKind};
use crate::store::{self, ObjectStore, StoreError};

/// Bytes read from the source at a time.
const READ_BUFFER: usize = 256 << 10;

/// Input per zstd worker job. zstd's default at level 3 is 8 MiB, which with two workers costs
/// ~60 MiB of buffers; 2 MiB measured the same speed and ratio on a 633 MiB dump at 45 MiB peak
/// RSS for the whole process (BENCHMARKS.md).
const ZSTD_JOB_SIZE: u32 = 2 << 20;

/// Pipeline settings, from the policy.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// zstd level.
    pub level: i32,
    /// zstd worker threads (0 = inline).
    pub workers: u32,
    /// Encrypt to these.
    pub recipients: Vec<age::x25519::Recipient>,
    /// Upload part size.
    pub part_size: usize,
    /// Parts uploading at once.
    pub parts_in_flight: usize,
    /// Counts the bytes read and stored, for a progress display (`lifeboat backup` on a terminal).
    pub meter: Option<Arc<Meter>>,
    /// When set, the stream is sealed with this key (age's scrypt recipient) instead of to the
    /// recipients: state that only the agent, which holds no identity, reads back.
    pub index_key: Option<crate::policy::Secret>,
}

/// S3's smallest upload part, and the part size of [`PipelineConfig::small`].
const SMALL_PART_SIZE: usize = 5 << 20;

impl PipelineConfig {
    /// The same settings for a stream that is never CPU-bound, or one of several at once:
    /// single-threaded zstd, one part in flight, parts of 5 MiB (S3's least) unless the policy's
    /// are smaller. About 12 MiB of buffers; an object can still reach 10,000 × 5 MiB.
    pub fn small(&self) -> PipelineConfig {
        PipelineConfig {
            workers: 0,
            parts_in_flight: 1,
            part_size: self.part_size.min(SMALL_PART_SIZE),
            ..self.clone()
        }
    }

    /// The same settings, sealing with `key` (see [`PipelineConfig::index_key`]).
    pub fn sealed_with(&self, key: &crate::policy::Secret) -> PipelineConfig {
        PipelineConfig {
            index_key: Some(key.clone()),
            ..self.clone()
        }
    }
}

/// Bytes through the pipelines of one backup so far: read from the producer, and handed to the
/// upload after compression and encryption.
#[derive(Debug, Default)]
pub struct Meter {
    /// Plaintext bytes read.
    pub read: std::sync::atomic::AtomicU64,
    /// Stored bytes.
    pub stored: std::sync::atomic::AtomicU64,
}

impl Meter {
    fn add(meter: &Option<Arc<Meter>>, read: u64, stored: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(m) = meter {
            m.read.fetch_add(read, Relaxed);
            m.stored.fetch_add(stored, Relaxed);
        }
    }
}

/// Sizes and SHA-256 digests of what went in and what was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Plaintext bytes.
    pub size_plain: u64,
    /// SHA-256 of the plaintext, hex.
    pub sha256_plain: String,
    /// Stored bytes.
    pub size_stored: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256_stored: String,
    /// Where reading may start, when the observer offered frame starts.
    pub seek: Option<crate::repo::manifest::SeekIndex>,
}

impl Digests {
    /// The manifest entry for the object these digests describe.
    pub fn part(
        &self,
        name: &str,
        role: crate::repo::manifest::Role,
        format: &str,
    ) -> crate::repo::manifest::Part {
        crate::repo::manifest::Part {
            name: name.to_string(),
            role,
            format: format.to_string(),
            size_plain: self.size_plain,
            sha256_plain: self.sha256_plain.clone(),
            size_stored: self.size_stored,
            sha256_stored: self.sha256_stored.clone(),
            seek: self.seek.clone(),
        }
    }
}

/// Sees every plaintext chunk as it passes (e.g. to fingerprint a dump without a second read).
pub trait Observer: Send + 'static {
    /// Called with each chunk, in order.
    fn observe(&mut self, chunk: &[u8]);

    /// Moves into `out` the plaintext offsets, within the chunk just observed, where a reader
    /// would want to start (a dump's data blocks). The stream is cut into a new zstd frame at
    /// such an offset once the frame holds [`MIN_FRAME`] bytes, and the stored part gets a
    /// [`crate::repo::manifest::SeekIndex`]. None by default.
    fn frame_starts(&mut self, _out: &mut Vec<u64>) {}
}

/// Plaintext a zstd frame holds at least before it is cut at an offered start: a reader starting
/// at an offered offset decodes at most this much before it, and a frame's fresh window costs
/// next to nothing in ratio at this size.
pub const MIN_FRAME: u64 = 4 << 20;

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn observe(&mut self, _chunk: &[u8]) {}
}

/// Why the pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Reading the source failed.
    #[error("reading from the source failed: {0}")]
    Source(io::Error),
    /// The source produced nothing.
    #[error("the source produced no data")]
    Empty,
    /// The producer reported failure after its output ended.
    #[error("{0}")]
    Producer(Error),
    /// Compression or encryption failed.
    #[error("compressing or encrypting failed: {0}")]
    Encode(io::Error),
    /// Storing failed.
    #[error("storing {key} failed: {source}")]
    Upload {
        /// The object key.
        key: String,
        /// The store's error.
        source: StoreError,
    },
    /// The run was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl From<PipelineError> for Error {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Producer(inner) => inner,
            PipelineError::Upload { key, source } => {
                Error::from(source).context(format!("storing {key}"))
            }
            PipelineError::Cancelled => Error::new(ErrorKind::Interrupted, "cancelled"),
            other => Error::failed(other.to_string()),
        }
    }
}

#[derive(Debug, Default)]
struct StoredDigest {
    hasher: Sha256,
    size: u64,
    /// The stored stream's first bytes, until the age header in them is found.
    head: Vec<u8>,
    /// The age header's length (with the payload nonce) and SHA-256.
    header: Option<(u64, String)>,
}

/// An age header longer than this (thousands of recipients) gets no seek index.
const MAX_HEADER: usize = 1 << 20;

impl StoredDigest {
    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
        if self.header.is_none() && self.head.len() < MAX_HEADER {
            self.head.extend_from_slice(data);
            if let Some(len) = age_header_len(&self.head) {
                self.header = Some((len as u64, hex::encode(Sha256::digest(&self.head[..len]))));
                self.head = Vec::new();
            }
        }
    }
}

/// Where an age v1 file's payload chunks begin: after the header's MAC line (`--- …`) and the
/// payload's 16-byte nonce; `None` until all of that is in `bytes`.
pub fn age_header_len(bytes: &[u8]) -> Option<usize> {
    const NONCE: usize = 16;
    if !bytes.starts_with(b"age-encryption.org/v1\n") {
        return None;
    }
    let mac = bytes.windows(5).position(|w| w == b"\n--- ")?;
    let end = mac + 1 + bytes[mac + 1..].iter().position(|&b| b == b'\n')? + 1;
    (bytes.len() >= end + NONCE).then_some(end + NONCE)
}

/// The pipeline's last stage: hashes stored bytes and cuts them into parts for the uploader.
struct PartSink {
    buf: BytesMut,
    part_size: usize,
    tx: PollSender<Bytes>,
    digest: Arc<Mutex<StoredDigest>>,
    /// Set once the last part is handed over; until then, dropping the sink aborts the upload.
    finished: bool,
    abort: CancellationToken,
    meter: Option<Arc<Meter>>,
}

impl Drop for PartSink {
    fn drop(&mut self) {
        // Runs before the sender is dropped, so the uploader sees the abort, never a clean end.
        if !self.finished {
            self.abort.cancel();
        }
    }
}

impl PartSink {
    /// The sink's error once the uploader has gone (it failed, or the run was cancelled).
    fn upload_stopped() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped")
    }

    /// Ready once the uploader can take a part.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.tx.poll_reserve(cx)).map_err(|_| Self::upload_stopped())?;
        Poll::Ready(Ok(()))
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_room(cx))?;
        let part = self.buf.split().freeze();
        self.tx
            .send_item(part)
            .map_err(|_| Self::upload_stopped())?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PartSink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= this.part_size {
            ready!(this.poll_send(cx))?;
        }
        if this.buf.is_empty() {
            // The next part is started once the last one is taken for upload: a part waiting
            // in the channel while the next fills would be one buffer more than the uploads in
            // flight and the one filling.
            ready!(this.poll_room(cx))?;
            this.buf.reserve(this.part_size);
        }
        let n = data.len().min(this.part_size - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        let mut d = this
            .digest
            .lock()
            .map_err(|_| io::Error::other("digest state poisoned"))?;
        d.update(&data[..n]);
        Meter::add(&this.meter, 0, n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Parts are cut by size only: a flush must not send a short part mid-stream.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            ready!(this.poll_send(cx))?;
        }
        this.finished = true;
        this.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// Streams `input` through the pipeline into the object `key`.
///
/// `verdict` resolves once the producer has finished (for a child process: its exit status); the
/// age stream is finished and the object completed only if it is `Ok`. `observer` sees every
/// plaintext chunk and is handed back on success.
pub async fn run<R, V, O>(
    input: R,
    verdict: V,
    observer: O,
    store: Arc<dyn ObjectStore>,
    key: String,
    config: &PipelineConfig,
    cancel: CancellationToken,
) -> Result<(Digests, O), PipelineError>
where
    R: AsyncRead + Send + Unpin + 'static,
    V: Future<Output = Result<(), Error>> + Send + 'static,
    O: Observer,
{
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let upload_cancel = cancel.child_token();
    let upload = tokio::spawn(store::upload_parts(
        store,
        key.clone(),
        rx,
        config.parts_in_flight,
        upload_cancel.clone(),
    ));
    let digest = Arc::new(Mutex::new(StoredDigest::default()));
    let sink = PartSink {
        buf: BytesMut::with_capacity(config.part_size),
        part_size: config.part_size,
        tx: PollSender::new(tx),
        digest: digest.clone(),
        finished: false,
        abort: upload_cancel.clone(),
        meter: config.meter.clone(),
    };
    let handle = tokio::runtime::Handle::current();
    let cfg = config.clone();
    let chain_cancel = cancel.clone();
    let chain = tokio::task::spawn_blocking(move || {
        handle.block_on(encode(input, verdict, observer, sink, cfg, chain_cancel))
    });
    let encoded = match chain.await {
        Ok(r) => r,
        Err(e) => Err(PipelineError::Encode(io::Error::other(format!(
            "pipeline thread failed: {e}"
        )))),
    };
    let uploaded = match upload.await {
        Ok(r) => r,
        Err(e) => Err(StoreError::permanent(
            "upload",
            &key,
            format!("upload task failed: {e}"),
        )),
    };
    let (plain, frames, observer) = match (encoded, uploaded) {
        (Ok(v), Ok(())) => v,
        // An upload failure is the cause when the chain only saw the upload stop.
        (Err(PipelineError::Encode(_)), Err(e)) | (Ok(_), Err(e))
            if !matches!(e, StoreError::Cancelled) =>
        {
            return Err(PipelineError::Upload { key, source: e })
        }
        // The chain saw only the upload stop, and the upload was cancelled: so was the run.
        (Err(PipelineError::Encode(e)), Err(StoreError::Cancelled))
            if e.kind() == io::ErrorKind::BrokenPipe =>
        {
            return Err(PipelineError::Cancelled)
        }
        (Err(e), _) => return Err(e),
        (Ok(_), Err(_)) => return Err(PipelineError::Cancelled),
    };
    let d = digest
        .lock()
        .map_err(|_| PipelineError::Encode(io::Error::other("digest state poisoned")))?;
    let seek = match (frames, &d.header) {
        (Some(frames), Some((header_len, header_sha256))) => {
            Some(crate::repo::manifest::SeekIndex {
                header_len: *header_len,
                header_sha256: header_sha256.clone(),
                frames,
            })
        }
        _ => None,
    };
    Ok((
        Digests {
            size_plain: plain.0,
            sha256_plain: plain.1,
            size_stored: d.size,
            sha256_stored: hex::encode(d.hasher.clone().finalize()),
            seek,
        },
        observer,
    ))
}

async fn encode<R, V, O>(
    mut input: R,
    verdict: V,
    mut observer: O,
    sink: PartSink,
    config: PipelineConfig,
    cancel: CancellationToken,
) -> Result<Encoded<O>, PipelineError>
where
    R: AsyncRead + Unpin,
    V: Future<Output = Result<(), Error>>,
    O: Observer,
{
    let scrypt = config.index_key.as_ref().map(index_recipient);
    let encryptor = match &scrypt {
        Some(r) => age::Encryptor::with_recipients(std::iter::once(r as &dyn age::Recipient)),
        None => age::Encryptor::with_recipients(
            config.recipients.iter().map(|r| r as &dyn age::Recipient),
        ),
    }
    .map_err(|e| PipelineError::Encode(io::Error::other(e.to_string())))?;
    let age_writer = encryptor
        .wrap_async_output(sink.compat_write())
        .await
        .map_err(PipelineError::Encode)?;
    let mut params = Vec::new();
    if config.workers > 0 {
        params.push(CParameter::nb_workers(config.workers));
        params.push(CParameter::job_size(ZSTD_JOB_SIZE));
    }
    let frame =
        |sink| ZstdEncoder::with_quality_and_params(sink, Level::Precise(config.level), &params);
    let mut zstd = frame(FrameSink {
        inner: age_writer.compat_write(),
        written: 0,
    });
    let mut buf = vec![0u8; READ_BUFFER];
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    // Offered frame starts, and the frames cut so far (`None` while none was offered).
    let mut starts = Vec::new();
    let mut frames: Option<Vec<[u64; 2]>> = None;
    let mut frame_start = 0u64;
    loop {
        let n = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(PipelineError::Cancelled),
            r = input.read(&mut buf) => r.map_err(PipelineError::Source)?,
        };
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        observer.observe(chunk);
        observer.frame_starts(&mut starts);
        let at = size;
        size += n as u64;
        Meter::add(&config.meter, n as u64, 0);
        let mut from = 0;
        for start in starts.drain(..).filter(|s| (at..size).contains(s)) {
            let cuts = frames.get_or_insert_with(Vec::new);
            if start - frame_start < MIN_FRAME {
                continue;
            }
            let to = (start - at) as usize;
            write_frame(&mut zstd, &chunk[from..to], &cancel).await?;
            from = to;
            // The frame ends (the age stream does not) and the next starts here.
            zstd.shutdown().await.map_err(PipelineError::Encode)?;
            let sink = zstd.into_inner();
            cuts.push([start, sink.written]);
            frame_start = start;
            zstd = frame(sink);
        }
        write_frame(&mut zstd, &chunk[from..], &cancel).await?;
    }
    // The producer's verdict first: a pg_dump killed before its first byte is reported as
    // killed, not as a source that had nothing to say.
    tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(PipelineError::Cancelled),
        v = verdict => v.map_err(PipelineError::Producer)?,
    }
    if size == 0 {
        return Err(PipelineError::Empty);
    }
    // Only now: finish zstd's frame and the age stream, and hand over the last part.
    zstd.shutdown().await.map_err(PipelineError::Encode)?;
    zstd.into_inner()
        .inner
        .shutdown()
        .await
        .map_err(PipelineError::Encode)?;
    Ok(((size, hex::encode(hasher.finalize())), frames, observer))
}

/// What [`encode`] read (bytes, SHA-256), the frames it cut, and the observer.
type Encoded<O> = ((u64, String), Option<Vec<[u64; 2]>>, O);

/// Writes `data` into the current zstd frame, unless cancelled.
async fn write_frame<W: AsyncWrite + Unpin>(
    zstd: &mut ZstdEncoder<W>,
    data: &[u8],
    cancel: &CancellationToken,
) -> Result<(), PipelineError> {
    // A plain write, not io::copy: copy flushes, and every flush would cut zstd's jobs short.
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(PipelineError::Cancelled),
        r = zstd.write_all(data) => r.map_err(PipelineError::Encode),
    }
}

/// The age writer under zstd, counting what it is handed (offsets in the zstd stream). Its
/// shutdown only flushes: ending a zstd frame must not end the age stream.
struct FrameSink<W> {
    inner: W,
    written: u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FrameSink<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        this.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
}

/// scrypt work factor of what is sealed with the index key: the key is a high-entropy secret,
/// not a passphrase, so stretching it buys nothing.
const INDEX_WORK_FACTOR: u8 = 10;

/// The age recipient of what is sealed with the index key.
pub fn index_recipient(key: &crate::policy::Secret) -> age::scrypt::Recipient {
    let mut r = age::scrypt::Recipient::new(key.expose().to_string().into());
    r.set_work_factor(INDEX_WORK_FACTOR);
    r
}

/// The age identity that opens what [`index_recipient`] sealed.
pub fn index_identity(key: &crate::policy::Secret) -> age::scrypt::Identity {
    let mut id = age::scrypt::Identity::new(key.expose().to_string().into());
    id.set_max_work_factor(INDEX_WORK_FACTOR + 2);
    id
}

/// The X25519 identity derived from the index key (a keyed SHA-256 as its secret scalar).
/// Streams the agent must read back and the recipients must read too (an objects snapshot) are
/// sealed to its recipient beside theirs: an scrypt recipient cannot share a file with others.
pub fn index_x25519(key: &crate::policy::Secret) -> age::x25519::Identity {
    use age::secrecy::ExposeSecret;
    let mut h = Sha256::new();
    h.update(b"lifeboat index-key x25519 v1\0");
    h.update(key.expose().as_bytes());
    let secret: [u8; 32] = h.finalize().into();
    let hrp = bech32::Hrp::parse_unchecked("age-secret-key-");
    let mut encoded =
        bech32::encode::<bech32::Bech32>(hrp, &secret).expect("32 bytes fit in a Bech32 string");
    encoded.make_ascii_uppercase();
    let encoded = age::secrecy::SecretString::from(encoded);
    encoded
        .expose_secret()
        .parse()
        .expect("a Bech32 X25519 secret key is an age identity")
}

/// What [`run`] would store for `plain`, made in memory in one go: for contents small enough
/// to hold, where zstd sized to the input keeps its tables small.
pub fn seal_whole(plain: &[u8], config: &PipelineConfig) -> Result<Bytes, Error> {
    let compressed = zstd::bulk::compress(plain, config.level)
        .map_err(|e| Error::failed(format!("compressing failed: {e}")))?;
    let sealed = encrypt_small(&config.recipients, &compressed)?;
    Meter::add(&config.meter, plain.len() as u64, sealed.len() as u64);
    Ok(Bytes::from(sealed))
}

/// Encrypts a small in-memory document (a fingerprint) to the recipients.
pub fn encrypt_small(
    recipients: &[age::x25519::Recipient],
    plain: &[u8],
) -> Result<Vec<u8>, Error> {
    use std::io::Write;
    let fail = |e: String| Error::failed(format!("encrypting failed: {e}"));
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::with_capacity(plain.len() + 256);
    let mut w = encryptor
        .wrap_output(&mut out)
        .map_err(|e| fail(e.to_string()))?;
    w.write_all(plain).map_err(|e| fail(e.to_string()))?;
    w.finish().map_err(|e| fail(e.to_string()))?;
    Ok(out)
}

/// Parses age recipients (`age1…`).
pub fn parse_recipients(recipients: &[String]) -> Result<Vec<age::x25519::Recipient>, Error> {
    recipients
        .iter()
        .map(|r| {
            r.parse::<age::x25519::Recipient>().map_err(|_| {
                Error::new(
                    ErrorKind::Credential,
                    format!("`{r}` is not an age X25519 recipient"),
                )
                .hint("encryption.recipients takes the `age1…` lines `lifeboat keygen` prints")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;

/// Reverses the pipeline for reading: stored bytes → age decrypt → zstd decode → plaintext.
///
/// The plaintext is untrusted until EOF: age reports a damaged chunk only when it reaches it, after
/// earlier chunks were returned. Callers that apply data must check the stored SHA-256 first or
/// treat any read error as fatal to everything already read.
pub async fn decrypt_stream(
    stored: crate::store::ObjectReader,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<impl AsyncRead + Send + Unpin, Error> {
    use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
    let decryptor = age::Decryptor::new_async(stored.compat())
        .await
        .map_err(|e| Error::new(ErrorKind::Integrity, format!("not an age file: {e}")))?;
    let reader = decryptor
        .decrypt_async(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => Error::new(
                ErrorKind::Credential,
                "none of the identities can decrypt this backup",
            )
            .hint("use the identity whose recipient is listed in the manifest's encryption.recipients"),
            other => Error::new(ErrorKind::Integrity, format!("cannot decrypt: {other}")),
        })?;
    let mut decoder = async_compression::tokio::bufread::ZstdDecoder::new(
        tokio::io::BufReader::with_capacity(READ_BUFFER, reader.compat()),
    );
    decoder.multiple_members(true);
    Ok(decoder)
}

/// Reads an age identity file (the output of `lifeboat keygen` or `age-keygen`).
/// Where [`copy_hashed`] failed.
#[derive(Debug)]
pub enum CopyError {
    /// Reading: for a decrypted stream, damage (age's authentication failed) or a cut.
    Read(io::Error),
    /// Writing the destination.
    Write(io::Error),
}

/// Copies `from` into `to` to its end, calling `each` with every chunk's length; returns the
/// bytes copied and their SHA-256 (hex).
pub async fn copy_hashed<R, W>(
    from: &mut R,
    to: &mut W,
    mut each: impl FnMut(u64),
) -> Result<(u64, String), CopyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        let got = from.read(&mut buf).await.map_err(CopyError::Read)?;
        if got == 0 {
            break;
        }
        hasher.update(&buf[..got]);
        n += got as u64;
        each(got as u64);
        to.write_all(&buf[..got]).await.map_err(CopyError::Write)?;
    }
    to.flush().await.map_err(CopyError::Write)?;
    Ok((n, hex::encode(hasher.finalize())))
}

pub fn read_identities(
    path: &std::path::Path,
) -> Result<Vec<Box<dyn age::Identity + Send + Sync>>, Error> {
    let shown = path.display();
    let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned()).map_err(|e| {
        Error::new(
            ErrorKind::Credential,
            format!("cannot read identity file {shown}: {e}"),
        )
        .hint("pass --identity FILE, set LIFEBOAT_IDENTITY_FILE or encryption.identity_file")
    })?;
    let ids = file.into_identities().map_err(|e| {
        Error::new(
            ErrorKind::Credential,
            format!("identity file {shown} is not usable: {e}"),
        )
    })?;
    if ids.is_empty() {
        return Err(Error::new(
            ErrorKind::Credential,
            format!("identity file {shown} holds no identity"),
        ));
    }
    Ok(ids)
}
