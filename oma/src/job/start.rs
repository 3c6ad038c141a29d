//! The VMA's answer to a start request, and what it does to the job (see `crate::start` for
//! the transaction shape around it).

use super::{Verdict, adopt, audit_only, draft, end_on_exit, finalize, recorded_identity};
use crate::model::{Actor, FailureClass};
use crate::store::{JobChange, JobRecord};
use crate::vma_client::StartAnswer;
use api::JobProcessState;
use serde_json::json;

/// What the VMA's start answer does to the job as it is now. `None` when it changes nothing
/// (the watchdog's `process_started` event recorded the same process first).
pub fn on_start_answer(current: &JobRecord, answer: &StartAnswer, now: i64) -> Option<JobChange> {
    let from = current.job.status;
    let evidence = json!({ "vma_answer": answer });
    let only = |action| {
        Some(audit_only(
            current,
            Actor::Operator,
            action,
            evidence.clone(),
        ))
    };
    let change = |action, after: JobRecord, class| {
        let to = after.job.status;
        Some(JobChange {
            request_stop: false,
            audit: vec![draft(
                Actor::Operator,
                action,
                from,
                to,
                class,
                evidence.clone(),
            )],
            after,
        })
    };
    if from.is_final() {
        return Some(after_final(current, answer, evidence));
    }
    let recorded = recorded_identity(current);
    match answer {
        StartAnswer::Started {
            state: JobProcessState::Running { process, .. },
        } => {
            if recorded.is_some_and(|r| r.start_time > process.start_time) {
                return only("stale_attempt");
            }
            let mut after = current.clone();
            adopt(&mut after, *process, now);
            (after != *current)
                .then(|| change("started", after, None))
                .flatten()
        }
        StartAnswer::Started {
            state: JobProcessState::Exited { process, exit, .. },
        } => {
            if recorded.is_some_and(|r| r != *process) {
                return only("stale_attempt");
            }
            let (after, verdict, _) = end_on_exit(current, Some(*process), Some(exit), None, now);
            change(verdict.action, after, verdict.class)
        }
        StartAnswer::Refused { status, error, .. } => {
            if recorded.is_some() {
                // A process was recorded meanwhile (by an event): the refusal is not the
                // whole story, so it only reaches the trail.
                return only("start_refused");
            }
            let verdict = Verdict::failed(
                FailureClass::StartRefused,
                format!(
                    "the VMA refused to start migratekit (HTTP {status} {error}); check the \
                     job's parameters and the VMA's configuration, then create a new job"
                ),
            );
            let after = finalize(current, &verdict, now);
            change("start_refused", after, verdict.class)
        }
        StartAnswer::AlreadyRunning { .. } => only("start_conflict"),
        StartAnswer::Unreachable { .. } => only("start_unreachable"),
    }
}

/// An operator cancelled the job while the start was in flight: record what the VMA said,
/// and when a process runs for the final job, have it stopped (`crate::stop`).
fn after_final(
    current: &JobRecord,
    answer: &StartAnswer,
    evidence: serde_json::Value,
) -> JobChange {
    let running = matches!(
        answer,
        StartAnswer::Started {
            state: JobProcessState::Running { .. }
        }
    );
    JobChange {
        request_stop: running,
        ..audit_only(current, Actor::Operator, "start_after_final", evidence)
    }
}
