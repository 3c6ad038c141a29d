//! The outbox on disk: every process event is fsynced before `append` returns, and stays
//! until the OMA acknowledges its id and its own flush has completed.
//!
//! With [`FlushOrder::Parallel`] an event joins the pending queue (and the delivery is woken)
//! right after its `write(2)`, while its `fdatasync` runs: the POST to the OMA and the local
//! flush overlap. Each written line gets a sequence number; a completed `fdatasync` makes
//! every line written before it durable (`durable_seq`). `acknowledge` waits until the
//! acknowledged events are flushed (or their flush failed) before it forgets them.
//!
//! Two files in the outbox directory:
//! - `events.jsonl`: one [`StoredEvent`] per line, appended and `fdatasync`ed;
//! - `acks.jsonl`: one acknowledged event id per line, appended and `fdatasync`ed.
//!
//! Pending = events whose id is not in the acks. Compaction rewrites `events.jsonl` with the
//! pending events only (atomically), then empties `acks.jsonl`; a crash between the two
//! leaves ids in the acks that match nothing, which is harmless. It runs when the outbox
//! opens and when the acks have grown past the pending queue, so it costs O(1) amortised.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use api::ProcessEvent;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::crash::{self, Point};
use super::{AckBarrier, AckObserver, FlushOrder, OutboxError, OutboxLimits, OutboxStats};
use crate::disk;

const EVENTS_FILE: &str = "events.jsonl";
const ACKS_FILE: &str = "acks.jsonl";
const COMPACT_MIN_ACKS: usize = if cfg!(test) { 8 } else { 1024 };

/// One line of `events.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredEvent {
    /// When the event entered the outbox, for the "oldest age" metric.
    appended_at: DateTime<Utc>,
    event: ProcessEvent,
}

#[derive(Debug)]
struct Pending {
    stored: StoredEvent,
    bytes: u64,
    /// Sequence number of its line (0 for events loaded at open: durable already).
    seq: u64,
    /// Its `fdatasync` failed: it is delivered from memory, and forgotten once acknowledged.
    flush_failed: bool,
}

impl Pending {
    fn is_death(&self) -> bool {
        self.stored.event.kind != api::ProcessEventKind::ProcessStarted
    }
}

#[derive(Debug)]
struct Inner {
    pending: VecDeque<Pending>,
    pending_bytes: u64,
    /// Shared with the appends whose `fdatasync` runs outside the lock.
    events: Arc<File>,
    acks: File,
    /// Lines written to the events file so far (the last one's sequence number).
    written_seq: u64,
    /// Every line up to this sequence number is durable.
    durable_seq: u64,
    /// `fdatasync`s of appended events that failed since this process started.
    flush_failures: u64,
    acks_since_compaction: usize,
    delivered: u64,
    failed_attempts: u64,
    refused: u64,
    /// Whether the last append found the outbox above the warning threshold, so the
    /// warning is logged once per episode instead of once per event.
    warned_filling: bool,
}

