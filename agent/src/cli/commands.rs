//! The commands: each loads what it needs, calls the library and prints.

use std::io::Write;
use std::path::Path;

use lifeboat::policy::{self, LoadOptions, Policy};
use lifeboat::repo::Repository;
use lifeboat::{check, job, store, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::{Command, PolicyCommand, RestoreArgs};

pub async fn run(command: Command, cancel: CancellationToken) -> Result<()> {
    match command {
        Command::Backup { policy, source } => backup(&policy, &source, cancel).await,
        Command::List {
            policy,
            source,
            json,
        } => list(&policy, source.as_deref(), json).await,
        Command::Check {
            policy,
            source,
            read_data,
            json,
        } => check_cmd(&policy, source.as_deref(), read_data, json).await,
        Command::Policy {
            command:
                PolicyCommand::Check {
                    files,
                    allow_missing_env,
                },
        } => policy_check(&files, allow_missing_env),
        Command::Policy {
            command: PolicyCommand::Schema,
        } => {
            let text = serde_json::to_string_pretty(&policy::schema::schema())
                .map_err(|e| Error::failed(format!("cannot encode the schema: {e}")))?;
            writeln!(std::io::stdout().lock(), "{text}").map_err(print_error)
        }
        Command::Keygen => keygen(),
        Command::Restore(args) => restore(args, cancel).await,
        Command::Agent { policy, listen } => {
            let mut policy = load(&policy)?;
            if let Some(addr) = listen {
                policy.agent.listen = addr;
            }
            lifeboat::daemon::run(policy, cancel).await
        }
        Command::Prune {
            policy,
            source,
            dry_run,
            json,
        } => prune(&policy, source.as_deref(), dry_run, json).await,
        Command::Pin {
            policy,
            source,
            backup,
        } => pin(&policy, &source, &backup, true).await,
        Command::Unpin {
            policy,
            source,
            backup,
        } => pin(&policy, &source, &backup, false).await,
    }
}

fn load(path: &Path) -> Result<Policy> {
    Ok(policy::load(path, LoadOptions::default())?)
}

/// Sources no longer in the policy may still have backups: say so, but let the operator see them.
fn note_unknown_source(policy: &Policy, name: &str) {
    if policy.source(name).is_none() {
        eprintln!("note: `{name}` is not a source in this policy; showing what the repository holds for it");
    }
}

fn select_source(policy: &Policy, name: &str) -> Result<()> {
    if policy.source(name).is_none() {
        let names: Vec<&str> = policy.sources.iter().map(|s| s.name.as_str()).collect();
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "no source named `{name}` in the policy; it has: {}",
                names.join(", ")
            ),
        ));
    }
    Ok(())
}

