//! Continuous WAL streaming into the repository, from a physical replication slot.
//!
//! The received WAL of the current segment goes into one spool file (a segment, 16 MiB by
//! default: the only local state, bounded). A whole segment is stored as its own object; the
//! growing one is stored every `flush_interval` as a partial object that supersedes the previous
//! partial of it, so what a crash can lose is bounded by that interval. Each object is named with
//! the SHA-256 of its plaintext (see `repo::layout::wal_segment`). The server is told a position
//! is flushed only once the object holding it is stored, so the slot keeps on the server whatever
//! the repository does not hold yet: a crash of the agent or an outage of the store loses nothing
//! the slot still has. While an upload waits, the stream is not read: the server buffers, and the
//! agent's disk never fills.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::policy::WalSettings;
use super::replication::{Event, Replication};
use super::{Lsn, PhysicalConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, NoObserver, PipelineConfig};
use crate::repo::{layout, Repository};
use crate::source::postgres::Postgres;

/// The name PostgreSQL gives the segment holding `lsn`: timeline, log and segment, 8 hex each.
pub fn segment_name(timeline: u32, lsn: Lsn, segment_size: u64) -> String {
    let segno = lsn.0 / segment_size;
    let per_log = 0x1_0000_0000 / segment_size;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segno / per_log,
        segno % per_log
    )
}

/// The segment being received.
struct Segment {
    timeline: u32,
    start: Lsn,
    /// The server's segment size.
    size: u64,
    file: tempfile::NamedTempFile,
    handle: tokio::fs::File,
    /// Bytes of it received.
    written: u64,
    /// SHA-256 of those bytes so far: a partial object's name needs the prefix's hash, so the
    /// spool is never read twice.
    hasher: Sha256,
    /// Bytes of it stored in the repository.
    stored: u64,
    /// The partial object holding `stored` bytes, superseded by the next.
    partial: Option<String>,
}

/// A session's state: the connection, the segment being received, the server's WAL end.
struct Live {
    r: Replication,
    seg: Segment,
    server_end: Lsn,
    /// `max_slot_retained` was passed and said so.
    warned: bool,
}

/// What streaming reports as it goes (for logs and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The end of what is stored in the repository.
    pub archived: Lsn,
    /// The server's WAL end, as last reported.
    pub server_end: Lsn,
}

/// Streams the WAL of one physical source until cancelled.
pub struct Streamer {
    repo: Repository,
    source: String,
    cfg: PhysicalConfig,
    wal: WalSettings,
    pipeline: PipelineConfig,
    progress: tokio::sync::watch::Sender<Progress>,
}

impl Streamer {
    /// A streamer of `source`'s WAL into `repo`.
    pub fn new(
        repo: Repository,
        source: &str,
        cfg: PhysicalConfig,
        wal: WalSettings,
        pipeline: PipelineConfig,
    ) -> Streamer {
        // A trickle of objects of at most a segment: single-threaded zstd, one part in flight
        // and S3's smallest part keep the streamer's memory small; the stream is never CPU-bound.
        let pipeline = PipelineConfig {
            workers: 0,
            parts_in_flight: 1,
            part_size: pipeline.part_size.min(5 << 20),
            ..pipeline
        };
        Streamer {
            repo,
            source: source.to_string(),
            cfg,
            wal,
            pipeline,
            progress: tokio::sync::watch::channel(Progress::default()).0,
        }
    }

