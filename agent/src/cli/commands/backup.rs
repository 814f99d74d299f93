//! `lifeboat backup`: one backup now of every source, or of those named.

use std::path::Path;

use lifeboat::human_bytes;
use lifeboat::repo::Repository;
use lifeboat::{job, store, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::{load, select_source};

pub async fn backup(path: &Path, only: &[String], cancel: CancellationToken) -> Result<()> {
    let policy = load(path)?;
    for name in only {
        select_source(&policy, name)?;
    }
    let repo = Repository::open_or_init(&policy).await?;
    store::probe(repo.store.as_ref()).await?;
    let selected: Vec<_> = policy
        .sources
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect();
    let mut failures: Vec<Error> = Vec::new();
    for source in &selected {
        if cancel.is_cancelled() {
            failures.push(Error::new(
                ErrorKind::Interrupted,
                format!("source {}: not started", source.name),
            ));
            continue;
        }
        match job::backup(&repo, &policy, source, chrono::Utc::now(), cancel.clone()).await {
            Ok(m) => eprintln!(
                "{}: backup {} stored ({} plain, {} stored)",
                m.source,
                m.id,
                human_bytes(m.size_plain),
                human_bytes(m.size_stored)
            ),
            Err(e) => {
                if selected.len() > 1 {
                    eprintln!("error: {e}");
                }
                failures.push(e);
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 if selected.len() == 1 => Err(failures.remove(0)),
        n if n == selected.len() => {
            let kind = if failures.iter().any(|e| e.kind == ErrorKind::Interrupted) {
                ErrorKind::Interrupted
            } else {
                ErrorKind::Failed
            };
            Err(Error::new(kind, format!("all {n} backups failed")))
        }
        n => Err(Error::new(
            ErrorKind::Partial,
            format!("{n} of {} backups failed", selected.len()),
        )),
    }
}
