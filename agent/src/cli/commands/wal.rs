//! `lifeboat wal stream`: a physical source's WAL, streamed into the repository until stopped.

use std::path::Path;

use lifeboat::repo::Repository;
use lifeboat::source::postgres_physical::wal::Streamer;
use lifeboat::source::SourceConfig;
use lifeboat::{job, store, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::{load, select_source};

pub async fn stream(path: &Path, name: &str, cancel: CancellationToken) -> Result<()> {
    let policy = load(path)?;
    select_source(&policy, name)?;
    let source = policy
        .source(name)
        .ok_or_else(|| Error::new(ErrorKind::Invalid, format!("no source {name}")))?;
    let SourceConfig::PostgresPhysical(cfg) = &source.config else {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "source {name} is a {} source; WAL streams from postgres-physical sources",
                source.config.kind()
            ),
        ));
    };
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
