//! Point-in-time restore: which base backup to start from, how far the archive lets replay go
//! from it, and whether the operator's target lies inside that reach.
//!
//! A base backup is usable for a target once it is consistent (its stop LSN; its finish time
//! for a time target). From there replay can go as far as the archive is whole: to the first gap
//! after the backup's stop, or to the archive's end. Targets outside every such window are
//! refused before anything is written, with the windows there are in the message.
//!
//! Recovery itself is PostgreSQL's: the restored data directory gets `recovery.signal` and a
//! `restore_command` that runs `lifeboat wal fetch`, which checks every byte against the
//! object's name before the server sees it.

use chrono::{DateTime, Utc};

use super::archive::Archive;
use super::{BaseBackupInfo, Lsn};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::catalog::Entry;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The last transaction committed at or before this time.
    Time(DateTime<Utc>),
    /// This WAL location.
    Lsn(Lsn),
    /// The end of the archived WAL.
    Latest,
}

/// `--time`, `--lsn` or `--latest`, and `--timeline`.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Where to stop.
    pub target: Target,
    /// The timeline to follow (`None`: the newest, as PostgreSQL's `latest`).
    pub timeline: Option<u32>,
    /// The shell command the restored server fetches WAL with (`%f %p` at its end).
    pub restore_command: String,
    /// The source's backups, when they were listed already to choose the base backup (empty:
    /// the plan lists them).
    pub backups: Vec<Entry>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Time(t) => write!(f, "--time {}", t.format("%Y-%m-%d %H:%M:%S%.3fZ")),
            Target::Lsn(l) => write!(f, "--lsn {l}"),
            Target::Latest => f.write_str("--latest"),
        }
    }
}

/// A stretch of history one can recover to: from a base backup's consistency point to the
/// first gap after it, or to the archive's end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    /// The base backup it starts from (the oldest one, when windows merge).
    pub backup: String,
    /// Its first point: the backup's end.
    pub from_lsn: Lsn,
    /// When the backup finished.
    pub from_time: DateTime<Utc>,
    /// How far replay goes.
    pub to_lsn: Lsn,
    /// When the WAL up to `to_lsn` was stored (every change before it happened earlier).
    pub to_time: Option<DateTime<Utc>>,
    /// Whether a gap ends it (else the archive's end does).
    pub gap_after: bool,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let time = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%SZ").to_string();
        write!(
            f,
            "{} ({}) to {} ({}){}",
            time(&self.from_time),
            self.from_lsn,
            self.to_time.as_ref().map_or("?".into(), time),
            self.to_lsn,
            if self.gap_after {
                ", where a gap in the archive begins"
            } else {
                ", the archive's end"
            }
        )
    }
}

/// What a point-in-time restore will replay.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Replay {
    /// The base backup it starts from.
    pub backup: String,
    /// Where replay starts.
    pub from_lsn: Lsn,
    /// Where the restored cluster is first consistent.
    pub consistent_at: Lsn,
    /// How far replay can go from this base backup.
    pub reach: Window,
    /// The last LSN replay reads up to (the target's, or the reach's end).
    pub until_lsn: Lsn,
    /// Segments to fetch from the archive, and their stored bytes.
    pub segments: u64,
    /// Their stored bytes.
    pub bytes_stored: u64,
    /// True when a time target lies after everything archived: replay goes to the end, and
    /// nothing set in the data directory stops it earlier.
    pub to_end: bool,
    /// Every window of the source.
    pub windows: Vec<Window>,
}

/// `--time` is before every window, or after one's end: the error for `what`, naming the
/// windows there are.
fn outside(what: String, windows: &[Window]) -> Error {
    let listed = if windows.is_empty() {
        "there is no recoverable window: no base backup of this source".to_string()
    } else {
        let lines: Vec<String> = windows.iter().map(|w| format!("  {w}")).collect();
        format!("recoverable windows:\n{}", lines.join("\n"))
    };
    Error::new(ErrorKind::Invalid, format!("{what}\n{listed}")).hint(
        "pick a target inside a window (`lifeboat list` shows them), or --latest (RUNBOOK.md#to-a-point-in-time)",
    )
}