    /// Where streaming stands, updated after every store and keepalive.
    pub fn progress(&self) -> tokio::sync::watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Streams until `cancel` fires, reconnecting with backoff after a failure. A failure that
    /// no retry mends (a credential, a lost slot) ends it.
    pub async fn run(&self, cancel: CancellationToken) -> Result<()> {
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            match self.session(&cancel).await {
                Ok(()) => return Ok(()),
                Err(e) if cancel.is_cancelled() || e.kind == ErrorKind::Interrupted => {
                    return Err(Error::new(ErrorKind::Interrupted, "interrupted"))
                }
                Err(e) if matches!(e.kind, ErrorKind::Credential | ErrorKind::Invalid) => {
                    return Err(e)
                }
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                    tracing::warn!(source = %self.source, error = %e, retry_in = ?backoff, "WAL streaming interrupted; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "interrupted")),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    fn where_(&self) -> String {
        format!("source {}: WAL slot {}", self.source, self.wal.slot)
    }

    /// The slot's restart point, the slot created (reserving WAL now) when missing. A lost slot
    /// is an error: the server removed WAL the archive never got.
    async fn slot_start(&self, pg: &Postgres) -> Result<(Lsn, u64)> {
        let c = pg.connect().await?;
        let q = |what: &str, e: tokio_postgres::Error| pg.query_error(what, e);
        let size: i64 = c
            .client
            .query_one(
                "select setting::int8 from pg_settings where name = 'wal_segment_size'",
                &[],
            )
            .await
            .map_err(|e| q("reading wal_segment_size", e))?
            .get(0);
        let read = "select restart_lsn::text, coalesce(wal_status, '') from pg_replication_slots \
                    where slot_name = $1 and slot_type = 'physical'";
        let mut row = c
            .client
            .query_opt(read, &[&self.wal.slot])
            .await
            .map_err(|e| q("reading the replication slot", e))?;
        if row.is_none() {
            tracing::info!(source = %self.source, slot = %self.wal.slot, "Creating the replication slot");
            c.client
                .query_one(
                    "select pg_create_physical_replication_slot($1, true, false)",
                    &[&self.wal.slot],
                )
                .await
                .map_err(|e| q("creating the replication slot", e))?;
            row = c
                .client
                .query_opt(read, &[&self.wal.slot])
                .await
                .map_err(|e| q("reading the replication slot", e))?;
        }
        let row =
            row.ok_or_else(|| Error::failed(format!("{}: the slot vanished", self.where_())))?;
        let status: String = row.get(1);
        let restart: Option<String> = row.get(0);
        if status == "lost" || restart.is_none() {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{}: the slot was invalidated (wal_status {status:?}): the server removed WAL the archive does not hold, so the chain has a gap",
                    self.where_()
                ),
            )
            .hint("drop the slot (SELECT pg_drop_replication_slot(…)) and take a base backup now; raise max_slot_wal_keep_size (RUNBOOK.md#wal-slot)"));
        }
        let restart: Lsn = restart
            .unwrap_or_default()
            .parse()
            .map_err(|e: String| Error::failed(format!("{}: {e}", self.where_())))?;
        Ok((restart, size as u64))
    }

    /// One replication session: from the slot's restart point until cancelled or broken.
    async fn session(&self, cancel: &CancellationToken) -> Result<()> {
        let (mut live, mut pending) = self.open(cancel).await?;
        let mut tick = tokio::time::interval(self.wal.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let event = match pending.take() {
                Some(first) => first,
                None => tokio::select! {
                    _ = cancel.cancelled() => {
                        self.store_partial(&mut live.seg, cancel).await?;
                        let (received, archived) = (self.received(&live.seg), self.archived(&live.seg));
                        let _ = live.r.status(received, archived, false).await;
                        return Ok(());
                    }
                    _ = tick.tick() => {
                        self.flush(&mut live, cancel).await?;
                        continue;
                    }
                    e = live.r.next() => e?,
                },
            };
            self.on_event(&mut live, event, cancel).await?;
        }
    }

    /// Connects, finds where to start, and starts streaming; returns the stream's first event
    /// when it was read already.
    async fn open(&self, cancel: &CancellationToken) -> Result<(Live, Option<Event>)> {
        let pg = Postgres::new(self.cfg.connection.clone());
        let (restart, segment_size) = self.slot_start(&pg).await?;
        let mut r = self.connect(&pg).await?;
        let system = r.identify_system().await?;
        let timeline = system.timeline;
        if timeline > 1 {
            let (_, history) = r.timeline_history(timeline).await?;
            self.store_small(
                &layout::wal_history(&self.source, timeline),
                history,
                cancel,
            )
            .await?;
        }
        let (start, pending) = self
            .start_point(&pg, &mut r, restart, segment_size, timeline)
            .await?;
        tracing::info!(source = %self.source, slot = %self.wal.slot, start = %start, timeline, "Streaming WAL");
        let seg = self.new_segment(timeline, start, segment_size).await?;
        let live = Live {
            r,
            seg,
            server_end: system.xlogpos,
            warned: false,
        };
        Ok((live, pending))
    }

    /// Every `flush_interval`: the growing segment stored, the server told, the slot watched.
    async fn flush(&self, live: &mut Live, cancel: &CancellationToken) -> Result<()> {
        self.store_partial(&mut live.seg, cancel).await?;
        let (received, archived) = (self.received(&live.seg), self.archived(&live.seg));
        live.r.status(received, archived, false).await?;
        self.publish(&live.seg, live.server_end);
        let retained = live.server_end.0.saturating_sub(archived.0);
        if retained > self.wal.max_slot_retained && !live.warned {
            live.warned = true;
            tracing::warn!(source = %self.source, retained, limit = self.wal.max_slot_retained, "The slot holds more WAL on the server than wal.max_slot_retained: the archive is behind");
        }
        Ok(())
    }

    async fn on_event(
        &self,
        live: &mut Live,
        event: Event,
        cancel: &CancellationToken,
    ) -> Result<()> {
        match event {
            Event::Data {
                start,
                server_end,
                data,
            } => {
                live.server_end = server_end;
                self.receive(&mut live.seg, start, &data, cancel, &mut live.r)
                    .await?;
                self.publish(&live.seg, live.server_end);
            }
            Event::Keepalive { server_end, reply } => {
                live.server_end = server_end;
                self.publish(&live.seg, live.server_end);
                if reply {
                    let (received, archived) = (self.received(&live.seg), self.archived(&live.seg));
                    live.r.status(received, archived, false).await?;
                }
            }
            Event::EndOfTimeline {
                next_timeline,
                next_start,
            } => {
                self.store_partial(&mut live.seg, cancel).await?;
                return Err(Error::failed(format!(
                    "{}: timeline {} ended; the server continues on timeline {next_timeline} at {next_start}",
                    self.where_(),
                    live.seg.timeline
                )));
            }
        }
        Ok(())
    }

    /// Opens a replication connection.
    async fn connect(&self, pg: &Postgres) -> Result<Replication> {
        let (config, password) = pg.resolved_config()?;
        Replication::connect(
            &config,
            password.as_ref(),
            &self.cfg.connection.url_redacted,
        )
        .await
    }

    /// Starts the stream where the archive needs it; returns the start and the stream's first
    /// event when it was read here. The start is that of the slot's restart segment (the server
    /// keeps that whole segment, and each stored object is a segment's prefix), unless the
    /// archive ends before it: a slot dropped and created again, or one that moved without this
    /// streamer. Then from where the archive ends, if the server still has that WAL; if not, the
    /// gap is logged as an error (and `check` reports it).
    async fn start_point(
        &self,
        pg: &Postgres,
        r: &mut Replication,
        restart: Lsn,
        segment_size: u64,
        timeline: u32,
    ) -> Result<(Lsn, Option<Event>)> {
        let seg_start = |l: Lsn| Lsn(l.0 - l.0 % segment_size);
        let archived = super::archive::Archive::read(&self.repo, &self.source, segment_size)
            .await?
            .end(segment_size);
        if let Some(end) = archived.filter(|end| *end < seg_start(restart)) {
            r.start(&self.wal.slot, seg_start(end), timeline).await?;
            // The server says only once streaming began whether it still has that WAL.
            match tokio::time::timeout(Duration::from_secs(10), r.next()).await {
                Ok(Ok(first)) => {
                    tracing::warn!(source = %self.source, archived = %end, slot = %restart, "The slot starts after the archive's end; the server still had the WAL in between");
                    return Ok((seg_start(end), Some(first)));
                }
                Err(_) => return Ok((seg_start(end), None)),
                Ok(Err(e)) if e.message.contains("has already been removed") => {
                    tracing::error!(
                        source = %self.source,
                        slot = %self.wal.slot,
                        "WAL from {end} to {} is lost: the server removed it before it was archived (the slot was dropped, or invalidated); take a base backup now (RUNBOOK.md#wal-slot)",
                        seg_start(restart)
                    );
                    *r = self.connect(pg).await?;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
        r.start(&self.wal.slot, seg_start(restart), timeline)
            .await?;
        Ok((seg_start(restart), None))
    }

    fn received(&self, seg: &Segment) -> Lsn {
        Lsn(seg.start.0 + seg.written)
    }

    fn archived(&self, seg: &Segment) -> Lsn {
        Lsn(seg.start.0 + seg.stored)
    }

    fn publish(&self, seg: &Segment, server_end: Lsn) {
        self.progress.send_replace(Progress {
            archived: self.archived(seg),
            server_end,
        });
    }

    /// Writes `data` (from `start`) into the segment spool, storing each segment it completes.
    async fn receive(
        &self,
        seg: &mut Segment,
        start: Lsn,
        mut data: &[u8],
        cancel: &CancellationToken,
        r: &mut Replication,
    ) -> Result<()> {
        if start != self.received(seg) {
            return Err(Error::failed(format!(
                "{}: the server sent WAL from {start}, expected {}",
                self.where_(),
                self.received(seg)
            )));
        }
        while !data.is_empty() {
            let room = (seg.size - seg.written) as usize;
            let (now, rest) = data.split_at(room.min(data.len()));
            seg.handle
                .write_all(now)
                .await
                .map_err(|e| Error::failed(format!("writing the WAL spool: {e}")))?;
            seg.hasher.update(now);
            seg.written += now.len() as u64;
            data = rest;
            if seg.written == seg.size {
                self.store_whole(seg, cancel).await?;
                let next = Lsn(seg.start.0 + seg.size);
                r.status(next, next, false).await?;
                *seg = self.new_segment(seg.timeline, next, seg.size).await?;
            }
        }
        Ok(())
    }

    async fn new_segment(&self, timeline: u32, start: Lsn, size: u64) -> Result<Segment> {
        let file = tempfile::Builder::new()
            .prefix("lifeboat-wal-")
            .tempfile()
            .map_err(|e| Error::failed(format!("cannot create the WAL spool file: {e}")))?;
        let handle = tokio::fs::File::from_std(
            file.reopen()
                .map_err(|e| Error::failed(format!("cannot open the WAL spool file: {e}")))?,
        );
        Ok(Segment {
            timeline,
            start,
            size,
            file,
            handle,
            written: 0,
            hasher: Sha256::new(),
            stored: 0,
            partial: None,
        })
    }

    /// SHA-256 of what the spool holds, flushed to the file for the pipeline to read.
    async fn spool_sha(&self, seg: &mut Segment) -> Result<String> {
        seg.handle
            .flush()
            .await
            .map_err(|e| Error::failed(format!("writing the WAL spool: {e}")))?;
        Ok(hex::encode(seg.hasher.clone().finalize()))
    }

    /// Stores the spool's first `len` bytes under `key` through the pipeline.
    async fn store_prefix(
        &self,
        seg: &Segment,
        len: u64,
        key: String,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let f = tokio::fs::File::open(seg.file.path())
            .await
            .map_err(|e| Error::failed(format!("reading the WAL spool: {e}")))?;
        pipeline::run(
            f.take(len),
            std::future::ready(Ok(())),
            NoObserver,
            self.repo.store.clone(),
            key.clone(),
            &self.pipeline,
            cancel.child_token(),
        )
        .await
        .map_err(|e| Error::from(e).context(format!("storing {key}")))?;
        Ok(())
    }

    /// Stores what the segment holds beyond the last store, as its new partial object.
    async fn store_partial(&self, seg: &mut Segment, cancel: &CancellationToken) -> Result<()> {
        if seg.written == seg.stored {
            return Ok(());
        }
        let len = seg.written;
        let sha = self.spool_sha(seg).await?;
        let name = segment_name(seg.timeline, seg.start, seg.size);
        let key = layout::wal_partial(&self.source, seg.timeline, &name, len, &sha);
        self.store_prefix(seg, len, key.clone(), cancel).await?;
        self.supersede(seg.partial.replace(key)).await;
        seg.stored = len;
        tracing::debug!(source = %self.source, archived = %self.archived(seg), "Stored the growing WAL segment");
        Ok(())
    }

    /// Stores the whole segment and drops its partial object.
    async fn store_whole(&self, seg: &mut Segment, cancel: &CancellationToken) -> Result<()> {
        let len = seg.written;
        let sha = self.spool_sha(seg).await?;
        let name = segment_name(seg.timeline, seg.start, seg.size);
        let key = layout::wal_segment(&self.source, seg.timeline, &name, &sha);
        self.store_prefix(seg, len, key, cancel).await?;
        seg.partial = None;
        // Every partial of it, also those an earlier session left.
        let partials = format!(
            "{}{:08X}/{name}.partial.",
            layout::wal_prefix(&self.source),
            seg.timeline
        );
        match self.repo.store.list(&partials).await {
            Ok(old) => {
                for o in old {
                    self.supersede(Some(o.key)).await;
                }
            }
            // Best effort: a leftover partial is shorter than the whole segment beside it.
            Err(e) => tracing::debug!(error = %e, "Could not list superseded partial WAL objects"),
        }
        seg.stored = len;
        tracing::debug!(source = %self.source, segment = %name, "Stored a WAL segment");
        Ok(())
    }

    /// Deletes a superseded partial object, best effort: a leftover partial is older than the
    /// object that replaced it, and readers take the longest.
    async fn supersede(&self, old: Option<String>) {
        if let Some(key) = old {
            if let Err(e) = self.repo.store.delete(&key).await {
                tracing::debug!(key = %key, error = %e, "Could not delete a superseded partial WAL object");
            }
        }
    }

    async fn store_small(
        &self,
        key: &str,
        plain: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        pipeline::run(
            std::io::Cursor::new(plain),
            std::future::ready(Ok(())),
            NoObserver,
            self.repo.store.clone(),
            key.to_string(),
            &self.pipeline,
            cancel.child_token(),
        )
        .await
        .map_err(|e| Error::from(e).context(format!("storing {key}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_are_postgresqls() {
        let mb16 = 16 << 20;
        assert_eq!(
            segment_name(1, "0/4000028".parse().unwrap(), mb16),
            "000000010000000000000004"
        );
        assert_eq!(
            segment_name(2, "1/FF000000".parse().unwrap(), mb16),
            "0000000200000001000000FF"
        );
        assert_eq!(
            segment_name(1, "0/40000000".parse().unwrap(), 1 << 30),
            "000000010000000000000001"
        );
    }
}
