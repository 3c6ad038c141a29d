//! Events the outbox could not write, kept in memory until it can.
//!
//! A full file system (`ENOSPC`) or a failing disk (`EIO` from `write` or `fdatasync`) must not
//! lose a death. When [`Outbox::append`] fails to write, the event is held here instead, in the
//! order it came, and:
//! - the daemon says so: `storage_degraded` once per episode, `event_held_in_memory` per event
//!   (both at error level), `/health`'s `storage` object turns `degraded` with the error and the
//!   number of events held, and the metrics `storage_degraded` and `events_held_in_memory` follow;
//! - [`run`] delivers the held events to the OMA straight from memory (the OMA applies each
//!   event id once), and retries writing them every second;
//! - once a write succeeds again, the held events go to the outbox in their order before any
//!   new one (`storage_recovered`): an event the OMA has acknowledged meanwhile is appended and
//!   acknowledged at once, so the outbox's files hold each event once, with one acknowledgement.
//!
//! What a restart while events are held loses is the memory only: the registry still lists the
//! process as running (its own write failed on the same disk), so the next start reports the
//! death as `died_while_unwatched`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use api::{EventBatch, ProcessEvent};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{OmaClient, Outbox, OutboxError};
use crate::metrics::Metrics;

/// At most this many events held in memory; beyond, a new event is refused and logged like
/// one refused by a full outbox (the registry keeps the death for the OMA's recovery).
pub const MAX_HELD: usize = 100_000;

/// How often held events are written again and delivered from memory.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// `/health`'s view of the state directory's storage.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct StorageHealth {
    /// `ok`, or `degraded` while events are held in memory because the outbox cannot be written.
    pub state: &'static str,
    /// The last write error, while degraded.
    pub error: Option<String>,
    /// Since when the outbox could not be written, while degraded.
    pub since: Option<DateTime<Utc>>,
    /// Events held in memory, not yet written to the outbox.
    pub held_in_memory: u64,
    /// Of those, how many the OMA has acknowledged already (delivered from memory).
    pub held_acknowledged: u64,
    /// Failed outbox writes since this process started.
    pub write_errors: u64,
    /// Held events written to the outbox once it could be written again, since start.
    pub written_after_recovery: u64,
    /// Events refused because [`MAX_HELD`] were held already, since start.
    pub refused: u64,
}

#[derive(Debug)]
struct Held {
    event: ProcessEvent,
    acked: bool,
}

#[derive(Debug, Default)]
struct Inner {
    held: VecDeque<Held>,
    /// The last write error and when the episode began, while degraded.
    degraded: Option<(String, DateTime<Utc>)>,
    write_errors: u64,
    written_after_recovery: u64,
    refused: u64,
}

/// The events the outbox could not write. One per daemon, shared by its event loop (which
/// appends through it) and [`run`].
#[derive(Debug, Default)]
pub struct Spill {
    inner: Mutex<Inner>,
    /// Rung when an event is held: [`run`]'s writes and deliveries both try at once.
    wake_writes: tokio::sync::Notify,
    wake_deliveries: tokio::sync::Notify,
}

/// The daemon's spill, for `/health` (one daemon per process).
static CURRENT: Mutex<Option<Weak<Spill>>> = Mutex::new(None);

/// The storage state of this process's daemon, for `/health` (`None` before it starts).
pub fn current_health() -> Option<StorageHealth> {
    let current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    current.as_ref().and_then(Weak::upgrade).map(|s| s.health())
}

