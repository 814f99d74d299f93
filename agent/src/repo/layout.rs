//! The one place that builds object keys. Every key in a repository is made here, so the format in
//! DESIGN.md ("Repository format") has exactly one implementation.

use chrono::{DateTime, Utc};
use rand::Rng;

/// The repository marker at the root.
pub const MARKER: &str = "lifeboat.json";
/// The repository format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// File name of a backup's manifest.
pub const MANIFEST: &str = "manifest.json";
/// File name of a backup's encrypted fingerprint.
pub const FINGERPRINT: &str = "fingerprint.json.age";

/// `backups/`.
pub fn backups_prefix() -> String {
    "backups/".to_string()
}

/// `backups/<source>/`.
pub fn source_prefix(source: &str) -> String {
    format!("backups/{source}/")
}

/// `backups/<source>/<id>/`.
pub fn backup_prefix(source: &str, id: &str) -> String {
    format!("backups/{source}/{id}/")
}

/// `backups/<source>/<id>/<name>`.
pub fn backup_object(source: &str, id: &str, name: &str) -> String {
    format!("backups/{source}/{id}/{name}")
}

/// `backups/<source>/<id>/manifest.json`.
pub fn manifest(source: &str, id: &str) -> String {
    backup_object(source, id, MANIFEST)
}

/// `verifications/`.
pub fn all_verifications_prefix() -> String {
    "verifications/".to_string()
}

/// `verifications/<source>/`.
pub fn verifications_prefix(source: &str) -> String {
    format!("verifications/{source}/")
}

/// `verifications/<source>/<id>/`: every verification report of one backup.
pub fn backup_verifications_prefix(source: &str, id: &str) -> String {
    format!("verifications/{source}/{id}/")
}

/// `verifications/<source>/<id>/<verify-id>.json`.
pub fn verification(source: &str, id: &str, verify_id: &str) -> String {
    format!("verifications/{source}/{id}/{verify_id}.json")
}

/// Splits `verifications/<source>/<id>/<report>` into (source, id).
pub fn parse_verification_key(key: &str) -> Option<(&str, &str)> {
    let mut it = key.strip_prefix("verifications/")?.splitn(3, '/');
    match (it.next(), it.next(), it.next()) {
        (Some(s), Some(id), Some(_)) => Some((s, id)),
        _ => None,
    }
}

/// `objects/`: every content-addressed blob of objects sources.
pub fn blobs_prefix() -> String {
    "objects/".to_string()
}

/// `objects/<2 hex>/<blob-id>.age`.
pub fn blob(id: &str) -> String {
    format!("objects/{}/{id}.age", &id[..2.min(id.len())])
}

/// `state/repack.age`: the packs the last prune found mostly unused, which the next objects
/// backups store again (sealed with the index key).
pub fn repack_note() -> String {
    "state/repack.age".to_string()
}

/// `state/<source>/index.age`: an objects source's change index.
pub fn change_index(source: &str) -> String {
    format!("state/{source}/index.age")
}

/// `state/<source>/catalog.json.zst`: a cache of the source's manifests and verification
/// reports, for listings (see `repo::cache`).
pub fn catalog_cache(source: &str) -> String {
    format!("state/{source}/catalog.json.zst")
}

/// `probe/<random>`: the small object a storage probe writes, reads and deletes.
pub fn probe() -> String {
    format!("probe/{}", random_suffix(12))
}

/// `locks/<name>.json`: a lease.
pub fn lock(name: &str) -> String {
    format!("locks/{name}.json")
}

/// `pins/<source>/`: one empty object per pinned backup id.
pub fn pins_prefix(source: &str) -> String {
    format!("pins/{source}/")
}

/// `pins/<source>/<id>`.
pub fn pin(source: &str, id: &str) -> String {
    format!("pins/{source}/{id}")
}

/// `state/<source>.json`: what the last prune saw, to notice a listing that lost backups.
pub fn prune_state(source: &str) -> String {
    format!("state/{source}.json")
}

/// `slots/<source>/`.
pub fn slots_prefix(source: &str) -> String {
    format!("slots/{source}/")
}

/// `slots/<source>/<tick>`: which replica took a scheduled tick.
pub fn slot(source: &str, tick: DateTime<Utc>) -> String {
    format!("slots/{source}/{}", tick.format("%Y%m%dT%H%M%SZ"))
}

/// `wal/<source>/`: a physical source's WAL archive.
pub fn wal_prefix(source: &str) -> String {
    format!("wal/{source}/")
}

