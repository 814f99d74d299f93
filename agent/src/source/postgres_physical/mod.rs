//! Physical PostgreSQL sources: base backups of the whole cluster over the replication protocol.
//!
//! `pg_basebackup -D - -Ft -X fetch` streams one tar to stdout: every file of the cluster, the WAL
//! written while it ran (so each base backup restores on its own, even without a WAL archive)
//! and the server's `backup_manifest` last, which the verifier hands to `pg_verifybackup`. The tar
//! goes through the pipeline like every other stream and never lands on the agent's disk;
//! [`tar::TarObserver`] reads the start LSN, timeline, system identifier and stop LSN from it as
//! it passes. pg_basebackup rather than a native `BASE_BACKUP` client: it is the server's own
//! tool, it speaks every server version's protocol, and its tar is what every PostgreSQL
//! operator already knows how to unpack; its stdout is a stream, so nothing is lost by it.
//!
//! Connection settings, the passfile (never argv) and TLS are a logical source's
//! ([`crate::source::postgres`]); a role with REPLICATION is needed.

pub mod archive;
pub mod fetch;
pub mod pitr;
pub mod policy;
pub mod replication;
pub mod restore;
pub mod start;
pub mod tar;
pub mod timeline;
pub mod verify;
pub mod wal;

pub use policy::{Checkpoint, PhysicalConfig, RawPhysicalSource, WalSettings};

use std::ffi::OsString;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::postgres::Postgres;
use super::{BackupContext, Source, SourceBackup};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline;
use crate::repo::layout;
use crate::repo::manifest::Role;
use crate::repo::origin::Origin;

/// Object name of the base backup.
pub const BASE_OBJECT: &str = "base.tar.zst.age";

/// A WAL location, written as PostgreSQL does (`0/4000028`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Lsn, String> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not an LSN (write it as 0/4000028)"))?;
        let part = |p: &str| {
            u32::from_str_radix(p, 16)
                .map_err(|_| format!("`{s}` is not an LSN (write it as 0/4000028)"))
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Lsn, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where a base backup sits in the cluster's history; recorded in the (plaintext) manifest,
/// since restore planning and the WAL chain are read from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseBackupInfo {
    /// The cluster's system identifier (`pg_control`): WAL of another cluster never applies.
    pub system_identifier: String,
    /// The timeline the backup started on.
    pub timeline: u32,
    /// Where replay of this backup starts (`START WAL LOCATION`).
    pub start_lsn: Lsn,
    /// The first LSN at which the restored cluster is consistent (the end of the backup).
    pub stop_lsn: Lsn,
    /// The first WAL segment the backup needs.
    pub start_wal_file: String,
    /// The server's WAL segment size.
    #[serde(default = "default_segment_size")]
    pub wal_segment_size: u64,
}

fn default_segment_size() -> u64 {
    16 << 20
}

/// What a base backup's fingerprint holds (`fingerprint.json.age`): what the verifier must find
/// once the backup is restored and the server started on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Format version.
    pub format: u32,
    /// Always `postgres-physical`.
    pub kind: super::Kind,
    /// The source server's version.
    pub server_version: String,
    /// The role the cluster was created with (`oid` 10): the restored cluster's superuser.
    pub bootstrap_superuser: String,
    /// Databases that existed when the backup started (templates excluded).
    pub databases: Vec<String>,
    /// The backup's place in the cluster's history.
    pub base: BaseBackupInfo,
    /// Files in the tar.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A physical PostgreSQL source.
#[derive(Debug, Clone)]
pub struct Physical {
    cfg: PhysicalConfig,
    pg: Postgres,
}

/// What the server says about the backing-up role and its settings, before a backup starts.
struct Readiness {
    user: String,
    replication: bool,
    wal_level: String,
    max_wal_senders: i64,
    senders_in_use: i64,
    bootstrap_superuser: String,
    databases: Vec<String>,
    wal_segment_size: u64,
}

