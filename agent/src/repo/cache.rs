//! The catalog cache: the small objects a listing reads (manifests, their signatures, the
//! verification reports), kept per source in `state/<source>/catalog.json.zst`, so that listing
//! thousands of backups is a listing and a few reads, not one round trip per backup.
//!
//! What must hold:
//! - It is only ever a cache. The listing says which objects exist; a cached body is used only
//!   when its key is listed with the same size, ETag and modification time as when it was
//!   read, and is judged (signatures) exactly as a body read from the store. A manifest is still
//!   the one proof that a backup exists.
//! - A cache that is missing, damaged or of another format is ignored; one that cannot be
//!   written (a read-only role) is left as it was. Neither fails a command.
//! - It is rewritten only when a listing read something it did not hold, or it held what is no
//!   longer listed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{layout, signing};
use crate::store::{ObjectInfo, ObjectStore, StoreError};

/// Format of a cache object.
const FORMAT: u32 = 1;

/// A cache that would decompress to more than this is cut there, and so ignored (about
/// 100,000 backups).
const MAX_PLAIN: u64 = 256 << 20;

/// What a listing says of an object: a cached body is used only while it still says the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    etag: Option<String>,
    modified: Option<DateTime<Utc>>,
}

impl Stamp {
    /// `None` when the store gives neither an ETag nor a time: nothing would tell a rewrite.
    fn of(o: &ObjectInfo) -> Option<Stamp> {
        (o.etag.is_some() || o.modified.is_some()).then(|| Stamp {
            size: o.size,
            etag: o.etag.clone(),
            modified: o.modified,
        })
    }
}

#[derive(Debug, Deserialize)]
struct Cached {
    key: String,
    #[serde(flatten)]
    stamp: Stamp,
    body: String,
}

#[derive(Debug, Default, Deserialize)]
struct CacheFile {
    format: u32,
    objects: Vec<Cached>,
}

/// [`Cached`] as written, borrowing what the listing read.
#[derive(Serialize)]
struct CachedRef<'a> {
    key: &'a str,
    #[serde(flatten)]
    stamp: &'a Stamp,
    body: &'a str,
}

/// [`CacheFile`] as written.
#[derive(Serialize)]
struct CacheFileRef<'a> {
    format: u32,
    objects: Vec<CachedRef<'a>>,
}

/// The source a cacheable key belongs to: manifests and their signatures under `backups/`,
/// verification reports and theirs under `verifications/`.
fn source_of(key: &str) -> Option<&str> {
    let name = key.strip_suffix(signing::SIGNATURE_SUFFIX).unwrap_or(key);
    if let Some((source, _, object)) = layout::parse_backup_key(name) {
        return (object == layout::MANIFEST).then_some(source);
    }
    layout::parse_verification_key(name).map(|(source, _)| source)
}

/// The reads of one listing: what the caches of its sources hold, and what it read anew.
#[derive(Debug, Default)]
pub struct Reads {
    /// Cacheable keys as listed.
    listed: HashMap<String, Stamp>,
    /// Bodies the caches held, still listed the same.
    cached: HashMap<String, Bytes>,
    /// Sources whose cache held something no longer listed the same.
    stale: Mutex<Vec<String>>,
    /// Bodies read from the store in this listing.
    read: Mutex<HashMap<String, Bytes>>,
    /// Cached bodies used.
    used: Mutex<Vec<String>>,
}