/// `wal/<source>/<timeline>/<segment>.<sha256>.zst.age`: a whole WAL segment, named with the
/// SHA-256 of its plaintext, so a reader tells it from a damaged one without another object.
pub fn wal_segment(source: &str, timeline: u32, segment: &str, sha256: &str) -> String {
    format!("wal/{source}/{timeline:08X}/{segment}.{sha256}.zst.age")
}

/// `wal/<source>/<timeline>/<segment>.partial.<bytes>.<sha256>.zst.age`: the first `bytes` of
/// the segment still being written, superseded by the next upload of it.
pub fn wal_partial(source: &str, timeline: u32, segment: &str, bytes: u64, sha256: &str) -> String {
    format!("wal/{source}/{timeline:08X}/{segment}.partial.{bytes:08X}.{sha256}.zst.age")
}

/// `wal/<source>/<timeline>/<timeline>.history.zst.age`: the history file of a timeline after a
/// promotion.
pub fn wal_history(source: &str, timeline: u32) -> String {
    format!("wal/{source}/{timeline:08X}/{timeline:08X}.history.zst.age")
}

/// Whether `key` is kept by the repository's Object Lock: what a restore reads (backups, whole
/// WAL segments, history files). Leases, claims, probes and the partial WAL objects that the
/// next upload supersedes stay deletable.
pub fn locked_by_retention(key: &str) -> bool {
    key.starts_with("backups/") || (key.starts_with("wal/") && !key.contains(".partial."))
}

/// The time encoded in a backup id, if it is one.
pub fn id_time(id: &str) -> Option<DateTime<Utc>> {
    let stamp = id.split('-').next()?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
        .ok()
        .map(|t| t.and_utc())
}

/// Splits `backups/<source>/<id>/<name>` into its parts.
pub fn parse_backup_key(key: &str) -> Option<(&str, &str, &str)> {
    let rest = key.strip_prefix("backups/")?;
    let mut it = rest.splitn(3, '/');
    let (source, id, name) = (it.next()?, it.next()?, it.next()?);
    (!source.is_empty() && !id.is_empty() && !name.is_empty()).then_some((source, id, name))
}

/// A backup id: UTC time plus a random suffix, sortable as text (`20261127T031500Z-3fa9c2`).
pub fn new_backup_id(now: DateTime<Utc>) -> String {
    format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), random_suffix(6))
}

/// `n` random lowercase hex digits.
pub fn random_suffix(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn ids_sort_by_time() {
        let a = new_backup_id(Utc.with_ymd_and_hms(2026, 11, 27, 3, 15, 0).unwrap());
        let b = new_backup_id(Utc.with_ymd_and_hms(2026, 11, 27, 3, 15, 1).unwrap());
        assert!(a.starts_with("20261127T031500Z-") && a.len() == 23, "{a}");
        assert!(a < b);
    }

    #[test]
    fn object_lock_keeps_what_restores_read() {
        let seg = "000000010000000000000004";
        let sha = "a".repeat(64);
        assert!(locked_by_retention(&manifest("db", "x")));
        assert!(locked_by_retention(&wal_segment("c", 1, seg, &sha)));
        assert!(locked_by_retention(&wal_history("c", 2)));
        assert!(!locked_by_retention(&wal_partial("c", 1, seg, 4096, &sha)));
        assert!(!locked_by_retention(&slot("c", Utc::now())));
    }

    #[test]
    fn keys_round_trip() {
        let k = manifest("app-db", "20261127T031500Z-3fa9c2");
        assert_eq!(k, "backups/app-db/20261127T031500Z-3fa9c2/manifest.json");
        assert_eq!(
            parse_backup_key(&k),
            Some(("app-db", "20261127T031500Z-3fa9c2", "manifest.json"))
        );
        assert_eq!(parse_backup_key("backups/app-db/"), None);
        assert_eq!(parse_backup_key("objects/ab/cd.age"), None);
        let v = verification(
            "app-db",
            "20261127T031500Z-3fa9c2",
            "20261127T041500Z-aa11bb",
        );
        assert!(v.starts_with(&backup_verifications_prefix(
            "app-db",
            "20261127T031500Z-3fa9c2"
        )));
        assert!(v.starts_with(&verifications_prefix("app-db")));
        assert_eq!(
            parse_verification_key(&v),
            Some(("app-db", "20261127T031500Z-3fa9c2"))
        );
        assert_eq!(parse_verification_key("verifications/app-db/"), None);
        assert_eq!(blob("ab12cd"), "objects/ab/ab12cd.age");
        assert!(blob("ab12cd").starts_with(&blobs_prefix()));
    }
}
