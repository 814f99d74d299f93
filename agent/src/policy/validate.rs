//! RawPolicy → Policy: every rule a policy must follow, every problem reported with its field path.
//!
//! Validation never stops at the first problem: it walks the whole raw policy, records each problem
//! as `path: message`, and only builds a [`Policy`] when there are none. Defaults come from named
//! functions; "disabled" is an `Option`, never `0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::env::Secret;
use super::raw::*;
use crate::source::RawSource;
pub use crate::source::SourceConfig;

/// One problem in a policy file, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path, e.g. `sources[0].schedule`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Collects problems while validating.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>, pub std::collections::HashSet<String>);

impl Problems {
    /// Records a problem at `path`, unless the field's value could not be resolved (a missing
    /// `${VAR}`, already reported or allowed): its text says nothing about the real value.
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        if self.1.contains(&path) {
            return;
        }
        self.0.push(Problem {
            path,
            message: message.into(),
        });
    }

    /// Marks a field whose value is unresolved; later problems at that path are not reported.
    pub fn unresolved(&mut self, path: &str) {
        self.1.insert(path.to_string());
    }
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Where backups go.
    pub repository: RepositoryConfig,
    /// Who can read them.
    pub encryption: EncryptionConfig,
    /// Who may publish them (`None`: nothing is signed or checked).
    pub signing: Option<SigningConfig>,
    /// Daemon settings.
    pub agent: AgentConfig,
    /// Time zone for schedules and retention.
    pub timezone: chrono_tz::Tz,
    /// The sources, in file order.
    pub sources: Vec<SourcePolicy>,
    /// Webhooks for failures and recoveries.
    pub notify: Vec<Notify>,
    /// Second repositories every backup is copied to.
    pub copies: Vec<CopyConfig>,
    /// Variables that were missing (only with `allow_missing_env`).
    pub missing_env: Vec<String>,
}

/// A webhook.
#[derive(Debug, Clone)]
pub struct Notify {
    /// The URL (often holds a token).
    pub url: Secret,
    /// Payload format.
    pub format: NotifyFormat,
}

impl Policy {
    /// The source named `name`.
    pub fn source(&self, name: &str) -> Option<&SourcePolicy> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The copy named `name`, or an error naming the policy's copies.
    pub fn copy(&self, name: &str) -> Result<&CopyConfig, crate::Error> {
        self.copies.iter().find(|c| c.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.copies.iter().map(|c| c.name.as_str()).collect();
            crate::Error::new(
                crate::ErrorKind::Invalid,
                format!(
                    "no repository named `{name}`: the policy's [[copies]] are {}",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ),
            )
            .hint("name one of the policy's [[copies]], or leave --repository out for [repository]")
        })
    }

    /// This policy as seen from the copy `name` alone (`--repository NAME`): the copy is the
    /// repository, its retention rules replace the sources' own, and it has no copies.
    pub fn for_repository(&self, name: &str) -> Result<Policy, crate::Error> {
        let copy = self.copy(name)?;
        let mut policy = self.clone();
        policy.repository = copy.repository.clone();
        if let Some(rules) = &copy.retention {
            for s in &mut policy.sources {
                s.retention = rules.clone();
            }
        }
        policy.copies.clear();
        Ok(policy)
    }
}

/// `[[copies]]`: a second repository.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// Its name (`--repository NAME`, metrics).
    pub name: String,
    /// Where it is and how to write to it.
    pub repository: RepositoryConfig,
    /// Its own retention rules; `None`: each source's own.
    pub retention: Option<Retention>,
    /// How often the agent catches up.
    pub interval: Duration,
}

/// Default `copy_interval`.
pub fn default_copy_interval() -> Duration {
    Duration::from_secs(600)
}

/// Repository location and upload tuning.
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// Local directory or S3 bucket.
    pub location: Location,
    /// Bytes per upload part.
    pub part_size: usize,
    /// Parts uploading at once.
    pub parts_in_flight: usize,
    /// Ranged GETs in flight when a large part is downloaded (1: one GET per part).
    pub download_streams: usize,
}

/// Where a repository lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// A local directory (the embedded default).
    Fs {
        /// The repository root.
        root: PathBuf,
    },
    /// An S3 bucket and prefix.
    S3(S3Config),
}

/// An S3 location.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Custom endpoint for S3-compatible servers.
    pub endpoint: Option<String>,
    /// The AWS profile whose credentials to use; `None`: the default chain.
    pub credentials_profile: Option<String>,
    /// Region.
    pub region: String,
    /// Path-style addressing.
    pub force_path_style: bool,
    /// Checksum headers.
    pub checksums: ChecksumMode,
    /// Storage class for data objects.
    pub storage_class: Option<String>,
    /// Object Lock on backup objects: mode and days.
    pub object_lock: Option<(LockMode, u32)>,
    /// Server-side encryption sent on every write, with the KMS key for `aws:kms`.
    pub server_side_encryption: Option<(ServerSideEncryption, Option<String>)>,
}

/// Encryption settings.
#[derive(Debug, Clone)]
pub struct EncryptionConfig {
    /// age X25519 recipients, validated.
    pub recipients: Vec<String>,
    /// Identity file for decryption.
    pub identity_file: Option<PathBuf>,
    /// Keys blob ids and opens the last snapshot as the agent's change index (objects sources).
    pub index_key: Option<Secret>,
}