impl Spill {
    /// An empty spill, made this process's for `/health`.
    pub fn new() -> Arc<Self> {
        let spill = Arc::new(Self::default());
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(&spill));
        spill
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `event` to `outbox`, or holds it in memory when the outbox cannot be written
    /// (or still holds older events). `Ok` means the event is durable or held; an error is
    /// the outbox's refusal (full, not encodable) or [`MAX_HELD`] reached. Blocks on disk I/O.
    pub fn append(&self, outbox: &Outbox, event: ProcessEvent) -> Result<(), OutboxError> {
        let mut inner = self.lock();
        if !inner.held.is_empty() {
            self.write_held(&mut inner, outbox);
        }
        if inner.held.is_empty() {
            match outbox.append(event.clone()) {
                Err(OutboxError::Write { path, source }) => {
                    let error = OutboxError::Write { path, source }.to_string();
                    self.failed(&mut inner, error);
                }
                other => return other,
            }
        }
        if inner.held.len() >= MAX_HELD {
            inner.refused += 1;
            tracing::error!(event = "event_refused_in_memory", event_id = %event.event_id,
                job_id = %event.job_id, held = inner.held.len(),
                "the outbox cannot be written and {MAX_HELD} events are held in memory already: this event is refused; the job status keeps the death for the OMA's recovery");
            return Err(OutboxError::Write {
                path: "memory".into(),
                source: std::io::Error::other("too many events held in memory"),
            });
        }
        tracing::error!(event = "event_held_in_memory", event_id = %event.event_id,
            job_id = %event.job_id, kind = ?event.kind, held = inner.held.len() + 1,
            "the outbox cannot be written: the event is held in memory, delivered to the OMA from there, and written once the state directory can be written again");
        inner.held.push_back(Held {
            event,
            acked: false,
        });
        drop(inner);
        self.wake_writes.notify_one();
        self.wake_deliveries.notify_one();
        Ok(())
    }

    /// Counts a failed write; the first of an episode turns the storage degraded.
    fn failed(&self, inner: &mut Inner, error: String) {
        inner.write_errors += 1;
        if inner.degraded.is_none() {
            tracing::error!(event = "storage_degraded", %error,
                "the outbox cannot be written (full or failing disk under the state directory): events are held in memory until it can; free space on the state directory's file system");
        }
        let since = inner
            .degraded
            .take()
            .map_or_else(Utc::now, |(_, since)| since);
        inner.degraded = Some((error, since));
    }

    /// Writes the held events to the outbox, oldest first, until one fails; those the OMA
    /// has acknowledged already are written with their acknowledgement.
    fn write_held(&self, inner: &mut Inner, outbox: &Outbox) {
        let mut written = 0u64;
        while let Some(front) = inner.held.front() {
            let event = front.event.clone();
            let written_now = if front.acked {
                outbox.append_acknowledged(event)
            } else {
                outbox.append(event)
            };
            match written_now {
                Ok(()) => {
                    inner.held.pop_front();
                    written += 1;
                }
                Err(error) => {
                    self.failed(inner, error.to_string());
                    break;
                }
            }
        }
        inner.written_after_recovery += written;
        if inner.held.is_empty()
            && let Some((_, since)) = inner.degraded.take()
        {
            let degraded_s = (Utc::now() - since).num_milliseconds() as f64 / 1000.0;
            tracing::info!(
                event = "storage_recovered",
                written,
                degraded_s,
                "the outbox can be written again: every event held in memory is now in it"
            );
        }
    }

    /// Writes what is held, if anything; returns whether nothing is held any more.
    pub fn retry_writes(&self, outbox: &Outbox) -> bool {
        let mut inner = self.lock();
        if inner.held.is_empty() {
            return true;
        }
        self.write_held(&mut inner, outbox);
        inner.held.is_empty()
    }

    /// Up to `max` held events the OMA has not acknowledged yet, oldest first.
    fn unacknowledged(&self, max: usize) -> Vec<ProcessEvent> {
        let inner = self.lock();
        let held = inner.held.iter().filter(|h| !h.acked);
        held.take(max).map(|h| h.event.clone()).collect()
    }

    /// Marks the held events among `ids` acknowledged; returns the other ids (written to the
    /// outbox meanwhile, to acknowledge there).
    fn acknowledged(&self, ids: &[Uuid]) -> Vec<Uuid> {
        let mut inner = self.lock();
        let mut elsewhere = Vec::new();
        for id in ids {
            match inner.held.iter_mut().find(|h| h.event.event_id == *id) {
                Some(held) => held.acked = true,
                None => elsewhere.push(*id),
            }
        }
        elsewhere
    }

