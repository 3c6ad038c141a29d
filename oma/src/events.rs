//! Pure decisions about watchdog process events, and the verdict from exit evidence that
//! recovery shares, so an exit means the same thing whichever path reports it.

use crate::model::{Actor, FailureClass, JobStatus, from_ms};
use crate::poller::apply_progress;
use crate::store::{AuditDraft, IntakeOutcome, JobChange, JobRecord};
use api::{ExitStatus, ProcessEvent, ProcessEventKind, ProcessIdentity, StoredProgress};
use serde_json::json;

/// How a job ends, given how its process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `completed` or `failed`.
    pub status: JobStatus,
    /// Set for `failed`.
    pub class: Option<FailureClass>,
    /// One sentence for the operator.
    pub message: Option<String>,
}

/// The final state that exit evidence implies. `exit` is `None` (or all unknown) when the
/// process ended unseen. `progress_status` is migratekit's own last word: an `exit(0)` after
/// migratekit reported `failed` is still a failure.
pub fn verdict_from_exit(exit: Option<&ExitStatus>, progress_status: Option<&str>) -> Verdict {
    let failed = |class, message: String| Verdict {
        status: JobStatus::Failed,
        class: Some(class),
        message: Some(message),
    };
    let Some(exit) = exit.filter(|e| !e.is_unknown()) else {
        // Same class either way (whether it succeeded is unknown), but the message says which:
        // an end nobody saw, or one the watchdog saw without being able to read its status
        // (its procfs detector on a kernel before 6.15, for a process init reaped first).
        let message = if exit.is_some() {
            "the watchdog saw migratekit end but could not read its exit status; whether the \
             replication finished is unknown: run it again"
        } else {
            "migratekit ended while nothing watched it; its exit status is unknown: run the \
             replication again"
        };
        return failed(FailureClass::DiedWhileUnwatched, message.into());
    };
    if exit.oom_killed {
        return failed(
            FailureClass::OomKilled,
            format!(
                "migratekit was killed by the kernel's OOM killer (signal {}); give the VMA more memory",
                exit.signal.unwrap_or(9)
            ),
        );
    }
    if let Some(signal) = exit.signal {
        let core = if exit.core_dumped {
            " (core dumped)"
        } else {
            ""
        };
        return failed(
            FailureClass::ProcessKilled,
            format!("migratekit was killed by signal {signal}{core}"),
        );
    }
    match exit.code {
        Some(0) if progress_status == Some("failed") => failed(
            FailureClass::VmaReportedFailure,
            "migratekit exited 0 but its last progress report said failed".into(),
        ),
        Some(0) => Verdict {
            status: JobStatus::Completed,
            class: None,
            message: None,
        },
        code => failed(
            FailureClass::ProcessExited,
            format!("migratekit exited with code {}", code.unwrap_or(-1)),
        ),
    }
}

/// The process identity recorded on a job, if any.
pub fn recorded_identity(rec: &JobRecord) -> Option<ProcessIdentity> {
    match (rec.job.pid, rec.job.process_start_time) {
        (Some(pid), Some(start)) => Some(ProcessIdentity {
            pid: u32::try_from(pid).ok()?,
            start_time: u64::try_from(start).ok()?,
        }),
        _ => None,
    }
}

/// Moves `rec` to the verdict's final state at `now`.
pub fn finalize(rec: &JobRecord, verdict: &Verdict, now: i64) -> JobRecord {
    let mut after = rec.clone();
    after.job.status = verdict.status;
    after.job.failure_class = verdict.class;
    after.job.error_message = verdict.message.clone();
    after.job.completed_at = Some(from_ms(now));
    after.job.updated_at = from_ms(now);
    after.job.stalled_since = None;
    after
}

/// Records `process` as the job's current attempt (and moves `pending`/`initializing` to
/// `replicating`). Leaves the record untouched when it already says exactly that.
pub fn adopt(rec: &mut JobRecord, process: ProcessIdentity, now: i64) {
    let before = rec.clone();
    if recorded_identity(rec) != Some(process) {
        rec.job.attempt += 1;
    }
    rec.job.pid = Some(i64::from(process.pid));
    rec.job.process_start_time = i64::try_from(process.start_time).ok();
    rec.job.started_at = rec.job.started_at.or(Some(from_ms(now)));
    if matches!(rec.job.status, JobStatus::Pending | JobStatus::Initializing) {
        rec.job.status = JobStatus::Replicating;
    }
    if *rec != before {
        rec.job.updated_at = from_ms(now);
    }
}

/// Whether `progress` is later than what the job holds. The watchdog numbers each job's
/// updates (`sequence`); the job keeps the number of the last one it applied, so a higher
/// number is newer. (`received_at` is the VMA's clock and the job keeps no copy of it; the
/// sequence alone orders updates from one watchdog.) Figures never move backwards: an older
/// or equal report, say one the poller already applied, changes nothing.
pub fn is_newer(rec: &JobRecord, progress: &StoredProgress) -> bool {
    let sequence = i64::try_from(progress.sequence).unwrap_or(i64::MAX);
    rec.progress_sequence.is_none_or(|held| sequence > held)
}

