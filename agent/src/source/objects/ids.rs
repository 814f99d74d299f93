//! Sets of blob ids too large to hold: sorted runs on a temp disk.
//!
//! What must hold:
//! - Memory is bounded whatever the number of ids: [`Sorter`] keeps one run of [`RUN_IDS`] ids
//!   (4 MiB) and writes each full run sorted to an unlinked temp file; [`Sorter::merged`] reads
//!   them back merged, each id once, in order.
//! - [`SortedFile`] holds ids already sorted (a stored blob list) in one temp file, and answers
//!   membership by binary search: ~24 reads of 32 bytes at 10 M ids, from the page cache.
//! - Temp files are unlinked from the start (the kernel frees them when the run ends, however
//!   it ends): 32 bytes per id, in `TMPDIR`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;

/// A blob id, raw.
pub type Id = [u8; 32];

/// Ids sorted in memory before a run is written: 4 MiB.
const RUN_IDS: usize = 128 * 1024;

/// Collects ids in any order, with repeats.
#[derive(Default)]
pub struct Sorter {
    run: Vec<Id>,
    runs: Vec<File>,
}

impl Sorter {
    /// Adds `id`.
    pub fn push(&mut self, id: Id) -> io::Result<()> {
        self.run.push(id);
        if self.run.len() >= RUN_IDS {
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
    pub fn merged(mut self) -> io::Result<Merged> {
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

/// A spilled run, read from its start.
fn reopen(mut f: File) -> io::Result<File> {
    use std::io::Seek;
    f.rewind()?;
    Ok(f)
}

enum RunReader {
    File(BufReader<File>),
    Memory(std::vec::IntoIter<Id>),
}

impl RunReader {
    fn next(&mut self) -> io::Result<Option<Id>> {
        match self {
            RunReader::Memory(it) => Ok(it.next()),
            RunReader::File(r) => read_id(r),
        }
    }
}

/// The next id of a stream of raw ids, `None` at its end.
fn read_id(r: &mut impl Read) -> io::Result<Option<Id>> {
    let mut id = [0u8; 32];
    match r.read_exact(&mut id) {
        Ok(()) => Ok(Some(id)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The merge of sorted runs: each id once, in order. A handful of runs per million ids, so a
/// linear scan for the least head costs less than a heap would save.
pub struct Merged {
    heads: Vec<(Id, RunReader)>,
    last: Option<Id>,
}

impl Iterator for Merged {
    type Item = io::Result<Id>;

    fn next(&mut self) -> Option<io::Result<Id>> {
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

/// Sorted ids in a temp file, for lookups.
pub struct SortedFile {
    file: File,
    len: u64,
}

/// Writes a [`SortedFile`], one id at a time.
pub struct SortedWriter {
    w: BufWriter<File>,
    len: u64,
    last: Option<Id>,
}

impl SortedWriter {
    /// An empty one, in a new temp file.
    pub fn new() -> io::Result<SortedWriter> {
        Ok(SortedWriter {
            w: BufWriter::with_capacity(64 << 10, tempfile::tempfile()?),
            len: 0,
            last: None,
        })
    }

    /// Adds `id`, which must sort after the last one.
    pub fn push(&mut self, id: Id) -> io::Result<()> {
        if self.last.is_some_and(|l| l >= id) {
            return Err(io::Error::other("ids are not sorted"));
        }
        self.w.write_all(&id)?;
        self.last = Some(id);
        self.len += 1;
        Ok(())
    }

    /// The file, ready for lookups.
    pub fn finish(self) -> io::Result<SortedFile> {
        let file = self.w.into_inner().map_err(|e| e.into_error())?;
        Ok(SortedFile {
            file,
            len: self.len,
        })
    }
}

impl SortedFile {
    /// Whether `id` is among them.
    pub fn contains(&self, id: &Id) -> io::Result<bool> {
        let (mut lo, mut hi) = (0u64, self.len);
        let mut at = [0u8; 32];
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            self.file.read_exact_at(&mut at, mid * 32)?;
            match at.cmp(id) {
                std::cmp::Ordering::Equal => return Ok(true),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(false)
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
        let n = RUN_IDS as u32 * 3 + 1000;
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
    fn a_sorted_file_finds_exactly_its_ids() {
        let mut w = SortedWriter::new().unwrap();
        for i in 0..5000 {
            w.push(id(i * 2)).unwrap();
        }
        let f = w.finish().unwrap();
        for i in 0..10_000 {
            assert_eq!(f.contains(&id(i)).unwrap(), i % 2 == 0, "{i}");
        }
        let mut w = SortedWriter::new().unwrap();
        w.push(id(2)).unwrap();
        assert!(w.push(id(1)).is_err(), "out of order");
        let empty = SortedWriter::new().unwrap().finish().unwrap();
        assert!(!empty.contains(&id(0)).unwrap());
    }
}
