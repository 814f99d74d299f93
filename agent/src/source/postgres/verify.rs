//! Verifying a PostgreSQL backup, the steps the verifier's skeleton runs:
//!
//! 1. Every stored object is downloaded to a spool file and its SHA-256 checked against the
//!    manifest (exit 13 on any difference) before anything is decrypted; the fingerprint too.
//! 2. Meanwhile a scratch database is made: an ephemeral cluster (default), or a
//!    `lifeboat_verify_<id>` database on `verify.scratch_url` (refused if that is the source's own
//!    database).
//! 3. Globals (roles, role statements only) are replayed into an ephemeral cluster and stripped
//!    of superuser powers; pg_restore runs as the unprivileged restore role from the decrypted
//!    stream, whose plaintext SHA-256 is checked at its end; any error fails. A guard stops it
//!    past `verify.scratch_max_size` or before the scratch disk fills (the skeleton adds
//!    `verify.timeout`).
//! 4. The restored database is compared with the fingerprint, then the policy's SQL checks run.
//! 5. The scratch is torn down, whatever happened.

use std::time::Instant;

use async_trait::async_trait;

use super::scratch::{self, Scratch};
use super::{quote_ident, Fingerprint, Postgres, PostgresConfig, RestoreInput, RestoreOptions};
use crate::error::{Cause, Error, ErrorKind, Result};
use crate::policy::{Secret, SourcePolicy};
use crate::repo::manifest::{DatabaseInfo, Role};
use crate::restore;
use crate::verify::{typed_fingerprint, Check, Context, Identities, Report, Steps, Verdict};

/// Where the restore goes.
enum Target {
    Ephemeral(Scratch),
    Server {
        maintenance: PostgresConfig,
        db: String,
    },
}

/// The PostgreSQL steps, and what they found.
pub struct PostgresSteps {
    config: PostgresConfig,
    spooled: Vec<restore::Spooled>,
    fingerprint: Option<Fingerprint>,
    target: Option<Target>,
}

impl PostgresSteps {
    /// Steps for a source with these settings.
    pub fn new(config: PostgresConfig) -> Self {
        PostgresSteps {
            config,
            spooled: Vec::new(),
            fingerprint: None,
            target: None,
        }
    }
}

#[async_trait(?Send)]
impl Steps for PostgresSteps {
    fn restore_check(&self) -> (&'static str, &'static str) {
        ("restore", "pg_restore without errors")
    }

    async fn prepare(&mut self, ctx: &Context<'_>, report: &mut Report) -> Result<()> {
        let t0 = Instant::now();
        let m = &ctx.entry.manifest;
        let source_major = super::source_major(m.source_version.as_deref());
        // The scratch starts while the objects download and are checked. Nothing is decrypted,
        // let alone restored, until every check passed.
        let integrity = async {
            let spool_dir = std::env::temp_dir();
            let mut spooled = Vec::new();
            for part in &m.parts {
                spooled.push(
                    restore::spool(ctx.repo, m, part, &spool_dir, &restore::NoProgress).await?,
                );
            }
            let fingerprint: Fingerprint = typed_fingerprint(ctx.repo, m, ctx.identities).await?;
            Ok::<_, Error>((spooled, fingerprint, t0.elapsed().as_secs_f64()))
        };
        let verify = &ctx.source.verify;
        let scratch = async {
            match &verify.scratch_url {
                Some(url) => scratch_server(&self.config, url, &report.verify_id),
                None => {
                    let bin =
                        scratch::find_server_bin(verify.postgres_bin_dir.as_deref(), source_major)?;
                    Ok(Target::Ephemeral(Scratch::start(&bin).await?))
                }
            }
        };
        let (checked, target) = tokio::join!(integrity, scratch);
        // A scratch that started is torn down by `teardown`, whichever failed.
        let scratch_failed = match target {
            Ok(t) => {
                self.target = Some(t);
                None
            }
            Err(e) => Some(e),
        };
        let (spooled, fingerprint, download_seconds) = checked?;
        if let Some(e) = scratch_failed {
            return Err(e);
        }
        self.spooled = spooled;
        self.fingerprint = Some(fingerprint);
        report.timings.download_seconds = download_seconds;
        Ok(())
    }

