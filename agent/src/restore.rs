//! Reading backups back: fetch → check SHA-256 → decrypt → decompress.
//!
//! The guarantee, for the verifier and `lifeboat restore` alike: **every stored object is
//! downloaded to a spool file and its SHA-256 and size checked against the manifest before a single
//! byte is decrypted or applied.** The spool holds ciphertext only. While the plaintext streams into
//! pg_restore its SHA-256 is checked as well; age authenticates every 64 KiB chunk, so a plaintext
//! that differs can only come from a manifest that lies, and it stops the restore with exit 13.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::repo::layout;
use crate::repo::manifest::{Manifest, Part};
use crate::repo::Repository;

/// A stored object downloaded to a spool file, its stored SHA-256 and size already checked.
pub struct Spooled {
    /// The part it holds.
    pub part: Part,
    /// The ciphertext file (deleted on drop).
    pub file: tempfile::NamedTempFile,
}

/// Downloads `part` into a file in `dir`, checking the stored SHA-256 and size (exit 13 on mismatch).
pub async fn spool(
    repo: &Repository,
    manifest: &Manifest,
    part: &Part,
    dir: &std::path::Path,
) -> Result<Spooled> {
    use tokio::io::AsyncWriteExt;
    let key = layout::backup_object(&manifest.source, &manifest.id, &part.name);
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
    let mut r = repo
        .store
        .open(&key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let got = r
            .read(&mut buf)
            .await
            .map_err(|e| Error::failed(format!("reading {key}: {e}")))?;
        if got == 0 {
            break;
        }
        hasher.update(&buf[..got]);
        n += got as u64;
        out.write_all(&buf[..got]).await.map_err(|e| {
            Error::failed(format!("writing the spool file in {}: {e}", dir.display()))
                .hint("pass --spool-dir with room for the stored backup")
        })?;
    }
    out.flush()
        .await
        .map_err(|e| Error::failed(format!("writing the spool file: {e}")))?;
    let digest = hex::encode(hasher.finalize());
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
    Ok(Spooled {
        part: part.clone(),
        file,
    })
}

/// Checks the plaintext SHA-256 and size at EOF; a mismatch is a read error, so a consumer such as
/// pg_restore is stopped instead of finishing on the wrong data.
struct PlainCheck<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
    want_sha: String,
    want_size: u64,
    name: String,
}

impl<R: AsyncRead + Unpin> AsyncRead for PlainCheck<R> {
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
                                "{}: plaintext SHA-256 {digest} ({} bytes), the manifest says {} ({} bytes)",
                                self.name, self.size, self.want_sha, self.want_size
                            ),
                        )));
                    }
                } else {
                    let chunk = buf.filled()[before..].to_vec();
                    self.hasher.update(&chunk);
                    self.size += new_len as u64;
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl Spooled {
    /// The plaintext, decrypted and decompressed from the spool file, checked at EOF.
    pub async fn plaintext(
        &self,
        identities: &[Box<dyn age::Identity + Send + Sync>],
    ) -> Result<Pin<Box<dyn AsyncRead + Send>>> {
        let f = tokio::fs::File::open(self.file.path())
            .await
            .map_err(|e| Error::failed(format!("cannot open the spool file: {e}")))?;
        let reader = pipeline::decrypt_stream(
            Box::pin(tokio::io::BufReader::with_capacity(256 << 10, f)),
            identities,
        )
        .await
        .map_err(|e| e.context(&self.part.name))?;
        Ok(Box::pin(PlainCheck {
            inner: reader,
            hasher: Sha256::new(),
            size: 0,
            want_sha: self.part.sha256_plain.clone(),
            want_size: self.part.size_plain,
            name: self.part.name.clone(),
        }))
    }

    /// Writes the checked plaintext to a file in `dir` (for parallel pg_restore).
    pub async fn plaintext_file(
        &self,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        dir: &std::path::Path,
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
        let mut r = self.plaintext(identities).await?;
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
