//! Verifying a base backup, the steps the verifier's skeleton runs:
//!
//! 1. The base backup is downloaded to a spool file and its SHA-256 checked against the manifest
//!    (exit 13 on any difference) before anything is decrypted; the fingerprint too.
//! 2. It is unpacked into a scratch directory, and `pg_verifybackup` checks every file against
//!    the server's own `backup_manifest` and parses the WAL the backup needs.
//! 3. The drill: when the source's WAL archive reaches past the backup's end, the chain from
//!    there to the archive's end must be whole (a gap is exit 13, naming it). While the server
//!    replays, a feeder fetches each segment into the scratch a few ahead of it, each checked
//!    against its name (exit 13 on damage, and recovery stops), and recovery takes each one
//!    away as it reads it: the scratch never holds the whole archive.
//! 4. A server starts on the files, as the unprivileged OS user, without network, with its own
//!    configuration set aside: it must recover from `backup_label` and replay the archived WAL to
//!    a record chosen at random inside the window (`pg_waldump` lists a random segment's
//!    records), stop exactly there and shut down still in recovery; then start again, replay on
//!    to the archive's end, promote and accept connections. Where each replay stopped is a
//!    check, and the report's `replay` holds both targets, where they were reached, and the
//!    replay rate. A point-in-time restore is exactly this with the operator's target.
//! 5. `pg_amcheck` reads every table and B-tree index of every database. The restored cluster
//!    is compared with the fingerprint (system identifier, out of recovery, every database
//!    there and readable), then the policy's SQL checks run: each in the url's database, the
//!    one it names, or (`database = "*"`) in every database of the cluster.
//! 6. The scratch is torn down, whatever happened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Fingerprint, PhysicalConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::policy::{CheckDatabase, SqlCheck};
use crate::repo::manifest::Role;
use crate::restore;
use crate::source::postgres::checks::{not_run, sql_checks};
use crate::source::postgres::scratch::{self, Scratch, Unstarted};
use crate::source::postgres::Postgres;
use crate::verify::{Check, Context, Report, Steps, Verdict};

/// The longest a restored cluster may take to recover and open (the skeleton's
/// `verify.timeout` bounds the whole verification as well).
const RECOVERY_WITHIN: Duration = Duration::from_secs(3600);

/// Where the scratch stands.
enum Stage {
    /// Its directory, being filled.
    Unstarted(Unstarted),
    /// The server running on the restored files.
    Running(Box<Scratch>),
}

/// The physical steps, and what they found.
pub struct PhysicalSteps {
    config: PhysicalConfig,
    spooled: Option<restore::Spooled>,
    fingerprint: Option<Fingerprint>,
    bin: Option<std::path::PathBuf>,
    stage: Option<Stage>,
}

impl PhysicalSteps {
    /// Steps for a source with these settings.
    pub fn new(config: PhysicalConfig) -> Self {
        PhysicalSteps {
            config,
            spooled: None,
            fingerprint: None,
            bin: None,
            stage: None,
        }
    }
}

#[async_trait(?Send)]
impl Steps for PhysicalSteps {
    fn restore_check(&self) -> (&'static str, &'static str) {
        (
            "restore",
            "the base backup unpacks, and a server recovers on it",
        )
    }

    async fn prepare(&mut self, ctx: &Context<'_>, report: &mut Report) -> Result<()> {
        let t0 = Instant::now();
        let m = &ctx.entry.manifest;
        let (spooled, fingerprint): (_, Fingerprint) =
            crate::verify::spool_and_fingerprint(ctx, Role::Cluster).await?;
        let major = crate::source::postgres::source_major(m.source_version.as_deref());
        let bin = same_major_bin(ctx.source.verify.postgres_bin_dir.as_deref(), major).await?;
        self.stage = Some(Stage::Unstarted(Unstarted::new()?));
        self.spooled = Some(spooled);
        self.fingerprint = Some(fingerprint);
        self.bin = Some(bin);
        report.timings.download_seconds = t0.elapsed().as_secs_f64();
        Ok(())
    }

