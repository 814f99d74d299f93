//! Reading a restored database's tables back, to compare with the fingerprint the dump gave.
//!
//! The read-back is the verification's proof that the restore holds what the source held, and
//! on one connection it is a single-threaded pass over every row after the restore. Here it runs
//! on [`SESSIONS`] connections at once, over pieces: a small table is one piece; a large one (on
//! PostgreSQL 14 or later, which scans a range of a table's blocks without reading the rest) is
//! cut into ranges of [`PIECE_BLOCKS`] blocks by `ctid`. A table's row hash is a sum of each
//! row's hash, so its pieces add up to exactly what one `COPY` of the table gives.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use futures::StreamExt;
use tokio_postgres::Client;

use super::pgdump::{RowHasher, TableData};
use super::{query_error, quote_ident, Fingerprint, Postgres, TEXT_SETTINGS_SQL};
use crate::error::Result;

/// Connections reading at once (the scratch's own cores do most of the work).
const SESSIONS: usize = 4;

/// Blocks in one piece of a large table: 64 MiB of 8 KiB blocks. A table of up to
/// `SESSIONS` times that is cut into `SESSIONS` pieces, each no smaller than [`MIN_PIECE_BLOCKS`].
const PIECE_BLOCKS: i64 = 8192;

/// A table smaller than this (256 KiB) is read in one piece.
const MIN_PIECE_BLOCKS: i64 = 32;

/// How a read-back was spread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spread {
    /// Tables read.
    pub tables: usize,
    /// Of them, read in ranges of blocks.
    pub cut: usize,
    /// `COPY` statements run.
    pub pieces: usize,
    /// Connections reading at once.
    pub sessions: usize,
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read back {} table(s) on {} connection(s) at once, {} of them in ranges of blocks ({} COPY statements)",
            self.tables, self.sessions, self.cut, self.pieces
        )
    }
}

/// One `COPY … TO STDOUT` of a table or of a range of its blocks.
struct Piece {
    /// Which table of the fingerprint.
    table: usize,
    copy: String,
}

/// Readies a session to read rows exactly as the dump wrote them: the dump's text settings, and
/// a SQL_ASCII database's bytes as they are (the server refuses to send bytes that are not
/// UTF-8 to a UTF-8 client).
pub async fn text_session(client: &Client) -> Result<()> {
    let q = query_error;
    client
        .batch_execute(TEXT_SETTINGS_SQL)
        .await
        .map_err(|e| q("setting the text format", e))?;
    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .await
        .map_err(|e| q("reading the server encoding", e))?
        .get(0);
    if encoding == "SQL_ASCII" {
        client
            .batch_execute("SET client_encoding = 'SQL_ASCII'")
            .await
            .map_err(|e| q("setting the client encoding", e))?;
    }
    Ok(())
}

/// The restored database's tables, (schema, name), each with its size in blocks.
pub type Present = HashMap<(String, String), i64>;

