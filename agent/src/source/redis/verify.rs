//! Verifying a Redis backup, the steps the verifier's skeleton runs:
//!
//! 1. The snapshot object is downloaded to a spool file and its SHA-256 checked against the
//!    manifest (exit 13) before anything is decrypted; the fingerprint too.
//! 2. The plaintext is written into the scratch server's temp dir, its SHA-256 checked at its end.
//! 3. `redis-check-rdb` must accept the file.
//! 4. The scratch server loads it as a replica of nothing, so keys whose TTL ran out since the
//!    capture are kept and the counts must match exactly: keys and expiries per database. Then a
//!    sample of keys of every type is read back: type and length.
//! 5. The scratch server and its directory are removed, whatever happened.

use std::time::Instant;

use async_trait::async_trait;

use super::load::{self as redis_load, Scratch, Target};
use super::rdb::RdbSummary;
use super::{cluster, Fingerprint, RedisConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::Role;
use crate::restore::{self, Spooled};
use crate::verify::{typed_fingerprint, Check, Context, Report, Steps, Verdict};

/// The Redis steps, and what they found.
pub struct RedisSteps {
    config: RedisConfig,
    /// The snapshot (a cluster's: none yet, each shard is spooled in turn) and fingerprint.
    spooled: Option<(Option<Spooled>, Fingerprint)>,
    scratch: Option<Scratch>,
}

impl RedisSteps {
    /// Steps for a source with these settings.
    pub fn new(config: RedisConfig) -> Self {
        RedisSteps {
            config,
            spooled: None,
            scratch: None,
        }
    }
}

#[async_trait(?Send)]
impl Steps for RedisSteps {
    fn restore_check(&self) -> (&'static str, &'static str) {
        ("loads into redis-server", "loads")
    }

    async fn prepare(&mut self, ctx: &Context<'_>, report: &mut Report) -> Result<()> {
        let t0 = Instant::now();
        let m = &ctx.entry.manifest;
        let fingerprint: Fingerprint = typed_fingerprint(ctx.repo, m, ctx.identities).await?;
        let spooled = match fingerprint.cluster {
            Some(_) => None,
            None => Some(spool_part(ctx, restore::part(m, Role::Snapshot)?).await?),
        };
        self.spooled = Some((spooled, fingerprint));
        report.timings.download_seconds = t0.elapsed().as_secs_f64();
        Ok(())
    }

    async fn restore_and_check(
        &mut self,
        ctx: &Context<'_>,
        report: &mut Report,
    ) -> Result<Verdict> {
        let Some((spooled, fingerprint)) = self.spooled.take() else {
            return Err(Error::failed(
                "verification steps out of order: nothing prepared",
            ));
        };
        let Some(spooled) = spooled else {
            return self.check_cluster(ctx, &fingerprint, report).await;
        };
        let t1 = Instant::now();
        let bin_dir = self.config.bin_dir.as_deref();
        let scratch = match load(&mut self.scratch, bin_dir, ctx, &spooled).await? {
            Ok(s) => s,
            Err(e) => return Ok(Verdict::RestoreFailed(e)),
        };
        report.timings.restore_seconds = t1.elapsed().as_secs_f64();
        report.scratch = format!("ephemeral redis-server ({})", scratch.bin.display());
        let t2 = Instant::now();
        let outcome = check(scratch, &self.config, &fingerprint.rdb, "", report).await;
        report.timings.readback_seconds = t2.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::Interrupted => return Err(e),
            Err(e) => report.error = Some(e.message),
        }
        Ok(Verdict::Checked)
    }

    async fn teardown(&mut self) {
        if let Some(s) = self.scratch.take() {
            s.stop().await;
        }
        self.spooled = None;
    }
}

