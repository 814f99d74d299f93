//! The manifest: a backup's table of contents, written last, plaintext, holding no secret and no data.
//!
//! Its presence is the backup's existence. It records, for every stored object, the size and
//! SHA-256 of the plaintext stream and of the stored (compressed, encrypted) bytes, so `check
//! --read-data`, restore and the verifier can prove integrity before a byte is applied.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A backup's manifest (`backups/<source>/<id>/manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Backup id.
    pub id: String,
    /// Source name.
    pub source: String,
    /// Source kind (`postgres`).
    pub kind: String,
    /// When the backup started.
    pub started_at: DateTime<Utc>,
    /// When the last data object was stored.
    pub finished_at: DateTime<Utc>,
    /// `lifeboat <version>`.
    pub tool_version: String,
    /// The source server's version.
    pub source_version: Option<String>,
    /// The dump tool's version.
    pub dump_tool_version: Option<String>,
    /// Compression of the data objects.
    pub compression: CompressionInfo,
    /// Encryption of the data objects.
    pub encryption: EncryptionInfo,
    /// Sum of the parts' plaintext sizes.
    pub size_plain: u64,
    /// Sum of the stored sizes of all objects, fingerprint included.
    pub size_stored: u64,
    /// The data objects.
    pub parts: Vec<Part>,
    /// The encrypted fingerprint object.
    pub fingerprint: Option<StoredObject>,
}

/// How data objects are compressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionInfo {
    /// Always `zstd`.
    pub algorithm: String,
    /// zstd level.
    pub level: i32,
}

/// How objects are encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionInfo {
    /// Always `age-v1`.
    pub algorithm: String,
    /// The recipients' public keys.
    pub recipients: Vec<String>,
}

/// One data object: a plaintext stream, compressed and encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Object name within the backup, e.g. `database.dump.zst.age`.
    pub name: String,
    /// What it holds: `database`, `globals`.
    pub role: String,
    /// Plaintext format: `pg_dump-custom`, `sql`.
    pub format: String,
    /// Plaintext bytes.
    pub size_plain: u64,
    /// SHA-256 of the plaintext, hex.
    pub sha256_plain: String,
    /// Stored bytes.
    pub size_stored: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256_stored: String,
}

/// An object stored without compression (the fingerprint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    /// Object name within the backup.
    pub name: String,
    /// Stored bytes.
    pub size_stored: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256_stored: String,
}

impl Manifest {
    /// Every object the manifest names, as (name, stored size, stored SHA-256).
    pub fn objects(&self) -> Vec<(&str, u64, &str)> {
        let mut out: Vec<(&str, u64, &str)> = self
            .parts
            .iter()
            .map(|p| (p.name.as_str(), p.size_stored, p.sha256_stored.as_str()))
            .collect();
        if let Some(f) = &self.fingerprint {
            out.push((f.name.as_str(), f.size_stored, f.sha256_stored.as_str()));
        }
        out
    }
}
