//! Who published a manifest or a verification report: Ed25519 signatures in the minisign format.
//!
//! age encrypts to public keys and authenticates nobody, so anyone who can write to the bucket
//! could publish a well-formed backup. Writers (the agent, the verifier) therefore sign what they
//! publish with `signing.key_file`, in a detached `<key>.minisig` object stored before the object
//! it signs; readers accept only what a key in `signing.trusted` signed. The signature's trusted
//! comment names the object's key, so a signed manifest copied under another backup id (a replay)
//! is refused too. The format is minisign's, so `minisign -Vm manifest.json -P <key>` checks a
//! manifest without lifeboat.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use minisign::{PublicKey, SecretKey, SignatureBox};

use crate::error::{Error, ErrorKind, Result};
use crate::policy::SigningConfig;

/// The suffix of a signature object: `<key>.minisig`.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

/// The signature object of `key`.
pub fn signature_key(key: &str) -> String {
    format!("{key}{SIGNATURE_SUFFIX}")
}

/// True for a signature object's key.
pub fn is_signature(key: &str) -> bool {
    key.ends_with(SIGNATURE_SUFFIX)
}

/// What a WAL object's signature covers: its key and its plaintext's SHA-256 (which a segment's
/// key already names; a history file's does not). Its stored bytes are not signed: age
/// encryption is not deterministic, and the plaintext hash is what `wal fetch` checks.
pub fn wal_statement(key: &str, sha256: &str) -> Vec<u8> {
    format!("{key}\nplaintext sha256 {sha256}\n").into_bytes()
}

/// The trusted comment a signature of `key` carries.
fn comment(key: &str) -> String {
    format!("lifeboat {key}")
}

/// A minisign key id, as minisign prints it (16 hex digits).
fn key_id(keynum: &[u8]) -> String {
    let mut b = [0u8; 8];
    b.copy_from_slice(&keynum[..8.min(keynum.len())]);
    format!("{:016X}", u64::from_le_bytes(b))
}

/// A writer's signing key, loaded from `signing.key_file`.
pub struct Signer {
    secret: SecretKey,
    public: PublicKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.id())
    }
}

impl Signer {
    /// Loads an unencrypted minisign secret key. Errors name the file, never its content.
    pub fn load(path: &Path) -> Result<Signer> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::Credential,
                format!("signing.key_file {}: {why}", path.display()),
            )
            .hint("make a key with `lifeboat keygen --signing` (RUNBOOK.md#signing-keys)")
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let boxed = minisign::SecretKeyBox::from_string(&text)
            .map_err(|_| bad("not a minisign secret key".into()))?;
        let secret = boxed.into_unencrypted_secret_key().map_err(|_| {
            bad("not an unencrypted minisign secret key (a password-protected one cannot be used unattended)".into())
        })?;
        let public = PublicKey::from_secret_key(&secret)
            .map_err(|_| bad("not a minisign secret key".into()))?;
        Ok(Signer { secret, public })
    }

    /// The public key (`RW…`), for `signing.trusted`.
    pub fn public(&self) -> String {
        self.public.to_base64()
    }

    /// The key id, as minisign prints it.
    pub fn id(&self) -> String {
        key_id(self.public.keynum())
    }

    /// The signature object for `bytes` stored at `key`.
    pub fn sign(&self, key: &str, bytes: &[u8]) -> Result<Bytes> {
        let sig = minisign::sign(
            Some(&self.public),
            &self.secret,
            Cursor::new(bytes),
            Some(&comment(key)),
            Some(&format!("signed by lifeboat key {}", self.id())),
        )
        .map_err(|e| Error::failed(format!("cannot sign {key}: {e}")))?;
        Ok(Bytes::from(sig.into_string()))
    }
}

/// A new signing key: (secret key file content, public key). The file's first line (minisign's
/// untrusted comment) names the public key too: `…; public key RW…`.
pub fn generate() -> Result<(String, String)> {
    let pair = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| Error::failed(format!("cannot make a signing key: {e}")))?;
    let id = key_id(pair.pk.keynum());
    let public = pair.pk.to_base64();
    let secret = pair
        .sk
        .to_box(Some(&format!(
            "lifeboat signing key {id}; public key {public}"
        )))
        .map_err(|e| Error::failed(format!("cannot encode the signing key: {e}")))?;
    Ok((secret.to_string(), public))
}