/// `[signing]`, validated.
#[derive(Debug, Clone)]
pub struct SigningConfig {
    /// Trusted public keys (`RW…`), each parsed.
    pub trusted: Vec<String>,
    /// The writer's secret key file.
    pub key_file: Option<PathBuf>,
    /// Unsigned objects stored before this are accepted, marked.
    pub unsigned_before: Option<chrono::DateTime<chrono::Utc>>,
}

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Most runs at once.
    pub max_concurrent: usize,
    /// Grace period on shutdown.
    pub shutdown_grace: Duration,
}

/// A validated cron schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The expression as written (5 or 6 fields).
    pub expression: String,
}

/// zstd settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Level 1–19.
    pub level: i32,
    /// Worker threads (0 = the pipeline's own thread).
    pub workers: u32,
}

/// Retention rules; at least one keep rule is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Newest N.
    pub keep_last: Option<u32>,
    /// Newest of each of the last N hours.
    pub keep_hourly: Option<u32>,
    /// … days.
    pub keep_daily: Option<u32>,
    /// … weeks.
    pub keep_weekly: Option<u32>,
    /// … months.
    pub keep_monthly: Option<u32>,
    /// … years.
    pub keep_yearly: Option<u32>,
    /// Everything newer than this.
    pub keep_within: Option<Duration>,
    /// Newest N verified backups.
    pub keep_last_verified: u32,
}

/// Recovery objectives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Objectives {
    /// Recovery point objective.
    pub rpo: Option<Duration>,
    /// Recovery time objective.
    pub rto: Option<Duration>,
}

/// Verification settings for one source.
#[derive(Debug, Clone)]
pub struct VerifyPolicy {
    /// When the verifier daemon verifies this source.
    pub schedule: Option<Schedule>,
    /// SQL assertions.
    pub checks: Vec<SqlCheck>,
    /// Scratch server instead of an ephemeral cluster.
    pub scratch_url: Option<Secret>,
    /// Server binaries for the ephemeral cluster.
    pub postgres_bin_dir: Option<PathBuf>,
    /// Objects: every blob re-hashed once over this many days.
    pub cover_days: Option<u32>,
    /// Longest one verification may take.
    pub timeout: Duration,
    /// Postgres: most disk the ephemeral scratch cluster may use.
    pub scratch_max_size: Option<u64>,
    /// Postgres: free space always left on the scratch filesystem; a share of it when unset.
    pub scratch_keep_free: Option<u64>,
    /// Postgres: restore as the scratch cluster's superuser.
    pub restore_as_superuser: bool,
}

/// Default longest verification.
pub fn default_verify_timeout() -> Duration {
    Duration::from_secs(6 * 3600)
}

impl Default for VerifyPolicy {
    fn default() -> Self {
        VerifyPolicy {
            schedule: None,
            checks: Vec::new(),
            scratch_url: None,
            postgres_bin_dir: None,
            cover_days: None,
            timeout: default_verify_timeout(),
            scratch_max_size: None,
            scratch_keep_free: None,
            restore_as_superuser: false,
        }
    }
}

/// One SQL assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlCheck {
    /// The query.
    pub sql: String,
    /// Lower bound.
    pub min: Option<i64>,
    /// Upper bound.
    pub max: Option<i64>,
    /// Exact value.
    pub equals: Option<i64>,
    /// Where it runs (postgres-physical): a database, or every one.
    pub database: Option<CheckDatabase>,
}

/// The database of the restored cluster a physical source's check runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckDatabase {
    /// This one.
    Named(String),
    /// Each database of the cluster, as a check of its own.
    Every,
}

/// What a kind's validation may read besides its own table.
#[derive(Debug, Clone, Copy)]
pub struct SourceContext<'a> {
    /// `[defaults]`, as written.
    pub defaults: &'a RawDefaults,
    /// `[encryption]`, validated (`None` when it is missing or did not parse).
    pub encryption: Option<&'a EncryptionConfig>,
}

/// One source with its settings merged from `[defaults]`.
#[derive(Debug, Clone)]
pub struct SourcePolicy {
    /// Unique name.
    pub name: String,
    /// Cron schedule, if any.
    pub schedule: Option<Schedule>,
    /// Longest a run may take.
    pub timeout: Duration,
    /// zstd settings.
    pub compression: Compression,
    /// Retention rules.
    pub retention: Retention,
    /// Objectives.
    pub objectives: Objectives,
    /// Verification.
    pub verify: VerifyPolicy,
    /// Stable per-pod delay range added to every scheduled time.
    pub jitter: Option<Duration>,
    /// Attempts after a failed run.
    pub retries: u32,
    /// Back up at start when the newest backup is older than the schedule's interval.
    pub run_on_start: bool,
    /// When the source moved to another system: the origin change across it is expected.
    pub moved_at: Option<chrono::DateTime<chrono::Utc>>,
    /// What to back up.
    pub config: SourceConfig,
}

