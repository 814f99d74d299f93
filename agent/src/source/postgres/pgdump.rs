//! Fingerprinting a `pg_dump -Fc -Z0` stream as it passes, so the fingerprint costs the source
//! nothing: no second scan of any table.
//!
//! The custom archive format is a header, a table of contents (TOC), then data blocks. With `-Z0`
//! each table's COPY text travels in length-prefixed chunks; every line is one row, up to the `\.`
//! terminator. Each row line is hashed with XXH3-128 and the hashes are summed (mod 2^128), which
//! gives an order-independent content hash the verifier recomputes from `COPY … TO STDOUT` of the
//! restored table. Large objects are counted and hashed the same way. Sequence values are read
//! from the TOC's `SEQUENCE SET` entries: exactly what a restore will set.
//!
//! The parser is a push state machine fed arbitrary chunk boundaries. It never fails the backup: a
//! stream it cannot parse leaves `error` set in the fingerprint, and the dump itself is unaffected.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use super::FingerprintMode;
use crate::pipeline::Observer;

const MAGIC: &[u8] = b"PGDMP";
const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;

/// Row count and content hash of one table, from the dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableData {
    /// Schema.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// What pg_dump copied: `schema.table (columns)`, generated columns left out.
    #[serde(default)]
    pub copy: Option<String>,
    /// Exact row count.
    pub rows: u64,
    /// Sum of XXH3-128 of each COPY text row, hex (absent in `counts` mode).
    pub hash: Option<String>,
    /// Where its data block lies in the dump: `[offset, length]` (a restore reads it alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<[u64; 2]>,
}

/// A sequence's value as the dump will restore it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    /// Qualified name as pg_dump wrote it.
    pub name: String,
    /// The value.
    pub value: i64,
    /// Whether `nextval` returns value+increment (true) or value (false).
    pub is_called: bool,
}

/// What the dump stream holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpSummary {
    /// Archive format version, e.g. `1.14`.
    pub archive_version: String,
    /// Tables with data, sorted by schema and name.
    pub tables: Vec<TableData>,
    /// Sequences, sorted by name.
    pub sequences: Vec<SequenceValue>,
    /// Number of large objects.
    pub large_objects: u64,
    /// Sum of XXH3-128 of (oid, content) of each large object, hex.
    pub large_objects_hash: Option<String>,
    /// Why the stream could not be parsed, if it could not.
    pub error: Option<String>,
    /// Bytes of the header and TOC: the archive without its data, which pg_restore reads for
    /// the schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toc_end: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    int_size: usize,
    version: (u8, u8),
}

#[derive(Debug, Clone)]
struct TocEntry {
    desc: String,
    namespace: String,
    tag: String,
    copy: String,
    /// `WITH SCHEMA …` of an EXTENSION entry.
    extension_schema: Option<String>,
    /// pg_dump's section: 2 pre-data, 3 data, 4 post-data (1 none).
    section: i64,
    /// The client encoding an ENCODING entry sets.
    encoding: Option<String>,
    /// The entries it depends on.
    deps: Vec<i64>,
    /// An INDEX's or CONSTRAINT's statement and tablespace, which a restore may run itself.
    statement: Option<(String, String)>,
}

#[derive(Debug)]
enum State {
    /// Collecting header and TOC bytes in `pending`.
    Toc,
    /// Expecting a block type byte and dump id.
    Block,
    /// Expecting a data chunk length.
    ChunkLen { dump_id: i64 },
    /// Inside a data chunk.
    Chunk { dump_id: i64, remaining: usize },
    /// Expecting a large object's oid (0 ends the block).
    BlobOid,
    /// Expecting a large object's chunk length.
    BlobChunkLen { oid: i64 },
    /// Inside a large object's chunk.
    BlobChunk { oid: i64, remaining: usize },
    /// Stream not understood; ignore the rest.
    Failed,
}

/// Counts and hashes COPY text rows fed in arbitrary chunks: what the dump stream carries, and
/// what `COPY … TO STDOUT` of a restored table gives back. A row is hashed as it streams, never
/// held: a 1 GB field costs no more memory than a small one.
#[derive(Default)]
pub struct RowHasher {
    full: bool,
    rows: u64,
    hash: u128,
    /// The row being read: its hash so far, its length and its first bytes (to tell `\.`).
    row: Option<(Xxh3, u64, [u8; 3])>,
    terminated: bool,
}

impl std::fmt::Debug for RowHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowHasher")
            .field("rows", &self.rows)
            .field("terminated", &self.terminated)
            .finish_non_exhaustive()
    }
}

impl RowHasher {
    /// A hasher; `full` = false only counts rows.
    pub fn new(full: bool) -> Self {
        RowHasher {
            full,
            ..Default::default()
        }
    }

    /// Adds `piece` to the row being read.
    fn extend(&mut self, piece: &[u8]) {
        let (hasher, len, head) = self.row.get_or_insert_with(|| (Xxh3::new(), 0, [0; 3]));
        for (i, b) in piece.iter().take(3).enumerate() {
            let at = *len as usize + i;
            if at < 3 {
                head[at] = *b;
            }
        }
        if self.full {
            hasher.update(piece);
        }
        *len += piece.len() as u64;
    }

