//! Restoring a PostgreSQL backup into a database: every object is spooled and checked first
//! (exit 13, target untouched), the identity must open every part, and only then is the database
//! created, roles replayed if asked, and pg_restore run.

use super::{RestoreInput, RestoreOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::{Manifest, Role};
use crate::repo::Repository;
use crate::restore::{counting, spool, Outcome, Plan, Progress, Refusal, Request};

/// The state of a restore target database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetState {
    /// The database name.
    pub database: String,
    /// Whether it exists.
    pub exists: bool,
    /// User relations in it (tables, views, sequences…), extension members excluded.
    pub relations: i64,
    /// Large objects in it.
    pub large_objects: i64,
}

impl TargetState {
    /// True when restoring would mix with data already there.
    pub fn has_data(&self) -> bool {
        self.exists && (self.relations > 0 || self.large_objects > 0)
    }
}

/// Connection settings for a restore target given as a URL (`--to`).
pub fn target_config(url: &str) -> Result<(super::PostgresConfig, String)> {
    use std::str::FromStr;
    let cfg = tokio_postgres::Config::from_str(url).map_err(|e| {
        Error::new(
            ErrorKind::Invalid,
            format!(
                "--to `{}` is not a PostgreSQL URL: {e}",
                crate::policy::redact_url(url)
            ),
        )
    })?;
    let db = cfg.get_dbname().map(str::to_string).ok_or_else(|| {
        Error::new(
            ErrorKind::Invalid,
            "--to names no database; write postgresql://HOST/DBNAME",
        )
    })?;
    Ok((
        super::PostgresConfig {
            url: crate::policy::Secret::new(url.to_string()),
            url_redacted: crate::policy::redact_url(url),
            password_file: None,
            globals: false,
            fingerprint: super::FingerprintMode::Counts,
            bin_dir: None,
            tls_ca_file: None,
        },
        db,
    ))
}

/// Looks at the target database without changing anything.
pub async fn inspect_target(target: &super::Postgres, db: &str) -> Result<TargetState> {
    let maint = connect_maintenance(target).await?;
    let exists = maint
        .client
        .query_opt("select 1 from pg_database where datname = $1", &[&db])
        .await
        .map_err(|e| Error::failed(format!("target: looking up database {db}: {e}")))?
        .is_some();
    let mut state = TargetState {
        database: db.to_string(),
        exists,
        relations: 0,
        large_objects: 0,
    };
    if exists {
        let conn = target.connect().await?;
        let row = conn
            .client
            .query_one(
                "select (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                   where c.relkind in ('r', 'p', 'v', 'm', 'S', 'f') \
                   and n.nspname not in ('pg_catalog', 'information_schema') \
                   and n.nspname not like 'pg_toast%' and n.nspname not like 'pg_temp%' \
                   and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass \
                                   and d.objid = c.oid and d.deptype = 'e')), \
                 (select count(*) from pg_largeobject_metadata)",
                &[],
            )
            .await
            .map_err(|e| Error::failed(format!("target: inspecting database {db}: {e}")))?;
        state.relations = row.get(0);
        state.large_objects = row.get(1);
    }
    Ok(state)
}

/// A connection to the target server's maintenance database (`postgres`, else `template1`).
pub async fn connect_maintenance(target: &super::Postgres) -> Result<super::Connection> {
    match target.connect_to(Some("postgres")).await {
        Ok(c) => Ok(c),
        Err(first) => target
            .connect_to(Some("template1"))
            .await
            .map_err(|_| first),
    }
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct PgRestore {
    /// Also replay roles.
    pub with_globals: bool,
    /// Connections restoring at once (see [`super::parallel`]).
    pub jobs: u32,
    /// Where spool files go.
    pub spool_dir: std::path::PathBuf,
    /// Skip ownership.
    pub no_owner: bool,
}

/// How long a restore's steps took, as the verifier splits its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreTimes {
    /// Downloading and checking every part.
    pub download_seconds: f64,
    /// Roles, the database, and pg_restore until it had read the dump's last byte; with
    /// `--jobs`, until the last table's data was in (through a plaintext spool: the spool's
    /// decryption and the whole pg_restore).
    pub restore_seconds: f64,
    /// What follows: indexes, constraints, triggers. 0 with `--jobs` through a plaintext spool,
    /// where pg_restore reads a file.
    pub index_build_seconds: f64,
}

