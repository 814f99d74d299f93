//! `lifeboat restore --jobs N` without a plaintext spool: the tables' data load on N connections
//! at once, each read straight out of the downloaded (and already checked) stored object.
//!
//! A dump backed up with a seek index (see ARCHITECTURE.md, "Seekable dumps") is a series of zstd
//! frames inside age's independently authenticated chunks, and its fingerprint says where each
//! table's data block lies. So:
//! 1. the header and TOC (the archive without its data, a few KiB to MiB) are decoded into a small
//!    file, from which `pg_restore --section=pre-data` creates the schema;
//! 2. N connections take tables largest first; for each, the stored object is opened again, age
//!    seeks to the chunk holding the frame the block is in, zstd decodes from there, and the
//!    block's COPY text goes into `COPY … FROM STDIN`, exactly the bytes pg_restore would send;
//! 3. the data section's other entries (sequence values) and then the post-data section (indexes,
//!    constraints, triggers) run from the TOC file with `pg_restore`, the latter with `-j N`.
//!
//! A dump this cannot restore that way (no seek index, no fingerprint, large objects) is restored
//! as before: decrypted to a spool file for `pg_restore -j N`.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

use futures::SinkExt;

use super::pgdump::{self, ArchiveToc, TableData};
use super::{quote_ident, Connection, Fingerprint, Postgres, RestoreInput, RestoreOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::manifest::SeekIndex;
use crate::restore::{Progress, Spooled};

type Identities = [Box<dyn age::Identity + Send + Sync>];

/// A dump that can be restored table by table.
pub struct Seekable<'a> {
    spooled: &'a Spooled,
    seek: &'a SeekIndex,
    toc_end: u64,
    tables: &'a [TableData],
}

/// One table's data to load.
struct Load {
    /// Its TOC entry.
    id: i64,
    /// `COPY` target: `schema.table (columns)`.
    target: String,
    /// Where its block lies in the dump.
    block: [u64; 2],
}

impl<'a> Seekable<'a> {
    /// The dump in `spooled` when its backup recorded where its tables' data lies; `None` (restore
    /// it the old way) otherwise.
    pub fn of(spooled: &'a Spooled, fingerprint: &'a Fingerprint) -> Option<Seekable<'a>> {
        let dump = &fingerprint.dump;
        let whole = dump.error.is_none()
            && dump.large_objects == 0
            && dump.tables.iter().all(|t| t.block.is_some());
        Some(Seekable {
            spooled,
            seek: spooled.part.seek.as_ref()?,
            toc_end: dump.toc_end.filter(|_| whole)?,
            tables: &dump.tables,
        })
    }

    /// The decoded plaintext from `offset` on.
    fn open_at(&self, identities: &Identities, offset: u64) -> Result<impl Read + Send> {
        let file = std::fs::File::open(self.spooled.file.path())
            .map_err(|e| Error::failed(format!("cannot open the spool file: {e}")))?;
        let name = &self.spooled.part.name;
        let mut stream = age::Decryptor::new(BufReader::with_capacity(256 << 10, file))
            .and_then(|d| d.decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity)))
            .map_err(|e| {
                Error::new(ErrorKind::Integrity, format!("{name}: cannot decrypt: {e}"))
            })?;
        let [plain, at] = self.seek.frame_of(offset);
        let damaged = |e: std::io::Error| {
            Error::new(
                ErrorKind::Integrity,
                format!("{name}: reading at plaintext offset {offset}: {e}"),
            )
        };
        stream.seek(SeekFrom::Start(at)).map_err(damaged)?;
        let zstd = zstd::stream::read::Decoder::new(stream).map_err(damaged)?;
        let mut r = BufReader::with_capacity(256 << 10, zstd);
        std::io::copy(&mut r.by_ref().take(offset - plain), &mut std::io::sink())
            .map_err(damaged)?;
        Ok(r)
    }

    /// Writes the archive's header and TOC into a file in `dir`, and reads it.
    fn toc_file(
        &self,
        identities: &Identities,
        dir: &Path,
    ) -> Result<(tempfile::NamedTempFile, ArchiveToc)> {
        let mut toc = Vec::new();
        self.open_at(identities, 0)?
            .take(self.toc_end)
            .read_to_end(&mut toc)
            .map_err(|e| Error::new(ErrorKind::Integrity, format!("reading the TOC: {e}")))?;
        let archive = pgdump::archive_toc(&toc).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("{}: {e}", self.spooled.part.name),
            )
        })?;
        let mut file = tempfile::Builder::new()
            .prefix("lifeboat-toc-")
            .tempfile_in(dir)
            .map_err(|e| {
                Error::failed(format!("cannot create a file in {}: {e}", dir.display()))
            })?;
        std::io::Write::write_all(&mut file, &toc)
            .map_err(|e| Error::failed(format!("writing the TOC file: {e}")))?;
        Ok((file, archive))
    }

    /// Each TOC entry with data gets its table's block; `None` when one has none.
    fn loads(&self, toc: &ArchiveToc) -> Option<Vec<Load>> {
        let mut loads = Vec::new();
        for e in toc.entries.iter().filter(|e| e.desc == "TABLE DATA") {
            let t = self
                .tables
                .iter()
                .find(|t| t.schema == e.namespace && t.name == e.tag)?;
            loads.push(Load {
                id: e.id,
                target: t.copy.clone().unwrap_or_else(|| {
                    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
                }),
                block: t.block?,
            });
        }
        // Largest first, so that the last to finish is a small one.
        loads.sort_by_key(|l| std::cmp::Reverse(l.block[1]));
        Some(loads)
    }
}

