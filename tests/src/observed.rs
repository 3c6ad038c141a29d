//! What really happened, read back from the logs after the fact: when the watchdog was down
//! (from the harness's SIGKILL or SIGTERM to the restarted watchdog's `watchdog_ready` line),
//! which deaths it recorded, and when each stand-in ended on its own (its `ending` line).
//!
//! The kill tests judge a job by these facts rather than by a prediction of when a process
//! would end, so that a slow or loaded machine (a VMA is often both) changes no verdict.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::watchdog::Watchdog;

/// One stretch of time in which no watchdog watched: from the moment the harness signalled
/// it (before `kill(2)`) to the restarted watchdog's `watchdog_ready` line, which it logs
/// once its detector is attached and `/proc` is reconciled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downtime {
    /// Just before the harness sent SIGKILL or SIGTERM.
    pub down: SystemTime,
    /// The restarted watchdog's ready line; `None` while it is still down.
    pub ready: Option<SystemTime>,
}

/// A stand-in's own account of its end (`migratekit_standin::ENDING`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandinEnd {
    /// The wall clock just before the process ended.
    pub at: SystemTime,
    /// How its 100 % `completed` report was answered: `accepted` (HTTP 200), `refused`
    /// (anything else, e.g. no watchdog listening), or `none` (it sent none).
    pub completed: String,
}

/// The `watchdog_ready` lines of the watchdog's log (every start appends to it), in order.
pub fn ready_times(log: &str) -> Vec<SystemTime> {
    json_lines(log)
        .filter(|v| v["event"] == "watchdog_ready")
        .filter_map(|v| timestamp(&v))
        .collect()
}

/// Pairs each of `downs` (the harness's stops) with the first ready line after it: the start
/// that ended that downtime.
pub fn downtimes(downs: &[SystemTime], ready: &[SystemTime]) -> Vec<Downtime> {
    downs
        .iter()
        .map(|&down| Downtime {
            down,
            ready: ready.iter().copied().filter(|&r| r >= down).min(),
        })
        .collect()
}

/// The death events (`process_exited`, `died_while_unwatched`) the watchdog logged for
/// `job_id`, in order.
pub fn deaths_logged(log: &str, job_id: &str) -> Vec<String> {
    json_lines(log)
        .filter(|v| v["job_id"] == job_id)
        .filter_map(|v| match v["event"].as_str() {
            Some(e @ ("process_exited" | "died_while_unwatched")) => Some(e.to_owned()),
            _ => None,
        })
        .collect()
}

/// The stand-in's `ending` line in its log (the watchdog's `--launch-log-dir`), if it
/// ended on its own.
pub fn standin_end(job_log: &Path) -> Option<StandinEnd> {
    let text = std::fs::read_to_string(job_log).ok()?;
    let line = text
        .lines()
        .rfind(|l| l.starts_with(migratekit_standin::ENDING))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    };
    let us: u64 = field("unix_us")?.parse().ok()?;
    Some(StandinEnd {
        at: SystemTime::UNIX_EPOCH + Duration::from_micros(us),
        completed: field("completed")?.to_owned(),
    })
}

/// Whether a death that happened no earlier than `from` may rightly be reported as
/// `died_while_unwatched`: no watchdog logged it as seen (`recorded`), and a watchdog was
/// stopped after `from` or was down at `from` (its downtime ends at a ready line after
/// `from`). The watchdog that was up may have been killed between the death and its record
/// of it, which is a real unwatched death too; either way, no timing is assumed.
pub fn may_be_unwatched(from: SystemTime, downtimes: &[Downtime], recorded: bool) -> bool {
    !recorded && downtimes.iter().any(|d| d.ready.is_none_or(|r| from <= r))
}

impl Watchdog {
    /// The downtimes so far, from the harness's stops and the log's ready lines.
    pub fn downtimes(&self) -> Vec<Downtime> {
        downtimes(self.stops(), &ready_times(&self.log()))
    }

    /// The death events this watchdog (any of its starts) logged for `job_id`.
    pub fn deaths_logged(&self, job_id: &str) -> Vec<String> {
        deaths_logged(&self.log(), job_id)
    }

    /// The stand-in's own account of its end, for a job this watchdog launched.
    pub fn standin_end(&self, job_id: &str) -> Option<StandinEnd> {
        standin_end(&self.dir().join("jobs").join(format!("{job_id}.log")))
    }
}

fn json_lines(log: &str) -> impl Iterator<Item = Value> + '_ {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
}

fn timestamp(v: &Value) -> Option<SystemTime> {
    let at = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str()?).ok()?;
    let us = u64::try_from(at.timestamp_micros()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_micros(us))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + s)
    }

    #[test]
    fn ready_lines_and_deaths_are_read_from_json_lines() {
        let log = r#"{"timestamp":"2026-12-03T23:00:00.000001Z","event":"watchdog_ready"}
not json
{"timestamp":"2026-12-03T23:00:01Z","event":"process_exited","job_id":"a"}
{"timestamp":"2026-12-03T23:00:02Z","event":"died_while_unwatched","job_id":"b"}
{"timestamp":"2026-12-03T23:00:03.5Z","event":"watchdog_ready"}"#;
        let ready = ready_times(log);
        assert_eq!(ready.len(), 2);
        assert_eq!(
            ready[1].duration_since(ready[0]).unwrap(),
            Duration::from_micros(3_499_999)
        );
        assert_eq!(deaths_logged(log, "a"), ["process_exited"]);
        assert_eq!(deaths_logged(log, "b"), ["died_while_unwatched"]);
        assert!(deaths_logged(log, "c").is_empty());
    }

    #[test]
    fn each_stop_is_paired_with_the_next_start_s_ready_line() {
        let d = downtimes(&[at(10), at(20)], &[at(0), at(12), at(5)]);
        assert_eq!(
            d,
            [
                Downtime {
                    down: at(10),
                    ready: Some(at(12))
                },
                Downtime {
                    down: at(20),
                    ready: None
                },
            ]
        );
    }

    #[test]
    fn a_death_may_be_unwatched_only_before_a_restart_is_ready_and_unrecorded() {
        let d = downtimes(&[at(10)], &[at(0), at(12)]);
        // Before the stop, not recorded: the watchdog may have died before recording it.
        assert!(may_be_unwatched(at(5), &d, false));
        // Inside the downtime (stop to ready).
        assert!(may_be_unwatched(at(11), &d, false));
        assert!(may_be_unwatched(at(12), &d, false));
        // After the ready line, nobody stopped it again: it was watched.
        assert!(!may_be_unwatched(at(13), &d, false));
        // Recorded as seen by a watchdog: it was watched, whenever it happened.
        assert!(!may_be_unwatched(at(11), &d, true));
        // No downtime at all.
        assert!(!may_be_unwatched(at(5), &[], false));
    }

    #[test]
    fn the_standin_s_ending_line_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("j.log");
        std::fs::write(
            &log,
            "migratekit-standin ready pid=1 job_id=j threads=5\n\
             migratekit-standin ending pid=1 job_id=j unix_us=1500000 completed=accepted\n",
        )
        .unwrap();
        let end = standin_end(&log).unwrap();
        assert_eq!(end.at, SystemTime::UNIX_EPOCH + Duration::from_millis(1500));
        assert_eq!(end.completed, "accepted");
        std::fs::write(&log, "migratekit-standin ready pid=1 job_id=j threads=5\n").unwrap();
        assert_eq!(standin_end(&log), None);
    }
}
