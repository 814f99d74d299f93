//! `lifeboat list`: backups, newest first, with their verification status.

use std::io::Write;
use std::path::Path;

use lifeboat::human_bytes;
use lifeboat::repo::Repository;
use lifeboat::{Error, Result};

use super::{load_at, note_unknown_source, print_error, Place};

pub async fn list(path: &Path, at: &Place, source: Option<&str>, json: bool) -> Result<()> {
    let policy = load_at(path, at)?;
    if let Some(s) = source {
        note_unknown_source(&policy, s);
    }
    let repo = Repository::open(&policy).await?;
    let listing = repo.list(source).await?;
    let copies = lifeboat::copy::held_by_copies(&policy, source).await;
    for (name, held) in &copies {
        if let Err(e) = held {
            eprintln!("warning: copy `{name}` cannot be read, so where backups exist is not known for it: {e}");
        }
    }
    // The copies holding a backup, by name.
    let held_by = |m: &lifeboat::repo::manifest::Manifest| -> Vec<&str> {
        let key = (m.source.clone(), m.id.clone());
        copies
            .iter()
            .filter(|(_, held)| held.as_ref().is_ok_and(|h| h.contains(&key)))
            .map(|(name, _)| name.as_str())
            .collect()
    };
    // A backup taken from another system than the one before it, judged by its source's moved_at.
    let change = |e: &lifeboat::repo::catalog::Entry| {
        e.origin_change(policy.source(&e.manifest.source).and_then(|s| s.moved_at))
    };
    let mut out = std::io::stdout().lock();
    if json {
        let items: Vec<serde_json::Value> = listing
            .backups
            .iter()
            .map(|e| {
                let m = &e.manifest;
                serde_json::json!({
                    "id": m.id,
                    "source": m.source,
                    "kind": m.kind,
                    "started_at": m.started_at,
                    "finished_at": m.finished_at,
                    "size_plain": m.size_plain,
                    "size_stored": m.size_stored,
                    "verified": e.verified(),
                    "verification": e.verification,
                    "source_version": m.source_version,
                    "parts": m.parts.iter().map(|p| &p.name).collect::<Vec<_>>(),
                    "base_backup": m.base_backup,
                    "copies": held_by(m),
                    "seal": e.seal,
                    "origin": m.origin,
                    "lineage": e.lineage,
                    "origin_change": change(e),
                    "shards": m.shards.iter().map(|s| {
                        let part = m.parts.iter().find(|p| p.name == s.object);
                        serde_json::json!({
                            "name": s.name,
                            "slots": s.slots,
                            "node": s.node,
                            "role": s.role,
                            "keys": s.keys,
                            "size_plain": part.map(|p| p.size_plain),
                            "size_stored": part.map(|p| p.size_stored),
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&items)
            .map_err(|e| Error::failed(format!("cannot encode the listing: {e}")))?;
        writeln!(out, "{text}").map_err(print_error)?;
    } else {
        let where_ = if copies.is_empty() { "" } else { " COPIES" };
        // Only when a backup's origin changed: `changed` (or `moved`, as the policy expects).
        let origins = listing.backups.iter().any(|e| change(e).is_some());
        let origin_head = if origins { " ORIGIN " } else { "" };
        // With [signing], who published each backup: `signed`, or `unsigned` from before signing.
        let signed = repo.trust.enabled();
        let seal_head = if signed { " SIGNED  " } else { "" };
        let head = format!(
            "{:<16} {:<24} {:<17} {:<20} {:>10} {:>10} {:<8}{seal_head}{origin_head}{where_}",
            "SOURCE", "ID", "KIND", "STARTED (UTC)", "PLAIN", "STORED", "VERIFIED"
        );
        writeln!(out, "{}", head.trim_end()).map_err(print_error)?;
        for e in &listing.backups {
            let m = &e.manifest;
            let held = held_by(m);
            let where_ = match (copies.is_empty(), held.is_empty()) {
                (true, _) => String::new(),
                (false, true) => " -".to_string(),
                (false, false) => format!(" {}", held.join(",")),
            };
            let seal = if signed {
                format!(" {:<8}", e.seal.word())
            } else {
                String::new()
            };
            let origin = match (origins, change(e)) {
                (false, _) => String::new(),
                (true, None) => format!(" {:<7}", "-"),
                (true, Some(c)) => format!(" {:<7}", c.word()),
            };
            let line = format!(
                "{:<16} {:<24} {:<17} {:<20} {:>10} {:>10} {:<8}{seal}{origin}{where_}",
                m.source,
                m.id,
                m.kind.to_string(),
                m.started_at.format("%Y-%m-%d %H:%M:%S"),
                human_bytes(m.size_plain),
                human_bytes(m.size_stored),
                match e.verification.as_ref().map(|v| v.result.as_str()) {
                    Some("pass") => "yes",
                    Some(_) => "FAILED",
                    None => "no",
                }
            );
            writeln!(out, "{}", line.trim_end()).map_err(print_error)?;
        }
        if listing.backups.is_empty() {
            eprintln!("no backups yet");
        }
        print_windows(&repo, &policy, source, &listing.backups, &mut out).await?;
        print_shards(&listing.backups, &mut out)?;
    }
    if !listing.incomplete.is_empty() {
        eprintln!(
            "note: {} interrupted run(s) without a manifest (not backups; prune removes them)",
            listing.incomplete.len()
        );
    }
    for (s, id, why) in &listing.damaged {
        eprintln!("warning: backup {id} of {s} is not listed: {why} (run `lifeboat check`)");
    }
    for e in &listing.backups {
        if e.verification.as_ref().and_then(|v| v.contained) == Some(false) {
            eprintln!(
                "warning: the latest verification of {} {} ran uncontained: its scratch server shared the host's network (ARCHITECTURE.md, containment)",
                e.manifest.source, e.manifest.id
            );
        }
    }
    for e in &listing.backups {
        if let Some(c) = change(e).filter(|c| c.moved.is_none()) {
            eprintln!(
                "warning: backup {} of {} was {} (RUNBOOK.md#source-changed)",
                e.manifest.id,
                e.manifest.source,
                c.words()
            );
        }
    }
    for (key, why) in &listing.untrusted_reports {
        eprintln!("warning: verification report {key} is not counted: {why} (RUNBOOK.md#untrusted-backup)");
    }
    Ok(())
}

/// The shards of each Redis Cluster source's newest backup, below the table.
fn print_shards(backups: &[lifeboat::repo::catalog::Entry], out: &mut impl Write) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for e in backups {
        let m = &e.manifest;
        if m.shards.is_empty() || !seen.insert(m.source.as_str()) {
            continue; // newest first: only the newest of each source
        }
        writeln!(
            out,
            "\n{}: {} shards in backup {}",
            m.source,
            m.shards.len(),
            m.id
        )
        .map_err(print_error)?;
        for s in &m.shards {
            let (plain, stored) = m
                .parts
                .iter()
                .find(|p| p.name == s.object)
                .map(|p| (human_bytes(p.size_plain), human_bytes(p.size_stored)))
                .unwrap_or_default();
            writeln!(
                out,
                "  {:<9} slots {:<16} {:>9} keys {:>10} plain {:>10} stored  from {} {}",
                s.name, s.slots, s.keys, plain, stored, s.role, s.node
            )
            .map_err(print_error)?;
        }
    }
    Ok(())
}

/// Each physical source's recoverable windows (from a base backup's end to the archive's end or
/// a gap), below the table.
async fn print_windows(
    repo: &Repository,
    policy: &lifeboat::policy::Policy,
    only: Option<&str>,
    backups: &[lifeboat::repo::catalog::Entry],
    out: &mut impl Write,
) -> Result<()> {
    use lifeboat::source::postgres_physical::{archive::Archive, pitr};
    for s in &policy.sources {
        if only.is_some_and(|o| o != s.name)
            || s.config.kind() != lifeboat::source::Kind::PostgresPhysical
        {
            continue;
        }
        let Some(size) = backups
            .iter()
            .filter(|e| e.manifest.source == s.name)
            .find_map(|e| e.manifest.base_backup.as_ref())
            .map(|b| b.wal_segment_size)
        else {
            continue;
        };
        let archive = Archive::read(repo, &s.name, size).await?;
        let windows = pitr::windows(backups, &s.name, &archive);
        let lag = archive
            .newest
            .map(|t| format!(" (WAL stored {} ago)", super::ago(t)))
            .unwrap_or_default();
        writeln!(out, "\n{}: recoverable{lag}", s.name).map_err(print_error)?;
        for w in &windows {
            writeln!(out, "  {w}").map_err(print_error)?;
        }
        if windows.iter().any(|w| w.gap_after) {
            writeln!(
                out,
                "  a gap in the WAL archive breaks the history: run `lifeboat check`"
            )
            .map_err(print_error)?;
        }
    }
    Ok(())
}