    async fn restore_and_check(
        &mut self,
        ctx: &Context<'_>,
        report: &mut Report,
    ) -> Result<Verdict> {
        let (Some(target), Some(fingerprint)) = (&self.target, &self.fingerprint) else {
            return Err(Error::failed(
                "verification steps out of order: nothing prepared",
            ));
        };
        let done = restore_and_check(
            target,
            &self.spooled,
            fingerprint,
            ctx.entry.manifest.database.as_ref(),
            ctx.source,
            ctx.identities,
            report,
        )
        .await;
        match done {
            Ok(()) => Ok(Verdict::Checked),
            Err(e) if e.kind == ErrorKind::Interrupted => Err(e),
            Err(e) => Ok(Verdict::RestoreFailed(e)),
        }
    }

    fn guard(&self, ctx: &Context<'_>) -> futures::future::LocalBoxFuture<'static, Error> {
        match &self.target {
            Some(Target::Ephemeral(s)) => Box::pin(guard(
                s.dir.clone(),
                &ctx.source.verify,
                ctx.guard_notes.clone(),
            )),
            _ => Box::pin(std::future::pending()),
        }
    }

    async fn teardown(&mut self) {
        if let Some(t) = self.target.take() {
            teardown(t).await;
        }
        self.spooled.clear();
    }
}

fn scratch_server(src: &PostgresConfig, url: &Secret, verify_id: &str) -> Result<Target> {
    use std::str::FromStr;
    let parse = |s: &str| tokio_postgres::Config::from_str(s).ok();
    let (Some(a), Some(b)) = (parse(src.url.expose()), parse(url.expose())) else {
        return Err(Error::new(
            ErrorKind::Invalid,
            "verify.scratch_url is not a PostgreSQL connection string",
        ));
    };
    let same_server = a.get_hosts() == b.get_hosts() && a.get_ports() == b.get_ports();
    if same_server && a.get_dbname() == b.get_dbname() {
        return Err(Error::new(
            ErrorKind::Refused,
            "verify.scratch_url points at the source's own database; refusing to verify there",
        )
        .hint("point scratch_url at a scratch server (or its maintenance database), never at production"));
    }
    let db = format!(
        "lifeboat_verify_{}",
        verify_id.to_lowercase().replace('-', "_")
    );
    Ok(Target::Server {
        maintenance: PostgresConfig {
            url: url.clone(),
            url_redacted: crate::policy::redact_url(url.expose()),
            password_file: None,
            globals: false,
            fingerprint: src.fingerprint,
            bin_dir: None,
            tls_ca_file: None,
        },
        db,
    })
}

/// Replays the roles (ephemeral cluster), restores the dump, compares with the fingerprint and
/// runs the policy's checks.
async fn restore_and_check(
    target: &Target,
    spooled: &[restore::Spooled],
    fingerprint: &Fingerprint,
    like: Option<&DatabaseInfo>,
    source: &SourcePolicy,
    identities: &Identities,
    report: &mut Report,
) -> Result<()> {
    let t1 = Instant::now();
    let dump = spooled
        .iter()
        .find(|s| s.part.role == Role::Database)
        .ok_or_else(|| Error::new(ErrorKind::Integrity, "the backup has no database part"))?;
    let globals = spooled.iter().find(|s| s.part.role == Role::Globals);
    let (pg, opts) = match target {
        Target::Ephemeral(s) => {
            ephemeral(s, dump, globals, source, identities, like, report).await?
        }
        Target::Server { maintenance, db } => server(maintenance, db, like, report).await?,
    };
    let conn = pg.connect().await?;
    let unprivileged =
        matches!(target, Target::Ephemeral(_)) && !source.verify.restore_as_superuser;
    let data_read = pg.pg_restore(
        &conn,
        RestoreInput::Stream(dump.plaintext(identities).await?),
        &opts,
    )
    .await
    .map_err(|e| match unprivileged && e.cause == Some(Cause::NeedsSuperuser) {
        true => Error::failed(format!(
            "{} (the verifier restores as the unprivileged role {} so that a forged backup cannot run programs or load code; this dump needs a superuser: if nobody but the agent can write to the repository, set verify.restore_as_superuser = true for this source)",
            e.message,
            scratch::RESTORER
        )),
        false => e,
    })?;
    let restored = Instant::now();
    let data_read = data_read.unwrap_or(restored);
    report.timings.restore_seconds = (data_read - t1).as_secs_f64();
    report.timings.index_build_seconds = (restored - data_read).as_secs_f64();
    let observed = super::observe(&pg, &conn, fingerprint).await?;
    report.notes.push(observed.spread.to_string());
    report
        .checks
        .extend(super::checks::compare(fingerprint, &observed));
    let read_back = Instant::now();
    report.timings.readback_seconds = (read_back - restored).as_secs_f64();
    report
        .checks
        .extend(super::checks::sql_checks(&conn.client, &source.verify.checks).await);
    report.timings.checks_seconds = read_back.elapsed().as_secs_f64();
    Ok(())
}

/// Creates database `name` as the dumped one was: its encoding, collation and ctype. Where the
/// scratch server lacks that locale, with the encoding and collation `C`, and a note says so
/// (sort order may differ; the rows and their content do not).
async fn create_like(
    client: &tokio_postgres::Client,
    name: &str,
    like: Option<&DatabaseInfo>,
    owner: Option<&str>,
    report: &mut Report,
) -> Result<()> {
    let failed = |e: tokio_postgres::Error| {
        let e = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string());
        Error::failed(format!("creating the database {name}: {e}"))
    };
    let exact = client
        .batch_execute(&super::create_database(name, like, owner, true))
        .await;
    match (exact, like) {
        (Ok(()), _) => Ok(()),
        (Err(e), Some(d)) => {
            let why = failed(e).message;
            client
                .batch_execute(&super::create_database(name, like, owner, false))
                .await
                .map_err(failed)?;
            report.notes.push(format!(
                "restored with encoding {} and collation C, as the scratch has no locale {}/{} ({why}): checks that depend on sort order may differ",
                d.encoding, d.collate, d.ctype
            ));
            Ok(())
        }
        (Err(e), None) => Err(failed(e)),
    }
}

