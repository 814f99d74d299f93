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
use super::{Fingerprint, RedisConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::Role;
use crate::restore::Spooled;
use crate::verify::{spool_and_fingerprint, Check, Context, Report, Steps, Verdict};

/// The Redis steps, and what they found.
pub struct RedisSteps {
    config: RedisConfig,
    spooled: Option<(Spooled, Fingerprint)>,
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
        self.spooled = Some(spool_and_fingerprint(ctx, Role::Snapshot).await?);
        report.timings.download_seconds = t0.elapsed().as_secs_f64();
        Ok(())
    }

    async fn restore_and_check(
        &mut self,
        ctx: &Context<'_>,
        report: &mut Report,
    ) -> Result<Verdict> {
        let Some((spooled, fingerprint)) = &self.spooled else {
            return Err(Error::failed(
                "verification steps out of order: nothing prepared",
            ));
        };
        let t1 = Instant::now();
        let started = async {
            let plain = spooled.plaintext(ctx.identities).await?;
            Scratch::start(self.config.bin_dir.as_deref(), plain, true).await
        };
        let scratch = match started.await {
            Ok(s) => self.scratch.insert(s),
            Err(e) if e.kind == ErrorKind::Interrupted => return Err(e),
            // A snapshot that does not load is a failed verification, not a failure to verify.
            Err(e) => return Ok(Verdict::RestoreFailed(e)),
        };
        report.timings.restore_seconds = t1.elapsed().as_secs_f64();
        report.scratch = format!("ephemeral redis-server ({})", scratch.bin.display());
        let t2 = Instant::now();
        let outcome = check(scratch, &self.config, fingerprint, report).await;
        report.timings.fingerprint_seconds = t2.elapsed().as_secs_f64();
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

/// The loaded snapshot against the fingerprint: redis-check-rdb, key counts, sampled keys.
async fn check(
    scratch: &Scratch,
    cfg: &RedisConfig,
    fp: &Fingerprint,
    report: &mut Report,
) -> Result<()> {
    let checked = redis_load::check_rdb(cfg.bin_dir.as_deref(), &scratch.rdb_path()).await;
    report.checks.push(match checked {
        Ok(summary) => {
            report.notes.push(format!("redis-check-rdb: {summary}"));
            Check::eq("redis-check-rdb", "accepts the file", "accepts the file")
        }
        Err(e) if e.kind == ErrorKind::Integrity => {
            Check::failed("redis-check-rdb", "accepts the file", e.message)
        }
        Err(e) => return Err(e),
    });
    let target = scratch.target();
    let found = target.keyspace().await?;
    if let Some(why) = &fp.rdb.incomplete {
        report.notes.push(format!(
            "the capture could not count every key ({why}): key counts were not compared"
        ));
    } else {
        let dbs: std::collections::BTreeSet<u32> = fp
            .rdb
            .databases
            .iter()
            .filter(|(_, d)| d.keys > 0)
            .map(|(n, _)| *n)
            .chain(found.keys().copied())
            .collect();
        for db in dbs {
            let want = fp.rdb.databases.get(&db).cloned().unwrap_or_default();
            let (keys, expires) = found.get(&db).copied().unwrap_or((0, 0));
            report.checks.push(Check::eq(
                format!("db{db} keys"),
                want.keys.to_string(),
                keys.to_string(),
            ));
            report.checks.push(Check::eq(
                format!("db{db} keys with a TTL"),
                want.expires.to_string(),
                expires.to_string(),
            ));
        }
    }
    report.checks.push(Check::eq(
        "Redis Functions libraries",
        fp.rdb.functions.to_string(),
        redis_load::function_libraries(target).await?.to_string(),
    ));
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let mut skipped = 0;
    for k in &fp.rdb.sample {
        if k.expires_at_ms.is_some_and(|t| t <= now_ms + 60_000) {
            skipped += 1;
            continue;
        }
        report.checks.push(read_back(target, k).await?);
    }
    if skipped > 0 {
        report.notes.push(format!(
            "{skipped} sampled key(s) were not read back: their TTL has run out (or nearly)"
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
