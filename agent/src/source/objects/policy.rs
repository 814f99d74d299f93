//! The `kind = "objects"` policy section: as written, validated, and registered as a kind.

use std::path::PathBuf;

use serde::Deserialize;

use crate::policy::raw::{
    Addressing, ChecksumMode, RawCompression, RawObjectives, RawRetention, RawVerify,
};
use crate::policy::validate::{
    check_name, common_raw, common_settings, default_region, path_style, CommonRaw,
};
use crate::policy::{EncryptionConfig, Problems, S3Config, SourceContext, SourcePolicy};
use crate::source::{Source, SourceConfig, SourceKind};

/// `[[sources]]` with `kind = "objects"`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawObjectsSource {
    /// Unique name; used in object keys, metrics and commands.
    pub name: String,
    /// Always `objects` here.
    pub kind: String,
    /// `dir:///path` (a directory tree) or `s3://bucket/prefix/` (a bucket or part of one).
    pub from: String,
    /// S3-compatible endpoint of the source bucket (independent of the repository's).
    pub endpoint: Option<String>,
    /// Region of the source bucket; default `us-east-1`.
    pub region: Option<String>,
    /// `auto`, `path` or `virtual` addressing for the source bucket.
    pub addressing: Option<Addressing>,
    /// Glob patterns of paths (relative to `from`) to back up; everything when unset.
    #[serde(default)]
    pub include: Vec<String>,
    /// Glob patterns of paths to leave out, e.g. `**/*.tmp`.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Fail a run whose source lost more than this share of its objects since the last snapshot; default 50.
    pub max_shrink_percent: Option<u32>,
    /// Record a snapshot even when the source is empty or shrank past `max_shrink_percent`.
    pub allow_shrink: Option<bool>,
    /// Objects read and stored at once; default 8.
    pub concurrency: Option<usize>,
    /// Contents of up to 1 MiB are stored together in packs of about this size, e.g. `16MiB`
    /// (the default): a million small files make dozens of repository objects, not a million.
    /// `0` stores every content as an object of its own.
    pub pack_size: Option<String>,
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
    /// Verification settings (`schedule` only).
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

/// Where an objects source reads from.
#[derive(Debug, Clone)]
pub enum ObjectsFrom {
    /// A directory tree.
    Dir(PathBuf),
    /// A bucket and prefix.
    S3(S3Config),
}

/// An objects source.
#[derive(Debug, Clone)]
pub struct ObjectsConfig {
    /// What is backed up.
    pub from: ObjectsFrom,
    /// `from` as written.
    pub from_shown: String,
    /// Glob patterns to include (all when empty).
    pub include: Vec<String>,
    /// Glob patterns to leave out.
    pub exclude: Vec<String>,
    /// The shrink guard, in percent; `None` with `allow_shrink`.
    pub max_shrink_percent: Option<u32>,
    /// Objects handled at once.
    pub concurrency: usize,
    /// Bytes at which a pack is completed; 0 when every content is an object of its own.
    pub pack_size: u64,
}

#[async_trait::async_trait]
impl SourceKind for ObjectsConfig {
    const NAME: &'static str = "objects";
    type Raw = RawObjectsSource;

    fn validate(
        path: &str,
        raw: RawObjectsSource,
        ctx: &SourceContext<'_>,
        p: &mut Problems,
    ) -> Option<SourcePolicy> {
        if ctx.encryption.is_some_and(|e| e.index_key.is_none()) {
            p.add(
                format!("{path}.kind"),
                "objects sources need encryption.index_key: a secret (${VAR}, e.g. from `openssl rand -hex 32`) that keys blob ids",
            );
        }
        validate(path, raw, ctx, p)
    }

    fn source(&self, encryption: &EncryptionConfig) -> Box<dyn Source> {
        Box::new(super::Objects::new(
            self.clone(),
            encryption.index_key.clone(),
        ))
    }

    fn verify_steps(&self) -> Box<dyn crate::verify::Steps> {
        Box::new(super::verify::ObjectsSteps::default())
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
        super::check::check_blobs(ctx, manifest).await
    }

