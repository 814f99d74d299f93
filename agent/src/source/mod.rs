//! Sources: one trait, one file per kind, and the registry that maps a policy's kind to its code.
//!
//! A source turns a live system into one or more plaintext streams that the pipeline stores, plus
//! a fingerprint of what those streams hold, taken at the same instant. The job writes the manifest
//! only after every stream a source produced is stored.

pub mod child;
pub mod globals;
pub mod objects;
pub mod pgdump;
pub mod postgres;
pub mod rdb;
pub mod redis;
pub mod redis_load;

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::pipeline::PipelineConfig;
use crate::policy::{Secret, SourceConfig, SourcePolicy};
use crate::repo::manifest::Part;
use crate::store::ObjectStore;

/// What a source needs to store a backup.
#[derive(Debug, Clone)]
pub struct BackupContext {
    /// The repository's store.
    pub store: Arc<dyn ObjectStore>,
    /// Pipeline settings.
    pub pipeline: PipelineConfig,
    /// Source name.
    pub source: String,
    /// Backup id.
    pub id: String,
    /// Fires on timeout, shutdown or Ctrl-C.
    pub cancel: CancellationToken,
}

/// What a source stored.
#[derive(Debug, Clone)]
pub struct SourceBackup {
    /// The data objects, already stored.
    pub parts: Vec<Part>,
    /// What the verifier must find after a restore (stored encrypted).
    pub fingerprint: serde_json::Value,
    /// The server's version.
    pub source_version: Option<String>,
    /// The dump tool's version.
    pub dump_tool_version: Option<String>,
}

/// A kind of source.
#[async_trait]
pub trait Source: Send + Sync {
    /// Checks that the source is reachable and usable the way a backup would use it.
    async fn probe(&self) -> Result<()>;
    /// Streams a backup into the store; publishes nothing visible (the job writes the manifest).
    async fn backup(&self, ctx: &BackupContext) -> Result<SourceBackup>;
}

/// Reads a password file (a mounted Secret), without its trailing newline.
pub fn read_password_file(file: &std::path::Path) -> Result<Secret> {
    let pw = std::fs::read_to_string(file).map_err(|e| {
        crate::error::Error::new(
            crate::error::ErrorKind::Credential,
            format!("cannot read password_file {}: {e}", file.display()),
        )
        .hint("mount the secret at that path or fix password_file")
    })?;
    Ok(Secret::new(pw.trim_end_matches(['\n', '\r']).to_string()))
}

/// The registry: the code for a policy's source. `index_key` is `[encryption]`'s (objects).
pub fn from_policy(policy: &SourcePolicy, index_key: Option<&Secret>) -> Box<dyn Source> {
    match &policy.config {
        SourceConfig::Postgres(pg) => Box::new(postgres::Postgres::new(pg.clone())),
        SourceConfig::Redis(r) => Box::new(redis::Redis::new(r.clone())),
        SourceConfig::Objects(o) => Box::new(objects::Objects::new(o.clone(), index_key.cloned())),
    }
}