/// Readies the ephemeral cluster: roles replayed and stripped of their powers (or, with
/// `verify.restore_as_superuser`, restored as the superuser), the database created, untrusted
/// extensions created for the dump. Returns whom to restore as, and how.
async fn ephemeral(
    s: &Scratch,
    dump: &restore::Spooled,
    globals: Option<&restore::Spooled>,
    source: &SourcePolicy,
    identities: &Identities,
    like: Option<&DatabaseInfo>,
    report: &mut Report,
) -> Result<(Postgres, RestoreOptions)> {
    report.scratch = format!("ephemeral cluster ({})", s.bin.display());
    report.contained = Some(s.shared_network.is_none());
    report.notes.push(match &s.shared_network {
        None => "the scratch cluster had no network (a network namespace of its own)".into(),
        Some(why) => format!("the scratch cluster shared the host's network: {why}"),
    });
    let maint = Postgres::new(s.config("postgres"));
    let conn = maint.connect().await?;
    if let Some(g) = globals {
        let errors = maint
            .replay_globals(
                &conn,
                g.plaintext(identities).await?,
                &[scratch::SUPERUSER, scratch::RESTORER],
                false,
            )
            .await?;
        report.checks.push(if errors.is_empty() {
            Check::eq("globals replayed", "no errors", "no errors")
        } else {
            Check::failed("globals replayed", "no errors", errors.join("; "))
        });
    } else {
        report.notes.push(
            "the backup holds no roles (globals = false): ownership and grants were not restored, so not verified".into(),
        );
    }
    let as_superuser = source.verify.restore_as_superuser;
    let user = if as_superuser {
        report.notes.push(
            "restored as the scratch cluster's superuser (verify.restore_as_superuser = true)"
                .into(),
        );
        scratch::SUPERUSER
    } else {
        let notes = s.lock_down(&conn.client).await?;
        report.notes.extend(notes);
        if globals.is_some() {
            report.notes.push(format!(
                "restored as the unprivileged role {}, which owns every restored object: grants were restored, ownership was not verified",
                scratch::RESTORER
            ));
        }
        scratch::RESTORER
    };
    // Without the roles, owners and grants would name roles the scratch cluster lacks.
    let roles = globals.is_some();
    create_like(&conn.client, "restored", like, Some(user), report)
        .await
        .map_err(|e| e.context("scratch"))?;
    if !as_superuser {
        let wanted = dump_extensions(dump.plaintext(identities).await?).await;
        let created = s.precreate_extensions("restored", &wanted).await?;
        if !created.is_empty() {
            report.notes.push(format!(
                "created by the verifier from the server's own files, as the dump's owner cannot: extension {}",
                created.join(", ")
            ));
        }
    }
    Ok((
        Postgres::new(s.config_as("restored", user)),
        RestoreOptions {
            jobs: 1,
            // Only a superuser may give objects to other roles as they are created.
            no_owner: !roles || !as_superuser,
            no_privileges: !roles,
            no_tablespaces: true,
            single_transaction: true,
            ..RestoreOptions::default()
        },
    ))
}