impl RedisSteps {
    /// A cluster backup: the slot map covers every slot once; then each shard in turn is
    /// spooled, loaded and checked like a single server's snapshot, and every key it holds must
    /// hash to a slot it owned.
    async fn check_cluster(
        &mut self,
        ctx: &Context<'_>,
        fp: &Fingerprint,
        report: &mut Report,
    ) -> Result<Verdict> {
        let shards = fp.cluster.as_deref().unwrap_or_default();
        let whole = format!("{} slots, each owned by one shard", cluster::SLOTS);
        let found =
            cluster::slot_map_problem(shards.iter().map(|s| (s.name.as_str(), s.slots.as_slice())));
        report
            .checks
            .push(Check::eq("slot map", whole.clone(), found.unwrap_or(whole)));
        let m = &ctx.entry.manifest;
        for shard in shards {
            let t0 = Instant::now();
            let part = m
                .parts
                .iter()
                .find(|p| p.name == shard.object)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Integrity,
                        format!(
                            "backup {} has no object {} for {}",
                            m.id, shard.object, shard.name
                        ),
                    )
                })?;
            let spooled = spool_part(ctx, part).await?;
            report.timings.download_seconds += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let bin_dir = self.config.bin_dir.as_deref();
            let scratch = match load(&mut self.scratch, bin_dir, ctx, &spooled).await? {
                Ok(s) => s,
                Err(e) => return Ok(Verdict::RestoreFailed(e.context(shard.name.clone()))),
            };
            drop(spooled);
            report.timings.restore_seconds += t1.elapsed().as_secs_f64();
            report.scratch = format!(
                "ephemeral redis-server per shard ({})",
                scratch.bin.display()
            );
            let t2 = Instant::now();
            let prefix = format!("{} ", shard.name);
            let mut outcome = check(scratch, &self.config, &shard.rdb, &prefix, report).await;
            if outcome.is_ok() {
                outcome = in_slots(scratch, shard, report).await;
            }
            report.timings.readback_seconds += t2.elapsed().as_secs_f64();
            if let Some(s) = self.scratch.take() {
                s.stop().await;
            }
            match outcome {
                Ok(()) => {}
                Err(e) if e.kind == ErrorKind::Interrupted => return Err(e),
                Err(e) => {
                    report.error = Some(format!("{}: {}", shard.name, e.message));
                    break;
                }
            }
        }
        Ok(Verdict::Checked)
    }
}

/// Starts a scratch server (kept in `slot`) on a spooled snapshot. `Ok(Err(_))`: it does not
/// load, a failed verification rather than a failure to verify.
async fn load<'s>(
    slot: &'s mut Option<Scratch>,
    bin_dir: Option<&std::path::Path>,
    ctx: &Context<'_>,
    spooled: &Spooled,
) -> Result<std::result::Result<&'s Scratch, Error>> {
    let started = async {
        let plain = spooled.plaintext(ctx.identities).await?;
        Scratch::start(bin_dir, plain, true).await
    };
    match started.await {
        Ok(s) => Ok(Ok(slot.insert(s))),
        Err(e) if e.kind == ErrorKind::Interrupted => Err(e),
        Err(e) => Ok(Err(e)),
    }
}

/// Downloads one part to a spool file, its stored SHA-256 checked (exit 13).
async fn spool_part(ctx: &Context<'_>, part: &crate::repo::manifest::Part) -> Result<Spooled> {
    restore::spool(
        ctx.repo,
        &ctx.entry.manifest,
        part,
        &std::env::temp_dir(),
        &restore::NoProgress,
    )
    .await
}

