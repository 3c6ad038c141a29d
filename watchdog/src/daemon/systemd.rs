//! What the watchdog tells systemd (`Type=notify`, see `daemon_support::notify`): `READY=1`
//! once the detector is attached, `/proc` scanned, the registry reconciled and the API bound,
//! then a status line every few seconds: the detector, the processes watched, the outbox's
//! depth.

use std::future::Future;
use std::time::Duration;

use daemon_support::notify;

use super::Tracker;
use crate::logging::detector_name;

/// How often the status line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

impl Tracker {
    /// The line `systemctl status vma-watchdog` shows.
    pub(super) fn status_line(&self) -> String {
        let core = self.core();
        format!(
            "detector {}; watching {} migratekit process(es); outbox: {} event(s) queued",
            detector_name(core.detector.kind()),
            core.registry.running().len(),
            core.outbox.stats().queued
        )
    }
}

/// Says `READY=1` and keeps the status fresh until `stopped` completes. Called once the daemon
/// has started (`Daemon::start` returned) and every listener is bound.
pub(super) fn ready(tracker: &Tracker, stopped: impl Future<Output = ()> + Send + 'static) {
    notify::ready(&tracker.status_line());
    let tracker = tracker.clone();
    tokio::spawn(notify::refresh_status(
        STATUS_EVERY,
        move || tracker.status_line(),
        stopped,
    ));
}
