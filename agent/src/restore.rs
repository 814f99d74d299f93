//! Reading backups back: fetch → check SHA-256 → decrypt → decompress.
//!
//! The guarantee, for the verifier and `lifeboat restore` alike: **every stored object is
//! downloaded to a spool file and its SHA-256 and size checked against the manifest before a single
//! byte is decrypted or applied.** The spool holds ciphertext only. While the plaintext streams into
//! pg_restore its SHA-256 is checked as well; age authenticates every 64 KiB chunk, so a plaintext
//! that differs can only come from a manifest that lies, and it stops the restore with exit 13.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::repo::layout;
use crate::repo::manifest::{Manifest, Part};
use crate::repo::Repository;

/// Reports a long operation's phases and bytes (a progress bar on a terminal, lines otherwise).
pub trait Progress: Send + Sync {
    /// A new phase begins; `total` bytes if known.
    fn phase(&self, what: &str, total: Option<u64>);
    /// `bytes` more of the current phase are done.
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _what: &str, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
}

/// Counts the bytes read through it into a [`Progress`].
struct Counting {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    progress: std::sync::Arc<dyn Progress>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = self.inner.as_mut().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            self.progress.advance((buf.filled().len() - before) as u64);
        }
        r
    }
}

/// A stored object downloaded to a spool file, its stored SHA-256 and size already checked.
pub struct Spooled {
    /// The part it holds.
    pub part: Part,
    /// The ciphertext file (deleted on drop).
    pub file: tempfile::NamedTempFile,
}

/// Downloads `part` into a file in `dir`, checking the stored SHA-256 and size (exit 13 on mismatch).
pub async fn spool(
    repo: &Repository,
    manifest: &Manifest,
    part: &Part,
    dir: &std::path::Path,
    progress: &dyn Progress,
) -> Result<Spooled> {
    use tokio::io::AsyncWriteExt;
    let key = layout::backup_object(&manifest.source, &manifest.id, &part.name);
    let file = tempfile::Builder::new()
        .prefix("lifeboat-spool-")
        .tempfile_in(dir)
        .map_err(|e| {
            Error::failed(format!(
                "cannot create a spool file in {}: {e}",
                dir.display()
            ))
            .hint("pass --spool-dir with room for the stored backup")
        })?;
    let mut out = tokio::fs::File::from_std(
        file.reopen()
            .map_err(|e| Error::failed(format!("cannot open the spool file: {e}")))?,
    );
    let mut r = repo
        .store
        .open(&key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let got = r
            .read(&mut buf)
            .await
            .map_err(|e| Error::failed(format!("reading {key}: {e}")))?;
        if got == 0 {
            break;
        }
        hasher.update(&buf[..got]);
        n += got as u64;
        progress.advance(got as u64);
        out.write_all(&buf[..got]).await.map_err(|e| {
            Error::failed(format!("writing the spool file in {}: {e}", dir.display()))
                .hint("pass --spool-dir with room for the stored backup")
        })?;
    }
    out.flush()
        .await
        .map_err(|e| Error::failed(format!("writing the spool file: {e}")))?;
    let digest = hex::encode(hasher.finalize());
    if digest != part.sha256_stored || n != part.size_stored {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{key}: SHA-256 {digest} ({n} bytes), the manifest says {} ({} bytes)",
                part.sha256_stored, part.size_stored
            ),
        )
        .hint("nothing was applied; use another backup and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)"));
    }
    Ok(Spooled {
        part: part.clone(),
        file,
    })
}

/// Checks the plaintext SHA-256 and size at EOF; a mismatch is a read error, so a consumer such as
/// pg_restore is stopped instead of finishing on the wrong data.
struct PlainCheck<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
    want_sha: String,
    want_size: u64,
    name: String,
}

