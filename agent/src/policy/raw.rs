//! The serde mirror of a policy file: exactly what TOML can say, nothing interpreted yet.
//!
//! Every struct rejects unknown keys, and no struct flattens another, so a typo is always an error
//! with a field path. Durations and sizes stay strings here ("2h", "16MiB"); `validate.rs` turns
//! them into typed values. Sources are tagged by `kind`: each kind has its own struct, chosen before
//! deserialization so that its own list of fields is the one quoted in an "unknown field" error.

use serde::Deserialize;

/// The top-level sections a policy may have.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "repository",
    "encryption",
    "signing",
    "agent",
    "defaults",
    "sources",
    "notify",
    "copies",
];

/// `[repository]`: where backups are stored.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRepository {
    /// `file://PATH` (a local directory) or `s3://bucket/prefix`.
    pub url: String,
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000`; unset means AWS.
    pub endpoint: Option<String>,
    /// S3 region; default `us-east-1`.
    pub region: Option<String>,
    /// `auto` (path-style with a custom endpoint, virtual-hosted on AWS), `path` or `virtual`.
    pub addressing: Option<Addressing>,
    /// `when_required` (no checksum headers; for S3-compatible servers) or `always`.
    pub checksums: Option<ChecksumMode>,
    /// S3 storage class for data objects, e.g. `STANDARD_IA`.
    pub storage_class: Option<String>,
    /// Size of one upload part, e.g. `8MiB` (S3 needs at least 5 MiB).
    pub part_size: Option<String>,
    /// How many parts may be uploading at once.
    pub parts_in_flight: Option<usize>,
    /// Ranged GETs of 4 MiB in flight when restore and the verifier download a stored part over
    /// 8 MiB; `1` reads each part in one GET. Default 4 on S3 (one connection rarely fills the
    /// link, and a dropped one costs a range), 1 on a local directory.
    pub download_streams: Option<usize>,
    /// S3 Object Lock retention set on every backup object written, e.g. `{ mode = "governance", days = 30 }`.
    pub object_lock: Option<RawObjectLock>,
    /// Server-side encryption asked for on every object written: `aws:kms` or `AES256` (for a
    /// bucket whose policy requires the header); lifeboat's own age encryption is always on.
    pub server_side_encryption: Option<ServerSideEncryption>,
    /// With `aws:kms`: the KMS key (id, ARN or `alias/NAME`); unset means the bucket's or the
    /// account's default key.
    pub kms_key_id: Option<String>,
    /// The AWS profile (in `~/.aws/config` / `AWS_CONFIG_FILE`) whose credentials this repository
    /// uses; unset means the default chain (environment, web identity / IRSA, instance role).
    pub credentials_profile: Option<String>,
}

/// `[[copies]]`: a second repository (another region or account) every backup is copied to, as
/// stored. Besides these keys, a copy takes every `[repository]` key (`url`, `endpoint`,
/// `region`, `credentials_profile`, …), which describe the copy's own bucket.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCopy {
    /// The copy's name, for `--repository NAME` and in metrics (letters, digits, `-`, `_`).
    pub name: String,
    /// The copy's own retention, applied by `lifeboat prune --repository NAME`; unset means each
    /// source's own rules.
    pub retention: Option<RawRetention>,
    /// How often the agent catches up on what the copy is missing; default `10m`.
    pub copy_interval: Option<String>,
}

/// The keys of `[[copies]]` that are the copy's own; every other key is a `[repository]` key.
pub const COPY_KEYS: &[&str] = &["name", "retention", "copy_interval"];

/// `repository.server_side_encryption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
pub enum ServerSideEncryption {
    /// SSE-KMS.
    #[serde(rename = "aws:kms")]
    AwsKms,
    /// SSE-S3.
    #[serde(rename = "AES256")]
    Aes256,
}

/// `repository.object_lock`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawObjectLock {
    /// `governance` (deletable with the bypass permission) or `compliance` (by nobody).
    pub mode: LockMode,
    /// Days each object stays locked after it is written.
    pub days: u32,
}

/// S3 Object Lock mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    /// Deletable only with `s3:BypassGovernanceRetention`.
    Governance,
    /// Deletable by nobody until it expires.
    Compliance,
}

/// S3 addressing style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Addressing {
    /// Path-style when an endpoint is set, virtual-hosted otherwise.
    Auto,
    /// `https://endpoint/bucket/key`.
    Path,
    /// `https://bucket.endpoint/key`.
    Virtual,
}

/// Whether requests carry checksum headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumMode {
    /// Only where the API requires one; lifeboat's own SHA-256 in the manifest still guards data.
    WhenRequired,
    /// Every upload part carries its SHA-256, checked by the server.
    Always,
}

/// `[encryption]`: who can read the backups.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEncryption {
    /// age X25519 recipients (`age1…`); several give escrow or break-glass keys.
    pub recipients: Vec<String>,
    /// The age identity file, only where verify or restore run.
    pub identity_file: Option<String>,
    /// A secret (`${VAR}`, at least 32 characters) that keys object blob ids and lets the agent
    /// read its last snapshot back as its change index; needed by `kind = "objects"` sources,
    /// where backups are taken.
    pub index_key: Option<String>,
}

