//! What the OMA tells systemd (`Type=notify`, see `daemon_support::notify`): `READY=1` once
//! the database is migrated and the API bound, then a status line every few seconds (the
//! database, the active jobs the poller follows, its polls).

use std::future::Future;
use std::time::Duration;

use daemon_support::notify;

use crate::AppState;
use crate::store::Backend;

/// How often the status line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The line `systemctl status oma` shows. It reads the poller's counters in memory, never the
/// database, so a slow database cannot hold it up.
pub fn status_line(state: &AppState) -> String {
    let poller = state.poller.health();
    let database = match state.store.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgresql",
    };
    format!(
        "database {database}; polling {} active job(s), {} backing off; polls: {} ok, {} failed",
        poller.jobs_tracked, poller.jobs_backing_off, poller.polls_ok, poller.polls_failed
    )
}

/// Says `READY=1` and keeps the status fresh until `stopped` completes. Called once
/// `server::start` has returned: migrations are applied and the listener is bound.
pub fn ready(state: &AppState, stopped: impl Future<Output = ()> + Send + 'static) {
    notify::ready(&status_line(state));
    let state = state.clone();
    tokio::spawn(notify::refresh_status(
        STATUS_EVERY,
        move || status_line(&state),
        stopped,
    ));
}