/// Restores the dump into the database `conn` points at with `opts.jobs` connections. `Ok(None)`
/// when the dump turns out not to be restorable this way, before anything is applied. Returns
/// when the data was in (the post-data section then ran).
pub async fn restore(
    target: &Postgres,
    conn: &Connection,
    dump: &Seekable<'_>,
    identities: &Identities,
    opts: &RestoreOptions,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<Option<std::time::Instant>> {
    let (toc_file, toc) = dump.toc_file(identities, dir)?;
    let Some(loads) = dump.loads(&toc) else {
        return Ok(None);
    };
    // Other data entries run from the TOC file: sequence values. Any other kind (large objects)
    // has data this does not load.
    let others: Vec<&pgdump::ArchiveEntry> = toc
        .entries
        .iter()
        .filter(|e| e.section == pgdump::SECTION_DATA && e.desc != "TABLE DATA")
        .collect();
    if others.iter().any(|e| e.desc != "SEQUENCE SET") {
        return Ok(None);
    }
    let toc_path = || RestoreInput::File(toc_file.path().to_path_buf());
    let one = RestoreOptions {
        jobs: 1,
        ..opts.clone()
    };
    progress.phase("creating the schema (pg_restore --section=pre-data)", None);
    target
        .pg_restore(conn, toc_path(), &one.section("pre-data", None))
        .await?;

    let bytes: u64 = loads.iter().map(|l| l.block[1]).sum();
    let jobs = (opts.jobs as usize).min(loads.len()).max(1);
    progress.phase(
        &format!(
            "loading {} table(s) on {jobs} connection(s) at once",
            loads.len()
        ),
        Some(bytes),
    );
    let queue = Mutex::new(std::collections::VecDeque::from(loads));
    let mut conns = Vec::new();
    for _ in 0..jobs {
        conns.push(target.connect().await?);
    }
    let encoding = toc.encoding.as_deref();
    futures::future::try_join_all(conns.iter().map(|c| {
        loader(
            c,
            &queue,
            dump,
            identities,
            toc.int_size,
            encoding,
            progress,
        )
    }))
    .await?;
    drop(conns);

    if !others.is_empty() {
        let list = tempfile::Builder::new()
            .prefix("lifeboat-list-")
            .tempfile_in(dir)
            .map_err(|e| {
                Error::failed(format!("cannot create a file in {}: {e}", dir.display()))
            })?;
        let text: String = others.iter().map(|e| format!("{};\n", e.id)).collect();
        std::fs::write(list.path(), text)
            .map_err(|e| Error::failed(format!("writing the restore list: {e}")))?;
        target
            .pg_restore(
                conn,
                toc_path(),
                &one.section("data", Some(list.path().to_path_buf())),
            )
            .await?;
    }
    let data_in = std::time::Instant::now();
    progress.phase(
        &format!(
            "building indexes and constraints (pg_restore --section=post-data, {} jobs)",
            opts.jobs
        ),
        None,
    );
    target
        .pg_restore(conn, toc_path(), &opts.section("post-data", None))
        .await?;
    Ok(Some(data_in))
}

/// Loads tables off `queue` on `conn` until it is empty.
async fn loader(
    conn: &Connection,
    queue: &Mutex<std::collections::VecDeque<Load>>,
    dump: &Seekable<'_>,
    identities: &Identities,
    int_size: usize,
    encoding: Option<&str>,
    progress: &dyn Progress,
) -> Result<()> {
    let q = super::query_error;
    let mut setup = String::from("SET search_path = ''; SET row_security = off;");
    if let Some(enc) = encoding {
        setup.push_str(&format!(
            " SET client_encoding = {};",
            super::quote_literal(enc)
        ));
    }
    conn.client
        .batch_execute(&setup)
        .await
        .map_err(|e| q("preparing a loading session", e))?;
    loop {
        let Some(load) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
            return Ok(());
        };
        let reader = dump.open_at(identities, load.block[0])?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let (id, name) = (load.id, dump.spooled.part.name.clone());
        let reading = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            pgdump::read_data_block(&mut reader, int_size, id, |b| {
                tx.blocking_send(b)
                    .map_err(|_| std::io::Error::other("the COPY stopped"))
            })
        });
        let copy = format!("COPY {} FROM STDIN", load.target);
        let sink = conn
            .client
            .copy_in::<_, bytes::Bytes>(&copy)
            .await
            .map_err(|e| q(&copy, e))?;
        let mut sink = std::pin::pin!(sink);
        let mut sent = Ok(());
        while let Some(b) = rx.recv().await {
            progress.advance(b.len() as u64);
            if let Err(e) = sink.send(bytes::Bytes::from(b)).await {
                sent = Err(q(&copy, e));
                break;
            }
        }
        drop(rx);
        let read = reading
            .await
            .map_err(|e| Error::failed(format!("the reader of {name} failed: {e}")))?;
        sent?;
        // A damaged or cut block stops here, the COPY not finished (so not committed).
        read.map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("{name}: reading the data of {}: {e}", load.target),
            )
            .hint("nothing of this table was committed; use another backup and run `lifeboat check --read-data` (RUNBOOK.md#integrity-failure)")
        })?;
        sink.as_mut().finish().await.map_err(|e| q(&copy, e))?;
    }
}