    /// Ends the row being read.
    fn end_row(&mut self) {
        let (hasher, len, head) = self.row.take().unwrap_or_else(|| (Xxh3::new(), 0, [0; 3]));
        // `\.` ends COPY data in a dump; a row holding that text would be escaped as `\\.`.
        if len == 2 && head[..2] == *b"\\." {
            self.terminated = true;
            return;
        }
        self.rows += 1;
        if self.full {
            self.hash = self.hash.wrapping_add(hasher.digest128());
        }
    }

    /// Feeds the next bytes of COPY text.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while !self.terminated {
            match memchr::memchr(b'\n', rest) {
                Some(nl) => {
                    self.extend(&rest[..nl]);
                    rest = &rest[nl + 1..];
                    self.end_row();
                }
                None => {
                    if !rest.is_empty() {
                        self.extend(rest);
                    }
                    return;
                }
            }
        }
    }

    /// Adds the rows `other` read (of the same table, in another piece).
    pub fn add(&mut self, mut other: RowHasher) {
        other.end_last_row();
        self.rows += other.rows;
        self.hash = self.hash.wrapping_add(other.hash);
    }

    /// A last row without its newline still counts.
    fn end_last_row(&mut self) {
        if self.row.is_some() && !self.terminated {
            self.end_row();
        }
    }

    /// Row count and content hash (hex; `None` when only counting).
    pub fn finish(mut self) -> (u64, Option<String>) {
        self.end_last_row();
        (self.rows, self.full.then(|| format!("{:032x}", self.hash)))
    }
}

/// Hashes large objects the same way on both sides: XXH3-128 of (oid as 8 little-endian bytes,
/// content), summed.
#[derive(Default)]
pub struct LargeObjectHasher {
    count: u64,
    sum: u128,
    current: Option<Xxh3>,
}

impl LargeObjectHasher {
    /// Starts the object `oid`.
    pub fn start(&mut self, oid: i64) {
        let mut h = Xxh3::new();
        h.update(&oid.to_le_bytes());
        self.current = Some(h);
    }
    /// Feeds the current object's content.
    pub fn feed(&mut self, data: &[u8]) {
        if let Some(h) = &mut self.current {
            h.update(data);
        }
    }
    /// Ends the current object.
    pub fn end(&mut self) {
        if let Some(h) = self.current.take() {
            self.count += 1;
            self.sum = self.sum.wrapping_add(h.digest128());
        }
    }
    /// Count and hash (hex).
    pub fn finish(self) -> (u64, String) {
        (self.count, format!("{:032x}", self.sum))
    }
}

/// The observer that builds a [`DumpSummary`] from a `pg_dump -Fc -Z0` stream.
pub struct DumpFingerprinter {
    mode: FingerprintMode,
    state: State,
    pending: Vec<u8>,
    /// Re-parse the TOC only once `pending` reaches this size, so a large TOC costs O(n), not O(n²).
    next_attempt: usize,
    header: Option<Header>,
    toc: HashMap<i64, TocEntry>,
    tables: BTreeMap<(String, String), DumpedTable>,
    current: Option<(String, String)>,
    /// Bytes observed so far: the stream offset just past the chunk being parsed.
    seen: u64,
    /// Where the block being parsed began.
    block_at: u64,
    /// Block starts not yet handed to the pipeline as frame starts.
    starts: Vec<u64>,
    toc_end: Option<u64>,
    sequences: Vec<SequenceValue>,
    blobs: LargeObjectHasher,
    error: Option<String>,
}

/// A table's data as the dump carries it.
struct DumpedTable {
    copy: Option<String>,
    rows: RowHasher,
    block: Option<[u64; 2]>,
}

/// Outcome of trying to parse from a byte slice.
enum Parse<T> {
    Done(T, usize),
    NeedMore,
    Bad(String),
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    int_size: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.buf.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }
    /// pg_dump's int: a sign byte, then `int_size` bytes, least significant first.
    fn int(&mut self) -> Option<i64> {
        let sign = self.byte()?;
        let raw = self.bytes(self.int_size)?;
        let mut v: i64 = 0;
        for (i, b) in raw.iter().enumerate().take(8) {
            v |= (*b as i64) << (8 * i);
        }
        Some(if sign != 0 { -v } else { v })
    }
    /// pg_dump's string: an int length (-1 for NULL), then the bytes.
    fn string(&mut self) -> Option<Option<String>> {
        let len = self.int()?;
        if len < 0 {
            return Some(None);
        }
        let s = self.bytes(len as usize)?;
        Some(Some(String::from_utf8_lossy(s).into_owned()))
    }
}

