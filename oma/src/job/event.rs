//! A watchdog's process event (start, death, death while unwatched) and what it does to its
//! job.

use super::{
    adopt, audit_only, draft, end_on_exit, last_progress_evidence, last_word_evidence,
    recorded_identity,
};
use crate::model::Actor;
use crate::store::{IntakeOutcome, JobChange, JobRecord};
use api::{ProcessEvent, ProcessEventKind};
use serde_json::json;

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

fn only_audit(rec: &JobRecord, action: &'static str, ev: serde_json::Value) -> IntakeOutcome {
    IntakeOutcome {
        change: Some(audit_only(rec, Actor::WatchdogEvent, action, ev)),
        outcome: action,
        applied: false,
    }
}

/// Decides what one watchdog event does to its job:
/// - a final job only records it (`ignored_final`);
/// - a start of a process older than the recorded one, or a death of another attempt, only
///   records it (`stale_attempt`);
/// - a start of the recorded process again changes nothing (`duplicate_start`);
/// - any other start records the process as the current attempt (`process_recorded`);
/// - a death of the current (or a first) attempt ends the job ([`end_on_exit`], with the
///   last progress the watchdog sent along).
pub fn on_event(rec: &JobRecord, event: &ProcessEvent, now: i64) -> IntakeOutcome {
    let mut ev = evidence(event);
    let recorded = recorded_identity(rec);
    if rec.job.status.is_final() {
        return only_audit(rec, "ignored_final", ev);
    }
    let other_attempt = recorded.is_some_and(|r| r != event.process);
    if other_attempt {
        ev["recorded_pid"] = json!(rec.job.pid);
        ev["recorded_start_time"] = json!(rec.job.process_start_time);
    }
    let (after, action, class) = match event.kind {
        ProcessEventKind::ProcessStarted => {
            // A start of a process older than the recorded one is a late report about an
            // earlier attempt; a newer one takes the job over.
            if recorded.is_some_and(|r| event.process.start_time < r.start_time) {
                return only_audit(rec, "stale_attempt", ev);
            }
            let mut after = rec.clone();
            adopt(&mut after, event.process, now);
            if after == *rec {
                return IntakeOutcome {
                    change: None,
                    outcome: "duplicate_start",
                    applied: false,
                };
            }
            (after, "process_recorded", None)
        }
        ProcessEventKind::ProcessExited | ProcessEventKind::DiedWhileUnwatched => {
            if other_attempt {
                return only_audit(rec, "stale_attempt", ev);
            }
            let exit = match event.kind {
                ProcessEventKind::ProcessExited => event.exit.as_ref(),
                _ => None,
            };
            let last = event.last_progress.as_ref();
            let (after, verdict, applied) = end_on_exit(rec, Some(event.process), exit, last, now);
            if let Some(progress) = last {
                ev["last_progress"] = last_progress_evidence(progress, applied);
            }
            if verdict.is_unwatched_completion() {
                ev["last_word"] = last_word_evidence(&after);
            }
            (after, verdict.action, verdict.class)
        }
    };
    let (from, to) = (rec.job.status, after.job.status);
    IntakeOutcome {
        change: Some(JobChange {
            request_stop: false,
            audit: vec![draft(Actor::WatchdogEvent, action, from, to, class, ev)],
            after,
        }),
        outcome: "applied",
        applied: true,
    }
}
