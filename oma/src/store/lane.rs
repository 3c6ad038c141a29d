//! The lane of writes that can wait: the poller's progress commits go through it, a death
//! never does.
//!
//! Why: on SQLite the store has one connection, and sqlx hands it out first come, first
//! served. At fleet size a thousand VMAs' feed answers arrive every few seconds, each a
//! transaction; when a death's intake asked for the connection behind dozens of them, it
//! waited for every one (kill-to-commit p99 2.1 s at 1,000 VMAs / 20,000 jobs). With at most
//! [`SQLITE_LANE`] background writers holding or awaiting a connection, a death waits for at
//! most that many transactions, whatever the fleet's size. On PostgreSQL the lane is a quarter
//! of the pool, so the poller can never hold every connection either (start fences take up
//! to half; intake, recovery and the API keep the rest).

use super::{Backend, PG_CONNECTIONS};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Background writers at once on SQLite: its single connection serialises them anyway.
const SQLITE_LANE: usize = 1;

/// The lane's permits, shared by every clone of the store.
#[derive(Debug, Clone)]
pub(crate) struct Lane(Arc<Semaphore>);

/// A place in the lane, held for the length of one background transaction.
#[derive(Debug)]
pub struct LanePermit {
    _permit: OwnedSemaphorePermit,
    /// How long the writer waited for its place.
    pub waited: Duration,
}

impl Lane {
    /// The lane for `backend`.
    pub(crate) fn new(backend: Backend) -> Self {
        let width = match backend {
            Backend::Sqlite => SQLITE_LANE,
            Backend::Postgres => PG_CONNECTIONS as usize / 4,
        };
        Self(Arc::new(Semaphore::new(width)))
    }

    /// Waits for a place in the lane.
    pub(crate) async fn enter(&self) -> LanePermit {
        let started = Instant::now();
        let permit = Arc::clone(&self.0)
            .acquire_owned()
            .await
            .expect("the lane's semaphore is never closed");
        LanePermit {
            _permit: permit,
            waited: started.elapsed(),
        }
    }
}
