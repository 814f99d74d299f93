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