async fn backup(path: &Path, only: &[String], cancel: CancellationToken) -> Result<()> {
    let policy = load(path)?;
    for name in only {
        select_source(&policy, name)?;
    }
    let repo = Repository::open_or_init(&policy).await?;
    store::probe(repo.store.as_ref()).await?;
    let selected: Vec<_> = policy
        .sources
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect();
    let mut failures: Vec<Error> = Vec::new();
    for source in &selected {
        if cancel.is_cancelled() {
            failures.push(Error::new(
                ErrorKind::Interrupted,
                format!("source {}: not started", source.name),
            ));
            continue;
        }
        match job::backup(&repo, &policy, source, chrono::Utc::now(), cancel.clone()).await {
            Ok(m) => eprintln!(
                "{}: backup {} stored ({} plain, {} stored)",
                m.source,
                m.id,
                human_bytes(m.size_plain),
                human_bytes(m.size_stored)
            ),
            Err(e) => {
                if selected.len() > 1 {
                    eprintln!("error: {e}");
                }
                failures.push(e);
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 if selected.len() == 1 => Err(failures.remove(0)),
        n if n == selected.len() => {
            let kind = if failures.iter().any(|e| e.kind == ErrorKind::Interrupted) {
                ErrorKind::Interrupted
            } else {
                ErrorKind::Failed
            };
            Err(Error::new(kind, format!("all {n} backups failed")))
        }
        n => Err(Error::new(
            ErrorKind::Partial,
            format!("{n} of {} backups failed", selected.len()),
        )),
    }
}

async fn list(path: &Path, source: Option<&str>, json: bool) -> Result<()> {
    let policy = load(path)?;
    if let Some(s) = source {
        note_unknown_source(&policy, s);
    }
    let repo = Repository::open(&policy).await?;
    let listing = repo.list(source).await?;
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
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&items)
            .map_err(|e| Error::failed(format!("cannot encode the listing: {e}")))?;
        writeln!(out, "{text}").map_err(print_error)?;
    } else {
        writeln!(
            out,
            "{:<16} {:<24} {:<9} {:<20} {:>10} {:>10} {:<8}",
            "SOURCE", "ID", "KIND", "STARTED (UTC)", "PLAIN", "STORED", "VERIFIED"
        )
        .map_err(print_error)?;
        for e in &listing.backups {
            let m = &e.manifest;
            writeln!(
                out,
                "{:<16} {:<24} {:<9} {:<20} {:>10} {:>10} {:<8}",
                m.source,
                m.id,
                m.kind,
                m.started_at.format("%Y-%m-%d %H:%M:%S"),
                human_bytes(m.size_plain),
                human_bytes(m.size_stored),
                match e.verification.as_ref().map(|v| v.result.as_str()) {
                    Some("pass") => "yes",
                    Some(_) => "FAILED",
                    None => "no",
                }
            )
            .map_err(print_error)?;
        }
        if listing.backups.is_empty() {
            eprintln!("no backups yet");
        }
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
    Ok(())
}

async fn check_cmd(path: &Path, source: Option<&str>, read_data: bool, json: bool) -> Result<()> {
    let policy = load(path)?;
    if let Some(s) = source {
        note_unknown_source(&policy, s);
    }
    let repo = Repository::open(&policy).await?;
    let report = check::check(&repo, source, read_data).await?;
    if let lifeboat::policy::Location::S3(s3) = &policy.repository.location {
        match (repo.store.lock_enabled().await, s3.object_lock) {
            (Ok(Some(false)), Some(_)) => eprintln!(
                "warning: repository.object_lock is set but the bucket {} has Object Lock disabled: backups will fail to upload; create the bucket with Object Lock or remove object_lock",
                s3.bucket
            ),
            (Ok(Some(true)), None) => eprintln!(
                "warning: the bucket {} has Object Lock enabled but the policy sets no object_lock: only the bucket's default retention, if any, protects backups; set repository.object_lock to make it explicit",
                s3.bucket
            ),
            (Err(e), _) => eprintln!("warning: cannot read the bucket's Object Lock configuration: {e}"),
            _ => {}
        }
    }
    if json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::failed(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else {
        eprintln!(
            "checked {} backup(s), {} object(s){}",
            report.backups,
            report.objects,
            if read_data {
                format!(", {} re-hashed", human_bytes(report.bytes_read))
            } else {
                String::new()
            }
        );
        for i in &report.incomplete {
            eprintln!("note: {i} has no manifest: an interrupted run, not a backup");
        }
        for u in &report.pending_uploads {
            eprintln!("note: unfinished upload of {u}");
        }
    }
    report.into_result().map(|r| {
        if !json {
            eprintln!(
                "no problems found{}",
                if read_data {
                    ""
                } else {
                    " (sizes only; --read-data re-hashes)"
                }
            );
        }
        drop(r)
    })
}

fn policy_check(files: &[std::path::PathBuf], allow_missing_env: bool) -> Result<()> {
    let mut bad = 0;
    for f in files {
        match policy::load(f, LoadOptions { allow_missing_env }) {
            Ok(p) => {
                let missing = if p.missing_env.is_empty() {
                    String::new()
                } else {
                    format!(" (unset here: {})", p.missing_env.join(", "))
                };
                eprintln!(
                    "{}: ok, {} source(s){missing}",
                    f.display(),
                    p.sources.len()
                );
            }
            Err(e) => {
                bad += 1;
                eprintln!("{e}");
            }
        }
    }
    if bad > 0 {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("{bad} of {} policy file(s) invalid", files.len()),
        ));
    }
    Ok(())
}

fn keygen() -> Result<()> {
    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# created: {}\n# public key: {recipient}\n{}",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        identity.to_string().expose_secret()
    )
    .map_err(print_error)?;
    eprintln!("Public key: {recipient}");
    Ok(())
}

use lifeboat::human_bytes;