    /// The queued death of `process` among the held events, if any.
    pub fn held_death(&self, process: api::ProcessIdentity) -> Option<ProcessEvent> {
        let inner = self.lock();
        let mut deaths = inner.held.iter().map(|h| &h.event);
        deaths
            .find(|e| e.process == process && e.kind != api::ProcessEventKind::ProcessStarted)
            .cloned()
    }

    /// For `/health` and the metrics.
    pub fn health(&self) -> StorageHealth {
        let inner = self.lock();
        StorageHealth {
            state: if inner.degraded.is_some() {
                "degraded"
            } else {
                "ok"
            },
            error: inner.degraded.as_ref().map(|(e, _)| e.clone()),
            since: inner.degraded.as_ref().map(|(_, since)| *since),
            held_in_memory: inner.held.len() as u64,
            held_acknowledged: inner.held.iter().filter(|h| h.acked).count() as u64,
            write_errors: inner.write_errors,
            written_after_recovery: inner.written_after_recovery,
            refused: inner.refused,
        }
    }
}

/// Acknowledges `ids` in the outbox (written there after the OMA acknowledged them).
fn acknowledge(outbox: &Outbox, ids: &[Uuid]) {
    if ids.is_empty() {
        return;
    }
    if let Err(error) = outbox.acknowledge(ids) {
        // They stay pending in the outbox: delivered again, acknowledged again, applied once.
        tracing::warn!(event = "held_ack_not_written", %error, events = ids.len(),
            "events acknowledged while held in memory are written, but their acknowledgement is not; they are sent again");
    }
}

/// How [`run`] reaches the OMA: the delivery's own client (its token and TLS files follow
/// SIGHUP), the events URL and this VMA's id.
#[derive(Debug, Clone)]
pub struct MemoryDelivery {
    /// The delivery's client.
    pub client: Arc<OmaClient>,
    /// The OMAs, in order of preference, for the held events' own failover.
    pub omas: Arc<super::omas::OmaUrls>,
    /// This VMA's id.
    pub vma_id: String,
    /// Where attempts are counted (`delivery_attempts_total{result="from_memory"}`).
    pub metrics: Arc<Metrics>,
}

