//! Redis Cluster sources: every shard captured in one backup, with the slot map.
//!
//! What must hold:
//! - The shards and their slots come from the cluster itself (`CLUSTER SHARDS`, or `CLUSTER
//!   SLOTS` before Redis 7), asked of the url's nodes in turn; a cluster whose slots are not all
//!   served is not captured.
//! - Shards are captured concurrently, at most [`SHARDS_AT_ONCE`] at a time, so memory stays
//!   bounded whatever the number of shards. Each is an ordinary capture of one server (the
//!   replication stream, or a scan), checked as it passes.
//! - The manifest is published only if every shard succeeded. A shard whose node stopped
//!   answering is captured once more if the cluster failed over to another node in the meantime;
//!   otherwise the first failure cancels the others and nothing is published.
//! - The slot map is read again after the capture: slots that moved between shards meanwhile (a
//!   resharding) would leave keys out or in twice, so nothing is published then either.
//! - Redis Cluster has no cross-shard snapshot: each shard's snapshot is of the moment its own
//!   capture started (ARCHITECTURE.md, "Redis Cluster").

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use super::rdb::RdbSummary;
use super::{scan, Fingerprint, Redis, Reply, CONNECT_TIMEOUT};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::layout;
use crate::repo::manifest::Part;
use crate::repo::origin::Origin;
use crate::source::{BackupContext, SourceBackup};

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// Shards captured at the same time.
pub const SHARDS_AT_ONCE: usize = 3;
/// How long a shard whose node stopped answering waits for the cluster to fail over.
const FAILOVER_WAIT: Duration = Duration::from_secs(30);

const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// The hash slot of `key`: CRC16 of the key, or of its `{hash tag}`, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let len = rest.iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &rest[..len])
        })
        .unwrap_or(key);
    CRC16.checksum(hashed) % SLOTS
}

/// One node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its node id.
    pub id: String,
    /// Address.
    pub host: String,
    /// Port (the TLS port of a TLS cluster).
    pub port: u16,
    /// Not failed, as the node asked sees it.
    pub online: bool,
}

/// One shard: its slots, its primary and replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Slot ranges, inclusive, in order.
    pub slots: Vec<(u16, u16)>,
    /// The primary.
    pub primary: Node,
    /// Its replicas.
    pub replicas: Vec<Node>,
}

/// A cluster's shards, in slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Shards owning slots, ordered by their first slot.
    pub shards: Vec<Shard>,
}

/// Fields of a RESP2 map (a flat array of names and values).
fn fields(r: &Reply) -> Vec<(String, &Reply)> {
    match r {
        Reply::Array(Some(items)) => items
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.text()?, kv.get(1)?)))
            .collect(),
        _ => Vec::new(),
    }
}

fn items(r: &Reply) -> &[Reply] {
    match r {
        Reply::Array(Some(items)) => items,
        _ => &[],
    }
}

fn int(r: &Reply) -> Option<i64> {
    r.text()?.parse().ok()
}

impl Topology {
    /// From a `CLUSTER SHARDS` reply; `tls`: nodes are reached on their `tls-port`.
    pub fn from_shards(reply: &Reply, tls: bool) -> std::result::Result<Topology, String> {
        let mut shards = Vec::new();
        for shard in items(reply) {
            let f = fields(shard);
            let get = |name: &str| f.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            let bounds: Vec<u16> = get("slots")
                .map(items)
                .unwrap_or_default()
                .iter()
                .filter_map(|r| int(r).and_then(|v| u16::try_from(v).ok()))
                .collect();
            let slots: Vec<(u16, u16)> = bounds.chunks(2).map(|c| (c[0], c[c.len() - 1])).collect();
            if slots.is_empty() {
                continue; // a node without slots (being added, or emptied)
            }
            let mut primaries = Vec::new();
            let mut replicas = Vec::new();
            for node in get("nodes").map(items).unwrap_or_default() {
                let nf = fields(node);
                let text = |name: &str| {
                    nf.iter()
                        .find(|(k, _)| k == name)
                        .and_then(|(_, v)| v.text())
                };
                let port = if tls { text("tls-port") } else { None }
                    .or_else(|| text("port"))
                    .and_then(|p| p.parse().ok())
                    .ok_or("a node without a port")?;
                let host = text("ip")
                    .filter(|h| !h.is_empty() && h != "?")
                    .or_else(|| text("endpoint"))
                    .ok_or("a node without an address")?;
                let n = Node {
                    id: text("id").unwrap_or_default(),
                    host,
                    port,
                    // `loading` is also what Redis 7.0 says of a replica it has no offset for yet.
                    online: text("health").as_deref() != Some("failed"),
                };
                if text("role").as_deref() == Some("master") {
                    primaries.push(n);
                } else {
                    replicas.push(n);
                }
            }
            // A failed primary that was replaced is listed too until it is forgotten.
            primaries.sort_by_key(|n| !n.online);
            let mut primaries = primaries.into_iter();
            let primary = primaries.next().ok_or("a shard without a primary")?;
            replicas.extend(primaries);
            shards.push(Shard {
                slots,
                primary,
                replicas,
            });
        }
        Ok(Topology::ordered(shards))
    }