    async fn shared_for_copy(
        repo: &crate::repo::Repository,
        _source: &str,
        keeping: &[&crate::repo::manifest::Manifest],
    ) -> crate::Result<Option<crate::copy::Shared>> {
        // Blobs are shared by every objects source and named by their content: a copy takes
        // those it lacks. Which blobs a snapshot names is sealed with the index key, which a copy
        // does not need; blobs no kept snapshot names are collected by the copy's own prune.
        if keeping.is_empty() {
            return Ok(None);
        }
        crate::copy::Shared::listed(repo, crate::repo::layout::blobs_prefix(), |_| true)
            .await
            .map(Some)
    }

    async fn plan_shared_collection(
        repo: &crate::repo::Repository,
        _source: &str,
        policy: &crate::policy::Policy,
        now: chrono::DateTime<chrono::Utc>,
        ignoring: &std::collections::HashSet<(String, String)>,
    ) -> crate::Result<Option<crate::collect::CollectionPlan>> {
        let index_key = policy.encryption.index_key.as_ref();
        Ok(Some(
            super::blobs::plan(repo, index_key, now, ignoring).await?,
        ))
    }
}

fn validate(
    path: &str,
    raw: RawObjectsSource,
    ctx: &SourceContext<'_>,
    p: &mut Problems,
) -> Option<SourcePolicy> {
    check_name(&format!("{path}.name"), &raw.name, p);
    let from = from(path, &raw, p);
    for (field, globs) in [("include", &raw.include), ("exclude", &raw.exclude)] {
        for (i, g) in globs.iter().enumerate() {
            if let Err(e) = globset::Glob::new(g) {
                p.add(
                    format!("{path}.{field}[{i}]"),
                    format!("`{g}` is not a glob: {e}"),
                );
            }
        }
    }
    let shrink = raw.max_shrink_percent.unwrap_or(50);
    if shrink > 100 {
        p.add(
            format!("{path}.max_shrink_percent"),
            "is a percentage: 0–100 (allow_shrink = true turns the guard off)",
        );
    }
    let concurrency = raw.concurrency.unwrap_or(8);
    if !(1..=64).contains(&concurrency) {
        p.add(format!("{path}.concurrency"), "must be 1–64");
    }
    let pack_size = match raw.pack_size.as_deref() {
        None => DEFAULT_PACK_SIZE,
        Some("0") => 0,
        Some(s) => match crate::policy::validate::parse_size(s) {
            Some(n) if (MIN_PACK_SIZE..=MAX_PACK_SIZE).contains(&n) => n,
            _ => {
                p.add(
                    format!("{path}.pack_size"),
                    format!("`{s}`: write a size from 1MiB to 1GiB, e.g. \"16MiB\", or \"0\" to store every content as an object of its own"),
                );
                DEFAULT_PACK_SIZE
            }
        },
    };
    if let Some(v) = &raw.verify {
        if v.cover_days == Some(0) {
            p.add(
                format!("{path}.verify.cover_days"),
                "must be at least 1; leave it out to re-hash every blob each time",
            );
        }
        if !v.checks.is_empty()
            || v.scratch_url.is_some()
            || v.postgres_bin_dir.is_some()
            || v.scratch_max_size.is_some()
            || v.scratch_keep_free.is_some()
            || v.restore_as_superuser.is_some()
        {
            p.add(
                format!("{path}.verify"),
                "objects sources are verified by re-hashing their blobs; only `schedule`, `cover_days` and `timeout` apply",
            );
        }
    }
    let common = common_settings(path, common_raw!(raw), ctx.defaults, p);
    common.into_source(
        raw.name,
        SourceConfig::Objects(ObjectsConfig {
            from,
            from_shown: raw.from,
            include: raw.include,
            exclude: raw.exclude,
            max_shrink_percent: (!raw.allow_shrink.unwrap_or(false)).then_some(shrink.min(100)),
            concurrency: concurrency.clamp(1, 64),
            pack_size,
        }),
    )
}