fn parse_header_and_toc(buf: &[u8]) -> Parse<(Header, HashMap<i64, TocEntry>, Vec<SequenceValue>)> {
    if buf.len() < MAGIC.len() + 6 {
        return Parse::NeedMore;
    }
    if &buf[..5] != MAGIC {
        return Parse::Bad("not a pg_dump custom-format archive (no PGDMP magic)".into());
    }
    let (vmaj, vmin) = (buf[5], buf[6]);
    let int_size = buf[8] as usize;
    let off_size = buf[9] as usize;
    let format = buf[10];
    if vmaj != 1 || !(12..=16).contains(&vmin) || !(1..=8).contains(&int_size) || format != 1 {
        return Parse::Bad(format!(
            "unsupported archive version {vmaj}.{vmin} (int size {int_size}, format {format})"
        ));
    }
    let header = Header {
        int_size,
        version: (vmaj, vmin),
    };
    let mut c = Cursor {
        buf,
        pos: 11,
        int_size,
    };
    macro_rules! need {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return Parse::NeedMore,
            }
        };
    }
    // Compression: an algorithm byte from 1.15, an int before.
    if vmin >= 15 {
        let algo = need!(c.byte());
        if algo != 0 {
            return Parse::Bad("the dump is compressed; fingerprinting needs -Z0".into());
        }
    } else {
        let level = need!(c.int());
        if level != 0 {
            return Parse::Bad("the dump is compressed; fingerprinting needs -Z0".into());
        }
    }
    for _ in 0..7 {
        need!(c.int()); // creation time: sec, min, hour, mday, mon, year, isdst
    }
    need!(c.string()); // database name
    need!(c.string()); // server version
    need!(c.string()); // pg_dump version
    let count = need!(c.int());
    let mut toc = HashMap::new();
    let mut sequences = Vec::new();
    for _ in 0..count.max(0) {
        let dump_id = need!(c.int());
        need!(c.int()); // had dumper
        need!(c.string()); // table oid
        need!(c.string()); // oid
        let tag = need!(c.string()).unwrap_or_default();
        let desc = need!(c.string()).unwrap_or_default();
        let section = need!(c.int());
        let defn = need!(c.string()).unwrap_or_default();
        need!(c.string()); // drop statement
        let copy = need!(c.string()).unwrap_or_default(); // COPY statement
        let namespace = need!(c.string()).unwrap_or_default();
        let tablespace = need!(c.string()).unwrap_or_default();
        if vmin >= 14 {
            need!(c.string()); // table access method
        }
        if vmin >= 16 {
            need!(c.int()); // relkind
        }
        need!(c.string()); // owner
        need!(c.string()); // "with oids"
        let mut deps = Vec::new();
        // The dependency list ends with NULL.
        while let Some(dep) = need!(c.string()) {
            deps.extend(dep.parse::<i64>().ok());
        }
        need!(c.byte()); // data offset flag
        need!(c.bytes(off_size)); // data offset
        if desc == "SEQUENCE SET" {
            if let Some(s) = parse_setval(&defn) {
                sequences.push(s);
            }
        }
        toc.insert(
            dump_id,
            TocEntry {
                extension_schema: (desc == "EXTENSION")
                    .then(|| extension_schema(&defn))
                    .flatten(),
                section,
                deps,
                statement: matches!(desc.as_str(), "INDEX" | "CONSTRAINT")
                    .then(|| (defn.clone(), tablespace)),
                encoding: (desc == "ENCODING")
                    .then(|| {
                        let v = defn.split_once('\'')?.1.split_once('\'')?.0;
                        Some(v.to_string())
                    })
                    .flatten(),
                desc,
                namespace,
                tag,
                copy,
            },
        );
    }
    Parse::Done((header, toc, sequences), c.pos)
}

/// `CREATE EXTENSION IF NOT EXISTS x WITH SCHEMA public;` → `public` (unquoted).
fn extension_schema(defn: &str) -> Option<String> {
    let rest = defn.split_once(" WITH SCHEMA ")?.1;
    let name = rest.trim().trim_end_matches(';').trim();
    Some(
        match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(q) => q.replace("\"\"", "\""),
            None => name.to_string(),
        },
    )
}

/// pg_dump's pre-data section.
pub const SECTION_PRE_DATA: i64 = 2;

/// pg_dump's data section.
pub const SECTION_DATA: i64 = 3;

/// pg_dump's post-data section.
pub const SECTION_POST_DATA: i64 = 4;

/// One entry of an archive's table of contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEntry {
    /// Its dump id (`pg_restore --use-list` names entries by it).
    pub id: i64,
    /// What it is: `TABLE DATA`, `SEQUENCE SET`, `INDEX`…
    pub desc: String,
    /// pg_dump's section ([`SECTION_DATA`]…).
    pub section: i64,
    /// Schema.
    pub namespace: String,
    /// Name.
    pub tag: String,
    /// The entries it depends on.
    pub deps: Vec<i64>,
    /// An INDEX's or CONSTRAINT's statement and tablespace.
    pub statement: Option<(String, String)>,
}

/// A custom-format archive's table of contents, read from `toc` (its header and TOC, all of it).
#[derive(Debug, Clone)]
pub struct ArchiveToc {
    /// Bytes of an int's magnitude in its blocks.
    pub int_size: usize,
    /// The client encoding of its data (its ENCODING entry).
    pub encoding: Option<String>,
    /// Its entries, by dump id.
    pub entries: Vec<ArchiveEntry>,
}