/// The base backups of `source` in `backups`, newest first.
fn bases<'a>(backups: &'a [Entry], source: &str) -> Vec<(&'a Entry, &'a BaseBackupInfo)> {
    backups
        .iter()
        .filter(|e| e.manifest.source == source)
        .filter_map(|e| e.manifest.base_backup.as_ref().map(|b| (e, b)))
        .collect()
}

/// The newest base backup of `source` that is consistent before `target`; when there is none,
/// the error names the windows there are (read from the archive in `repo`).
pub async fn choose<'a>(
    repo: &crate::repo::Repository,
    backups: &'a [Entry],
    source: &str,
    target: &Target,
) -> Result<&'a Entry> {
    let all = bases(backups, source);
    let found = all.iter().find(|(e, b)| match target {
        Target::Time(t) => e.manifest.finished_at <= *t,
        Target::Lsn(l) => b.stop_lsn <= *l,
        Target::Latest => true,
    });
    if let Some((e, _)) = found {
        return Ok(e);
    }
    if let Some((_, newest)) = all.first() {
        let archive = Archive::read(repo, source, newest.wal_segment_size).await?;
        return Err(outside(
            format!("{target} is before the oldest base backup of {source} was consistent"),
            &windows(backups, source, &archive),
        ));
    }
    match backups.iter().find(|e| e.manifest.source == source) {
        Some(e) if e.manifest.kind != crate::source::Kind::PostgresPhysical => {
            Err(crate::restore::no_recovery_for(source, e.manifest.kind))
        }
        _ => Err(Error::failed(format!(
            "no base backup of source {source}: there is nothing to recover from"
        ))
        .hint("take one with `lifeboat backup --source …` (RUNBOOK.md#to-a-point-in-time)")),
    }
}

/// How far replay goes from `base`: to the first gap after its end, else the archive's end
/// (never short of the backup's own end, which its `pg_wal/` holds).
fn reach(entry: &Entry, base: &BaseBackupInfo, archive: &Archive) -> Window {
    let size = base.wal_segment_size;
    let end = archive.end(size).unwrap_or(base.stop_lsn);
    let gap = archive.gaps(base.stop_lsn, size).first().map(|g| g.0);
    let to_lsn = gap.unwrap_or(end).max(base.stop_lsn);
    let to_time = if to_lsn == base.stop_lsn {
        Some(entry.manifest.finished_at)
    } else if gap.is_none() {
        archive.newest
    } else {
        let last = (to_lsn.0 - 1) / size;
        archive
            .segments
            .iter()
            .filter(|((_, n), _)| *n == last)
            .filter_map(|(_, w)| w.modified)
            .max()
    };
    Window {
        backup: entry.manifest.id.clone(),
        from_lsn: base.stop_lsn,
        from_time: entry.manifest.finished_at,
        to_lsn,
        to_time,
        gap_after: gap.is_some_and(|g| g >= base.stop_lsn),
    }
}

/// The windows of every base backup, oldest first, overlapping ones merged.
pub fn windows(backups: &[Entry], source: &str, archive: &Archive) -> Vec<Window> {
    let mut all: Vec<Window> = bases(backups, source)
        .into_iter()
        .map(|(e, b)| reach(e, b, archive))
        .collect();
    all.sort_by_key(|w| w.from_lsn);
    let mut merged: Vec<Window> = Vec::new();
    for w in all {
        match merged.last_mut() {
            Some(m) if w.from_lsn <= m.to_lsn => {
                if w.to_lsn > m.to_lsn {
                    m.to_lsn = w.to_lsn;
                    m.to_time = w.to_time;
                    m.gap_after = w.gap_after;
                }
            }
            _ => merged.push(w),
        }
    }
    merged
}