/// Default listen address of the daemon.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9187))
}
/// Default run timeout.
pub fn default_timeout() -> Duration {
    Duration::from_secs(2 * 3600)
}
/// Default shutdown grace.
pub fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
/// Default zstd level.
pub fn default_compression_level() -> i32 {
    3
}
/// Default zstd workers: one per core beyond the first, which the source and pipeline use.
pub fn default_compression_workers() -> u32 {
    2
}
/// Default upload part size.
pub fn default_part_size() -> usize {
    8 << 20
}
/// Default parts in flight.
pub fn default_parts_in_flight() -> usize {
    2
}
/// Default S3 region.
pub fn default_region() -> String {
    "us-east-1".to_string()
}
/// Default retries of a failed scheduled run.
pub fn default_retries() -> u32 {
    2
}

/// Default number of verified backups always kept.
pub fn default_keep_last_verified() -> u32 {
    1
}

/// A policy's sections as parsed, each on its own (a missing or broken one is `None` or left
/// out, its problems already recorded).
pub(super) struct RawSections {
    /// `[repository]`.
    pub repository: Option<RawRepository>,
    /// `[encryption]`.
    pub encryption: Option<RawEncryption>,
    /// `[signing]`.
    pub signing: Option<RawSigning>,
    /// `[agent]`.
    pub agent: RawAgent,
    /// `[defaults]`.
    pub defaults: RawDefaults,
    /// `[[sources]]`, already typed by kind, with their index.
    pub sources: Vec<(usize, RawSource)>,
    /// `[[copies]]`, with their index: each copy's own keys and its repository keys.
    pub copies: Vec<(usize, RawCopy, RawRepository)>,
}

/// Validates a raw policy.
pub(super) fn validate(
    raw: RawSections,
    allow_missing_env: bool,
    problems: &mut Problems,
) -> Option<Policy> {
    let RawSections {
        repository,
        encryption,
        signing,
        agent,
        defaults,
        sources,
        copies,
    } = raw;
    let signing = signing.map(|s| validate_signing(s, allow_missing_env, problems));
    let repository = repository.and_then(|r| validate_repository("repository", r, problems));
    let copies = validate_copies(copies, repository.as_ref(), problems);
    let encryption = encryption.map(|e| validate_encryption(e, allow_missing_env, problems));
    let agent = validate_agent(agent, problems);
    let timezone = match defaults.timezone.as_deref() {
        None => chrono_tz::UTC,
        Some(tz) => chrono_tz::Tz::from_str(tz).unwrap_or_else(|_| {
            problems.add(
                "defaults.timezone",
                format!("`{tz}` is not an IANA time zone (e.g. `UTC`, `Europe/Berlin`)"),
            );
            chrono_tz::UTC
        }),
    };

    let ctx = SourceContext {
        defaults: &defaults,
        encryption: encryption.as_ref(),
    };
    let mut out = Vec::new();
    for (i, raw) in sources {
        let path = format!("sources[{i}]");
        if let Some(s) = raw.validate(&path, &ctx, problems) {
            if out.iter().any(|o: &SourcePolicy| o.name == s.name) {
                problems.add(
                    format!("{path}.name"),
                    format!(
                        "`{}` is used by another source; names must be unique",
                        s.name
                    ),
                );
            }
            out.push(s);
        }
    }

    if problems.0.is_empty() {
        Some(Policy {
            repository: repository?,
            encryption: encryption?,
            signing,
            agent,
            timezone,
            sources: out,
            notify: Vec::new(),
            copies,
            missing_env: Vec::new(),
        })
    } else {
        None
    }
}

pub(super) fn validate_repository(
    at: &str,
    raw: RawRepository,
    p: &mut Problems,
) -> Option<RepositoryConfig> {
    let part_size = part_size(at, raw.part_size.as_deref(), p);
    let parts_in_flight = match raw.parts_in_flight {
        None => default_parts_in_flight(),
        Some(n) if (1..=64).contains(&n) => n,
        Some(_) => {
            p.add(format!("{at}.parts_in_flight"), "must be between 1 and 64");
            default_parts_in_flight()
        }
    };
    let download_streams = match raw.download_streams {
        None => None,
        Some(n) if (1..=16).contains(&n) => Some(n),
        Some(_) => {
            p.add(format!("{at}.download_streams"), "must be between 1 and 16");
            None
        }
    };
    let location = if let Some(path) = raw.url.strip_prefix("file://") {
        fs_location(at, path, &raw, p)?
    } else if let Some(rest) = raw.url.strip_prefix("s3://") {
        let rest = rest.to_string();
        s3_location(at, &rest, raw, p)
    } else {
        p.add(
            format!("{at}.url"),
            format!(
                "`{}` is neither file://PATH nor s3://BUCKET/PREFIX",
                raw.url
            ),
        );
        return None;
    };
    let download_streams = download_streams.unwrap_or(match location {
        Location::Fs { .. } => 1,
        Location::S3(_) => 4,
    });
    Some(RepositoryConfig {
        location,
        part_size,
        parts_in_flight,
        download_streams,
    })
}

