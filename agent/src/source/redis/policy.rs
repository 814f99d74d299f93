//! The `kind = "redis"` policy section: as written, validated, and registered as a kind.

use std::path::PathBuf;

use serde::Deserialize;

use crate::policy::raw::{RawCompression, RawObjectives, RawRetention, RawVerify};
use crate::policy::validate::{check_name, common_raw, common_settings, redact_url, CommonRaw};
use crate::policy::{EncryptionConfig, Problems, Secret, SourceContext, SourcePolicy};
use crate::source::{Source, SourceConfig, SourceKind};

/// `[[sources]]` with `kind = "redis"`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRedisSource {
    /// Unique name; used in object keys, metrics and commands.
    pub name: String,
    /// Always `redis` here.
    pub kind: String,
    /// `redis://[USER[:PASSWORD]@]HOST[:PORT]` or `rediss://…` for TLS; `${VAR}` for secrets. Or
    /// `redis+sentinel://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]…]/MASTER[?role=replica]`:
    /// the primary (or a healthy replica) the sentinels name at each run. Or
    /// `redis+cluster://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]…]`: every shard of the
    /// cluster these nodes belong to, in one backup.
    pub url: String,
    /// File holding the password, instead of putting it in the URL.
    pub password_file: Option<String>,
    /// `replication` (default: connect as a replica), `file` (BGSAVE, then read `rdb_path`) or
    /// `scan` (SCAN + DUMP every key into an RDB file, for managed services that refuse both;
    /// not a point in time).
    pub mode: Option<RedisMode>,
    /// `mode = "scan"`: most keys read per second, so that production latency is not hurt;
    /// default 20000.
    pub scan_rate: Option<u32>,
    /// The server's RDB file on a shared volume (`mode = "file"` only).
    pub rdb_path: Option<String>,
    /// `redis+cluster://`: capture each shard from a healthy replica where it has one, sparing
    /// the primaries; default false.
    pub prefer_replica: Option<bool>,
    /// PEM file of the CA that signed the server's certificate (`rediss://`).
    pub tls_ca_file: Option<String>,
    /// Directory holding redis-server and redis-check-rdb, for verify and restore; PATH when unset.
    pub redis_bin_dir: Option<String>,
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
    /// Verification settings (`schedule` only: SQL checks are for PostgreSQL).
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

/// How a Redis snapshot is taken.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// Connect as a replica and stream the RDB payload (no shared volume).
    #[default]
    Replication,
    /// `BGSAVE`, then read the RDB file from a shared volume.
    File,
    /// `SCAN`, `DUMP` and `PTTL` every key, and write an RDB file from the payloads.
    Scan,
}

/// A Redis source.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Where the server is and how to log in.
    pub endpoint: RedisEndpoint,
    /// The URL with any password replaced by `***`.
    pub url_redacted: String,
    /// Password file.
    pub password_file: Option<PathBuf>,
    /// How the snapshot is taken.
    pub capture: RedisCapture,
    /// CA for verified TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Where redis-server and redis-check-rdb are; PATH when unset.
    pub bin_dir: Option<PathBuf>,
    /// `redis+cluster://`: capture shards from their replicas where healthy.
    pub prefer_replica: bool,
}

/// A Redis server's address and login.
#[derive(Debug, Clone)]
pub struct RedisEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `rediss://`: TLS, verified.
    pub tls: bool,
    /// ACL user (`AUTH user password`); the default user when unset.
    pub username: Option<String>,
    /// Password from the URL.
    pub password: Option<Secret>,
    /// `redis+sentinel://`: the server is whichever the sentinels name (`host` and `port` are
    /// the first sentinel's).
    pub sentinel: Option<Sentinel>,
    /// `redis+cluster://`: the nodes asked for the cluster's shards (`host` and `port` are the
    /// first's).
    pub cluster: Option<Vec<(String, u16)>>,
}