    /// From a `CLUSTER SLOTS` reply (servers before Redis 7).
    pub fn from_slots(reply: &Reply) -> std::result::Result<Topology, String> {
        let mut shards: Vec<Shard> = Vec::new();
        for range in items(reply) {
            let r = items(range);
            let (Some(start), Some(end)) = (r.first().and_then(int), r.get(1).and_then(int)) else {
                return Err("a slot range without bounds".into());
            };
            let node = |n: &Reply| -> Option<Node> {
                let n = items(n);
                Some(Node {
                    host: n.first()?.text()?,
                    port: int(n.get(1)?)?.try_into().ok()?,
                    id: n.get(2).and_then(Reply::text).unwrap_or_default(),
                    online: true,
                })
            };
            let mut nodes = r[2..].iter().filter_map(node);
            let primary = nodes.next().ok_or("a slot range without a primary")?;
            let range = (start as u16, end as u16);
            match shards.iter_mut().find(|s| s.primary.id == primary.id) {
                Some(s) => s.slots.push(range),
                None => shards.push(Shard {
                    slots: vec![range],
                    primary,
                    replicas: nodes.collect(),
                }),
            }
        }
        Ok(Topology::ordered(shards))
    }

    fn ordered(mut shards: Vec<Shard>) -> Topology {
        for s in &mut shards {
            s.slots.sort_unstable();
        }
        shards.sort_by_key(|s| s.slots.first().copied());
        Topology { shards }
    }

    /// The slot ranges of each shard, in order: what a resharding changes and a failover keeps.
    pub fn slot_map(&self) -> Vec<Vec<(u16, u16)>> {
        self.shards.iter().map(|s| s.slots.clone()).collect()
    }
}

/// What is wrong with a slot map, if anything: slots no shard owns, or that two shards claim.
pub fn slot_map_problem<'a>(
    shards: impl IntoIterator<Item = (&'a str, &'a [(u16, u16)])>,
) -> Option<String> {
    let mut owner: Vec<Option<&str>> = vec![None; usize::from(SLOTS)];
    for (name, ranges) in shards {
        for &(a, b) in ranges {
            if a > b || b >= SLOTS {
                return Some(format!("{name} owns the slots {a}-{b}, which do not exist"));
            }
            for slot in a..=b {
                if let Some(other) = owner[usize::from(slot)].replace(name) {
                    return Some(format!("slot {slot} is owned by both {other} and {name}"));
                }
            }
        }
    }
    let free: Vec<usize> = (0..owner.len()).filter(|&s| owner[s].is_none()).collect();
    match (free.first(), free.last()) {
        (Some(first), Some(last)) => Some(format!(
            "{} of the {SLOTS} slots are served by no shard (from slot {first} to {last})",
            free.len()
        )),
        _ => None,
    }
}

/// What a cluster backup records of each shard (in the fingerprint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// `shard-0`, `shard-1`…, in slot order.
    pub name: String,
    /// The snapshot's object name in the backup.
    pub object: String,
    /// Slot ranges it owned, inclusive.
    pub slots: Vec<(u16, u16)>,
    /// The node captured (`HOST:PORT`), its id, and whether it was the primary or a replica.
    pub node: String,
    /// Its node id.
    pub node_id: String,
    /// `primary` or `replica`.
    pub role: String,
    /// Captured a second time, from another node, after a failover.
    #[serde(default)]
    pub retried: bool,
    /// The snapshot's CRC64, hex.
    pub crc64: Option<String>,
    /// The node's Redis version.
    pub server_version: Option<String>,
    /// `scan`: keys stored and keys that vanished during the walk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<scan::ScanOutcome>,
    /// What the snapshot holds.
    pub rdb: RdbSummary,
}