    async fn restore_and_check(
        &mut self,
        ctx: &Context<'_>,
        report: &mut Report,
    ) -> Result<Verdict> {
        let (Some(spooled), Some(fingerprint), Some(bin), Some(Stage::Unstarted(dir))) = (
            &self.spooled,
            self.fingerprint.clone(),
            self.bin.clone(),
            self.stage.take(),
        ) else {
            return Err(Error::failed(
                "verification steps out of order: nothing prepared",
            ));
        };
        let t1 = Instant::now();
        let data = dir.data();
        let unpacked =
            async { super::tar::unpack(spooled.plaintext(ctx.identities).await?, &data).await }
                .await;
        if let Err(e) = unpacked {
            self.stage = Some(Stage::Unstarted(dir));
            return match e.kind {
                ErrorKind::Interrupted | ErrorKind::Integrity => Err(e),
                _ => Ok(Verdict::RestoreFailed(e)),
            };
        }
        report.checks.push(pg_verifybackup(&bin, &data).await);
        report.scratch = format!(
            "ephemeral cluster on the restored files ({})",
            bin.display()
        );
        let wal = data.with_file_name("wal");
        let mut drill = match plan_wal(ctx, &fingerprint.base, &data, &wal, report).await {
            Ok(d) => d,
            Err(e) => {
                self.stage = Some(Stage::Unstarted(dir));
                return Err(e);
            }
        };
        let superuser = &fingerprint.bootstrap_superuser;
        let started = match &mut drill {
            Some(d) => {
                let fed = Fed::default();
                let queue = d.queue.clone();
                let user = dir.server_user().map(str::to_string);
                let (started, feeding) = {
                    let feeder = feed(ctx, &queue, &wal, d.cluster, user.as_deref(), &fed);
                    let replay = drill_replays(ctx, dir, &bin, superuser, &wal, d, report);
                    let (feeder, replay) = (std::pin::pin!(feeder), std::pin::pin!(replay));
                    match futures::future::select(feeder, replay).await {
                        // The server stops at `.failed`; were it not written (a full scratch
                        // disk), recovery would wait for its segment until the timeout: the
                        // replay, and with it the server, is dropped instead.
                        futures::future::Either::Left((Err(e), _))
                            if !wal.join(".failed").exists() =>
                        {
                            (Err(e.clone()), Some(Err(e)))
                        }
                        futures::future::Either::Left((fed, replay)) => (replay.await, Some(fed)),
                        futures::future::Either::Right((started, _)) => (started, None),
                    }
                };
                d.replay.segments = fed.segments.get();
                d.replay.bytes = fed.bytes.get();
                d.replay.download_seconds = fed.seconds.get();
                let r = &mut d.replay;
                if r.replay_seconds > 0.0 {
                    r.bytes_per_second = r.bytes as f64 / r.replay_seconds;
                }
                report.replay = Some(r.clone());
                // A segment that could not be fetched stopped recovery: that is the error.
                if let Some(Err(e)) = feeding {
                    return Err(e);
                }
                started
            }
            None => dir.start(&bin, superuser, RECOVERY_WITHIN).await,
        };
        let s = match started {
            Ok(s) => s,
            Err(e) if e.kind == ErrorKind::Integrity => return Err(e),
            Err(e) => return Ok(Verdict::RestoreFailed(e)),
        };
        report.contained = Some(s.shared_network.is_none());
        report.notes.push(match &s.shared_network {
            None => "the scratch cluster had no network (a network namespace of its own)".into(),
            Some(why) => format!("the scratch cluster shared the host's network: {why}"),
        });
        report.notes.push(
            "the cluster's own postgresql.conf, pg_hba.conf and preloaded libraries were set aside in the scratch".into(),
        );
        report.timings.restore_seconds = t1.elapsed().as_secs_f64();
        if let Some(d) = &drill {
            report.checks.push(replayed(&s, d, &fingerprint.base));
            report.notes.push(format!(
                "replayed {} archived WAL segment{} ({}) from {} to {}; download {:.1} s, replay {:.1} s ({}/s)",
                d.replay.segments,
                if d.replay.segments == 1 { "" } else { "s" },
                crate::human_bytes(d.replay.bytes),
                fingerprint.base.stop_lsn,
                d.end,
                d.replay.download_seconds,
                d.replay.replay_seconds,
                crate::human_bytes(d.replay.bytes_per_second as u64),
            ));
        }
        let t2 = Instant::now();
        report.checks.push(pg_amcheck(&s).await);
        let checked = observe(&s, &fingerprint, &self.config, ctx, report).await;
        self.stage = Some(Stage::Running(Box::new(s)));
        report.timings.readback_seconds =
            t2.elapsed().as_secs_f64() - report.timings.checks_seconds;
        match checked {
            Ok(()) => Ok(Verdict::Checked),
            Err(e) if e.kind == ErrorKind::Interrupted => Err(e),
            Err(e) => Ok(Verdict::RestoreFailed(e)),
        }
    }