impl Physical {
    /// The source for `cfg`.
    pub fn new(cfg: PhysicalConfig) -> Self {
        let pg = Postgres::new(cfg.connection.clone());
        Physical { cfg, pg }
    }

    fn where_(&self) -> String {
        format!("PostgreSQL at {}", self.cfg.connection.url_redacted)
    }

    async fn readiness(&self, c: &super::postgres::Connection) -> Result<Readiness> {
        let row = c
            .client
            .query_one(
                "select current_user::text, (select rolreplication or rolsuper from pg_roles where rolname = current_user), \
                 current_setting('wal_level'), current_setting('max_wal_senders')::int8, \
                 (select count(*) from pg_stat_activity where backend_type = 'walsender'), \
                 (select rolname::text from pg_roles where oid = 10), \
                 array(select datname::text from pg_database where not datistemplate order by 1), \
                 (select setting::int8 from pg_settings where name = 'wal_segment_size')",
                &[],
            )
            .await
            .map_err(|e| self.pg.query_error("reading the replication settings", e))?;
        Ok(Readiness {
            user: row.get(0),
            replication: row.get::<_, Option<bool>>(1).unwrap_or(false),
            wal_level: row.get(2),
            max_wal_senders: row.get(3),
            senders_in_use: row.get(4),
            bootstrap_superuser: row.get(5),
            databases: row.get(6),
            wal_segment_size: row.get::<_, i64>(7) as u64,
        })
    }

    /// Refuses, with the setting to change, what would make pg_basebackup fail.
    fn check_ready(&self, r: &Readiness) -> Result<()> {
        if !r.replication {
            return Err(Error::new(
                ErrorKind::Credential,
                format!(
                    "{}: role {} may not start a base backup: it lacks REPLICATION",
                    self.where_(),
                    r.user
                ),
            )
            .hint(format!(
                "run ALTER ROLE {} REPLICATION as a superuser, or use a role that has it (RUNBOOK.md#physical-setup)",
                super::postgres::quote_ident(&r.user)
            )));
        }
        if r.wal_level == "minimal" {
            return Err(Error::failed(format!(
                "{}: wal_level is minimal, which allows no base backup",
                self.where_()
            ))
            .hint("set wal_level = replica in postgresql.conf and restart the server (RUNBOOK.md#physical-setup)"));
        }
        if r.senders_in_use >= r.max_wal_senders {
            return Err(Error::failed(format!(
                "{}: every WAL sender is in use ({} of max_wal_senders = {})",
                self.where_(),
                r.senders_in_use,
                r.max_wal_senders
            ))
            .hint("raise max_wal_senders (a restart is needed) or stop a replication client (RUNBOOK.md#physical-setup)"));
        }
        Ok(())
    }

    /// Keeps the server from removing the WAL the backup needs until it is fetched at the end: a
    /// temporary slot, reserved now (at the last checkpoint's redo point, before the backup's
    /// own), held by this session and dropped by the server when the session ends, however it
    /// ends. Without it, checkpoints during a long backup may recycle the backup's first segments.
    async fn hold_wal(&self, c: &super::postgres::Connection, id: &str) -> Result<()> {
        let slot = format!("lifeboat_base_{}", id.to_lowercase().replace('-', "_"));
        c.client
            .query_one(
                "select pg_create_physical_replication_slot($1, true, true)",
                &[&slot],
            )
            .await
            .map_err(|e| {
                self.pg
                    .query_error("reserving the backup's WAL (a temporary replication slot)", e)
                    .hint("a free replication slot is needed while a base backup runs: raise max_replication_slots (a restart is needed) or drop an unused slot (RUNBOOK.md#physical-setup)")
            })?;
        Ok(())
    }

