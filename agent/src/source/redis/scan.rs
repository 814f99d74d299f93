//! `mode = "scan"`: a snapshot for servers that refuse `SYNC`, `PSYNC` and `BGSAVE` (managed
//! services). Every database is walked with `SCAN`; each key's `DUMP` payload (the RDB encoding of
//! its value, with the RDB version and a CRC-64) and `PTTL` are read in pipelined batches, and a
//! real RDB file is written from them: header, aux fields, the Functions libraries (`FUNCTION
//! DUMP`), then per database `SELECTDB`, each key's expiry and entry, and the end mark with the
//! file's CRC-64. The stock `redis-server` loads it and `redis-check-rdb` accepts it.
//!
//! It is not a point in time: a key written during the walk may or may not be in it, and keys
//! that vanish between `SCAN` and `DUMP` are counted, not stored.

use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::rdb::CRC64;
use super::{Reply, Session};
use crate::error::{Error, ErrorKind, Result};

/// Keys per `SCAN` and per pipeline of `DUMP`/`PTTL`.
const BATCH: usize = 100;

/// What a scan stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScanOutcome {
    /// Keys written into the snapshot.
    pub keys: u64,
    /// Keys `SCAN` listed that were gone (deleted or expired) by the time they were read.
    pub vanished: u64,
    /// Functions libraries' payload stored.
    pub functions: bool,
}

/// Writes an RDB file, header first once the payloads' RDB version is known, with its CRC-64.
struct RdbWriter<W> {
    out: W,
    crc: crc::Digest<'static, u64, crc::Table<16>>,
    version: Option<u16>,
    aux: Vec<(String, String)>,
    db: Option<u32>,
}

impl<W: AsyncWrite + Unpin> RdbWriter<W> {
    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.crc.update(bytes);
        self.out
            .write_all(bytes)
            .await
            .map_err(|e| Error::failed(format!("writing the scanned snapshot: {e}")))
    }

    /// Writes the header and aux fields unless written; a payload newer than the header's
    /// version cannot follow it.
    async fn begin(&mut self, version: u16) -> Result<()> {
        match self.version {
            Some(v) if version > v => Err(Error::failed(format!(
                "a DUMP payload of RDB version {version} follows others of version {v}: the server changed during the scan"
            ))),
            Some(_) => Ok(()),
            None => {
                self.version = Some(version);
                let mut head = format!("REDIS{version:04}").into_bytes();
                for (k, v) in std::mem::take(&mut self.aux) {
                    head.push(0xfa);
                    string(&mut head, k.as_bytes());
                    string(&mut head, v.as_bytes());
                }
                self.write(&head).await
            }
        }
    }

    async fn entry(
        &mut self,
        db: u32,
        key: &[u8],
        payload: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<()> {
        let (body, version) = unwrap_payload(payload)?;
        if body.is_empty() {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "the DUMP payload of {:?} holds no value",
                    String::from_utf8_lossy(key)
                ),
            ));
        }
        self.begin(version).await?;
        let mut buf = Vec::with_capacity(body.len() + key.len() + 16);
        if self.db != Some(db) {
            buf.push(0xfe);
            length(&mut buf, u64::from(db));
            self.db = Some(db);
        }
        if let Some(at) = expires_at_ms {
            buf.push(0xfc);
            buf.extend_from_slice(&at.to_le_bytes());
        }
        buf.push(body[0]);
        string(&mut buf, key);
        buf.extend_from_slice(&body[1..]);
        self.write(&buf).await
    }

    async fn finish(mut self, fallback_version: u16) -> Result<()> {
        self.begin(fallback_version).await?;
        self.write(&[0xff]).await?;
        let crc = self.crc.clone().finalize();
        self.out
            .write_all(&crc.to_le_bytes())
            .await
            .and(self.out.shutdown().await)
            .map_err(|e| Error::failed(format!("writing the scanned snapshot: {e}")))
    }
}

