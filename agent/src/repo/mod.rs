//! The repository: the store plus the format rules of DESIGN.md ("Repository format").
//!
//! [`Repository::open`] refuses a location without the `lifeboat.json` marker (exit 10), so an
//! operator who mistyped a bucket is told so instead of being shown an empty list;
//! [`Repository::open_or_init`] writes the marker on a backup's first run.

pub mod catalog;
pub mod layout;
pub mod lock;
pub mod manifest;

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::policy::Policy;
use crate::store::{self, ObjectStore, StoreError};

/// The repository marker's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    /// Format version.
    pub format: u32,
    /// When the repository was created.
    pub created: chrono::DateTime<chrono::Utc>,
    /// The lifeboat version that created it.
    pub created_by: String,
}

/// An opened repository.
#[derive(Debug, Clone)]
pub struct Repository {
    /// The store, with retries.
    pub store: Arc<dyn ObjectStore>,
}

/// `lifeboat <version>`.
pub fn tool_version() -> String {
    format!("lifeboat {}", env!("CARGO_PKG_VERSION"))
}

impl Repository {
    /// Opens an existing repository; exit 10 if there is none.
    pub async fn open(policy: &Policy) -> Result<Self> {
        let store = store::open(&policy.repository).await?;
        let repo = Repository { store };
        repo.read_marker().await?.ok_or_else(|| {
            Error::new(
                ErrorKind::RepositoryMissing,
                format!("no lifeboat repository at {}", repo.store.describe()),
            )
            .hint("check repository.url (and endpoint); a repository is created by the first `lifeboat backup` (RUNBOOK.md#repository-missing)")
        })?;
        Ok(repo)
    }

    /// Opens the repository, creating its marker if the location is empty.
    pub async fn open_or_init(policy: &Policy) -> Result<Self> {
        let store = store::open(&policy.repository).await?;
        let repo = Repository { store };
        if repo.read_marker().await?.is_none() {
            let marker = Marker {
                format: layout::FORMAT_VERSION,
                created: chrono::Utc::now(),
                created_by: tool_version(),
            };
            let body = serde_json::to_vec_pretty(&marker)
                .map_err(|e| Error::failed(format!("cannot encode the repository marker: {e}")))?;
            repo.store
                .put(layout::MARKER, Bytes::from(body))
                .await
                .map_err(|e| Error::from(e).context("creating the repository marker"))?;
            tracing::info!(repository = %repo.store.describe(), "Created repository");
        }
        Ok(repo)
    }

    async fn read_marker(&self) -> Result<Option<Marker>> {
        match self.store.get(layout::MARKER).await {
            Ok(bytes) => {
                let m: Marker = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::new(
                        ErrorKind::Integrity,
                        format!(
                            "{} at {} is not a lifeboat marker: {e}",
                            layout::MARKER,
                            self.store.describe()
                        ),
                    )
                })?;
                if m.format > layout::FORMAT_VERSION {
                    return Err(Error::failed(format!(
                        "the repository at {} has format {}, newer than this lifeboat understands ({})",
                        self.store.describe(),
                        m.format,
                        layout::FORMAT_VERSION
                    ))
                    .hint("upgrade lifeboat"));
                }
                Ok(Some(m))
            }
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::from(e).context(format!(
                "reading {} at {}",
                layout::MARKER,
                self.store.describe()
            ))),
        }
    }
}