/// Plans replay from `entry` (chosen by [`choose`] or by the operator) to `recovery`'s target,
/// reading `archive`; refuses a target the archive cannot reach from it.
pub fn plan(
    entry: &Entry,
    backups: &[Entry],
    archive: &Archive,
    recovery: &Recovery,
) -> Result<Replay> {
    let m = &entry.manifest;
    let base = m.base_backup.as_ref().ok_or_else(|| {
        Error::new(
            ErrorKind::Invalid,
            format!("backup {} is not a base backup", m.id),
        )
    })?;
    if let Some(n) = recovery.timeline {
        let held: std::collections::BTreeSet<u32> = archive
            .segments
            .keys()
            .map(|(t, _)| *t)
            .chain([base.timeline])
            .collect();
        if n < base.timeline || !held.contains(&n) {
            let held: Vec<String> = held.iter().map(u32::to_string).collect();
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "--timeline {n}: base backup {} is on timeline {}, and the archive holds WAL of timeline {}",
                    m.id,
                    base.timeline,
                    held.join(", ")
                ),
            )
            .hint("name a timeline the archive holds from the base backup's on, or leave --timeline out to follow the newest"));
        }
    }
    let windows = windows(backups, &m.source, archive);
    let reach = reach(entry, base, archive);
    let beyond = |what: &str| {
        outside(
            format!(
                "{}: {what}; from base backup {} replay reaches {} ({})",
                recovery.target,
                m.id,
                reach.to_lsn,
                if reach.gap_after {
                    "a gap in the WAL archive begins there"
                } else {
                    "the end of the archived WAL"
                }
            ),
            &windows,
        )
    };
    let mut to_end = false;
    let until_lsn = match &recovery.target {
        Target::Lsn(l) => {
            if *l < base.stop_lsn {
                return Err(outside(
                    format!(
                        "{}: base backup {} is consistent only from {}",
                        recovery.target, m.id, base.stop_lsn
                    ),
                    &windows,
                ));
            }
            // Recovery stops at the first record at or after the target: one must start there.
            if *l >= reach.to_lsn && reach.to_lsn > base.stop_lsn {
                return Err(beyond("not archived"));
            }
            *l
        }
        Target::Time(t) => {
            if *t < m.finished_at {
                return Err(outside(
                    format!(
                        "{}: base backup {} is consistent only from {}",
                        recovery.target,
                        m.id,
                        m.finished_at.format("%Y-%m-%d %H:%M:%SZ")
                    ),
                    &windows,
                ));
            }
            match reach.to_time {
                Some(stored) if *t >= stored => {
                    if reach.gap_after {
                        return Err(beyond("WAL after it is missing"));
                    }
                    to_end = true;
                }
                _ => {}
            }
            reach.to_lsn
        }
        Target::Latest => reach.to_lsn,
    };
    let size = base.wal_segment_size;
    let (first, last) = (
        base.start_lsn.0 / size,
        until_lsn.0.saturating_sub(1) / size,
    );
    let mut per_segment = std::collections::BTreeMap::new();
    for ((_, n), w) in &archive.segments {
        if (first..=last).contains(n) {
            per_segment.insert(*n, w.size_stored);
        }
    }
    Ok(Replay {
        backup: m.id.clone(),
        from_lsn: base.start_lsn,
        consistent_at: base.stop_lsn,
        until_lsn,
        segments: per_segment.len() as u64,
        bytes_stored: per_segment.values().sum(),
        to_end,
        reach,
        windows,
    })
}