/// Where Sentinel is asked for the server to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinel {
    /// The sentinels, asked in turn (host, port; 26379 by default).
    pub sentinels: Vec<(String, u16)>,
    /// The monitored primary's name (the URL's path).
    pub master: String,
    /// `?role=replica`: capture a healthy replica of it instead of the primary.
    pub replica: bool,
}

/// How a Redis snapshot is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisCapture {
    /// As a replica, over the network.
    Replication,
    /// `BGSAVE`, then read this file.
    File {
        /// The server's RDB file, on a shared volume.
        rdb_path: PathBuf,
    },
    /// `SCAN` + `DUMP`, at most `rate` keys a second.
    Scan {
        /// Keys per second.
        rate: u32,
    },
}

#[async_trait::async_trait]
impl SourceKind for RedisConfig {
    const NAME: &'static str = "redis";
    const ORIGIN_IS_STABLE: bool = false;
    type Raw = RawRedisSource;

    fn validate(
        path: &str,
        raw: RawRedisSource,
        ctx: &SourceContext<'_>,
        p: &mut Problems,
    ) -> Option<SourcePolicy> {
        validate(path, raw, ctx, p)
    }

    fn source(&self, _encryption: &EncryptionConfig) -> Box<dyn Source> {
        Box::new(super::Redis::new(self.clone()))
    }

    fn verify_steps(&self) -> Box<dyn crate::verify::Steps> {
        Box::new(super::verify::RedisSteps::new(self.clone()))
    }

    async fn plan_restore(
        request: &crate::restore::Request<'_>,
    ) -> crate::Result<crate::restore::Plan> {
        super::restore::plan(request).await
    }
}

fn validate(
    path: &str,
    raw: RawRedisSource,
    ctx: &SourceContext<'_>,
    p: &mut Problems,
) -> Option<SourcePolicy> {
    check_name(&format!("{path}.name"), &raw.name, p);
    let url_redacted = redact_url(&raw.url);
    let endpoint = endpoint(
        path,
        &raw.url,
        &url_redacted,
        raw.password_file.is_some(),
        p,
    );
    let mut mode = capture(path, raw.mode.unwrap_or_default(), raw.rdb_path, p);
    match (&mut mode, raw.scan_rate) {
        (RedisCapture::Scan { rate }, Some(r)) if r > 0 => *rate = r,
        (RedisCapture::Scan { .. }, Some(_)) => p.add(
            format!("{path}.scan_rate"),
            "must be at least 1 key per second",
        ),
        (_, Some(_)) => p.add(
            format!("{path}.scan_rate"),
            "is read only with mode = \"scan\"; remove it, or set mode = \"scan\"",
        ),
        _ => {}
    }
    let cluster = endpoint.as_ref().is_some_and(|e| e.cluster.is_some());
    if cluster && matches!(mode, RedisCapture::File { .. }) {
        p.add(
            format!("{path}.mode"),
            "mode = \"file\" reads one server's dump.rdb; a cluster is captured with mode = \"replication\" (default) or \"scan\"",
        );
    }
    if raw.prefer_replica.is_some() && !cluster && endpoint.is_some() {
        p.add(
            format!("{path}.prefer_replica"),
            "applies to redis+cluster:// urls; with Sentinel add ?role=replica to the url",
        );
    }
    if let Some(v) = &raw.verify {
        reject_foreign_verify(path, v, p);
    }
    let common = common_settings(path, common_raw!(raw), ctx.defaults, p);
    common.into_source(
        raw.name,
        SourceConfig::Redis(RedisConfig {
            // No endpoint: either a problem was recorded, or the URL holds an unset ${VAR} and
            // validation runs with --allow-missing-env; the source still counts.
            endpoint: endpoint.unwrap_or(RedisEndpoint {
                host: String::new(),
                port: 6379,
                tls: false,
                username: None,
                password: None,
                sentinel: None,
                cluster: None,
            }),
            url_redacted,
            password_file: raw.password_file.map(PathBuf::from),
            capture: mode,
            tls_ca_file: raw.tls_ca_file.map(PathBuf::from),
            bin_dir: raw.redis_bin_dir.map(PathBuf::from),
            prefer_replica: raw.prefer_replica.unwrap_or(false),
        }),
    )
}