/// `repository.part_size`, within S3's limits for a part.
fn part_size(at: &str, raw: Option<&str>, p: &mut Problems) -> usize {
    match raw {
        None => default_part_size(),
        Some(s) => match parse_size(s) {
            Some(n) if (5 << 20..=(5u64 << 30)).contains(&n) => n as usize,
            Some(_) => {
                p.add(
                    format!("{at}.part_size"),
                    "must be between 5MiB and 5GiB (S3's limits for a part)",
                );
                default_part_size()
            }
            None => {
                p.add(
                    format!("{at}.part_size"),
                    format!("`{s}` is not a size; write e.g. `8MiB` or `64MiB`"),
                );
                default_part_size()
            }
        },
    }
}

/// A `file://` repository: no S3 settings apply.
fn fs_location(at: &str, path: &str, raw: &RawRepository, p: &mut Problems) -> Option<Location> {
    for (field, set) in [
        ("endpoint", raw.endpoint.is_some()),
        ("region", raw.region.is_some()),
        ("addressing", raw.addressing.is_some()),
        ("checksums", raw.checksums.is_some()),
        ("storage_class", raw.storage_class.is_some()),
        ("object_lock", raw.object_lock.is_some()),
        (
            "server_side_encryption",
            raw.server_side_encryption.is_some(),
        ),
        ("kms_key_id", raw.kms_key_id.is_some()),
        ("credentials_profile", raw.credentials_profile.is_some()),
    ] {
        if set {
            p.add(
                format!("{at}.{field}"),
                "applies to s3:// repositories only; remove it or use an s3:// url",
            );
        }
    }
    if path.is_empty() {
        p.add(format!("{at}.url"), "`file://` needs a path, e.g. `file://./lifeboat-repo` or `file:///var/backups/lifeboat`");
        return None;
    }
    Some(Location::Fs {
        root: PathBuf::from(path),
    })
}

/// An `s3://BUCKET/PREFIX` repository (`rest` follows the scheme).
fn s3_location(at: &str, rest: &str, raw: RawRepository, p: &mut Problems) -> Location {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !valid_bucket {
        p.add(
            format!("{at}.url"),
            format!(
                "`{bucket}` is not a valid S3 bucket name (3–63 characters: a-z, 0-9, `-`, `.`)"
            ),
        );
    }
    if let Some(e) = &raw.endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            p.add(
                format!("{at}.endpoint"),
                format!("`{e}` must start with http:// or https://"),
            );
        }
    }
    let force_path_style = path_style(raw.addressing, raw.endpoint.is_some());
    let server_side_encryption = match (raw.server_side_encryption, raw.kms_key_id.clone()) {
        (Some(ServerSideEncryption::AwsKms), key) => Some((ServerSideEncryption::AwsKms, key)),
        (sse, Some(_)) => {
            p.add(
                format!("{at}.kms_key_id"),
                "applies with server_side_encryption = \"aws:kms\" only; set that, or remove kms_key_id",
            );
            sse.map(|m| (m, None))
        }
        (sse, None) => sse.map(|m| (m, None)),
    };
    Location::S3(S3Config {
        bucket: bucket.to_string(),
        prefix: prefix.trim_matches('/').to_string(),
        endpoint: raw.endpoint,
        credentials_profile: raw.credentials_profile,
        region: raw.region.unwrap_or_else(default_region),
        force_path_style,
        checksums: raw.checksums.unwrap_or(ChecksumMode::WhenRequired),
        server_side_encryption,
        storage_class: raw.storage_class,
        object_lock: match raw.object_lock {
            Some(l) if l.days == 0 => {
                p.add(
                    format!("{at}.object_lock.days"),
                    "must be at least 1; leave object_lock out to disable it",
                );
                None
            }
            Some(l) => Some((l.mode, l.days)),
            None => None,
        },
    })
}

/// `[[copies]]`: each a repository of its own, named uniquely, never the primary itself.
fn validate_copies(
    copies: Vec<(usize, RawCopy, RawRepository)>,
    primary: Option<&RepositoryConfig>,
    p: &mut Problems,
) -> Vec<CopyConfig> {
    let mut out: Vec<CopyConfig> = Vec::new();
    for (i, own, raw) in copies {
        let at = format!("copies[{i}]");
        let name_ok = !own.name.is_empty()
            && own.name.len() <= 64
            && own
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            p.add(
                format!("{at}.name"),
                format!(
                    "`{}` is not a copy name: 1–64 letters, digits, `-` or `_`",
                    own.name
                ),
            );
        } else if out.iter().any(|c| c.name == own.name) {
            p.add(
                format!("{at}.name"),
                format!(
                    "`{}` is used by another copy; names must be unique",
                    own.name
                ),
            );
        }
        let retention = own
            .retention
            .as_ref()
            .and_then(|r| validate_retention(&format!("{at}.retention"), r, p));
        let interval = own
            .copy_interval
            .as_deref()
            .map(|s| duration(&format!("{at}.copy_interval"), s, p))
            .unwrap_or_else(default_copy_interval);
        let Some(repository) = validate_repository(&at, raw, p) else {
            continue;
        };
        if primary.is_some_and(|p| same_place(&repository.location, &p.location))
            || out
                .iter()
                .any(|c| same_place(&c.repository.location, &repository.location))
        {
            p.add(
                format!("{at}.url"),
                "is the same place as [repository] or another copy: a copy must be another bucket, prefix or directory",
            );
        }
        out.push(CopyConfig {
            name: own.name,
            repository,
            retention,
            interval,
        });
    }
    out
}