impl Redis {
    /// Asks the url's nodes in turn for the cluster's shards.
    pub(crate) async fn discover(&self) -> Result<Topology> {
        let seeds = self.cfg.endpoint.cluster.clone().unwrap_or_default();
        let tls = self.cfg.endpoint.tls;
        let mut why = Vec::new();
        let mut kind = ErrorKind::Failed;
        for (host, port) in &seeds {
            let where_ = format!("cluster node {host}:{port}");
            let asked = async {
                let mut s = self.connect_node(host, *port, where_.clone()).await?;
                let shape = match s.call(&[b"CLUSTER", b"SHARDS"]).await {
                    Ok(r) => Topology::from_shards(&r, tls),
                    Err(e) if e.message.to_lowercase().contains("unknown subcommand") => {
                        Topology::from_slots(&s.call(&[b"CLUSTER", b"SLOTS"]).await?)
                    }
                    Err(e) => return Err(e),
                };
                shape.map_err(|m| Error::failed(format!("its slot map is unreadable: {m}")))
            };
            match tokio::time::timeout(CONNECT_TIMEOUT * 2, asked).await {
                Ok(Ok(t)) => {
                    let named: Vec<(String, Vec<(u16, u16)>)> = t
                        .shards
                        .iter()
                        .map(|s| {
                            (
                                format!("{}:{}", s.primary.host, s.primary.port),
                                s.slots.clone(),
                            )
                        })
                        .collect();
                    return match slot_map_problem(named.iter().map(|(n, s)| (n.as_str(), s.as_slice()))) {
                        None => Ok(t),
                        Some(p) => Err(Error::failed(format!("{}: the cluster is not whole: {p}", self.where_()))
                            .hint("nothing was captured; check CLUSTER INFO (cluster_state) and finish any resharding or failover (RUNBOOK.md#backup-failing)")),
                    };
                }
                Ok(Err(e)) => {
                    kind = e.kind;
                    why.push(e.message);
                }
                Err(_) => why.push(format!("{where_}: no answer")),
            }
        }
        Err(Error::new(
            kind,
            format!(
                "{}: no node described the cluster: {}",
                self.where_(),
                why.join("; ")
            ),
        )
        .hint("check the url's nodes, and that they run with cluster-enabled yes (RUNBOOK.md#source-unreachable)"))
    }

    /// The session to capture `shard` on: with `prefer_replica`, the first replica whose link
    /// to its primary is up (one still syncing holds old data); else the primary.
    async fn open_shard(&self, name: &str, shard: &Shard) -> Result<Opened> {
        let at = |role: &str, n: &Node| {
            format!("{} ({name}, {role} {}:{})", self.where_(), n.host, n.port)
        };
        if self.cfg.prefer_replica {
            for r in shard.replicas.iter().filter(|r| r.online) {
                let synced = async {
                    let mut s = self.connect_node(&r.host, r.port, at("replica", r)).await?;
                    let info = s.info("replication").await?;
                    match super::field(&info, "master_link_status") {
                        Some("up") => Ok(s),
                        other => Err(Error::failed(format!(
                            "its link to the primary is {}",
                            other.unwrap_or("unknown")
                        ))),
                    }
                };
                match synced.await {
                    Ok(session) => {
                        return Ok(Opened {
                            session,
                            node: r.clone(),
                            role: "replica",
                        })
                    }
                    Err(e) => {
                        tracing::info!(shard = %name, replica = %format!("{}:{}", r.host, r.port), error = %e, "Passing over a replica")
                    }
                }
            }
        }
        let p = &shard.primary;
        Ok(Opened {
            session: self.connect_node(&p.host, p.port, at("primary", p)).await?,
            node: p.clone(),
            role: "primary",
        })
    }

