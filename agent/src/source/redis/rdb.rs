//! The RDB format, as far as lifeboat needs it: check a snapshot's framing and CRC64, and count
//! what it holds, as it streams past.
//!
//! Two independent checks run over the same bytes:
//! - [`Crc64Tail`] computes the CRC-64 (Jones, as Redis uses it) of everything but the last eight
//!   bytes and compares it with them. It understands nothing of the structure, so it holds for any
//!   RDB version, and it is what makes a short or damaged stream fail.
//! - [`parse`] walks the structure (opcodes, databases, keys, expiries, value encodings) without
//!   keeping values, and summarises: keys and expiries per database, types, a small sample of keys
//!   with their lengths. Counts are exact for the snapshot because they come from it. A value type
//!   it does not know (a newer Redis) stops the walk and marks the summary incomplete; it never
//!   makes a good stream fail.
//!
//! The input is untrusted: every length is checked against what is left, nothing is allocated
//! from a length without a cap, and nothing panics (a fuzz-style test feeds it random bytes).

use std::collections::BTreeMap;
use std::io::{self, Read};

use crc::{Crc, Table, CRC_64_REDIS};
use serde::{Deserialize, Serialize};

/// The newest RDB version whose value types this parser knows.
pub const MAX_KNOWN_VERSION: u32 = 12;

/// Keys sampled per type and database.
const SAMPLE_PER_TYPE: usize = 3;
/// Longest key that is sampled.
const SAMPLE_KEY_MAX: usize = 256;
/// Largest encoded blob (listpack, ziplist, intset) read into memory to learn a sampled key's length.
const BLOB_MAX: u64 = 16 << 20;

pub(crate) static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_REDIS);

/// The CRC-64 of a whole RDB stream but its last eight bytes, which hold the expected value.
pub struct Crc64Tail {
    digest: crc::Digest<'static, u64, Table<16>>,
    tail: [u8; 8],
    tail_len: usize,
    total: u64,
    head: Vec<u8>,
}

impl Default for Crc64Tail {
    fn default() -> Self {
        Crc64Tail {
            digest: CRC64.digest(),
            tail: [0; 8],
            tail_len: 0,
            total: 0,
            head: Vec::with_capacity(9),
        }
    }
}

/// What the framing check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrcVerdict {
    /// The stored CRC64 matches.
    Ok(u64),
    /// The server saved without a checksum (`rdbchecksum no`): stored value 0.
    Disabled,
}

impl Crc64Tail {
    /// Feeds the next chunk.
    pub fn update(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        if self.head.len() < 9 {
            let n = (9 - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..n]);
        }
        if chunk.len() >= 8 {
            self.digest.update(&self.tail[..self.tail_len]);
            let cut = chunk.len() - 8;
            self.digest.update(&chunk[..cut]);
            self.tail.copy_from_slice(&chunk[cut..]);
            self.tail_len = 8;
        } else {
            let keep = 8 - chunk.len();
            if self.tail_len > keep {
                let out = self.tail_len - keep;
                self.digest.update(&self.tail[..out]);
                self.tail.copy_within(out..self.tail_len, 0);
                self.tail_len = keep;
            }
            self.tail[self.tail_len..self.tail_len + chunk.len()].copy_from_slice(chunk);
            self.tail_len += chunk.len();
        }
    }

    /// Bytes seen.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Checks the magic, the version and the trailing CRC64.
    pub fn finish(self) -> Result<CrcVerdict, String> {
        header_version(&self.head)?;
        if self.tail_len < 8 || self.total < 9 + 1 + 8 {
            return Err(format!(
                "the stream is {} bytes long, too short to be a snapshot",
                self.total
            ));
        }
        let stored = u64::from_le_bytes(self.tail);
        if stored == 0 {
            return Ok(CrcVerdict::Disabled);
        }
        let computed = self.digest.finalize();
        if computed != stored {
            return Err(format!(
                "its CRC64 does not match: stored {stored:016x}, computed {computed:016x} over {} bytes",
                self.total - 8
            ));
        }
        Ok(CrcVerdict::Ok(stored))
    }
}