/// Reads the table of contents at the head of `toc`.
pub fn archive_toc(toc: &[u8]) -> std::result::Result<ArchiveToc, String> {
    match parse_header_and_toc(toc) {
        Parse::NeedMore => Err("the archive's table of contents is cut short".into()),
        Parse::Bad(e) => Err(e),
        Parse::Done((header, entries, _), _) => {
            let encoding = entries.values().find_map(|e| e.encoding.clone());
            let mut entries: Vec<ArchiveEntry> = entries
                .into_iter()
                .map(|(id, e)| ArchiveEntry {
                    id,
                    desc: e.desc,
                    section: e.section,
                    namespace: e.namespace,
                    tag: e.tag,
                    deps: e.deps,
                    statement: e.statement,
                })
                .collect();
            entries.sort_by_key(|e| e.id);
            Ok(ArchiveToc {
                int_size: header.int_size,
                encoding,
                entries,
            })
        }
    }
}

/// Reads one data block of a custom-format archive from `r`, which starts at its type byte:
/// checks that it is the data of entry `id`, and hands its data to `each` in pieces of about
/// [`DATA_BATCH`] bytes. Returns the bytes of data. The chunks are small (pg_dump writes one per
/// row), so they are copied straight out of `r`'s buffer: a read call per chunk cost a restore
/// more CPU than decrypting and decompressing the dump.
pub fn read_data_block(
    r: &mut impl std::io::BufRead,
    int_size: usize,
    id: i64,
    mut each: impl FnMut(Vec<u8>) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let width = 1 + int_size;
    let int = |r: &mut dyn std::io::BufRead| -> std::io::Result<i64> {
        let decode = |buf: &[u8]| {
            Cursor {
                buf,
                pos: 0,
                int_size,
            }
            .int()
            .ok_or_else(|| bad("a short int".into()))
        };
        // Straight from the buffer when it holds the whole int (nearly always).
        let buf = r.fill_buf()?;
        if buf.len() >= width {
            let v = decode(&buf[..width]);
            r.consume(width);
            return v;
        }
        let mut b = [0u8; 9];
        r.read_exact(&mut b[..width])?;
        decode(&b[..width])
    };
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind)?;
    let found = int(r)?;
    if kind[0] != BLK_DATA || found != id {
        return Err(bad(format!(
            "expected the data block of entry {id}, found block type {} of entry {found}",
            kind[0]
        )));
    }
    let mut total = 0u64;
    let mut batch = Vec::with_capacity(DATA_BATCH);
    loop {
        let len = int(r)?;
        if len == 0 {
            if !batch.is_empty() {
                each(batch)?;
            }
            return Ok(total);
        }
        let len = usize::try_from(len)
            .map_err(|_| bad(format!("a data chunk of {len} bytes in entry {id}")))?;
        // A full batch goes before a chunk that would not fit (no reallocation).
        if !batch.is_empty() && batch.len() + len > DATA_BATCH {
            each(std::mem::replace(
                &mut batch,
                Vec::with_capacity(DATA_BATCH),
            ))?;
        }
        let mut left = len;
        while left > 0 {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let n = buf.len().min(left);
            batch.extend_from_slice(&buf[..n]);
            r.consume(n);
            left -= n;
        }
        total += len as u64;
    }
}

/// Data handed on at once by [`read_data_block`].
pub const DATA_BATCH: usize = 256 << 10;

/// An extension a dump creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveExtension {
    /// Its name.
    pub name: String,
    /// The schema it is created in.
    pub schema: Option<String>,
}

/// The extensions a custom-format archive creates, read from its table of contents at the head
/// of `head`; `None` while `head` is too short to hold the whole TOC.
pub fn archive_extensions(
    head: &[u8],
) -> Option<std::result::Result<Vec<ArchiveExtension>, String>> {
    match parse_header_and_toc(head) {
        Parse::NeedMore => None,
        Parse::Bad(e) => Some(Err(e)),
        Parse::Done((_, toc, _), _) => {
            let mut out: Vec<ArchiveExtension> = toc
                .into_values()
                .filter(|e| e.desc == "EXTENSION")
                .map(|e| ArchiveExtension {
                    name: e.tag,
                    schema: e.extension_schema,
                })
                .collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Some(Ok(out))
        }
    }
}

/// `COPY public.t (a, b) FROM stdin;` → `public.t (a, b)`.
fn copy_target(stmt: &str) -> Option<String> {
    let rest = stmt.trim().strip_prefix("COPY ")?;
    let target = rest.strip_suffix(" FROM stdin;")?;
    (!target.is_empty()).then(|| target.to_string())
}

/// Parses `SELECT pg_catalog.setval('public.s', 42, true);`.
fn parse_setval(defn: &str) -> Option<SequenceValue> {
    let args = defn.split_once("setval(")?.1;
    let (name, rest) = args.strip_prefix('\'')?.split_once("',")?;
    let mut parts = rest.split(',');
    let value = parts.next()?.trim().parse().ok()?;
    let is_called = parts.next()?.trim().trim_end_matches([')', ';']).trim() == "true";
    Some(SequenceValue {
        name: name.replace("''", "'"),
        value,
        is_called,
    })
}