impl Reads {
    /// The reads of a listing that found `objects`: each of their sources' caches loaded.
    pub async fn load(store: &dyn ObjectStore, listed: &[&[ObjectInfo]]) -> Reads {
        let mut reads = Reads::default();
        let mut sources: Vec<String> = Vec::new();
        for o in listed.iter().flat_map(|l| l.iter()) {
            let (Some(source), Some(stamp)) = (source_of(&o.key), Stamp::of(o)) else {
                continue;
            };
            if !sources.iter().any(|s| s == source) {
                sources.push(source.to_string());
            }
            reads.listed.insert(o.key.clone(), stamp);
        }
        let mut loaded = futures::stream::iter(sources)
            .map(|s| -> futures::future::BoxFuture<'_, _> {
                // Boxed: the daemon's spawned loops must be Send for every lifetime.
                Box::pin(async move {
                    let file = load_one(store, &s).await;
                    (s, file)
                })
            })
            .buffer_unordered(8);
        let mut stale = Vec::new();
        while let Some((source, file)) = loaded.next().await {
            let mut dropped = false;
            for c in file.objects {
                if reads.listed.get(&c.key) == Some(&c.stamp) {
                    reads.cached.insert(c.key, Bytes::from(c.body));
                } else {
                    dropped = true;
                }
            }
            if dropped {
                stale.push(source);
            }
        }
        reads.stale = Mutex::new(stale);
        reads
    }

    /// `key`'s body: from a cache when it is listed as it was cached, else from the store.
    pub async fn get(&self, store: &dyn ObjectStore, key: &str) -> Result<Bytes, StoreError> {
        if let Some(body) = self.cached.get(key) {
            if let Ok(mut used) = self.used.lock() {
                used.push(key.to_string());
            }
            return Ok(body.clone());
        }
        let body = store.get(key).await?;
        if self.listed.contains_key(key) {
            if let Ok(mut read) = self.read.lock() {
                read.insert(key.to_string(), body.clone());
            }
        }
        Ok(body)
    }

    /// Rewrites the cache of each source this listing read anew or found stale, holding what
    /// the listing used; best effort.
    pub async fn save(self, store: &dyn ObjectStore) {
        let read = self.read.into_inner().unwrap_or_default();
        let used = self.used.into_inner().unwrap_or_default();
        let mut changed: Vec<String> = self.stale.into_inner().unwrap_or_default();
        changed.extend(read.keys().filter_map(|k| source_of(k)).map(str::to_string));
        changed.sort();
        changed.dedup();
        if changed.is_empty() {
            return;
        }
        let mut by_source: BTreeMap<&str, Vec<CachedRef>> = BTreeMap::new();
        let bodies = read
            .iter()
            .chain(used.iter().filter_map(|k| Some((k, self.cached.get(k)?))));
        for (key, body) in bodies {
            let (Some(source), Some(stamp), Ok(body)) = (
                source_of(key),
                self.listed.get(key),
                std::str::from_utf8(body),
            ) else {
                continue;
            };
            if changed.iter().any(|c| c == source) {
                by_source
                    .entry(source)
                    .or_default()
                    .push(CachedRef { key, stamp, body });
            }
        }
        for source in &changed {
            let mut objects = by_source.remove(source.as_str()).unwrap_or_default();
            objects.sort_by(|a, b| a.key.cmp(b.key));
            let file = CacheFileRef {
                format: FORMAT,
                objects,
            };
            let key = layout::catalog_cache(source);
            // Compressed as it is encoded.
            let encoded = zstd::stream::write::Encoder::new(Vec::new(), 3).and_then(|mut z| {
                serde_json::to_writer(&mut z, &file)?;
                z.finish()
            });
            let Ok(z) = encoded else { continue };
            if let Err(e) = store.put(&key, Bytes::from(z)).await {
                tracing::debug!(key, error = %e, "Could not store the catalog cache (it is only a cache)");
            }
        }
    }
}

