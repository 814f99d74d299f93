//! Continuous WAL streaming into the repository, from a physical replication slot.
//!
//! The received WAL of the current segment goes into one spool file (a segment, 16 MiB by
//! default: the only local state, bounded; its name is removed as soon as it is open, so a killed
//! agent leaves nothing behind). A whole segment is stored as its own object; the
//! growing one is stored every `flush_interval` as a partial object that supersedes the previous
//! partial of it, so what a crash can lose is bounded by that interval. Each object is named with
//! the SHA-256 of its plaintext (see `repo::layout::wal_segment`). The server is told a position
//! is flushed only once the object holding it is stored, so the slot keeps on the server whatever
//! the repository does not hold yet: a crash of the agent or an outage of the store loses nothing
//! the slot still has. While an upload waits, the stream is not read: the server buffers, and the
//! agent's disk never fills.
//!
//! A promotion ends the timeline being streamed: the rest of it is stored, the new timeline's
//! history file too, and streaming goes on from the segment where the new timeline begins. After
//! a restart the stream starts on the timeline that holds where the archive ends, so the server
//! walks the streamer through every switch it missed. WAL the server removed before the archive
//! got it (a dropped or invalidated slot) is a gap: logged, counted in [`Progress::gaps`] (the
//! agent takes a base backup then), and named by `check`. WAL of another cluster is refused.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::policy::WalSettings;
use super::replication::{Event, Replication, System};
use super::timeline::{self, Ended};
use super::{Lsn, PhysicalConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{self, NoObserver, PipelineConfig};
use crate::repo::signing::{self, Signer};
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
    /// The spool, open for reading from the start; its name is already gone.
    spool: std::fs::File,
    /// The spool, open for appending what is received.
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
    /// What earlier timelines' objects already hold: the first segment of a new timeline
    /// repeats the old one's WAL up to the switch, and the archive never moves back.
    floor: Lsn,
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
    /// Gaps found since the streamer started: WAL the server removed before it was archived.
    pub gaps: u32,
    /// The latest of them: from the archive's end to where streaming could resume.
    pub last_gap: Option<(Lsn, Lsn)>,
}

/// How often a streamer whose slot another process streams from tries to take it over.
const STANDBY_POLL: Duration = Duration::from_secs(5);