/// A `DUMP` payload's body (type byte and value) and RDB version, its CRC-64 checked.
fn unwrap_payload(payload: &[u8]) -> Result<(&[u8], u16)> {
    let damaged = |why: &str| {
        Error::new(
            ErrorKind::Integrity,
            format!("a DUMP payload is damaged: {why}"),
        )
        .hint("nothing was published; retry the backup")
    };
    // `FUNCTION DUMP` of a server without libraries is the footer alone.
    if payload.len() < 10 {
        return Err(damaged("shorter than its footer"));
    }
    let (signed, crc) = payload.split_at(payload.len() - 8);
    if CRC64.checksum(signed).to_le_bytes() != crc {
        return Err(damaged("its CRC-64 does not match"));
    }
    let (body, version) = signed.split_at(signed.len() - 2);
    Ok((body, u16::from_le_bytes([version[0], version[1]])))
}

/// An RDB length.
fn length(buf: &mut Vec<u8>, n: u64) {
    if n < 1 << 6 {
        buf.push(n as u8);
    } else if n < 1 << 14 {
        buf.extend_from_slice(&[0x40 | (n >> 8) as u8, n as u8]);
    } else if n <= u64::from(u32::MAX) {
        buf.push(0x80);
        buf.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        buf.push(0x81);
        buf.extend_from_slice(&n.to_be_bytes());
    }
}

/// An RDB string: its length, then its bytes.
fn string(buf: &mut Vec<u8>, s: &[u8]) {
    length(buf, s.len() as u64);
    buf.extend_from_slice(s);
}

/// The RDB version a server of `redis_version` writes, for a snapshot with nothing dumped.
fn rdb_version_of(redis_version: &str) -> u16 {
    let mut parts = redis_version
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    match (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) {
        (7, 0) => 10,
        (7, 2) => 11,
        (7, _) | (8.., _) => 12,
        _ => 9,
    }
}

