//! `lifeboat wal stream`: a physical source's WAL, streamed into the repository until stopped;
//! `lifeboat wal fetch`: one WAL file back out of it, for PostgreSQL's `restore_command`.

use std::path::Path;

use lifeboat::policy::{Policy, SourcePolicy};
use lifeboat::repo::Repository;
use lifeboat::source::postgres_physical::wal::Streamer;
use lifeboat::source::postgres_physical::{fetch, PhysicalConfig};
use lifeboat::source::SourceConfig;
use lifeboat::{job, store, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::super::WalArchive;
use super::{identity_file, load, load_at, select_source};

/// The physical source `name` of `policy`.
fn physical<'a>(policy: &'a Policy, name: &str) -> Result<(&'a SourcePolicy, &'a PhysicalConfig)> {
    select_source(policy, name)?;
    let source = policy
        .source(name)
        .ok_or_else(|| Error::new(ErrorKind::Invalid, format!("no source {name}")))?;
    match &source.config {
        SourceConfig::PostgresPhysical(cfg) => Ok((source, cfg)),
        other => Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "source {name} is a {} source; WAL belongs to postgres-physical sources",
                other.kind()
            ),
        )),
    }
}

pub async fn stream(path: &Path, name: &str, cancel: CancellationToken) -> Result<()> {
    let policy = load(path)?;
    let (source, cfg) = physical(&policy, name)?;
    let Some(wal) = cfg.wal.clone() else {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("source {name} has no `wal` settings"),
        )
        .hint("add wal = { slot = \"lifeboat\", flush_interval = \"30s\" } to the source"));
    };
    let repo = Repository::open_or_init(&policy).await?;
    store::probe(repo.store.as_ref()).await?;
    let pipeline = job::pipeline_config(&policy, source)?;
    let streamer = Streamer::new(repo, name, cfg.clone(), wal, pipeline);
    streamer.run(cancel).await
}

/// What `wal fetch` is asked for.
pub struct Fetch<'a> {
    /// The WAL file's name (%f).
    pub file: &'a str,
    /// Where it goes (%p).
    pub dest: &'a Path,
    /// The cluster's segment size, when the caller knows it.
    pub segment_size: Option<u64>,
    /// The cluster's system identifier, when the caller knows it.
    pub system_id: Option<u64>,
    /// Whole segments to fetch ahead in the background (0: none).
    pub prefetch: u32,
}

/// What a background prefetcher is asked for.
pub struct Ahead<'a> {
    /// The segment recovery took last.
    pub after: &'a str,
    /// How many after it.
    pub count: u32,
    /// The cluster they are of.
    pub cluster: fetch::Cluster,
}

/// `wal prefetch`: fetches ahead of recovery into [`fetch::PREFETCH_DIR`] (see `wal fetch
/// --prefetch`). Its failures only mean `wal fetch` fetches those segments itself.
pub async fn prefetch(archive: &WalArchive, ahead: Ahead<'_>) -> Result<()> {
    let name = archive.source.as_str();
    let identity = archive.identity.as_deref();
    let policy = load_at(&archive.policy, &archive.at)?;
    physical(&policy, name)?;
    let identities = lifeboat::pipeline::read_identities(&identity_file(identity, &policy)?)?;
    let repo = Repository::open(&policy).await?;
    let spool = Path::new(fetch::PREFETCH_DIR);
    let n = fetch::prefetch(
        &repo,
        name,
        ahead.after,
        ahead.count,
        spool,
        ahead.cluster,
        &identities,
    )
    .await?;
    tracing::debug!(after = ahead.after, fetched = n, "Prefetched");
    Ok(())
}