/// Restores a PostgreSQL backup into `db` on `target`: every object is spooled and checked first
/// (exit 13, target untouched), then the database is created if missing, roles replayed if asked,
/// and pg_restore runs. Returns whether the database was created, and how long each step took.
pub async fn restore_postgres(
    repo: &Repository,
    manifest: &Manifest,
    target: &super::Postgres,
    db: &str,
    how: &PgRestore,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    progress: std::sync::Arc<dyn Progress>,
) -> Result<(bool, RestoreTimes)> {
    let started = std::time::Instant::now();
    let mut parts = Vec::new();
    for part in &manifest.parts {
        if part.role == Role::Database || (part.role == Role::Globals && how.with_globals) {
            progress.phase(
                &format!("downloading and checking {}", part.name),
                Some(part.size_stored),
            );
            // Tables read at once from a seekable dump are read by range where it is stored:
            // it is checked whole first, and nothing is copied to this machine's disk.
            let spooled = match part.role == Role::Database && how.jobs > 1 && part.seek.is_some() {
                true => {
                    crate::restore::check_where_stored(
                        repo,
                        manifest,
                        part,
                        &how.spool_dir,
                        progress.as_ref(),
                    )
                    .await?
                }
                false => spool(repo, manifest, part, &how.spool_dir, progress.as_ref()).await?,
            };
            parts.push(spooled);
        }
    }
    let dump = parts
        .iter()
        .find(|p| p.part.role == Role::Database)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Integrity,
                format!("backup {} has no database part", manifest.id),
            )
        })?;
    let downloaded = std::time::Instant::now();
    let mut times = RestoreTimes {
        download_seconds: (downloaded - started).as_secs_f64(),
        ..RestoreTimes::default()
    };
    // The identity must open every part before anything is created on the target: a wrong key
    // is exit 12 with the target untouched, not an empty database left behind.
    for p in &parts {
        p.opens_with(identities).await?;
    }
    // With jobs, a dump whose backup recorded where its tables' data lies loads them at once
    // straight from the stored object; the fingerprint says where.
    let fingerprint = match how.jobs > 1 && dump.part.seek.is_some() {
        true => seek_fingerprint(repo, manifest, identities).await,
        false => None,
    };
    if how.with_globals && !parts.iter().any(|p| p.part.role == Role::Globals) {
        return Err(Error::failed(format!(
            "backup {} holds no globals (the source had globals = false)",
            manifest.id
        )));
    }
    let state = inspect_target(target, db).await?;
    let maint = connect_maintenance(target).await?;
    if let Some(g) = parts.iter().find(|p| p.part.role == Role::Globals) {
        progress.phase("replaying roles (globals)", None);
        let errors = target
            .replay_globals(&maint, g.plaintext(identities).await?, &[], true)
            .await?;
        if !errors.is_empty() {
            return Err(Error::failed(format!(
                "replaying roles failed: {}",
                errors.join("; ")
            )));
        }
    }
    let created = !state.exists;
    if created {
        progress.phase(&format!("creating database {db}"), None);
        let like = manifest.database.as_ref();
        maint
            .client
            .batch_execute(&super::create_database(db, like, None, true))
            .await
            .map_err(|e| {
                let e = e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string());
                let err = Error::failed(format!("creating database {db}: {e}"));
                match like {
                    Some(d) => err.hint(format!(
                        "the backup's database is {} with collation {} and ctype {}: install that locale on the target server, or create the database yourself (createdb -E {} --locale=… {db}) and restore into it",
                        d.encoding, d.collate, d.ctype, d.encoding
                    )),
                    None => err,
                }
            })?;
    }
    let conn = target.connect().await?;
    let opts = RestoreOptions {
        jobs: how.jobs,
        no_owner: how.no_owner,
        no_privileges: false,
        no_tablespaces: false,
        single_transaction: false,
        ..RestoreOptions::default()
    };
    let seekable = fingerprint
        .as_ref()
        .and_then(|f| super::parallel::Seekable::of(dump, f));
    if let Some(seekable) = seekable {
        let loaded = super::parallel::restore(
            target,
            &conn,
            &seekable,
            identities,
            &opts,
            &how.spool_dir,
            progress.as_ref(),
        )
        .await?;
        if let Some(data_in) = loaded {
            let ended = std::time::Instant::now();
            times.restore_seconds = (data_in - downloaded).as_secs_f64();
            times.index_build_seconds = (ended - data_in).as_secs_f64();
            return Ok((created, times));
        }
    }
    let input = if how.jobs > 1 {
        progress.phase(
            &format!("decrypting to a spool file in {}", how.spool_dir.display()),
            Some(dump.part.size_plain),
        );
        let file = dump
            .plaintext_file(identities, &how.spool_dir, progress.clone())
            .await?;
        progress.phase(&format!("running pg_restore with {} jobs", how.jobs), None);
        let r = target
            .pg_restore(&conn, RestoreInput::File(file.path().to_path_buf()), &opts)
            .await;
        drop(file);
        times.restore_seconds = downloaded.elapsed().as_secs_f64();
        return r.map(|_| (created, times));
    } else {
        progress.phase("restoring (pg_restore)", Some(dump.part.size_plain));
        RestoreInput::Stream(counting(
            dump.plaintext(identities).await?,
            progress.clone(),
        ))
    };
    let data_read = target.pg_restore(&conn, input, &opts).await?;
    let ended = std::time::Instant::now();
    let data_read = data_read.unwrap_or(ended);
    times.restore_seconds = (data_read - downloaded).as_secs_f64();
    times.index_build_seconds = (ended - data_read).as_secs_f64();
    Ok((created, times))
}