/// Until `shutdown`: every [`RETRY_EVERY`] (or when an event is held), writes the held events
/// to the outbox, and delivers those still held to the OMA from memory.
///
/// The two run side by side, never one after the other: a delivery can hang for the OMA
/// client's whole request timeout (an OMA that accepts and never answers, a link that drops
/// every packet), and the held events must reach the disk within a retry of its freeing
/// all the same, since only the disk keeps them across a restart (soak seed
/// 16026862061546120504: a freed disk left unwritten for as long as a POST hung).
pub async fn run(
    spill: Arc<Spill>,
    outbox: Arc<Outbox>,
    delivery: Option<MemoryDelivery>,
    shutdown: impl Future<Output = ()>,
) {
    let deliveries = async {
        match &delivery {
            Some(delivery) => deliver_until_stopped(&spill, &outbox, delivery).await,
            // No OMA to deliver to (tests): only the writes.
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = shutdown => {}
        () = write_until_stopped(&spill, &outbox) => {}
        () = deliveries => {}
    }
}

/// Writes the held events to the outbox every [`RETRY_EVERY`] and whenever one is held.
async fn write_until_stopped(spill: &Arc<Spill>, outbox: &Arc<Outbox>) {
    loop {
        tokio::select! {
            () = spill.wake_writes.notified() => {}
            () = tokio::time::sleep(RETRY_EVERY) => {}
        }
        let (s, o) = (Arc::clone(spill), Arc::clone(outbox));
        let _ = tokio::task::spawn_blocking(move || s.retry_writes(&o)).await;
    }
}

/// Delivers what is still held every [`RETRY_EVERY`] and whenever an event is held.
async fn deliver_until_stopped(
    spill: &Arc<Spill>,
    outbox: &Arc<Outbox>,
    delivery: &MemoryDelivery,
) {
    loop {
        tokio::select! {
            () = spill.wake_deliveries.notified() => {}
            () = tokio::time::sleep(RETRY_EVERY) => {}
        }
        deliver_held(spill, outbox, delivery).await;
    }
}

/// One attempt to deliver the held, unacknowledged events from memory.
async fn deliver_held(spill: &Arc<Spill>, outbox: &Arc<Outbox>, delivery: &MemoryDelivery) {
    let events = spill.unacknowledged(100);
    if events.is_empty() {
        return;
    }
    let deaths: Vec<_> = events
        .iter()
        .filter(|e| e.kind != api::ProcessEventKind::ProcessStarted)
        .map(|e| e.observed_at)
        .collect();
    let sent = events.len();
    let batch = EventBatch {
        vma_id: delivery.vma_id.clone(),
        events,
    };
    let (oma, base) = delivery.omas.pick();
    let url = format!("{base}/api/v1/watchdog/events");
    let result = delivery.client.post_events(&url, &batch).await;
    let outcome = match &result {
        Err(e) if e.status().is_none_or(|s| s.is_server_error()) => {
            super::omas::Outcome::Unavailable
        }
        _ => super::omas::Outcome::Answered,
    };
    delivery.omas.record(oma, outcome);
    match result {
        Ok(ids) => {
            delivery.metrics.delivery_attempt("from_memory");
            delivery.metrics.deaths_acknowledged(&deaths);
            let elsewhere = spill.acknowledged(&ids);
            tracing::info!(
                event = "delivered_from_memory",
                sent,
                acknowledged = ids.len(),
                "delivered events held in memory to the OMA; they are written to the outbox once it can be written"
            );
            let outbox = Arc::clone(outbox);
            let _ = tokio::task::spawn_blocking(move || acknowledge(&outbox, &elsewhere)).await;
        }
        Err(error) => {
            delivery.metrics.delivery_attempt("from_memory_failed");
            tracing::warn!(event = "memory_delivery_failed", %error, sent,
                "delivering events held in memory to the OMA failed; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{Detector, ProcessEventKind, ProcessIdentity};

    fn event(n: u32) -> ProcessEvent {
        ProcessEvent {
            event_id: Uuid::now_v7(),
            kind: ProcessEventKind::ProcessExited,
            job_id: api::JobId::parse(&format!("job-{n}")).unwrap(),
            process: ProcessIdentity {
                pid: n,
                start_time: 1,
            },
            exit: None,
            observed_at: Utc::now(),
            detector: Detector::Procfs,
            last_progress: None,
        }
    }

    #[test]
    fn events_held_while_unwritable_are_written_in_order_and_acked_once() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), super::super::OutboxLimits::default()).unwrap();
        let spill = Spill::new();
        let first = event(1);
        spill.append(&outbox, first.clone()).unwrap();
        // A failed write, as `append` records it (a real one needs a full or failing file
        // system: watchdog/tests/full_disk.rs), then two events held.
        let (a, b) = (event(2), event(3));
        let mut inner = spill.lock();
        spill.failed(&mut inner, "simulated".into());
        for e in [&a, &b] {
            inner.held.push_back(Held {
                event: e.clone(),
                acked: false,
            });
        }
        drop(inner);
        assert_eq!(spill.health().state, "degraded");
        assert_eq!(spill.health().held_in_memory, 2);
        assert_eq!(spill.acknowledged(&[a.event_id]), Vec::<Uuid>::new());
        assert_eq!(spill.unacknowledged(10), vec![b.clone()]);
        // A new event waits behind the held ones: the retry in `append` writes all, in order.
        let c = event(4);
        spill.append(&outbox, c.clone()).unwrap();
        let health = spill.health();
        assert_eq!((health.state, health.held_in_memory), ("ok", 0));
        assert_eq!(health.written_after_recovery, 2);
        // `a` was acknowledged while held: written and acknowledged at once; the rest pend.
        let ids: Vec<Uuid> = outbox.peek(10).iter().map(|e| e.event_id).collect();
        assert_eq!(ids, vec![first.event_id, b.event_id, c.event_id]);
        assert_eq!(outbox.stats().delivered, 1);
    }
}
