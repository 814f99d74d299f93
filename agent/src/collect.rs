//! Collection: what prune deletes of the content a kind shares between backups (objects' blobs)
//! once no published backup needs it. A kind plans it ([`crate::source::SourceKind`]'s
//! `plan_shared_collection`); this module applies it, the same way for every kind.
//!
//! What must hold: a plan names only keys its kind decided no kept backup needs, and the
//! deletions run under the plan's lease, checked before each one, so two prunes never race.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::Repository;

/// What a collection did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Collection {
    /// What is collected, in the plural: `blobs`.
    pub what: &'static str,
    /// How kept backups refer to it, for the report: `named by snapshots`.
    pub referenced_as: &'static str,
    /// Items stored.
    pub stored: u64,
    /// Distinct items the kept backups need.
    pub referenced: u64,
    /// Items deleted (or, dry, to delete).
    pub deleted: u64,
    /// Their stored bytes.
    pub deleted_bytes: u64,
    /// Unreferenced items kept because they are younger than the grace period.
    pub young: u64,
    /// Needed by a backup but not stored: damage `lifeboat check` should look at.
    pub missing: u64,
    /// Why nothing was collected, when nothing was.
    pub skipped: Option<String>,
}

/// A collection, planned: what would go, the keys to delete and the lease to hold meanwhile.
#[derive(Debug, Clone, Default)]
pub struct CollectionPlan {
    /// What the collection would do.
    pub summary: Collection,
    doomed: Vec<String>,
    lease: String,
}

impl CollectionPlan {
    /// A plan to delete `doomed` under the lease `lease`.
    pub fn new(summary: Collection, doomed: Vec<String>, lease: impl Into<String>) -> Self {
        Self {
            summary,
            doomed,
            lease: lease.into(),
        }
    }

    /// A plan that deletes nothing.
    pub fn nothing(summary: Collection) -> Self {
        Self::new(summary, Vec::new(), String::new())
    }

    /// Deletes what the plan found, under its lease checked before every deletion.
    pub async fn apply(self, repo: &Repository) -> Result<Collection> {
        let Self {
            summary,
            doomed,
            lease,
        } = self;
        if doomed.is_empty() {
            return Ok(summary);
        }
        let what = format!("{} collection", summary.what);
        let mut lease = repo
            .lease(&lease, &what, std::time::Duration::from_secs(600))
            .await?;
        let result = async {
            for key in &doomed {
                lease.check().await?;
                repo.store.delete(key).await.map_err(Error::from)?;
            }
            Ok::<(), Error>(())
        }
        .await;
        let released = lease.release().await;
        result?;
        released?;
        tracing::info!(
            what = summary.what,
            deleted = summary.deleted,
            bytes = summary.deleted_bytes,
            "Collected unreferenced content"
        );
        Ok(summary)
    }
}