impl<R: AsyncRead + Unpin> AsyncRead for PlainCheck<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new_len = buf.filled().len() - before;
                if new_len == 0 {
                    let digest = hex::encode(self.hasher.clone().finalize());
                    if digest != self.want_sha || self.size != self.want_size {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{}: plaintext SHA-256 {digest} ({} bytes), the manifest says {} ({} bytes)",
                                self.name, self.size, self.want_sha, self.want_size
                            ),
                        )));
                    }
                } else {
                    let chunk = buf.filled()[before..].to_vec();
                    self.hasher.update(&chunk);
                    self.size += new_len as u64;
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl Spooled {
    /// The plaintext, decrypted and decompressed from the spool file, checked at EOF.
    pub async fn plaintext(
        &self,
        identities: &[Box<dyn age::Identity + Send + Sync>],
    ) -> Result<Pin<Box<dyn AsyncRead + Send>>> {
        let f = tokio::fs::File::open(self.file.path())
            .await
            .map_err(|e| Error::failed(format!("cannot open the spool file: {e}")))?;
        let reader = pipeline::decrypt_stream(
            Box::pin(tokio::io::BufReader::with_capacity(256 << 10, f)),
            identities,
        )
        .await
        .map_err(|e| e.context(&self.part.name))?;
        Ok(Box::pin(PlainCheck {
            inner: reader,
            hasher: Sha256::new(),
            size: 0,
            want_sha: self.part.sha256_plain.clone(),
            want_size: self.part.size_plain,
            name: self.part.name.clone(),
        }))
    }

    /// Writes the checked plaintext to a file in `dir` (for parallel pg_restore).
    pub async fn plaintext_file(
        &self,
        identities: &[Box<dyn age::Identity + Send + Sync>],
        dir: &std::path::Path,
        progress: std::sync::Arc<dyn Progress>,
    ) -> Result<tempfile::NamedTempFile> {
        let file = tempfile::Builder::new()
            .prefix("lifeboat-plain-")
            .tempfile_in(dir)
            .map_err(|e| {
                Error::failed(format!(
                    "cannot create a spool file in {}: {e}",
                    dir.display()
                ))
            })?;
        let mut out = tokio::fs::File::from_std(
            file.reopen()
                .map_err(|e| Error::failed(format!("cannot open the spool file: {e}")))?,
        );
        let mut r = Counting {
            inner: self.plaintext(identities).await?,
            progress,
        };
        tokio::io::copy(&mut r, &mut out).await.map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                Error::new(ErrorKind::Integrity, e.to_string())
            } else {
                Error::failed(format!("spooling the plaintext in {}: {e}", dir.display()))
            }
        })?;
        Ok(file)
    }
}

/// The part of `manifest` with `role` (`database`, `snapshot`…); missing is an integrity failure.
pub fn part<'a>(manifest: &'a Manifest, role: &str) -> Result<&'a Part> {
    manifest
        .parts
        .iter()
        .find(|p| p.role == role)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Integrity,
                format!("backup {} has no {role} part", manifest.id),
            )
        })
}

/// Reads and decrypts a backup's fingerprint, checking its stored SHA-256 first.
pub async fn fingerprint(
    repo: &Repository,
    manifest: &Manifest,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<serde_json::Value> {
    let Some(f) = &manifest.fingerprint else {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!("backup {} has no fingerprint", manifest.id),
        ));
    };
    let key = layout::backup_object(&manifest.source, &manifest.id, &f.name);
    let bytes = repo
        .store
        .get(&key)
        .await
        .map_err(|e| Error::from(e).context(format!("reading {key}")))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    if digest != f.sha256_stored {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "{key}: SHA-256 {digest}, the manifest says {}",
                f.sha256_stored
            ),
        ));
    }
    let decryptor = age::Decryptor::new(&bytes[..])
        .map_err(|e| Error::new(ErrorKind::Integrity, format!("{key}: not an age file: {e}")))?;
    let mut r = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| Error::new(ErrorKind::Credential, format!("{key}: cannot decrypt: {e}")))?;
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut plain)
        .map_err(|e| Error::new(ErrorKind::Integrity, format!("{key}: {e}")))?;
    serde_json::from_slice(&plain)
        .map_err(|e| Error::new(ErrorKind::Integrity, format!("{key}: not JSON: {e}")))
}

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
pub fn target_config(url: &str) -> Result<(crate::policy::PostgresConfig, String)> {
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
        crate::policy::PostgresConfig {
            url: crate::policy::Secret::new(url.to_string()),
            url_redacted: crate::policy::redact_url(url),
            password_file: None,
            globals: false,
            fingerprint: crate::policy::FingerprintMode::Counts,
            bin_dir: None,
            tls_ca_file: None,
        },
        db,
    ))
}

