//! Sources: one folder per kind, one trait each kind implements, and the one table of kinds.
//!
//! A source turns a live system into one or more plaintext streams that the pipeline stores, plus
//! a fingerprint of what those streams hold, taken at the same instant. The job writes the manifest
//! only after every stream a source produced is stored.
//!
//! Everything that knows a kind lives in its folder (`postgres/`, `postgres_physical/`, `redis/`,
//! `objects/`): its policy section, capture, restore and what its backups hold. The `kinds!` table
//! below is the one place a kind is registered; it generates [`Kind`], [`RawSource`] and
//! [`SourceConfig`] and every dispatch over them, so the compiler finds each place a new kind must
//! fill.

pub mod child;
pub mod objects;
pub mod postgres;
pub mod postgres_physical;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::PipelineConfig;
use crate::policy::{EncryptionConfig, Problems, Secret, SourceContext, SourcePolicy};
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
    /// Counts the requests made of the source, when it is an object store (the repository's
    /// are counted by `store`).
    pub source_requests: Arc<crate::store::counted::Requests>,
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
    /// Physical PostgreSQL sources: the base backup's place in the WAL history.
    pub base_backup: Option<postgres_physical::BaseBackupInfo>,
    /// PostgreSQL dumps: the database's encoding and locale.
    pub database: Option<crate::repo::manifest::DatabaseInfo>,
    /// What the backup was taken from.
    pub origin: Option<crate::repo::origin::Origin>,
    /// A Redis Cluster's shards (none for other sources).
    pub shards: Vec<crate::repo::manifest::ShardSummary>,
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

/// What a kind registers in the table: its policy section and the code that backs it up.
/// Implemented by the kind's typed settings (Vector's per-component config is the model).
#[async_trait]
pub trait SourceKind: Clone + std::fmt::Debug + Send + Sync + Sized + 'static {
    /// The `kind` written in policies and manifests.
    const NAME: &'static str;
    /// Whether a change of origin between two backups means another system (the verifier fails
    /// it unless the source's `moved_at` expects it). Not for Redis, whose ids a restart that
    /// loses its replication history renews: there the change is a note.
    const ORIGIN_IS_STABLE: bool = true;
    /// Its `[[sources]]` table as written: serde, unknown keys rejected.
    type Raw: serde::de::DeserializeOwned + schemars::JsonSchema + Clone + std::fmt::Debug;
    /// Validates a `[[sources]]` table at `path` (e.g. `sources[2]`), recording every problem.
    fn validate(
        path: &str,
        raw: Self::Raw,
        ctx: &SourceContext<'_>,
        p: &mut Problems,
    ) -> Option<SourcePolicy>;
    /// The code that backs this source up.
    fn source(&self, encryption: &EncryptionConfig) -> Box<dyn Source>;
    /// The verifier's steps for this source's backups (see `verify::Steps`).
    fn verify_steps(&self) -> Box<dyn crate::verify::Steps>;
    /// Plans the restore of one of this kind's backups (see `restore::Plan`).
    async fn plan_restore(request: &crate::restore::Request<'_>) -> Result<crate::restore::Plan>;
    /// What `check` reads of one of this kind's backups beyond the objects its manifest names
    /// (an objects backup's blobs). Most kinds have nothing more.
    async fn check_more(
        _ctx: &mut crate::check::Context<'_>,
        _manifest: &crate::repo::manifest::Manifest,
    ) -> Result<()> {
        Ok(())
    }
    /// What a copy of `source` needs besides its backups' own objects, for the backups it keeps
    /// (`keeping`): the content this kind shares between backups (an objects backup's blobs, a
    /// physical source's WAL from the oldest kept base backup on). Most kinds share nothing.
    async fn shared_for_copy(
        _repo: &crate::repo::Repository,
        _source: &str,
        _keeping: &[&crate::repo::manifest::Manifest],
    ) -> Result<Option<crate::copy::Shared>> {
        Ok(None)
    }
    /// What prune collects of `source` once backups are gone: content this kind shares between
    /// backups (objects' blobs, a physical source's WAL) that no published backup but those in
    /// `ignoring` (source, id) needs.
    /// Most kinds share nothing.
    async fn plan_shared_collection(
        _repo: &crate::repo::Repository,
        _source: &str,
        _policy: &crate::policy::Policy,
        _now: chrono::DateTime<chrono::Utc>,
        _ignoring: &std::collections::HashSet<(String, String)>,
    ) -> Result<Option<crate::collect::CollectionPlan>> {
        Ok(None)
    }
}