/// Every key of a loaded shard hashes to a slot the shard owned at capture time.
async fn in_slots(
    scratch: &Scratch,
    shard: &cluster::ShardRecord,
    report: &mut Report,
) -> Result<()> {
    let target = scratch.target();
    let mut con = target.connect(0).await?;
    let owned = |slot: u16| shard.slots.iter().any(|&(a, b)| (a..=b).contains(&slot));
    let (mut keys, mut outside, mut first_outside) = (0u64, 0u64, None);
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .map_err(|e| target.error("SCAN", e))?;
        for k in batch {
            keys += 1;
            let slot = cluster::key_slot(&k);
            if !owned(slot) {
                outside += 1;
                first_outside.get_or_insert_with(|| {
                    format!("{:?} (slot {slot})", String::from_utf8_lossy(&k))
                });
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    report.checks.push(Check::eq(
        format!("{} keys in its slots", shard.name),
        format!("all {keys}"),
        match first_outside {
            None => format!("all {keys}"),
            Some(k) => format!("{outside} of {keys} outside, e.g. {k}"),
        },
    ));
    Ok(())
}

/// The loaded snapshot against what the capture counted (`fp`): redis-check-rdb, key counts,
/// sampled keys; each check's name starts with `prefix` (a cluster's shard).
async fn check(
    scratch: &Scratch,
    cfg: &RedisConfig,
    fp: &RdbSummary,
    prefix: &str,
    report: &mut Report,
) -> Result<()> {
    let checked = redis_load::check_rdb(cfg.bin_dir.as_deref(), &scratch.rdb_path()).await;
    report.checks.push(match checked {
        Ok(summary) => {
            report
                .notes
                .push(format!("{prefix}redis-check-rdb: {summary}"));
            Check::eq(
                format!("{prefix}redis-check-rdb"),
                "accepts the file",
                "accepts the file",
            )
        }
        Err(e) if e.kind == ErrorKind::Integrity => Check::failed(
            format!("{prefix}redis-check-rdb"),
            "accepts the file",
            e.message,
        ),
        Err(e) => return Err(e),
    });
    let target = scratch.target();
    let found = target.keyspace().await?;
    if let Some(why) = &fp.incomplete {
        report.notes.push(format!(
            "{prefix}the capture could not count every key ({why}): key counts were not compared"
        ));
    } else {
        let dbs: std::collections::BTreeSet<u32> = fp
            .databases
            .iter()
            .filter(|(_, d)| d.keys > 0)
            .map(|(n, _)| *n)
            .chain(found.keys().copied())
            .collect();
        for db in dbs {
            let want = fp.databases.get(&db).cloned().unwrap_or_default();
            let (keys, expires) = found.get(&db).copied().unwrap_or((0, 0));
            report.checks.push(Check::eq(
                format!("{prefix}db{db} keys"),
                want.keys.to_string(),
                keys.to_string(),
            ));
            report.checks.push(Check::eq(
                format!("{prefix}db{db} keys with a TTL"),
                want.expires.to_string(),
                expires.to_string(),
            ));
        }
    }
    report.checks.push(Check::eq(
        format!("{prefix}Redis Functions libraries"),
        fp.functions.to_string(),
        redis_load::function_libraries(target).await?.to_string(),
    ));
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let mut skipped = 0;
    for k in &fp.sample {
        if k.expires_at_ms.is_some_and(|t| t <= now_ms + 60_000) {
            skipped += 1;
            continue;
        }
        let mut c = read_back(target, k).await?;
        c.name = format!("{prefix}{}", c.name);
        report.checks.push(c);
    }
    if skipped > 0 {
        report.notes.push(format!(
            "{prefix}{skipped} sampled key(s) were not read back: their TTL has run out (or nearly)"
        ));
    }
    Ok(())
}

/// Reads one sampled key: its type, and its length where the capture recorded it.
async fn read_back(target: &Target, k: &super::rdb::SampleKey) -> Result<Check> {
    let key = hex::decode(&k.key_hex).map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("fingerprint: sample key: {e}"),
        )
    })?;
    let shown = String::from_utf8(key.clone())
        .ok()
        .filter(|s| s.chars().all(|c| !c.is_control()))
        .unwrap_or_else(|| format!("0x{}", k.key_hex));
    let name = format!("db{} key {shown:?}", k.db);
    let mut con = target.connect(k.db).await?;
    let kind: String = redis::cmd("TYPE")
        .arg(&key)
        .query_async(&mut con)
        .await
        .map_err(|e| target.error("TYPE", e))?;
    let len_cmd = match kind.as_str() {
        "string" => Some("STRLEN"),
        "list" => Some("LLEN"),
        "set" => Some("SCARD"),
        "zset" => Some("ZCARD"),
        "hash" => Some("HLEN"),
        "stream" => Some("XLEN"),
        _ => None,
    };
    let expected = match k.len {
        Some(n) => format!("{} of length {n}", k.kind),
        None => k.kind.clone(),
    };
    let len = match (len_cmd, k.len) {
        (Some(cmd), Some(_)) => Some(
            redis::cmd(cmd)
                .arg(&key)
                .query_async::<u64>(&mut con)
                .await
                .map_err(|e| target.error(cmd, e))?,
        ),
        _ => None,
    };
    let found = match len {
        Some(n) => format!("{kind} of length {n}"),
        None => kind,
    };
    Ok(Check::eq(name, expected, found))
}