/// Looks at the target database without changing anything.
pub async fn inspect_target(
    target: &crate::source::postgres::Postgres,
    db: &str,
) -> Result<TargetState> {
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
pub async fn connect_maintenance(
    target: &crate::source::postgres::Postgres,
) -> Result<crate::source::postgres::Connection> {
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
    /// Parallel pg_restore jobs (spools the plaintext when above 1).
    pub jobs: u32,
    /// Where spool files go.
    pub spool_dir: std::path::PathBuf,
    /// Skip ownership.
    pub no_owner: bool,
}

/// Restores a PostgreSQL backup into `db` on `target`: every object is spooled and checked first
/// (exit 13, target untouched), then the database is created if missing, roles replayed if asked,
/// and pg_restore runs. Returns whether the database was created.
pub async fn restore_postgres(
    repo: &Repository,
    manifest: &Manifest,
    target: &crate::source::postgres::Postgres,
    db: &str,
    how: &PgRestore,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    progress: std::sync::Arc<dyn Progress>,
) -> Result<bool> {
    use crate::source::postgres::{quote_ident, RestoreInput, RestoreOptions};
    let mut parts = Vec::new();
    for part in &manifest.parts {
        if part.role == "database" || (part.role == "globals" && how.with_globals) {
            progress.phase(
                &format!("downloading and checking {}", part.name),
                Some(part.size_stored),
            );
            parts.push(spool(repo, manifest, part, &how.spool_dir, progress.as_ref()).await?);
        }
    }
    let dump = parts
        .iter()
        .find(|p| p.part.role == "database")
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Integrity,
                format!("backup {} has no database part", manifest.id),
            )
        })?;
    // The identity must open every part before anything is created on the target: a wrong key
    // is exit 12 with the target untouched, not an empty database left behind.
    for p in &parts {
        drop(p.plaintext(identities).await?);
    }
    if how.with_globals && !parts.iter().any(|p| p.part.role == "globals") {
        return Err(Error::failed(format!(
            "backup {} holds no globals (the source had globals = false)",
            manifest.id
        )));
    }
    let state = inspect_target(target, db).await?;
    let maint = connect_maintenance(target).await?;
    if let Some(g) = parts.iter().find(|p| p.part.role == "globals") {
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
        maint
            .client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(db)))
            .await
            .map_err(|e| Error::failed(format!("creating database {db}: {e}")))?;
    }
    let conn = target.connect().await?;
    let opts = RestoreOptions {
        jobs: how.jobs,
        no_owner: how.no_owner,
        no_privileges: false,
        no_tablespaces: false,
        single_transaction: false,
    };
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
        return r.map(|_| created);
    } else {
        progress.phase("restoring (pg_restore)", Some(dump.part.size_plain));
        RestoreInput::Stream(Box::pin(Counting {
            inner: dump.plaintext(identities).await?,
            progress: progress.clone(),
        }))
    };
    target.pg_restore(&conn, input, &opts).await?;
    Ok(created)
}

/// Where a Redis backup goes.
#[derive(Debug, Clone)]
pub enum RedisDestination {
    /// `DIR/dump.rdb`, for a server to load at start.
    Dir(std::path::PathBuf),
    /// A live server, key by key.
    Live {
        /// The server.
        target: crate::source::redis_load::Target,
        /// `FLUSHALL` first.
        flush: bool,
    },
}

/// What a Redis restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RedisRestored {
    /// The file written (`Dir`).
    pub file: Option<std::path::PathBuf>,
    /// Keys written per database and keys that had expired (`Live`).
    pub moved: Option<crate::source::redis_load::Moved>,
}

