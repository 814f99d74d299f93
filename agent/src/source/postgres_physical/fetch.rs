//! `lifeboat wal fetch FILE DEST`: PostgreSQL's `restore_command`, answered from the archive.
//!
//! Recovery asks for WAL files by name: segments (`<TLI><LOG><SEG>`, 24 hex digits) and history
//! files (`<TLI>.history`). A segment comes from its whole object or, at the archive's end, from
//! its longest partial object, padded with zeros to the segment size as PostgreSQL expects (replay
//! ends where the valid records end). Every byte is checked before PostgreSQL sees it: the
//! plaintext is written to a temp file beside `DEST`, its SHA-256 and length compared with what
//! the object's name records, and only then renamed into place. A file the archive does not have
//! is "not found" (exit 1), which recovery takes as the end of the archive. Any other failure (a
//! damaged object, an unreachable repository, a wrong key) must stop recovery instead, never end
//! it early on a cluster that would then open missing everything after: the CLI exits 126 for
//! those, which PostgreSQL treats as fatal. `DEST` is never written by a failed fetch.

use std::path::Path;

use tokio::io::AsyncWriteExt;

use super::archive::{parse_key, WalObject};
use crate::error::{Cause, Error, ErrorKind, Result};
use crate::pipeline::CopyError;
use crate::repo::{layout, signing, Repository};

/// What a fetch wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The object it came from.
    pub key: String,
    /// Bytes written to the destination (a padded partial segment counts its padding).
    pub bytes: u64,
    /// Bytes of it that came from the archive.
    pub archived: u64,
}

/// What recovery asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted<'a> {
    Segment { timeline: u32, name: &'a str },
    History { timeline: u32 },
}

fn wanted(file: &str) -> Option<Wanted<'_>> {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if file.len() == 24 && hex(file) {
        let timeline = u32::from_str_radix(&file[..8], 16).ok()?;
        return Some(Wanted::Segment {
            timeline,
            name: file,
        });
    }
    let tli = file.strip_suffix(".history")?;
    (tli.len() == 8 && hex(tli)).then_some(())?;
    Some(Wanted::History {
        timeline: u32::from_str_radix(tli, 16).ok()?,
    })
}

fn not_found(source: &str, file: &str) -> Error {
    Error::failed(format!("{file}: not in {source}'s WAL archive")).cause(Cause::NotArchived)
}

/// What a fetched segment must be of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster {
    /// Its WAL segment size.
    pub segment_size: u64,
    /// Its system identifier, when known: a segment whose header names another cluster is
    /// damage, not WAL to replay.
    pub system_id: Option<u64>,
}

impl Cluster {
    /// The cluster a base backup is of.
    pub fn of(base: &super::BaseBackupInfo) -> Cluster {
        Cluster {
            segment_size: base.wal_segment_size,
            system_id: base.system_identifier.parse().ok(),
        }
    }
}