    fn guard(&self, ctx: &Context<'_>) -> futures::future::LocalBoxFuture<'static, Error> {
        let dir = match &self.stage {
            Some(Stage::Unstarted(u)) => u.data(),
            Some(Stage::Running(s)) => s.dir.clone(),
            None => return Box::pin(std::future::pending()),
        };
        Box::pin(crate::source::postgres::verify::guard(
            dir,
            &ctx.source.verify,
            ctx.guard_notes.clone(),
        ))
    }

    async fn teardown(&mut self) {
        if let Some(Stage::Running(s)) = self.stage.take() {
            s.stop().await;
        }
        self.spooled = None;
    }
}

/// Server binaries of exactly the source's major version: a data directory starts on no other.
pub(super) async fn same_major_bin(
    configured: Option<&std::path::Path>,
    major: u32,
) -> Result<std::path::PathBuf> {
    let bin = scratch::find_server_bin(configured, major)?;
    let version = crate::source::child::output(&bin.join("postgres"), &["--version"])
        .await
        .unwrap_or_default();
    let found = crate::source::postgres::tool_major(&version);
    if found != Some(major) {
        return Err(Error::failed(format!(
            "the base backup is of PostgreSQL {major}; the server binaries in {} are {}",
            bin.display(),
            version.trim()
        ))
        .hint(format!(
            "a data directory starts only on its own major version: install postgresql-{major} beside the verifier or set verify.postgres_bin_dir"
        )));
    }
    Ok(bin)
}

/// `pg_verifybackup` over the unpacked files: every file against `backup_manifest`, and the
/// WAL the backup needs parsed from `pg_wal/`.
async fn pg_verifybackup(bin: &std::path::Path, data: &std::path::Path) -> Check {
    const NAME: &str = "pg_verifybackup";
    const EXPECTED: &str =
        "every file as the server's backup_manifest lists it, and the WAL parses";
    let out = tokio::process::Command::new(bin.join("pg_verifybackup"))
        .arg("--quiet")
        .arg(data)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    tool_check(NAME, EXPECTED, out)
}

/// A check from a tool's run: passed when it exits 0, else its first lines of output.
fn tool_check(name: &str, expected: &str, out: std::io::Result<std::process::Output>) -> Check {
    match out {
        Ok(o) if o.status.success() => Check::eq(name, expected, expected),
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let head: Vec<&str> = text.lines().take(5).collect();
            Check::failed(name, expected, head.join("; "))
        }
        Err(e) => Check::failed(name, expected, format!("cannot run it: {e}")),
    }
}

/// `pg_amcheck` over every database of the restored cluster: every table's heap and every
/// B-tree index read and checked (the amcheck extension installed where missing: it is scratch).
async fn pg_amcheck(s: &Scratch) -> Check {
    const NAME: &str = "pg_amcheck";
    const EXPECTED: &str = "no corruption in any table or index of any database";
    let out = tokio::process::Command::new(s.bin.join("pg_amcheck"))
        .args(["--all", "--install-missing", "--no-password", "--host"])
        .arg(&s.dir)
        .arg("--port")
        .arg(s.port.to_string())
        .arg("--username")
        .arg(&s.superuser)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    tool_check(NAME, EXPECTED, out)
}