/// The server to connect to, from `url` (`url_redacted` for messages).
fn endpoint(
    path: &str,
    url: &str,
    url_redacted: &str,
    has_password_file: bool,
    p: &mut Problems,
) -> Option<RedisEndpoint> {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some(many) = many_hosts(path, scheme, rest, url_redacted, has_password_file, p) {
            return match many {
                Some(m) if scheme.ends_with("+sentinel") => sentinel_endpoint(m, url_redacted, p),
                Some(m) => cluster_endpoint(m, url_redacted, p),
                None => None,
            };
        }
    }
    match url::Url::parse(url) {
        Err(e) => {
            p.add(
                format!("{path}.url"),
                format!("`{url_redacted}` is not a URL ({e}); write redis://HOST:PORT or rediss://HOST:PORT"),
            );
            None
        }
        Ok(u) if !matches!(u.scheme(), "redis" | "rediss") => {
            p.add(
                format!("{path}.url"),
                format!("`{url_redacted}`: the scheme must be redis:// or rediss:// (TLS)"),
            );
            None
        }
        Ok(u) => match u.host_str() {
            None | Some("") => {
                p.add(
                    format!("{path}.url"),
                    format!("`{url_redacted}` names no host; write redis://HOST:PORT"),
                );
                None
            }
            Some(host) => {
                let decode = |s: &str| {
                    url::form_urlencoded::parse(format!("x={s}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                let password = u.password().map(|pw| Secret::new(decode(pw)));
                if password.is_some() && has_password_file {
                    p.add(
                        format!("{path}.password_file"),
                        "the url already carries a password; keep one of the two",
                    );
                }
                Some(RedisEndpoint {
                    host: host.trim_matches(['[', ']']).to_string(),
                    port: u.port().unwrap_or(6379),
                    tls: u.scheme() == "rediss",
                    username: (!u.username().is_empty()).then(|| decode(u.username())),
                    password,
                    sentinel: None,
                    cluster: None,
                })
            }
        },
    }
}

/// A `redis+sentinel://` or `redis+cluster://` url, its hosts parsed.
struct ManyHosts<'r> {
    /// The first host's endpoint, with the login (every host's).
    ep: RedisEndpoint,
    /// Every host.
    hosts: Vec<(String, u16)>,
    /// What follows the hosts (path and query).
    tail: &'r str,
    /// `{path}.url`.
    field: String,
    /// How to write the url, for messages.
    form: &'static str,
}

/// `redis+sentinel://…` and `redis+cluster://…` (`rediss+…` for TLS): the scheme's suffix,
/// whose `HOST:PORT` each host is, the default port, and how to write the url.
const MANY_HOST_FORMS: [(&str, &str, u16, &str); 2] = [
    (
        "sentinel",
        "a sentinel's",
        26379,
        "write redis+sentinel://HOST:26379[,HOST:26379…]/MASTER_NAME",
    ),
    (
        "cluster",
        "a node's",
        6379,
        "write redis+cluster://HOST:PORT[,HOST:PORT…] (any nodes of the cluster)",
    ),
];

/// Parses `scheme://rest` if the scheme is one of [`MANY_HOST_FORMS`]: `None` if it is not,
/// `Some(None)` once a problem is recorded.
fn many_hosts<'r>(
    path: &str,
    scheme: &str,
    rest: &'r str,
    url_redacted: &str,
    has_password_file: bool,
    p: &mut Problems,
) -> Option<Option<ManyHosts<'r>>> {
    let (suffix, whose, default_port, form) = MANY_HOST_FORMS
        .into_iter()
        .find(|(suffix, ..)| scheme.ends_with(&format!("+{suffix}")))?;
    let data_scheme = &scheme[..scheme.len() - suffix.len() - 1];
    let field = format!("{path}.url");
    if !matches!(data_scheme, "redis" | "rediss") {
        p.add(
            field,
            format!("`{url_redacted}`: the scheme must be redis+{suffix}:// or rediss+{suffix}://"),
        );
        return Some(None);
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let hosts = match host_list(hosts, default_port) {
        Ok(list) => list,
        Err(host) => {
            p.add(
                field,
                format!("`{url_redacted}`: `{host}` is not {whose} HOST:PORT; {form}"),
            );
            return Some(None);
        }
    };
    let (host, port) = &hosts[0];
    let first = if host.contains(':') {
        format!("{data_scheme}://{userinfo}[{host}]:{port}")
    } else {
        format!("{data_scheme}://{userinfo}{host}:{port}")
    };
    Some(
        endpoint(path, &first, url_redacted, has_password_file, p).map(|ep| ManyHosts {
            ep,
            hosts,
            tail,
            field,
            form,
        }),
    )
}