/// `[signing]`: who may publish backups. Writers sign every manifest and verification report;
/// readers refuse what no trusted key signed (exit 13). Without this section nothing is signed or
/// checked.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSigning {
    /// Public keys (minisign, `RW…`) whose signatures are trusted; several during a key rotation.
    /// `lifeboat keygen --signing` prints one.
    pub trusted: Vec<String>,
    /// The signing key (an unencrypted minisign secret key), only where backups or verification
    /// reports are written: the agent and the verifier. Its public key must be in `trusted`.
    pub key_file: Option<String>,
    /// Unsigned backups and reports the repository stored before this time (RFC 3339) were taken
    /// before signing existed: they stay listed and restorable, marked `unsigned`.
    pub unsigned_before: Option<String>,
}

/// `[agent]`: the sidecar daemon.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// Address of /healthz, /metrics and /status; default `127.0.0.1:9187`.
    pub listen: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// Most runs at once over all sources; default 1.
    pub max_concurrent: Option<usize>,
    /// How long a running backup may take to finish on SIGTERM; default `30s`.
    pub shutdown_grace: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[defaults]`: settings every source inherits unless it overrides them.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    /// IANA time zone for schedules and retention buckets; default `UTC`.
    pub timezone: Option<String>,
    /// Longest a run may take, e.g. `2h`.
    pub timeout: Option<String>,
    /// Cron expression (5 fields, or 6 with seconds).
    pub schedule: Option<String>,
    /// zstd settings.
    pub compression: Option<RawCompression>,
    /// Retention rules.
    pub retention: Option<RawRetention>,
    /// Recovery objectives.
    pub objectives: Option<RawObjectives>,
}

/// zstd settings.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    /// zstd level, 1–19; default 3.
    pub level: Option<i32>,
    /// zstd worker threads; 0 compresses on the pipeline's own thread.
    pub workers: Option<u32>,
}

/// Retention rules (restic-style buckets).
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    /// Keep the newest N backups.
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N hours.
    pub keep_hourly: Option<u32>,
    /// … days.
    pub keep_daily: Option<u32>,
    /// … weeks.
    pub keep_weekly: Option<u32>,
    /// … months.
    pub keep_monthly: Option<u32>,
    /// … years.
    pub keep_yearly: Option<u32>,
    /// Keep everything newer than this, e.g. `14d`.
    pub keep_within: Option<String>,
    /// Keep the newest N verified backups; default 1.
    pub keep_last_verified: Option<u32>,
}

/// Recovery objectives.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawObjectives {
    /// Recovery point objective: the newest backup may be at most this old, e.g. `24h`.
    pub rpo: Option<String>,
    /// Recovery time objective: a restore must take at most this long, e.g. `4h`.
    pub rto: Option<String>,
}

/// `[sources.verify]`: how the verifier proves a backup.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    /// Cron expression for scheduled verification.
    pub schedule: Option<String>,
    /// The policy's own SQL assertions.
    #[serde(default)]
    pub checks: Vec<RawCheck>,
    /// A scratch server where the verifier may create and drop a database, instead of an ephemeral
    /// cluster. Its role needs CREATEDB and should have nothing more: the restore runs as it.
    pub scratch_url: Option<String>,
    /// Directory of the PostgreSQL server binaries for the ephemeral cluster.
    pub postgres_bin_dir: Option<String>,
    /// Objects: re-hash a rolling share of the blobs per verification such that every blob is
    /// covered once over this many days; every blob each time when unset.
    pub cover_days: Option<u32>,
    /// Longest one verification may take before it is stopped and reported as failed; default 6h.
    pub timeout: Option<String>,
    /// Postgres: most disk the ephemeral scratch cluster may use (e.g. `20GiB`); unlimited when
    /// unset, though a restore always stops before the scratch filesystem is nearly full.
    pub scratch_max_size: Option<String>,
    /// Postgres: free space a restore into the ephemeral cluster always leaves on the scratch
    /// filesystem (e.g. `500MiB`); it stops when less is left. Default: 5 % of the filesystem,
    /// within 256 MiB–2 GiB.
    pub scratch_keep_free: Option<String>,
    /// Postgres: restore as the scratch cluster's superuser instead of an unprivileged role. Only
    /// for dumps that need it (untrusted extensions, C functions, event triggers) and only when
    /// nobody but the agent can write to the repository: a forged dump restored as superuser can
    /// run programs as the scratch cluster's OS user.
    pub restore_as_superuser: Option<bool>,
}

/// One SQL assertion: the query returns one number, compared with `min`, `max` or `equals`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    /// A query returning one row with one integer column.
    pub sql: String,
    /// The result must be at least this.
    pub min: Option<i64>,
    /// The result must be at most this.
    pub max: Option<i64>,
    /// The result must equal this.
    pub equals: Option<i64>,
    /// postgres-physical: the database it runs in, or `"*"` for every database of the restored
    /// cluster (each its own check); default the url's. A postgres source's checks run in the
    /// restored database.
    pub database: Option<String>,
}

/// `[[notify]]`: a webhook called on failure and on recovery.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    /// Where to POST; usually a secret (`${VAR}`).
    pub url: String,
    /// `json` (default) or `slack`.
    pub format: Option<NotifyFormat>,
}

/// Webhook payload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    /// `{"event", "source", "op", "message", "at", "pod"}`.
    #[default]
    Json,
    /// `{"text": "…"}` for Slack-compatible incoming webhooks.
    Slack,
}