/// Durable queue of process events waiting for the OMA's acknowledgement. Methods block on
/// disk I/O (`fdatasync`): call them from `spawn_blocking` in async code.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    limits: OutboxLimits,
    inner: Mutex<Inner>,
    /// When a new event is handed to the delivery, see [`FlushOrder`].
    order: FlushOrder,
    /// Signalled whenever an append's flush completes or fails.
    flushed: Condvar,
    notify: tokio::sync::Notify,
    /// Signalled when the OMA has just called this watchdog, see [`Outbox::oma_called`].
    oma_seen: tokio::sync::Notify,
    /// Made durable before acknowledged events are forgotten, see [`AckBarrier`].
    barrier: OnceLock<Arc<dyn AckBarrier>>,
    /// Told which events were acknowledged, see [`AckObserver`].
    observer: OnceLock<Arc<dyn AckObserver>>,
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir` and loads what is still pending.
    ///
    /// A torn last line (a crash in the middle of an append, so `append` never returned and
    /// nobody was told the event was stored) is skipped with a warning.
    pub fn open(dir: &Path, limits: OutboxLimits) -> Result<Self, OutboxError> {
        let open_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OutboxError::Open { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(open_err(dir))?;
        let events_path = dir.join(EVENTS_FILE);
        let acks_path = dir.join(ACKS_FILE);
        let (events, damage) =
            disk::read_json_lines::<StoredEvent>(&events_path).map_err(open_err(&events_path))?;
        log_damage(&events_path, &damage);
        let (acked, damage) =
            disk::read_json_lines::<Uuid>(&acks_path).map_err(open_err(&acks_path))?;
        log_damage(&acks_path, &damage);
        let acked: HashSet<Uuid> = acked.into_iter().collect();
        let mut seen = HashSet::new();
        let mut pending = VecDeque::new();
        let mut pending_bytes = 0;
        for stored in events {
            // The same id twice can only come from a retried append; keep the first.
            if acked.contains(&stored.event.event_id) || !seen.insert(stored.event.event_id) {
                continue;
            }
            let bytes = line_len(&stored)?;
            pending_bytes += bytes;
            pending.push_back(Pending {
                stored,
                bytes,
                seq: 0,
                flush_failed: false,
            });
        }
        let (mut events, mut acks) = (None, None);
        compact(dir, &pending, &mut events, &mut acks).map_err(open_err(dir))?;
        let (Some(events), Some(acks)) = (events, acks) else {
            return Err(OutboxError::Open {
                path: dir.to_path_buf(),
                source: std::io::Error::other("compaction returned no file handles"),
            });
        };
        if !pending.is_empty() {
            tracing::info!(queued = pending.len(), dir = %dir.display(), "outbox resumes with events still to deliver to the OMA");
        }
        let outbox = Self {
            dir: dir.to_path_buf(),
            limits,
            inner: Mutex::new(Inner {
                pending,
                pending_bytes,
                events: Arc::new(events),
                acks,
                written_seq: 0,
                durable_seq: 0,
                flush_failures: 0,
                acks_since_compaction: 0,
                delivered: 0,
                failed_attempts: 0,
                refused: 0,
                warned_filling: false,
            }),
            order: FlushOrder::default(),
            flushed: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            oma_seen: tokio::sync::Notify::new(),
            barrier: OnceLock::new(),
            observer: OnceLock::new(),
        };
        // A restart with a backlog says so at once, not at the next append.
        outbox.check_filling(&mut outbox.lock());
        Ok(outbox)
    }

    /// When new events are handed to the delivery (before the outbox is shared).
    pub fn with_flush_order(mut self, order: FlushOrder) -> Self {
        self.order = order;
        self
    }

    /// Appends an event and makes it durable before returning.
    ///
    /// With [`FlushOrder::Parallel`] the delivery may send the event while this waits for
    /// its `fdatasync`. Should that flush fail, the event has been handed out already: it
    /// stays queued in memory and is delivered (logged as `outbox_flush_failed` and counted),
    /// and this returns `Ok`; an error means the event is not queued at all.
    ///
    /// When the outbox is full the new event is refused with [`OutboxError::Full`] rather
    /// than dropping the oldest: the oldest events are deaths nobody else has recorded, while
    /// the caller still holds the refused one, logs it (and the death remains in the
    /// registry, in the job status the OMA's recovery polls). Dropping silently is never
    /// an option.
    pub fn append(&self, event: ProcessEvent) -> Result<(), OutboxError> {
        let (stored, line) = encode(event)?;
        let bytes = line.len() as u64;
        let death = stored.event.kind != api::ProcessEventKind::ProcessStarted;
        let mut inner = self.lock();
        self.check_room(&mut inner, &stored.event, bytes)?;
        let write_err = |source| OutboxError::Write {
            path: self.dir.join(EVENTS_FILE),
            source,
        };
        let locked_us = crate::clock::monotonic_us();
        crash::at(Point::BeforeWrite, death);
        if let Err(error) = (&*inner.events).write_all(&line) {
            // A write cut short (ENOSPC half-way) must not leave part of a line, or the next
            // line appended after it would be unreadable at the next start.
            rewind_torn_append(&inner.events, &self.dir.join(EVENTS_FILE), line.len());
            return Err(write_err(error));
        }
        let written_us = crate::clock::monotonic_us();
        crash::at(Point::AfterWrite, death);
        inner.written_seq += 1;
        let seq = inner.written_seq;
        let event_id = stored.event.event_id;
        let pending = Pending {
            stored,
            bytes,
            seq,
            flush_failed: false,
        };
        if self.order == FlushOrder::Serial {
            inner.events.sync_data().map_err(write_err)?;
            inner.durable_seq = seq;
            Self::queue(&mut inner, pending);
            self.check_filling(&mut inner);
            drop(inner);
            self.notify.notify_one();
        } else {
            Self::queue(&mut inner, pending);
            self.check_filling(&mut inner);
            let file = Arc::clone(&inner.events);
            drop(inner);
            // The delivery starts now, while this thread flushes.
            self.notify.notify_one();
            crash::hold_flush(death);
            let result = file.sync_data();
            self.flush_done(seq, event_id, result);
        }
        crash::at(Point::AfterFlush, death);
        // The append's own steps (for the kill-to-commit benchmark's split).
        tracing::debug!(target: crate::clock::LATENCY_TARGET, event = "append_timing",
            event_id = %event_id, locked_us, written_us,
            synced_us = crate::clock::monotonic_us(), order = self.order.as_str(), "event appended");
        Ok(())
    }

    fn queue(inner: &mut Inner, pending: Pending) {
        inner.pending_bytes += pending.bytes;
        inner.pending.push_back(pending);
    }

    /// Refuses an event of `bytes` when the outbox is at its bounds.
    fn check_room(
        &self,
        inner: &mut Inner,
        event: &ProcessEvent,
        bytes: u64,
    ) -> Result<(), OutboxError> {
        let full = inner.pending.len() as u64 >= self.limits.max_events
            || inner.pending_bytes + bytes > self.limits.max_bytes;
        if !full {
            return Ok(());
        }
        inner.refused += 1;
        tracing::error!(
            event_id = %event.event_id, job_id = %event.job_id,
            queued = inner.pending.len(), queued_bytes = inner.pending_bytes,
            max_events = self.limits.max_events, max_bytes = self.limits.max_bytes,
            "outbox full: refusing a new event; the OMA has not acknowledged events for a while, check its reachability and the watchdog's token"
        );
        Err(OutboxError::Full {
            queued: inner.pending.len() as u64,
            max_events: self.limits.max_events,
            queued_bytes: inner.pending_bytes,
            max_bytes: self.limits.max_bytes,
        })
    }

    /// Records how the `fdatasync` of line `seq` ended, and wakes acknowledgements that wait
    /// for it.
    fn flush_done(&self, seq: u64, event_id: Uuid, result: std::io::Result<()>) {
        let mut inner = self.lock();
        match result {
            Ok(()) => inner.durable_seq = inner.durable_seq.max(seq),
            // A compaction since the write made the line durable in the new file.
            Err(_) if inner.durable_seq >= seq => {}
            Err(error) => {
                inner.flush_failures += 1;
                if let Some(p) = inner.pending.iter_mut().rev().find(|p| p.seq == seq) {
                    p.flush_failed = true;
                }
                tracing::error!(event = "outbox_flush_failed", %error, %event_id,
                    file = %self.dir.join(EVENTS_FILE).display(),
                    "cannot flush an event to the outbox's file; it is kept in memory and delivered, but a crash before the OMA acknowledges it loses it (the registry then reports the death again at the next start); check the state directory's disk");
            }
        }
        drop(inner);
        self.flushed.notify_all();
    }

    /// Writes `event` and its acknowledgement together, durably, without queueing it: for an
    /// event the OMA acknowledged while the outbox could not be written (`spill`), so that the
    /// files hold it once with one acknowledgement, as if it had been appended in time.
    pub fn append_acknowledged(&self, event: ProcessEvent) -> Result<(), OutboxError> {
        if let Some(barrier) = self.barrier.get() {
            barrier.before_forgetting().map_err(OutboxError::Barrier)?;
        }
        let (stored, line) = encode(event)?;
        let id = format!("\"{}\"\n", stored.event.event_id);
        let mut inner = self.lock();
        for (file, name, bytes) in [
            (&*inner.events, EVENTS_FILE, &line[..]),
            (&inner.acks, ACKS_FILE, id.as_bytes()),
        ] {
            let path = self.dir.join(name);
            let mut writer: &File = file;
            if let Err(source) = writer.write_all(bytes) {
                rewind_torn_append(file, &path, bytes.len());
                return Err(OutboxError::Write { path, source });
            }
            file.sync_data()
                .map_err(|source| OutboxError::Write { path, source })?;
        }
        inner.delivered += 1;
        inner.acks_since_compaction += 1;
        drop(inner);
        if let Some(observer) = self.observer.get() {
            observer.acknowledged(&[stored.event]);
        }
        Ok(())
    }

    /// [`Outbox::append`] from async code: the fsync runs on a blocking thread.
    pub async fn append_async(self: &Arc<Self>, event: ProcessEvent) -> Result<(), OutboxError> {
        let outbox = Arc::clone(self);
        tokio::task::spawn_blocking(move || outbox.append(event))
            .await
            .unwrap_or_else(|join| {
                Err(OutboxError::Write {
                    path: self.dir.join(EVENTS_FILE),
                    source: std::io::Error::other(join),
                })
            })
    }

    /// Up to `max` of the oldest pending events, in the order they were appended.
    pub fn peek(&self, max: usize) -> Vec<ProcessEvent> {
        let inner = self.lock();
        inner
            .pending
            .iter()
            .take(max)
            .map(|p| p.stored.event.clone())
            .collect()
    }

    /// Sets what must be durable before acknowledged events are forgotten (once; a second
    /// barrier is refused and handed back).
    pub fn set_ack_barrier(&self, barrier: Arc<dyn AckBarrier>) -> Result<(), Arc<dyn AckBarrier>> {
        self.barrier.set(barrier)
    }

    /// Sets who is told of acknowledged events (once; a second one is refused and handed
    /// back).
    pub fn set_ack_observer(
        &self,
        observer: Arc<dyn AckObserver>,
    ) -> Result<(), Arc<dyn AckObserver>> {
        self.observer.set(observer)
    }

    /// The queued death (`process_exited` or `died_while_unwatched`) of `process`, if any.
    pub fn pending_death(&self, process: api::ProcessIdentity) -> Option<ProcessEvent> {
        let inner = self.lock();
        inner
            .pending
            .iter()
            .map(|p| &p.stored.event)
            .find(|e| e.process == process && e.kind != api::ProcessEventKind::ProcessStarted)
            .cloned()
    }

    /// Removes exactly the pending events whose ids are in `ids` (ids not pending are
    /// ignored), durably. Returns how many were removed.
    ///
    /// An acknowledgement that arrives while one of its events is still being flushed (see
    /// [`FlushOrder::Parallel`]) waits for that flush: the event is forgotten only once both
    /// have happened.
    pub fn acknowledge(&self, ids: &[Uuid]) -> Result<usize, OutboxError> {
        // Outside the lock: appends (deaths) must not wait for the barrier's writes.
        if let Some(barrier) = self.barrier.get() {
            barrier.before_forgetting().map_err(OutboxError::Barrier)?;
        }
        let ids: HashSet<Uuid> = ids.iter().copied().collect();
        let mut inner = self.wait_flushed(&ids);
        let death = inner
            .pending
            .iter()
            .any(|p| ids.contains(&p.stored.event.event_id) && p.is_death());
        crash::at(Point::AfterAckAndFlush, death);
        let present: Vec<Uuid> = inner
            .pending
            .iter()
            .map(|p| p.stored.event.event_id)
            .filter(|id| ids.contains(id))
            .collect();
        if present.is_empty() {
            return Ok(0);
        }
        let mut lines = Vec::new();
        for id in &present {
            lines.extend_from_slice(format!("\"{id}\"\n").as_bytes());
        }
        let write_err = |source| OutboxError::Write {
            path: self.dir.join(ACKS_FILE),
            source,
        };
        inner.acks.write_all(&lines).map_err(write_err)?;
        inner.acks.sync_data().map_err(write_err)?;
        let mut removed_bytes = 0;
        let mut removed = Vec::new();
        inner.pending.retain(|p| {
            let keep = !ids.contains(&p.stored.event.event_id);
            if !keep {
                removed_bytes += p.bytes;
                removed.push(p.stored.event.clone());
            }
            keep
        });
        inner.pending_bytes -= removed_bytes;
        inner.delivered += removed.len() as u64;
        inner.acks_since_compaction += removed.len();
        self.check_filling(&mut inner);
        self.maybe_compact(&mut inner);
        drop(inner);
        // Outside the lock, like the barrier: what the observer does (forget a job's
        // progress, one fsync) must not hold up deaths being appended.
        if let Some(observer) = self.observer.get() {
            observer.acknowledged(&removed);
        }
        Ok(removed.len())
    }

    /// Takes the lock once no event in `ids` waits for its flush any more.
    fn wait_flushed(&self, ids: &HashSet<Uuid>) -> std::sync::MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        loop {
            let durable = inner.durable_seq;
            let waiting = inner.pending.iter().find(|p| {
                p.seq > durable && !p.flush_failed && ids.contains(&p.stored.event.event_id)
            });
            let Some(waiting) = waiting else {
                return inner;
            };
            crash::at(Point::AfterAckBeforeFlush, waiting.is_death());
            inner = self.flushed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `fdatasync`s of appended events that failed since this process started.
    pub fn flush_failures(&self) -> u64 {
        self.lock().flush_failures
    }

    /// When new events are handed to the delivery.
    pub fn flush_order(&self) -> FlushOrder {
        self.order
    }

    /// Rewrites the files without the acknowledged events once enough have been.
    fn maybe_compact(&self, inner: &mut Inner) {
        if inner.acks_since_compaction < COMPACT_MIN_ACKS.max(inner.pending.len()) {
            return;
        }
        // The acknowledgement is already durable; a failed compaction only means the files
        // stay longer, so it is logged, not returned.
        let (mut events, mut acks) = (None, None);
        let result = compact(&self.dir, &inner.pending, &mut events, &mut acks);
        if let Some(events) = events {
            inner.events = Arc::new(events);
            // The new file holds every pending line, synced: flushes still in flight on the
            // old one have nothing left to make durable.
            inner.durable_seq = inner.written_seq;
            self.flushed.notify_all();
        }
        if let Some(acks) = acks {
            inner.acks = acks;
        }
        match result {
            Ok(()) => inner.acks_since_compaction = 0,
            Err(error) => {
                tracing::warn!(%error, dir = %self.dir.display(), "could not compact the outbox; it keeps working and retries at the next acknowledgement")
            }
        }
    }

    /// Counts one failed delivery attempt (for the metrics).
    pub fn record_failed_attempt(&self) {
        self.lock().failed_attempts += 1;
    }

    /// Counters for `/health` and metrics.
    pub fn stats(&self) -> OutboxStats {
        let inner = self.lock();
        let oldest_age_seconds = inner.pending.front().map(|p| {
            (Utc::now() - p.stored.appended_at)
                .num_milliseconds()
                .max(0) as f64
                / 1000.0
        });
        OutboxStats {
            queued: inner.pending.len() as u64,
            queued_bytes: inner.pending_bytes,
            max_events: self.limits.max_events,
            max_bytes: self.limits.max_bytes,
            delivered: inner.delivered,
            failed_attempts: inner.failed_attempts,
            refused: inner.refused,
            oldest_age_seconds,
        }
    }

    /// Resolves when an event is appended (used by the delivery task to wake up).
    pub(crate) async fn appended(&self) {
        self.notify.notified().await;
    }

    /// The OMA has just called this watchdog (an authenticated API request): it is most
    /// likely reachable again, so a delivery waiting out its back-off may try now.
    pub fn oma_called(&self) {
        // Wakes only a delivery that waits right now: a call while deliveries succeed must
        // not shorten the next back-off.
        self.oma_seen.notify_waiters();
    }

    /// Resolves at the next [`Outbox::oma_called`].
    pub(crate) async fn oma_seen(&self) {
        self.oma_seen.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs a warning once each time the outbox crosses 80 % of either bound.
    fn check_filling(&self, inner: &mut Inner) {
        let events = inner.pending.len() as u64 * 100 / self.limits.max_events.max(1);
        let bytes = inner.pending_bytes * 100 / self.limits.max_bytes.max(1);
        let filling = events >= 80 || bytes >= 80;
        if filling && !inner.warned_filling {
            tracing::warn!(
                queued = inner.pending.len(),
                max_events = self.limits.max_events,
                queued_bytes = inner.pending_bytes,
                max_bytes = self.limits.max_bytes,
                "outbox over 80% full: events are not being acknowledged by the OMA; check that it is reachable, or new events will be refused"
            );
        }
        inner.warned_filling = filling;
    }
}

/// Cuts off what a failed append wrote of its line: the file is truncated to the end of its
/// last complete line (it ends with one before every append). Logged when that fails too.
fn rewind_torn_append(file: &File, path: &Path, line_len: usize) {
    use std::os::unix::fs::FileExt;
    let cut = || -> std::io::Result<()> {
        let len = file.metadata()?.len();
        let from = len.saturating_sub(line_len as u64);
        let mut tail = vec![0; (len - from) as usize];
        // The handle is append-only: read through the path (the same file, under the lock).
        File::open(path)?.read_exact_at(&mut tail, from)?;
        let keep = match tail.iter().rposition(|b| *b == b'\n') {
            Some(at) => from + at as u64 + 1,
            None if from == 0 => 0,
            None => return Ok(()), // nothing of this line was written
        };
        if keep < len {
            file.set_len(keep)?;
        }
        Ok(())
    };
    if let Err(error) = cut() {
        tracing::error!(event = "outbox_torn_append", %error, file = %path.display(),
            "a failed append may have left part of a line in the outbox file; the next start skips it as corrupt");
    }
}

/// The event as the outbox stores it, and its line (JSON and a newline).
fn encode(event: ProcessEvent) -> Result<(StoredEvent, Vec<u8>), OutboxError> {
    let stored = StoredEvent {
        appended_at: Utc::now(),
        event,
    };
    let mut line = serde_json::to_vec(&stored).map_err(|source| OutboxError::Encode {
        event_id: stored.event.event_id,
        source,
    })?;
    line.push(b'\n');
    Ok((stored, line))
}
fn line_len(stored: &StoredEvent) -> Result<u64, OutboxError> {
    serde_json::to_vec(stored)
        .map(|v| v.len() as u64 + 1)
        .map_err(|source| OutboxError::Encode {
            event_id: stored.event.event_id,
            source,
        })
}

/// The events of the outbox in `dir` not yet acknowledged, oldest first, read without
/// changing anything (for tests and inspection tools; the daemon may be running).
pub fn read_pending(dir: &Path) -> Result<Vec<ProcessEvent>, OutboxError> {
    let open_err = |path: PathBuf| move |source| OutboxError::Open { path, source };
    let events_path = dir.join(EVENTS_FILE);
    let acks_path = dir.join(ACKS_FILE);
    let (events, _) =
        disk::read_json_lines::<StoredEvent>(&events_path).map_err(open_err(events_path))?;
    let (acked, _) = disk::read_json_lines::<Uuid>(&acks_path).map_err(open_err(acks_path))?;
    let acked: HashSet<Uuid> = acked.into_iter().collect();
    Ok(events
        .into_iter()
        .map(|s| s.event)
        .filter(|e| !acked.contains(&e.event_id))
        .collect())
}

fn log_damage(path: &Path, damage: &disk::LineDamage) {
    if damage.torn_tail {
        tracing::warn!(file = %path.display(), "skipped a torn last line in the outbox (an append interrupted by a crash, never reported as stored)");
    }
    if !damage.corrupt_lines.is_empty() {
        tracing::error!(file = %path.display(), lines = ?damage.corrupt_lines, "skipped corrupt lines in the outbox; the events on them are lost, check the disk");
    }
}

/// Rewrites the events file with the pending events only, then empties the acks file, and
/// reopens both for appending. Each new handle is installed as soon as its file is in place,
/// so a failure half-way never leaves a handle on a replaced file.
fn compact(
    dir: &Path,
    pending: &VecDeque<Pending>,
    events: &mut Option<File>,
    acks: &mut Option<File>,
) -> std::io::Result<()> {
    let mut contents = Vec::new();
    for p in pending {
        serde_json::to_writer(&mut contents, &p.stored)?;
        contents.push(b'\n');
    }
    *events = Some(disk::replace_keep_open(&dir.join(EVENTS_FILE), &contents)?);
    disk::sync_dir(dir)?;
    *acks = Some(disk::replace_keep_open(&dir.join(ACKS_FILE), b"")?);
    disk::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{Detector, ProcessEventKind, ProcessIdentity};

    fn event(n: u32) -> ProcessEvent {
        ProcessEvent {
            event_id: Uuid::new_v4(),
            kind: ProcessEventKind::DiedWhileUnwatched,
            job_id: api::JobId::parse(&format!("job-{n}")).unwrap(),
            process: ProcessIdentity {
                pid: n,
                start_time: 1,
            },
            exit: None,
            observed_at: Utc::now(),
            detector: Detector::Registry,
            last_progress: None,
        }
    }

    /// Queues `e` as an append does right after its write(2), before its flush completes.
    fn written_not_flushed(outbox: &Outbox, e: &ProcessEvent) -> u64 {
        let mut inner = outbox.lock();
        inner.written_seq += 1;
        let seq = inner.written_seq;
        let stored = StoredEvent {
            appended_at: Utc::now(),
            event: e.clone(),
        };
        let bytes = line_len(&stored).unwrap();
        Outbox::queue(
            &mut inner,
            Pending {
                stored,
                bytes,
                seq,
                flush_failed: false,
            },
        );
        seq
    }

    #[test]
    fn an_acknowledgement_before_the_flush_waits_for_it_and_a_failed_flush_lets_it_go() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::open(dir.path(), OutboxLimits::default()).unwrap());
        for flushed in [true, false] {
            let e = event(if flushed { 1 } else { 2 });
            let seq = written_not_flushed(&outbox, &e);
            // Handed to the delivery before the flush.
            assert_eq!(outbox.peek(10), vec![e.clone()]);
            let acking = Arc::clone(&outbox);
            let id = e.event_id;
            let ack = std::thread::spawn(move || acking.acknowledge(&[id]).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(
                !ack.is_finished(),
                "the acknowledgement waits for the flush"
            );
            assert_eq!(outbox.stats().queued, 1);
            let result = if flushed {
                Ok(())
            } else {
                Err(std::io::Error::other("injected"))
            };
            outbox.flush_done(seq, id, result);
            assert_eq!(ack.join().unwrap(), 1);
            assert_eq!(outbox.stats().queued, 0);
        }
        assert_eq!(outbox.flush_failures(), 1);
    }

    #[test]
    fn compaction_after_acks_keeps_appending_to_the_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let events: Vec<ProcessEvent> = (0..20).map(event).collect();
        for e in &events {
            outbox.append(e.clone()).unwrap();
        }
        let acked: Vec<Uuid> = events[..10].iter().map(|e| e.event_id).collect();
        assert_eq!(outbox.acknowledge(&acked).unwrap(), 10);
        // Compacted: only the pending events are left, and no acks.
        let lines = std::fs::read_to_string(dir.path().join(EVENTS_FILE)).unwrap();
        assert_eq!(lines.lines().count(), 10);
        assert_eq!(std::fs::read(dir.path().join(ACKS_FILE)).unwrap(), b"");
        let late = event(99);
        outbox.append(late.clone()).unwrap();
        outbox.acknowledge(&[events[10].event_id]).unwrap();
        drop(outbox);
        let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let pending = outbox.peek(100);
        assert_eq!(pending.len(), 10);
        assert_eq!(pending[0], events[11]);
        assert_eq!(pending[9], late);
        assert_eq!(
            outbox.stats().queued_bytes,
            std::fs::metadata(dir.path().join(EVENTS_FILE))
                .unwrap()
                .len()
        );
    }
}