impl DumpFingerprinter {
    /// A fingerprinter recording `mode` detail.
    pub fn new(mode: FingerprintMode) -> Self {
        DumpFingerprinter {
            mode,
            state: State::Toc,
            pending: Vec::new(),
            next_attempt: 0,
            header: None,
            toc: HashMap::new(),
            tables: BTreeMap::new(),
            current: None,
            seen: 0,
            block_at: 0,
            starts: Vec::new(),
            toc_end: None,
            sequences: Vec::new(),
            blobs: LargeObjectHasher::default(),
            error: None,
        }
    }

    fn fail(&mut self, why: String) {
        tracing::debug!(error = %why, "Cannot fingerprint the dump stream");
        self.error = Some(why);
        self.state = State::Failed;
        self.pending = Vec::new();
    }

    fn int_len(&self) -> usize {
        1 + self.header.map(|h| h.int_size).unwrap_or(4)
    }

    /// Takes a fixed-size int from `pending` + `data`, consuming from `data` as needed.
    fn take_int(&mut self, data: &mut &[u8]) -> Option<i64> {
        let need = self.int_len();
        let take = (need - self.pending.len()).min(data.len());
        self.pending.extend_from_slice(&data[..take]);
        *data = &data[take..];
        if self.pending.len() < need {
            return None;
        }
        let mut c = Cursor {
            buf: &self.pending,
            pos: 0,
            int_size: need - 1,
        };
        let v = c.int();
        self.pending.clear();
        v
    }

    fn table_rows(&mut self, chunk: &[u8]) {
        if let Some(key) = &self.current {
            if let Some(t) = self.tables.get_mut(key) {
                t.rows.feed(chunk);
            }
        }
    }

    fn step(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Failed => return,
                State::Toc => {
                    self.pending.extend_from_slice(data);
                    if self.pending.len() < self.next_attempt {
                        return;
                    }
                    match parse_header_and_toc(&self.pending) {
                        Parse::NeedMore => {
                            self.next_attempt =
                                self.pending.len() + (self.pending.len() / 4).max(64 << 10);
                            return;
                        }
                        Parse::Bad(why) => return self.fail(why),
                        Parse::Done((header, toc, sequences), used) => {
                            // `pending` holds the stream from its first byte.
                            self.toc_end = Some(used as u64);
                            self.header = Some(header);
                            self.toc = toc;
                            self.sequences = sequences;
                            let rest = self.pending.split_off(used);
                            self.pending.clear();
                            self.state = State::Block;
                            self.step(&rest);
                            return;
                        }
                    }
                }
                State::Block => {
                    if self.pending.is_empty() {
                        // `data` is always the stream's latest bytes.
                        self.block_at = self.seen - data.len() as u64;
                        self.starts.push(self.block_at);
                    }
                    let need = 1 + self.int_len();
                    let take = (need - self.pending.len()).min(data.len());
                    self.pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.pending.len() < need {
                        return;
                    }
                    let kind = self.pending[0];
                    let mut c = Cursor {
                        buf: &self.pending[1..],
                        pos: 0,
                        int_size: need - 2,
                    };
                    let dump_id = c.int().unwrap_or(0);
                    self.pending.clear();
                    match kind {
                        BLK_DATA => {
                            let entry = self.toc.get(&dump_id).cloned();
                            if let Some(e) = entry.filter(|e| e.desc == "TABLE DATA") {
                                let key = (e.namespace, e.tag);
                                let copy = copy_target(&e.copy);
                                let full = self.mode == FingerprintMode::Full;
                                let at = self.block_at;
                                let t =
                                    self.tables
                                        .entry(key.clone())
                                        .or_insert_with(|| DumpedTable {
                                            copy,
                                            rows: RowHasher::new(full),
                                            block: None,
                                        });
                                t.block.get_or_insert([at, 0]);
                                self.current = Some(key);
                            }
                            self.state = State::ChunkLen { dump_id };
                        }
                        BLK_BLOBS => self.state = State::BlobOid,
                        other => return self.fail(format!("unknown block type {other}")),
                    }
                }
                State::ChunkLen { dump_id } => {
                    let Some(len) = self.take_int(&mut data) else {
                        return;
                    };
                    if len < 0 {
                        return self.fail(format!("negative chunk length in block {dump_id}"));
                    }
                    if len == 0 {
                        let end = self.seen - data.len() as u64;
                        let at = self.block_at;
                        if let Some(t) = self.current.take().and_then(|k| self.tables.get_mut(&k)) {
                            if let Some(b) = t.block.as_mut().filter(|b| b[0] == at) {
                                b[1] = end - at;
                            }
                        }
                        self.state = State::Block;
                    } else {
                        self.state = State::Chunk {
                            dump_id,
                            remaining: len as usize,
                        };
                    }
                }
                State::Chunk { dump_id, remaining } => {
                    let n = remaining.min(data.len());
                    let (chunk, rest) = data.split_at(n);
                    self.table_rows(chunk);
                    data = rest;
                    self.state = if n == remaining {
                        State::ChunkLen { dump_id }
                    } else {
                        State::Chunk {
                            dump_id,
                            remaining: remaining - n,
                        }
                    };
                }
                State::BlobOid => {
                    let Some(oid) = self.take_int(&mut data) else {
                        return;
                    };
                    if oid == 0 {
                        self.state = State::Block;
                    } else {
                        self.blobs.start(oid);
                        self.state = State::BlobChunkLen { oid };
                    }
                }
                State::BlobChunkLen { oid } => {
                    let Some(len) = self.take_int(&mut data) else {
                        return;
                    };
                    if len < 0 {
                        return self.fail(format!("negative chunk length in large object {oid}"));
                    }
                    if len == 0 {
                        self.blobs.end();
                        self.state = State::BlobOid;
                    } else {
                        self.state = State::BlobChunk {
                            oid,
                            remaining: len as usize,
                        };
                    }
                }
                State::BlobChunk { oid, remaining } => {
                    let n = remaining.min(data.len());
                    self.blobs.feed(&data[..n]);
                    data = &data[n..];
                    self.state = if n == remaining {
                        State::BlobChunkLen { oid }
                    } else {
                        State::BlobChunk {
                            oid,
                            remaining: remaining - n,
                        }
                    };
                }
            }
        }
    }

    /// The summary of everything seen.
    pub fn finish(mut self) -> DumpSummary {
        let mut error = self.error.take();
        if matches!(self.state, State::Toc) && !self.pending.is_empty() {
            // The last bytes may have arrived below the re-parse threshold.
            let rest = std::mem::take(&mut self.pending);
            self.next_attempt = 0;
            self.step(&rest);
        }
        let complete = matches!(self.state, State::Block) && self.pending.is_empty();
        if error.is_none() && !complete {
            error = Some(format!("the dump stream ended inside {:?}", self.state));
        }
        let full = self.mode == FingerprintMode::Full;
        let blobs = self.blobs.finish();
        let mut sequences = self.sequences;
        sequences.sort_by(|a, b| a.name.cmp(&b.name));
        DumpSummary {
            archive_version: self
                .header
                .map(|h| format!("{}.{}", h.version.0, h.version.1))
                .unwrap_or_default(),
            tables: self
                .tables
                .into_iter()
                .map(|((schema, name), t)| {
                    let (rows, hash) = t.rows.finish();
                    TableData {
                        schema,
                        name,
                        copy: t.copy,
                        rows,
                        hash,
                        block: t.block,
                    }
                })
                .collect(),
            sequences,
            large_objects: blobs.0,
            large_objects_hash: full.then_some(blobs.1),
            error,
            toc_end: self.toc_end,
        }
    }
}