/// Compares the running restored cluster with the fingerprint and runs the policy's checks.
async fn observe(
    s: &Scratch,
    fingerprint: &Fingerprint,
    config: &PhysicalConfig,
    ctx: &Context<'_>,
    report: &mut Report,
) -> Result<()> {
    let conn = Postgres::new(s.config("template1")).connect().await?;
    let row = conn
        .client
        .query_one(
            "select system_identifier::text, pg_is_in_recovery() from pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| Error::failed(format!("restored cluster: reading pg_control: {e}")))?;
    report.checks.push(Check::eq(
        "system identifier",
        fingerprint.base.system_identifier.clone(),
        row.get::<_, String>(0),
    ));
    report.checks.push(Check::eq(
        "recovered",
        "consistent and out of recovery",
        if row.get::<_, bool>(1) {
            "still in recovery"
        } else {
            "consistent and out of recovery"
        },
    ));
    for db in &fingerprint.databases {
        let found = match Postgres::new(s.config(db)).connect().await {
            Err(e) => e.message,
            Ok(c) => match c
                .client
                .query_one("select count(*) from pg_class", &[])
                .await
            {
                Ok(_) => "present, catalog readable".to_string(),
                Err(e) => format!("catalog unreadable: {e}"),
            },
        };
        report.checks.push(Check::eq(
            format!("database {db}"),
            "present, catalog readable",
            found,
        ));
    }
    let url_db = {
        use std::str::FromStr;
        tokio_postgres::Config::from_str(config.connection.url.expose())
            .ok()
            .and_then(|c| c.get_dbname().map(str::to_string))
            .unwrap_or_else(|| "postgres".into())
    };
    // Each check in its database: the url's, the one it names, or every one.
    let mut runs: Vec<(String, Vec<SqlCheck>)> = Vec::new();
    for c in &ctx.source.verify.checks {
        let dbs = match &c.database {
            None => vec![url_db.clone()],
            Some(CheckDatabase::Named(db)) => vec![db.clone()],
            Some(CheckDatabase::Every) => fingerprint.databases.clone(),
        };
        for db in dbs {
            match runs.iter_mut().find(|(d, _)| *d == db) {
                Some((_, checks)) => checks.push(c.clone()),
                None => runs.push((db, vec![c.clone()])),
            }
        }
    }
    let t = std::time::Instant::now();
    for (db, checks) in runs {
        let done = if !fingerprint.databases.contains(&db) {
            Err(format!("the backup has no database {db}"))
        } else {
            match Postgres::new(s.config(&db)).connect().await {
                Ok(c) => Ok(sql_checks(&c.client, &checks).await),
                Err(e) => Err(e.message),
            }
        };
        let done = done.unwrap_or_else(|e| checks.iter().map(|c| not_run(c, &e)).collect());
        for (c, mut check) in checks.iter().zip(done) {
            if c.database.is_some() {
                check.name = format!("{} (in {db})", check.name);
            }
            report.checks.push(check);
        }
    }
    report.timings.checks_seconds = t.elapsed().as_secs_f64();
    Ok(())
}

/// WAL fetched into the scratch for the replay drill.
struct Drill {
    /// The base backup's end: replay of archived WAL starts there.
    from: super::Lsn,
    /// The end of the archive: where replay must get to.
    end: super::Lsn,
    /// The cluster's WAL segment size.
    segment_size: u64,
    /// What each segment must be of.
    cluster: super::fetch::Cluster,
    /// What replay reads, in order: each segment from the backup's start, on the newest
    /// timeline holding it.
    queue: Vec<super::archive::WalObject>,
    /// What the report says of it.
    replay: crate::verify::Replay,
}

/// The drill's two replays on one unpacked backup: to a random point, then on to the end.
async fn drill_replays(
    ctx: &Context<'_>,
    dir: Unstarted,
    bin: &std::path::Path,
    superuser: &str,
    wal: &std::path::Path,
    d: &mut Drill,
    report: &mut Report,
) -> Result<Scratch> {
    replay_to_random_point(ctx, &dir, bin, wal, d, report).await?;
    let t = Instant::now();
    let s = dir
        .start_replaying(bin, superuser, RECOVERY_WITHIN, wal)
        .await;
    d.replay.replay_seconds += t.elapsed().as_secs_f64();
    d.replay.targets.push(crate::verify::ReplayTarget {
        kind: "archive end".into(),
        target: d.end.to_string(),
        reached: s.as_ref().ok().and_then(redo_done).map(|l| l.to_string()),
        seconds: t.elapsed().as_secs_f64(),
    });
    s
}

/// The first replay of the drill: to a record chosen at random between the backup's end and the
/// archive's end (`pg_waldump` lists the records of a random segment), stopping there with the
/// server shut down still in recovery. Where the server said it stopped must be that record.
async fn replay_to_random_point(
    ctx: &Context<'_>,
    dir: &Unstarted,
    bin: &std::path::Path,
    wal: &std::path::Path,
    d: &mut Drill,
    report: &mut Report,
) -> Result<()> {
    const NAME: &str = "WAL replay to a random point";
    let pick = wal.with_file_name("pick");
    let Some(target) = random_record(ctx, bin, &pick, d).await? else {
        report.notes.push(format!(
            "no WAL record past the backup's end to stop at; replayed only to the archive's end ({})",
            d.end
        ));
        return Ok(());
    };
    let t = Instant::now();
    let replayed = dir
        .replay_to(bin, wal, &target.to_string(), RECOVERY_WITHIN)
        .await;
    let seconds = t.elapsed().as_secs_f64();
    d.replay.replay_seconds += seconds;
    let expected = format!("stops after the record at {target}");
    let (reached, check) = match replayed {
        Ok((at, _)) => {
            let same = at.parse::<super::Lsn>().ok() == Some(target);
            let found = format!("stops after the record at {at}");
            let check = if same {
                Check::eq(NAME, expected, found)
            } else {
                Check::failed(NAME, expected, found)
            };
            (Some(at), check)
        }
        Err(e) => (None, Check::failed(NAME, expected, e.message)),
    };
    d.replay.targets.push(crate::verify::ReplayTarget {
        kind: "random point in the window".into(),
        target: target.to_string(),
        reached,
        seconds,
    });
    let passed = check.passed;
    report.checks.push(check);
    if passed {
        Ok(())
    } else {
        Err(Error::failed(format!(
            "replay to {target}, a random point inside the recoverable window, failed"
        )))
    }
}

/// The start of a WAL record between the backup's end and the archive's end, picked at random:
/// one of the first records `pg_waldump` finds in a random segment of the window, fetched for
/// it into `pick` (then removed).
async fn random_record(
    ctx: &Context<'_>,
    bin: &std::path::Path,
    pick: &std::path::Path,
    d: &Drill,
) -> Result<Option<super::Lsn>> {
    use rand::seq::IteratorRandom;
    let size = d.segment_size;
    let in_window = |w: &&super::archive::WalObject| {
        super::archive::segment_number(&w.segment, size).is_some_and(|n| n >= d.from.0 / size)
    };
    let Some(w) = d.queue.iter().filter(in_window).choose(&mut rand::rng()) else {
        return Ok(None);
    };
    std::fs::create_dir_all(pick)
        .map_err(|e| Error::failed(format!("scratch: cannot create {}: {e}", pick.display())))?;
    let records = |w: &super::archive::WalObject| {
        let w = w.clone();
        async move {
            let n = super::archive::segment_number(&w.segment, size).unwrap_or_default();
            super::fetch::fetch_segment(
                ctx.repo,
                &w,
                &pick.join(&w.segment),
                d.cluster,
                ctx.identities,
            )
            .await?;
            let start = super::Lsn((n * size).max(d.from.0));
            let out = tokio::process::Command::new(bin.join("pg_waldump"))
                .arg("--path")
                .arg(pick)
                .args(["--timeline", &w.timeline.to_string()])
                .args(["--start", &start.to_string(), "--limit", "200"])
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .map_err(|e| Error::failed(format!("cannot run pg_waldump: {e}")))?;
            // It exits 1 where the segment's WAL ends (in the next segment, or the zeros after
            // the last record): the records it printed before that are what counts.
            let records: Vec<super::Lsn> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split("lsn: ").nth(1))
                .filter_map(|rest| rest.split(',').next()?.trim().parse().ok())
                .filter(|l| *l > d.from && *l < d.end)
                .collect();
            Ok::<_, Error>(records)
        }
    };
    let mut found = records(w).await?;
    // A segment can hold no record that starts in the window (one long record): then the
    // records right after the backup's end.
    if found.is_empty() {
        if let Some(first) = d.queue.iter().find(in_window) {
            found = records(first).await?;
        }
    }
    let _ = std::fs::remove_dir_all(pick);
    Ok(found.into_iter().choose(&mut rand::rng()))
}