/// The RDB version from the 9-byte header `REDIS0011`.
pub fn header_version(head: &[u8]) -> Result<u32, String> {
    if head.len() < 9 || &head[..5] != b"REDIS" {
        return Err(format!(
            "it does not start with an RDB header (found {:?})",
            String::from_utf8_lossy(&head[..head.len().min(9)])
        ));
    }
    std::str::from_utf8(&head[5..9])
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|v| *v >= 1)
        .ok_or_else(|| {
            format!(
                "its RDB version {:?} is not a number",
                String::from_utf8_lossy(&head[5..9])
            )
        })
}

/// What one database of a snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbSummary {
    /// Keys.
    pub keys: u64,
    /// Keys with an expiry.
    pub expires: u64,
    /// Keys per type (`string`, `list`, `set`, `zset`, `hash`, `stream`, `module`).
    pub types: BTreeMap<String, u64>,
}

/// A key the verifier reads back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleKey {
    /// Database number.
    pub db: u32,
    /// The key's bytes, hex.
    pub key_hex: String,
    /// Its type, as `TYPE` names it.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its length as STRLEN, LLEN, SCARD, ZCARD, HLEN or XLEN report it, where the encoding tells.
    pub len: Option<u64>,
    /// Absolute expiry, Unix milliseconds.
    pub expires_at_ms: Option<u64>,
}

/// What a snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdbSummary {
    /// RDB format version.
    pub rdb_version: u32,
    /// Short auxiliary fields (`redis-ver`, `redis-bits`, `ctime`, …).
    pub aux: BTreeMap<String, String>,
    /// Per database number.
    pub databases: BTreeMap<u32, DbSummary>,
    /// Function libraries.
    pub functions: u64,
    /// Keys to read back after a restore.
    pub sample: Vec<SampleKey>,
    /// Why the counts are not complete, if they are not.
    pub incomplete: Option<String>,
    /// Bytes walked (the whole snapshot when complete).
    pub bytes: u64,
}

impl RdbSummary {
    /// All keys.
    pub fn keys(&self) -> u64 {
        self.databases.values().map(|d| d.keys).sum()
    }
}

/// Why a walk stopped.
#[derive(Debug, thiserror::Error)]
pub enum RdbError {
    /// Not an RDB stream.
    #[error("{0}")]
    Header(String),
    /// The stream ended inside the structure.
    #[error("the stream ends early, at byte {0}")]
    Truncated(u64),
    /// The bytes break the format.
    #[error("malformed at byte {offset}: {what}")]
    Malformed {
        /// Where.
        offset: u64,
        /// What.
        what: String,
    },
    /// A construct this parser does not know (a newer Redis).
    #[error("unknown at byte {offset}: {what}")]
    Unsupported {
        /// Where.
        offset: u64,
        /// What.
        what: String,
    },
    /// Reading failed.
    #[error("{0}")]
    Io(io::Error),
}

type R<T> = Result<T, RdbError>;

/// A length or a special string encoding.
enum Len {
    Plain(u64),
    Int(u8),
    Lzf,
}

struct In<T> {
    r: T,
    pos: u64,
}