    /// Waits for the cluster to fail `shard` over from its primary, which stopped answering: the
    /// shard as it is then, or `None` when the primary still answers, has no replica to take
    /// over, or no failover came.
    async fn failed_over(&self, shard: &Shard, cancel: &CancellationToken) -> Option<Shard> {
        let p = &shard.primary;
        let probe = format!("cluster node {}:{}", p.host, p.port);
        if shard.replicas.is_empty() || self.connect_node(&p.host, p.port, probe).await.is_ok() {
            return None;
        }
        let deadline = Instant::now() + FAILOVER_WAIT;
        while Instant::now() < deadline {
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let Ok(now) = self.discover().await else {
                continue;
            };
            let Some(s) = now.shards.into_iter().find(|s| s.slots == shard.slots) else {
                return None; // its slots moved: a resharding, not a failover
            };
            if s.primary.id != p.id {
                return Some(s);
            }
        }
        None
    }

    /// Captures one shard; once more if the node captured was a replica, or if the primary
    /// stopped answering and the cluster failed it over meanwhile.
    async fn capture_shard(
        &self,
        ctx: &BackupContext,
        index: usize,
        shard: &Shard,
        cancel: &CancellationToken,
    ) -> Result<(ShardRecord, Part)> {
        let name = format!("shard-{index}");
        let (first, from_primary) = match self.open_shard(&name, shard).await {
            Ok(open) => {
                let primary = open.role == "primary";
                (
                    self.capture_node(ctx, &name, shard, open, cancel).await,
                    primary,
                )
            }
            Err(e) => (Err(e), true),
        };
        let e = match first {
            Ok(r) => return Ok(r),
            // Wrong login, a damaged snapshot: no failover cures those.
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::Interrupted | ErrorKind::Credential | ErrorKind::Integrity
                ) || cancel.is_cancelled() =>
            {
                return Err(e.context(name))
            }
            Err(e) => e,
        };
        let now = if from_primary {
            match self.failed_over(shard, cancel).await {
                Some(now) => now,
                None => return Err(e.context(name)),
            }
        } else {
            shard.clone()
        };
        tracing::warn!(source = %ctx.source, backup = %ctx.id, shard = %name, error = %e, "The shard's capture failed; capturing it once more");
        let again = async {
            let open = self.open_shard(&name, &now).await?;
            self.capture_node(ctx, &name, &now, open, cancel).await
        };
        let mut r = again
            .await
            .map_err(|e2| e2.context(format!("{name}, captured a second time")))?;
        r.0.retried = true;
        Ok(r)
    }

    async fn capture_node(
        &self,
        ctx: &BackupContext,
        name: &str,
        shard: &Shard,
        open: Opened,
        cancel: &CancellationToken,
    ) -> Result<(ShardRecord, Part)> {
        let object = format!("{name}.{}", super::RDB_OBJECT.trim_start_matches("dump."));
        let key = layout::backup_object(&ctx.source, &ctx.id, &object);
        let c = self
            .capture(
                open.session,
                key,
                &object,
                ctx,
                &shard_pipeline(ctx),
                cancel.clone(),
            )
            .await?;
        let server_version = c.server_version();
        let record = ShardRecord {
            name: name.to_string(),
            object,
            slots: shard.slots.clone(),
            node: format!("{}:{}", open.node.host, open.node.port),
            node_id: open.node.id,
            role: open.role.into(),
            retried: false,
            crc64: c.crc64,
            server_version,
            scan: c.scan,
            rdb: c.summary,
        };
        Ok((record, c.part))
    }
}

/// A session with the node a shard is captured on.
struct Opened {
    session: super::Session,
    node: Node,
    role: &'static str,
}

/// Every shard's snapshot together: counts summed, the first shard's header fields.
fn merged(shards: &[ShardRecord]) -> RdbSummary {
    let mut all = RdbSummary::default();
    for s in shards {
        let r = &s.rdb;
        if all.aux.is_empty() {
            all.rdb_version = r.rdb_version;
            all.aux = r.aux.clone();
        }
        for (db, d) in &r.databases {
            let into = all.databases.entry(*db).or_default();
            into.keys += d.keys;
            into.expires += d.expires;
            for (kind, n) in &d.types {
                *into.types.entry(kind.clone()).or_default() += n;
            }
        }
        // Functions are loaded on every primary: the same libraries, counted once.
        all.functions = all.functions.max(r.functions);
        all.sample.extend(r.sample.iter().cloned());
        if let Some(why) = &r.incomplete {
            all.incomplete
                .get_or_insert_with(|| format!("{}: {why}", s.name));
        }
        all.bytes += r.bytes;
    }
    all
}

