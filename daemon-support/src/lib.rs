//! What the two daemons (`vma-watchdog` and `oma`) do the same way, written once:
//!
//! - [`log_queue`]: the log writer, lines queued to a thread of their own, so that an output
//!   that takes nothing never stalls a daemon;
//! - [`LogFormat`]: the `--log-format` setting (`text` or `json`);
//! - [`priority`]: raising the daemon's CPU priority at start (a nice value);
//! - [`join_within`]: waiting for a daemon's tasks at shutdown, for a bounded time.

pub mod log_queue;
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
