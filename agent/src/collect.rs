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
    /// Packs less than half named by the newest snapshots, to be stored again by the next
    /// backups.
    #[serde(skip_serializing_if = "is_zero")]
    pub sparse: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Keys to delete, in the order they were found: held in memory up to [`Keys::IN_MEMORY`], then
/// written one a line to an unlinked file on the temp disk, so that a collection of millions of
/// blobs holds no more than the few it is deleting.
#[derive(Debug, Default)]
pub struct Keys {
    held: Vec<String>,
    spilled: Option<std::io::BufWriter<std::fs::File>>,
    len: u64,
}

impl Keys {
    /// Keys held in memory before the rest go to the temp disk.
    const IN_MEMORY: usize = 4096;

    /// Adds `key` (one line: it holds no newline).
    pub fn push(&mut self, key: String) -> std::io::Result<()> {
        use std::io::Write;
        debug_assert!(!key.contains('\n'));
        self.len += 1;
        if let Some(w) = &mut self.spilled {
            return writeln!(w, "{key}");
        }
        self.held.push(key);
        if self.held.len() >= Self::IN_MEMORY {
            let mut w = std::io::BufWriter::with_capacity(64 << 10, tempfile::tempfile()?);
            for k in self.held.drain(..) {
                writeln!(w, "{k}")?;
            }
            self.spilled = Some(w);
        }
        Ok(())
    }

    /// How many keys.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The keys, in the order they were pushed.
    fn into_iter(
        self,
    ) -> std::io::Result<Box<dyn Iterator<Item = std::io::Result<String>> + Send>> {
        use std::io::{BufRead, Seek};
        match self.spilled {
            None => Ok(Box::new(self.held.into_iter().map(Ok))),
            Some(w) => {
                let mut file = w.into_inner().map_err(|e| e.into_error())?;
                file.rewind()?;
                Ok(Box::new(
                    std::io::BufReader::with_capacity(64 << 10, file).lines(),
                ))
            }
        }
    }
}

impl From<Vec<String>> for Keys {
    fn from(held: Vec<String>) -> Self {
        Keys {
            len: held.len() as u64,
            held,
            spilled: None,
        }
    }
}

/// A collection, planned: what would go, the keys to delete and the lease to hold meanwhile.
#[derive(Debug, Default)]
pub struct CollectionPlan {
    /// What the collection would do.
    pub summary: Collection,
    doomed: Keys,
    lease: String,
    /// A note for later runs, written when the plan is applied (not on a dry run); one
    /// with nothing to say is deleted instead.
    note: Option<(String, Option<bytes::Bytes>)>,
}

impl CollectionPlan {
    /// A plan to delete `doomed` under the lease `lease`.
    pub fn new(summary: Collection, doomed: impl Into<Keys>, lease: impl Into<String>) -> Self {
        Self {
            summary,
            doomed: doomed.into(),
            lease: lease.into(),
            note: None,
        }
    }

    /// The same plan, writing `data` at `key` when applied, or deleting `key` when `data` is
    /// `None`.
    pub fn with_note(mut self, key: String, data: Option<bytes::Bytes>) -> Self {
        self.note = Some((key, data));
        self
    }

    /// A plan that deletes nothing.
    pub fn nothing(summary: Collection) -> Self {
        Self::new(summary, Keys::default(), String::new())
    }

    /// Deletes what the plan found, under its lease checked before every deletion.
    pub async fn apply(self, repo: &Repository) -> Result<Collection> {
        let Self {
            summary,
            doomed,
            lease,
            note,
        } = self;
        match note {
            Some((key, Some(data))) => repo
                .store
                .put(&key, data)
                .await
                .map_err(|e| Error::from(e).context(format!("writing {key}")))?,
            Some((key, None)) => repo
                .store
                .delete(&key)
                .await
                .map_err(|e| Error::from(e).context(format!("deleting {key}")))?,
            None => {}
        }
        if doomed.is_empty() {
            return Ok(summary);
        }
        let what = format!("{} collection", summary.what);
        let mut lease = repo
            .lease(&lease, &what, std::time::Duration::from_secs(600))
            .await?;
        let result = async {
            let unread = |e: std::io::Error| {
                Error::failed(format!(
                    "reading the keys to delete from the temp disk: {e}"
                ))
            };
            for key in doomed.into_iter().map_err(unread)? {
                let key = key.map_err(unread)?;
                lease.check().await?;
                repo.store.delete(&key).await.map_err(Error::from)?;
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

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn keys_past_the_memory_limit_go_to_the_temp_disk_and_come_back_in_order() {
        for n in [
            0,
            3,
            Keys::IN_MEMORY - 1,
            Keys::IN_MEMORY,
            3 * Keys::IN_MEMORY + 7,
        ] {
            let mut keys = Keys::default();
            for i in 0..n {
                keys.push(format!("blobs/{i:064x}.age")).unwrap();
            }
            assert_eq!(keys.len(), n as u64);
            assert_eq!(keys.spilled.is_some(), n >= Keys::IN_MEMORY, "{n}");
            assert!(keys.held.len() < Keys::IN_MEMORY);
            let back: Vec<String> = keys.into_iter().unwrap().map(|k| k.unwrap()).collect();
            let want: Vec<String> = (0..n).map(|i| format!("blobs/{i:064x}.age")).collect();
            assert_eq!(back, want, "{n}");
        }
    }
}