/// Plans the drill: the chain from the backup's end to the archive's end must be whole (a gap is
/// an integrity failure naming it); what replay reads, in order, is queued (`wal/.queue`, see
/// [`scratch::WAL_GET`]) and every history file fetched. `None` when the archive holds nothing
/// past the backup's end (it replays only its own WAL then).
async fn plan_wal(
    ctx: &Context<'_>,
    base: &super::BaseBackupInfo,
    data: &std::path::Path,
    wal: &std::path::Path,
    report: &mut Report,
) -> Result<Option<Drill>> {
    use super::archive::Archive;
    let size = base.wal_segment_size;
    let source = &ctx.entry.manifest.source;
    let archive = Archive::read(ctx.repo, source, size).await?;
    let first_archived = archive.segments.keys().map(|(_, n)| *n).min();
    let end = archive.end(size).unwrap_or_default();
    let Some(first_archived) = first_archived.filter(|_| end > base.stop_lsn) else {
        report.notes.push(format!(
            "no WAL archived past the backup's end ({}): it replayed only the WAL it carries",
            base.stop_lsn
        ));
        return Ok(None);
    };
    if first_archived > base.stop_lsn.0 / size {
        report.notes.push(format!(
            "the WAL archive starts after this backup's end ({}): it replayed only the WAL it carries",
            base.stop_lsn
        ));
        return Ok(None);
    }
    if let Some((from, to)) = archive.gaps(base.stop_lsn, size).first() {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{}{from}–{to}: WAL from {from} to {to} is not in the archive, so recovery from base backup {} cannot pass {from}",
                crate::repo::layout::wal_prefix(source),
                ctx.entry.manifest.id
            ),
        )
        .hint("take a base backup now (`lifeboat backup --source …`): it starts a whole chain (RUNBOOK.md#alert-walarchivegap)"));
    }
    let scratch_error = |what: &str, e: std::io::Error| {
        Error::failed(format!(
            "scratch: cannot write {what} in {}: {e}",
            wal.display()
        ))
    };
    std::fs::create_dir_all(wal).map_err(|e| scratch_error("the WAL directory", e))?;
    // Each segment from the one the backup starts in, on the newest timeline holding it: the
    // one recovery following the newest timeline reads. What the backup carries stays out.
    let first = base.start_lsn.0 / size;
    let mut newest: BTreeMap<u64, &super::archive::WalObject> = BTreeMap::new();
    for ((_, n), w) in &archive.segments {
        if *n >= first && !data.join("pg_wal").join(&w.segment).exists() {
            newest.insert(*n, w);
        }
    }
    let queue: Vec<super::archive::WalObject> = newest.into_values().cloned().collect();
    let names: String = queue.iter().map(|w| format!("{}\n", w.segment)).collect();
    std::fs::write(wal.join(".queue"), names).map_err(|e| scratch_error(".queue", e))?;
    let newest_timeline = queue
        .iter()
        .map(|w| w.timeline)
        .max()
        .unwrap_or(base.timeline);
    for timeline in (base.timeline + 1)..=newest_timeline {
        let file = format!("{timeline:08X}.history");
        match super::fetch::fetch(
            ctx.repo,
            source,
            &file,
            &wal.join(&file),
            super::fetch::Cluster::of(base),
            ctx.identities,
        )
        .await
        {
            Ok(_) => {}
            Err(e) if e.cause == Some(crate::error::Cause::NotArchived) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(Drill {
        from: base.stop_lsn,
        end,
        segment_size: size,
        cluster: super::fetch::Cluster::of(base),
        queue,
        replay: crate::verify::Replay {
            from: base.stop_lsn.to_string(),
            archive_end: end.to_string(),
            ..Default::default()
        },
    }))
}