/// The pipeline of one shard among [`SHARDS_AT_ONCE`]: compression inline (the shards are the
/// parallelism), one part uploading, parts of 5 MiB (S3's least) unless the policy's are smaller,
/// so that the capture's memory stays under 64 MiB whatever the number of shards. A shard's
/// object can then reach 10,000 × 5 MiB (48 GiB) compressed.
fn shard_pipeline(ctx: &BackupContext) -> crate::pipeline::PipelineConfig {
    ctx.pipeline.small()
}

/// What the manifest shows of each shard.
fn summaries(shards: &[ShardRecord]) -> Vec<crate::repo::manifest::ShardSummary> {
    shards
        .iter()
        .map(|s| crate::repo::manifest::ShardSummary {
            name: s.name.clone(),
            object: s.object.clone(),
            slots: s
                .slots
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
            node: s.node.clone(),
            role: s.role.clone(),
            keys: s.rdb.keys(),
        })
        .collect()
}

/// A cluster's origin: any of its nodes, so that backups sharing one carry on one history.
fn origin(t: &Topology) -> Option<Origin> {
    let mut ids: Vec<&str> = t
        .shards
        .iter()
        .flat_map(|s| std::iter::once(&s.primary).chain(&s.replicas))
        .map(|n| n.id.as_str())
        .filter(|id| !id.is_empty())
        .collect();
    ids.sort_unstable();
    let first = ids.first()?;
    let mut o = Origin::new(format!("redis cluster node {first}"));
    o.history = ids[1..]
        .iter()
        .map(|id| format!("redis cluster node {id}"))
        .collect();
    let digest = sha2::Sha256::digest(ids.join(",").as_bytes());
    Some(o.detail("shards", t.shards.len().to_string()).detail(
        "nodes",
        format!("{} ({})", ids.len(), &hex::encode(digest)[..12]),
    ))
}

/// Checks that the cluster is whole and that each shard's node serves a capture.
pub(crate) async fn probe(redis: &Redis) -> Result<()> {
    let topology = redis.discover().await?;
    for (i, shard) in topology.shards.iter().enumerate() {
        let name = format!("shard-{i}");
        let open = redis.open_shard(&name, shard).await?;
        redis
            .probe_session(open.session)
            .await
            .map_err(|e| e.context(name))?;
    }
    Ok(())
}