/// `redis+sentinel://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]…]/MASTER[?role=replica]` (or
/// `rediss+sentinel://`, TLS to sentinels and servers alike): the login is the server's.
fn sentinel_endpoint(
    m: ManyHosts<'_>,
    url_redacted: &str,
    p: &mut Problems,
) -> Option<RedisEndpoint> {
    let ManyHosts {
        mut ep,
        hosts,
        tail,
        field,
        form,
    } = m;
    let Ok(rest_url) = url::Url::parse(&format!("redis://x{tail}")) else {
        p.add(field, format!("`{url_redacted}` is not a URL; {form}"));
        return None;
    };
    let master = rest_url.path().trim_matches('/').to_string();
    if master.is_empty() || master.contains('/') {
        p.add(
            field,
            format!("`{url_redacted}` names no monitored primary; {form} (the name in `SENTINEL MONITOR`)"),
        );
        return None;
    }
    let mut replica = false;
    for (k, v) in rest_url.query_pairs() {
        match (k.as_ref(), v.as_ref()) {
            ("role", "replica") => replica = true,
            ("role", "primary") => replica = false,
            _ => {
                p.add(
                    field,
                    format!("`{url_redacted}`: unknown parameter `{k}={v}`; only role=primary (default) or role=replica"),
                );
                return None;
            }
        }
    }
    ep.sentinel = Some(Sentinel {
        sentinels: hosts,
        master,
        replica,
    });
    Some(ep)
}

/// `redis+cluster://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]…]` (or `rediss+cluster://`): any
/// nodes of the cluster, asked in turn for its shards at each run; the login is every node's.
fn cluster_endpoint(
    m: ManyHosts<'_>,
    url_redacted: &str,
    p: &mut Problems,
) -> Option<RedisEndpoint> {
    if !m.tail.trim_matches('/').is_empty() {
        p.add(
            m.field,
            format!(
                "`{url_redacted}`: a cluster has database 0 only and the url takes no path or parameters; {}",
                m.form
            ),
        );
        return None;
    }
    let mut ep = m.ep;
    ep.cluster = Some(m.hosts);
    Some(ep)
}

/// `HOST[:PORT],HOST[:PORT]…` as (host, port) pairs; `Err` names the host that is not one.
fn host_list(hosts: &str, default_port: u16) -> Result<Vec<(String, u16)>, String> {
    hosts
        .split(',')
        .map(|host| match url::Url::parse(&format!("redis://{host}")) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok((
                u.host_str()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_string(),
                u.port().unwrap_or(default_port),
            )),
            _ => Err(host.to_string()),
        })
        .collect()
}

/// Keys a scan reads per second unless `scan_rate` says.
pub const DEFAULT_SCAN_RATE: u32 = 20_000;

