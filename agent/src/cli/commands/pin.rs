//! `lifeboat pin|unpin`: keep a backup whatever the retention rules say, or let them decide again.

use lifeboat::policy::Policy;

use lifeboat::repo::Repository;
use lifeboat::{Error, Result};

pub async fn pin(policy: Policy, source: &str, backup: &str, on: bool) -> Result<()> {
    let repo = Repository::open(&policy).await?;
    let entry = repo.find(source, backup, None).await?;
    let key = lifeboat::repo::layout::pin(source, &entry.manifest.id);
    if on {
        repo.store
            .put(&key, bytes::Bytes::from_static(b"{}"))
            .await
            .map_err(Error::from)?;
        eprintln!(
            "pinned {source} {}: prune keeps it until `lifeboat unpin`",
            entry.manifest.id
        );
    } else {
        repo.store.delete(&key).await.map_err(Error::from)?;
        eprintln!("unpinned {source} {}", entry.manifest.id);
    }
    Ok(())
}
