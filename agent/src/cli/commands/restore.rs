//! `lifeboat restore`: one skeleton for every kind. The library plans (what will happen, and whether
//! the target holds data); this prints the plan, stops on `--dry-run`, asks for confirmation or
//! refuses (exit 14), then applies the plan and prints what it did.

use lifeboat::human_bytes;
use lifeboat::repo::signing::Seal;
use lifeboat::repo::Repository;
use lifeboat::restore::{self as r, Plan};
use lifeboat::source::postgres_physical::pitr;
use lifeboat::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::super::RestoreArgs;
use super::{ago, load_at};

/// Plans, confirms, applies.
pub async fn restore(a: RestoreArgs, cancel: CancellationToken) -> Result<()> {
    let policy = load_at(&a.policy, &a.at)?;
    let before = a
        .before
        .as_deref()
        .map(|s| parse_time("--before", s))
        .transpose()?;
    if a.jobs == 0 {
        return Err(Error::new(ErrorKind::Invalid, "--jobs must be at least 1"));
    }
    let target = recovery_target(&a)?;
    if a.allow_unsigned && (a.backup == "latest" || before.is_some()) {
        // A forged backup is usually the newest: break glass only for the one named.
        return Err(Error::new(
            ErrorKind::Invalid,
            "--allow-unsigned needs --backup ID: it never picks a backup for you",
        )
        .hint("`lifeboat list` and `lifeboat check` name the backups; pick the one you can vouch for (RUNBOOK.md#untrusted-backup)"));
    }
    let mut repo = Repository::open(&policy).await?;
    if a.allow_unsigned {
        repo = repo.allowing_unsigned();
    }
    // The newest base backup before the target, from one listing the plan reuses.
    let (entry, backups) = match &target {
        Some(t) if a.backup == "latest" && before.is_none() => {
            let backups = repo.list(Some(&a.source)).await?.backups;
            let entry = pitr::choose(&repo, &backups, &a.source, t).await?.clone();
            (entry, backups)
        }
        _ => (repo.find(&a.source, &a.backup, before).await?, Vec::new()),
    };
    let recovery = match target {
        Some(target) => Some(pitr::Recovery {
            target,
            timeline: a.timeline,
            restore_command: wal_fetch_command(&a, &policy, &entry.manifest)?,
            backups,
        }),
        None => None,
    };
    let options = r::Options {
        jobs: a.jobs,
        with_globals: a.with_globals,
        no_owner: a.no_owner,
        flush: a.flush,
        delete_extra: a.delete_extra,
        path: a.path.clone(),
        spool_dir: a.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
        recovery,
        start: a.start.then_some(a.port),
    };
    let request = r::Request {
        policy: &policy,
        repo: &repo,
        entry: &entry,
        to: &a.to,
        options: &options,
    };
    let mut plan = r::plan(&request).await?;
    plan.document["seal"] = serde_json::json!(entry.seal);
    if let Some(line) = seal_line(&entry.seal) {
        plan.details.insert(0, ("signed", line));
    }
    plan.document["origin"] = serde_json::json!(entry.manifest.origin);
    if let Some(change) = entry.origin_change(policy.source(&a.source).and_then(|s| s.moved_at)) {
        let warning = if change.moved.is_some() {
            String::new()
        } else {
            "WARNING: ".to_string()
        };
        plan.details
            .insert(0, ("origin", format!("{warning}{}", change.words())));
        plan.document["origin_change"] = serde_json::json!(change);
    }
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
    let interrupted = plan.interrupted.clone();
    let mut document = plan.document.clone();
    // What the restore itself asks of the repository, for the JSON result.
    let (repo, requests) = repo.counted();
    let outcome = tokio::select! {
        res = plan.apply(&repo, &identities, progress.clone()) => res?,
        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, interrupted)),
    };
    drop(progress);
    if a.json {
        document["result"] = outcome.result;
        document["requests"] = serde_json::json!(requests.counts());
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

/// The plan's line on who published the backup, unless nothing is checked.
fn seal_line(seal: &Seal) -> Option<String> {
    match seal {
        Seal::Unchecked => None,
        Seal::Signed { key } => Some(format!("yes, by trusted key {key}")),
        Seal::Legacy => Some(
            "NO: stored before signing.unsigned_before, taken before signing existed".into(),
        ),
        Seal::Untrusted { why } => Some(format!(
            "NO, restoring only because of --allow-unsigned: the manifest {why}; no trusted key vouches for what it restores"
        )),
    }
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

/// `--time`, `--lsn` or `--latest`, read.
fn recovery_target(a: &RestoreArgs) -> Result<Option<pitr::Target>> {
    if let Some(t) = &a.time {
        return Ok(Some(pitr::Target::Time(parse_time("--time", t)?)));
    }
    if let Some(l) = &a.lsn {
        let lsn = l
            .parse()
            .map_err(|why: String| Error::new(ErrorKind::Invalid, format!("--lsn: {why}")))?;
        return Ok(Some(pitr::Target::Lsn(lsn)));
    }
    Ok(a.latest.then_some(pitr::Target::Latest))
}

/// Segments `wal fetch` fetches ahead of recovery.
const PREFETCH: u32 = 8;

/// The `restore_command` a restored cluster recovers with: this binary's `wal fetch`, with
/// absolute paths (the server runs it in its data directory, as its own OS user), and the
/// cluster's segment size, so that no fetch has to read the base backups to learn it.
fn wal_fetch_command(
    a: &RestoreArgs,
    policy: &lifeboat::policy::Policy,
    base: &lifeboat::repo::manifest::Manifest,
) -> Result<String> {
    let absolute = |p: &std::path::Path, what: &str| {
        std::fs::canonicalize(p).map_err(|e| Error::failed(format!("{what} {}: {e}", p.display())))
    };
    if let lifeboat::policy::Location::Fs { root } = &policy.repository.location {
        if root.is_relative() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "repository.url file://{} is relative, and the restored server runs its restore_command in its data directory, where it would find no archive",
                    root.display()
                ),
            )
            .hint("write the repository as an absolute path in the policy (file:///var/backups/lifeboat) and run the restore again (RUNBOOK.md#to-a-point-in-time)"));
        }
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::failed(format!("cannot tell where this lifeboat binary is: {e}")))?;
    let identity = super::identity_file(a.identity.as_deref(), policy)?;
    let mut words = vec![
        exe.display().to_string(),
        "wal".into(),
        "fetch".into(),
        "--policy".into(),
        absolute(&a.policy, "policy")?.display().to_string(),
        "--source".into(),
        a.source.clone(),
    ];
    if let Some(copy) = &a.at.copy {
        words.extend(["--repository".into(), copy.clone()]);
    }
    words.extend([
        "--identity".into(),
        absolute(&identity, "identity")?.display().to_string(),
    ]);
    if let Some(b) = &base.base_backup {
        words.extend(["--segment-size".into(), b.wal_segment_size.to_string()]);
        words.extend(["--system-id".into(), b.system_identifier.clone()]);
    }
    // While the server replays one segment, the next ones are fetched and checked.
    words.extend(["--prefetch".into(), PREFETCH.to_string()]);
    let mut command: Vec<String> = words.iter().map(|w| pitr::shell_word(w)).collect();
    command.extend(["%f".into(), "%p".into()]);
    Ok(command.join(" "))
}

