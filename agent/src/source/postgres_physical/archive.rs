//! Reading a physical source's WAL archive (`wal/<source>/`): which segments are stored, where
//! the chain from a base backup has gaps, and what prune may collect.
//!
//! A segment counts once its object is stored under its name, which carries its SHA-256 (see
//! `repo::layout::wal_segment`); a partial object counts up to the length its name gives. The
//! archive is read from one listing; nothing here decrypts.

use std::collections::{BTreeMap, HashSet};

use super::{BaseBackupInfo, Lsn};
use crate::collect::{Collection, CollectionPlan};
use crate::error::{Error, Result};
use crate::pipeline::CopyError;
use crate::repo::{layout, signing, Repository};

/// One stored WAL object, from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalObject {
    /// Its key.
    pub key: String,
    /// Stored bytes.
    pub size_stored: u64,
    /// The timeline.
    pub timeline: u32,
    /// The segment's name (24 hex digits).
    pub segment: String,
    /// `Some(bytes)`: a partial segment holding its first `bytes`.
    pub partial: Option<u64>,
    /// SHA-256 of its plaintext, from its name.
    pub sha256: String,
    /// When it was stored, when the store says.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// Reads a WAL object's key: `wal/<source>/<TLI>/<SEG>.<sha>.zst.age` or
/// `…/<SEG>.partial.<bytes>.<sha>.zst.age`. History files and anything else: `None`.
pub fn parse_key(source: &str, key: &str, size_stored: u64) -> Option<WalObject> {
    let rest = key.strip_prefix(&layout::wal_prefix(source))?;
    let (tli, file) = rest.split_once('/')?;
    let timeline = u32::from_str_radix(tli, 16).ok()?;
    let stem = file.strip_suffix(".zst.age")?;
    let parts: Vec<&str> = stem.split('.').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let (segment, partial, sha) = match parts.as_slice() {
        [seg, sha] => (*seg, None, *sha),
        [seg, "partial", len, sha] if hex(len, 8) => {
            (*seg, Some(u64::from_str_radix(len, 16).ok()?), *sha)
        }
        _ => return None,
    };
    if !hex(segment, 24) || !hex(sha, 64) {
        return None;
    }
    Some(WalObject {
        key: key.to_string(),
        size_stored,
        timeline,
        segment: segment.to_string(),
        partial,
        sha256: sha.to_string(),
        modified: None,
    })
}