/// The settings that make a restored data directory recover to `recovery`'s target, for
/// `postgresql.auto.conf`. `restore_command` is a shell command, already quoted.
pub fn recovery_settings(recovery: &Recovery, replay: &Replay) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut out = format!(
        "\n# Added by `lifeboat restore {}` from base backup {}.\nrestore_command = {}\n",
        recovery.target,
        replay.backup,
        q(&recovery.restore_command)
    );
    match &recovery.target {
        Target::Time(t) if !replay.to_end => out.push_str(&format!(
            "recovery_target_time = {}\n",
            q(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
        )),
        Target::Lsn(l) => out.push_str(&format!("recovery_target_lsn = {}\n", q(&l.to_string()))),
        _ => {}
    }
    out.push_str("recovery_target_action = 'promote'\n");
    out.push_str(&format!(
        "recovery_target_timeline = {}\n",
        q(&recovery
            .timeline
            .map_or("latest".to_string(), |t| t.to_string()))
    ));
    out
}

/// `s` as one word for `sh`.
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::layout;
    use crate::source::postgres_physical::archive::{parse_key, segment_number};

    const MB16: u64 = 16 << 20;

    fn at(hms: &str) -> DateTime<Utc> {
        format!("2026-12-01T{hms}Z").parse().unwrap()
    }

    fn entry(id: &str, finished: &str, start: &str, stop: &str) -> Entry {
        let m = serde_json::json!({
            "format": 1, "id": id, "source": "db", "kind": "postgres-physical",
            "started_at": at("00:00:00"), "finished_at": at(finished), "tool_version": "t",
            "source_version": null, "dump_tool_version": null,
            "compression": { "algorithm": "zstd", "level": 3 },
            "encryption": { "algorithm": "age-v1", "recipients": [] },
            "size_plain": 1, "size_stored": 1, "parts": [], "fingerprint": null,
            "base_backup": {
                "system_identifier": "1", "timeline": 1, "start_lsn": start, "stop_lsn": stop,
                "start_wal_file": "000000010000000000000002", "wal_segment_size": MB16,
            },
        });
        Entry {
            manifest: serde_json::from_value(m).unwrap(),
            verification: None,
            seal: crate::repo::signing::Seal::Unchecked,
            lineage: crate::repo::origin::Lineage::Unrecorded,
        }
    }

    /// Segments `n` (whole, or partial with a length) stored at the times given.
    fn archive(segments: &[(u64, Option<u64>, &str)]) -> Archive {
        let mut a = Archive::default();
        for (n, partial, stored) in segments {
            let seg = format!("00000001{:08X}{:08X}", n >> 8, n & 0xff);
            let sha = "b".repeat(64);
            let key = match partial {
                None => layout::wal_segment("db", 1, &seg, &sha),
                Some(len) => layout::wal_partial("db", 1, &seg, *len, &sha),
            };
            let mut w = parse_key("db", &key, 1000).unwrap();
            w.modified = Some(at(stored));
            a.segments
                .insert((1, segment_number(&seg, MB16).unwrap()), w.clone());
            a.all.push(w);
            a.newest = a.newest.max(Some(at(stored)));
        }
        a
    }

    fn recovery(target: Target) -> Recovery {
        Recovery {
            target,
            timeline: None,
            restore_command: "lifeboat wal fetch --policy '/p q.toml' %f %p".into(),
            backups: Vec::new(),
        }
    }

    #[test]
    fn a_whole_archive_is_one_window_from_the_oldest_backups_end() {
        let backups = [
            entry("B", "02:00:00", "0/4000028", "0/4000100"),
            entry("A", "01:00:00", "0/2000028", "0/2000100"),
        ];
        let a = archive(&[
            (2, None, "01:00:01"),
            (3, None, "01:30:00"),
            (4, None, "02:00:01"),
            (5, Some(0x100), "02:30:00"),
        ]);
        let w = windows(&backups, "db", &a);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            (w[0].backup.as_str(), w[0].from_lsn),
            ("A", Lsn(0x200_0100))
        );
        assert_eq!(w[0].to_lsn, Lsn(5 * MB16 + 0x100));
        assert_eq!(w[0].to_time, Some(at("02:30:00")));
        assert!(!w[0].gap_after);

        // A time inside: the target is set, and replay reads the segments from A's start.
        let r = plan(
            &backups[1],
            &backups,
            &a,
            &recovery(Target::Time(at("01:40:00"))),
        )
        .unwrap();
        assert!(!r.to_end);
        assert_eq!((r.segments, r.bytes_stored), (4, 4000));
        let conf = recovery_settings(&recovery(Target::Time(at("01:40:00"))), &r);
        assert!(
            conf.contains("recovery_target_time = '2026-12-01 01:40:00.000000+00'"),
            "{conf}"
        );
        assert!(
            conf.contains("restore_command = 'lifeboat wal fetch --policy ''/p q.toml'' %f %p'"),
            "{conf}"
        );
        assert!(
            conf.contains("recovery_target_timeline = 'latest'"),
            "{conf}"
        );

        // A timeline the archive does not hold is refused, naming those it does.
        let mut on = recovery(Target::Latest);
        on.timeline = Some(2);
        let e = plan(&backups[1], &backups, &a, &on).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(
            e.message.contains("holds WAL of timeline 1"),
            "{}",
            e.message
        );
        on.timeline = Some(1);
        assert!(plan(&backups[1], &backups, &a, &on).is_ok());

        // After everything stored: replay to the end, with no time set to stop it short.
        let late = recovery(Target::Time(at("03:00:00")));
        let r = plan(&backups[0], &backups, &a, &late).unwrap();
        assert!(r.to_end);
        assert!(!recovery_settings(&late, &r).contains("recovery_target_time ="));

        // An LSN at or past the end is not archived.
        let e = plan(
            &backups[0],
            &backups,
            &a,
            &recovery(Target::Lsn(Lsn(5 * MB16 + 0x100))),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(
            e.message.contains("not archived") && e.message.contains("recoverable windows"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_gap_splits_the_windows_and_targets_past_it_are_refused() {
        let backups = [
            entry("B", "02:00:00", "0/4000028", "0/4000100"),
            entry("A", "01:00:00", "0/2000028", "0/2000100"),
        ];
        // Segment 3 was never stored.
        let a = archive(&[
            (2, None, "01:10:00"),
            (4, None, "02:00:01"),
            (5, Some(0x100), "02:30:00"),
        ]);
        let w = windows(&backups, "db", &a);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!((w[0].to_lsn, w[0].gap_after), (Lsn(3 * MB16), true));
        assert_eq!(w[0].to_time, Some(at("01:10:00")));
        assert_eq!(
            (w[1].backup.as_str(), w[1].from_lsn),
            ("B", Lsn(0x400_0100))
        );
        assert!(w[1].to_string().contains("the archive's end"), "{}", w[1]);

        // From A: inside its window yes, past the gap no.
        plan(
            &backups[1],
            &backups,
            &a,
            &recovery(Target::Time(at("01:05:00"))),
        )
        .unwrap();
        let e = plan(
            &backups[1],
            &backups,
            &a,
            &recovery(Target::Time(at("01:30:00"))),
        )
        .unwrap_err();
        assert!(
            e.message.contains("a gap in the WAL archive begins there"),
            "{}",
            e.message
        );
        let e = plan(
            &backups[1],
            &backups,
            &a,
            &recovery(Target::Lsn(Lsn(0x380_0000))),
        )
        .unwrap_err();
        assert!(e.message.contains("0/3000000"), "{}", e.message);
        // A target before a backup's end is refused for it.
        let e = plan(
            &backups[0],
            &backups,
            &a,
            &recovery(Target::Lsn(Lsn(0x400_0000))),
        )
        .unwrap_err();
        assert!(
            e.message.contains("consistent only from 0/4000100"),
            "{}",
            e.message
        );
    }

    #[test]
    fn shell_words_survive_spaces_and_quotes() {
        assert_eq!(shell_word("/usr/bin/lifeboat"), "/usr/bin/lifeboat");
        assert_eq!(shell_word("/a b/p.toml"), "'/a b/p.toml'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