/// Fetches `file` of `source`'s archive into `dest`, checked, for `cluster`.
pub async fn fetch(
    repo: &Repository,
    source: &str,
    file: &str,
    dest: &Path,
    cluster: Cluster,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<Fetched> {
    match wanted(file) {
        Some(Wanted::History { timeline }) => {
            let key = layout::wal_history(source, timeline);
            if repo
                .store
                .size(&key)
                .await
                .map_err(|e| Error::from(e).context(format!("looking for {key}")))?
                .is_none()
            {
                return Err(not_found(source, file));
            }
            // History files carry no hash in their name: the signature covers the plaintext's.
            write_checked(repo, &key, dest, None, 0, identities).await
        }
        Some(Wanted::Segment { timeline, name }) => {
            // The best object a trusted writer stored: one planted beside it is passed over.
            let mut refused = None;
            for w in find_segment(repo, source, timeline, name).await? {
                match vouched(repo, &w).await {
                    Ok(()) => return fetch_vouched(repo, &w, dest, cluster, identities).await,
                    Err(e) if e.kind == ErrorKind::Integrity => {
                        refused.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            // Only untrusted objects: recovery must stop here, never take it as the end.
            Err(refused.unwrap_or_else(|| not_found(source, file)))
        }
        // `.partial`, `.backup` and anything else: the archive holds none.
        None => Err(not_found(source, file)),
    }
}

/// Fetches the segment object `w` of `cluster` into `dest`, checked (a trusted writer's
/// signature, its SHA-256 and length, and the cluster its header names), a partial one padded to
/// the whole segment.
pub async fn fetch_segment(
    repo: &Repository,
    w: &WalObject,
    dest: &Path,
    cluster: Cluster,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<Fetched> {
    vouched(repo, w).await?;
    fetch_vouched(repo, w, dest, cluster, identities).await
}

/// Whether a trusted writer stored WAL object `w` (see `repo::signing::wal_statement`).
async fn vouched(repo: &Repository, w: &WalObject) -> Result<()> {
    repo.judge(
        &w.key,
        &signing::wal_statement(&w.key, &w.sha256),
        w.modified,
    )
    .await
    .map(drop)
    .map_err(|e| {
        e.hint("recovery cannot pass this point from the archive; restore an older base backup or to an earlier target (RUNBOOK.md#untrusted-backup)")
    })
}

/// [`fetch_segment`], its writer already vouched for.
async fn fetch_vouched(
    repo: &Repository,
    w: &WalObject,
    dest: &Path,
    cluster: Cluster,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<Fetched> {
    let expect = Expect {
        sha256: &w.sha256,
        len: w.partial.unwrap_or(cluster.segment_size),
        system_id: cluster.system_id,
    };
    let pad = cluster.segment_size.saturating_sub(expect.len);
    write_checked(repo, &w.key, dest, Some(expect), pad, identities).await
}

/// What a segment's plaintext must be.
struct Expect<'a> {
    sha256: &'a str,
    len: u64,
    system_id: Option<u64>,
}

/// The system identifier a segment's first page header names (its long header: magic, info,
/// timeline, page address, remaining length, then the identifier at byte 24, little-endian as
/// the server writes it on the platforms lifeboat runs on).
fn header_system_id(first: &[u8]) -> Option<u64> {
    const XLP_LONG_HEADER: u16 = 0x0002;
    let info = u16::from_le_bytes(first.get(2..4)?.try_into().ok()?);
    if info & XLP_LONG_HEADER == 0 {
        return None;
    }
    Some(u64::from_le_bytes(first.get(24..32)?.try_into().ok()?))
}

/// The objects of segment `name`, best first: whole ones, then partials longest first.
async fn find_segment(
    repo: &Repository,
    source: &str,
    timeline: u32,
    name: &str,
) -> Result<Vec<WalObject>> {
    let prefix = format!("{}{timeline:08X}/{name}.", layout::wal_prefix(source));
    let listed = repo
        .store
        .list(&prefix)
        .await
        .map_err(|e| Error::from(e).context(format!("listing {prefix}")))?;
    let mut found: Vec<WalObject> = listed
        .iter()
        .filter_map(|o| {
            let mut w = parse_key(source, &o.key, o.size)?;
            w.modified = o.modified;
            Some(w)
        })
        .collect();
    found.sort_by_key(|w| std::cmp::Reverse(w.partial.map_or(u64::MAX, |len| len)));
    Ok(found)
}

/// Decrypts `key` into a temp file beside `dest`, checks it against `expect` (SHA-256 and
/// length of the plaintext), pads it with `pad` zeros and renames it to `dest`.
async fn write_checked(
    repo: &Repository,
    key: &str,
    dest: &Path,
    expect: Option<Expect<'_>>,
    pad: u64,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<Fetched> {
    let damaged = |what: String| {
        Error::new(ErrorKind::Integrity, format!("{key}: {what}")).hint(
            "recovery cannot pass this point from the archive; restore an older base backup or to an earlier target, and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)",
        )
    };
    let dir = dest.parent().filter(|d| !d.as_os_str().is_empty());
    let tmp = tempfile::Builder::new()
        .prefix(".lifeboat-fetch-")
        .tempfile_in(dir.unwrap_or(Path::new(".")))
        .map_err(|e| Error::failed(format!("cannot write beside {}: {e}", dest.display())))?;
    let stored = repo
        .store
        .open(key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    let mut plain = crate::pipeline::decrypt_stream(stored, identities)
        .await
        .map_err(|e| e.context(key.to_string()))?;
    let mut out = tokio::fs::File::from_std(
        tmp.reopen()
            .map_err(|e| Error::failed(format!("{}: {e}", tmp.path().display())))?,
    );
    let io = |e: std::io::Error| Error::failed(format!("writing {}: {e}", dest.display()));
    let (n, got) = crate::pipeline::copy_hashed(&mut plain, &mut out, |_| {})
        .await
        .map_err(|e| match e {
            CopyError::Read(e) => damaged(format!("damaged: {e}")),
            CopyError::Write(e) => io(e),
        })?;
    if expect.is_none() {
        // A history file's name carries no hash: its signature covers the plaintext's.
        repo.judge(key, &signing::wal_statement(key, &got), None)
            .await?;
    }
    if let Some(Expect {
        sha256,
        len,
        system_id,
    }) = expect
    {
        if got != sha256 || n != len {
            return Err(damaged(format!(
                "plaintext SHA-256 {got} ({n} bytes), its name says {sha256} ({len} bytes)"
            )));
        }
        if let Some(want) = system_id {
            let mut first = [0u8; 32];
            let read = {
                use std::io::Read;
                tmp.reopen().and_then(|mut f| f.read(&mut first))
            }
            .map_err(|e| Error::failed(format!("{}: {e}", tmp.path().display())))?;
            match header_system_id(&first[..read]) {
                Some(found) if found != want => {
                    return Err(damaged(format!(
                        "WAL of another cluster: its header names system identifier {found}, the base backup's is {want}"
                    )))
                }
                _ => {}
            }
        }
    }
    let zeros = vec![0u8; 64 << 10];
    let mut left = pad;
    while left > 0 {
        let k = left.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..k]).await.map_err(io)?;
        left -= k as u64;
    }
    out.sync_all().await.map_err(io)?;
    drop(out);
    tmp.persist(dest)
        .map_err(|e| Error::failed(format!("cannot move into {}: {e}", dest.display())))?;
    Ok(Fetched {
        key: key.to_string(),
        bytes: n + pad,
        archived: n,
    })
}

/// Where `wal fetch --prefetch` keeps the segments it fetched ahead, relative to the data
/// directory (the server runs `restore_command` there).
pub const PREFETCH_DIR: &str = "lifeboat-prefetch";

/// The prefetchers' log in the spool: why a segment was not fetched ahead.
pub const PREFETCH_LOG: &str = "prefetch.log";

/// The file in `spool` naming the running prefetcher's process id.
const PREFETCHER: &str = ".prefetcher";

/// The segment after `name` on its timeline, in a cluster of `segment_size` segments.
pub fn next_segment(name: &str, segment_size: u64) -> Option<String> {
    let Some(Wanted::Segment { timeline, name }) = wanted(name) else {
        return None;
    };
    let n = super::archive::segment_number(name, segment_size)? + 1;
    Some(super::wal::segment_name(
        timeline,
        super::Lsn(n * segment_size),
        segment_size,
    ))
}

/// The process id of the prefetcher working on `spool`, while it is alive.
fn prefetcher(spool: &Path) -> Option<u32> {
    std::fs::read_to_string(spool.join(PREFETCHER))
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        .filter(|pid| alive(*pid))
}

/// True when process `pid` runs (exists and is not a zombie no one reaped yet).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // `pid (comm) state …`: the state follows the last parenthesis.
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// True while a prefetcher works on `spool`.
pub fn prefetcher_running(spool: &Path) -> bool {
    prefetcher(spool).is_some()
}

/// Names process `pid` as `spool`'s prefetcher: written by `wal fetch` as it starts one, so
/// that the next `wal fetch` waits for what it fetches even before it is up.
pub fn claim_prefetch(spool: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(spool)?;
    std::fs::write(spool.join(PREFETCHER), pid.to_string())
}

/// Moves segment `file` from `spool` to `dest` when a prefetcher put it there (already checked
/// against its SHA-256), waiting while one is still at work on it. Segments before `file` are
/// no longer wanted and are removed. False when it is not there: fetch it.
pub async fn take_prefetched(spool: &Path, file: &str, dest: &Path) -> bool {
    let Some(Wanted::Segment { .. }) = wanted(file) else {
        return false;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let here = spool.join(file);
    while !here.exists() && prefetcher_running(spool) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let taken = std::fs::rename(&here, dest).is_ok();
    if let Ok(rd) = std::fs::read_dir(spool) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if wanted(&name).is_some() && name.as_str() < file {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    taken
}

/// Fetches ahead of recovery: up to `count` whole segments after `after`, each checked, into
/// `spool`, stopping at the first the archive does not hold whole (a growing segment is left
/// for `wal fetch` to take at its longest). One prefetcher per spool. Returns how many it
/// fetched.
pub async fn prefetch(
    repo: &Repository,
    source: &str,
    after: &str,
    count: u32,
    spool: &Path,
    cluster: Cluster,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<u32> {
    let segment_size = cluster.segment_size;
    let me = std::process::id();
    if prefetcher(spool).is_some_and(|pid| pid != me) {
        return Ok(0);
    }
    let marker = spool.join(PREFETCHER);
    claim_prefetch(spool, me)
        .map_err(|e| Error::failed(format!("cannot write {}: {e}", marker.display())))?;
    let fetched = async {
        let mut name = after.to_string();
        let mut fetched = 0;
        for _ in 0..count {
            let Some(next) = next_segment(&name, segment_size) else {
                break;
            };
            name = next;
            if spool.join(&name).exists() {
                continue;
            }
            let Some(Wanted::Segment { timeline, .. }) = wanted(&name) else {
                break;
            };
            match find_segment(repo, source, timeline, &name).await?.first() {
                Some(w) if w.partial.is_none() => {
                    fetch_segment(repo, w, &spool.join(&name), cluster, identities).await?;
                    fetched += 1;
                }
                _ => break,
            }
        }
        Ok::<_, Error>(fetched)
    }
    .await;
    let _ = std::fs::remove_file(&marker);
    fetched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_asks_for_segments_and_histories_only() {
        assert_eq!(
            wanted("00000002000000000000000A"),
            Some(Wanted::Segment {
                timeline: 2,
                name: "00000002000000000000000A"
            })
        );
        assert_eq!(
            wanted("00000003.history"),
            Some(Wanted::History { timeline: 3 })
        );
        assert_eq!(wanted("00000002000000000000000A.partial"), None);
        assert_eq!(wanted("000000010000000000000002.00000028.backup"), None);
        assert_eq!(wanted("../../etc/passwd"), None);
        assert_eq!(wanted("0000000G.history"), None);
    }

    #[test]
    fn a_segments_header_names_its_cluster() {
        // PostgreSQL 15's first page of a segment: magic, XLP_LONG_HEADER, timeline 1, …
        let mut page = vec![0u8; 40];
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
        page[24..32].copy_from_slice(&7_441_234_567_890_123_456u64.to_le_bytes());
        assert_eq!(header_system_id(&page), Some(7_441_234_567_890_123_456));
        page[2..4].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(header_system_id(&page), None, "a short header names none");
        assert_eq!(header_system_id(&[0u8; 10]), None);
    }

    #[test]
    fn the_next_segment_stays_on_its_timeline_and_crosses_log_files() {
        let mb16 = 16 << 20;
        assert_eq!(
            next_segment("00000002000000000000000A", mb16).as_deref(),
            Some("00000002000000000000000B")
        );
        assert_eq!(
            next_segment("0000000100000000000000FF", mb16).as_deref(),
            Some("000000010000000100000000")
        );
        assert_eq!(next_segment("00000002.history", mb16), None);
    }
}