/// Backs up every shard of the cluster the url names, as one backup.
pub(crate) async fn backup(redis: &Redis, ctx: &BackupContext) -> Result<SourceBackup> {
    let topology = redis.discover().await?;
    tracing::debug!(source = %ctx.source, backup = %ctx.id, shards = topology.shards.len(), "Capturing every shard of the cluster");
    let cancel = ctx.cancel.child_token();
    let captures = futures::stream::iter(topology.shards.clone().into_iter().enumerate())
        .map(|(i, shard): (usize, Shard)| {
            let cancel = cancel.clone();
            async move {
                let r = redis.capture_shard(ctx, i, &shard, &cancel).await;
                if r.is_err() {
                    cancel.cancel(); // one shard failed: nothing will be published
                }
                r
            }
        })
        .buffered(SHARDS_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
    let mut shards = Vec::new();
    let mut parts = Vec::new();
    let mut failed: Option<Error> = None;
    for c in captures {
        match c {
            Ok((record, part)) => {
                shards.push(record);
                parts.push(part);
            }
            // The first real failure, not the cancellations it caused.
            Err(e) => match &failed {
                Some(f) if f.kind != ErrorKind::Interrupted || e.kind == ErrorKind::Interrupted => {
                }
                _ => failed = Some(e),
            },
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let after = redis.discover().await?;
    if after.slot_map() != topology.slot_map() {
        return Err(Error::failed(format!(
            "{}: slots moved between shards during the capture (a resharding?), so keys could be missing or doubled",
            redis.where_()
        ))
        .hint("nothing was published; the next run captures the new slot map (RUNBOOK.md#backup-failing)"));
    }
    let rdb = merged(&shards);
    let server_version = rdb.aux.get("redis-ver").cloned();
    let fingerprint = serde_json::to_value(Fingerprint {
        format: 1,
        kind: crate::source::Kind::Redis,
        mode: match redis.cfg.capture {
            super::RedisCapture::Scan { .. } => "scan",
            _ => "replication",
        }
        .into(),
        scan: None,
        server_version: server_version.clone(),
        crc64: None,
        rdb,
        cluster: Some(shards.clone()),
    })
    .map_err(|e| Error::failed(format!("cannot encode the fingerprint: {e}")))?;
    Ok(SourceBackup {
        parts,
        fingerprint,
        source_version: server_version.map(|v| format!("Redis {v} cluster")),
        dump_tool_version: None,
        base_backup: None,
        shards: summaries(&shards),
        database: None,
        origin: origin(&after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis_cluster() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(
            key_slot(b"foo{}{bar}"),
            key_slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn a_slot_map_must_cover_every_slot_once() {
        let whole = [("a", vec![(0, 8000)]), ("b", vec![(8001, 16383)])];
        assert_eq!(
            slot_map_problem(whole.iter().map(|(n, s)| (*n, s.as_slice()))),
            None
        );
        let gap = [("a", vec![(0, 8000)]), ("b", vec![(8002, 16383)])];
        let p = slot_map_problem(gap.iter().map(|(n, s)| (*n, s.as_slice()))).unwrap();
        assert!(
            p.contains("1 of the 16384 slots") && p.contains("8001"),
            "{p}"
        );
        let twice = [("a", vec![(0, 8001)]), ("b", vec![(8001, 16383)])];
        let p = slot_map_problem(twice.iter().map(|(n, s)| (*n, s.as_slice()))).unwrap();
        assert_eq!(p, "slot 8001 is owned by both a and b");
    }

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    fn node(id: &str, port: i64, role: &str, health: &str) -> Reply {
        Reply::Array(Some(vec![
            bulk("id"),
            bulk(id),
            bulk("port"),
            Reply::Int(port),
            bulk("ip"),
            bulk("10.0.0.1"),
            bulk("role"),
            bulk(role),
            bulk("health"),
            bulk(health),
        ]))
    }

    #[test]
    fn shards_are_read_from_cluster_shards_and_cluster_slots() {
        let shards = Reply::Array(Some(vec![
            Reply::Array(Some(vec![
                bulk("slots"),
                Reply::Array(Some(vec![Reply::Int(8192), Reply::Int(16383)])),
                bulk("nodes"),
                Reply::Array(Some(vec![
                    node("b", 7001, "master", "online"),
                    node("b2", 7004, "replica", "loading"),
                ])),
            ])),
            Reply::Array(Some(vec![
                bulk("slots"),
                Reply::Array(Some(vec![Reply::Int(0), Reply::Int(8191)])),
                bulk("nodes"),
                Reply::Array(Some(vec![
                    node("old", 7000, "master", "failed"),
                    node("a", 7003, "master", "online"),
                ])),
            ])),
            // A node without slots is no shard.
            Reply::Array(Some(vec![
                bulk("slots"),
                Reply::Array(Some(vec![])),
                bulk("nodes"),
                Reply::Array(Some(vec![node("new", 7009, "master", "online")])),
            ])),
        ]));
        let t = Topology::from_shards(&shards, false).unwrap();
        assert_eq!(t.slot_map(), vec![vec![(0, 8191)], vec![(8192, 16383)]]);
        assert_eq!(
            t.shards[0].primary.id, "a",
            "the failed primary was replaced"
        );
        assert_eq!(t.shards[0].replicas[0].id, "old");
        assert!(!t.shards[0].replicas[0].online);
        assert!(
            t.shards[1].replicas[0].online,
            "7.0 says loading of an idle replica"
        );
        assert_eq!(t.shards[1].primary.port, 7001);

        let n = |port: i64, id: &str| {
            Reply::Array(Some(vec![bulk("10.0.0.1"), Reply::Int(port), bulk(id)]))
        };
        let slots = Reply::Array(Some(vec![
            Reply::Array(Some(vec![
                Reply::Int(9000),
                Reply::Int(16383),
                n(7001, "b"),
            ])),
            Reply::Array(Some(vec![
                Reply::Int(0),
                Reply::Int(8999),
                n(7000, "a"),
                n(7003, "a2"),
            ])),
            Reply::Array(Some(vec![Reply::Int(100), Reply::Int(100), n(7001, "b")])),
        ]));
        let t = Topology::from_slots(&slots).unwrap();
        assert_eq!(
            t.slot_map(),
            vec![vec![(0, 8999)], vec![(100, 100), (9000, 16383)]]
        );
        assert_eq!(t.shards[0].replicas[0].port, 7003);
    }
}