/// The segment number of a 24-hex-digit segment name (timeline apart).
pub fn segment_number(segment: &str, segment_size: u64) -> Option<u64> {
    let log = u64::from_str_radix(segment.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(segment.get(16..24)?, 16).ok()?;
    Some(log * (0x1_0000_0000 / segment_size) + seg)
}

/// What the archive holds, per timeline: each segment number's whole object, or its longest
/// partial.
#[derive(Debug, Clone, Default)]
pub struct Archive {
    /// Objects by (timeline, segment number).
    pub segments: BTreeMap<(u32, u64), WalObject>,
    /// Every WAL object, superseded partials too.
    pub all: Vec<WalObject>,
    /// When the newest object was stored, when the store says.
    pub newest: Option<chrono::DateTime<chrono::Utc>>,
    /// The signature objects beside them (`<key>.minisig`).
    pub signatures: HashSet<String>,
}

impl Archive {
    /// Lists `source`'s archive.
    pub async fn read(repo: &Repository, source: &str, segment_size: u64) -> Result<Archive> {
        let listed = repo
            .store
            .list(&layout::wal_prefix(source))
            .await
            .map_err(|e| Error::from(e).context("listing the WAL archive"))?;
        Ok(Archive::of(source, &listed, segment_size))
    }

    /// The archive a listing of `wal/<source>/` shows.
    pub fn of(source: &str, listed: &[crate::store::ObjectInfo], segment_size: u64) -> Archive {
        let mut archive = Archive {
            newest: listed.iter().filter_map(|o| o.modified).max(),
            signatures: listed
                .iter()
                .filter(|o| signing::is_signature(&o.key))
                .map(|o| o.key.clone())
                .collect(),
            ..Archive::default()
        };
        let signed = |w: &WalObject| archive.signatures.contains(&signing::signature_key(&w.key));
        for o in listed {
            let Some(mut w) = parse_key(source, &o.key, o.size) else {
                continue;
            };
            w.modified = o.modified;
            let Some(n) = segment_number(&w.segment, segment_size) else {
                continue;
            };
            archive.all.push(w.clone());
            // Whole over partial, longer over shorter, and then a signed object over one
            // planted beside it.
            let better = match archive.segments.get(&(w.timeline, n)) {
                None => true,
                Some(have) => match (have.partial, w.partial) {
                    (Some(_), None) => true,
                    (Some(a), Some(b)) if a != b => b > a,
                    (None, Some(_)) => false,
                    _ => signed(&w) && !signed(have),
                },
            };
            if better {
                archive.segments.insert((w.timeline, n), w);
            }
        }
        archive
    }

    /// The end of the archived WAL: the highest LSN every object up to it holds.
    pub fn end(&self, segment_size: u64) -> Option<Lsn> {
        self.segments
            .iter()
            .next_back()
            .map(|((_, n), w)| Lsn(n * segment_size + w.partial.unwrap_or(segment_size)))
    }

    /// The gaps between `from` and the archive's end: LSN ranges no stored object holds, each
    /// as (first missing, first present again). A chain crossing timelines follows the newest
    /// timeline that holds each segment.
    pub fn gaps(&self, from: Lsn, segment_size: u64) -> Vec<(Lsn, Lsn)> {
        let mut held: BTreeMap<u64, u64> = BTreeMap::new();
        for ((_, n), w) in &self.segments {
            let len = w.partial.unwrap_or(segment_size);
            let e = held.entry(*n).or_insert(0);
            *e = (*e).max(len);
        }
        let Some((&last, _)) = held.iter().next_back() else {
            return Vec::new();
        };
        let mut gaps = Vec::new();
        let mut n = from.0 / segment_size;
        let mut open: Option<u64> = None;
        while n <= last {
            let whole = held.get(&n).is_some_and(|len| *len == segment_size);
            let present = held.contains_key(&n);
            match (present, open) {
                (false, None) => open = Some(n),
                (true, Some(start)) => {
                    gaps.push((Lsn(start * segment_size), Lsn(n * segment_size)));
                    open = None;
                }
                _ => {}
            }
            // A partial segment before the last one means the rest of it is missing.
            if present && !whole && n < last {
                let len = held[&n];
                gaps.push((Lsn(n * segment_size + len), Lsn((n + 1) * segment_size)));
            }
            n += 1;
        }
        gaps
    }
}

/// What prune may collect of `source`'s WAL: every segment that ends before the start of the
/// oldest base backup kept (the published ones but those in `ignoring`), and every partial
/// object a whole one or a longer partial supersedes. With no base backup kept, nothing goes.
pub async fn plan_collection(
    repo: &Repository,
    source: &str,
    ignoring: &HashSet<(String, String)>,
) -> Result<CollectionPlan> {
    let listing = repo.list(Some(source)).await?;
    let kept: Vec<&BaseBackupInfo> = listing
        .backups
        .iter()
        .filter(|e| !ignoring.contains(&(e.manifest.source.clone(), e.manifest.id.clone())))
        .filter_map(|e| e.manifest.base_backup.as_ref())
        .collect();
    let mut summary = Collection {
        what: "WAL segments",
        referenced_as: "needed by the kept base backups",
        ..Default::default()
    };
    let Some(oldest) = kept.iter().min_by_key(|b| b.start_lsn) else {
        summary.skipped = Some("no base backup is kept, so every segment is".into());
        return Ok(CollectionPlan::nothing(summary));
    };
    let size = oldest.wal_segment_size;
    let archive = Archive::read(repo, source, size).await?;
    let first_needed = oldest.start_lsn.0 / size;
    let mut doomed = Vec::new();
    for w in &archive.all {
        summary.stored += 1;
        let n = segment_number(&w.segment, size);
        // A partial object that a whole one or a longer partial of its segment supersedes is
        // read by nobody: the streamer deletes it at once, but a copy (whose writer deletes
        // nothing) keeps every partial it was given until this prune.
        let superseded = w.partial.is_some()
            && n.and_then(|n| archive.segments.get(&(w.timeline, n)))
                .is_some_and(|best| best.key != w.key);
        match n {
            Some(n) if n < first_needed || superseded => {
                summary.deleted += 1;
                summary.deleted_bytes += w.size_stored;
                doomed.push(w.key.clone());
                // After the object: a signature without its object vouches for nothing.
                let sig = signing::signature_key(&w.key);
                if archive.signatures.contains(&sig) {
                    doomed.push(sig);
                }
            }
            _ => summary.referenced += 1,
        }
    }
    Ok(CollectionPlan::new(
        summary,
        doomed,
        format!("wal-collect-{source}"),
    ))
}

/// What a copy needs of `source`'s WAL: every history file, and each segment from the start of
/// the oldest base backup the copy keeps on, whole, or its longest partial while it has no whole
/// object. A copy that keeps no base backup needs none.
pub async fn shared_for_copy(
    repo: &Repository,
    source: &str,
    keeping: &[&crate::repo::manifest::Manifest],
) -> Result<Option<crate::copy::Shared>> {
    let Some(oldest) = keeping
        .iter()
        .filter_map(|m| m.base_backup.as_ref())
        .min_by_key(|b| b.start_lsn)
    else {
        return Ok(None);
    };
    let size = oldest.wal_segment_size;
    let first_needed = oldest.start_lsn.0 / size;
    let prefix = layout::wal_prefix(source);
    let listed = repo
        .store
        .list(&prefix)
        .await
        .map_err(|e| Error::from(e).context("listing the WAL archive"))?;
    let archive = Archive::of(source, &listed, size);
    let wanted: HashSet<&str> = archive
        .segments
        .iter()
        .filter(|((_, n), _)| *n >= first_needed)
        .map(|(_, w)| w.key.as_str())
        .collect();
    let wanted = |key: &str| wanted.contains(key) || key.ends_with(".history.zst.age");
    let objects = listed
        .iter()
        .filter(|o| {
            wanted(
                o.key
                    .strip_suffix(signing::SIGNATURE_SUFFIX)
                    .unwrap_or(&o.key),
            )
        })
        .cloned()
        .collect();
    Ok(Some(crate::copy::Shared { prefix, objects }))
}

/// What `check` reads of a base backup's WAL: the chain from its start to the newest archived
/// segment, each gap a problem named by its LSN range (exit 13); with `--read-data` and an
/// identity, every object decrypted and its plaintext SHA-256 compared with its name. Each gap
/// and object is reported once per run, however many base backups need it.
pub async fn check_chain(
    ctx: &mut crate::check::Context<'_>,
    manifest: &crate::repo::manifest::Manifest,
) -> Result<()> {
    let Some(base) = &manifest.base_backup else {
        return Ok(());
    };
    let size = base.wal_segment_size;
    let source = &manifest.source;
    let archive = Archive::read(ctx.repo, source, size).await?;
    let Some(((_, first), _)) = archive.segments.iter().next() else {
        return Ok(());
    };
    if base.start_lsn.0 / size < *first {
        if ctx
            .seen
            .insert(format!("wal-predates:{source}:{}", manifest.id))
        {
            ctx.report.notes.push(format!(
                "{source} {}: the base backup is older than the WAL archive, so it restores to its own end ({}) only",
                manifest.id, base.stop_lsn
            ));
        }
        return Ok(());
    }
    for (from, to) in archive.gaps(base.start_lsn, size) {
        if ctx.seen.insert(format!("wal-gap:{source}:{from}")) {
            ctx.problem(
                manifest,
                format!("{}{from}–{to}", layout::wal_prefix(source)),
                format!(
                    "WAL from {from} to {to} is not in the archive: recovery from this base backup cannot pass {from}"
                ),
            );
        }
    }
    // Who stored each object of the chain from this base backup on: one planted beside a
    // signed segment is named too.
    let first = base.start_lsn.0 / size;
    for w in &archive.all {
        let n = segment_number(&w.segment, size).unwrap_or_default();
        if n < first || !ctx.seen.insert(format!("wal-signed:{}", w.key)) {
            continue;
        }
        let statement = signing::wal_statement(&w.key, &w.sha256);
        match ctx.repo.judge(&w.key, &statement, w.modified).await {
            Ok(_) => {}
            Err(e) if e.kind == crate::error::ErrorKind::Integrity => {
                ctx.problem(manifest, w.key.clone(), e.message)
            }
            Err(e) => return Err(e),
        }
    }
    if ctx.read_data {
        if let Some(ids) = ctx.keys.identities.as_ref() {
            for w in archive.segments.values() {
                if !ctx.seen.insert(w.key.clone()) {
                    continue;
                }
                if let Some(detail) = rehash(ctx.repo, w, ids).await {
                    ctx.problem(manifest, w.key.clone(), detail);
                }
                ctx.report.objects += 1;
                ctx.report.bytes_read += w.size_stored;
            }
        } else if ctx.seen.insert(format!("wal-noid:{source}")) {
            ctx.report.notes.push(format!(
                "{source}: WAL objects were not re-hashed: their names carry the plaintext's SHA-256, which needs an identity (--identity)"
            ));
        }
    }
    Ok(())
}

/// Decrypts `w` and compares its plaintext with its name; the problem, if any.
async fn rehash(
    repo: &Repository,
    w: &WalObject,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Option<String> {
    let stored = match repo.store.open(&w.key).await {
        Ok(r) => r,
        Err(e) => return Some(format!("cannot read it: {e}")),
    };
    let mut plain = match crate::pipeline::decrypt_stream(stored, identities).await {
        Ok(p) => p,
        Err(e) => return Some(e.message),
    };
    let copied = crate::pipeline::copy_hashed(&mut plain, &mut tokio::io::sink(), |_| {}).await;
    let (n, got) = match copied {
        Ok(v) => v,
        Err(CopyError::Read(e) | CopyError::Write(e)) => return Some(format!("damaged: {e}")),
    };
    if got != w.sha256 || w.partial.is_some_and(|len| len != n) {
        return Some(format!(
            "plaintext SHA-256 {got} ({n} bytes), its name says {}",
            w.sha256
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 << 20;

    fn obj(seg: &str, partial: Option<u64>) -> WalObject {
        let sha = "a".repeat(64);
        let key = match partial {
            None => layout::wal_segment("s", 1, seg, &sha),
            Some(n) => layout::wal_partial("s", 1, seg, n, &sha),
        };
        parse_key("s", &key, 100).expect("a key the streamer writes parses")
    }

    fn archive(objs: &[WalObject]) -> Archive {
        let mut a = Archive::default();
        for w in objs {
            let n = segment_number(&w.segment, MB16).unwrap();
            a.segments.insert((w.timeline, n), w.clone());
            a.all.push(w.clone());
        }
        a
    }

    #[test]
    fn keys_round_trip_and_others_are_ignored() {
        let w = obj("000000010000000000000004", Some(0x601978));
        assert_eq!(w.partial, Some(0x601978));
        assert_eq!(w.timeline, 1);
        assert!(parse_key("s", &layout::wal_history("s", 2), 1).is_none());
        assert!(parse_key("s", "wal/s/00000001/garbage.zst.age", 1).is_none());
        assert!(parse_key("other", &w.key, 1).is_none());
        assert_eq!(
            segment_number("0000000100000001000000FF", MB16),
            Some(256 + 255)
        );
    }

    #[test]
    fn the_chain_names_each_gap_by_lsn() {
        let a = archive(&[
            obj("000000010000000000000002", None),
            obj("000000010000000000000003", Some(4096)),
            obj("000000010000000000000005", None),
            obj("000000010000000000000006", Some(100)),
        ]);
        assert_eq!(a.end(MB16), Some(Lsn(6 * MB16 + 100)));
        let gaps = a.gaps("0/2000028".parse().unwrap(), MB16);
        let shown: Vec<String> = gaps.iter().map(|(a, b)| format!("{a}–{b}")).collect();
        assert_eq!(shown, vec!["0/3001000–0/4000000", "0/4000000–0/5000000"]);
        assert_eq!(
            a.gaps("0/1000000".parse().unwrap(), MB16)[0],
            (Lsn(MB16), Lsn(2 * MB16)),
            "from before the first stored segment"
        );
        assert!(archive(&[obj("000000010000000000000002", None)])
            .gaps("0/2000000".parse().unwrap(), MB16)
            .is_empty());
    }
}