/// Readies a database on the shared scratch server (`verify.scratch_url`): no roles, so no
/// owners or grants.
async fn server(
    maintenance: &PostgresConfig,
    db: &str,
    like: Option<&DatabaseInfo>,
    report: &mut Report,
) -> Result<(Postgres, RestoreOptions)> {
    report.scratch = format!("database {db} on {}", maintenance.url_redacted);
    let maint = Postgres::new(maintenance.clone());
    let conn = maint.connect().await?;
    let superuser = conn
        .client
        .query_one("SELECT current_setting('is_superuser') = 'on'", &[])
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(true);
    if superuser {
        report.notes.push(
            "verify.scratch_url connects as a superuser: a forged dump could run programs on that server; give the verifier a role with CREATEDB only".into(),
        );
    }
    create_like(&conn.client, db, like, None, report)
        .await
        .map_err(|e| e.context("scratch server"))?;
    let mut cfg = maintenance.clone();
    cfg.url = Secret::new(with_dbname(maintenance.url.expose(), db));
    // Roles are cluster-wide: a shared scratch server gets no globals, so no owners or grants.
    report.notes.push(
        "restored on a shared scratch server without roles: ownership and grants were not verified"
            .into(),
    );
    Ok((
        Postgres::new(cfg),
        RestoreOptions {
            jobs: 1,
            no_owner: true,
            no_privileges: true,
            no_tablespaces: true,
            single_transaction: true,
            ..RestoreOptions::default()
        },
    ))
}

/// The extensions the dump creates, from the table of contents at its head (read, then the
/// stream is dropped). Empty when the head is not an archive: pg_restore will say so.
async fn dump_extensions(
    mut plain: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
) -> Vec<super::pgdump::ArchiveExtension> {
    use tokio::io::AsyncReadExt;
    // A TOC is ~200 bytes per object: this is a million objects.
    const LIMIT: usize = 256 << 20;
    let mut head = Vec::new();
    let mut attempt = 64 << 10;
    loop {
        let mut chunk = vec![0u8; 64 << 10];
        let n = match plain.read(&mut chunk).await {
            Ok(n) => n,
            Err(_) => return Vec::new(),
        };
        head.extend_from_slice(&chunk[..n]);
        if n == 0 || head.len() >= attempt {
            match super::pgdump::archive_extensions(&head) {
                Some(Ok(v)) => return v,
                Some(Err(_)) => return Vec::new(),
                None if n == 0 || head.len() > LIMIT => return Vec::new(),
                None => attempt = head.len() * 2,
            }
        }
    }
}

/// Returns (an error) when the restore must stop: the ephemeral cluster in `dir` grew past
/// `verify.scratch_max_size` or left less than `verify.scratch_keep_free` on its filesystem,
/// which a forged dump could try and a database too large for the scratch disk would do. When it
/// cannot measure, it says so once in `notes` (the report's) and keeps trying.
pub(crate) fn guard(
    dir: std::path::PathBuf,
    verify: &crate::policy::VerifyPolicy,
    notes: crate::verify::GuardNotes,
) -> impl std::future::Future<Output = Error> + 'static {
    disk_guard(
        dir,
        verify.scratch_max_size,
        verify.scratch_keep_free,
        notes,
    )
}

