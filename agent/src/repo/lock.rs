//! Leases: `locks/<name>.json`, taken with a create-only write, so two processes can never both
//! hold one. A lease has an owner and an expiry; an expired lease may be taken over. Work under a
//! lease calls [`Lease::check`] before each destructive step and stops if the lease was lost.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Repository;
use crate::error::{Error, ErrorKind, Result};
use crate::store::StoreError;

/// What a lease object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDoc {
    /// Host and process that hold it.
    pub owner: String,
    /// What it is for.
    pub purpose: String,
    /// Random token that identifies this holder.
    pub token: String,
    /// When it was taken.
    pub acquired_at: DateTime<Utc>,
    /// When it lapses unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    repo: Repository,
    key: String,
    doc: LeaseDoc,
    ttl: Duration,
}

fn owner() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host} pid {}", std::process::id())
}

impl Repository {
    /// Takes the lease `name` for `ttl`; exit 11 when someone else holds it.
    pub async fn lease(&self, name: &str, purpose: &str, ttl: Duration) -> Result<Lease> {
        let key = super::layout::lock(name);
        for _ in 0..3 {
            let now = Utc::now();
            let doc = LeaseDoc {
                owner: owner(),
                purpose: purpose.to_string(),
                token: super::layout::random_suffix(16),
                acquired_at: now,
                expires_at: now + chrono::Duration::from_std(ttl).unwrap_or_default(),
            };
            let body = serde_json::to_vec_pretty(&doc)
                .map_err(|e| Error::failed(format!("encoding a lease: {e}")))?;
            if self
                .store
                .put_if_absent(&key, Bytes::from(body))
                .await
                .map_err(Error::from)?
            {
                return Ok(Lease {
                    repo: self.clone(),
                    key,
                    doc,
                    ttl,
                });
            }
            let held = self.read_lease(&key).await?;
            match held {
                Some(h) if h.expires_at > now => {
                    return Err(Error::new(
                        ErrorKind::LockHeld,
                        format!(
                            "{key} is held by {} for {} until {}",
                            h.owner,
                            h.purpose,
                            h.expires_at.format("%Y-%m-%d %H:%M:%S UTC")
                        ),
                    )
                    .hint("wait for it to finish; a lease of a crashed process lapses at its expiry (RUNBOOK.md#lock-held)"));
                }
                Some(h) => {
                    tracing::warn!(lease = %key, owner = %h.owner, "Taking over an expired lease");
                    self.store.delete(&key).await.map_err(Error::from)?;
                }
                None => {} // Released meanwhile: try again.
            }
        }
        Err(Error::new(
            ErrorKind::LockHeld,
            format!("{key}: could not take the lease (contended)"),
        ))
    }

    async fn read_lease(&self, key: &str) -> Result<Option<LeaseDoc>> {
        match self.store.get(key).await {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::from(e)),
        }
    }
}

impl Lease {
    /// Fails if the lease is no longer ours (taken over after expiry, or deleted); renews it when
    /// half its time is gone.
    pub async fn check(&mut self) -> Result<()> {
        let lost = |why: &str| {
            Error::new(
                ErrorKind::LockHeld,
                format!(
                    "lost the lease {}: {why}; stopping before the next delete",
                    self.key
                ),
            )
        };
        match self.repo.read_lease(&self.key).await? {
            Some(d) if d.token == self.doc.token => {}
            Some(d) => return Err(lost(&format!("now held by {}", d.owner))),
            None => return Err(lost("it was removed")),
        }
        let now = Utc::now();
        if now > self.doc.expires_at {
            return Err(lost("it expired"));
        }
        let half = chrono::Duration::from_std(self.ttl / 2).unwrap_or_default();
        if self.doc.expires_at - now < half {
            self.doc.expires_at = now + chrono::Duration::from_std(self.ttl).unwrap_or_default();
            let body = serde_json::to_vec_pretty(&self.doc)
                .map_err(|e| Error::failed(format!("encoding a lease: {e}")))?;
            self.repo
                .store
                .put(&self.key, Bytes::from(body))
                .await
                .map_err(Error::from)?;
        }
        Ok(())
    }

    /// Gives the lease up.
    pub async fn release(self) -> Result<()> {
        if let Some(d) = self.repo.read_lease(&self.key).await? {
            if d.token == self.doc.token {
                self.repo
                    .store
                    .delete(&self.key)
                    .await
                    .map_err(Error::from)?;
            }
        }
        Ok(())
    }
}