/// Parses a trusted public key (`RW…`).
pub fn parse_public(text: &str) -> std::result::Result<PublicKey, String> {
    PublicKey::from_base64(text.trim())
        .map_err(|_| format!("`{text}` is not a minisign public key (`RW…`, 56 characters)"))
}

/// How an object's publisher was established.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Seal {
    /// Signed by this trusted key (its id).
    Signed {
        /// The key id.
        key: String,
    },
    /// The policy has no `[signing]`: nothing is checked.
    Unchecked,
    /// Unsigned, but stored before `signing.unsigned_before`: taken before signing existed.
    Legacy,
    /// Not signed by a trusted key, accepted only because of `--allow-unsigned`.
    Untrusted {
        /// Why it is not trusted.
        why: String,
    },
}

impl Seal {
    /// A word for `lifeboat list`.
    pub fn word(&self) -> &'static str {
        match self {
            Seal::Signed { .. } => "signed",
            Seal::Unchecked => "-",
            Seal::Legacy => "unsigned",
            Seal::Untrusted { .. } => "UNTRUSTED",
        }
    }
}

/// The readers' side: which keys are trusted, and what else is accepted.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    keys: Vec<PublicKey>,
    unsigned_before: Option<DateTime<Utc>>,
    key_file: Option<PathBuf>,
    /// `restore --allow-unsigned`: what no trusted key signed is still offered, marked.
    pub allow_unsigned: bool,
}

impl Trust {
    /// The policy's `[signing]` (none: nothing is checked).
    pub fn new(signing: Option<&SigningConfig>) -> Trust {
        match signing {
            None => Trust::default(),
            Some(s) => Trust {
                keys: s
                    .trusted
                    .iter()
                    .filter_map(|k| parse_public(k).ok())
                    .collect(),
                unsigned_before: s.unsigned_before,
                key_file: s.key_file.clone(),
                allow_unsigned: false,
            },
        }
    }

    /// True when readers check signatures.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The writer's key, checked against the trusted keys; `None` when the policy has no
    /// `[signing]`. A writer without a key, or with one readers would refuse, fails here, before
    /// it stores anything.
    pub fn signer(&self) -> Result<Option<Signer>> {
        if !self.enabled() {
            return Ok(None);
        }
        let Some(path) = &self.key_file else {
            return Err(Error::new(
                ErrorKind::Credential,
                "signing.trusted is set but signing.key_file is not: every reader would refuse what this writes",
            )
            .hint("give the writer its signing key (signing.key_file; `lifeboat keygen --signing` makes one; RUNBOOK.md#signing-keys)"));
        };
        let signer = Signer::load(path)?;
        if !self.keys.iter().any(|k| k.to_base64() == signer.public()) {
            return Err(Error::new(
                ErrorKind::Credential,
                format!(
                    "the key in signing.key_file {} (id {}) is not in signing.trusted: every reader would refuse what this writes",
                    path.display(),
                    signer.id()
                ),
            )
            .hint(format!("add its public key {} to signing.trusted (RUNBOOK.md#signing-keys)", signer.public())));
        }
        Ok(Some(signer))
    }

    /// Judges `bytes` stored at `key` with its signature object (if any). `stored` is when the
    /// repository stored the object, for `signing.unsigned_before`. Not trusted is integrity
    /// damage, naming the object and why, unless `allow_unsigned`.
    pub fn judge(
        &self,
        key: &str,
        bytes: &[u8],
        signature: Option<&[u8]>,
        stored: Option<DateTime<Utc>>,
    ) -> Result<Seal> {
        if !self.enabled() {
            return Ok(Seal::Unchecked);
        }
        let why = match signature {
            None => match (self.unsigned_before, stored) {
                (Some(before), Some(at)) if at < before => return Ok(Seal::Legacy),
                _ => "is not signed".to_string(),
            },
            Some(sig) => match self.verify(key, bytes, sig) {
                Ok(id) => return Ok(Seal::Signed { key: id }),
                Err(why) => why,
            },
        };
        if self.allow_unsigned {
            return Ok(Seal::Untrusted { why });
        }
        Err(Error::new(
            ErrorKind::Integrity,
            format!("{key} {why}: no trusted key vouches for it"),
        )
        .hint("it may be forged or planted by another writer; never restore it (RUNBOOK.md#untrusted-backup)"))
    }