/// How the snapshot is taken: the replication protocol, a shared dump.rdb, or a scan.
fn capture(
    path: &str,
    mode: RedisMode,
    rdb_path: Option<String>,
    p: &mut Problems,
) -> RedisCapture {
    match (mode, rdb_path) {
        (RedisMode::Scan, None) => RedisCapture::Scan {
            rate: DEFAULT_SCAN_RATE,
        },
        (RedisMode::Scan, Some(_)) => {
            p.add(
                format!("{path}.rdb_path"),
                "is read only with mode = \"file\"; remove it",
            );
            RedisCapture::Scan {
                rate: DEFAULT_SCAN_RATE,
            }
        }
        (RedisMode::Replication, None) => RedisCapture::Replication,
        (RedisMode::Replication, Some(_)) => {
            p.add(
                format!("{path}.rdb_path"),
                "is read only with mode = \"file\"; remove it, or set mode = \"file\"",
            );
            RedisCapture::Replication
        }
        (RedisMode::File, Some(rdb)) => RedisCapture::File {
            rdb_path: PathBuf::from(rdb),
        },
        (RedisMode::File, None) => {
            p.add(
                format!("{path}.rdb_path"),
                "mode = \"file\" needs rdb_path: the server's dump.rdb on a volume shared with this pod",
            );
            RedisCapture::Replication
        }
    }
}