/// Scans every database of `s` into an RDB file on `out`, at most `rate` keys per second.
pub(crate) async fn scan_into(
    mut s: Session,
    out: impl AsyncWrite + Unpin,
    rate: u32,
    cancel: CancellationToken,
) -> Result<ScanOutcome> {
    let server = s.info("server").await?;
    let redis_version = super::field(&server, "redis_version")
        .unwrap_or("")
        .to_string();
    let keyspace = match s.call(&[b"INFO", b"keyspace"]).await? {
        Reply::Bulk(Some(b)) => super::load::parse_keyspace(&String::from_utf8_lossy(&b)),
        other => return Err(Error::failed(format!("INFO keyspace answered {other:?}"))),
    };
    let mut w = RdbWriter {
        out,
        crc: CRC64.digest(),
        version: None,
        aux: vec![
            ("redis-ver".into(), redis_version.clone()),
            ("lifeboat-capture".into(), "scan".into()),
        ],
        db: None,
    };
    let mut outcome = ScanOutcome::default();
    s.send(&[b"FUNCTION", b"DUMP"]).await?;
    match s.reply().await? {
        Reply::Bulk(Some(payload)) => {
            let (body, version) = unwrap_payload(&payload)?;
            w.begin(version).await?;
            w.write(body).await?;
            outcome.functions = true;
        }
        // No libraries, or a server without Functions (before 7.0).
        Reply::Bulk(None) => {}
        Reply::Error(e) if e.contains("unknown command") => {}
        Reply::Error(e) => {
            return Err(s.refused(&[b"FUNCTION", b"DUMP"], &e));
        }
        other => return Err(Error::failed(format!("FUNCTION DUMP answered {other:?}"))),
    }
    let started = Instant::now();
    for &db in keyspace.keys() {
        s.call(&[b"SELECT", db.to_string().as_bytes()]).await?;
        let mut cursor = "0".to_string();
        loop {
            if cancel.is_cancelled() {
                return Err(Error::new(ErrorKind::Interrupted, "interrupted"));
            }
            let count = BATCH.to_string();
            let (next, keys) = match s
                .call(&[b"SCAN", cursor.as_bytes(), b"COUNT", count.as_bytes()])
                .await?
            {
                Reply::Array(Some(mut v)) if v.len() == 2 => {
                    let keys = match v.pop() {
                        Some(Reply::Array(Some(keys))) => keys,
                        other => return Err(Error::failed(format!("SCAN answered {other:?}"))),
                    };
                    (v.pop().and_then(|c| c.text()).unwrap_or_default(), keys)
                }
                other => return Err(Error::failed(format!("SCAN answered {other:?}"))),
            };
            let keys: Vec<Vec<u8>> = keys
                .into_iter()
                .filter_map(|k| match k {
                    Reply::Bulk(Some(k)) => Some(k),
                    _ => None,
                })
                .collect();
            let mut commands: Vec<Vec<&[u8]>> = Vec::with_capacity(keys.len() * 2);
            for k in &keys {
                commands.push(vec![b"DUMP", k]);
                commands.push(vec![b"PTTL", k]);
            }
            let replies = s.pipeline(&commands).await?;
            let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
            for (k, pair) in keys.iter().zip(replies.chunks(2)) {
                match (&pair[0], &pair[1]) {
                    (Reply::Bulk(Some(payload)), Reply::Int(ttl)) if *ttl != -2 => {
                        let expires = (*ttl >= 0).then(|| now_ms + *ttl as u64);
                        w.entry(db, k, payload, expires).await?;
                        outcome.keys += 1;
                    }
                    // Deleted or expired since SCAN listed it.
                    (Reply::Bulk(None), _) | (_, Reply::Int(-2)) => outcome.vanished += 1,
                    (Reply::Error(e), _) => {
                        return Err(s.refused(&[b"DUMP"], e));
                    }
                    (dump, ttl) => {
                        return Err(Error::failed(format!(
                            "DUMP/PTTL of {:?} answered {dump:?} / {ttl:?}",
                            String::from_utf8_lossy(k)
                        )))
                    }
                }
            }
            // At most `rate` keys a second over the whole scan.
            let due =
                Duration::from_secs_f64((outcome.keys + outcome.vanished) as f64 / f64::from(rate));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            cursor = next;
            if cursor == "0" {
                break;
            }
        }
    }
    w.finish(rdb_version_of(&redis_version)).await?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_rdb_lengths() {
        for (n, want) in [
            (5u64, vec![0x05]),
            (300, vec![0x41, 0x2c]),
            (70_000, vec![0x80, 0x00, 0x01, 0x11, 0x70]),
        ] {
            let mut buf = Vec::new();
            length(&mut buf, n);
            assert_eq!(buf, want, "{n}");
        }
    }

    #[test]
    fn a_payload_is_checked_and_unwrapped() {
        // A string "hi" (type 0), RDB version 10, and its CRC-64.
        let mut p = vec![0x00, 0x02, b'h', b'i', 10, 0];
        let crc = CRC64.checksum(&p);
        p.extend_from_slice(&crc.to_le_bytes());
        let (body, version) = unwrap_payload(&p).unwrap();
        assert_eq!((body, version), (&[0x00, 0x02, b'h', b'i'][..], 10));
        p[2] ^= 1;
        let e = unwrap_payload(&p).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Integrity);
        // FUNCTION DUMP of a server without libraries: the footer alone.
        let mut footer = vec![10, 0];
        footer.extend_from_slice(&CRC64.checksum(&footer).to_le_bytes());
        assert_eq!(unwrap_payload(&footer).unwrap(), (&[][..], 10));
        assert!(unwrap_payload(&footer[1..]).is_err());
    }

    #[test]
    fn versions_follow_the_server() {
        assert_eq!(rdb_version_of("7.0.15"), 10);
        assert_eq!(rdb_version_of("7.2.4"), 11);
        assert_eq!(rdb_version_of("7.4.1"), 12);
        assert_eq!(rdb_version_of("6.2.14"), 9);
    }
}