/// Restores a Redis backup: the snapshot is spooled and checked first (exit 13, target untouched),
/// then written to `DIR/dump.rdb` through a temp file, or loaded into an ephemeral redis-server
/// whose keys move into the live target with `RESTORE … REPLACE`.
pub async fn restore_redis(
    repo: &Repository,
    manifest: &Manifest,
    destination: &RedisDestination,
    redis_bin_dir: Option<&std::path::Path>,
    spool_dir: &std::path::Path,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    progress: std::sync::Arc<dyn Progress>,
) -> Result<RedisRestored> {
    use crate::source::redis_load;
    let part = part(manifest, "snapshot")?;
    progress.phase(
        &format!("downloading and checking {}", part.name),
        Some(part.size_stored),
    );
    let spooled = spool(repo, manifest, part, spool_dir, progress.as_ref()).await?;
    progress.phase("decrypting", Some(part.size_plain));
    let plain = Counting {
        inner: spooled.plaintext(identities).await?,
        progress: progress.clone(),
    };
    match destination {
        RedisDestination::Dir(dir) => {
            let file = dir.join("dump.rdb");
            redis_load::write_rdb(plain, &file).await?;
            Ok(RedisRestored {
                file: Some(file),
                moved: None,
            })
        }
        RedisDestination::Live { target, flush } => {
            let scratch = redis_load::Scratch::start(redis_bin_dir, plain, false).await?;
            let result = async {
                let loaded = scratch.target().keyspace().await?;
                if *flush {
                    progress.phase(&format!("FLUSHALL on {}", target.shown), None);
                    redis_load::flush_all(target).await?;
                }
                progress.phase(
                    &format!("moving keys into {}", target.shown),
                    Some(loaded.values().map(|v| v.0).sum()),
                );
                let dbs: Vec<u32> = loaded.keys().copied().collect();
                let p = progress.clone();
                redis_load::move_keys(scratch.target(), target, &dbs, &move |n| p.advance(n)).await
            }
            .await;
            scratch.stop().await;
            Ok(RedisRestored {
                file: None,
                moved: Some(result?),
            })
        }
    }
}

/// Where an objects restore writes.
pub enum ObjectsTarget {
    /// A directory.
    Dir(std::path::PathBuf),
    /// A bucket and prefix, as a store; the string is how to show it.
    Store(std::sync::Arc<dyn crate::store::ObjectStore>, String),
}

/// Restores an objects snapshot into `target`: the snapshot is spooled and checked first, then
/// every file is written (through a temp file renamed into place, or an upload completed) only
/// once its content hash matched (exit 13 on the first that does not; what is in place is whole).
pub async fn restore_objects(
    repo: &Repository,
    manifest: &Manifest,
    target: &ObjectsTarget,
    delete_extra: bool,
    spool_dir: &std::path::Path,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    progress: std::sync::Arc<dyn Progress>,
) -> Result<crate::source::objects::Restored> {
    use crate::source::objects;
    let part = part(manifest, "snapshot")?;
    progress.phase(
        "downloading and checking the snapshot",
        Some(part.size_stored),
    );
    let spooled = spool(repo, manifest, part, spool_dir, progress.as_ref()).await?;
    let entries = objects::read_snapshot(&spooled, identities).await?;
    let files = entries
        .iter()
        .filter(|e| e.kind == objects::EntryKind::File)
        .count();
    let shown = match target {
        ObjectsTarget::Dir(d) => d.display().to_string(),
        ObjectsTarget::Store(_, s) => s.clone(),
    };
    progress.phase(
        &format!("restoring {files} file(s) into {shown}"),
        Some(files as u64),
    );
    let p = progress.clone();
    let advance = move |n| p.advance(n);
    match target {
        ObjectsTarget::Dir(dir) => {
            objects::restore_to_dir(
                repo.store.clone(),
                &entries,
                dir,
                identities,
                8,
                delete_extra,
                &advance,
            )
            .await
        }
        ObjectsTarget::Store(store, _) => {
            objects::restore_to_store(
                repo.store.clone(),
                &entries,
                store.clone(),
                identities,
                8,
                delete_extra,
                &advance,
            )
            .await
        }
    }
}