/// The most segments fetched ahead of replay: with what recovery keeps in `pg_wal` until its
/// next restartpoint, all the WAL the scratch holds at once.
const AHEAD: usize = 8;

/// What the feeder did, read when the drill ends however it ended.
#[derive(Default)]
struct Fed {
    segments: std::cell::Cell<u64>,
    bytes: std::cell::Cell<u64>,
    seconds: std::cell::Cell<f64>,
}

/// Feeds the scratch server's `restore_command` ([`scratch::WAL_GET`]): fetches each queued
/// segment, checked, into `wal`, at most [`AHEAD`] not yet taken by recovery, and gives it to
/// the server's OS user. `.end` when all are there; `.failed` (recovery stops) on an error,
/// which is returned.
async fn feed(
    ctx: &Context<'_>,
    queue: &[super::archive::WalObject],
    wal: &std::path::Path,
    cluster: super::fetch::Cluster,
    user: Option<&str>,
    fed: &Fed,
) -> Result<()> {
    let waiting = |wal: &std::path::Path| {
        std::fs::read_dir(wal)
            .map(|rd| rd.flatten().filter(|e| e.file_name().len() == 24).count())
            .unwrap_or(0)
    };
    // Fetched and given to the server's user there, then renamed into `wal`: recovery never
    // sees a file it cannot read.
    let incoming = wal.with_file_name("wal-incoming");
    let fed_all = async {
        std::fs::create_dir_all(&incoming).map_err(|e| {
            Error::failed(format!(
                "scratch: cannot create {}: {e}",
                incoming.display()
            ))
        })?;
        let owner = user
            .map(crate::source::child::ids_of)
            .transpose()
            .map_err(|e| Error::failed(format!("scratch: {e}, whom the server runs as")))?;
        for w in queue {
            while waiting(wal) >= AHEAD {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let t = Instant::now();
            let fetched = incoming.join(&w.segment);
            let got =
                super::fetch::fetch_segment(ctx.repo, w, &fetched, cluster, ctx.identities).await?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&fetched, Some(uid), Some(gid)).map_err(|e| {
                    Error::failed(format!(
                        "scratch: cannot give {} to the server's OS user: {e}",
                        fetched.display()
                    ))
                })?;
            }
            std::fs::rename(&fetched, wal.join(&w.segment)).map_err(|e| {
                Error::failed(format!("scratch: cannot move {}: {e}", fetched.display()))
            })?;
            fed.segments.set(fed.segments.get() + 1);
            fed.bytes.set(fed.bytes.get() + got.archived);
            fed.seconds
                .set(fed.seconds.get() + t.elapsed().as_secs_f64());
        }
        Ok(())
    };
    let result: Result<()> = fed_all.await;
    let marker = if result.is_ok() { ".end" } else { ".failed" };
    let _ = std::fs::write(wal.join(marker), "");
    result
}

/// Where replay ended (the server log's `redo done at`), against the archive's end: in its last
/// segment, or past it.
fn replayed(s: &Scratch, d: &Drill, base: &super::BaseBackupInfo) -> Check {
    const NAME: &str = "WAL replay";
    let size = base.wal_segment_size;
    let last = d.end.0.saturating_sub(1) / size;
    let expected = format!("to the archive's end ({})", d.end);
    match redo_done(s) {
        Some(at) if at.0 / size >= last => Check::eq(NAME, expected.clone(), expected),
        Some(at) => Check::failed(NAME, expected, format!("redo ended at {at}")),
        None => Check::failed(NAME, expected, "the server logged no end of redo"),
    }
}

/// Where redo ended, from the server log's last `redo done at`.
fn redo_done(s: &Scratch) -> Option<super::Lsn> {
    let log = std::fs::read_to_string(s.dir.join("log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| l.split("redo done at ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<super::Lsn>().ok())
        .next_back()
}
