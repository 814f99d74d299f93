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
//!    block's COPY text goes into `COPY … FROM STDIN`, exactly the bytes pg_restore would send.
//!    Once a table is in, what depends on it alone (its indexes, primary key and other
//!    constraints of its own) becomes work for the N connections, with the TOC's statements:
//!    the connection that loaded it builds them before its next table, and one with no table
//!    left helps. So one table's indexes build while another's data loads, and a large table's
//!    indexes build up to N at a time, as with `pg_restore -j`;
//! 3. the rest (sequence values, foreign keys, triggers, materialized views…) runs from the TOC
//!    file with `pg_restore -j N --section=data --section=post-data`, the entries already done
//!    left out of its list.
//!
//! A dump this cannot restore that way (no seek index, no fingerprint, large objects) is restored
//! as before: decrypted to a spool file for `pg_restore -j N`.

use std::io::{BufRead, Read};
use std::path::Path;
use std::sync::Mutex;

use futures::SinkExt;

use super::pgdump::{self, ArchiveToc, TableData};
use super::{quote_ident, Connection, Fingerprint, Postgres, RestoreInput, RestoreOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::restore::{Progress, Spooled};

type Identities = [Box<dyn age::Identity + Send + Sync>];

/// A dump that can be restored table by table.
pub struct Seekable<'a> {
    spooled: &'a Spooled,
    toc_end: u64,
    tables: &'a [TableData],
}

/// One table's data to load, and what to build on it right after.
struct Load {
    /// Its TOC entry.
    id: i64,
    /// `COPY` target: `schema.table (columns)`.
    target: String,
    /// Load it as pg_restore -j does, after a `TRUNCATE` in the same transaction, and frozen:
    /// the table was created by this restore, is plain, and may be truncated (see
    /// [`freeze_where_possible`]).
    freeze: bool,
    /// Where its block lies in the dump.
    block: [u64; 2],
    /// Its own indexes and constraints.
    build: Vec<Build>,
}

/// An index or constraint of one table, built by the connection that loaded it.
struct Build {
    /// Its TOC entry.
    id: i64,
    /// Its table's TABLE DATA entry.
    table: i64,
    /// `INDEX public.events_ts_idx`, for errors.
    what: String,
    statement: String,
    tablespace: String,
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
            spooled: spooled.part.seek.as_ref().map(|_| spooled)?,
            toc_end: dump.toc_end.filter(|_| whole)?,
            tables: &dump.tables,
        })
    }

    /// The decoded plaintext from `offset` on.
    fn open_at(&self, identities: &Identities, offset: u64) -> Result<impl BufRead + Send> {
        self.spooled.open_at(identities, offset, None)
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

    /// Each TOC entry with data gets its table's block, and the post-data entries that depend
    /// on that table alone (beside what pre-data made); `None` when one has no block.
    fn loads(&self, toc: &ArchiveToc) -> Option<Vec<Load>> {
        use std::collections::{HashMap, HashSet};
        let by_id: HashMap<i64, &pgdump::ArchiveEntry> =
            toc.entries.iter().map(|e| (e.id, e)).collect();
        let data: Vec<&pgdump::ArchiveEntry> = toc
            .entries
            .iter()
            .filter(|e| e.desc == "TABLE DATA")
            .collect();
        // The TABLE entry each TABLE DATA entry fills.
        let table_of = |d: &pgdump::ArchiveEntry| {
            d.deps
                .iter()
                .copied()
                .find(|t| by_id.get(t).is_some_and(|t| t.desc == "TABLE"))
        };
        let filled: HashSet<i64> = data.iter().filter_map(|d| table_of(d)).collect();
        let made_before = |id: &i64| {
            by_id
                .get(id)
                .is_some_and(|e| e.section <= pgdump::SECTION_PRE_DATA)
                && !filled.contains(id)
        };
        let mut loads = Vec::new();
        for e in data {
            let t = self
                .tables
                .iter()
                .find(|t| t.schema == e.namespace && t.name == e.tag)?;
            let table = table_of(e);
            let build = toc
                .entries
                .iter()
                .filter(|p| p.section == pgdump::SECTION_POST_DATA)
                .filter(|p| {
                    table.is_some_and(|table| {
                        p.deps.contains(&table)
                            && p.deps.iter().all(|d| *d == table || made_before(d))
                    })
                })
                .filter_map(|p| {
                    let (statement, tablespace) = p.statement.clone()?;
                    Some(Build {
                        id: p.id,
                        table: e.id,
                        what: format!("{} {}.{}", p.desc, p.namespace, p.tag),
                        statement,
                        tablespace,
                    })
                })
                .collect();
            loads.push(Load {
                id: e.id,
                target: t.copy.clone().unwrap_or_else(|| {
                    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
                }),
                freeze: false,
                block: t.block?,
                build,
            });
        }
        // Largest first, so that the last to finish is a small one.
        loads.sort_by_key(|l| std::cmp::Reverse(l.block[1]));
        Some(loads)
    }
}

