//! The OMA's log: text or JSON lines on stdout, through the queue of [`daemon_support::log_queue`], so that a
//! stdout that takes nothing (a stuck journal, a full pipe nobody reads) never stalls the
//! threads that commit deaths and answer requests. Lines dropped once the queue is full are
//! counted in `/health` ([`dropped_lines`]).

use tracing_subscriber::EnvFilter;

pub use daemon_support::log_queue::{LogGuard, dropped_lines};

/// Installs the global logger on stdout (`json` lines or text), with at most `queued_lines`
/// lines waiting for it. The level comes from `RUST_LOG` (default `info`).
pub fn init(format: daemon_support::LogFormat, queued_lines: u32) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = daemon_support::log_queue::queued(std::io::stdout(), queued_lines);
    // Colours only on a terminal: escape codes in a log file or the journal are noise.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(writer);
    if format == daemon_support::LogFormat::Json {
        logs.json().init();
    } else {
        logs.init();
    }
    guard
}