/// Whether two locations are one repository.
fn same_place(a: &Location, b: &Location) -> bool {
    match (a, b) {
        (Location::Fs { root: x }, Location::Fs { root: y }) => x == y,
        (Location::S3(x), Location::S3(y)) => {
            x.bucket == y.bucket && x.prefix == y.prefix && x.endpoint == y.endpoint
        }
        _ => false,
    }
}

fn validate_encryption(
    raw: RawEncryption,
    allow_missing_env: bool,
    p: &mut Problems,
) -> EncryptionConfig {
    if raw.recipients.is_empty() {
        p.add(
            "encryption.recipients",
            "at least one age recipient is needed; create one with `lifeboat keygen`",
        );
    }
    for (i, r) in raw.recipients.iter().enumerate() {
        if r.is_empty() && allow_missing_env {
            continue;
        }
        if age::x25519::Recipient::from_str(r).is_err() {
            p.add(
                format!("encryption.recipients[{i}]"),
                format!(
                    "`{r}` is not an age X25519 recipient (`age1…`); `lifeboat keygen` prints one"
                ),
            );
        }
    }
    if let Some(k) = &raw.index_key {
        if k.len() < 32 && !(k.is_empty() && allow_missing_env) {
            p.add(
                "encryption.index_key",
                "must be at least 32 characters of secret (e.g. `openssl rand -hex 32`), given as ${VAR}",
            );
        }
    }
    EncryptionConfig {
        recipients: raw.recipients,
        identity_file: raw.identity_file.map(PathBuf::from),
        index_key: raw.index_key.map(Secret::new),
    }
}

fn validate_signing(raw: RawSigning, allow_missing_env: bool, p: &mut Problems) -> SigningConfig {
    if raw.trusted.is_empty() {
        p.add(
            "signing.trusted",
            "at least one public key is needed; `lifeboat keygen --signing` prints one",
        );
    }
    for (i, k) in raw.trusted.iter().enumerate() {
        if k.is_empty() && allow_missing_env {
            continue;
        }
        if let Err(why) = crate::repo::signing::parse_public(k) {
            p.add(
                format!("signing.trusted[{i}]"),
                format!("{why}; `lifeboat keygen --signing` prints one"),
            );
        }
    }
    let unsigned_before = raw
        .unsigned_before
        .as_deref()
        .and_then(|t| rfc3339("signing.unsigned_before", t, p));
    SigningConfig {
        trusted: raw.trusted,
        key_file: raw.key_file.filter(|f| !f.is_empty()).map(PathBuf::from),
        unsigned_before,
    }
}

fn validate_agent(raw: RawAgent, p: &mut Problems) -> AgentConfig {
    let listen = match raw.listen.as_deref() {
        None => default_listen(),
        Some(s) => s.parse().unwrap_or_else(|_| {
            p.add(
                "agent.listen",
                format!("`{s}` is not an address such as `127.0.0.1:9187` or `0.0.0.0:9187`"),
            );
            default_listen()
        }),
    };
    let max_concurrent = match raw.max_concurrent {
        None => 1,
        Some(0) => {
            p.add("agent.max_concurrent", "must be at least 1");
            1
        }
        Some(n) => n,
    };
    let shutdown_grace = raw
        .shutdown_grace
        .as_deref()
        .map(|s| duration("agent.shutdown_grace", s, p))
        .unwrap_or_else(default_shutdown_grace);
    AgentConfig {
        listen,
        log_format: raw.log_format.unwrap_or_default(),
        max_concurrent,
        shutdown_grace,
    }
}

/// Path-style addressing: `auto` means path-style with a custom endpoint, virtual-hosted on AWS.
pub(crate) fn path_style(addressing: Option<Addressing>, custom_endpoint: bool) -> bool {
    match addressing.unwrap_or(Addressing::Auto) {
        Addressing::Auto => custom_endpoint,
        Addressing::Path => true,
        Addressing::Virtual => false,
    }
}

/// The shared settings of any raw source struct (they all name them alike; serde's `flatten`
/// would lose `deny_unknown_fields`, so each kind repeats the fields and this gathers them).
macro_rules! common_raw {
    ($raw:expr) => {
        CommonRaw {
            schedule: $raw.schedule.as_deref(),
            timeout: $raw.timeout.as_deref(),
            compression: $raw.compression.as_ref(),
            retention: $raw.retention.as_ref(),
            objectives: $raw.objectives.as_ref(),
            verify: $raw.verify.as_ref(),
            jitter: $raw.jitter.as_deref(),
            retries: $raw.retries,
            run_on_start: $raw.run_on_start,
            moved_at: $raw.moved_at.as_deref(),
        }
    };
}
pub(crate) use common_raw;

/// The settings every kind of source shares, as written.
pub(crate) struct CommonRaw<'a> {
    pub(crate) schedule: Option<&'a str>,
    pub(crate) timeout: Option<&'a str>,
    pub(crate) compression: Option<&'a RawCompression>,
    pub(crate) retention: Option<&'a RawRetention>,
    pub(crate) objectives: Option<&'a RawObjectives>,
    pub(crate) verify: Option<&'a RawVerify>,
    pub(crate) jitter: Option<&'a str>,
    pub(crate) retries: Option<u32>,
    pub(crate) run_on_start: Option<bool>,
    pub(crate) moved_at: Option<&'a str>,
}

