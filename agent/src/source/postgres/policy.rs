//! The `kind = "postgres"` policy section: as written, validated, and registered as a kind.

use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

use crate::policy::raw::{RawCompression, RawObjectives, RawRetention, RawVerify};
use crate::policy::validate::{check_name, common_raw, common_settings, redact_url, CommonRaw};
use crate::policy::{EncryptionConfig, Problems, Secret, SourceContext, SourcePolicy};
use crate::source::{Source, SourceConfig, SourceKind};

/// `[[sources]]` with `kind = "postgres"`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPostgresSource {
    /// Unique name; used in object keys, metrics and commands.
    pub name: String,
    /// Always `postgres` here.
    pub kind: String,
    /// libpq URL or key=value string; `${VAR}` for secrets.
    pub url: String,
    /// File holding the password, instead of putting it in the URL.
    pub password_file: Option<String>,
    /// Cron expression; overrides `[defaults]`.
    pub schedule: Option<String>,
    /// Longest a run may take; overrides `[defaults]`.
    pub timeout: Option<String>,
    /// Overrides `[defaults]`.
    pub compression: Option<RawCompression>,
    /// Overrides `[defaults]`.
    pub retention: Option<RawRetention>,
    /// Overrides `[defaults]`.
    pub objectives: Option<RawObjectives>,
    /// Also store roles and tablespaces (`pg_dumpall --globals-only`); default true.
    pub globals: Option<bool>,
    /// `full` (row counts and content hashes) or `counts`.
    pub fingerprint: Option<FingerprintMode>,
    /// Directory holding pg_dump and pg_dumpall; found automatically when unset.
    pub pg_bin_dir: Option<String>,
    /// PEM file of the CA that signed the server's certificate; makes TLS verified (verify-full).
    pub tls_ca_file: Option<String>,
    /// Verification settings.
    pub verify: Option<RawVerify>,
    /// Spread scheduled runs over up to this long, with a stable per-pod offset, e.g. `5m`.
    pub jitter: Option<String>,
    /// Attempts after a failed run, with backoff; default 2.
    pub retries: Option<u32>,
    /// Back up at agent start when the newest backup is older than the schedule's interval.
    pub run_on_start: Option<bool>,
    /// When the source moved to another system (RFC 3339): a backup after it whose origin
    /// differs from the one before it is expected, not a failed verification.
    pub moved_at: Option<String>,
}

/// How much the fingerprint records.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FingerprintMode {
    /// Exact row counts and order-independent content hashes per table.
    #[default]
    Full,
    /// Exact row counts only.
    Counts,
}

/// A PostgreSQL source.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The connection string, which may embed a password.
    pub url: Secret,
    /// The connection string with any password replaced by `***`.
    pub url_redacted: String,
    /// Password file.
    pub password_file: Option<PathBuf>,
    /// Dump roles and tablespaces too.
    pub globals: bool,
    /// Fingerprint depth.
    pub fingerprint: FingerprintMode,
    /// pg_dump location override.
    pub bin_dir: Option<PathBuf>,
    /// CA for verified TLS.
    pub tls_ca_file: Option<PathBuf>,
}

#[async_trait::async_trait]
impl SourceKind for PostgresConfig {
    const NAME: &'static str = "postgres";
    type Raw = RawPostgresSource;

    fn validate(
        path: &str,
        raw: RawPostgresSource,
        ctx: &SourceContext<'_>,
        p: &mut Problems,
    ) -> Option<SourcePolicy> {
        validate(path, raw, ctx, p)
    }

    fn source(&self, _encryption: &EncryptionConfig) -> Box<dyn Source> {
        Box::new(super::Postgres::new(self.clone()))
    }

    fn verify_steps(&self) -> Box<dyn crate::verify::Steps> {
        Box::new(super::verify::PostgresSteps::new(self.clone()))
    }

    async fn plan_restore(
        request: &crate::restore::Request<'_>,
    ) -> crate::Result<crate::restore::Plan> {
        super::restore::plan(request).await
    }
}

fn validate(
    path: &str,
    raw: RawPostgresSource,
    ctx: &SourceContext<'_>,
    p: &mut Problems,
) -> Option<SourcePolicy> {
    check_name(&format!("{path}.name"), &raw.name, p);
    if raw.verify.as_ref().is_some_and(|v| v.cover_days.is_some()) {
        p.add(
            format!("{path}.verify.cover_days"),
            "applies to objects sources; a PostgreSQL backup is always verified whole",
        );
    }
    let checks = raw.verify.as_ref().map_or(&[][..], |v| &v.checks[..]);
    for (i, _) in checks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.database.is_some())
    {
        p.add(
            format!("{path}.verify.checks[{i}].database"),
            "applies to postgres-physical sources; a postgres source's checks run in the restored database",
        );
    }
    let url_redacted = check_url(path, &raw.url, raw.password_file.is_some(), p);
    let common = common_settings(path, common_raw!(raw), ctx.defaults, p);
    common.into_source(
        raw.name,
        SourceConfig::Postgres(PostgresConfig {
            url: Secret::new(raw.url),
            url_redacted,
            password_file: raw.password_file.map(PathBuf::from),
            globals: raw.globals.unwrap_or(true),
            fingerprint: raw.fingerprint.unwrap_or_default(),
            bin_dir: raw.pg_bin_dir.map(PathBuf::from),
            tls_ca_file: raw.tls_ca_file.map(PathBuf::from),
        }),
    )
}

/// Checks `{path}.url`, a connection string that must name a database and carry no password when
/// `password_file` is set too; returns it with any password redacted.
pub(crate) fn check_url(path: &str, url: &str, password_file: bool, p: &mut Problems) -> String {
    let config = tokio_postgres::Config::from_str(url);
    let url_redacted = redact_url(url);
    match &config {
        Err(e) => p.add(
            format!("{path}.url"),
            format!("`{url_redacted}` is not a PostgreSQL connection string ({e}); write postgres://USER@HOST:PORT/DB"),
        ),
        Ok(c) => {
            if c.get_dbname().is_none() {
                p.add(
                    format!("{path}.url"),
                    format!("`{url_redacted}` names no database; add /DBNAME"),
                );
            }
            if c.get_password().is_some() && password_file {
                p.add(
                    format!("{path}.password_file"),
                    "the url already carries a password; keep one of the two",
                );
            }
        }
    }
    url_redacted
}
