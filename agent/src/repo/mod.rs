//! The repository: the store plus the format rules of DESIGN.md ("Repository format").
//!
//! [`Repository::open`] refuses a location without the `lifeboat.json` marker (exit 10), so an
//! operator who mistyped a bucket is told so instead of being shown an empty list;
//! [`Repository::open_or_init`] writes the marker on a backup's first run.

pub mod cache;
pub mod catalog;
pub mod layout;
pub mod lock;
pub mod manifest;
pub mod origin;
pub mod signing;

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::policy::Policy;
use crate::store::{self, ObjectStore, StoreError};
use signing::{Seal, Signer, Trust};

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
    /// Whose signatures its readers accept (the policy's `[signing]`).
    pub trust: Arc<Trust>,
    /// While listing: the catalog cache, and what the listing reads.
    reads: Option<Arc<cache::Reads>>,
}

/// Why [`Repository::read_signed`] failed: the store (e.g. not found), or the judgement.
#[derive(Debug)]
pub enum ReadSignedError {
    /// Reading the object failed.
    Store(StoreError),
    /// Not trusted, or its signature could not be read.
    Judged(Error),
}

impl From<Error> for ReadSignedError {
    fn from(e: Error) -> Self {
        ReadSignedError::Judged(e)
    }
}

impl From<ReadSignedError> for Error {
    fn from(e: ReadSignedError) -> Self {
        match e {
            ReadSignedError::Store(e) => e.into(),
            ReadSignedError::Judged(e) => e,
        }
    }
}

/// `lifeboat <version>`.
pub fn tool_version() -> String {
    format!("lifeboat {}", env!("CARGO_PKG_VERSION"))
}

impl Repository {
    /// The same repository, with its requests counted into the returned counter (what a
    /// command made of it goes into its `--json` report).
    pub fn counted(&self) -> (Repository, Arc<crate::store::counted::Requests>) {
        let requests = Arc::new(crate::store::counted::Requests::default());
        let store = crate::store::counted::Counted::new(self.store.clone(), requests.clone());
        let repo = Repository {
            store: Arc::new(store),
            trust: self.trust.clone(),
            reads: None,
        };
        (repo, requests)
    }

    /// Opens an existing repository; exit 10 if there is none.
    pub async fn open(policy: &Policy) -> Result<Self> {
        let store = store::open(&policy.repository).await?;
        let repo = Repository {
            store,
            trust: Arc::new(Trust::new(policy.signing.as_ref())),
            reads: None,
        };
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
        let repo = Repository {
            store,
            trust: Arc::new(Trust::new(policy.signing.as_ref())),
            reads: None,
        };
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

    /// The same repository, offering what no trusted key signed, marked (`--allow-unsigned`).
    pub fn allowing_unsigned(mut self) -> Self {
        let mut trust = (*self.trust).clone();
        trust.allow_unsigned = true;
        self.trust = Arc::new(trust);
        self
    }

    /// Stores `body` at `key`, its signature first when `signer` is given: once the object is
    /// visible, so is what vouches for it.
    pub async fn publish(&self, key: &str, body: Bytes, signer: Option<&Signer>) -> Result<()> {
        self.vouch(key, &body, signer).await?;
        self.store
            .put(key, body)
            .await
            .map_err(|e| Error::from(e).context(format!("storing {key}")))
    }

    /// Stores the signature of `signed` (the object's bytes, or what stands for them) for the
    /// object at `key`, before the object itself; nothing without a `signer`.
    pub async fn vouch(&self, key: &str, signed: &[u8], signer: Option<&Signer>) -> Result<()> {
        let Some(signer) = signer else {
            return Ok(());
        };
        let sig = signer.sign(key, signed)?;
        let sig_key = signing::signature_key(key);
        self.store
            .put(&sig_key, sig)
            .await
            .map_err(|e| Error::from(e).context(format!("storing {sig_key}")))
    }

    /// Reads `key` and judges who published it (see [`Trust::judge`]). `stored` is when the
    /// repository stored it, when a listing already said; otherwise it is asked only if needed.
    pub async fn read_signed(
        &self,
        key: &str,
        stored: Option<chrono::DateTime<chrono::Utc>>,
    ) -> std::result::Result<(Bytes, Seal), ReadSignedError> {
        let body = self.get(key).await.map_err(ReadSignedError::Store)?;
        let seal = self.judge(key, &body, stored).await?;
        Ok((body, seal))
    }

    /// The same repository, reading through `reads` (a listing's catalog cache).
    pub(crate) fn reading_through(&self, reads: Arc<cache::Reads>) -> Repository {
        Repository {
            reads: Some(reads),
            ..self.clone()
        }
    }

    /// `key`'s body, from the listing's catalog cache when it holds it.
    async fn get(&self, key: &str) -> std::result::Result<Bytes, StoreError> {
        match &self.reads {
            Some(reads) => reads.get(self.store.as_ref(), key).await,
            None => self.store.get(key).await,
        }
    }

    /// Judges `body`, read from `key`, by its signature object.
    pub async fn judge(
        &self,
        key: &str,
        body: &[u8],
        stored: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Seal> {
        if !self.trust.enabled() {
            return Ok(Seal::Unchecked);
        }
        let sig_key = signing::signature_key(key);
        let sig = match self.get(&sig_key).await {
            Ok(b) => Some(b),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(Error::from(e).context(format!("reading {sig_key}"))),
        };
        let stored = match (&sig, stored) {
            (None, None) => self
                .store
                .list(key)
                .await
                .map_err(|e| Error::from(e).context(format!("listing {key}")))?
                .into_iter()
                .find(|o| o.key == key)
                .and_then(|o| o.modified),
            (_, s) => s,
        };
        self.trust.judge(key, body, sig.as_deref(), stored)
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
