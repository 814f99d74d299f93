//! Verifying a Redis backup: integrity first, then `redis-check-rdb`, then an ephemeral
//! `redis-server` that loads the snapshot, compared with the fingerprint taken at capture.
//!
//! Order and guarantees:
//! 1. The snapshot object is downloaded to a spool file and its SHA-256 checked against the
//!    manifest (exit 13) before anything is decrypted; the fingerprint too.
//! 2. The plaintext is written into the scratch server's temp dir, its SHA-256 checked at its end.
//! 3. `redis-check-rdb` must accept the file.
//! 4. The scratch server loads it as a replica of nothing, so keys whose TTL ran out since the
//!    capture are kept and the counts must match exactly: keys and expiries per database. Then a
//!    sample of keys of every type is read back: type and length.
//! 5. The scratch server and its directory are removed, whatever happened; the report is stored.

use std::time::Instant;

use lifeboat::repo::catalog::Entry;
use lifeboat::repo::Repository;
use lifeboat::source::redis::load::{self as redis_load, Scratch, Target};
use lifeboat::source::redis::Fingerprint;
use lifeboat::source::redis::RedisConfig;
use lifeboat::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use crate::checks::Check;
use crate::report::Report;
use crate::verify::{conclude, new_report, spool_and_fingerprint, Identities};

/// Verifies `entry` of a Redis source.
pub async fn verify(
    repo: &Repository,
    cfg: &RedisConfig,
    entry: &Entry,
    identities: &Identities,
    cancel: &CancellationToken,
) -> Result<Report> {
    let (report, t0) = new_report(entry);
    let (mut report, spooled, fingerprint): (_, _, Fingerprint) = spool_and_fingerprint(
        repo,
        entry,
        lifeboat::repo::manifest::Role::Snapshot,
        identities,
        cancel,
        report,
    )
    .await?;
    report.timings.download_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let started = async {
        let plain = spooled.plaintext(identities).await?;
        Scratch::start(cfg.bin_dir.as_deref(), plain, true).await
    };
    let scratch = tokio::select! {
        r = started => r,
        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "interrupted")),
    };
    let scratch = match scratch {
        Ok(s) => s,
        Err(e) if e.kind == ErrorKind::Interrupted => return Err(e),
        Err(e) => {
            // A snapshot that does not load is a failed verification, not a failure to verify.
            report.checks.push(Check::failed(
                "loads into redis-server",
                "loads",
                e.message.clone(),
            ));
            report.error = Some(e.message);
            return conclude(repo, report, t0).await;
        }
    };
    report.timings.restore_seconds = t1.elapsed().as_secs_f64();
    report.scratch = format!("ephemeral redis-server ({})", scratch.bin.display());
    let t2 = Instant::now();
    let outcome = tokio::select! {
        r = check(&scratch, cfg, &fingerprint, &mut report) => r,
        _ = cancel.cancelled() => Err(Error::new(ErrorKind::Interrupted, "interrupted")),
    };
    scratch.stop().await;
    drop(spooled);
    report.timings.fingerprint_seconds = t2.elapsed().as_secs_f64();
    if let Err(e) = outcome {
        if e.kind == ErrorKind::Interrupted {
            return Err(e);
        }
        report.error = Some(e.message);
    }
    conclude(repo, report, t0).await
}

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
async fn read_back(target: &Target, k: &lifeboat::source::redis::rdb::SampleKey) -> Result<Check> {
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
