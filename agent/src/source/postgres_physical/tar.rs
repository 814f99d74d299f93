//! The tar stream of a base backup, read as it passes through the pipeline, and unpacked again.
//!
//! [`TarObserver`] sees every chunk pg_basebackup writes, in order, and keeps the little a backup
//! must record about itself: `backup_label` (start LSN, timeline), the first bytes of
//! `global/pg_control` (the system identifier) and the tail of `backup_manifest` (the WAL range,
//! hence the stop LSN). It never buffers file contents beyond those, so memory stays flat
//! whatever the cluster's size. The stream comes from the server: a header that does not parse
//! is recorded as an error, never a panic, and fails the backup.
//!
//! [`unpack`] writes a checked plaintext tar into a directory (no entry may leave it): the
//! plaintext is read (downloaded, decrypted, decompressed, hashed) on the runtime while a blocking
//! task writes the files, so the two halves use two cores.

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

const BLOCK: usize = 512;
/// Most of `backup_label` kept (it is a few hundred bytes).
const LABEL_LIMIT: usize = 64 << 10;
/// How much of `backup_manifest`'s end is kept: its WAL ranges and checksum are the last lines.
const MANIFEST_TAIL: usize = 64 << 10;

/// What the tar held that the backup records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarSummary {
    /// `backup_label`'s text.
    pub backup_label: Option<String>,
    /// The first 16 bytes of `global/pg_control`.
    pub pg_control_head: Vec<u8>,
    /// The last bytes of `backup_manifest`.
    pub manifest_tail: Option<String>,
    /// Regular files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The end-of-archive blocks were seen.
    pub complete: bool,
}

enum State {
    /// Reading a header block; `have` bytes of it so far.
    Header,
    /// Inside an entry's data (`remaining` bytes, then `padding` to the block boundary).
    Data {
        remaining: u64,
        padding: u64,
        keep: Keep,
    },
    /// After the end-of-archive blocks, or after an error.
    Done,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    Label,
    Control,
    ManifestTail,
    LongName,
}

/// Reads tar headers from a stream of chunks (see the module doc).
pub struct TarObserver {
    state: State,
    header: Vec<u8>,
    long_name: Option<Vec<u8>>,
    name_buf: Vec<u8>,
    label: Vec<u8>,
    manifest: Vec<u8>,
    zero_blocks: u32,
    summary: TarSummary,
    error: Option<String>,
}

impl Default for TarObserver {
    fn default() -> Self {
        TarObserver {
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            long_name: None,
            name_buf: Vec::new(),
            label: Vec::new(),
            manifest: Vec::new(),
            zero_blocks: 0,
            summary: TarSummary::default(),
            error: None,
        }
    }
}

/// A tar number field: octal text, or base-256 when the high bit of its first byte is set.
fn number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|b| *b != 0)
        .filter(|b| *b != b' ')
        .collect();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&text).ok()?, 8).ok()
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    &field[..end]
}