fn evidence(event: &ProcessEvent) -> serde_json::Value {
    json!({
        "event_id": event.event_id,
        "kind": event.kind,
        "pid": event.process.pid,
        "start_time": event.process.start_time,
        "exit": event.exit,
        "observed_at": event.observed_at,
        "detector": event.detector,
    })
}

fn audit_only(rec: &JobRecord, action: &'static str, evidence: serde_json::Value) -> IntakeOutcome {
    IntakeOutcome {
        change: Some(JobChange {
            request_stop: false,
            after: rec.clone(),
            audit: vec![AuditDraft {
                action,
                from: Some(rec.job.status),
                to: rec.job.status,
                actor: Actor::WatchdogEvent,
                failure_class: None,
                evidence,
            }],
        }),
        outcome: action,
        applied: false,
    }
}

/// Decides what one watchdog event does to its job.
pub fn decide_event(rec: &JobRecord, event: &ProcessEvent, now: i64) -> IntakeOutcome {
    let mut ev = evidence(event);
    let recorded = recorded_identity(rec);
    if rec.job.status.is_final() {
        return audit_only(rec, "ignored_final", ev);
    }
    let other_attempt = recorded.is_some_and(|r| r != event.process);
    if other_attempt {
        ev["recorded_pid"] = json!(rec.job.pid);
        ev["recorded_start_time"] = json!(rec.job.process_start_time);
    }
    let mut after = rec.clone();
    let (action, class) = match event.kind {
        ProcessEventKind::ProcessStarted => {
            // A start of a process older than the recorded one is a late report about an
            // earlier attempt; a newer one takes the job over.
            if recorded.is_some_and(|r| event.process.start_time < r.start_time) {
                return audit_only(rec, "stale_attempt", ev);
            }
            adopt(&mut after, event.process, now);
            if after == *rec {
                return IntakeOutcome {
                    change: None,
                    outcome: "duplicate_start",
                    applied: false,
                };
            }
            ("process_recorded", None)
        }
        ProcessEventKind::ProcessExited | ProcessEventKind::DiedWhileUnwatched => {
            if other_attempt {
                return audit_only(rec, "stale_attempt", ev);
            }
            let exit = match event.kind {
                ProcessEventKind::ProcessExited => event.exit.as_ref(),
                _ => None,
            };
            // migratekit's last word first, so the verdict and the final figures use it.
            if let Some(progress) = &event.last_progress {
                let newer = is_newer(rec, progress);
                ev["last_progress"] = json!({
                    "sequence": progress.sequence, "received_at": progress.received_at,
                    "status": progress.update.status, "percent": progress.update.percent,
                    "bytes_transferred": progress.update.bytes_transferred, "applied": newer,
                });
                if newer {
                    apply_progress(&mut after, progress, now);
                }
            }
            let verdict = verdict_from_exit(exit, after.progress_status.as_deref());
            adopt(&mut after, event.process, now);
            let attempt = after.job.attempt;
            after = finalize(&after, &verdict, now);
            after.job.attempt = attempt;
            ("transition", verdict.class)
        }
    };
    IntakeOutcome {
        change: Some(JobChange {
            request_stop: false,
            audit: vec![AuditDraft {
                action,
                from: Some(rec.job.status),
                to: after.job.status,
                actor: Actor::WatchdogEvent,
                failure_class: class,
                evidence: ev,
            }],
            after,
        }),
        outcome: "applied",
        applied: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_status_is_unwatched_and_says_whether_the_end_was_seen() {
        let seen = verdict_from_exit(Some(&ExitStatus::default()), Some("running"));
        let unseen = verdict_from_exit(None, Some("running"));
        for v in [&seen, &unseen] {
            assert_eq!(
                (v.status, v.class),
                (JobStatus::Failed, Some(FailureClass::DiedWhileUnwatched))
            );
        }
        assert!(
            seen.message
                .as_deref()
                .unwrap()
                .contains("saw migratekit end")
        );
        assert!(
            unseen
                .message
                .as_deref()
                .unwrap()
                .contains("nothing watched it")
        );
    }

    #[test]
    fn a_known_status_decides_the_class() {
        let killed = ExitStatus::from_wait_status(9, false);
        let exited = ExitStatus::from_wait_status(3 << 8, false);
        let success = ExitStatus::from_wait_status(0, false);
        let class = |e: &ExitStatus, p| verdict_from_exit(Some(e), p).class;
        assert_eq!(class(&killed, None), Some(FailureClass::ProcessKilled));
        assert_eq!(class(&exited, None), Some(FailureClass::ProcessExited));
        assert_eq!(class(&success, Some("completed")), None);
        assert_eq!(
            class(&success, Some("failed")),
            Some(FailureClass::VmaReportedFailure)
        );
    }
}
