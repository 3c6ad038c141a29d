//! Durable outbox of process events for the OMA, and the task that delivers it.
//!
//! [`Outbox::append`] returns only once the event is fsynced; with [`FlushOrder::Parallel`]
//! (the default) the event is handed to the delivery as soon as it is written, so the POST to
//! the OMA runs while the `fdatasync` is in flight. [`delivery::deliver`] sends the oldest
//! events in batches to `{oma}/api/v1/watchdog/events` and removes exactly the ids the OMA
//! acknowledges, once their local flush has completed too, retrying with capped exponential
//! backoff and jitter for as long as it takes. A restart resumes from the files.

pub mod crash;
pub mod delivery;
pub mod omas;
pub mod spill;
mod store;

use std::path::PathBuf;

pub use delivery::{DeliveryConfig, OmaClient, deliver, deliver_with};
pub use store::{Outbox, read_pending};

/// Name of the outbox's directory inside the state directory. The outbox is also the
/// daemon's journal: each event is written (fsynced) there once, and nowhere else.
pub const DIR_NAME: &str = "outbox";

/// What else must be durable before the outbox forgets events the OMA has acknowledged.
///
/// The daemon's registry records each death in memory and writes it a moment later, while
/// the outbox already holds the event on disk. At start the daemon takes a death still queued
/// in the outbox for recorded; so the outbox may forget an event only once the registry has
/// written what it knows, or a crash in between would report that death twice.
pub trait AckBarrier: Send + Sync + std::fmt::Debug {
    /// Makes the other records durable; an error keeps the events queued (they are sent
    /// again, and the OMA acknowledges them again without applying them twice).
    fn before_forgetting(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

impl AckBarrier for crate::registry::Registry {
    fn before_forgetting(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.flush()?)
    }
}

/// Told which events the OMA has acknowledged, once the outbox has forgotten them.
///
/// An acknowledged death means the OMA has recorded how the job ended, with the job's last
/// progress (the event carries it): the daemon then forgets that progress, so the store does
/// not keep every job the VMA ever ran.
pub trait AckObserver: Send + Sync + std::fmt::Debug {
    /// `events` were acknowledged and are forgotten. Called on the delivery's blocking
    /// thread, outside the outbox's lock; it may block on disk I/O.
    fn acknowledged(&self, events: &[api::ProcessEvent]);
}

/// When a new event is handed to the delivery: after its local flush, or while it runs.
///
/// Either way [`Outbox::append`] returns only once the event is on disk, and an event is
/// forgotten only once the OMA has acknowledged it *and* its flush has completed. The
/// difference is the death's path to the OMA: `serial` puts the outbox's `fdatasync` and the
/// OMA's commit one after the other, `parallel` overlaps them (one flush on the path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FlushOrder {
    /// The POST starts while the append's `fdatasync` is in flight.
    #[default]
    Parallel,
    /// The POST starts after the append's `fdatasync` has returned (the order before
    /// 2026-12-04).
    Serial,
}

impl FlushOrder {
    /// Its name, as the flag spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parallel => "parallel",
            Self::Serial => "serial",
        }
    }
}

/// Bounds of the outbox on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// At most this many undelivered events.
    pub max_events: u64,
    /// At most this many bytes of undelivered events (as stored, one JSON line each).
    pub max_bytes: u64,
}

impl Default for OutboxLimits {
    /// 100,000 events or 64 MiB: weeks of deaths at any realistic rate, and small enough
    /// that loading and compacting the file stays well under a second.
    fn default() -> Self {
        Self {
            max_events: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Counters of the outbox, for `/health` and metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct OutboxStats {
    /// Events waiting for the OMA's acknowledgement.
    pub queued: u64,
    /// Their size on disk.
    pub queued_bytes: u64,
    /// Bound on `queued`.
    pub max_events: u64,
    /// Bound on `queued_bytes`.
    pub max_bytes: u64,
    /// Events acknowledged by the OMA since this process started.
    pub delivered: u64,
    /// Delivery attempts that failed since this process started.
    pub failed_attempts: u64,
    /// Events refused because the outbox was full, since this process started.
    pub refused: u64,
    /// Age of the oldest undelivered event, in seconds.
    pub oldest_age_seconds: Option<f64>,
}

/// Errors of the outbox. Each says which file failed and what to check.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The outbox directory or a file in it could not be created, read or opened.
    #[error(
        "cannot open the outbox at {path}: {source}; check that the state directory exists and is writable"
    )]
    Open {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An event or an acknowledgement could not be made durable.
    #[error(
        "cannot write the outbox file {path}: {source}; check free space on the state directory's filesystem"
    )]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The outbox is at its bound; the event was not stored.
    #[error(
        "outbox full ({queued}/{max_events} events, {queued_bytes}/{max_bytes} bytes): the event was not stored; the OMA has not acknowledged events for a while, check that it is reachable and accepts the watchdog's token"
    )]
    Full {
        /// Events queued.
        queued: u64,
        /// Bound on events.
        max_events: u64,
        /// Bytes queued.
        queued_bytes: u64,
        /// Bound on bytes.
        max_bytes: u64,
    },
    /// What must be durable before acknowledged events are forgotten could not be written.
    #[error(
        "acknowledged events are kept in the outbox (and will be sent again) because the records they depend on could not be written first: {0}"
    )]
    Barrier(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An event could not be encoded as JSON.
    #[error("cannot encode event {event_id} for the outbox: {source}")]
    Encode {
        /// The event.
        event_id: uuid::Uuid,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}
