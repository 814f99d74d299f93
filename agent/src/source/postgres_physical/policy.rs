//! The `kind = "postgres-physical"` policy section: as written, validated, and registered as a kind.

use std::path::PathBuf;

use serde::Deserialize;

use crate::policy::raw::{RawCompression, RawObjectives, RawRetention, RawVerify};
use crate::policy::validate::{check_name, common_raw, common_settings, CommonRaw};
use crate::policy::{EncryptionConfig, Problems, Secret, SourceContext, SourcePolicy};
use crate::source::postgres::{FingerprintMode, PostgresConfig};
use crate::source::{Source, SourceConfig, SourceKind};

/// `[[sources]]` with `kind = "postgres-physical"`: the whole cluster, as base backups.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPhysicalSource {
    /// Unique name; used in object keys, metrics and commands.
    pub name: String,
    /// Always `postgres-physical` here.
    pub kind: String,
    /// libpq URL of a role with REPLICATION; the database it names is where the verifier's SQL
    /// checks run unless a check names its `database`. `${VAR}` for secrets.
    pub url: String,
    /// File holding the password, instead of putting it in the URL.
    pub password_file: Option<String>,
    /// Cron expression of base backups; overrides `[defaults]`.
    pub schedule: Option<String>,
    /// Longest a base backup may take; overrides `[defaults]`.
    pub timeout: Option<String>,
    /// Overrides `[defaults]`.
    pub compression: Option<RawCompression>,
    /// Base backups kept; overrides `[defaults]`.
    pub retention: Option<RawRetention>,
    /// Overrides `[defaults]`.
    pub objectives: Option<RawObjectives>,
    /// How the server's checkpoint at the start of a base backup runs: `spread` (default: no I/O
    /// spike, the backup starts once the checkpoint is done) or `fast` (at once, at full I/O).
    pub checkpoint: Option<Checkpoint>,
    /// Most the server reads and sends per second for a base backup, e.g. `50MiB` (32KiB to
    /// 1GiB), so that a backup of a busy primary leaves its disks to the application;
    /// unlimited when unset.
    pub max_rate: Option<String>,
    /// Continuous WAL streaming from a physical replication slot, between base backups.
    pub wal: Option<RawWal>,
    /// Directory holding pg_basebackup; found automatically when unset.
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

/// `wal = { … }`: WAL streamed from a replication slot into the repository.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWal {
    /// The physical replication slot streamed from; created if missing. Default `lifeboat`.
    pub slot: Option<String>,
    /// How often the growing segment is stored (what a crash can lose at most), e.g. `30s`;
    /// default 30s, at least 1s.
    pub flush_interval: Option<String>,
    /// Warn when the slot holds more WAL than this on the server (the agent or the store is
    /// behind), e.g. `20GiB`; default 20GiB.
    pub max_slot_retained: Option<String>,
}

/// WAL streaming settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalSettings {
    /// The slot.
    pub slot: String,
    /// How often the growing segment is stored.
    pub flush_interval: std::time::Duration,
    /// The retained bytes past which the agent warns.
    pub max_slot_retained: u64,
}

fn validate_wal(path: &str, raw: &RawWal, p: &mut Problems) -> WalSettings {
    let slot = raw.slot.clone().unwrap_or_else(|| "lifeboat".into());
    let valid = !slot.is_empty()
        && slot.len() <= 63
        && slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        p.add(
            format!("{path}.wal.slot"),
            format!("`{slot}` is not a slot name: lower-case letters, digits and `_`, at most 63"),
        );
    }
    let flush_interval = match raw.flush_interval.as_deref() {
        None => std::time::Duration::from_secs(30),
        Some(f) => {
            let d = crate::policy::validate::duration(&format!("{path}.wal.flush_interval"), f, p);
            if d < std::time::Duration::from_secs(1) {
                p.add(
                    format!("{path}.wal.flush_interval"),
                    format!("`{f}` is under a second; write e.g. `30s`"),
                );
            }
            d
        }
    };
    let max_slot_retained = match raw.max_slot_retained.as_deref() {
        None => 20 << 30,
        Some(m) => crate::policy::validate::parse_size(m).unwrap_or_else(|| {
            p.add(
                format!("{path}.wal.max_slot_retained"),
                format!("`{m}` is not a size; write e.g. `20GiB`"),
            );
            0
        }),
    };
    WalSettings {
        slot,
        flush_interval,
        max_slot_retained,
    }
}

