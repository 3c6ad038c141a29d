//! Logging: human text or JSON lines on stderr, and the one structured line per death.
//!
//! Lines go through the queue of `daemon_support::log_queue` (`--log-queue-lines`), so that a stderr
//! that takes nothing never stalls the threads that see and deliver deaths; lines dropped once
//! it is full are counted in `/health` ([`dropped_lines`]).
//!
//! The JSON format is our own small formatter rather than tracing-subscriber's: a field
//! declared in an event but without a value (an unknown exit code) comes out as `null`, so
//! every death line has the same keys whatever is known about it.

use std::fmt;

use api::{Detector, ExitStatus, ProcessIdentity};
use chrono::{SecondsFormat, Utc};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub use daemon_support::LogFormat;

/// The global logger could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the logger: {0}; was a logger already installed in this process?")]
pub struct LoggingError(#[source] Box<dyn std::error::Error + Send + Sync>);

pub use daemon_support::log_queue::{LogGuard, dropped_lines};

/// Installs the global logger on stderr, with at most `queued_lines` lines waiting for it. The
/// level comes from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat, queued_lines: u32) -> Result<LogGuard, LoggingError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = daemon_support::log_queue::queued(std::io::stderr(), queued_lines);
    // Colours only on a terminal: escape codes in a log file or the journal are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
        LogFormat::Text => builder.try_init(),
    }
    .map_err(LoggingError)?;
    Ok(guard)
}

/// Name of a detector as it appears in logs and events (`ebpf`, `procfs`, `registry`).
pub fn detector_name(d: Detector) -> &'static str {
    match d {
        Detector::Ebpf => "ebpf",
        Detector::Procfs => "procfs",
        Detector::Registry => "registry",
    }
}

/// Name of a way of finding a process as it appears in logs and events (`scan`, `exec`, ...).
pub fn found_by_name(f: api::FoundBy) -> &'static str {
    match f {
        api::FoundBy::Started => "started",
        api::FoundBy::Exec => "exec",
        api::FoundBy::Scan => "scan",
        api::FoundBy::Tracked => "tracked",
    }
}

/// Writes the one log line of a death. `event` is `process_exited` or `died_while_unwatched`;
/// `exit` is `None` when nothing is known of how it ended, and `job_id` is `None` for a matching
/// process that named no job (its death is logged but cannot be reported to the OMA).
pub fn death(
    event: &str,
    job_id: Option<&str>,
    process: ProcessIdentity,
    exit: Option<&ExitStatus>,
    detector: Detector,
    event_id: Option<uuid::Uuid>,
) {
    let exit = exit.filter(|e| !e.is_unknown());
    tracing::info!(
        event,
        job_id,
        pid = process.pid,
        start_time = process.start_time,
        exit_code = exit.and_then(|e| e.code),
        signal = exit.and_then(|e| e.signal),
        core_dumped = exit.map(|e| e.core_dumped),
        oom_killed = exit.map(|e| e.oom_killed),
        detector = detector_name(detector),
        event_id = event_id.map(|id| id.to_string()),
        "migratekit process died"
    );
}

/// JSON lines: `timestamp`, `level`, `target`, `message` and every field of the event.
#[derive(Debug, Clone, Copy)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut map = Map::new();
        map.insert(
            "timestamp".into(),
            Utc::now()
                .to_rfc3339_opts(SecondsFormat::Micros, true)
                .into(),
        );
        map.insert("level".into(), meta.level().as_str().into());
        map.insert("target".into(), meta.target().into());
        // Declared fields first, as null: those recorded below overwrite them.
        for field in meta.fields() {
            map.insert(field.name().into(), Value::Null);
        }
        event.record(&mut JsonVisitor(&mut map));
        writeln!(writer, "{}", Value::Object(map))
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_of(f: impl FnOnce()) -> Vec<Value> {
        let buf = Buffer::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_death_line_has_every_key_with_null_for_the_unknown() {
        let p = ProcessIdentity {
            pid: 42,
            start_time: 4200,
        };
        let segv = ExitStatus::from_wait_status(0x80 | 11, false);
        let lines = lines_of(|| {
            death(
                "process_exited",
                Some("job-1"),
                p,
                Some(&segv),
                Detector::Procfs,
                None,
            );
            death(
                "died_while_unwatched",
                Some("job-2"),
                p,
                None,
                Detector::Registry,
                None,
            );
        });
        let known = &lines[0];
        assert_eq!(known["event"], "process_exited");
        assert_eq!(known["job_id"], "job-1");
        assert_eq!(
            (known["pid"].as_u64(), known["start_time"].as_u64()),
            (Some(42), Some(4200))
        );
        assert_eq!(known["exit_code"], Value::Null);
        assert_eq!(
            (known["signal"].as_i64(), known["core_dumped"].as_bool()),
            (Some(11), Some(true))
        );
        assert_eq!(known["detector"], "procfs");
        assert_eq!(known["level"], "INFO");
        let unknown = &lines[1];
        for key in [
            "exit_code",
            "signal",
            "core_dumped",
            "oom_killed",
            "event_id",
        ] {
            assert!(
                unknown.get(key).is_some_and(Value::is_null),
                "{key} in {unknown}"
            );
        }
        assert_eq!(unknown["detector"], "registry");
    }
}