pub(crate) struct Common {
    schedule: Option<Schedule>,
    timeout: Duration,
    compression: Compression,
    retention: Option<Retention>,
    objectives: Objectives,
    verify: VerifyPolicy,
    jitter: Option<Duration>,
    retries: u32,
    run_on_start: bool,
    moved_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Common {
    pub(crate) fn into_source(self, name: String, config: SourceConfig) -> Option<SourcePolicy> {
        Some(SourcePolicy {
            name,
            schedule: self.schedule,
            jitter: self.jitter,
            retries: self.retries,
            run_on_start: self.run_on_start,
            moved_at: self.moved_at,
            timeout: self.timeout,
            compression: self.compression,
            retention: self.retention?,
            objectives: self.objectives,
            verify: self.verify,
            config,
        })
    }
}

pub(crate) fn common_settings(
    path: &str,
    raw: CommonRaw<'_>,
    d: &RawDefaults,
    p: &mut Problems,
) -> Common {
    let CommonRaw {
        schedule,
        timeout,
        compression,
        retention,
        objectives,
        verify,
        jitter,
        retries,
        run_on_start,
        moved_at,
    } = raw;
    let moved_at = moved_at.and_then(|t| rfc3339(&format!("{path}.moved_at"), t, p));
    let jitter = jitter.map(|j| duration(&format!("{path}.jitter"), j, p));
    if retries.is_some_and(|r| r > 10) {
        p.add(
            format!("{path}.retries"),
            "more than 10 retries would hide a broken source; use at most 10",
        );
    }
    let schedule = match (schedule, d.schedule.as_deref()) {
        (Some(s), _) => cron(&format!("{path}.schedule"), s, p),
        (None, Some(s)) => cron("defaults.schedule", s, p),
        (None, None) => None,
    };
    let timeout = match (timeout, d.timeout.as_deref()) {
        (Some(t), _) => duration(&format!("{path}.timeout"), t, p),
        (None, Some(t)) => duration("defaults.timeout", t, p),
        (None, None) => default_timeout(),
    };
    let (cpath, craw) = match (compression, d.compression.as_ref()) {
        (Some(c), _) => (format!("{path}.compression"), Some(c)),
        (None, Some(c)) => ("defaults.compression".to_string(), Some(c)),
        (None, None) => (String::new(), None),
    };
    let compression = validate_compression(&cpath, craw, p);
    let retention = match (retention, d.retention.as_ref()) {
        (Some(r), _) => validate_retention(&format!("{path}.retention"), r, p),
        (None, Some(r)) => validate_retention("defaults.retention", r, p),
        (None, None) => {
            p.add(
                format!("{path}.retention"),
                "no retention rules: set them here or in [defaults], e.g. retention = { keep_last = 7, keep_daily = 7 }",
            );
            None
        }
    };
    let (opath, oraw) = match (objectives, d.objectives.as_ref()) {
        (Some(o), _) => (format!("{path}.objectives"), Some(o)),
        (None, Some(o)) => ("defaults.objectives".to_string(), Some(o)),
        (None, None) => (String::new(), None),
    };
    let objectives = oraw
        .map(|o| Objectives {
            rpo: o
                .rpo
                .as_deref()
                .map(|s| duration(&format!("{opath}.rpo"), s, p)),
            rto: o
                .rto
                .as_deref()
                .map(|s| duration(&format!("{opath}.rto"), s, p)),
        })
        .unwrap_or_default();
    let verify = verify
        .map(|v| validate_verify(&format!("{path}.verify"), v, p))
        .unwrap_or_default();
    Common {
        schedule,
        timeout,
        compression,
        retention,
        objectives,
        verify,
        jitter,
        retries: retries.unwrap_or_else(default_retries),
        run_on_start: run_on_start.unwrap_or(false),
        moved_at,
    }
}

/// An RFC 3339 time at `path`.
fn rfc3339(path: &str, t: &str, p: &mut Problems) -> Option<chrono::DateTime<chrono::Utc>> {
    match chrono::DateTime::parse_from_rfc3339(t) {
        Ok(t) => Some(t.with_timezone(&chrono::Utc)),
        Err(_) => {
            p.add(
                path,
                format!("`{t}` is not an RFC 3339 time such as `2026-12-03T00:00:00Z`"),
            );
            None
        }
    }
}

fn validate_compression(path: &str, raw: Option<&RawCompression>, p: &mut Problems) -> Compression {
    let level = match raw.and_then(|c| c.level) {
        None => default_compression_level(),
        Some(l) if (1..=19).contains(&l) => l,
        Some(l) => {
            p.add(
                format!("{path}.level"),
                format!("{l} is outside zstd's levels 1–19"),
            );
            default_compression_level()
        }
    };
    let workers = match raw.and_then(|c| c.workers) {
        None => default_compression_workers(),
        Some(w) if w <= 64 => w,
        Some(w) => {
            p.add(format!("{path}.workers"), format!("{w} is more than 64"));
            default_compression_workers()
        }
    };
    Compression { level, workers }
}

fn validate_retention(path: &str, r: &RawRetention, p: &mut Problems) -> Option<Retention> {
    let mut ok = true;
    for (field, v) in [
        ("keep_last", r.keep_last),
        ("keep_hourly", r.keep_hourly),
        ("keep_daily", r.keep_daily),
        ("keep_weekly", r.keep_weekly),
        ("keep_monthly", r.keep_monthly),
        ("keep_yearly", r.keep_yearly),
        ("keep_last_verified", r.keep_last_verified),
    ] {
        if v == Some(0) {
            p.add(
                format!("{path}.{field}"),
                "0 is not allowed; leave the rule out to disable it",
            );
            ok = false;
        }
    }
    let keep_within = r
        .keep_within
        .as_deref()
        .map(|s| duration(&format!("{path}.keep_within"), s, p));
    let out = Retention {
        keep_last: r.keep_last,
        keep_hourly: r.keep_hourly,
        keep_daily: r.keep_daily,
        keep_weekly: r.keep_weekly,
        keep_monthly: r.keep_monthly,
        keep_yearly: r.keep_yearly,
        keep_within,
        keep_last_verified: r
            .keep_last_verified
            .unwrap_or_else(default_keep_last_verified),
    };
    let any = out.keep_last.is_some()
        || out.keep_hourly.is_some()
        || out.keep_daily.is_some()
        || out.keep_weekly.is_some()
        || out.keep_monthly.is_some()
        || out.keep_yearly.is_some()
        || out.keep_within.is_some();
    if !any {
        p.add(
            path,
            "an empty rule set would delete every backup but the newest; set at least one keep_* rule",
        );
        ok = false;
    }
    ok.then_some(out)
}

fn validate_verify(path: &str, v: &RawVerify, p: &mut Problems) -> VerifyPolicy {
    let schedule = v
        .schedule
        .as_deref()
        .and_then(|s| cron(&format!("{path}.schedule"), s, p));
    let mut checks = Vec::new();
    for (i, c) in v.checks.iter().enumerate() {
        if c.min.is_none() && c.max.is_none() && c.equals.is_none() {
            p.add(
                format!("{path}.checks[{i}]"),
                "a check needs `min`, `max` or `equals`",
            );
        }
        if c.sql.trim().is_empty() {
            p.add(format!("{path}.checks[{i}].sql"), "is empty");
        }
        let database = match c.database.as_deref().map(str::trim) {
            None => None,
            Some("*") => Some(CheckDatabase::Every),
            Some("") => {
                p.add(
                    format!("{path}.checks[{i}].database"),
                    "is empty: name a database, or \"*\" for every one; leave it out for the url's",
                );
                None
            }
            Some(name) => Some(CheckDatabase::Named(name.to_string())),
        };
        checks.push(SqlCheck {
            sql: c.sql.clone(),
            min: c.min,
            max: c.max,
            equals: c.equals,
            database,
        });
    }
    VerifyPolicy {
        schedule,
        checks,
        scratch_url: v.scratch_url.clone().map(Secret::new),
        postgres_bin_dir: v.postgres_bin_dir.clone().map(PathBuf::from),
        cover_days: v.cover_days,
        timeout: v
            .timeout
            .as_deref()
            .map_or_else(default_verify_timeout, |t| {
                duration(&format!("{path}.timeout"), t, p)
            }),
        scratch_max_size: v.scratch_max_size.as_deref().and_then(|s| {
            let n = parse_size(s);
            if n.is_none_or(|n| n < 64 << 20) {
                p.add(
                    format!("{path}.scratch_max_size"),
                    format!("`{s}` is not a size of at least 64MiB; write e.g. `20GiB`"),
                );
            }
            n
        }),
        scratch_keep_free: v.scratch_keep_free.as_deref().and_then(|s| {
            let n = parse_size(s);
            if n.is_none() {
                p.add(
                    format!("{path}.scratch_keep_free"),
                    format!("`{s}` is not a size; write e.g. `500MiB`"),
                );
            }
            n
        }),
        restore_as_superuser: v.restore_as_superuser.unwrap_or(false),
    }
}

pub(crate) fn check_name(path: &str, name: &str, p: &mut Problems) {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.'
        });
    if !ok {
        p.add(
            path,
            format!("`{name}` must be 1–63 characters of a-z, 0-9, `-`, `_`, `.`, starting with a letter or digit"),
        );
    }
}