fn parse_time(flag: &str, s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    // As PostgreSQL prints it (`select now()`): fractions, and an offset of hours only.
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = chrono::DateTime::parse_from_str(s, f) {
            return Ok(t.with_timezone(&chrono::Utc));
        }
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc());
        }
    }
    Err(Error::new(
        ErrorKind::Invalid,
        format!("{flag} `{s}` is not a time; write 2026-11-27T03:00:00Z, \"2026-11-27 03:00:00\" (UTC) or \"2026-11-27 03:00:00.25+02\""),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_operators_and_postgresql_write_them() {
        let utc = |s: &str| parse_time("--time", s).unwrap().to_rfc3339();
        assert_eq!(utc("2026-11-27T03:00:00Z"), "2026-11-27T03:00:00+00:00");
        assert_eq!(utc("2026-11-27 03:00:00"), "2026-11-27T03:00:00+00:00");
        assert_eq!(utc("2026-11-27 03:00"), "2026-11-27T03:00:00+00:00");
        assert_eq!(
            utc("2026-11-27 05:00:00.345316+02"),
            "2026-11-27T03:00:00.345316+00:00"
        );
        assert_eq!(
            utc("2026-11-27 03:00:00.5-01:30"),
            "2026-11-27T04:30:00.500+00:00"
        );
        let e = parse_time("--time", "yesterday").unwrap_err();
        assert!(e.message.starts_with("--time `yesterday`"), "{}", e.message);
    }
}