impl TarObserver {
    /// What was seen, or why the stream is not a base backup's tar.
    pub fn finish(self) -> std::result::Result<TarSummary, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut summary = self.summary;
        if !summary.complete {
            return Err("the tar stream ended before its end-of-archive blocks".into());
        }
        summary.backup_label =
            (!self.label.is_empty()).then(|| String::from_utf8_lossy(&self.label).into_owned());
        let tail = &self.manifest[self.manifest.len().saturating_sub(MANIFEST_TAIL)..];
        summary.manifest_tail =
            (!tail.is_empty()).then(|| String::from_utf8_lossy(tail).into_owned());
        Ok(summary)
    }

    fn fail(&mut self, why: String) {
        self.error = Some(why);
        self.state = State::Done;
    }

    /// One complete header block.
    fn header_block(&mut self) {
        let h = std::mem::take(&mut self.header);
        if h.iter().all(|b| *b == 0) {
            self.zero_blocks += 1;
            if self.zero_blocks == 2 {
                self.summary.complete = true;
                self.state = State::Done;
            }
            self.header = h;
            self.header.clear();
            return;
        }
        self.zero_blocks = 0;
        let stored: u64 = h[148..156]
            .iter()
            .filter(|b| b.is_ascii_digit())
            .fold(0, |a, b| a * 8 + u64::from(b - b'0'));
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        if stored != sum {
            return self.fail(format!(
                "a tar header's checksum is {stored}, its bytes sum to {sum}: the stream is not a tar or is damaged"
            ));
        }
        let Some(size) = number(&h[124..136]) else {
            return self.fail("a tar header has an unreadable size".into());
        };
        let kind = h[156];
        let name = match self.long_name.take() {
            Some(n) => n,
            None => {
                let mut n = Vec::new();
                if &h[257..262] == b"ustar" && h[345] != 0 {
                    n.extend_from_slice(cstr(&h[345..500]));
                    n.push(b'/');
                }
                n.extend_from_slice(cstr(&h[0..100]));
                n
            }
        };
        let keep = match kind {
            b'L' => Keep::LongName,
            b'0' | 0 | b'7' => {
                self.summary.files += 1;
                self.summary.bytes += size;
                match name.strip_prefix(b"./").unwrap_or(&name) {
                    b"backup_label" => Keep::Label,
                    b"global/pg_control" => Keep::Control,
                    b"backup_manifest" => Keep::ManifestTail,
                    _ => Keep::Nothing,
                }
            }
            _ => Keep::Nothing,
        };
        self.name_buf.clear();
        self.header = h;
        self.header.clear();
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.state = if size == 0 {
            if keep == Keep::LongName {
                self.long_name = Some(Vec::new());
            }
            State::Header
        } else {
            State::Data {
                remaining: size,
                padding,
                keep,
            }
        };
    }

    fn keep_bytes(&mut self, keep: Keep, bytes: &[u8]) {
        match keep {
            Keep::Nothing => {}
            Keep::Label => {
                let room = LABEL_LIMIT.saturating_sub(self.label.len());
                self.label
                    .extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
            Keep::Control => {
                let room = 16usize.saturating_sub(self.summary.pg_control_head.len());
                self.summary
                    .pg_control_head
                    .extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
            Keep::ManifestTail => {
                self.manifest.extend_from_slice(bytes);
                if self.manifest.len() > 2 * MANIFEST_TAIL {
                    let cut = self.manifest.len() - MANIFEST_TAIL;
                    self.manifest.drain(..cut);
                }
            }
            Keep::LongName => {
                if self.name_buf.len() < 64 << 10 {
                    self.name_buf.extend_from_slice(bytes);
                }
            }
        }
    }
}

impl crate::pipeline::Observer for TarObserver {
    fn observe(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Done => {
                    // Past the end of the archive only zero padding may follow.
                    if self.error.is_none() && chunk.iter().any(|b| *b != 0) {
                        self.fail("data after the tar's end-of-archive blocks".into());
                    }
                    return;
                }
                State::Header => {
                    let take = (BLOCK - self.header.len()).min(chunk.len());
                    self.header.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if self.header.len() == BLOCK {
                        self.header_block();
                    }
                }
                State::Data {
                    remaining,
                    padding,
                    keep,
                } => {
                    let keep = *keep;
                    if *remaining > 0 {
                        let take = (*remaining).min(chunk.len() as u64) as usize;
                        *remaining -= take as u64;
                        let (data, rest) = chunk.split_at(take);
                        chunk = rest;
                        self.keep_bytes(keep, data);
                        continue;
                    }
                    let take = (*padding).min(chunk.len() as u64) as usize;
                    *padding -= take as u64;
                    chunk = &chunk[take..];
                    if *padding == 0 {
                        if keep == Keep::LongName {
                            let mut name = std::mem::take(&mut self.name_buf);
                            name.truncate(name.iter().position(|b| *b == 0).unwrap_or(name.len()));
                            self.long_name = Some(name);
                        }
                        self.state = State::Header;
                    }
                }
            }
        }
        // An entry ending exactly at the chunk's end, without padding.
        if let State::Data {
            remaining: 0,
            padding: 0,
            keep,
        } = self.state
        {
            if keep == Keep::LongName {
                self.long_name = Some(std::mem::take(&mut self.name_buf));
            }
            self.state = State::Header;
        }
    }
}