/// Restores the dump into the database `conn` points at with `opts.jobs` connections. `Ok(None)`
/// when the dump turns out not to be restorable this way, before anything is applied. Returns
/// when the last table's data was in (from then on, building is what is left).
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
        .pg_restore(conn, toc_path(), &one.sections(&["pre-data"], None))
        .await?;
    let mut loads = loads;
    freeze_where_possible(conn, &mut loads).await?;
    // What the loaders do; pg_restore does the rest afterwards.
    let mut done: std::collections::HashSet<i64> = loads.iter().map(|l| l.id).collect();
    done.extend(loads.iter().flat_map(|l| l.build.iter().map(|b| b.id)));
    let rest: String = toc
        .entries
        .iter()
        .filter(|e| !done.contains(&e.id))
        .map(|e| format!("{};\n", e.id))
        .collect();

    let bytes: u64 = loads.iter().map(|l| l.block[1]).sum();
    let jobs = (opts.jobs as usize).min(loads.len()).max(1);
    progress.phase(
        &format!(
            "loading {} table(s) on {jobs} connection(s) at once, and building each one's own indexes once it is in",
            loads.len()
        ),
        Some(bytes),
    );
    let work = Mutex::new(Work {
        loads: loads.into(),
        builds: Default::default(),
        loading: 0,
    });
    let mut conns = Vec::new();
    for _ in 0..jobs {
        conns.push(target.connect().await?);
    }
    let session = Session {
        int_size: toc.int_size,
        encoding: toc.encoding.as_deref(),
        tablespaces: !opts.no_tablespaces,
    };
    let data_in = futures::future::try_join_all(
        conns
            .iter()
            .map(|c| worker(c, &work, dump, identities, &session, progress)),
    )
    .await?
    .into_iter()
    .flatten()
    .max();
    drop(conns);

    let list = tempfile::Builder::new()
        .prefix("lifeboat-list-")
        .tempfile_in(dir)
        .map_err(|e| Error::failed(format!("cannot create a file in {}: {e}", dir.display())))?;
    std::fs::write(list.path(), rest)
        .map_err(|e| Error::failed(format!("writing the restore list: {e}")))?;
    progress.phase(
        &format!(
            "sequence values, foreign keys, triggers… (pg_restore --section=data --section=post-data, {} jobs)",
            opts.jobs
        ),
        None,
    );
    target
        .pg_restore(
            conn,
            toc_path(),
            &opts.sections(&["data", "post-data"], Some(list.path().to_path_buf())),
        )
        .await?;
    Ok(Some(data_in.unwrap_or_else(std::time::Instant::now)))
}

/// `schema.table (a, b)` → `schema.table`: the relation of a COPY target as pg_dump wrote it
/// (identifiers quoted where they need it, so the first space outside quotes ends it).
fn copy_relation(target: &str) -> &str {
    let mut quoted = false;
    for (i, c) in target.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => return &target[..i],
            _ => {}
        }
    }
    target
}

/// Marks the loads that can go in as pg_restore -j loads a table it created, `TRUNCATE` then
/// `COPY` in one transaction, which spares the free-space map, plus `FREEZE`, which writes the
/// rows already frozen and their pages all-visible. The data are the same; what differs is that
/// no later scan has to set hint bits on every row, and no anti-wraparound vacuum has to rewrite
/// every restored table (a plain restore leaves all of them to one such storm). Only plain tables
/// (not a partitioned root that a `--load-via-partition-root` dump loads through) the restoring
/// role may truncate; the others load with a plain `COPY`.
async fn freeze_where_possible(conn: &Connection, loads: &mut [Load]) -> Result<()> {
    let names: Vec<&str> = loads.iter().map(|l| copy_relation(&l.target)).collect();
    let rows = conn
        .client
        .query(
            "SELECT coalesce((SELECT c.relkind = 'r' AND has_table_privilege(c.oid, 'TRUNCATE') \
               FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass(t)), false) \
             FROM unnest($1::text[]) WITH ORDINALITY AS u(t, i) ORDER BY i",
            &[&names],
        )
        .await
        .map_err(|e| super::query_error("looking up the restored tables", e))?;
    for (load, row) in loads.iter_mut().zip(rows) {
        load.freeze = row.get(0);
    }
    Ok(())
}

/// What every loading session needs to know of the archive.
struct Session<'a> {
    int_size: usize,
    /// The client encoding of the archive's data.
    encoding: Option<&'a str>,
    /// Build indexes and constraints in their tablespaces (not `--no-tablespaces`).
    tablespaces: bool,
}