async fn disk_guard(
    dir: std::path::PathBuf,
    max: Option<u64>,
    keep_free: Option<u64>,
    notes: crate::verify::GuardNotes,
) -> Error {
    // Free space every 100 ms (a restore can write hundreds of MB a second), the directory's
    // size, a walk over its files, every second.
    let mut tick = 0u64;
    loop {
        tick += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let walk = max.is_some() && tick.is_multiple_of(10);
        let probe = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || super::scratch::disk_use(&dir, walk)).await
        };
        let usage = match probe {
            Ok(Ok(usage)) => usage,
            Ok(Err(e)) => {
                unwatched(
                    &notes,
                    format!("cannot read the scratch filesystem's free space ({e})"),
                );
                continue;
            }
            Err(e) => {
                unwatched(&notes, format!("its probe failed ({e})"));
                continue;
            }
        };
        if let Some(max) = max.filter(|_| walk) {
            if usage.used > max {
                return Error::failed(format!(
                    "stopped: the scratch cluster grew past verify.scratch_max_size ({}); raise it if the database is that large, else the dump tried to fill the disk",
                    crate::human_bytes(max)
                ));
            }
        }
        let reserve = keep_free.unwrap_or(usage.reserve);
        if usage.available < reserve {
            return Error::failed(format!(
                "stopped: the scratch filesystem had only {} free (the verifier keeps {} free); free space under TMPDIR, or lower verify.scratch_keep_free if the disk is meant to run this full",
                crate::human_bytes(usage.available),
                crate::human_bytes(reserve)
            ));
        }
    }
}

/// Notes once that the disk guard is blind: the restore goes on, unwatched for a full disk.
fn unwatched(notes: &crate::verify::GuardNotes, why: String) {
    let mut notes = notes.borrow_mut();
    if !notes.iter().any(|n| n.starts_with("disk guard:")) {
        notes.push(format!(
            "disk guard: {why}; this restore was not watched for a full scratch disk (verify.scratch_max_size was not enforced)"
        ));
    }
}

fn with_dbname(url: &str, db: &str) -> String {
    if url.contains("://") {
        let (base, query) = url
            .split_once('?')
            .map(|(b, q)| (b, Some(q)))
            .unwrap_or((url, None));
        let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
        let host_end = base[scheme_end..]
            .find('/')
            .map(|i| scheme_end + i)
            .unwrap_or(base.len());
        let mut out = format!("{}/{db}", &base[..host_end]);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    } else {
        format!("{url} dbname={db}")
    }
}

async fn teardown(target: Target) {
    match target {
        Target::Ephemeral(s) => s.stop().await,
        Target::Server { maintenance, db } => {
            let maint = Postgres::new(maintenance);
            match maint.connect().await {
                Ok(conn) => {
                    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&db));
                    if let Err(e) = conn.client.batch_execute(&sql).await {
                        tracing::warn!(database = %db, error = %e, "Could not drop the scratch database; drop it by hand");
                    }
                }
                Err(e) => {
                    tracing::warn!(database = %db, error = %e, "Could not reach the scratch server to drop the database; drop it by hand")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_dbname;

    #[test]
    fn dbname_is_replaced_in_both_url_forms() {
        assert_eq!(
            with_dbname("postgres://u:p@h:5/postgres?sslmode=disable", "v"),
            "postgres://u:p@h:5/v?sslmode=disable"
        );
        assert_eq!(with_dbname("postgres://u@h", "v"), "postgres://u@h/v");
        assert_eq!(with_dbname("host=h user=u", "v"), "host=h user=u dbname=v");
    }

    #[tokio::test]
    async fn a_guard_that_cannot_measure_the_disk_says_so_once_and_keeps_watching() {
        let notes = crate::verify::GuardNotes::default();
        let gone = std::path::PathBuf::from("/nonexistent/lifeboat-scratch");
        let watching = tokio::time::timeout(
            std::time::Duration::from_millis(450),
            super::disk_guard(gone, Some(1 << 30), None, notes.clone()),
        )
        .await;
        assert!(watching.is_err(), "it does not stop the restore");
        let notes = notes.borrow();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("disk guard: cannot read the scratch filesystem's free space")
                && notes[0].contains("not watched for a full scratch disk"),
            "{}",
            notes[0]
        );
    }
}