/// The cache of `source`; empty when there is none or it cannot be read.
async fn load_one(store: &dyn ObjectStore, source: &str) -> CacheFile {
    let key = layout::catalog_cache(source);
    let bytes = match store.get(&key).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => return CacheFile::default(),
        Err(e) => {
            tracing::debug!(key, error = %e, "Catalog cache unreadable: every manifest is read");
            return CacheFile::default();
        }
    };
    // Parsed as it is decompressed: its text is never held whole beside what it holds.
    let file = zstd::stream::read::Decoder::new(&bytes[..])
        .ok()
        .and_then(|d| {
            let plain = std::io::BufReader::new(std::io::Read::take(d, MAX_PLAIN));
            serde_json::from_reader::<_, CacheFile>(plain).ok()
        })
        .filter(|f| f.format == FORMAT);
    file.unwrap_or_else(|| {
        tracing::debug!(key, "Catalog cache damaged or of another format: ignored");
        CacheFile::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::counted::{Counted, Requests};
    use crate::store::fs::FsStore;
    use std::sync::Arc;

    const M1: &str = "backups/db/20261201T000000Z-aaaaaa/manifest.json";
    const S1: &str = "backups/db/20261201T000000Z-aaaaaa/manifest.json.minisig";
    const DATA: &str = "backups/db/20261201T000000Z-aaaaaa/dump.zst.age";
    const M2: &str = "backups/db/20261202T000000Z-bbbbbb/manifest.json";
    const V1: &str = "verifications/db/20261201T000000Z-aaaaaa/20261201T010000Z-cccccc.json";

    /// One listing's reads of every cacheable key, and how many GETs it made.
    async fn list_and_read(store: &Arc<dyn ObjectStore>) -> (Vec<Bytes>, u64) {
        let requests = Arc::new(Requests::default());
        let counted = Counted::new(store.clone(), requests.clone());
        let backups = counted.list("backups/").await.unwrap();
        let reports = counted.list("verifications/").await.unwrap();
        let reads = Reads::load(&counted, &[&backups, &reports]).await;
        let mut bodies = Vec::new();
        for k in [M1, S1, M2, V1] {
            bodies.push(reads.get(&counted, k).await.unwrap());
        }
        let gets = requests.counts().get;
        reads.save(&counted).await;
        (bodies, gets)
    }

    #[tokio::test]
    async fn a_listing_reads_what_the_cache_holds_only_while_the_listing_says_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(FsStore::new(dir.path().to_path_buf()));
        for (k, v) in [
            (M1, "m1"),
            (S1, "s1"),
            (DATA, "data"),
            (M2, "m2"),
            (V1, "v1"),
        ] {
            store.put(k, Bytes::from(v)).await.unwrap();
        }
        // No cache yet: one GET for it, then one per object.
        let (bodies, gets) = list_and_read(&store).await;
        assert_eq!(bodies, ["m1", "s1", "m2", "v1"]);
        assert_eq!(gets, 1 + 4);
        assert!(store
            .size(&layout::catalog_cache("db"))
            .await
            .unwrap()
            .is_some());
        assert!(store
            .size(&layout::catalog_cache("other"))
            .await
            .unwrap()
            .is_none());

        // Now every body comes from the cache: the one GET is the cache's own.
        let (bodies, gets) = list_and_read(&store).await;
        assert_eq!(bodies, ["m1", "s1", "m2", "v1"]);
        assert_eq!(gets, 1);

        // A rewritten object is listed differently: read again, and cached anew.
        std::thread::sleep(std::time::Duration::from_millis(20));
        store.put(M2, Bytes::from("m2, rewritten")).await.unwrap();
        let (bodies, gets) = list_and_read(&store).await;
        assert_eq!(bodies[2], "m2, rewritten");
        assert_eq!(gets, 1 + 1);
        let (bodies, gets) = list_and_read(&store).await;
        assert_eq!(bodies[2], "m2, rewritten");
        assert_eq!(gets, 1);

        // A damaged cache is ignored, and replaced.
        store
            .put(&layout::catalog_cache("db"), Bytes::from("not zstd"))
            .await
            .unwrap();
        let (bodies, gets) = list_and_read(&store).await;
        assert_eq!(bodies, ["m1", "s1", "m2, rewritten", "v1"]);
        assert_eq!(gets, 1 + 4);
        assert_eq!(list_and_read(&store).await.1, 1);

        // What a cache holds of a backup no longer listed is never offered.
        store.delete(M1).await.unwrap();
        let backups = store.list("backups/").await.unwrap();
        let reads = Reads::load(store.as_ref(), &[&backups]).await;
        assert!(!reads.cached.contains_key(M1));
        assert!(reads.cached.contains_key(M2));
    }
}
