//! `lifeboat prune`: the retention plan with a reason per backup, then (unless `--dry-run`) applied.

use lifeboat::repo::Repository;
use lifeboat::retention;
use lifeboat::{Error, ErrorKind, Result};

use lifeboat::policy::Policy;

use super::select_source;

pub async fn prune(policy: Policy, source: Option<&str>, dry_run: bool, json: bool) -> Result<()> {
    if let Some(s) = source {
        select_source(&policy, s)?;
    }
    let repo = Repository::open(&policy).await?;
    let now = chrono::Utc::now();
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for src in policy
        .sources
        .iter()
        .filter(|s| source.is_none_or(|n| n == s.name))
    {
        let (repo, requests) = repo.counted();
        let pruned = match retention::plan_prune(&repo, &policy, src, now).await {
            Ok(plan) if dry_run => plan.preview(&repo, &policy, src).await,
            Ok(plan) => retention::apply_prune(&repo, &policy, src, plan).await,
            Err(e) => Err(e),
        }
        .map(|mut r| {
            r.requests = requests.counts();
            r
        });
        match pruned {
            Ok(r) => {
                if !json {
                    eprintln!(
                        "{}{}:",
                        src.name,
                        if dry_run {
                            " (dry run: nothing deleted)"
                        } else {
                            ""
                        }
                    );
                    for d in &r.decisions {
                        eprintln!(
                            "  {} {}  {}  {}",
                            if d.keep { "keep  " } else { "delete" },
                            d.id,
                            d.started_at.format("%Y-%m-%d %H:%M"),
                            d.reasons.join(", ")
                        );
                    }
                    for id in &r.swept_incomplete {
                        eprintln!(
                            "  {} {id}  interrupted run older than a day",
                            if dry_run { "sweep " } else { "swept " }
                        );
                    }
                    for k in &r.aborted_uploads {
                        eprintln!("  aborted unfinished upload {k}");
                    }
                    if let Some(why) = &r.uploads_unlisted {
                        eprintln!("  warning: unfinished uploads were not listed, the server refused: {why} (RUNBOOK.md#storage-errors)");
                    }
                    if let Some(b) = &r.collected {
                        print_collection(b, dry_run);
                    }
                }
                reports.push(r);
            }
            Err(e) => {
                eprintln!("error: {e}");
                failures.push(e);
            }
        }
    }
    if json {
        let text = serde_json::to_string_pretty(&reports)
            .map_err(|e| Error::failed(format!("cannot encode: {e}")))?;
        println!("{text}");
    }
    match failures.len() {
        0 => Ok(()),
        1 if reports.is_empty() => Err(failures.remove(0)),
        n => Err(Error::new(
            if reports.is_empty() {
                failures[0].kind
            } else {
                ErrorKind::Partial
            },
            format!("{n} source(s) not pruned"),
        )),
    }
}

fn print_collection(b: &lifeboat::collect::Collection, dry_run: bool) {
    if let Some(why) = &b.skipped {
        eprintln!("  {}: none collected: {why}", b.what);
        return;
    }
    eprintln!(
        "  {}: {} stored, {} {}; {} {} ({}){}",
        b.what,
        b.stored,
        b.referenced,
        b.referenced_as,
        if dry_run { "would delete" } else { "deleted" },
        b.deleted,
        indicatif::HumanBytes(b.deleted_bytes),
        if b.young > 0 {
            format!(", {} unreferenced but younger than a day kept", b.young)
        } else {
            String::new()
        }
    );
    if b.sparse > 0 {
        eprintln!(
            "  {}: {} pack(s) less than half named by the newest snapshots: the next backups store those contents again, and the packs go once no snapshot names them",
            b.what, b.sparse
        );
    }
    if b.missing > 0 {
        eprintln!(
            "  warning: {} of the {} {} are not stored; run `lifeboat check --read-data`",
            b.missing, b.what, b.referenced_as
        );
    }
}