/// The checkpoint a base backup starts with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Checkpoint {
    /// Spread over `checkpoint_completion_target`, as the server's own checkpoints are.
    #[default]
    Spread,
    /// Immediate, at full I/O.
    Fast,
}

impl Checkpoint {
    /// The `pg_basebackup --checkpoint` value.
    pub fn arg(self) -> &'static str {
        match self {
            Checkpoint::Spread => "spread",
            Checkpoint::Fast => "fast",
        }
    }
}

/// A physical PostgreSQL source.
#[derive(Debug, Clone)]
pub struct PhysicalConfig {
    /// How to reach the server: the same connection settings a logical source has.
    pub connection: PostgresConfig,
    /// The starting checkpoint.
    pub checkpoint: Checkpoint,
    /// The transfer rate limit, in bytes per second.
    pub max_rate: Option<u64>,
    /// WAL streaming, when configured.
    pub wal: Option<WalSettings>,
}

#[async_trait::async_trait]
impl SourceKind for PhysicalConfig {
    const NAME: &'static str = "postgres-physical";
    type Raw = RawPhysicalSource;

    fn validate(
        path: &str,
        raw: RawPhysicalSource,
        ctx: &SourceContext<'_>,
        p: &mut Problems,
    ) -> Option<SourcePolicy> {
        validate(path, raw, ctx, p)
    }

    fn source(&self, _encryption: &EncryptionConfig) -> Box<dyn Source> {
        Box::new(super::Physical::new(self.clone()))
    }

    fn verify_steps(&self) -> Box<dyn crate::verify::Steps> {
        Box::new(super::verify::PhysicalSteps::new(self.clone()))
    }

    async fn plan_restore(
        request: &crate::restore::Request<'_>,
    ) -> crate::Result<crate::restore::Plan> {
        super::restore::plan(request).await
    }

    async fn check_more(
        ctx: &mut crate::check::Context<'_>,
        manifest: &crate::repo::manifest::Manifest,
    ) -> crate::Result<()> {
        super::archive::check_chain(ctx, manifest).await
    }

    async fn shared_for_copy(
        repo: &crate::repo::Repository,
        source: &str,
        keeping: &[&crate::repo::manifest::Manifest],
    ) -> crate::Result<Option<crate::copy::Shared>> {
        super::archive::shared_for_copy(repo, source, keeping).await
    }

    async fn plan_shared_collection(
        repo: &crate::repo::Repository,
        source: &str,
        _policy: &crate::policy::Policy,
        _now: chrono::DateTime<chrono::Utc>,
        ignoring: &std::collections::HashSet<(String, String)>,
    ) -> crate::Result<Option<crate::collect::CollectionPlan>> {
        Ok(Some(
            super::archive::plan_collection(repo, source, ignoring).await?,
        ))
    }
}

fn validate(
    path: &str,
    raw: RawPhysicalSource,
    ctx: &SourceContext<'_>,
    p: &mut Problems,
) -> Option<SourcePolicy> {
    check_name(&format!("{path}.name"), &raw.name, p);
    if let Some(v) = &raw.verify {
        reject_foreign_verify(path, v, p);
    }
    let url_redacted =
        crate::source::postgres::policy::check_url(path, &raw.url, raw.password_file.is_some(), p);
    let max_rate = raw.max_rate.as_deref().and_then(|r| {
        let n = crate::policy::validate::parse_size(r);
        if n.is_none_or(|n| !(32 << 10..=1 << 30).contains(&n)) {
            p.add(
                format!("{path}.max_rate"),
                format!("`{r}` is not a rate from 32KiB to 1GiB (per second); write e.g. `50MiB`"),
            );
        }
        n
    });
    let wal = raw.wal.as_ref().map(|w| validate_wal(path, w, p));
    let common = common_settings(path, common_raw!(raw), ctx.defaults, p);
    common.into_source(
        raw.name,
        SourceConfig::PostgresPhysical(PhysicalConfig {
            connection: PostgresConfig {
                url: Secret::new(raw.url),
                url_redacted,
                password_file: raw.password_file.map(PathBuf::from),
                globals: false,
                fingerprint: FingerprintMode::Counts,
                bin_dir: raw.pg_bin_dir.map(PathBuf::from),
                tls_ca_file: raw.tls_ca_file.map(PathBuf::from),
            },
            checkpoint: raw.checkpoint.unwrap_or_default(),
            max_rate,
            wal,
        }),
    )
}

