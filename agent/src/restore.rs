//! Reading backups back: fetch → check SHA-256 → decrypt → decompress.
//!
//! This version proves a backup's bytes end to end (stored SHA-256 and size, then the plaintext
//! SHA-256 and size after age and zstd) without applying them anywhere; restoring into a database
//! builds on the same stream.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::repo::layout;
use crate::repo::manifest::{Manifest, Part};
use crate::repo::Repository;

/// Hashes every byte read through it.
struct HashingReader<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            let mut s = self
                .state
                .lock()
                .map_err(|_| io::Error::other("hash state poisoned"))?;
            s.0.update(new);
            s.1 += new.len() as u64;
        }
        r
    }
}

/// What reading one part back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartCheck {
    /// Object name.
    pub name: String,
    /// Stored bytes read.
    pub size_stored: u64,
    /// Plaintext bytes after decryption and decompression.
    pub size_plain: u64,
}

/// Reads one part back through decryption and decompression, checking the stored and plaintext
/// SHA-256 and sizes against the manifest. Exit 13 on any mismatch, 12 on a key problem.
pub async fn check_part(
    repo: &Repository,
    manifest: &Manifest,
    part: &Part,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<PartCheck> {
    let key = layout::backup_object(&manifest.source, &manifest.id, &part.name);
    let stored = repo
        .store
        .open(&key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    let stored_state = Arc::new(Mutex::new((Sha256::new(), 0u64)));
    let reader = HashingReader {
        inner: stored,
        state: stored_state.clone(),
    };
    let integrity = |what: String| {
        Error::new(ErrorKind::Integrity, format!("{key}: {what}"))
            .hint("this backup is damaged; use another one and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)")
    };
    let mut plain = pipeline::decrypt_stream(Box::pin(reader), identities)
        .await
        .map_err(|e| e.context(&key))?;
    let mut hasher = Sha256::new();
    let mut size_plain = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = plain
            .read(&mut buf)
            .await
            .map_err(|e| integrity(format!("cannot be decrypted or decompressed: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size_plain += n as u64;
    }
    drop(plain);
    let (stored_hash, size_stored) = {
        let s = stored_state
            .lock()
            .map_err(|_| Error::failed("hash state poisoned"))?;
        (hex::encode(s.0.clone().finalize()), s.1)
    };
    if stored_hash != part.sha256_stored || size_stored != part.size_stored {
        return Err(integrity(format!(
            "stored bytes: SHA-256 {stored_hash} ({size_stored} bytes), the manifest says {} ({} bytes)",
            part.sha256_stored, part.size_stored
        )));
    }
    let plain_hash = hex::encode(hasher.finalize());
    if plain_hash != part.sha256_plain || size_plain != part.size_plain {
        return Err(integrity(format!(
            "plaintext: SHA-256 {plain_hash} ({size_plain} bytes), the manifest says {} ({} bytes)",
            part.sha256_plain, part.size_plain
        )));
    }
    Ok(PartCheck {
        name: part.name.clone(),
        size_stored,
        size_plain,
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