pub async fn fetch(archive: &WalArchive, at: Fetch<'_>) -> Result<()> {
    let name = archive.source.as_str();
    let identity = archive.identity.as_deref();
    let Fetch {
        file,
        dest,
        segment_size,
        system_id,
        prefetch,
    } = at;
    let segment_size = segment_size.map(checked_segment_size).transpose()?;
    let spool = Path::new(fetch::PREFETCH_DIR);
    // Recovery runs this once per segment: a segment already fetched ahead (and checked) is
    // taken without reading the policy or the key or opening the repository, which would cost
    // more than replaying it.
    if let (true, Some(segment_size)) = (prefetch > 0, segment_size) {
        if fetch::take_prefetched(spool, file, dest).await {
            tracing::info!(file, "Fetched from the WAL archive (prefetched, checked)");
            let cluster = fetch::Cluster {
                segment_size,
                system_id,
            };
            keep_ahead(archive, file, prefetch, cluster);
            return Ok(());
        }
    }
    let policy = load_at(&archive.policy, &archive.at)?;
    physical(&policy, name)?;
    let identities = lifeboat::pipeline::read_identities(&identity_file(identity, &policy)?)?;
    let repo = Repository::open(&policy).await?;
    // Else the cluster's segment size and system identifier from its base backups (16 MiB
    // unless initdb chose another).
    let cluster = match segment_size {
        Some(segment_size) => fetch::Cluster {
            segment_size,
            system_id,
        },
        None => repo
            .list(Some(name))
            .await?
            .backups
            .iter()
            .find_map(|e| e.manifest.base_backup.as_ref().map(fetch::Cluster::of))
            .map(|c| fetch::Cluster {
                system_id: system_id.or(c.system_id),
                ..c
            })
            .unwrap_or(fetch::Cluster {
                segment_size: 16 << 20,
                system_id,
            }),
    };
    // (Taken above when the segment size was given.)
    let spooled = prefetch > 0 && segment_size.is_none();
    if spooled && fetch::take_prefetched(spool, file, dest).await {
        tracing::info!(file, "Fetched from the WAL archive (prefetched, checked)");
    } else {
        let got = fetch::fetch(&repo, name, file, dest, cluster, &identities).await?;
        tracing::info!(file, key = %got.key, bytes = got.bytes, archived = got.archived, "Fetched from the WAL archive");
    }
    if prefetch > 0 {
        keep_ahead(archive, file, prefetch, cluster);
    }
    Ok(())
}

fn checked_segment_size(size: u64) -> Result<u64> {
    if size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size) {
        return Ok(size);
    }
    Err(Error::new(
        ErrorKind::Invalid,
        format!("--segment-size {size}: a WAL segment size is a power of two from 1 MiB to 1 GiB"),
    ))
}

/// Starts `wal prefetch` for the segments after `file`, detached, unless one is at work:
/// recovery goes on while it fetches. Not starting is no failure (each segment is then fetched
/// when asked for).
fn keep_ahead(archive: &WalArchive, file: &str, count: u32, cluster: fetch::Cluster) {
    let spool = Path::new(fetch::PREFETCH_DIR);
    if fetch::next_segment(file, cluster.segment_size).is_none() || fetch::prefetcher_running(spool)
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    // What it says (why a segment could not be fetched ahead) is kept beside what it fetches;
    // `wal fetch` then fetches that segment itself and reports its own failure to recovery.
    let said = std::fs::create_dir_all(spool).and_then(|_| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spool.join(fetch::PREFETCH_LOG))
    });
    let mut command = std::process::Command::new(exe);
    command
        .args(["wal", "prefetch", "--policy"])
        .arg(&archive.policy)
        .args(["--source", &archive.source, "--after", file])
        .args(["--count", &count.to_string()])
        .args(["--segment-size", &cluster.segment_size.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(said.map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from));
    if let Some(identity) = &archive.identity {
        command.arg("--identity").arg(identity);
    }
    if let Some(copy) = &archive.at.copy {
        command.args(["--repository", copy]);
    }
    if let Some(id) = cluster.system_id {
        command.args(["--system-id", &id.to_string()]);
    }
    match command.spawn() {
        Ok(child) => {
            let _ = fetch::claim_prefetch(spool, child.id());
        }
        Err(e) => {
            tracing::warn!(error = %e, "Could not start fetching ahead; each segment is fetched when asked for")
        }
    }
}
