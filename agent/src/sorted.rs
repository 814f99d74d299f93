//! Sets too large to hold (blob ids, hashed paths): sorted runs on a temp disk.
//!
//! What must hold:
//! - Memory is bounded whatever the number of ids: [`Sorter`] keeps one run of [`RUN_BYTES`]
//!   (128Ki ids) and writes each full run sorted to an unlinked temp file; [`Sorter::merged`] reads
//!   them back merged, each id once, in order. Records of other fixed sizes sort the same way.
//! - [`SortedFile`] holds ids already sorted (a stored blob list) in one temp file, and answers
//!   membership by binary search: ~24 reads of 32 bytes at 10 M ids, from the page cache.
//! - [`Cursor`] answers membership for ids asked in order by merging with a sorted stream: one
//!   pass, no lookups.
//! - [`Table`] remembers records by a uniformly random key (a blob id) in any order, for
//!   lookups while they still come: a hash table of 4 KiB buckets in a temp file, read one
//!   bucket at a time, doubling as it fills, up to [`TABLE_BYTES`] (3.3 M records of 80
//!   bytes), with a filter in memory that spares most reads for a key it does not hold. Past
//!   that size, a record added to a full bucket replaces one of its oldest: the table forgets,
//!   and never answers wrongly.
//! - Temp files are unlinked from the start (the kernel frees them when the run ends, however
//!   it ends): 32 bytes per id, in `TMPDIR`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;

/// A blob id, raw.
pub type Id = [u8; 32];

/// Records sorted in memory before a run is written.
const RUN_BYTES: usize = 4 << 20;

/// Collects ids (or other records of `N` bytes, sorted by their bytes) in any order, with
/// repeats.
pub struct Sorter<const N: usize = 32> {
    run: Vec<[u8; N]>,
    runs: Vec<File>,
}

impl<const N: usize> Default for Sorter<N> {
    fn default() -> Self {
        Sorter {
            run: Vec::new(),
            runs: Vec::new(),
        }
    }
}