/// What is left to do: tables to load, largest first, and indexes and constraints of tables
/// already loaded.
struct Work {
    loads: std::collections::VecDeque<Load>,
    builds: std::collections::VecDeque<Build>,
    /// Tables being loaded now, whose builds are still to come.
    loading: usize,
}

enum Job {
    Load(Load),
    Build(Build),
    /// Nothing to take yet, but a table being loaded will bring builds.
    Wait,
    Done,
}

impl Work {
    /// What a connection that last loaded table `mine` does next: that table's builds, then the
    /// next table, then other tables' builds. A loading connection and a building one share 2
    /// cores better than two builds: on 17 tables, taking any build before the next table
    /// measured 1.13 × `pg_restore -j2`, this order 1.04–1.07 (BENCHMARKS.md). And a connection
    /// with no table left still helps build a large table's indexes.
    fn next(work: &Mutex<Work>, mine: Option<i64>) -> Job {
        let mut w = work.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = w.builds.iter().position(|b| Some(b.table) == mine) {
            if let Some(b) = w.builds.remove(i) {
                return Job::Build(b);
            }
        }
        if let Some(l) = w.loads.pop_front() {
            w.loading += 1;
            return Job::Load(l);
        }
        if let Some(b) = w.builds.pop_front() {
            return Job::Build(b);
        }
        match w.loading {
            0 => Job::Done,
            _ => Job::Wait,
        }
    }

    /// `load`'s data is in: its builds may start.
    fn loaded(work: &Mutex<Work>, load: Load) {
        let mut w = work.lock().unwrap_or_else(|e| e.into_inner());
        w.loading -= 1;
        w.builds.extend(load.build);
    }
}

/// Takes work on `conn` until none is left: loads a table's data, or builds an index or a
/// constraint of a table already loaded. Returns when its last table's data was in (`None`
/// when it loaded none).
async fn worker(
    conn: &Connection,
    work: &Mutex<Work>,
    dump: &Seekable<'_>,
    identities: &Identities,
    session: &Session<'_>,
    progress: &dyn Progress,
) -> Result<Option<std::time::Instant>> {
    let q = super::query_error;
    let mut last_loaded = None;
    let mut mine = None;
    let mut setup = String::from("SET search_path = ''; SET row_security = off;");
    if let Some(enc) = session.encoding {
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
        match Work::next(work, mine) {
            Job::Done => return Ok(last_loaded),
            Job::Wait => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            Job::Build(b) => {
                let mut sql = String::new();
                if session.tablespaces {
                    sql.push_str(&format!(
                        "SET default_tablespace = {};\n",
                        super::quote_literal(&b.tablespace)
                    ));
                }
                sql.push_str(&b.statement);
                conn.client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| q(&format!("building {}", b.what), e))?;
            }
            Job::Load(load) => {
                load_table(conn, &load, dump, identities, session, progress).await?;
                last_loaded = Some(std::time::Instant::now());
                mine = Some(load.id);
                Work::loaded(work, load);
            }
        }
    }
}

/// Loads one table's data block into it with `COPY … FROM STDIN`, committed whole or not at all.
async fn load_table(
    conn: &Connection,
    load: &Load,
    dump: &Seekable<'_>,
    identities: &Identities,
    session: &Session<'_>,
    progress: &dyn Progress,
) -> Result<()> {
    let q = super::query_error;
    let reader = dump.open_at(identities, load.block[0])?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let (id, int_size, name) = (load.id, session.int_size, dump.spooled.part.name.clone());
    let reading = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        pgdump::read_data_block(&mut reader, int_size, id, |b| {
            tx.blocking_send(b)
                .map_err(|_| std::io::Error::other("the COPY stopped"))
        })
    });
    let copy = match load.freeze {
        true => format!("COPY {} FROM STDIN WITH (FREEZE)", load.target),
        false => format!("COPY {} FROM STDIN", load.target),
    };
    if load.freeze {
        let truncate = format!("BEGIN; TRUNCATE ONLY {}", copy_relation(&load.target));
        conn.client
            .batch_execute(&truncate)
            .await
            .map_err(|e| q(&truncate, e))?;
    }
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
    if load.freeze {
        conn.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| q(&format!("committing {}", load.target), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relation_of_a_copy_target_is_what_precedes_its_column_list() {
        assert_eq!(copy_relation("public.t (a, b)"), "public.t");
        assert_eq!(
            copy_relation(r#""Ünï"."Tâble ✓" ("wéird col")"#),
            r#""Ünï"."Tâble ✓""#
        );
        assert_eq!(copy_relation(r#"s."a "" b" (x)"#), r#"s."a "" b""#);
        // A table of no columns: pg_dump writes no list.
        assert_eq!(copy_relation("public.no_columns"), "public.no_columns");
        assert_eq!(copy_relation("public.no_columns "), "public.no_columns");
    }
}