/// Verify settings of other kinds, each with what a Redis backup does instead.
fn reject_foreign_verify(path: &str, v: &RawVerify, p: &mut Problems) {
    if !v.checks.is_empty() {
        p.add(
            format!("{path}.verify.checks"),
            "SQL checks apply to postgres sources; a Redis backup is verified by key counts and a sample of keys",
        );
    }
    if v.scratch_url.is_some() {
        p.add(
            format!("{path}.verify.scratch_url"),
            "Redis backups are verified in an ephemeral redis-server; remove scratch_url",
        );
    }
    if v.postgres_bin_dir.is_some() {
        p.add(
            format!("{path}.verify.postgres_bin_dir"),
            "applies to postgres sources; use redis_bin_dir on this source",
        );
    }
    if v.scratch_max_size.is_some()
        || v.scratch_keep_free.is_some()
        || v.restore_as_superuser.is_some()
    {
        p.add(
            format!("{path}.verify"),
            "scratch_max_size, scratch_keep_free and restore_as_superuser apply to postgres sources; a Redis backup loads into an unprivileged redis-server",
        );
    }
    if v.cover_days.is_some() {
        p.add(
            format!("{path}.verify.cover_days"),
            "applies to objects sources; a Redis backup is always verified whole",
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::tests::{env, problems, with_redis};
    use crate::policy::{parse, LoadOptions};
    use crate::source::SourceConfig;

    #[test]
    fn a_redis_source_validates_into_its_endpoint() {
        let text = with_redis("url = \"rediss://backup:${PGPASSWORD}@cache.internal:6380\"\nredis_bin_dir = \"/opt/redis/bin\"");
        let p = parse(&text, "p.toml", &env, LoadOptions::default()).unwrap();
        let s = &p.sources[2];
        let SourceConfig::Redis(r) = &s.config else {
            panic!("the third source is redis")
        };
        assert_eq!(s.config.kind().name(), "redis");
        assert_eq!(r.endpoint.host, "cache.internal");
        assert_eq!(r.endpoint.port, 6380);
        assert!(r.endpoint.tls);
        assert_eq!(r.endpoint.username.as_deref(), Some("backup"));
        assert_eq!(r.endpoint.password.as_ref().map(|p| p.expose()), Some("pw"));
        assert_eq!(r.url_redacted, "rediss://backup:***@cache.internal:6380");
        assert_eq!(r.capture, crate::source::redis::RedisCapture::Replication);
        assert_eq!(
            s.retention.keep_last,
            Some(7),
            "defaults apply to every kind"
        );
    }

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_primary_and_the_login() {
        let text = with_redis(
            "url = \"redis+sentinel://backup:${PGPASSWORD}@s1.internal,[::1]:26380/cache-main?role=replica\"",
        );
        let p = parse(&text, "p.toml", &env, LoadOptions::default()).unwrap();
        let SourceConfig::Redis(r) = &p.sources[2].config else {
            panic!("the third source is redis")
        };
        let s = r.endpoint.sentinel.as_ref().expect("a sentinel endpoint");
        assert_eq!(
            s.sentinels,
            vec![("s1.internal".into(), 26379), ("::1".into(), 26380)]
        );
        assert_eq!((s.master.as_str(), s.replica), ("cache-main", true));
        assert_eq!(r.endpoint.username.as_deref(), Some("backup"));
        assert_eq!(r.endpoint.password.as_ref().map(|p| p.expose()), Some("pw"));
        assert!(!r.endpoint.tls);
        assert_eq!(
            r.url_redacted,
            "redis+sentinel://backup:***@s1.internal,[::1]:26380/cache-main?role=replica"
        );
        for (url, says) in [
            ("redis+sentinel://s1:26379", "names no monitored primary"),
            (
                "redis+sentinel://s1:26379/m?role=leader",
                "unknown parameter `role=leader`",
            ),
            (
                "redis+sentinel://s1:26379,:1/m",
                "is not a sentinel's HOST:PORT",
            ),
            ("http+sentinel://s1/m", "must be redis+sentinel://"),
        ] {
            let got = problems(&with_redis(&format!("url = \"{url}\"")));
            assert!(
                got.len() == 1 && got[0].starts_with("sources[2].url: ") && got[0].contains(says),
                "{url}: {got:?}"
            );
        }
    }

    #[test]
    fn a_cluster_url_names_its_nodes_and_takes_no_file_mode() {
        let text = with_redis(
            "url = \"rediss+cluster://backup:${PGPASSWORD}@n1.internal,[::1]:7001\"\nprefer_replica = true",
        );
        let p = parse(&text, "p.toml", &env, LoadOptions::default()).unwrap();
        let SourceConfig::Redis(r) = &p.sources[2].config else {
            panic!("the third source is redis")
        };
        assert_eq!(
            r.endpoint.cluster,
            Some(vec![("n1.internal".into(), 6379), ("::1".into(), 7001)])
        );
        assert!(r.endpoint.tls && r.prefer_replica);
        assert_eq!(r.endpoint.password.as_ref().map(|p| p.expose()), Some("pw"));
        assert_eq!(
            r.url_redacted,
            "rediss+cluster://backup:***@n1.internal,[::1]:7001"
        );
        for (extra, says) in [
            (
                "url = \"redis+cluster://n1/0\"",
                "sources[2].url: `redis+cluster://n1/0`: a cluster has database 0 only",
            ),
            (
                "url = \"redis+cluster://n1\"\nmode = \"file\"\nrdb_path = \"/d/dump.rdb\"",
                "sources[2].mode: mode = \"file\" reads one server's dump.rdb",
            ),
            (
                "url = \"redis://n1\"\nprefer_replica = true",
                "sources[2].prefer_replica: applies to redis+cluster:// urls",
            ),
        ] {
            let got = problems(&with_redis(extra));
            assert!(
                got.len() == 1 && got[0].starts_with(says),
                "{extra}: {got:?}"
            );
        }
    }

    #[test]
    fn a_typo_in_a_redis_source_is_rejected_with_its_path() {
        let got = problems(&with_redis(
            "url = \"redis://h\"\nrdb_pth = \"/data/dump.rdb\"",
        ));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("sources[2].rdb_pth: unknown field"),
            "{got:?}"
        );
    }

    #[test]
    fn redis_settings_that_do_not_fit_are_named() {
        let got = problems(&with_redis(
            "url = \"http://h:6379\"\nmode = \"file\"\n[sources.verify]\nchecks = [{ sql = \"select 1\", min = 1 }]",
        ));
        assert!(
            got.iter()
                .any(|p| p
                    .starts_with("sources[2].url: `http://h:6379`: the scheme must be redis://")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|p| p.starts_with("sources[2].rdb_path: mode = \"file\" needs rdb_path")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|p| p.starts_with("sources[2].verify.checks: SQL checks apply to postgres")),
            "{got:?}"
        );
        let got = problems(&with_redis(
            "url = \"redis://h\"\nrdb_path = \"/data/dump.rdb\"",
        ));
        assert!(
            got[0].starts_with("sources[2].rdb_path: is read only with mode = \"file\""),
            "{got:?}"
        );
    }
}