impl<T: Read> In<T> {
    fn exact(&mut self, buf: &mut [u8]) -> R<()> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(RdbError::Truncated(self.pos))
            }
            Err(e) => Err(RdbError::Io(e)),
        }
    }

    fn u8(&mut self) -> R<u8> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    fn bytes<const N: usize>(&mut self) -> R<[u8; N]> {
        let mut b = [0u8; N];
        self.exact(&mut b)?;
        Ok(b)
    }

    fn skip(&mut self, n: u64) -> R<()> {
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink()).map_err(RdbError::Io)?;
        self.pos += copied;
        if copied < n {
            return Err(RdbError::Truncated(self.pos));
        }
        Ok(())
    }

    fn malformed(&self, what: impl Into<String>) -> RdbError {
        RdbError::Malformed {
            offset: self.pos,
            what: what.into(),
        }
    }

    fn len_or_enc(&mut self) -> R<Len> {
        let b = self.u8()?;
        Ok(match b >> 6 {
            0 => Len::Plain(u64::from(b & 0x3f)),
            1 => Len::Plain((u64::from(b & 0x3f) << 8) | u64::from(self.u8()?)),
            2 => match b {
                0x80 => Len::Plain(u64::from(u32::from_be_bytes(self.bytes()?))),
                0x81 => Len::Plain(u64::from_be_bytes(self.bytes()?)),
                _ => return Err(self.malformed(format!("length prefix 0x{b:02x}"))),
            },
            _ => match b & 0x3f {
                0..=2 => Len::Int(b & 0x3f),
                3 => Len::Lzf,
                e => return Err(self.malformed(format!("string encoding {e}"))),
            },
        })
    }

    fn len(&mut self) -> R<u64> {
        match self.len_or_enc()? {
            Len::Plain(n) => Ok(n),
            _ => Err(self.malformed("an encoded string where a length belongs")),
        }
    }

    /// Skips a string; returns its logical length.
    fn skip_string(&mut self) -> R<u64> {
        match self.len_or_enc()? {
            Len::Plain(n) => {
                self.skip(n)?;
                Ok(n)
            }
            Len::Int(w) => {
                let v: i64 = match w {
                    0 => i64::from(self.u8()? as i8),
                    1 => i64::from(i16::from_le_bytes(self.bytes()?)),
                    _ => i64::from(i32::from_le_bytes(self.bytes()?)),
                };
                Ok(v.to_string().len() as u64)
            }
            Len::Lzf => {
                let clen = self.len()?;
                let len = self.len()?;
                self.skip(clen)?;
                Ok(len)
            }
        }
    }

    /// Reads a string of at most `max` bytes (decompressed); longer ones are skipped (`None`).
    fn string(&mut self, max: u64) -> R<Option<Vec<u8>>> {
        match self.len_or_enc()? {
            Len::Plain(n) if n <= max => {
                let mut v = vec![0u8; n as usize];
                self.exact(&mut v)?;
                Ok(Some(v))
            }
            Len::Plain(n) => self.skip(n).map(|_| None),
            Len::Int(w) => {
                let v: i64 = match w {
                    0 => i64::from(self.u8()? as i8),
                    1 => i64::from(i16::from_le_bytes(self.bytes()?)),
                    _ => i64::from(i32::from_le_bytes(self.bytes()?)),
                };
                Ok(Some(v.to_string().into_bytes()))
            }
            Len::Lzf => {
                let clen = self.len()?;
                let len = self.len()?;
                if clen > max || len > max {
                    return self.skip(clen).map(|_| None);
                }
                let mut c = vec![0u8; clen as usize];
                self.exact(&mut c)?;
                lzf_decompress(&c, len as usize)
                    .map(Some)
                    .ok_or_else(|| self.malformed("an LZF string does not decompress"))
            }
        }
    }
}

/// LZF decompression (liblzf's format, as Redis writes it); `None` on any inconsistency.
pub fn lzf_decompress(input: &[u8], out_len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(out_len);
    let mut i = 0;
    while i < input.len() {
        let ctrl = usize::from(input[i]);
        i += 1;
        if ctrl < 32 {
            let n = ctrl + 1;
            let lit = input.get(i..i + n)?;
            out.extend_from_slice(lit);
            i += n;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += usize::from(*input.get(i)?);
                i += 1;
            }
            let back = ((ctrl & 0x1f) << 8) + usize::from(*input.get(i)?) + 1;
            i += 1;
            let start = out.len().checked_sub(back)?;
            for k in 0..len + 2 {
                let b = out[start + k];
                out.push(b);
            }
        }
        if out.len() > out_len {
            return None;
        }
    }
    (out.len() == out_len).then_some(out)
}

/// Element count from a listpack header (`None` when it saturated at 65535).
fn listpack_count(blob: &[u8]) -> Option<u64> {
    let n = u16::from_le_bytes(blob.get(4..6)?.try_into().ok()?);
    (n != u16::MAX).then_some(u64::from(n))
}