impl<const N: usize> Sorter<N> {
    /// Adds `id`.
    pub fn push(&mut self, id: [u8; N]) -> io::Result<()> {
        if self.run.len() == self.run.capacity() {
            // Doubling, but to a run's size at most: not a power of two past it.
            let want = (self.run.capacity() * 2).clamp(64, RUN_BYTES.div_ceil(N));
            self.run.reserve_exact(want - self.run.len());
        }
        self.run.push(id);
        if self.run.len() * N >= RUN_BYTES {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        self.run.sort_unstable();
        self.run.dedup();
        let mut w = BufWriter::with_capacity(64 << 10, tempfile::tempfile()?);
        for id in &self.run {
            w.write_all(id)?;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        self.runs.push(f);
        self.run.clear();
        Ok(())
    }

    /// Every id pushed, once each, in order.
    pub fn merged(mut self) -> io::Result<Merged<N>> {
        self.run.sort_unstable();
        self.run.dedup();
        let mut heads = Vec::with_capacity(self.runs.len() + 1);
        for f in self.runs {
            let mut r = RunReader::File(BufReader::with_capacity(64 << 10, reopen(f)?));
            if let Some(id) = r.next()? {
                heads.push((id, r));
            }
        }
        let mut memory = RunReader::Memory(std::mem::take(&mut self.run).into_iter());
        if let Some(id) = memory.next()? {
            heads.push((id, memory));
        }
        Ok(Merged { heads, last: None })
    }
}

impl Sorter {
    /// Every id pushed, once each, in a [`SortedFile`] for lookups.
    pub fn into_file(self) -> io::Result<SortedFile> {
        let mut file = SortedWriter::new()?;
        for id in self.merged()? {
            file.push(id?)?;
        }
        file.finish()
    }
}

/// A spilled run, read from its start.
fn reopen(mut f: File) -> io::Result<File> {
    use std::io::Seek;
    f.rewind()?;
    Ok(f)
}

enum RunReader<const N: usize> {
    File(BufReader<File>),
    Memory(std::vec::IntoIter<[u8; N]>),
}

impl<const N: usize> RunReader<N> {
    fn next(&mut self) -> io::Result<Option<[u8; N]>> {
        match self {
            RunReader::Memory(it) => Ok(it.next()),
            RunReader::File(r) => read_id(r),
        }
    }
}

/// The next id of a stream of raw ids, `None` at its end.
fn read_id<const N: usize>(r: &mut impl Read) -> io::Result<Option<[u8; N]>> {
    let mut id = [0u8; N];
    match r.read_exact(&mut id) {
        Ok(()) => Ok(Some(id)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The merge of sorted runs: each id once, in order. A handful of runs per million ids, so a
/// linear scan for the least head costs less than a heap would save.
pub struct Merged<const N: usize = 32> {
    heads: Vec<([u8; N], RunReader<N>)>,
    last: Option<[u8; N]>,
}

impl<const N: usize> Iterator for Merged<N> {
    type Item = io::Result<[u8; N]>;

    fn next(&mut self) -> Option<io::Result<[u8; N]>> {
        loop {
            let (i, _) = self
                .heads
                .iter()
                .enumerate()
                .min_by(|a, b| a.1 .0.cmp(&b.1 .0))?;
            let id = self.heads[i].0;
            match self.heads[i].1.next() {
                Ok(Some(next)) => self.heads[i].0 = next,
                Ok(None) => {
                    self.heads.swap_remove(i);
                }
                Err(e) => return Some(Err(e)),
            }
            if self.last != Some(id) {
                self.last = Some(id);
                return Some(Ok(id));
            }
        }
    }
}

/// Answers, for ids asked in increasing order, whether a sorted stream of ids holds each: a
/// merge in one pass, with nothing held but the stream's head. Counts the ids of the stream
/// never asked for.
pub struct Cursor<I> {
    it: I,
    head: Option<Id>,
    unasked: u64,
}

impl<I: Iterator<Item = io::Result<Id>>> Cursor<I> {
    /// A cursor at the start of `it`, which yields ids in increasing order.
    pub fn new(mut it: I) -> io::Result<Self> {
        let head = it.next().transpose()?;
        Ok(Cursor {
            it,
            head,
            unasked: 0,
        })
    }

    /// Whether the stream holds `id`, which must sort after every id asked before.
    pub fn holds(&mut self, id: &Id) -> io::Result<bool> {
        while let Some(head) = self.head {
            if head > *id {
                return Ok(false);
            }
            if head < *id {
                self.unasked += 1;
            }
            self.head = self.it.next().transpose()?;
            if head == *id {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// How many ids of the stream were never asked for, reading it to its end.
    pub fn finish(mut self) -> io::Result<u64> {
        while self.head.is_some() {
            self.unasked += 1;
            self.head = self.it.next().transpose()?;
        }
        Ok(self.unasked)
    }
}

/// The union of the ids of a sorted file and ids added in increasing order, written to a new
/// sorted file: a set that grows backup by backup, on the temp disk, each id once.
pub struct Union {
    earlier: Box<dyn Iterator<Item = io::Result<Id>> + Send>,
    head: Option<Id>,
    out: SortedWriter,
}

impl Union {
    /// A union that starts from `earlier`'s ids (none without it).
    pub fn new(earlier: Option<&SortedFile>) -> io::Result<Union> {
        let mut earlier: Box<dyn Iterator<Item = io::Result<Id>> + Send> = match earlier {
            Some(f) => Box::new(f.iter()?),
            None => Box::new(std::iter::empty()),
        };
        let head = earlier.next().transpose()?;
        Ok(Union {
            earlier,
            head,
            out: SortedWriter::new()?,
        })
    }

    /// Adds `id`, which must sort after every id added before; whether it is new (not one of
    /// the earlier ids).
    pub fn add(&mut self, id: Id) -> io::Result<bool> {
        while let Some(head) = self.head.filter(|h| *h <= id) {
            self.head = self.earlier.next().transpose()?;
            if head == id {
                self.out.push(id)?;
                return Ok(false);
            }
            self.out.push(head)?;
        }
        self.out.push(id)?;
        Ok(true)
    }

    /// The union, sorted.
    pub fn finish(mut self) -> io::Result<SortedFile> {
        while let Some(head) = self.head {
            self.out.push(head)?;
            self.head = self.earlier.next().transpose()?;
        }
        self.out.finish()
    }
}

/// Sorted ids (or records of `N` bytes, sorted by their bytes) in a temp file, for lookups.
pub struct SortedFile<const N: usize = 32> {
    file: File,
    len: u64,
}

/// Writes a [`SortedFile`], one id at a time.
pub struct SortedWriter<const N: usize = 32> {
    w: BufWriter<File>,
    len: u64,
    last: Option<[u8; N]>,
}

impl<const N: usize> SortedWriter<N> {
    /// An empty one, in a new temp file.
    pub fn new() -> io::Result<SortedWriter<N>> {
        Ok(SortedWriter {
            w: BufWriter::with_capacity(64 << 10, tempfile::tempfile()?),
            len: 0,
            last: None,
        })
    }

    /// Adds `id`, which must sort after the last one.
    pub fn push(&mut self, id: [u8; N]) -> io::Result<()> {
        if self.last.is_some_and(|l| l >= id) {
            return Err(io::Error::other("ids are not sorted"));
        }
        self.w.write_all(&id)?;
        self.last = Some(id);
        self.len += 1;
        Ok(())
    }

    /// The file, ready for lookups.
    pub fn finish(self) -> io::Result<SortedFile<N>> {
        let file = self.w.into_inner().map_err(|e| e.into_error())?;
        Ok(SortedFile {
            file,
            len: self.len,
        })
    }
}

impl<const N: usize> SortedFile<N> {
    /// Its ids, in order.
    pub fn iter(&self) -> io::Result<impl Iterator<Item = io::Result<[u8; N]>>> {
        use std::io::Seek;
        let mut f = self.file.try_clone()?;
        f.rewind()?;
        let mut r = BufReader::with_capacity(64 << 10, f);
        Ok(std::iter::from_fn(move || read_id(&mut r).transpose()))
    }

    /// The first record that starts with `key`, by binary search.
    pub fn find(&self, key: &[u8]) -> io::Result<Option<[u8; N]>> {
        let (mut lo, mut hi) = (0u64, self.len);
        let mut at = [0u8; N];
        let n = key.len().min(N);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            self.file.read_exact_at(&mut at, mid * N as u64)?;
            match at[..n].cmp(&key[..n]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                _ => hi = mid,
            }
        }
        if lo == self.len {
            return Ok(None);
        }
        self.file.read_exact_at(&mut at, lo * N as u64)?;
        Ok((at[..n] == key[..n]).then_some(at))
    }

    /// Whether `id` is among them.
    pub fn contains(&self, id: &[u8; N]) -> io::Result<bool> {
        Ok(self.find(id)?.is_some())
    }
}

/// Bytes of one bucket of a [`Table`]: its records, then a count of the records it forgot.
const PAGE: usize = 4096;

/// The most a [`Table`] grows to on the temp disk.
pub const TABLE_BYTES: u64 = 256 << 20;

/// Bits of a [`Table`]'s filter per bucket: 13 or more per record held, so that 1 key in 100
/// it does not hold is read for.
const FILTER_WORDS: usize = 8;

/// Records of `N` bytes, looked up by their first 32 (a uniformly random key, never all
/// zeros), in a hash table on the temp disk. In memory: a byte per bucket (its records) and a
/// filter of 64 bytes per bucket that answers most lookups of a key it does not hold without a
/// read (2 MiB at a million records).
pub struct Table<const N: usize> {
    /// Created with the first record.
    file: Option<File>,
    buckets: u64,
    used: Vec<u8>,
    filter: Vec<u64>,
    len: u64,
    forgotten: u64,
}

impl<const N: usize> Default for Table<N> {
    fn default() -> Self {
        Self::with_buckets(16)
    }
}

impl<const N: usize> Table<N> {
    const SLOTS: usize = (PAGE - 8) / N;

    fn with_buckets(buckets: u64) -> Self {
        Table {
            file: None,
            buckets,
            used: vec![0; buckets as usize],
            filter: vec![0; buckets as usize * FILTER_WORDS],
            len: 0,
            forgotten: 0,
        }
    }

    /// The bucket of `key` among `buckets` (a power of two): its leading bits, so that
    /// doubling splits bucket `b` into `2b` and `2b + 1`.
    fn bucket(key: &[u8], buckets: u64) -> u64 {
        let lead = u64::from_be_bytes(key[..8].try_into().unwrap_or_default());
        lead >> (64 - buckets.trailing_zeros())
    }

    /// The filter's bits for `key`: from its bytes past those that choose the bucket.
    fn bits(key: &[u8], filter: &[u64]) -> [usize; 3] {
        let mask = filter.len() * 64 - 1;
        let at = |i: usize| {
            u64::from_be_bytes(key[i..i + 8].try_into().unwrap_or_default()) as usize & mask
        };
        [at(8), at(16), at(24)]
    }

    fn mark(key: &[u8], filter: &mut [u64]) {
        for b in Self::bits(key, filter) {
            filter[b / 64] |= 1 << (b % 64);
        }
    }

    fn maybe(&self, key: &[u8]) -> bool {
        Self::bits(key, &self.filter)
            .iter()
            .all(|&b| self.filter[b / 64] & (1 << (b % 64)) != 0)
    }

    /// The first `n` records of bucket `b`.
    fn read_bucket(file: &File, b: u64, n: usize) -> io::Result<[u8; PAGE]> {
        let mut page = [0u8; PAGE];
        file.read_exact_at(&mut page[..n * N], b * PAGE as u64)?;
        Ok(page)
    }

    fn slot(page: &[u8; PAGE], i: usize) -> &[u8] {
        &page[i * N..(i + 1) * N]
    }

    /// Where in bucket `b` (of `used` records) the record with `key` is, if there.
    fn find(&self, file: &File, b: u64, key: &[u8]) -> io::Result<Option<(usize, [u8; PAGE])>> {
        if !self.maybe(key) {
            return Ok(None);
        }
        let used = self.used[b as usize] as usize;
        let page = Self::read_bucket(file, b, used)?;
        Ok((0..used)
            .find(|&i| Self::slot(&page, i)[..32] == key[..32])
            .map(|i| (i, page)))
    }

    /// The record whose key is `key`, if the table holds it.
    pub fn get(&self, key: &[u8; 32]) -> io::Result<Option<[u8; N]>> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let found = self.find(file, Self::bucket(key, self.buckets), key)?;
        Ok(found.and_then(|(i, page)| Self::slot(&page, i).try_into().ok()))
    }

    /// Adds `record`, or replaces the one with its key.
    pub fn insert(&mut self, record: [u8; N]) -> io::Result<()> {
        if self.file.is_none() {
            let f = tempfile::tempfile()?;
            f.set_len(self.buckets * PAGE as u64)?;
            self.file = Some(f);
        }
        loop {
            // Growing replaces the file, so it is taken again each time round.
            let file = self
                .file
                .as_ref()
                .ok_or_else(|| io::Error::other("the table has no file"))?;
            let b = Self::bucket(&record, self.buckets);
            let at = |i: usize| b * PAGE as u64 + (i * N) as u64;
            if let Some((i, _)) = self.find(file, b, &record)? {
                return file.write_all_at(&record, at(i));
            }
            let used = self.used[b as usize] as usize;
            let filling =
                used == Self::SLOTS || self.len >= self.buckets * Self::SLOTS as u64 * 3 / 4;
            if filling && self.buckets * (PAGE as u64) < TABLE_BYTES {
                self.grow()?;
                continue;
            }
            if used < Self::SLOTS {
                file.write_all_at(&record, at(used))?;
                self.used[b as usize] += 1;
                self.len += 1;
            } else {
                // Full for good: its oldest record goes, in turn.
                let mut count = [0u8; 8];
                file.read_exact_at(&mut count, at(0) + (PAGE - 8) as u64)?;
                let forgot = u64::from_be_bytes(count);
                file.write_all_at(&(forgot + 1).to_be_bytes(), at(0) + (PAGE - 8) as u64)?;
                file.write_all_at(&record, at(forgot as usize % Self::SLOTS))?;
                self.forgotten += 1;
            }
            Self::mark(&record, &mut self.filter);
            return Ok(());
        }
    }

    /// Twice the buckets: each bucket's records split between its two successors, in a new
    /// file, and the filter made again for them.
    fn grow(&mut self) -> io::Result<()> {
        let Some(old) = &self.file else {
            return Ok(());
        };
        let mut next = Self::with_buckets(self.buckets * 2);
        let new = tempfile::tempfile()?;
        new.set_len(next.buckets * PAGE as u64)?;
        for b in 0..self.buckets {
            let used = self.used[b as usize] as usize;
            if used == 0 {
                continue;
            }
            let page = Self::read_bucket(old, b, used)?;
            let mut halves = [[0u8; PAGE]; 2];
            for r in (0..used).map(|i| Self::slot(&page, i)) {
                let nb = Self::bucket(r, next.buckets);
                let h = (nb - 2 * b) as usize;
                let n = next.used[nb as usize] as usize;
                halves[h][n * N..(n + 1) * N].copy_from_slice(r);
                next.used[nb as usize] += 1;
                Self::mark(r, &mut next.filter);
            }
            for (h, half) in halves.iter().enumerate() {
                let nb = 2 * b + h as u64;
                let n = next.used[nb as usize] as usize;
                if n > 0 {
                    new.write_all_at(&half[..n * N], nb * PAGE as u64)?;
                }
            }
        }
        next.file = Some(new);
        next.len = self.len;
        *self = next;
        Ok(())
    }

    /// Records held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records it replaced once full.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> Id {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        id[31] = (n % 7) as u8;
        id
    }

    #[test]
    fn runs_merge_into_each_id_once_in_order() {
        let mut s = Sorter::default();
        // Three spilled runs and a partial one, with repeats across runs.
        let n = (RUN_BYTES / 32) as u32 * 3 + 1000;
        for i in 0..n {
            s.push(id((i * 7919) % (n / 2))).unwrap();
        }
        assert_eq!(s.runs.len(), 3);
        let got: Vec<Id> = s.merged().unwrap().map(Result::unwrap).collect();
        let mut want: Vec<Id> = (0..n / 2).map(id).collect();
        want.sort_unstable();
        assert_eq!(got.len(), want.len());
        assert!(got == want);
    }

    #[test]
    fn a_cursor_finds_exactly_the_ids_of_its_stream() {
        let even = (0..5000u32).map(|i| Ok(id(i * 2)));
        let mut c = Cursor::new(even).unwrap();
        let mut asked: Vec<Id> = (0..10_001).map(id).collect();
        asked.sort_unstable();
        for a in &asked {
            let n = u32::from_be_bytes(a[..4].try_into().unwrap());
            assert_eq!(c.holds(a).unwrap(), n % 2 == 0 && n < 10_000, "{n}");
        }
        assert_eq!(c.finish().unwrap(), 0);
        let mut c = Cursor::new((0..100u32).map(|i| Ok(id(i)))).unwrap();
        assert!(c.holds(&id(10)).unwrap() && c.holds(&id(20)).unwrap());
        assert_eq!(c.finish().unwrap(), 98, "the ids never asked for");
        let mut empty = Cursor::new(std::iter::empty()).unwrap();
        assert!(!empty.holds(&id(0)).unwrap());
    }

    #[test]
    fn a_union_holds_each_id_of_both_once_and_says_which_are_new() {
        let mut u = Union::new(None).unwrap();
        for i in 0..1000 {
            assert!(u.add(id(i * 3)).unwrap());
        }
        let earlier = u.finish().unwrap();
        let mut u = Union::new(Some(&earlier)).unwrap();
        let mut added: Vec<Id> = (0..1000).map(|i| id(i * 2)).collect();
        added.sort_unstable();
        for a in &added {
            let n = u32::from_be_bytes(a[..4].try_into().unwrap());
            assert_eq!(u.add(*a).unwrap(), n % 3 != 0, "{n}");
        }
        let got: Vec<Id> = u
            .finish()
            .unwrap()
            .iter()
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut want: Vec<Id> = (0..3000)
            .filter(|n| n % 3 == 0 && *n < 3000 || n % 2 == 0 && *n < 2000)
            .map(id)
            .collect();
        want.sort_unstable();
        assert!(got == want, "{} ids, want {}", got.len(), want.len());
    }

    #[test]
    fn a_sorted_file_finds_exactly_its_ids() {
        let mut w = SortedWriter::new().unwrap();
        for i in 0..5000 {
            w.push(id(i * 2)).unwrap();
        }
        let f = w.finish().unwrap();
        let all: Vec<Id> = f.iter().unwrap().map(Result::unwrap).collect();
        assert!(all == (0..5000).map(|i| id(i * 2)).collect::<Vec<_>>());
        for i in 0..10_000 {
            assert_eq!(f.contains(&id(i)).unwrap(), i % 2 == 0, "{i}");
        }
        let mut w = SortedWriter::new().unwrap();
        w.push(id(2)).unwrap();
        assert!(w.push(id(1)).is_err(), "out of order");
        let empty = SortedWriter::new().unwrap().finish().unwrap();
        assert!(!empty.contains(&id(0)).unwrap());
    }

    /// A uniformly random key, as blob ids are.
    fn hashed(n: u32) -> Id {
        use sha2::Digest;
        sha2::Sha256::digest(n.to_be_bytes()).into()
    }

    fn tagged(n: u32, tag: u8) -> [u8; 80] {
        let mut r = [tag; 80];
        r[..32].copy_from_slice(&hashed(n));
        r
    }

    #[test]
    fn a_table_finds_what_it_was_given_through_its_growth() {
        let mut t = Table::<80>::default();
        assert_eq!(t.get(&hashed(0)).unwrap(), None, "an empty table");
        for n in 0..20_000 {
            t.insert(tagged(n, 1)).unwrap();
        }
        assert!(t.buckets > 16, "it grew: {} buckets", t.buckets);
        for n in (0..20_000).step_by(2) {
            t.insert(tagged(n, 2)).unwrap();
        }
        assert_eq!((t.len(), t.forgotten()), (20_000, 0));
        for n in 0..20_000 {
            let want = if n % 2 == 0 { 2 } else { 1 };
            assert_eq!(t.get(&hashed(n)).unwrap(), Some(tagged(n, want)), "{n}");
        }
        for n in 20_000..40_000 {
            assert_eq!(t.get(&hashed(n)).unwrap(), None, "{n}");
        }
        // Most keys it does not hold are answered without a read.
        let read_for = (20_000..40_000).filter(|&n| t.maybe(&hashed(n))).count();
        assert!(
            read_for < 400,
            "{read_for} of 20,000 absent keys passed the filter"
        );
    }

    #[test]
    fn a_full_table_forgets_its_oldest_and_never_answers_wrongly() {
        let slots = Table::<80>::SLOTS as u64;
        // As many buckets as the cap allows, so that it cannot grow.
        let mut t = Table::<80>::with_buckets(TABLE_BYTES / PAGE as u64);
        // Keys of one bucket: more than it holds.
        let keys: Vec<u32> = (0u32..)
            .filter(|&n| Table::<80>::bucket(&hashed(n), t.buckets) == 7)
            .take(slots as usize + 3)
            .collect();
        for &n in &keys {
            t.insert(tagged(n, 3)).unwrap();
        }
        assert_eq!((t.len(), t.forgotten()), (slots, 3));
        for (i, &n) in keys.iter().enumerate() {
            let found = t.get(&hashed(n)).unwrap();
            if i < 3 {
                assert_eq!(found, None, "the oldest are forgotten: {i}");
            } else {
                assert_eq!(found, Some(tagged(n, 3)), "{i}");
            }
        }
    }

    #[test]
    fn a_sorted_file_of_records_finds_each_by_its_key() {
        let record = |n: u32| {
            let mut r = [0u8; 40];
            r[..32].copy_from_slice(&id(n));
            r[32..36].copy_from_slice(&(n * 3).to_be_bytes());
            r
        };
        let mut w = SortedWriter::<40>::new().unwrap();
        for i in 0..3000 {
            w.push(record(i * 2)).unwrap();
        }
        let f = w.finish().unwrap();
        for i in 0..6000 {
            let found = f.find(&id(i)).unwrap();
            assert_eq!(found, (i % 2 == 0).then(|| record(i)), "{i}");
        }
    }
}
