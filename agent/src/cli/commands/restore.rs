//! `lifeboat restore`: one skeleton for every kind. The library plans (what will happen, and whether
//! the target holds data); this prints the plan, stops on `--dry-run`, asks for confirmation or
//! refuses (exit 14), then applies the plan and prints what it did.

use lifeboat::human_bytes;
use lifeboat::repo::Repository;
use lifeboat::restore::{self as r, Plan};
use lifeboat::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::super::RestoreArgs;
use super::{ago, load};

/// Plans, confirms, applies.
pub async fn restore(a: RestoreArgs, cancel: CancellationToken) -> Result<()> {
    let policy = load(&a.policy)?;
    let before = a.before.as_deref().map(parse_time).transpose()?;
    if a.jobs == 0 {
        return Err(Error::new(ErrorKind::Invalid, "--jobs must be at least 1"));
    }
    let repo = Repository::open(&policy).await?;
    let entry = repo.find(&a.source, &a.backup, before).await?;
    let options = r::Options {
        jobs: a.jobs,
        with_globals: a.with_globals,
        no_owner: a.no_owner,
        flush: a.flush,
        delete_extra: a.delete_extra,
        spool_dir: a.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
    };
    let request = r::Request {
        policy: &policy,
        repo: &repo,
        entry: &entry,
        to: &a.to,
        options: &options,
    };
    let plan = r::plan(&request).await?;
    if show_plan(&a, &entry.manifest, &plan) {
        return Ok(());
    }
    if let Some(refusal) = &plan.refusal {
        if !a.yes {
            confirm(
                a.json,
                &refusal.question,
                &refusal.word,
                refusal.error.clone(),
            )?;
        }
    }
    let identities = lifeboat::pipeline::read_identities(&super::identity_file(
        a.identity.as_deref(),
        &policy,
    )?)?;
    let progress: std::sync::Arc<dyn r::Progress> = std::sync::Arc::new(CliProgress::new(a.json));
    let interrupted = plan.interrupted;
    let mut document = plan.document.clone();
    let outcome = tokio::select! {
        res = plan.apply(&repo, &identities, progress.clone()) => res?,
        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, interrupted)),
    };
    drop(progress);
    if a.json {
        document["result"] = outcome.result;
        println!(
            "{}",
            serde_json::to_string_pretty(&document).unwrap_or_default()
        );
    } else {
        for line in &outcome.lines {
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// Prints a restore plan (human lines unless `json`); with --dry-run also the JSON plan, and
/// returns true: the caller stops there.
fn show_plan(a: &RestoreArgs, m: &lifeboat::repo::manifest::Manifest, plan: &Plan) -> bool {
    if !a.json {
        eprintln!("Restore plan");
        eprintln!(
            "  backup   {} of {} ({} ago, {}, {} stored)",
            m.id,
            m.source,
            ago(m.started_at),
            plan.verification,
            human_bytes(m.size_stored)
        );
        eprintln!("  target   {}", plan.target);
        eprintln!("  action   {}", plan.action);
        for (label, text) in &plan.details {
            eprintln!("  {label:<8} {text}");
        }
    }
    if a.dry_run {
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&plan.document).unwrap_or_default()
            );
        } else {
            eprintln!("dry run: nothing was changed");
        }
    }
    a.dry_run
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc());
        }
    }
    Err(Error::new(
        ErrorKind::Invalid,
        format!("--before `{s}` is not a time; write 2026-11-27T03:00:00Z or \"2026-11-27 03:00:00\" (UTC)"),
    ))
}

/// Asks for `word` on a terminal; anywhere else (or with --json) refuses.
fn confirm(json: bool, question: &str, word: &str, refusal: Error) -> Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() || json {
        return Err(refusal);
    }
    eprint!("{question}");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Error::failed(format!("reading the answer: {e}")))?;
    if line.trim() != word {
        return Err(Error::new(
            ErrorKind::Refused,
            "not confirmed; nothing was changed",
        ));
    }
    Ok(())
}

/// A progress bar on a terminal, one line per phase otherwise, nothing with --json.
struct CliProgress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl CliProgress {
    fn new(quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "  {msg:40} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        CliProgress { bar, quiet }
    }
}

impl lifeboat::restore::Progress for CliProgress {
    fn phase(&self, what: &str, total: Option<u64>) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(0);
                bar.set_length(total.unwrap_or(0));
                bar.set_message(what.to_string());
            }
            None if !self.quiet => eprintln!("  … {what}"),
            None => {}
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }
}

impl Drop for CliProgress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