/// Parses a human duration ("30s", "2h", "14d"), recording a problem at `path` if it is not one.
pub fn duration(path: &str, s: &str, p: &mut Problems) -> Duration {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            p.add(
                path,
                "a zero duration is not allowed; leave the field out to disable it",
            );
            Duration::from_secs(1)
        }
        Err(_) => {
            p.add(
                path,
                format!("`{s}` is not a duration; write e.g. `30s`, `15m`, `2h` or `14d`"),
            );
            Duration::from_secs(1)
        }
    }
}

/// Parses a cron expression of 5 fields (minute precision) or 6 (with seconds).
pub fn cron(path: &str, s: &str, p: &mut Problems) -> Option<Schedule> {
    let fields = s.split_whitespace().count();
    if fields != 5 && fields != 6 {
        p.add(
            path,
            format!("`{s}` has {fields} fields; a schedule has 5 (`min hour day month weekday`) or 6 (seconds first)"),
        );
        return None;
    }
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build();
    match parser.parse(s) {
        Ok(_) => Some(Schedule {
            expression: s.to_string(),
        }),
        Err(e) => {
            p.add(path, format!("`{s}` is not a valid cron expression: {e}"));
            None
        }
    }
}

/// Parses a size such as `8MiB`, `64MB` or `1048576`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Query parameters that carry a credential.
const SECRET_PARAMS: &[&str] = &[
    "password",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "sig",
    "signature",
];

