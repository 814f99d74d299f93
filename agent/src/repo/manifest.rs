//! The manifest: a backup's table of contents, written last, plaintext, holding no secret and no data.
//!
//! Its presence is the backup's existence. It records, for every stored object, the size and
//! SHA-256 of the plaintext stream and of the stored (compressed, encrypted) bytes, so `check
//! --read-data`, restore and the verifier can prove integrity before a byte is applied.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::source::Kind;

/// A backup's manifest (`backups/<source>/<id>/manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Backup id.
    pub id: String,
    /// Source name.
    pub source: String,
    /// Source kind (`postgres`, `redis`, `objects`); one this version does not know makes the
    /// manifest unreadable, never another kind's backup.
    pub kind: Kind,
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
    /// Physical PostgreSQL backups: where the base backup sits in the cluster's WAL history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_backup: Option<crate::source::postgres_physical::BaseBackupInfo>,
    /// PostgreSQL dumps: the database's encoding and locale, which a restore recreates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseInfo>,
    /// What the backup was taken from, compared with the source's earlier backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<super::origin::Origin>,
    /// A Redis Cluster's shards: what `list` and the metrics show of each without the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardSummary>,
    /// The requests the run made of the repository (for its data objects: the fingerprint and
    /// the manifest follow) and of an object-store source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<RunRequests>,
}

/// The requests of one backup run, by class (see `store::counted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequests {
    /// Of the repository.
    pub repository: crate::store::counted::RequestCounts,
    /// Of the source, when it is an object store (an S3 objects source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::store::counted::RequestCounts>,
}

/// A dumped database's encoding and locale (`pg_database`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseInfo {
    /// Server encoding, e.g. `UTF8`, `LATIN1`.
    pub encoding: String,
    /// `LC_COLLATE`.
    pub collate: String,
    /// `LC_CTYPE`.
    pub ctype: String,
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
    /// What it holds.
    pub role: Role,
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
    /// Where a reader may start inside the stored object without reading what precedes it;
    /// absent when the backup's stream was not cut for that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seek: Option<SeekIndex>,
}

/// The points of a stored object where reading may start: age encrypts in chunks of 64 KiB, each
/// authenticated on its own, and the zstd stream inside is a series of independent frames, cut
/// where the producer's stream offered to be (for a dump, where a table's data begins). Stock
/// tools read the object whole as before: `age -d | zstd -d` decodes frames one after another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeekIndex {
    /// Bytes of the age header and the payload's nonce: payload chunk `i` (64 KiB of the zstd
    /// stream) is stored at `header_len + i × 65,552`.
    pub header_len: u64,
    /// SHA-256 of those bytes. When they match, the file key is the backup's own, so every chunk
    /// age authenticates is the backup's. A reader that ranges into the store must check this
    /// before it uses anything it read, as `restore --jobs` does (and then starts every reader
    /// from the header bytes it checked).
    pub header_sha256: String,
    /// The frames after the first (which starts at 0 in both): each `[plaintext offset, offset
    /// in the zstd stream]`, in order.
    pub frames: Vec<[u64; 2]>,
}

impl SeekIndex {
    /// The frame holding plaintext `offset`: where it starts in the plaintext and in the zstd
    /// stream.
    pub fn frame_of(&self, offset: u64) -> [u64; 2] {
        let i = self.frames.partition_point(|f| f[0] <= offset);
        i.checked_sub(1).map_or([0, 0], |i| self.frames[i])
    }
}

/// One shard of a Redis Cluster backup, as the manifest shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSummary {
    /// `shard-0`, `shard-1`…, in slot order.
    pub name: String,
    /// Its part's object name.
    pub object: String,
    /// The slots it owned, e.g. `0-5460` or `0-99,200-5460`.
    pub slots: String,
    /// The node captured (`HOST:PORT`).
    pub node: String,
    /// `primary` or `replica`.
    pub role: String,
    /// Keys in its snapshot.
    pub keys: u64,
}

/// What a part holds. Restore, the verifier and blob collection find parts by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A database dump (`pg_dump -Fc`).
    Database,
    /// Roles and tablespaces (`pg_dumpall --globals-only`).
    Globals,
    /// The source's snapshot: an RDB file, an objects listing.
    Snapshot,
    /// The blob ids an objects snapshot names, sealed with the index key (for blob collection).
    BlobList,
    /// A whole cluster's files (`pg_basebackup` tar).
    Cluster,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Database => "database",
            Role::Globals => "globals",
            Role::Snapshot => "snapshot",
            Role::BlobList => "blob-list",
            Role::Cluster => "cluster",
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::catalog::parse_manifest;

    const KEY: &str = "backups/db/20261127T101500Z-ab12/manifest.json";

    fn manifest_json(kind: &str, role: &str) -> String {
        format!(
            r#"{{"format":1,"id":"20261127T101500Z-ab12","source":"db","kind":"{kind}","started_at":"2026-11-27T10:15:00Z","finished_at":"2026-11-27T10:16:00Z","tool_version":"lifeboat 0.1.0","source_version":null,"dump_tool_version":null,"compression":{{"algorithm":"zstd","level":3}},"encryption":{{"algorithm":"age-v1","recipients":["age1x"]}},"size_plain":10,"size_stored":20,"parts":[{{"name":"part.zst.age","role":"{role}","format":"x","size_plain":10,"sha256_plain":"aa","size_stored":20,"sha256_stored":"bb"}}],"fingerprint":null}}"#
        )
    }

    #[test]
    fn kinds_and_roles_read_and_write_as_their_names() {
        for kind in Kind::ALL {
            for (role, name) in [
                (Role::Database, "database"),
                (Role::Globals, "globals"),
                (Role::Snapshot, "snapshot"),
                (Role::BlobList, "blob-list"),
            ] {
                let text = manifest_json(kind.name(), name);
                let m = parse_manifest(KEY, text.as_bytes(), "db", "20261127T101500Z-ab12")
                    .expect("a well-formed manifest");
                assert_eq!((m.kind, m.parts[0].role), (*kind, role));
                assert_eq!(role.to_string(), name);
                let again = serde_json::to_value(&m).unwrap();
                assert_eq!(again["kind"], kind.name());
                assert_eq!(again["parts"][0]["role"], name);
            }
        }
    }

    #[test]
    fn an_unknown_kind_is_a_clear_error_never_another_kinds_backup() {
        let text = manifest_json("mysql", "database");
        let e = parse_manifest(KEY, text.as_bytes(), "db", "20261127T101500Z-ab12")
            .expect_err("an unknown kind must not parse");
        assert_eq!(e.kind, crate::ErrorKind::Integrity);
        assert!(
            e.message.contains("unknown source kind `mysql`")
                && e.message.contains(&Kind::names())
                && e.message.contains("upgrade lifeboat"),
            "{}",
            e.message
        );
        let text = manifest_json("postgres", "wal");
        let e = parse_manifest(KEY, text.as_bytes(), "db", "20261127T101500Z-ab12")
            .expect_err("an unknown role must not parse");
        assert!(e.message.contains("unknown variant `wal`"), "{}", e.message);
    }
}