    fn verify(&self, key: &str, bytes: &[u8], sig: &[u8]) -> std::result::Result<String, String> {
        let text =
            std::str::from_utf8(sig).map_err(|_| "has an unreadable signature".to_string())?;
        let sig = SignatureBox::from_string(text)
            .map_err(|_| "has an unreadable signature".to_string())?;
        let id = key_id(sig.keynum());
        let Some(public) = self.keys.iter().find(|k| k.keynum() == sig.keynum()) else {
            return Err(format!(
                "is signed by key {id}, which is not in signing.trusted"
            ));
        };
        minisign::verify(public, &sig, Cursor::new(bytes), true, false, false)
            .map_err(|_| format!("has a signature by key {id} that does not match its bytes"))?;
        let signed_for = sig.trusted_comment().unwrap_or_default();
        if signed_for != comment(key) {
            return Err(format!(
                "carries a signature made for another object ({signed_for:?}): moved or replayed"
            ));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust_of(keys: &[&str]) -> Trust {
        Trust {
            keys: keys.iter().map(|k| parse_public(k).unwrap()).collect(),
            ..Trust::default()
        }
    }

    fn signer() -> (Signer, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = generate().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, &secret).unwrap();
        (Signer::load(&path).unwrap(), public, dir)
    }

    #[test]
    fn a_signature_holds_for_its_key_and_bytes_only() {
        let (s, public, _d) = signer();
        let (_, other, _d2) = signer();
        assert_eq!(s.public(), public);
        let key = "backups/db/1/manifest.json";
        let sig = s.sign(key, b"manifest").unwrap();
        let trust = trust_of(&[&other, &public]);
        assert_eq!(
            trust.judge(key, b"manifest", Some(&sig), None).unwrap(),
            Seal::Signed { key: s.id() }
        );
        let refused = |key: &str, bytes: &[u8], sig: Option<&[u8]>, trust: &Trust| {
            let e = trust.judge(key, bytes, sig, None).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Integrity);
            assert!(e.message.starts_with(key), "{}", e.message);
            e.message
        };
        assert!(refused(key, b"manifesT", Some(&sig), &trust).contains("does not match"));
        assert!(refused(key, b"manifest", None, &trust).contains("is not signed"));
        let moved = "backups/db/2/manifest.json";
        assert!(refused(moved, b"manifest", Some(&sig), &trust).contains("replayed"));
        assert!(refused(key, b"manifest", Some(&sig), &trust_of(&[&other]))
            .contains("not in signing.trusted"));
        assert!(refused(key, b"manifest", Some(b"junk"), &trust).contains("unreadable"));
    }

    #[test]
    fn unsigned_objects_from_before_signing_are_legacy_and_break_glass_marks_the_rest() {
        let (_, public, _d) = signer();
        let mut trust = trust_of(&[&public]);
        let cut: DateTime<Utc> = "2026-12-01T00:00:00Z".parse().unwrap();
        trust.unsigned_before = Some(cut);
        let before = cut - chrono::Duration::days(1);
        assert_eq!(
            trust.judge("k", b"x", None, Some(before)).unwrap(),
            Seal::Legacy
        );
        assert!(trust.judge("k", b"x", None, Some(cut)).is_err());
        assert!(trust.judge("k", b"x", None, None).is_err());
        trust.allow_unsigned = true;
        assert!(matches!(
            trust.judge("k", b"x", None, None).unwrap(),
            Seal::Untrusted { .. }
        ));
        assert_eq!(
            Trust::default().judge("k", b"x", None, None).unwrap(),
            Seal::Unchecked
        );
    }

    #[test]
    fn a_key_file_that_is_not_a_key_is_named_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "untrusted comment: x\nSECRETSECRETSECRET\n").unwrap();
        let e = Signer::load(&path).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Credential);
        assert!(e.message.contains("signing.key_file"), "{}", e.message);
        assert!(!e.to_string().contains("SECRETSECRET"), "{e}");
    }
}