/// Webhook services whose URL path is itself the credential.
const SECRET_PATH_HOSTS: &[&str] = &["hooks.slack.com", "discord.com", "discordapp.com"];

/// What in `raw`, a URL as written in the policy (before `${VAR}` interpolation), is a
/// credential written out literally: a password in the user info, a credential query parameter
/// (or `password=` in key=value form), or a webhook URL whose path is its secret. `None` when
/// every credential comes from the environment (`${VAR}`) or there is none.
pub fn literal_secret(raw: &str) -> Option<&'static str> {
    let from_env = |value: &str| value.replace("$${", "").contains("${");
    if raw.trim_start().starts_with("${") && !raw.contains("://") {
        return None;
    }
    let Some(scheme_end) = raw.find("://") else {
        let literal = raw
            .split_whitespace()
            .filter_map(|kv| kv.strip_prefix("password="))
            .any(|v| !v.is_empty() && !from_env(v));
        return literal.then_some("its password= setting");
    };
    let rest = &raw[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if let Some((_, password)) = userinfo.split_once(':') {
            if !password.is_empty() && !from_env(password) {
                return Some("the password in its user info (user:PASSWORD@)");
            }
        }
    }
    if let Some((_, query)) = rest.split_once('?') {
        for pair in query.split(['&', '#']) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if SECRET_PARAMS.contains(&name.to_ascii_lowercase().as_str())
                && !value.is_empty()
                && !from_env(value)
            {
                return Some("a credential in its query (password=, token=, …)");
            }
        }
    }
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = host.split(':').next().unwrap_or(host).to_ascii_lowercase();
    let path = &rest[authority_end..];
    let secret_path =
        SECRET_PATH_HOSTS.contains(&host.as_str()) || host.ends_with(".webhook.office.com");
    if secret_path && path.len() > 1 && !from_env(path) {
        return Some("a webhook address whose path is its secret");
    }
    None
}

/// A connection URL with its password replaced by `***` (both URL and key=value forms).
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
        // A password may also come as a query parameter.
        if let Some(q) = url.find("password=") {
            let end = url[q..].find('&').map(|e| q + e).unwrap_or(url.len());
            return format!("{}password=***{}", &url[..q], &url[end..]);
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***".to_string()
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_credentials_are_found_and_environment_ones_pass() {
        for raw in [
            "postgresql://postgres:hunter2@db/app",
            "redis://:hunter2@cache:6379",
            "postgres://u@h/db?sslmode=require&password=pw",
            "host=h user=u password=pw dbname=d",
            "https://alerts.example/hook?token=abc",
            "https://hooks.slack.com/services/T000/B000/XXXX",
            "postgres://u:pre${X}post@h/db?password=literal",
        ] {
            assert!(literal_secret(raw).is_some(), "{raw}");
        }
        for raw in [
            "postgres://backup:${PGPASSWORD}@127.0.0.1:5432/app",
            "postgres://backup@db/app",
            "redis://:${REDIS_PW}@cache:6379",
            "${DATABASE_URL}",
            "https://alerts.example/lifeboat",
            "https://hooks.slack.com/services/${SLACK_PATH}",
            "http://relay:8080/hook?format=json",
            "host=h user=u dbname=d",
            "postgres://u@h/db?password=${PW}",
        ] {
            assert_eq!(literal_secret(raw), None, "{raw}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Some(8 << 20));
        assert_eq!(parse_size("16MB"), Some(16_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("8 MiB"), Some(8 << 20));
        assert_eq!(parse_size("8Mb"), None);
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn cron_accepts_five_and_six_fields_only() {
        let mut p = Problems::default();
        assert!(cron("s", "0 */6 * * *", &mut p).is_some());
        assert!(cron("s", "30 0 */6 * * *", &mut p).is_some());
        assert!(p.0.is_empty(), "{:?}", p.0);
        assert!(cron("s", "0 0 */6 * * * 2030", &mut p).is_none());
        assert!(cron("s", "61 * * * *", &mut p).is_none());
        assert!(cron("s", "every day", &mut p).is_none());
        assert_eq!(p.0.len(), 3);
        assert!(p.0[0].message.contains("has 7 fields"));
    }

    #[test]
    fn redaction_hides_passwords_in_every_form() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u@h/db?password=pw&sslmode=disable"),
            "postgres://u@h/db?password=***&sslmode=disable"
        );
        assert_eq!(
            redact_url("host=h user=u password=pw dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
    }
}