fn print_error(e: std::io::Error) -> Error {
    Error::failed(format!("cannot write to stdout: {e}"))
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

fn ago(t: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (chrono::Utc::now() - t).num_seconds().max(0) as u64;
    // Whole minutes once it is a minute or more: seconds would be noise.
    let secs = if secs >= 60 { secs - secs % 60 } else { secs };
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

async fn restore(a: RestoreArgs, cancel: CancellationToken) -> Result<()> {
    use lifeboat::restore as r;
    let policy = load(&a.policy)?;
    let before = a.before.as_deref().map(parse_time).transpose()?;
    if a.jobs == 0 {
        return Err(Error::new(ErrorKind::Invalid, "--jobs must be at least 1"));
    }
    let repo = Repository::open(&policy).await?;
    let entry = repo.find(&a.source, &a.backup, before).await?;
    if entry.manifest.kind == "redis" {
        return restore_redis(&a, &policy, &repo, &entry, cancel).await;
    }
    if entry.manifest.kind == "objects" {
        return restore_objects(&a, &policy, &repo, &entry, cancel).await;
    }
    if a.delete_extra {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--delete-extra applies to objects restores into a directory",
        ));
    }
    if a.flush {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--flush applies to Redis restores; a PostgreSQL restore goes into a new or empty database",
        ));
    }
    let m = &entry.manifest;
    let (cfg, db) = r::target_config(&a.to)?;
    let target = lifeboat::source::postgres::Postgres::new(cfg.clone());
    let state = r::inspect_target(&target, &db).await?;
    let verification = verification_state(&entry);
    let action = if !state.exists {
        format!("create database {db}, then restore into it")
    } else if state.has_data() {
        format!(
            "database {db} already holds {} relation(s) and {} large object(s): restoring would mix with them",
            state.relations, state.large_objects
        )
    } else {
        format!("restore into the existing, empty database {db}")
    };
    let plan = serde_json::json!({
        "backup": {
            "id": m.id, "source": m.source, "started_at": m.started_at, "finished_at": m.finished_at,
            "size_plain": m.size_plain, "size_stored": m.size_stored, "verification": verification,
            "source_version": m.source_version,
        },
        "target": { "url": cfg.url_redacted, "database": db, "exists": state.exists,
                    "relations": state.relations, "large_objects": state.large_objects },
        "with_globals": a.with_globals,
        "jobs": a.jobs,
        "action": action,
    });
    let roles = a
        .with_globals
        .then_some("replayed from the backup's globals (no passwords: set them afterwards)");
    if show_plan(
        &a,
        m,
        &verification,
        &cfg.url_redacted,
        &action,
        roles,
        &plan,
    ) {
        return Ok(());
    }
    if state.has_data() && !a.yes {
        let refusal = Error::new(
            ErrorKind::Refused,
            format!("database {db} already holds data; refusing to restore into it (nothing was changed)"),
        )
        .hint("restore into a new database name, or pass --yes if mixing is really intended (RUNBOOK.md#restore)");
        confirm(
            a.json,
            &format!("Type the database name ({db}) to restore into it anyway: "),
            &db,
            refusal,
        )?;
    }
    let identity = identity_file(&a, &policy)?;
    let identities = lifeboat::pipeline::read_identities(&identity)?;
    let how = r::PgRestore {
        with_globals: a.with_globals,
        jobs: a.jobs,
        spool_dir: a.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
        no_owner: a.no_owner,
    };
    let started = std::time::Instant::now();
    let progress: std::sync::Arc<dyn r::Progress> = std::sync::Arc::new(CliProgress::new(a.json));
    let created = tokio::select! {
        res = r::restore_postgres(&repo, m, &target, &db, &how, &identities, progress.clone()) => res?,
        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "interrupted; the target may hold a partial restore")),
    };
    let seconds = started.elapsed().as_secs_f64();
    drop(progress);
    if a.json {
        let mut doc = plan;
        doc["result"] = serde_json::json!({ "restored": true, "created_database": created, "seconds": seconds });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        eprintln!("restored backup {} into {db} in {seconds:.1} s", m.id);
    }
    Ok(())
}

/// Prints a restore plan (human lines unless `json`); with --dry-run also the JSON plan, and
/// returns true: the caller stops there.
fn show_plan(
    a: &RestoreArgs,
    m: &lifeboat::repo::manifest::Manifest,
    verification: &str,
    target: &str,
    action: &str,
    roles: Option<&str>,
    plan: &serde_json::Value,
) -> bool {
    if !a.json {
        eprintln!("Restore plan");
        eprintln!(
            "  backup   {} of {} ({} ago, {}, {} stored)",
            m.id,
            m.source,
            ago(m.started_at),
            verification,
            human_bytes(m.size_stored)
        );
        eprintln!("  target   {target}");
        eprintln!("  action   {action}");
        if let Some(r) = roles {
            eprintln!("  roles    {r}");
        }
    }
    if a.dry_run {
        if a.json {
            println!("{}", serde_json::to_string_pretty(plan).unwrap_or_default());
        } else {
            eprintln!("dry run: nothing was changed");
        }
    }
    a.dry_run
}