/// Packs are completed at this size unless the policy says otherwise.
const DEFAULT_PACK_SIZE: u64 = 16 << 20;

/// The least and the greatest `pack_size`.
const MIN_PACK_SIZE: u64 = 1 << 20;
const MAX_PACK_SIZE: u64 = 1 << 30;

/// Where the objects are read from: a directory or an S3 bucket and prefix.
fn from(path: &str, raw: &RawObjectsSource, p: &mut Problems) -> ObjectsFrom {
    if let Some(dir) = raw.from.strip_prefix("dir://") {
        if !dir.starts_with('/') {
            p.add(
                format!("{path}.from"),
                format!(
                    "`{}`: write an absolute path, dir:///data/uploads",
                    raw.from
                ),
            );
        }
        if raw.endpoint.is_some() || raw.region.is_some() || raw.addressing.is_some() {
            p.add(
                format!("{path}.endpoint"),
                "endpoint, region and addressing apply to s3:// sources only",
            );
        }
        ObjectsFrom::Dir(PathBuf::from(dir))
    } else if let Some(rest) = raw.from.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            p.add(
                format!("{path}.from"),
                "names no bucket: write s3://BUCKET/PREFIX/",
            );
        }
        let force_path_style = path_style(raw.addressing, raw.endpoint.is_some());
        ObjectsFrom::S3(S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: raw.endpoint.clone(),
            credentials_profile: None,
            region: raw.region.clone().unwrap_or_else(default_region),
            force_path_style,
            checksums: ChecksumMode::WhenRequired,
            storage_class: None,
            object_lock: None,
            server_side_encryption: None,
        })
    } else {
        p.add(
            format!("{path}.from"),
            format!(
                "`{}` is neither dir:///PATH nor s3://BUCKET/PREFIX/",
                raw.from
            ),
        );
        ObjectsFrom::Dir(PathBuf::new())
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::tests::{env, good, problems, RECIPIENT};
    use crate::policy::{parse, LoadOptions};
    use crate::source::SourceConfig;

    #[test]
    fn an_objects_source_needs_the_index_key_and_rejects_typos() {
        let src = "\n[[sources]]\nname = \"files\"\nkind = \"objects\"\nfrom = \"dir:///data/uploads\"\nexclude = [\"**/*.tmp\"]\n";
        let got = problems(&format!("{}{src}", good()));
        assert!(
            got.iter().any(
                |p| p.starts_with("sources[2].kind: objects sources need encryption.index_key")
            ),
            "{got:?}"
        );
        let with_key = good().replace(
            &format!("recipients = [\"{RECIPIENT}\"]"),
            &format!(
                "recipients = [\"{RECIPIENT}\"]\nindex_key = \"{}\"",
                "k".repeat(40)
            ),
        );
        let p = parse(
            &format!("{with_key}{src}"),
            "p.toml",
            &env,
            LoadOptions::default(),
        )
        .unwrap();
        let SourceConfig::Objects(o) = &p.sources[2].config else {
            panic!("the third source is objects")
        };
        assert!(
            matches!(&o.from, crate::source::objects::ObjectsFrom::Dir(d) if d == std::path::Path::new("/data/uploads"))
        );
        assert_eq!(o.max_shrink_percent, Some(50));
        let got = problems(&format!("{with_key}{}", src.replace("exclude", "exlude")));
        assert!(
            got[0].starts_with("sources[2].exlude: unknown field"),
            "{got:?}"
        );
        let got = problems(&format!(
            "{with_key}{}",
            src.replace("dir:///data/uploads", "ftp://x")
        ));
        assert!(
            got[0].starts_with("sources[2].from: `ftp://x` is neither"),
            "{got:?}"
        );
        let short = good().replace(
            &format!("recipients = [\"{RECIPIENT}\"]"),
            &format!("recipients = [\"{RECIPIENT}\"]\nindex_key = \"short\""),
        );
        let got = problems(&short);
        assert!(
            got[0].starts_with("encryption.index_key: must be at least 32"),
            "{got:?}"
        );
    }
}