/// Verify settings that do not apply to a base backup, each with what it does instead.
fn reject_foreign_verify(path: &str, v: &RawVerify, p: &mut Problems) {
    if v.scratch_url.is_some() {
        p.add(
            format!("{path}.verify.scratch_url"),
            "a base backup is the whole cluster: it is verified in an ephemeral cluster of its own; remove scratch_url",
        );
    }
    if v.restore_as_superuser.is_some() {
        p.add(
            format!("{path}.verify.restore_as_superuser"),
            "a base backup is not replayed statement by statement: the scratch server starts on the restored files; remove it",
        );
    }
    if v.cover_days.is_some() {
        p.add(
            format!("{path}.verify.cover_days"),
            "applies to objects sources; a base backup is always verified whole",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::tests::{env, good, problems};
    use crate::policy::{parse, LoadOptions};
    use crate::source::SourceConfig;

    /// The good policy plus a physical source named `cluster` with `fields` added.
    fn with_physical(fields: &str) -> String {
        format!(
            "{}\n[[sources]]\nname = \"cluster\"\nkind = \"postgres-physical\"\n\
             url = \"postgres://replicator@127.0.0.1:5432/postgres\"\n{fields}\n",
            good()
        )
    }

    #[test]
    fn a_physical_source_validates() {
        let p = parse(
            &with_physical("checkpoint = \"fast\"\nmax_rate = \"50MiB\""),
            "p.toml",
            &env,
            LoadOptions::default(),
        )
        .unwrap();
        let s = &p.sources[2];
        let SourceConfig::PostgresPhysical(c) = &s.config else {
            panic!("the third source is physical")
        };
        assert_eq!(s.config.kind().name(), "postgres-physical");
        assert_eq!(c.checkpoint, super::Checkpoint::Fast);
        assert_eq!(c.max_rate, Some(50 << 20));
        assert_eq!(s.retention.keep_last, Some(7), "defaults apply");
    }

    #[test]
    fn a_typo_is_rejected_with_its_path() {
        let got = problems(&with_physical("checkpiont = \"fast\""));
        assert!(
            got.iter()
                .any(|p| p.starts_with("sources[2]") && p.contains("checkpiont")),
            "{got:?}"
        );
    }

    #[test]
    fn verify_settings_of_other_kinds_are_refused_with_what_applies() {
        let got = problems(&with_physical(
            "[sources.verify]\nscratch_url = \"postgres://v@h/postgres\"\ncover_days = 7",
        ));
        assert!(
            got.iter()
                .any(|p| p.starts_with("sources[2].verify.scratch_url")
                    && p.contains("ephemeral cluster of its own")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|p| p.starts_with("sources[2].verify.cover_days")),
            "{got:?}"
        );
    }

    #[test]
    fn a_rate_out_of_pg_basebackups_range_is_refused() {
        for rate in ["16KiB", "2GiB", "fast"] {
            let got = problems(&with_physical(&format!("max_rate = \"{rate}\"")));
            assert!(
                got.iter()
                    .any(|p| p.starts_with("sources[2].max_rate") && p.contains("32KiB to 1GiB")),
                "{rate}: {got:?}"
            );
        }
    }

    #[test]
    fn wal_settings_validate_with_defaults_and_name_their_field() {
        let p = parse(
            &with_physical("wal = { flush_interval = \"10s\" }"),
            "p.toml",
            &env,
            LoadOptions::default(),
        )
        .unwrap();
        let SourceConfig::PostgresPhysical(c) = &p.sources[2].config else {
            panic!("physical")
        };
        let wal = c.wal.as_ref().expect("wal settings");
        assert_eq!(wal.slot, "lifeboat");
        assert_eq!(wal.flush_interval, std::time::Duration::from_secs(10));
        assert_eq!(wal.max_slot_retained, 20 << 30);
        let got = problems(&with_physical(
            "wal = { slot = \"Bad-Name\", flush_interval = \"0s\", max_slot_retained = \"lots\" }",
        ));
        for field in ["wal.slot", "wal.flush_interval", "wal.max_slot_retained"] {
            assert!(
                got.iter()
                    .any(|p| p.starts_with(&format!("sources[2].{field}"))),
                "{field}: {got:?}"
            );
        }
        let got = problems(&with_physical("wal = { slott = \"x\" }"));
        assert!(got.iter().any(|p| p.contains("slott")), "{got:?}");
    }

    #[test]
    fn the_url_must_name_a_database() {
        let got = problems(&with_physical("").replace("5432/postgres", "5432"));
        assert!(
            got.iter()
                .any(|p| p.starts_with("sources[2].url") && p.contains("names no database")),
            "{got:?}"
        );
    }
}