fn verification_state(entry: &lifeboat::repo::catalog::Entry) -> String {
    match &entry.verification {
        Some(v) if v.result == "pass" => "verified".to_string(),
        Some(_) => "LAST VERIFICATION FAILED".to_string(),
        None => "never verified".to_string(),
    }
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

async fn restore_redis(
    a: &RestoreArgs,
    policy: &Policy,
    repo: &Repository,
    entry: &lifeboat::repo::catalog::Entry,
    cancel: CancellationToken,
) -> Result<()> {
    use lifeboat::restore::{self as r, RedisDestination};
    use lifeboat::source::redis_load::Target;
    let m = &entry.manifest;
    let bin_dir = policy.sources.iter().find_map(|s| match &s.config {
        policy::SourceConfig::Redis(c) if s.name == m.source => c.bin_dir.clone(),
        _ => None,
    });
    if a.jobs != 1 || a.with_globals || a.no_owner {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--jobs, --with-globals and --no-owner apply to PostgreSQL restores",
        ));
    }
    let live = a.to.starts_with("redis://") || a.to.starts_with("rediss://");
    let (destination, shown, existing, action) = if live {
        let target = Target::parse(&a.to)?;
        let keyspace = target.keyspace().await?;
        let keys: u64 = keyspace.values().map(|v| v.0).sum();
        let action = match (keys, a.flush) {
            (0, _) => "load the snapshot into a scratch redis-server, then copy every key with its TTL (RESTORE … REPLACE)".to_string(),
            (n, true) => format!("FLUSHALL: delete the {n} key(s) the target holds, then copy every key of the backup with its TTL"),
            (n, false) => format!("the target holds {n} key(s): keys of the same name are replaced, the others stay (--flush deletes them first)"),
        };
        let shown = target.shown.clone();
        (
            RedisDestination::Live {
                target,
                flush: a.flush,
            },
            shown,
            keys,
            action,
        )
    } else {
        if a.flush {
            return Err(Error::new(
                ErrorKind::Invalid,
                "--flush applies to a live target (redis://…), not to a directory",
            ));
        }
        let dir = std::path::PathBuf::from(&a.to);
        if dir.exists() && !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("--to {}: not a directory", dir.display()),
            )
            .hint("give a directory (dump.rdb is written into it) or redis://HOST:PORT"));
        }
        if !a.dry_run {
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::failed(format!("--to {}: cannot create it: {e}", dir.display()))
            })?;
        }
        let file = dir.join("dump.rdb");
        let exists = file.exists();
        let action = if exists {
            format!("replace {} (it exists)", file.display())
        } else {
            format!("write {}", file.display())
        };
        (
            RedisDestination::Dir(dir.clone()),
            dir.display().to_string(),
            u64::from(exists),
            action,
        )
    };
    let verification = verification_state(entry);
    let plan = serde_json::json!({
        "backup": {
            "id": m.id, "source": m.source, "started_at": m.started_at, "finished_at": m.finished_at,
            "size_plain": m.size_plain, "size_stored": m.size_stored, "verification": verification,
            "source_version": m.source_version,
        },
        "target": { "to": shown, "live": live, "holds_data": existing > 0 },
        "flush": a.flush,
        "action": action,
    });
    if show_plan(a, m, &verification, &shown, &action, None, &plan) {
        return Ok(());
    }
    if existing > 0 && !a.yes {
        let refusal = Error::new(
            ErrorKind::Refused,
            format!("{shown} already holds data; refusing to restore into it (nothing was changed)"),
        )
        .hint("restore into an empty server or directory, or pass --yes (and --flush to delete what the server holds first) (RUNBOOK.md#restore)");
        confirm(
            a.json,
            "Type yes to restore into it anyway: ",
            "yes",
            refusal,
        )?;
    }
    let identity = identity_file(a, policy)?;
    let identities = lifeboat::pipeline::read_identities(&identity)?;
    let spool_dir = a.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let started = std::time::Instant::now();
    let progress: std::sync::Arc<dyn r::Progress> = std::sync::Arc::new(CliProgress::new(a.json));
    let done = tokio::select! {
        res = r::restore_redis(repo, m, &destination, bin_dir.as_deref(), &spool_dir, &identities, progress.clone()) => res?,
        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "interrupted; the target may hold a partial restore")),
    };
    let seconds = started.elapsed().as_secs_f64();
    drop(progress);
    if a.json {
        let mut doc = plan;
        doc["result"] = serde_json::json!({ "restored": true, "seconds": seconds, "file": done.file, "moved": done.moved });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(());
    }
    match (&done.file, &done.moved) {
        (Some(file), _) => {
            eprintln!(
                "restored backup {} into {} in {seconds:.1} s",
                m.id,
                file.display()
            );
            eprintln!(
                "  next: stop the server, put this file at its dir/dbfilename, and start it with"
            );
            eprintln!(
                "        appendonly no (with AOF on, Redis loads the AOF instead of dump.rdb);"
            );
            eprintln!(
                "        then CONFIG SET appendonly yes if you use AOF (RUNBOOK.md#restore-redis)"
            );
        }
        (None, Some(moved)) => {
            let total: u64 = moved.keys.values().sum();
            eprintln!(
                "restored backup {} into {shown}: {total} key(s) in {} database(s) in {seconds:.1} s{}",
                m.id,
                moved.keys.len(),
                if moved.expired > 0 {
                    format!(", {} key(s) skipped because their TTL had run out", moved.expired)
                } else {
                    String::new()
                }
            );
        }
        _ => {}
    }
    Ok(())
}

