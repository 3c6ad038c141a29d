//! What the two daemons (`vma-watchdog` and `oma`) do the same way, written once:
//!
//! - [`log_queue`]: the log writer, lines queued to a thread of their own, so that an output
//!   that takes nothing never stalls a daemon;
//! - [`LogFormat`]: the `--log-format` setting (`text` or `json`);
//! - [`priority`]: raising the daemon's CPU priority at start (a nice value);
//! - [`join_within`]: waiting for a daemon's tasks at shutdown, for a bounded time;
//! - [`metrics`]: the `/metrics` listener and endpoint, and the metric families both daemons have;
//! - [`notify`]: systemd's readiness, status and watchdog notifications (`Type=notify`).

pub mod log_queue;
pub mod metrics;
pub mod notify;
pub mod priority;

use std::time::Duration;

/// Output format of a daemon's log (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    #[default]
    Text,
}

/// Completes once `stop` says true, or once its sender is gone (a daemon whose stopping side
/// has vanished must stop as well). Every loop of both daemons waits on it beside its work.
pub async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// The permission bits of the file at `path` that let users other than its owner at it, when
/// there are any: a secret file (a token, a key) must have none. `None` also when the file
/// cannot be read; reading it is what reports that.
pub fn shared_mode(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then_some(mode & 0o7777)
}

/// Waits for `tasks` to end, all of them together for at most `grace`; those still running
/// then are aborted, and their names returned (so the caller can say which part of the daemon
/// did not stop in time). A daemon at SIGTERM stops its loops this way: each finishes the step
/// it is in (a recovery run's current write, an outbox fsync), but a stuck one cannot keep the
/// process from exiting.
pub async fn join_within(
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    grace: Duration,
) -> Vec<&'static str> {
    let deadline = tokio::time::Instant::now() + grace;
    let mut late = Vec::new();
    for (name, mut task) in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            late.push(name);
        }
    }
    late
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bits_for_others_make_a_file_shared() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(shared_mode(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(shared_mode(&path), Some(0o640));
        assert_eq!(shared_mode(&dir.path().join("missing")), None);
    }

    #[tokio::test]
    async fn a_dropped_sender_counts_as_stopped() {
        let (stop, rx) = tokio::sync::watch::channel(false);
        drop(stop);
        tokio::time::timeout(Duration::from_secs(5), stopped(rx))
            .await
            .expect("stopped returns once the sender is gone");
    }

    #[tokio::test]
    async fn tasks_that_end_are_awaited_and_a_stuck_one_is_cut_off_and_named() {
        let quick = tokio::spawn(async {});
        let stuck = tokio::spawn(std::future::pending::<()>());
        let started = std::time::Instant::now();
        let late = join_within(
            vec![("quick", quick), ("stuck", stuck)],
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(late, ["stuck"]);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