/// The one table of kinds: a variant name and the typed settings that implement [`SourceKind`].
macro_rules! kinds {
    ($($(#[doc = $doc:literal])* $variant:ident => $config:ty,)+) => {
        /// A kind of source, as named by `kind = "…"` in policies and manifests.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Kind {
            /// Every kind, in the table's order.
            pub const ALL: &'static [Kind] = &[$(Kind::$variant,)+];

            /// The name written in policies and manifests.
            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$variant => <$config as SourceKind>::NAME,)+
                }
            }

            /// Whether a change of origin means another system (see `SourceKind::ORIGIN_IS_STABLE`).
            pub fn origin_is_stable(self) -> bool {
                match self {
                    $(Kind::$variant => <$config as SourceKind>::ORIGIN_IS_STABLE,)+
                }
            }

            /// Plans the restore of a backup of this kind.
            pub async fn plan_restore(
                self,
                request: &crate::restore::Request<'_>,
            ) -> Result<crate::restore::Plan> {
                match self {
                    $(Kind::$variant => <$config as SourceKind>::plan_restore(request).await,)+
                }
            }

            /// What `check` reads of a backup of this kind beyond its manifest's objects.
            pub async fn check_more(
                self,
                ctx: &mut crate::check::Context<'_>,
                manifest: &crate::repo::manifest::Manifest,
            ) -> Result<()> {
                match self {
                    $(Kind::$variant => <$config as SourceKind>::check_more(ctx, manifest).await,)+
                }
            }

            /// Each kind's `[[sources]]` schema: (kind, definition name, schema).
            pub fn raw_schemas(
                generator: &mut schemars::SchemaGenerator,
            ) -> Vec<(Kind, String, schemars::Schema)> {
                use schemars::JsonSchema;
                vec![$((
                    Kind::$variant,
                    <<$config as SourceKind>::Raw as JsonSchema>::schema_name().into_owned(),
                    generator.subschema_for::<<$config as SourceKind>::Raw>(),
                ),)+]
            }
        }

        /// A `[[sources]]` table as written, by kind.
        #[derive(Debug, Clone)]
        pub enum RawSource {
            $($(#[doc = $doc])* $variant(<$config as SourceKind>::Raw),)+
        }

        impl RawSource {
            /// Deserializes a `[[sources]]` table whose `kind` is `kind`.
            pub fn deserialize(
                kind: Kind,
                path: &str,
                value: toml::Value,
                p: &mut Problems,
            ) -> Option<RawSource> {
                match kind {
                    $(Kind::$variant => crate::policy::section(path, value, p).map(RawSource::$variant),)+
                }
            }

            /// Validates it into a source with its settings merged from `[defaults]`.
            pub fn validate(
                self,
                path: &str,
                ctx: &SourceContext<'_>,
                p: &mut Problems,
            ) -> Option<SourcePolicy> {
                match self {
                    $(RawSource::$variant(raw) => <$config as SourceKind>::validate(path, raw, ctx, p),)+
                }
            }
        }

        /// A source's own settings, validated, by kind.
        #[derive(Debug, Clone)]
        pub enum SourceConfig {
            $($(#[doc = $doc])* $variant($config),)+
        }

        impl SourceConfig {
            /// The kind.
            pub fn kind(&self) -> Kind {
                match self {
                    $(SourceConfig::$variant(_) => Kind::$variant,)+
                }
            }

            /// The code that backs this source up.
            pub fn source(&self, encryption: &EncryptionConfig) -> Box<dyn Source> {
                match self {
                    $(SourceConfig::$variant(c) => c.source(encryption),)+
                }
            }

            /// The verifier's steps for this source's backups.
            pub fn verify_steps(&self) -> Box<dyn crate::verify::Steps> {
                match self {
                    $(SourceConfig::$variant(c) => c.verify_steps(),)+
                }
            }

            /// What a copy needs of this kind's shared content (see [`SourceKind`]).
            pub async fn shared_for_copy(
                &self,
                repo: &crate::repo::Repository,
                source: &str,
                keeping: &[&crate::repo::manifest::Manifest],
            ) -> Result<Option<crate::copy::Shared>> {
                match self {
                    $(SourceConfig::$variant(_) => {
                        <$config as SourceKind>::shared_for_copy(repo, source, keeping).await
                    })+
                }
            }

            /// What prune collects for this kind once backups are gone (see [`SourceKind`]).
            pub async fn plan_shared_collection(
                &self,
                repo: &crate::repo::Repository,
                source: &str,
                policy: &crate::policy::Policy,
                now: chrono::DateTime<chrono::Utc>,
                ignoring: &std::collections::HashSet<(String, String)>,
            ) -> Result<Option<crate::collect::CollectionPlan>> {
                match self {
                    $(SourceConfig::$variant(_) => {
                        <$config as SourceKind>::plan_shared_collection(repo, source, policy, now, ignoring).await
                    })+
                }
            }
        }
    };
}

kinds! {
    /// A PostgreSQL database: logical dumps.
    Postgres => postgres::PostgresConfig,
    /// A PostgreSQL cluster: base backups.
    PostgresPhysical => postgres_physical::PhysicalConfig,
    /// A Redis server.
    Redis => redis::RedisConfig,
    /// A directory tree or an S3 bucket.
    Objects => objects::ObjectsConfig,
}

impl Kind {
    /// The kind named `name`, if this version knows it.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Every kind's name, for messages: `` `postgres`, `redis`, `objects` ``.
    pub fn names() -> String {
        Kind::ALL
            .iter()
            .map(|k| format!("`{}`", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Kind> {
        Kind::from_name(s).ok_or_else(|| {
            Error::new(
                ErrorKind::Invalid,
                format!(
                    "unknown source kind `{s}`; this lifeboat knows {}",
                    Kind::names()
                ),
            )
            .hint("a newer lifeboat wrote it: upgrade lifeboat to read it")
        })
    }
}

impl serde::Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Kind, D::Error> {
        let name = String::deserialize(d)?;
        Kind::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown source kind `{name}` (this lifeboat knows {}; a newer one wrote it: upgrade lifeboat)",
                Kind::names()
            ))
        })
    }
}