/// Streams the WAL of one physical source until cancelled.
pub struct Streamer {
    repo: Repository,
    source: String,
    cfg: PhysicalConfig,
    wal: WalSettings,
    pipeline: PipelineConfig,
    progress: tokio::sync::watch::Sender<Progress>,
    /// The key each stored object's signature is made with, loaded when streaming starts.
    signer: std::sync::OnceLock<Option<Signer>>,
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
        let pipeline = pipeline.small();
        Streamer {
            repo,
            source: source.to_string(),
            cfg,
            wal,
            pipeline,
            progress: tokio::sync::watch::channel(Progress::default()).0,
            signer: std::sync::OnceLock::new(),
        }
    }

    /// Where streaming stands, updated after every store and keepalive.
    pub fn progress(&self) -> tokio::sync::watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Streams until `cancel` fires, reconnecting with backoff after a failure. A failure that
    /// no retry mends (a credential, a lost slot) ends it.
    pub async fn run(&self, cancel: CancellationToken) -> Result<()> {
        // Before a byte is stored: WAL no trusted key signed would stop every recovery.
        let signer = self
            .repo
            .trust
            .signer()
            .map_err(|e| e.context(format!("source {}", self.source)))?;
        let _ = self.signer.set(signer);
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            match self.session(&cancel).await {
                Ok(()) => return Ok(()),
                Err(e) if cancel.is_cancelled() || e.kind == ErrorKind::Interrupted => {
                    return Err(Error::new(ErrorKind::Interrupted, "interrupted"))
                }
                Err(e)
                    if matches!(
                        e.kind,
                        ErrorKind::Credential | ErrorKind::Invalid | ErrorKind::Integrity
                    ) =>
                {
                    return Err(e)
                }
                // Another streamer (a replica of this agent) has the slot: stand by to take
                // over when it stops. The server's own slot check is the lease.
                Err(e) if e.kind == ErrorKind::LockHeld => {
                    tracing::info!(source = %self.source, slot = %self.wal.slot, error = %e, "The slot is streaming to another process; standing by");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "interrupted")),
                        _ = tokio::time::sleep(STANDBY_POLL) => {}
                    }
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

    /// Whether another process streams from the slot now (a replica of this agent): then this
    /// one stands by, before it reads the repository or writes anything.
    async fn slot_free(&self, pg: &Postgres) -> Result<()> {
        let c = pg.connect().await?;
        let active: Option<bool> = c
            .client
            .query_opt(
                "select active from pg_replication_slots where slot_name = $1",
                &[&self.wal.slot],
            )
            .await
            .map_err(|e| pg.query_error("reading the replication slot", e))?
            .map(|r| r.get(0));
        if active == Some(true) {
            return Err(Error::new(
                ErrorKind::LockHeld,
                format!(
                    "{}: the slot is active (another process streams from it)",
                    self.where_()
                ),
            ));
        }
        Ok(())
    }

    /// The slot's restart point, the slot created (reserving WAL now) when missing. A slot the
    /// server invalidated is dropped and created again: the WAL it lost is a gap the start
    /// point reports.
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
        let status = |r: &tokio_postgres::Row| {
            (
                r.get::<_, String>(1) == "lost",
                r.get::<_, Option<String>>(0).is_none(),
            )
        };
        if let Some((lost, _)) = row.as_ref().map(status).filter(|(l, u)| *l || *u) {
            if lost {
                // An invalidated slot never streams again; the WAL it lost is a gap that the
                // start point finds and reports. A new slot holds WAL from now on.
                tracing::error!(source = %self.source, slot = %self.wal.slot, "The slot was invalidated (max_slot_wal_keep_size): the server removed WAL the archive does not hold; creating it again (RUNBOOK.md#wal-slot)");
            } else {
                // Made by hand without reserving WAL: it holds nothing yet.
                tracing::info!(source = %self.source, slot = %self.wal.slot, "The slot reserves no WAL yet; creating it again so that it does");
            }
            c.client
                .query_one("select pg_drop_replication_slot($1)", &[&self.wal.slot])
                .await
                .map_err(|e| q("dropping the invalidated replication slot", e))?;
            row = None;
        }
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
        let restart: Lsn = row
            .get::<_, Option<String>>(0)
            .ok_or_else(|| {
                Error::failed(format!("{}: the new slot reserved no WAL", self.where_()))
            })?
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
                        let _ = self.report(&mut live, false).await;
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
        self.slot_free(&pg).await?;
        let mut r = self.connect(&pg).await?;
        let system = r.identify_system().await?;
        // Before the slot: another cluster must not be left holding WAL for nobody.
        self.same_cluster(&system).await?;
        let (restart, segment_size) = self.slot_start(&pg).await?;
        let history = self.history(&mut r, system.timeline, cancel).await?;
        let (start, timeline, pending) = self
            .start_point(
                &pg,
                &mut r,
                restart,
                segment_size,
                &history,
                system.timeline,
            )
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

    /// Refuses a server that is another cluster than the source's newest base backup: its WAL
    /// would never apply to the backups this archive serves, and its segment names would
    /// collide with theirs.
    async fn same_cluster(&self, system: &System) -> Result<()> {
        let listing = self.repo.list(Some(&self.source)).await?;
        let newest = listing
            .backups
            .iter()
            .find_map(|e| e.manifest.base_backup.as_ref().map(|b| (e, b)));
        match newest {
            Some((e, b)) if b.system_identifier != system.system_identifier => Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "{}: the server is the cluster with system identifier {}, but base backup {} of this source is of cluster {}: its WAL does not apply to them, so none is archived",
                    self.where_(),
                    system.system_identifier,
                    e.manifest.id,
                    b.system_identifier
                ),
            )
            .hint("if the url points at the wrong server, correct it; if the cluster was created anew (initdb, pg_upgrade), give it a new source name so the old backups stay restorable (RUNBOOK.md#wal-slot)")),
            _ => Ok(()),
        }
    }

    /// The history of the server's timeline (empty on the first), its file stored in the
    /// archive: recovery reads it to follow the switch.
    async fn history(
        &self,
        r: &mut Replication,
        timeline: u32,
        cancel: &CancellationToken,
    ) -> Result<Vec<Ended>> {
        if timeline <= 1 {
            return Ok(Vec::new());
        }
        let (_, content) = r.timeline_history(timeline).await?;
        let parsed = timeline::parse(&String::from_utf8_lossy(&content)).map_err(|e| {
            Error::failed(format!(
                "{}: the server's history of timeline {timeline}: {e}",
                self.where_()
            ))
        })?;
        // A timeline's history never changes: stored once.
        let key = layout::wal_history(&self.source, timeline);
        let stored = self
            .repo
            .store
            .size(&key)
            .await
            .map_err(|e| Error::from(e).context(format!("looking for {key}")))?;
        if stored.is_none() {
            self.store_small(&key, content, cancel).await?;
        }
        Ok(parsed)
    }

    /// Tells the server what is received and what is stored (the slot may free WAL before it).
    async fn report(&self, live: &mut Live, reply: bool) -> Result<()> {
        let archived = self.archived(&live.seg);
        let received = self.received(&live.seg).max(archived);
        live.r.status(received, archived, reply).await
    }

    /// Every `flush_interval`: the growing segment stored, the server told, the slot watched.
    async fn flush(&self, live: &mut Live, cancel: &CancellationToken) -> Result<()> {
        self.store_partial(&mut live.seg, cancel).await?;
        self.report(live, false).await?;
        self.publish(&live.seg, live.server_end);
        let archived = self.archived(&live.seg);
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
                    self.report(live, false).await?;
                }
            }
            Event::EndOfTimeline {
                next_timeline,
                next_start,
            } => {
                self.next_timeline(live, next_timeline, next_start, cancel)
                    .await?
            }
        }
        Ok(())
    }

    /// The streamed timeline ended at `next_start` (a promotion): its rest is stored, then the
    /// new timeline's history, and streaming goes on from the start of the segment where the
    /// new timeline begins (its first segment repeats the old WAL up to the switch).
    async fn next_timeline(
        &self,
        live: &mut Live,
        next_timeline: u32,
        next_start: Lsn,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let ended = live.seg.timeline;
        self.store_partial(&mut live.seg, cancel).await?;
        if self.received(&live.seg) != next_start {
            return Err(Error::failed(format!(
                "{}: timeline {ended} ended at {next_start}, but its WAL was received up to {}",
                self.where_(),
                self.received(&live.seg)
            )));
        }
        let floor = self.archived(&live.seg);
        self.history(&mut live.r, next_timeline, cancel).await?;
        let size = live.seg.size;
        let start = Lsn(next_start.0 - next_start.0 % size);
        live.r.start(&self.wal.slot, start, next_timeline).await?;
        tracing::info!(source = %self.source, ended, timeline = next_timeline, switch = %next_start, "Following the server onto a new timeline");
        live.seg = self.new_segment(next_timeline, start, size).await?;
        live.seg.floor = floor;
        Ok(())
    }

    /// Opens a replication connection.
    async fn connect(&self, pg: &Postgres) -> Result<Replication> {
        let (config, password) = pg.resolved_config()?;
        Replication::connect(
            &config,
            password.as_ref(),
            pg.tls_config()?,
            &self.cfg.connection.url_redacted,
        )
        .await
    }

    /// Starts the stream where the archive needs it, on the timeline of `history` (the server's
    /// is `current`) that holds that point; returns the start, its timeline and the stream's
    /// first event when it was read here. The start is that of the slot's restart segment (the server
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
        history: &[Ended],
        current: u32,
    ) -> Result<(Lsn, u32, Option<Event>)> {
        let seg_start = |l: Lsn| Lsn(l.0 - l.0 % segment_size);
        let on = |l: Lsn| timeline::timeline_of(history, l, current);
        let archived = super::archive::Archive::read(&self.repo, &self.source, segment_size)
            .await?
            .end(segment_size);
        if let Some(end) = archived.filter(|end| *end < seg_start(restart)) {
            let from = seg_start(end);
            r.start(&self.wal.slot, from, on(from)).await?;
            // The server says only once streaming began whether it still has that WAL.
            match tokio::time::timeout(Duration::from_secs(10), r.next()).await {
                Ok(Ok(first)) => {
                    tracing::warn!(source = %self.source, archived = %end, slot = %restart, "The slot starts after the archive's end; the server still had the WAL in between");
                    return Ok((from, on(from), Some(first)));
                }
                Err(_) => return Ok((from, on(from), None)),
                Ok(Err(e)) if e.message.contains("has already been removed") => {
                    self.gap(end, seg_start(restart));
                    *r = self.connect(pg).await?;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
        let from = seg_start(restart);
        r.start(&self.wal.slot, from, on(from)).await?;
        Ok((from, on(from), None))
    }

    /// WAL from `from` to `to` is lost: said loudly, and counted so that the agent takes a base
    /// backup (the chain from older base backups stops at `from`; `check` names the gap).
    fn gap(&self, from: Lsn, to: Lsn) {
        tracing::error!(
            source = %self.source,
            slot = %self.wal.slot,
            "WAL from {from} to {to} is lost: the server removed it before it was archived (the slot was dropped, or invalidated); a new base backup is needed (RUNBOOK.md#wal-slot)"
        );
        self.progress.send_modify(|p| {
            p.gaps += 1;
            p.last_gap = Some((from, to));
        });
    }

    fn received(&self, seg: &Segment) -> Lsn {
        Lsn(seg.start.0 + seg.written)
    }

    fn archived(&self, seg: &Segment) -> Lsn {
        Lsn(seg.start.0 + seg.stored).max(seg.floor)
    }

    fn publish(&self, seg: &Segment, server_end: Lsn) {
        let archived = self.archived(seg);
        self.progress.send_modify(|p| {
            p.archived = archived;
            p.server_end = server_end;
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
        let open = || {
            file.reopen()
                .map_err(|e| Error::failed(format!("cannot open the WAL spool file: {e}")))
        };
        let (spool, handle) = (open()?, tokio::fs::File::from_std(open()?));
        // Both handles live on after the name is gone: nothing outlives the process.
        file.close()
            .map_err(|e| Error::failed(format!("cannot unlink the WAL spool file: {e}")))?;
        Ok(Segment {
            timeline,
            start,
            size,
            spool,
            handle,
            written: 0,
            hasher: Sha256::new(),
            stored: 0,
            partial: None,
            floor: Lsn(0),
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

    /// Stores the signature of WAL object `key`, whose plaintext has SHA-256 `sha`.
    async fn vouch(&self, key: &str, sha: &str) -> Result<()> {
        let signer = self.signer.get().and_then(Option::as_ref);
        self.repo
            .vouch(key, &signing::wal_statement(key, sha), signer)
            .await
    }

    /// Stores the spool's first `len` bytes (whose plaintext SHA-256 is `sha`) under `key`
    /// through the pipeline, its signature first.
    async fn store_prefix(
        &self,
        seg: &Segment,
        len: u64,
        key: String,
        sha: &str,
        cancel: &CancellationToken,
    ) -> Result<()> {
        self.vouch(&key, sha).await?;
        // The clone shares the read handle's offset; stores of a segment run one at a time.
        let mut f = seg
            .spool
            .try_clone()
            .map(tokio::fs::File::from_std)
            .map_err(|e| Error::failed(format!("reading the WAL spool: {e}")))?;
        f.seek(std::io::SeekFrom::Start(0))
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
        self.store_prefix(seg, len, key.clone(), &sha, cancel)
            .await?;
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
        self.store_prefix(seg, len, key, &sha, cancel).await?;
        seg.partial = None;
        // Every partial of it, also those an earlier session left.
        let partials = format!(
            "{}{:08X}/{name}.partial.",
            layout::wal_prefix(&self.source),
            seg.timeline
        );
        match self.repo.store.list(&partials).await {
            Ok(old) => {
                for o in old.into_iter().filter(|o| !signing::is_signature(&o.key)) {
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
            // The object first: a signature without its object vouches for nothing.
            for key in [key.clone(), signing::signature_key(&key)] {
                if let Err(e) = self.repo.store.delete(&key).await {
                    tracing::debug!(key = %key, error = %e, "Could not delete a superseded partial WAL object");
                }
            }
        }
    }

    async fn store_small(
        &self,
        key: &str,
        plain: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        self.vouch(key, &hex::encode(Sha256::digest(&plain)))
            .await?;
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