/// The backup's fingerprint, for where its tables' data lies; `None` (and a restore the old way)
/// when it cannot be read.
async fn seek_fingerprint(
    repo: &Repository,
    manifest: &Manifest,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Option<super::Fingerprint> {
    manifest.fingerprint.as_ref()?;
    let read = crate::restore::fingerprint(repo, manifest, identities)
        .await
        .and_then(|v| serde_json::from_value(v).map_err(|e| Error::failed(e.to_string())));
    match read {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(backup = %manifest.id, error = %e.message, "Cannot read the fingerprint; restoring through a plaintext spool file");
            None
        }
    }
}

/// Plans a restore into the database named by `--to`: refuses options for other kinds, looks at
/// the target (changing nothing), and asks for confirmation when it holds data.
pub async fn plan(req: &Request<'_>) -> Result<Plan> {
    let o = req.options;
    if o.delete_extra {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--delete-extra applies to objects restores into a directory",
        ));
    }
    if o.flush {
        return Err(Error::new(
            ErrorKind::Invalid,
            "--flush applies to Redis restores; a PostgreSQL restore goes into a new or empty database",
        ));
    }
    let (cfg, db) = target_config(req.to)?;
    let target = super::Postgres::new(cfg.clone());
    let state = inspect_target(&target, &db).await?;
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
    let details = serde_json::json!({
        "target": { "url": cfg.url_redacted, "database": db, "exists": state.exists,
                    "relations": state.relations, "large_objects": state.large_objects },
        "with_globals": o.with_globals,
        "jobs": o.jobs,
    });
    let how = PgRestore {
        with_globals: o.with_globals,
        jobs: o.jobs,
        spool_dir: o.spool_dir.clone(),
        no_owner: o.no_owner,
    };
    let apply = Box::new(Apply {
        manifest: req.entry.manifest.clone(),
        target,
        db: db.clone(),
        how,
    });
    let mut plan = Plan::new(
        req,
        cfg.url_redacted.clone(),
        action,
        details.as_object().cloned().unwrap_or_default(),
        apply,
    );
    if o.with_globals {
        plan.details.push((
            "roles",
            "replayed from the backup's globals (no passwords: set them afterwards)".into(),
        ));
    }
    if state.has_data() {
        plan.refusal = Some(Refusal::new(
            &format!("database {db} already holds data"),
            "restore into a new database name, or pass --yes if mixing is really intended (RUNBOOK.md#restore)",
            &db,
        ));
    }
    Ok(plan)
}

/// What a planned PostgreSQL restore carries to its apply step.
struct Apply {
    manifest: Manifest,
    target: super::Postgres,
    db: String,
    how: PgRestore,
}

#[async_trait::async_trait(?Send)]
impl crate::restore::Apply for Apply {
    async fn apply(
        self: Box<Self>,
        repo: &Repository,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        progress: std::sync::Arc<dyn Progress>,
    ) -> Result<Outcome> {
        let started = std::time::Instant::now();
        let (created, times) = restore_postgres(
            repo,
            &self.manifest,
            &self.target,
            &self.db,
            &self.how,
            identities,
            progress,
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(Outcome {
            result: serde_json::json!({
                "restored": true,
                "created_database": created,
                "seconds": seconds,
                "download_seconds": times.download_seconds,
                "restore_seconds": times.restore_seconds,
                "index_build_seconds": times.index_build_seconds,
            }),
            lines: vec![format!(
                "restored backup {} into {} in {seconds:.1} s (download {:.1} s, restore {:.1} s, index build {:.1} s)",
                self.manifest.id,
                self.db,
                times.download_seconds,
                times.restore_seconds,
                times.index_build_seconds
            )],
        })
    }
}