async fn restore_objects(
    a: &RestoreArgs,
    policy: &Policy,
    repo: &Repository,
    entry: &lifeboat::repo::catalog::Entry,
    cancel: CancellationToken,
) -> Result<()> {
    use lifeboat::restore as r;
    let m = &entry.manifest;
    if a.jobs != 1 || a.with_globals || a.no_owner || a.flush {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--jobs, --with-globals, --no-owner and --flush do not apply to objects restores",
        ));
    }
    let (target, shown, existing) = match a.to.strip_prefix("s3://") {
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("--to {}: names no bucket; write s3://BUCKET/PREFIX/", a.to),
                ));
            }
            let cfg = restore_s3_config(policy, &m.source, bucket, prefix);
            let store: std::sync::Arc<dyn lifeboat::store::ObjectStore> =
                std::sync::Arc::new(lifeboat::store::s3::S3Store::new(&cfg).await?);
            let existing = store
                .list("")
                .await
                .map_err(|e| Error::from(e).context(format!("listing {}", a.to)))?
                .len();
            let shown = a.to.clone();
            (
                r::ObjectsTarget::Store(store, shown.clone()),
                shown,
                existing,
            )
        }
        None => {
            let dir = match a.to.strip_prefix("dir://") {
                Some(d) => std::path::PathBuf::from(d),
                None if a.to.contains("://") => {
                    return Err(Error::new(
                        ErrorKind::Invalid,
                        format!(
                            "--to {}: objects restore into a directory (dir:///path or a path) or a bucket (s3://bucket/prefix/)",
                            a.to
                        ),
                    ))
                }
                None => std::path::PathBuf::from(&a.to),
            };
            let existing = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            let shown = dir.display().to_string();
            (r::ObjectsTarget::Dir(dir), shown, existing)
        }
    };
    let action = match (existing, a.delete_extra) {
        (0, _) => format!("write the snapshot's files into {shown}"),
        (_, false) => format!(
            "{shown} holds {existing} entr(ies): files of the same path are replaced, others stay (--delete-extra removes them)"
        ),
        (_, true) => format!(
            "{shown} holds {existing} entr(ies): files of the same path are replaced, and everything the snapshot does not hold is DELETED"
        ),
    };
    let verification = verification_state(entry);
    let plan = serde_json::json!({
        "backup": { "id": m.id, "source": m.source, "started_at": m.started_at,
                    "size_stored": m.size_stored, "verification": verification },
        "target": { "to": shown, "holds_data": existing > 0 },
        "action": action,
    });
    if show_plan(a, m, &verification, &shown, &action, None, &plan) {
        return Ok(());
    }
    if existing > 0 && !a.yes {
        let refusal = Error::new(
            ErrorKind::Refused,
            format!("{shown} is not empty; refusing to restore into it (nothing was changed)"),
        )
        .hint("restore into a new directory or prefix, or pass --yes to replace same-named files (RUNBOOK.md#restore-objects)");
        confirm(
            a.json,
            "Type yes to restore into it anyway: ",
            "yes",
            refusal,
        )?;
    }
    let identities = lifeboat::pipeline::read_identities(&identity_file(a, policy)?)?;
    let spool_dir = a.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let started = std::time::Instant::now();
    let progress: std::sync::Arc<dyn r::Progress> = std::sync::Arc::new(CliProgress::new(a.json));
    let done = tokio::select! {
        res = r::restore_objects(repo, m, &target, a.delete_extra, &spool_dir, &identities, progress.clone()) => res?,
        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "interrupted; the target may hold part of the files (each one whole)")),
    };
    let seconds = started.elapsed().as_secs_f64();
    drop(progress);
    if a.json {
        let mut doc = plan;
        doc["result"] = serde_json::json!({ "restored": done, "seconds": seconds });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        eprintln!(
            "restored backup {} into {}: {} file(s), {} director(ies), {} in {seconds:.1} s{}",
            m.id,
            shown,
            done.files,
            done.dirs,
            human_bytes(done.bytes),
            if a.delete_extra {
                format!("; {} extra path(s) deleted", done.deleted)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// The S3 settings for restoring into `bucket`/`prefix`: the source's own endpoint, region and
/// addressing when it is an S3 source, else the repository's when that is S3; credentials come
/// from the environment as for both.
fn restore_s3_config(
    policy: &Policy,
    source: &str,
    bucket: &str,
    prefix: &str,
) -> lifeboat::policy::S3Config {
    use lifeboat::policy::{Location, ObjectsFrom, SourceConfig};
    let from_source = policy
        .sources
        .iter()
        .find(|s| s.name == source)
        .and_then(|s| match &s.config {
            SourceConfig::Objects(o) => match &o.from {
                ObjectsFrom::S3(c) => Some(c.clone()),
                ObjectsFrom::Dir(_) => None,
            },
            _ => None,
        });
    let base = from_source.or_else(|| match &policy.repository.location {
        Location::S3(c) => Some(c.clone()),
        _ => None,
    });
    let mut cfg = base.unwrap_or_else(|| lifeboat::policy::S3Config {
        bucket: String::new(),
        prefix: String::new(),
        endpoint: None,
        region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        force_path_style: false,
        checksums: lifeboat::policy::ChecksumMode::WhenRequired,
        storage_class: None,
        object_lock: None,
    });
    cfg.bucket = bucket.to_string();
    cfg.prefix = prefix.trim_matches('/').to_string();
    cfg.storage_class = None;
    cfg.object_lock = None;
    cfg
}

fn identity_file(a: &RestoreArgs, policy: &Policy) -> Result<std::path::PathBuf> {
    a.identity
        .clone()
        .or_else(|| policy.encryption.identity_file.clone())
        .ok_or_else(|| {
            Error::new(ErrorKind::Credential, "no age identity to decrypt with").hint(
                "pass --identity FILE, set LIFEBOAT_IDENTITY_FILE or encryption.identity_file",
            )
        })
}

async fn prune(path: &Path, source: Option<&str>, dry_run: bool, json: bool) -> Result<()> {
    let policy = load(path)?;
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
        match lifeboat::retention::prune(&repo, &policy, src, now, dry_run).await {
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
                    if let Some(b) = &r.blobs {
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

fn print_collection(b: &lifeboat::blobs::Collection, dry_run: bool) {
    if let Some(why) = &b.skipped {
        eprintln!("  blobs: none collected: {why}");
        return;
    }
    eprintln!(
        "  blobs: {} stored, {} named by snapshots; {} {} ({}){}",
        b.stored,
        b.referenced,
        if dry_run { "would delete" } else { "deleted" },
        b.deleted,
        indicatif::HumanBytes(b.deleted_bytes),
        if b.young > 0 {
            format!(", {} unreferenced but younger than a day kept", b.young)
        } else {
            String::new()
        }
    );
    if b.missing > 0 {
        eprintln!(
            "  warning: {} blob(s) named by snapshots are not stored; run `lifeboat check --read-data`",
            b.missing
        );
    }
}

async fn pin(path: &Path, source: &str, backup: &str, on: bool) -> Result<()> {
    let policy = load(path)?;
    let repo = Repository::open(&policy).await?;
    let entry = repo.find(source, backup, None).await?;
    let key = lifeboat::repo::layout::pin(source, &entry.manifest.id);
    if on {
        repo.store
            .put(&key, bytes::Bytes::from_static(b"{}"))
            .await
            .map_err(Error::from)?;
        eprintln!(
            "pinned {source} {}: prune keeps it until `lifeboat unpin`",
            entry.manifest.id
        );
    } else {
        repo.store.delete(&key).await.map_err(Error::from)?;
        eprintln!("unpinned {source} {}", entry.manifest.id);
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