/// Unpacks the tar read from `plain` into `dir`, which exists. Entries that would land outside
/// `dir` (absolute paths, `..`, links out of it) fail the unpack. A read error (a plaintext
/// SHA-256 mismatch at the end of the stream) is an integrity failure.
pub async fn unpack(
    mut plain: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
    dir: &Path,
) -> Result<u64> {
    use tokio::io::AsyncReadExt;
    const CHUNK: usize = 256 << 10;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let pump = async move {
        loop {
            let mut buf = bytes::BytesMut::with_capacity(CHUNK);
            let mut end = false;
            while buf.len() < CHUNK / 2 && !end {
                match plain.read_buf(&mut buf).await {
                    Ok(0) => end = true,
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            // A send fails when the writer stopped on an error of its own.
            if !buf.is_empty() && tx.send(Ok(buf.freeze())).await.is_err() {
                return;
            }
            if end {
                return;
            }
        }
    };
    let dir = dir.to_path_buf();
    let write = tokio::task::spawn_blocking(move || {
        let mut archive = tar::Archive::new(Chunks {
            rx,
            at: bytes::Bytes::new(),
        });
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        let mut files = 0u64;
        let entries = archive.entries().map_err(|e| read_error(&dir, e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| read_error(&dir, e))?;
            // `unpack_in` refuses paths that climb out of `dir`.
            let inside = entry.unpack_in(&dir).map_err(|e| read_error(&dir, e))?;
            if !inside {
                return Err(Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "the base backup holds an entry outside its directory ({}); nothing outside {} was written",
                        entry.path().map(|p| p.display().to_string()).unwrap_or_default(),
                        dir.display()
                    ),
                ));
            }
            files += 1;
        }
        // Read past the end-of-archive blocks to the stream's end: only there are the
        // checksums compared.
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
            .map_err(|e| read_error(&dir, e))?;
        Ok(files)
    });
    let ((), written) = tokio::join!(pump, write);
    written.map_err(|e| Error::failed(format!("unpacking the base backup: {e}")))?
}

/// The plaintext's chunks, read by the blocking half of [`unpack`].
struct Chunks {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    at: bytes::Bytes,
}

impl std::io::Read for Chunks {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.at = chunk?,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.at.len());
        out[..n].copy_from_slice(&self.at.split_to(n));
        Ok(n)
    }
}

fn read_error(dir: &Path, e: std::io::Error) -> Error {
    // tar wraps what the reader said ("failed to unpack `FILE`…") and keeps it as the source.
    let mut text = e.to_string();
    let mut innermost = text.clone();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        innermost = inner.to_string();
        text = format!("{text}: {innermost}");
        source = inner.source();
    }
    // The checks report a mismatch as InvalidData, age its failed authentication the same.
    if e.kind() == std::io::ErrorKind::InvalidData || text.contains("SHA-256") {
        Error::new(
            ErrorKind::Integrity,
            format!("base backup {}: {innermost}", super::BASE_OBJECT),
        )
        .hint("use another backup and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)")
    } else {
        Error::failed(format!(
            "unpacking the base backup into {}: {text}",
            dir.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Observer;

    fn archive(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn sample() -> Vec<u8> {
        let mut control = vec![0x85, 0x6c, 0x66, 0x7a, 0xed, 0x20, 0x10, 0x6b];
        control.resize(8192, 1);
        let mut manifest = vec![b' '; 300_000];
        manifest.extend_from_slice(b"\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/4000028\", \"End-LSN\": \"0/4000100\" }\n]");
        archive(&[
            ("backup_label", b"START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nSTART TIMELINE: 1\n".to_vec()),
            ("base/1/1259", vec![9u8; 100_000]),
            ("global/pg_control", control),
            (&format!("base/{}/x", "d".repeat(120)), vec![3u8; 10]),
            ("backup_manifest", manifest),
        ])
    }

    #[test]
    fn any_chunking_gives_the_same_summary() {
        let tar = sample();
        let mut whole = TarObserver::default();
        whole.observe(&tar);
        let want = whole.finish().unwrap();
        assert_eq!(want.files, 5);
        assert!(want
            .backup_label
            .as_deref()
            .unwrap()
            .contains("START TIMELINE: 1"));
        assert_eq!(
            &want.pg_control_head[..8],
            &[0x85, 0x6c, 0x66, 0x7a, 0xed, 0x20, 0x10, 0x6b]
        );
        assert!(want.manifest_tail.as_deref().unwrap().ends_with("]"));
        assert_eq!(want.manifest_tail.as_deref().unwrap().len(), MANIFEST_TAIL);
        for size in [1, 7, 511, 512, 513, 4096, 65_537] {
            let mut o = TarObserver::default();
            for c in tar.chunks(size) {
                o.observe(c);
            }
            assert_eq!(o.finish().unwrap(), want, "chunks of {size}");
        }
    }

    #[test]
    fn a_truncated_or_damaged_stream_is_an_error() {
        let tar = sample();
        let mut o = TarObserver::default();
        o.observe(&tar[..tar.len() - 2048]);
        assert!(o.finish().unwrap_err().contains("ended before"));
        let mut bad = tar.clone();
        bad[10] ^= 0x55;
        let mut o = TarObserver::default();
        o.observe(&bad);
        assert!(o.finish().unwrap_err().contains("checksum"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let mut o = TarObserver::default();
            o.observe(&bytes);
            let _ = o.finish();
        }
    }
}