/// Row counts and hashes of the tables `expected` names that are `present`, and the names of
/// those missing from the restore, and how the reading was spread. `client` is a session readied
/// by [`text_session`]; more sessions to the same database come from `pg`.
pub async fn tables(
    pg: &Postgres,
    client: &Client,
    server_major: u32,
    expected: &Fingerprint,
    present: &Present,
    full: bool,
) -> Result<(Vec<TableData>, Vec<String>, Spread)> {
    let mut missing = Vec::new();
    let mut spread = Spread::default();
    let mut pieces = VecDeque::new();
    let mut found = vec![false; expected.dump.tables.len()];
    for (i, t) in expected.dump.tables.iter().enumerate() {
        let name = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
        let Some(&blocks) = present.get(&(t.schema.clone(), t.name.clone())) else {
            missing.push(name);
            continue;
        };
        found[i] = true;
        let target = t.copy.clone().unwrap_or(name);
        let cut = split_copy_target(&target).filter(|_| server_major >= 14);
        spread.tables += 1;
        match cut {
            Some((name, columns)) if blocks > MIN_PIECE_BLOCKS => {
                spread.cut += 1;
                let size = ((blocks + SESSIONS as i64 - 1) / SESSIONS as i64)
                    .clamp(MIN_PIECE_BLOCKS, PIECE_BLOCKS);
                let mut from = 0;
                while from < blocks {
                    let to = from + size;
                    // The last range is open: it reads whatever lies past the size seen.
                    let upper = match to < blocks {
                        true => format!(" AND ctid < '({to},0)'::tid"),
                        false => String::new(),
                    };
                    pieces.push_back(Piece {
                        table: i,
                        copy: format!(
                            "COPY (SELECT {columns} FROM ONLY {name} WHERE ctid >= '({from},0)'::tid{upper}) TO STDOUT"
                        ),
                    });
                    from = to;
                }
            }
            _ => pieces.push_back(Piece {
                table: i,
                copy: format!("COPY {target} TO STDOUT"),
            }),
        }
    }
    let sessions = SESSIONS.min(pieces.len());
    spread.pieces = pieces.len();
    spread.sessions = sessions;
    let queue = Mutex::new(pieces);
    let mut sums: Vec<RowHasher> = expected
        .dump
        .tables
        .iter()
        .map(|_| RowHasher::new(full))
        .collect();
    let mut extra = Vec::new();
    for _ in 1..sessions {
        let conn = pg.connect().await?;
        text_session(&conn.client).await?;
        extra.push(conn);
    }
    let clients = std::iter::once(client).chain(extra.iter().map(|c| &c.client));
    let read = futures::future::try_join_all(clients.map(|c| reader(c, &queue, full))).await?;
    for (table, rows) in read.into_iter().flatten() {
        sums[table].add(rows);
    }
    let tables = expected
        .dump
        .tables
        .iter()
        .zip(sums)
        .zip(found)
        .filter_map(|(t, found)| found.then_some(t))
        .map(|(t, rows)| {
            let (rows, hash) = rows.finish();
            TableData {
                schema: t.schema.clone(),
                name: t.name.clone(),
                copy: t.copy.clone(),
                rows,
                hash,
                block: None,
            }
        })
        .collect();
    Ok((tables, missing, spread))
}

/// Reads pieces off `queue` until it is empty: each piece's rows, hashed.
async fn reader(
    client: &Client,
    queue: &Mutex<VecDeque<Piece>>,
    full: bool,
) -> Result<Vec<(usize, RowHasher)>> {
    let q = query_error;
    let mut done = Vec::new();
    loop {
        let Some(piece) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
            return Ok(done);
        };
        let stream = client
            .copy_out(&piece.copy)
            .await
            .map_err(|e| q(&piece.copy, e))?;
        let mut stream = std::pin::pin!(stream);
        let mut rows = RowHasher::new(full);
        while let Some(chunk) = stream.next().await {
            rows.feed(&chunk.map_err(|e| q(&piece.copy, e))?);
        }
        done.push((piece.table, rows));
    }
}

/// A dump's COPY target `schema.table (columns)` split into the table and its column list;
/// `None` when it has no column list.
fn split_copy_target(target: &str) -> Option<(&str, &str)> {
    let bytes = target.as_bytes();
    let mut i = 0;
    let mut quoted = false;
    while i < bytes.len() {
        match (bytes[i], quoted) {
            (b'"', false) => quoted = true,
            (b'"', true) if bytes.get(i + 1) == Some(&b'"') => i += 1,
            (b'"', true) => quoted = false,
            (b' ', false) => break,
            _ => {}
        }
        i += 1;
    }
    let (name, rest) = target.split_at(i);
    let columns = rest.strip_prefix(" (")?.strip_suffix(')')?;
    (!name.is_empty() && !columns.trim().is_empty()).then_some((name, columns))
}

#[cfg(test)]
mod tests {
    use super::split_copy_target;

    #[test]
    fn a_copy_target_splits_into_its_table_and_columns() {
        assert_eq!(
            split_copy_target("public.t (a, b)"),
            Some(("public.t", "a, b"))
        );
        assert_eq!(
            split_copy_target(r#""we ird"".(x"."""T (1)" ("a b", "c)")"#),
            Some((r#""we ird"".(x"."""T (1)""#, r#""a b", "c)""#))
        );
        assert_eq!(split_copy_target("public.no_columns"), None);
        assert_eq!(split_copy_target("public.no_columns ()"), None);
        assert_eq!(split_copy_target(""), None);
    }
}