/// Element count from a ziplist header.
fn ziplist_count(blob: &[u8]) -> Option<u64> {
    let n = u16::from_le_bytes(blob.get(8..10)?.try_into().ok()?);
    (n != u16::MAX).then_some(u64::from(n))
}

/// Member count from an intset header.
fn intset_count(blob: &[u8]) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(
        blob.get(4..8)?.try_into().ok()?,
    )))
}

/// Walks an RDB stream and summarises it. Stops right after the EOF opcode and its checksum.
pub fn parse(r: impl Read) -> R<RdbSummary> {
    let mut out = RdbSummary::default();
    parse_into(r, &mut out)?;
    Ok(out)
}

/// [`parse`], leaving what was counted so far in `out` when the walk stops early.
pub fn parse_into(r: impl Read, out: &mut RdbSummary) -> R<()> {
    let mut s = In { r, pos: 0 };
    let result = walk(&mut s, out);
    out.bytes = s.pos;
    result
}

fn walk<T: Read>(s: &mut In<T>, out: &mut RdbSummary) -> R<()> {
    let head: [u8; 9] = s.bytes()?;
    let version = header_version(&head).map_err(RdbError::Header)?;
    out.rdb_version = version;
    let mut sampled: BTreeMap<(u32, &'static str), usize> = BTreeMap::new();
    let mut db = 0u32;
    let mut expire: Option<u64> = None;
    loop {
        let op = s.u8()?;
        match op {
            0xff => {
                if version >= 5 {
                    s.skip(8)?;
                }
                return Ok(());
            }
            0xfe => {
                db = u32::try_from(s.len()?).map_err(|_| s.malformed("database number"))?;
                out.databases.entry(db).or_default();
            }
            0xfd => expire = Some(u64::from(u32::from_le_bytes(s.bytes()?)) * 1000),
            0xfc => expire = Some(u64::from_le_bytes(s.bytes()?)),
            0xfb => {
                s.len()?;
                s.len()?;
            }
            0xfa => {
                let k = s.string(64)?;
                let v = s.string(256)?;
                if let (Some(k), Some(v)) = (k, v) {
                    out.aux.insert(
                        String::from_utf8_lossy(&k).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
            0xf9 => {
                s.u8()?;
            }
            0xf8 => {
                s.len()?;
            }
            0xf7 => {
                s.len()?; // module id
                s.len()?; // when opcode
                s.len()?; // when
                skip_module_value(s)?;
            }
            0xf6 => {
                return Err(RdbError::Unsupported {
                    offset: s.pos,
                    what: "a pre-release function library".into(),
                })
            }
            0xf5 => {
                s.skip_string()?;
                out.functions += 1;
            }
            0xf4 => {
                s.len()?;
                s.len()?;
                s.len()?;
            }
            t => {
                let at = s.pos;
                let kind = type_name(t).ok_or(RdbError::Unsupported {
                    offset: at,
                    what: format!("value type {t} (RDB version {version})"),
                })?;
                let key = s.string(SAMPLE_KEY_MAX as u64)?;
                let slot = sampled.entry((db, kind)).or_default();
                let want = *slot < SAMPLE_PER_TYPE && key.is_some();
                let len = value(s, t, want)?;
                let d = out.databases.entry(db).or_default();
                d.keys += 1;
                if expire.is_some() {
                    d.expires += 1;
                }
                *d.types.entry(kind.to_string()).or_default() += 1;
                if want && kind != "module" {
                    *slot += 1;
                    out.sample.push(SampleKey {
                        db,
                        key_hex: hex::encode(key.unwrap_or_default()),
                        kind: kind.to_string(),
                        len,
                        expires_at_ms: expire,
                    });
                }
                expire = None;
            }
        }
    }
}

/// The `TYPE` name of an RDB value type, `None` for one this parser does not know.
fn type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        0 => "string",
        1 | 10 | 14 | 18 => "list",
        2 | 11 | 20 => "set",
        3 | 5 | 12 | 17 => "zset",
        4 | 9 | 13 | 16 => "hash",
        15 | 19 | 21 => "stream",
        7 => "module",
        _ => return None,
    })
}

/// Skips one value of type `t`; with `want`, also returns its length where the encoding tells.
fn value<T: Read>(s: &mut In<T>, t: u8, want: bool) -> R<Option<u64>> {
    let blob = |s: &mut In<T>, count: fn(&[u8]) -> Option<u64>| -> R<Option<u64>> {
        if want {
            Ok(s.string(BLOB_MAX)?.and_then(|b| count(&b)))
        } else {
            s.skip_string().map(|_| None)
        }
    };
    Ok(match t {
        0 => Some(s.skip_string()?),
        1 | 2 => {
            let n = s.len()?;
            for _ in 0..n {
                s.skip_string()?;
            }
            Some(n)
        }
        3 => {
            let n = s.len()?;
            for _ in 0..n {
                s.skip_string()?;
                let l = s.u8()?;
                if l < 253 {
                    s.skip(u64::from(l))?;
                }
            }
            Some(n)
        }
        4 => {
            let n = s.len()?;
            for _ in 0..n.saturating_mul(2) {
                s.skip_string()?;
            }
            Some(n)
        }
        5 => {
            let n = s.len()?;
            for _ in 0..n {
                s.skip_string()?;
                s.skip(8)?;
            }
            Some(n)
        }
        7 => {
            s.len()?;
            skip_module_value(s)?;
            None
        }
        9 => blob(s, |b| {
            b.first().filter(|n| **n < 254).map(|n| u64::from(*n))
        })?,
        10 => blob(s, ziplist_count)?,
        11 => blob(s, intset_count)?,
        12 | 13 => blob(s, ziplist_count)?.map(|n| n / 2),
        16 | 17 => blob(s, listpack_count)?.map(|n| n / 2),
        20 => blob(s, listpack_count)?,
        14 | 18 => {
            let nodes = s.len()?;
            let mut total = Some(0u64);
            for _ in 0..nodes {
                let container = if t == 18 { s.len()? } else { 2 };
                let n = if container == 1 {
                    s.skip_string()?;
                    Some(1)
                } else {
                    blob(
                        s,
                        if t == 18 {
                            listpack_count
                        } else {
                            ziplist_count
                        },
                    )?
                };
                total = match (total, n) {
                    (Some(a), Some(b)) => Some(a + b),
                    _ => None,
                };
            }
            total.filter(|_| want)
        }
        15 | 19 | 21 => Some(skip_stream(s, t)?),
        _ => {
            return Err(RdbError::Unsupported {
                offset: s.pos,
                what: format!("value type {t}"),
            })
        }
    })
}

/// Skips a stream; returns its length (XLEN).
fn skip_stream<T: Read>(s: &mut In<T>, t: u8) -> R<u64> {
    let listpacks = s.len()?;
    for _ in 0..listpacks {
        s.skip_string()?; // master entry id
        s.skip_string()?; // listpack
    }
    let length = s.len()?;
    s.len()?; // last id ms
    s.len()?; // last id seq
    if t >= 19 {
        for _ in 0..5 {
            s.len()?; // first id, max deleted id, entries added
        }
    }
    let groups = s.len()?;
    for _ in 0..groups {
        s.skip_string()?; // name
        s.len()?;
        s.len()?; // last delivered id
        if t >= 19 {
            s.len()?; // entries read
        }
        let pel = s.len()?;
        for _ in 0..pel {
            s.skip(16 + 8)?; // id, delivery time
            s.len()?; // delivery count
        }
        let consumers = s.len()?;
        for _ in 0..consumers {
            s.skip_string()?; // name
            s.skip(8)?; // seen time
            if t >= 21 {
                s.skip(8)?; // active time
            }
            let pel = s.len()?;
            s.skip(pel.checked_mul(16).ok_or_else(|| s.malformed("PEL size"))?)?;
        }
    }
    Ok(length)
}

/// Skips a module value saved with typed opcodes, up to its EOF opcode.
fn skip_module_value<T: Read>(s: &mut In<T>) -> R<()> {
    loop {
        match s.len()? {
            0 => return Ok(()),
            1 | 2 => {
                s.len()?;
            }
            3 => s.skip(4)?,
            4 => s.skip(8)?,
            5 => {
                s.skip_string()?;
            }
            op => return Err(s.malformed(format!("module opcode {op}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_is_redis_flavour() {
        // Redis's own test vector (src/crc64.c).
        assert_eq!(CRC64.checksum(b"123456789"), 0xe9c6d914c4b8d9ca);
    }

    fn with_crc(body: &[u8]) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend_from_slice(&CRC64.checksum(body).to_le_bytes());
        v
    }

    /// A tiny snapshot: aux, db 0 with a string with expiry and an int-encoded string, db 2 with a
    /// list of two plain strings.
    fn tiny() -> Vec<u8> {
        let mut b = b"REDIS0010".to_vec();
        b.extend_from_slice(&[0xfa, 9]);
        b.extend_from_slice(b"redis-ver");
        b.extend_from_slice(&[6]);
        b.extend_from_slice(b"7.0.15");
        b.extend_from_slice(&[0xfe, 0, 0xfb, 2, 1]);
        b.push(0xfc);
        b.extend_from_slice(&1_900_000_000_000u64.to_le_bytes());
        b.extend_from_slice(&[0, 1, b'a', 3]);
        b.extend_from_slice(b"xyz");
        b.extend_from_slice(&[0, 1, b'n', 0xc1]);
        b.extend_from_slice(&1234i16.to_le_bytes());
        b.extend_from_slice(&[0xfe, 2, 1, 1, b'l', 2, 1, b'p', 2, b'q', b'r']);
        b.push(0xff);
        with_crc(&b)
    }

    #[test]
    fn tiny_snapshot_is_summarised() {
        let rdb = tiny();
        let s = parse(&rdb[..]).unwrap();
        assert_eq!(s.rdb_version, 10);
        assert_eq!(s.aux["redis-ver"], "7.0.15");
        assert_eq!(s.databases[&0].keys, 2);
        assert_eq!(s.databases[&0].expires, 1);
        assert_eq!(s.databases[&2].types["list"], 1);
        assert_eq!(s.keys(), 3);
        let a = &s.sample[0];
        assert_eq!(
            (a.key_hex.as_str(), a.len, a.expires_at_ms),
            ("61", Some(3), Some(1_900_000_000_000))
        );
        assert_eq!(s.sample[1].len, Some(4), "1234 is four characters");
        assert_eq!(s.sample[2].len, Some(2));
        let mut c = Crc64Tail::default();
        for chunk in rdb.chunks(3) {
            c.update(chunk);
        }
        assert!(matches!(c.finish(), Ok(CrcVerdict::Ok(_))));
    }

    #[test]
    fn damage_is_caught_by_the_crc_and_truncation_by_both() {
        let rdb = tiny();
        let mut bad = rdb.clone();
        bad[20] ^= 1;
        let mut c = Crc64Tail::default();
        c.update(&bad);
        assert!(c.finish().unwrap_err().contains("CRC64"));
        let short = &rdb[..rdb.len() - 5];
        assert!(matches!(parse(short), Err(RdbError::Truncated(_))));
        let mut c = Crc64Tail::default();
        c.update(short);
        assert!(c.finish().is_err());
        let mut c = Crc64Tail::default();
        c.update(b"HTTP/1.1 200 OK\r\n\r\nhello world");
        assert!(c.finish().unwrap_err().contains("RDB header"));
    }

    #[test]
    fn unknown_types_are_unsupported_not_malformed() {
        let mut b = b"REDIS0099".to_vec();
        b.extend_from_slice(&[0xfe, 0, 99, 1, b'k']);
        assert!(matches!(parse(&b[..]), Err(RdbError::Unsupported { .. })));
    }

    #[test]
    fn lzf_round_trips_a_back_reference() {
        // "abcabcabc": literal "abc", then a back reference of length 6 at distance 3.
        let c = [2, b'a', b'b', b'c', (4 << 5), 2];
        assert_eq!(lzf_decompress(&c, 9).unwrap(), b"abcabcabc");
        assert_eq!(lzf_decompress(&c, 8), None);
        assert_eq!(lzf_decompress(&[0xe0, 0xff, 0xff], 10), None);
    }
}