impl Observer for DumpFingerprinter {
    fn observe(&mut self, chunk: &[u8]) {
        self.seen += chunk.len() as u64;
        self.step(chunk);
    }

    /// Every block's start, when found in the chunk that holds it (one found with a later chunk,
    /// such as one right after a TOC parsed late, is passed over): a restore reads a table's data
    /// from there.
    fn frame_starts(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.starts);
    }
}

/// The content hash of rows given as COPY text lines (without their newlines): what the verifier
/// computes from `COPY … TO STDOUT` to compare with [`TableData::hash`].
pub fn rows_hash<'a>(rows: impl IntoIterator<Item = &'a [u8]>) -> String {
    let sum = rows
        .into_iter()
        .fold(0u128, |acc, r| acc.wrapping_add(xxh3_128(r)));
    format!("{sum:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setval_lines_parse() {
        let s = parse_setval("SELECT pg_catalog.setval('public.\"Odd''s\"', 42, true);\n").unwrap();
        assert_eq!(s.name, "public.\"Odd's\"");
        assert_eq!((s.value, s.is_called), (42, true));
        let s = parse_setval("SELECT pg_catalog.setval('s', 1, false);").unwrap();
        assert!(!s.is_called);
    }

    #[test]
    fn garbage_sets_an_error_and_never_panics() {
        let mut f = DumpFingerprinter::new(FingerprintMode::Full);
        f.observe(b"not a dump at all, just text");
        let s = f.finish();
        assert!(s.error.unwrap().contains("PGDMP"));
        let mut f = DumpFingerprinter::new(FingerprintMode::Full);
        f.observe(b"PGD");
        assert!(f.finish().error.is_some(), "a truncated stream is reported");
    }

    /// Builds a minimal custom-format archive (version 1.14, 4-byte ints, 8-byte offsets).
    struct Archive(Vec<u8>);
    impl Archive {
        fn int(&mut self, v: i64) {
            self.0.push(u8::from(v < 0));
            self.0
                .extend_from_slice(&(v.unsigned_abs() as u32).to_le_bytes());
        }
        fn str(&mut self, s: Option<&str>) {
            match s {
                None => self.int(-1),
                Some(s) => {
                    self.int(s.len() as i64);
                    self.0.extend_from_slice(s.as_bytes());
                }
            }
        }
        fn entry(&mut self, id: i64, tag: &str, desc: &str, ns: &str, defn: &str, copy: &str) {
            self.int(id);
            self.int(1);
            self.str(Some("0"));
            self.str(Some("0"));
            self.str(Some(tag));
            self.str(Some(desc));
            self.int(2);
            self.str(Some(defn));
            self.str(Some(""));
            self.str(Some(copy));
            self.str(Some(ns));
            self.str(Some(""));
            self.str(Some("heap"));
            self.str(Some("postgres"));
            self.str(Some("false"));
            self.str(Some("1"));
            self.str(None);
            self.0.push(1);
            self.0.extend_from_slice(&[0; 8]);
        }
        fn data(&mut self, id: i64, chunks: &[&[u8]]) {
            self.0.push(BLK_DATA);
            self.int(id);
            for c in chunks {
                self.int(c.len() as i64);
                self.0.extend_from_slice(c);
            }
            self.int(0);
        }
    }

    fn archive() -> Vec<u8> {
        let mut a = Archive(b"PGDMP".to_vec());
        a.0.extend_from_slice(&[1, 14, 0, 4, 8, 1]);
        a.int(0); // compression
        for _ in 0..7 {
            a.int(1);
        }
        a.str(Some("db"));
        a.str(Some("15.18"));
        a.str(Some("15.18"));
        a.int(3);
        a.entry(
            10,
            "t",
            "TABLE DATA",
            "public",
            "",
            "COPY public.t (a, b) FROM stdin;\n",
        );
        a.entry(11, "Tâble ✓", "TABLE DATA", "Ünï", "", "");
        a.entry(
            12,
            "s",
            "SEQUENCE SET",
            "public",
            "SELECT pg_catalog.setval('public.s', 7, true);\n",
            "",
        );
        a.data(10, &[b"1\tx\n", b"2\t", b"y\n", b"\\N\t\n", b"\\.\n\n\n"]);
        a.data(11, &[b"\n", b"\n", b"\\.\n\n\n"]);
        a.0.push(BLK_BLOBS);
        a.int(13);
        a.int(16400);
        a.int(5);
        a.0.extend_from_slice(b"hello");
        a.int(0);
        a.int(0);
        a.0
    }

    #[test]
    fn extensions_are_read_from_the_toc_alone() {
        let bytes = archive();
        assert_eq!(
            archive_extensions(&bytes[..20]),
            None,
            "the TOC is not all there"
        );
        assert_eq!(archive_extensions(&bytes), Some(Ok(Vec::new())));
        assert!(matches!(
            archive_extensions(b"PGDMX-not-an-archive"),
            Some(Err(_))
        ));
        assert_eq!(
            extension_schema(
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements WITH SCHEMA public;\n"
            ),
            Some("public".into())
        );
        assert_eq!(
            extension_schema("CREATE EXTENSION IF NOT EXISTS x WITH SCHEMA \"My \"\"S\"\"\";"),
            Some("My \"S\"".into())
        );
    }

    #[test]
    fn a_synthetic_archive_parses_at_any_chunk_boundaries() {
        let bytes = archive();
        let mut offered = Vec::new();
        let whole = {
            let mut f = DumpFingerprinter::new(FingerprintMode::Full);
            f.observe(&bytes);
            f.frame_starts(&mut offered);
            f.finish()
        };
        assert_eq!(whole.error, None);
        assert_eq!(whole.archive_version, "1.14");
        let rows: Vec<(&str, u64)> = whole
            .tables
            .iter()
            .map(|t| (t.name.as_str(), t.rows))
            .collect();
        assert_eq!(rows, vec![("t", 3), ("Tâble ✓", 2)]);
        assert_eq!(whole.tables[0].copy.as_deref(), Some("public.t (a, b)"));
        assert_eq!(whole.tables[1].copy, None);
        assert_eq!(
            whole.tables[0].hash.as_deref(),
            Some(rows_hash([&b"1\tx"[..], b"2\ty", b"\\N\t"]).as_str())
        );
        assert_eq!(
            whole.tables[1].hash.as_deref(),
            Some(rows_hash([&b""[..], b""]).as_str())
        );
        assert_eq!(
            whole.sequences,
            vec![SequenceValue {
                name: "public.s".into(),
                value: 7,
                is_called: true
            }]
        );
        assert_eq!(whole.large_objects, 1);
        // Where each table's data lies: from its block's type byte past its last, empty chunk.
        let toc_end = whole.toc_end.unwrap();
        let [t_at, t_len] = whole.tables[0].block.unwrap();
        let [u_at, u_len] = whole.tables[1].block.unwrap();
        assert_eq!(t_at, toc_end, "the first block follows the TOC");
        assert_eq!(bytes[t_at as usize], BLK_DATA);
        assert_eq!(u_at, t_at + t_len);
        assert_eq!(bytes[u_at as usize], BLK_DATA);
        let blobs_at = u_at + u_len;
        assert_eq!(bytes[blobs_at as usize], BLK_BLOBS);
        assert_eq!(offered, vec![t_at, u_at, blobs_at], "every block's start");
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..300 {
            let mut f = DumpFingerprinter::new(FingerprintMode::Full);
            let mut rest = &bytes[..];
            let mut starts = Vec::new();
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(40));
                let at = (bytes.len() - rest.len()) as u64;
                f.observe(&rest[..n]);
                let before = starts.len();
                f.frame_starts(&mut starts);
                assert!(
                    starts[before..]
                        .iter()
                        .all(|s| (at..at + n as u64).contains(s)),
                    "a start is offered with the chunk that holds it"
                );
                rest = &rest[n..];
            }
            // A block found late (the TOC is parsed once enough of it is in) is not offered.
            assert!(starts.iter().all(|s| offered.contains(s)), "{starts:?}");
            assert_eq!(f.finish(), whole);
        }
    }

    #[test]
    fn truncated_or_corrupted_archives_never_panic() {
        use rand::Rng;
        let bytes = archive();
        let mut rng = rand::rng();
        // A cut between blocks looks like a shorter archive (pg_dump's exit status catches
        // those); every cut inside the header, the TOC or a block is reported.
        let clean_cuts = (0..bytes.len())
            .filter(|&cut| {
                let mut f = DumpFingerprinter::new(FingerprintMode::Full);
                f.observe(&bytes[..cut]);
                f.finish().error.is_none()
            })
            .count();
        assert_eq!(
            clean_cuts, 3,
            "only the three block boundaries look complete"
        );
        for _ in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            let mut f = DumpFingerprinter::new(FingerprintMode::Counts);
            f.observe(&b);
            let _ = f.finish();
        }
    }

    #[test]
    fn rows_stream_through_the_hasher_at_any_chunk_boundaries() {
        let big = vec![b'x'; 300_000];
        let mut text = b"1\ta\n\n".to_vec();
        text.extend_from_slice(&big);
        text.extend_from_slice(b"\n\\.\nafter the end\n");
        let want = rows_hash([&b"1\ta"[..], b"", &big]);
        for size in [1, 2, 3, 7, 4096, 1 << 20] {
            let mut h = RowHasher::new(true);
            for chunk in text.chunks(size) {
                h.feed(chunk);
            }
            assert_eq!(h.finish(), (3, Some(want.clone())), "chunks of {size}");
        }
        // A last row without its newline counts; a row that only starts like `\.` is a row.
        let mut h = RowHasher::new(true);
        h.feed(b"\\.x\nlast");
        assert_eq!(h.finish(), (2, Some(rows_hash([&b"\\.x"[..], b"last"]))));
    }

    #[test]
    fn rows_hash_is_order_independent() {
        let a = rows_hash([&b"1\tx"[..], b"2\ty", b""]);
        let b = rows_hash([&b""[..], b"2\ty", b"1\tx"]);
        assert_eq!(a, b);
        assert_ne!(a, rows_hash([&b"1\tx"[..], b"2\ty"]));
    }

    #[test]
    fn pieces_of_a_table_add_up_to_the_whole() {
        let rows = [&b"1\tx"[..], b"2\ty", b"", b"3\tz"];
        let mut whole = RowHasher::new(true);
        whole.feed(b"1\tx\n2\ty\n\n3\tz\n");
        let mut sum = RowHasher::new(true);
        let (mut a, mut b) = (RowHasher::new(true), RowHasher::new(true));
        a.feed(b"2\ty\n\n");
        b.feed(b"3\tz\n1\tx"); // its last row without a newline
        sum.add(a);
        sum.add(b);
        let want = (4, Some(rows_hash(rows)));
        assert_eq!(whole.finish(), want);
        assert_eq!(sum.finish(), want);
    }

    #[test]
    fn a_data_block_is_read_whole_in_batches_whatever_the_buffer_cuts() {
        // Chunks of a row each, one larger than a batch, then the end marker and what follows.
        let rows: Vec<Vec<u8>> = (0..3000)
            .map(|i| format!("{i}\trow {i}\n").into_bytes())
            .chain([vec![b'x'; DATA_BATCH + 5]])
            .collect();
        let mut a = Archive(vec![BLK_DATA]);
        a.int(7);
        for r in &rows {
            a.int(r.len() as i64);
            a.0.extend_from_slice(r);
        }
        a.int(0);
        a.0.extend_from_slice(b"next block");
        let want: Vec<u8> = rows.concat();
        for capacity in [7, 4096, 1 << 20] {
            let mut r = std::io::BufReader::with_capacity(capacity, &a.0[..]);
            let mut got = Vec::new();
            let mut pieces = Vec::new();
            let n = read_data_block(&mut r, 4, 7, |b| {
                pieces.push(b.len());
                got.extend_from_slice(&b);
                Ok(())
            })
            .unwrap();
            assert_eq!(n, want.len() as u64, "buffer of {capacity}");
            assert!(got == want, "buffer of {capacity}");
            assert!(pieces[..pieces.len() - 1].iter().all(|&p| p <= DATA_BATCH));
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut r, &mut rest).unwrap();
            assert_eq!(rest, "next block", "stops at its end");
        }
        // Another entry's block, and a block cut short, are errors.
        let mut r = &a.0[..];
        assert!(read_data_block(&mut r, 4, 8, |_| Ok(())).is_err());
        let mut r = &a.0[..a.0.len() / 2];
        let cut = read_data_block(&mut r, 4, 7, |_| Ok(())).unwrap_err();
        assert_eq!(cut.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