    /// Gives pg_basebackup's own errors the setting to change.
    fn basebackup_error(&self, e: Error) -> Error {
        let m = e.message.clone();
        let has = |s: &str| m.contains(s);
        if has("no pg_hba.conf entry for replication connection")
            || has("pg_hba.conf rejects replication connection")
        {
            e.kind(ErrorKind::Credential).hint(
                "add a `host replication ROLE ADDRESS scram-sha-256` line to pg_hba.conf and reload the server (RUNBOOK.md#physical-setup)",
            )
        } else if has("must be superuser or replication role") {
            e.kind(ErrorKind::Credential)
                .hint("run ALTER ROLE … REPLICATION as a superuser (RUNBOOK.md#physical-setup)")
        } else if has("password authentication failed") {
            e.kind(ErrorKind::Credential)
                .hint("check the password (password_file or ${VAR} in url) (RUNBOOK.md#source-unreachable)")
        } else if has("max_wal_senders") || has("too many clients") {
            e.hint("raise max_wal_senders (a restart is needed) or stop a replication client (RUNBOOK.md#physical-setup)")
        } else if has("single tablespace") {
            e.hint("this cluster has tablespaces besides pg_default and pg_global; a base backup streamed to the repository holds one tablespace only: move them into the data directory's own (ALTER TABLE … SET TABLESPACE pg_default)")
        } else {
            e
        }
    }
}

/// The first WAL segment's name from `backup_label`'s `START WAL LOCATION: 0/4000028 (file …)`.
fn label_field<'a>(label: &'a str, key: &str) -> Option<&'a str> {
    label
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim_start_matches(':').trim())
}

/// The backup's place in history, from what the tar held.
fn base_info(
    summary: &tar::TarSummary,
    wal_segment_size: u64,
) -> std::result::Result<BaseBackupInfo, String> {
    let label = summary
        .backup_label
        .as_deref()
        .ok_or("the tar holds no backup_label")?;
    let start =
        label_field(label, "START WAL LOCATION").ok_or("backup_label has no START WAL LOCATION")?;
    let (start_lsn, file) = start
        .split_once(" (file ")
        .ok_or("backup_label's START WAL LOCATION is not `LSN (file NAME)`")?;
    let timeline = label_field(label, "START TIMELINE")
        .and_then(|t| t.parse().ok())
        .ok_or("backup_label has no START TIMELINE")?;
    let head = &summary.pg_control_head;
    if head.len() < 8 {
        return Err("the tar holds no global/pg_control".into());
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&head[..8]);
    // ControlFileData starts with the system identifier, in the server's byte order: little
    // endian on every platform PostgreSQL images ship for.
    let system_identifier = u64::from_le_bytes(id).to_string();
    let tail = summary
        .manifest_tail
        .as_deref()
        .ok_or("the tar holds no backup_manifest")?;
    let end = tail
        .rfind("\"End-LSN\"")
        .and_then(|i| tail[i..].split('"').nth(3))
        .ok_or("backup_manifest names no WAL range")?;
    Ok(BaseBackupInfo {
        system_identifier,
        timeline,
        start_lsn: start_lsn.parse()?,
        stop_lsn: end.parse()?,
        start_wal_file: file.trim_end_matches(')').to_string(),
        wal_segment_size,
    })
}

#[async_trait]
impl Source for Physical {
    async fn probe(&self) -> Result<()> {
        let c = self.pg.connect().await?;
        self.check_ready(&self.readiness(&c).await?)?;
        self.pg.find_tool("pg_basebackup", c.server_major).await?;
        Ok(())
    }

