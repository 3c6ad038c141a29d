//! The log writer of both daemons (`vma-watchdog` on stderr, `oma` on stdout): lines go
//! through a queue to a writer thread of their own, so that an output that takes nothing (a
//! stuck journal, a full pipe nobody reads) never stalls the threads that see, deliver and
//! commit deaths. Past the queue's size new lines are dropped and counted ([`dropped_lines`],
//! which each daemon shows in `/health`); the outbox and the audit trail, not the log, are the
//! record of deaths.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines that may wait for the output before new ones are dropped, by default: minutes of a
/// busy daemon's log, a few MiB at most.
pub const DEFAULT_LINES: u32 = 16_384;

/// How long dropping a [`LogGuard`] (the end of `main`) waits for the queued lines.
const FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// Counts the lines dropped because the output did not take them, once [`queued`] has run.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the log's writer thread. Dropping it writes out the lines still queued, waiting
/// 2 s at most: tracing-appender's own guard waits for its thread without a limit
/// once its queue is full (and then prints to stdout), which a stuck output would turn into a
/// daemon that never exits. So the guard is dropped on a thread of its own, and left there.
#[must_use = "the log's queued lines are written out when this is dropped"]
#[derive(Debug)]
pub struct LogGuard(Option<WorkerGuard>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(guard) = self.0.take() else {
            return;
        };
        let (done, flushed) = std::sync::mpsc::channel();
        let flusher = std::thread::Builder::new()
            .name("log-flush".to_owned())
            .spawn(move || {
                drop(guard);
                let _ = done.send(());
            });
        if flusher.is_ok() {
            let _ = flushed.recv_timeout(FLUSH_LIMIT);
        }
    }
}

/// A writer for `tracing_subscriber` that queues up to `lines` lines for `out` and drops the
/// rest, and the guard that keeps its thread (`log-writer`). Call it once per process: its
/// drops are what [`dropped_lines`] counts.
pub fn queued<W: Write + Send + 'static>(out: W, lines: u32) -> (NonBlocking, LogGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(lines as usize)
        .thread_name("log-writer")
        .finish(out);
    let _ = DROPPED.set(writer.error_counter());
    (writer, LogGuard(Some(guard)))
}

/// Log lines dropped so far because the output did not take them in time (0 before
/// [`queued`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
