//! Pipeline round trips and failure paths against a real directory store.

use super::*;
use crate::store::fs::FsStore;
use rand::RngCore;

fn setup() -> (
    tempfile::TempDir,
    Arc<dyn ObjectStore>,
    age::x25519::Identity,
    PipelineConfig,
) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(FsStore::new(dir.path().to_path_buf()));
    let id = age::x25519::Identity::generate();
    let cfg = PipelineConfig {
        level: 3,
        workers: 0,
        recipients: vec![id.to_public()],
        part_size: 64 << 10,
        parts_in_flight: 2,
        meter: None,
        index_key: None,
    };
    (dir, store, id, cfg)
}

fn data(len: usize) -> Vec<u8> {
    // Half random, half repetitive: compressible but not trivially.
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v[..len / 2]);
    for (i, b) in v[len / 2..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    v
}

async fn ok() -> Result<(), Error> {
    Ok(())
}

/// Runs `input` through the pipeline into `b/obj.zst.age` with a producer that succeeded.
async fn run_ok<O: Observer>(
    input: Vec<u8>,
    observer: O,
    store: &Arc<dyn ObjectStore>,
    cfg: &PipelineConfig,
) -> (Digests, O) {
    run(
        std::io::Cursor::new(input),
        ok(),
        observer,
        store.clone(),
        "b/obj.zst.age".into(),
        cfg,
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

#[derive(Default)]
struct Counter(u64);
impl Observer for Counter {
    fn observe(&mut self, chunk: &[u8]) {
        self.0 += chunk.len() as u64;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_zstd_and_age() {
    let (_dir, store, id, mut cfg) = setup();
    cfg.workers = 2;
    let input = data(3 << 20);
    let (d, counter) = run_ok(input.clone(), Counter::default(), &store, &cfg).await;
    assert_eq!(counter.0, input.len() as u64);
    assert_eq!(d.size_plain, input.len() as u64);
    assert_eq!(d.sha256_plain, hex::encode(Sha256::digest(&input)));
    let stored = store.get("b/obj.zst.age").await.unwrap();
    assert_eq!(d.size_stored, stored.len() as u64);
    assert_eq!(d.sha256_stored, hex::encode(Sha256::digest(&stored)));
    assert!(stored.len() > 64 << 10, "several parts were uploaded");

    let ids: Vec<Box<dyn age::Identity + Send + Sync>> = vec![Box::new(id)];
    let mut r = decrypt_stream(store.open("b/obj.zst.age").await.unwrap(), &ids)
        .await
        .unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    assert!(back == input, "plaintext differs after the round trip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_producer_publishes_nothing() {
    let (_dir, store, _id, cfg) = setup();
    let verdict = async { Err(Error::failed("pg_dump exited with status 1")) };
    let r = run(
        std::io::Cursor::new(data(1 << 20)),
        verdict,
        NoObserver,
        store.clone(),
        "b/obj".into(),
        &cfg,
        CancellationToken::new(),
    )
    .await;
    assert!(matches!(r, Err(PipelineError::Producer(_))), "{r:?}");
    assert!(store.list("").await.unwrap().is_empty());
    assert!(
        store.pending_uploads().await.unwrap().is_empty(),
        "temp file removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_input_publishes_nothing() {
    let (_dir, store, _id, cfg) = setup();
    let r = run(
        tokio::io::empty(),
        ok(),
        NoObserver,
        store.clone(),
        "b/obj".into(),
        &cfg,
        CancellationToken::new(),
    )
    .await;
    assert!(matches!(r, Err(PipelineError::Empty)), "{r:?}");
    assert!(store.list("").await.unwrap().is_empty());
}

/// A producer killed before its first byte is reported by its exit, not as empty output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_failed_before_any_output_says_so() {
    let (_dir, store, _id, cfg) = setup();
    let verdict = async { Err(Error::failed("pg_dump was killed by signal 9")) };
    let r = run(
        tokio::io::empty(),
        verdict,
        NoObserver,
        store.clone(),
        "b/obj".into(),
        &cfg,
        CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(&r, Err(PipelineError::Producer(e)) if e.message.contains("signal 9")),
        "{r:?}"
    );
    assert!(store.list("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_error_mid_stream_publishes_nothing() {
    let (_dir, store, _id, cfg) = setup();
    let good = std::io::Cursor::new(data(1 << 20));
    let bad = tokio_util::io::StreamReader::new(futures::stream::iter(vec![Err::<Bytes, _>(
        io::Error::new(io::ErrorKind::ConnectionReset, "connection reset"),
    )]));
    let r = run(
        good.chain(bad),
        ok(),
        NoObserver,
        store.clone(),
        "b/obj".into(),
        &cfg,
        CancellationToken::new(),
    )
    .await;
    assert!(matches!(r, Err(PipelineError::Source(_))), "{r:?}");
    assert!(store.list("").await.unwrap().is_empty());
    assert!(store.pending_uploads().await.unwrap().is_empty());
}

#[test]
fn small_documents_decrypt_with_the_stock_format() {
    let id = age::x25519::Identity::generate();
    let enc = encrypt_small(&[id.to_public()], b"{\"tables\":[]}").unwrap();
    let d = age::Decryptor::new(&enc[..]).unwrap();
    let mut r = d
        .decrypt(std::iter::once(&id as &dyn age::Identity))
        .unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut out).unwrap();
    assert_eq!(out, b"{\"tables\":[]}");
}

#[test]
fn the_index_key_derives_one_x25519_identity_that_opens_what_is_sealed_to_it_beside_others() {
    let key = crate::policy::Secret::new("an index key of at least thirty-two characters");
    let other = crate::policy::Secret::new("another index key of thirty-two characters");
    let derived = index_x25519(&key);
    assert_eq!(
        derived.to_public().to_string(),
        index_x25519(&key).to_public().to_string(),
        "the same key derives the same identity"
    );
    assert_ne!(
        derived.to_public().to_string(),
        index_x25519(&other).to_public().to_string()
    );
    let user = age::x25519::Identity::generate();
    let enc = encrypt_small(&[user.to_public(), derived.to_public()], b"snapshot").unwrap();
    for id in [&user as &dyn age::Identity, &derived] {
        let mut r = age::Decryptor::new(&enc[..])
            .unwrap()
            .decrypt(std::iter::once(id))
            .unwrap();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut out).unwrap();
        assert_eq!(out, b"snapshot");
    }
    let wrong = index_x25519(&other);
    assert!(age::Decryptor::new(&enc[..])
        .unwrap()
        .decrypt(std::iter::once(&wrong as &dyn age::Identity))
        .is_err());
}

/// Offers the given plaintext offsets as frame starts, each with the chunk that holds it.
struct Starts {
    offers: Vec<u64>,
    seen: u64,
    pending: Vec<u64>,
}

impl Observer for Starts {
    fn observe(&mut self, chunk: &[u8]) {
        let at = self.seen;
        self.seen += chunk.len() as u64;
        let seen = self.seen;
        self.pending
            .extend(self.offers.iter().filter(|o| (at..seen).contains(o)));
    }

    fn frame_starts(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.pending);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_into_frames_is_read_from_any_frame_without_what_precedes_it() {
    use std::io::{Read, Seek, SeekFrom};
    let (_dir, store, id, mut cfg) = setup();
    cfg.workers = 2;
    let mib = 1u64 << 20;
    let input = data(20 << 20);
    // 1 MiB and 6 MiB come too soon after a frame's start to cut there.
    let offers = vec![mib, 5 * mib, 6 * mib, 19 * mib / 2 + 3, 19 * mib];
    let observer = Starts {
        offers,
        seen: 0,
        pending: Vec::new(),
    };
    let (d, _) = run_ok(input.clone(), observer, &store, &cfg).await;
    let seek = d.seek.expect("a seek index");
    let starts: Vec<u64> = seek.frames.iter().map(|f| f[0]).collect();
    assert_eq!(starts, vec![5 * mib, 19 * mib / 2 + 3, 19 * mib]);
    assert_eq!(seek.frame_of(0), [0, 0]);
    assert_eq!(seek.frame_of(5 * mib - 1), [0, 0]);
    assert_eq!(seek.frame_of(6 * mib), seek.frames[0]);
    assert_eq!(seek.frame_of(u64::MAX), seek.frames[2]);

    let stored = store.get("b/obj.zst.age").await.unwrap();
    let header_len = seek.header_len as usize;
    assert_eq!(
        hex::encode(Sha256::digest(&stored[..header_len])),
        seek.header_sha256
    );
    // The whole, as stock tools read it: frames one after another.
    let open = || {
        let ids: Vec<Box<dyn age::Identity>> = vec![Box::new(id.clone())];
        age::Decryptor::new(std::io::Cursor::new(stored.clone()))
            .unwrap()
            .decrypt(ids.iter().map(|i| i.as_ref()))
            .unwrap()
    };
    let mut zst = Vec::new();
    open().read_to_end(&mut zst).unwrap();
    assert_eq!(
        (stored.len() - header_len) as u64,
        zst.len() as u64 + zst.len().div_ceil(64 << 10) as u64 * 16,
        "payload chunks of 64 KiB, each with its tag, right after the header"
    );
    assert!(zstd::stream::decode_all(&zst[..]).unwrap() == input);
    // From each frame, seeking in the age stream: the plaintext from that frame's start on.
    for [plain, at] in &seek.frames {
        let mut r = open();
        r.seek(SeekFrom::Start(*at)).unwrap();
        let mut back = Vec::new();
        zstd::stream::read::Decoder::new(r)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back[..] == input[*plain as usize..], "from {plain}");
    }
}

#[tokio::test]
async fn a_stream_offered_no_frame_starts_has_no_seek_index() {
    let (_dir, store, _id, cfg) = setup();
    let (d, _) = run_ok(data(1 << 20), Counter::default(), &store, &cfg).await;
    assert_eq!(d.seek, None);
    assert_eq!(
        age_header_len(b"age-encryption.org/v1\n-> X25519 abc\nbody\n--- mac\n0123456789abcdef..."),
        Some(49 + 16)
    );
    assert_eq!(
        age_header_len(b"age-encryption.org/v1\n-> X25519 abc\nbody\n--- mac\n0123"),
        None
    );
}