    async fn backup(&self, ctx: &BackupContext) -> Result<SourceBackup> {
        let c = self.pg.connect().await?;
        let ready = self.readiness(&c).await?;
        self.check_ready(&ready)?;
        let (tool, tool_version) = self.pg.find_tool("pg_basebackup", c.server_major).await?;
        self.hold_wal(&c, &ctx.id).await?;
        let (env, _passfile) = self.pg.child_env(&c)?;
        let mut args: Vec<OsString> = vec![
            "--pgdata=-".into(),
            "--format=tar".into(),
            "--wal-method=fetch".into(),
            format!("--checkpoint={}", self.cfg.checkpoint.arg()).into(),
            format!("--label=lifeboat {}", ctx.id).into(),
            "--no-password".into(),
        ];
        if let Some(rate) = self.cfg.max_rate {
            args.push(format!("--max-rate={}k", rate / 1024).into());
        }
        tracing::debug!(source = %ctx.source, backup = %ctx.id, tool = %tool.display(), "Taking a base backup");
        let running = super::child::spawn(&tool, &args, &env, "pg_basebackup".into())?;
        let key = layout::backup_object(&ctx.source, &ctx.id, BASE_OBJECT);
        let (digests, observer) = pipeline::run(
            running.stdout,
            running.verdict,
            tar::TarObserver::default(),
            ctx.store.clone(),
            key,
            &ctx.pipeline,
            ctx.cancel.clone(),
        )
        .await
        .map_err(|e| self.basebackup_error(Error::from(e)))?;
        let summary = observer.finish().map_err(|why| {
            Error::failed(format!(
                "pg_basebackup's output is not a base backup: {why}"
            ))
        })?;
        let base = base_info(&summary, ready.wal_segment_size).map_err(|why| {
            Error::failed(format!(
                "pg_basebackup's output is not a base backup: {why}"
            ))
        })?;
        tracing::debug!(source = %ctx.source, backup = %ctx.id, start_lsn = %base.start_lsn, stop_lsn = %base.stop_lsn, timeline = base.timeline, "Base backup stored");
        let fingerprint = serde_json::to_value(Fingerprint {
            format: 1,
            kind: super::Kind::PostgresPhysical,
            server_version: c.server_version.clone(),
            bootstrap_superuser: ready.bootstrap_superuser,
            databases: ready.databases,
            base: base.clone(),
            files: summary.files,
            bytes: summary.bytes,
        })
        .map_err(|e| Error::failed(format!("cannot encode the fingerprint: {e}")))?;
        Ok(SourceBackup {
            parts: vec![digests.part(BASE_OBJECT, Role::Cluster, "tar")],
            fingerprint,
            source_version: Some(format!("PostgreSQL {}", c.server_version)),
            dump_tool_version: Some(tool_version),
            origin: Some(
                Origin::new(format!("postgresql system {}", base.system_identifier))
                    .detail("timeline", base.timeline.to_string()),
            ),
            base_backup: Some(base),
            shards: Vec::new(),
            database: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_read_and_print_as_postgresql_writes_them() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/4000028".parse::<Lsn>().unwrap().to_string(), "0/4000028");
        assert!("4000028".parse::<Lsn>().is_err());
        assert!("0/xyz".parse::<Lsn>().is_err());
    }

    #[test]
    fn the_backups_place_comes_from_label_control_and_manifest() {
        let summary = tar::TarSummary {
            backup_label: Some("START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\nCHECKPOINT LOCATION: 0/4000060\nSTART TIMELINE: 1\n".into()),
            pg_control_head: vec![0x85, 0x6c, 0x66, 0x7a, 0xed, 0x20, 0x10, 0x6b, 0, 0],
            manifest_tail: Some("\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/4000028\", \"End-LSN\": \"0/4000100\" }\n],".into()),
            files: 3,
            bytes: 10,
            complete: true,
        };
        let b = base_info(&summary, 16 << 20).unwrap();
        assert_eq!(b.system_identifier, "7714702366018530437");
        assert_eq!(b.timeline, 1);
        assert_eq!(b.start_lsn.to_string(), "0/4000028");
        assert_eq!(b.stop_lsn.to_string(), "0/4000100");
        assert_eq!(b.start_wal_file, "000000010000000000000004");
        let mut no_manifest = summary.clone();
        no_manifest.manifest_tail = None;
        assert!(base_info(&no_manifest, 16 << 20)
            .unwrap_err()
            .contains("backup_manifest"));
    }
}
