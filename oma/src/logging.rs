//! The OMA's log: text or JSON lines on stdout, through a queue to a writer thread of its
//! own, so that a stdout that takes nothing (a stuck journal, a full pipe nobody reads) never
//! stalls the threads that commit deaths and answer requests. Past the queue's size new lines
//! are dropped and counted ([`dropped_lines`], shown in `/health`). The watchdog's log works
//! the same way (`vma_watchdog::logging`).

use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines that may wait for stdout before new ones are dropped, by default
/// (`--log-queue-lines`).
pub const QUEUED_LINES: u32 = 16_384;

/// How long the end of `main` waits for the queued lines to be written.
const FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// Counts the lines dropped because stdout did not take them, once the logger is installed.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the log's writer thread. Dropping it writes out the lines still queued, waiting
/// [`FLUSH_LIMIT`] at most: tracing-appender's own guard waits without a limit once its queue
/// is full (it then prints to the same stuck stdout), so it is dropped on a thread of its own.
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

/// Installs the global logger on stdout (`json` lines or text), with at most `queued_lines`
/// lines waiting for it. The level comes from `RUST_LOG` (default `info`).
pub fn init(json: bool, queued_lines: u32) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(queued_lines as usize)
        .thread_name("log-writer")
        .finish(std::io::stdout());
    let _ = DROPPED.set(writer.error_counter());
    // Colours only on a terminal: escape codes in a log file or the journal are noise.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(writer);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    LogGuard(Some(guard))
}

/// Log lines dropped so far because stdout did not take them in time (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
