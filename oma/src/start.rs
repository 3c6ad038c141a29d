//! Starting a job's migratekit process on its VMA, and recording the VMA's answer.
//!
//! The transaction shape, so nothing is half-written and nothing is lost:
//!
//! 1. One transaction records the job `pending`, makes it the holder of its VM context and
//!    writes the `created` audit entry. Nothing has been asked of the VMA yet, so a crash here
//!    leaves either nothing or a plain pending job.
//! 2. `POST {vma}/api/v1/jobs/{id}/start` with [`api::StartJobRequest`] parameters, never a
//!    command line. Recovery leaves the job alone while this is in flight
//!    ([`crate::recovery::StartGuard`], which other OMAs on the same PostgreSQL database see
//!    as an advisory lock), so it cannot fail the job as `job_lost` because it asked the VMA a
//!    moment before the start arrived there. The call runs in a task of its
//!    own: a client hanging up cannot cancel it between the VMA's answer and step 3.
//! 3. One transaction records the answer, with an audit entry carrying it as evidence:
//!    - 201 running: the process `(pid, start_time)` becomes the current attempt and the job
//!      `replicating` (action `started`). The watchdog's own `process_started` event for the
//!      same process then changes nothing, whichever of the two arrives first.
//!    - 201 exited (it died before the answer): the final state from the exit evidence.
//!    - 409 `job_running`: something already runs the job there; the OMA asks the VMA for it
//!      and adopts it, or leaves the job pending for recovery (`start_conflict`).
//!    - any other 4xx: the VMA started nothing; the job is `failed` (`start_refused`) and its
//!      VM context released in the same transaction.
//!    - no answer (refused connection, timeout, 5xx): the job stays `pending` with a
//!      `start_unreachable` entry. Whether the process runs is unknown, so recovery decides by
//!      its normal rules: running → adopted, never heard of → `job_lost`, still unreachable →
//!      failed only after the stale threshold.
//!
//! A crash of the OMA between steps 2 and 3 leaves the job pending; startup recovery asks the
//! VMA and adopts the process or fails the job as `job_lost`.

use crate::AppState;
use crate::events::{adopt, finalize, recorded_identity, verdict_from_exit};
use crate::model::{Actor, FailureClass, JobStatus};
use crate::store::{AuditDraft, JobChange, JobRecord, StoreError};
use crate::vma_client::{StartAnswer, VmaAnswer};
use api::{JobProcessState, StartJobRequest};
use serde_json::json;

/// How the start request ended, for the API's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum StartOutcome {
    /// The VMA answered and the job records it (running, or already final).
    Recorded(JobRecord),
    /// The VMA refused; the job is failed.
    Refused {
        /// The failed job.
        job: JobRecord,
        /// The VMA's answer, in one sentence.
        detail: String,
    },
    /// The VMA gave no usable answer; the job stays pending for recovery.
    NoAnswer(JobRecord),
}

/// Asks the job's VMA to start it and records the answer (steps 2 and 3 above). The caller
/// holds the job's [`crate::recovery::StartGuard`] until this returns.
pub async fn start_and_record(
    state: &AppState,
    job_id: &str,
    vma_id: &str,
    params: &StartJobRequest,
) -> Result<StartOutcome, StoreError> {
    let answer = match state.store.get_vma(vma_id).await? {
        Some(vma) => {
            state
                .vma_client
                .start_job(&vma.base_url, job_id, params)
                .await
        }
        None => StartAnswer::Unreachable {
            reason: format!("no VMA is registered under id {vma_id}"),
        },
    };
    let answer = match answer {
        StartAnswer::AlreadyRunning { message } => {
            resolve_conflict(state, job_id, vma_id, message).await?
        }
        other => other,
    };
    let rec = state
        .store
        .mutate_job(job_id, |current, now| {
            Ok(record_answer(current, &answer, now))
        })
        .await?;
    Ok(match answer {
        StartAnswer::Refused {
            status,
            error,
            message,
        } if rec.job.failure_class == Some(FailureClass::StartRefused) => StartOutcome::Refused {
            job: rec,
            detail: format!("HTTP {status} {error}: {message}"),
        },
        StartAnswer::Unreachable { .. } | StartAnswer::AlreadyRunning { .. }
            if rec.job.status == JobStatus::Pending =>
        {
            StartOutcome::NoAnswer(rec)
        }
        _ => StartOutcome::Recorded(rec),
    })
}

/// A 409 `job_running` means a process already runs the job: ask the VMA which one, so the
/// job adopts it now instead of at the next recovery run.
async fn resolve_conflict(
    state: &AppState,
    job_id: &str,
    vma_id: &str,
    message: String,
) -> Result<StartAnswer, StoreError> {
    let Some(vma) = state.store.get_vma(vma_id).await? else {
        return Ok(StartAnswer::AlreadyRunning { message });
    };
    Ok(
        match state.vma_client.job_status(&vma.base_url, job_id).await {
            VmaAnswer::Known { state } => StartAnswer::Started { state },
            _ => StartAnswer::AlreadyRunning { message },
        },
    )
}

fn draft(
    action: &'static str,
    from: JobStatus,
    to: JobStatus,
    class: Option<FailureClass>,
    evidence: serde_json::Value,
) -> AuditDraft {
    AuditDraft {
        action,
        from: Some(from),
        to,
        actor: Actor::Operator,
        failure_class: class,
        evidence,
    }
}

/// The pure decision: what the VMA's start answer does to the job as it is now. `None` when
/// it changes nothing (the watchdog's `process_started` event recorded the same process first).
pub fn record_answer(current: &JobRecord, answer: &StartAnswer, now: i64) -> Option<JobChange> {
    let from = current.job.status;
    let evidence = json!({ "vma_answer": answer });
    let audit_only = |action| {
        Some(JobChange {
            request_stop: false,
            after: current.clone(),
            audit: vec![draft(action, from, from, None, evidence.clone())],
        })
    };
    if from.is_final() {
        // An operator cancelled the job while the start was in flight: record what the VMA
        // said, and when a process runs for the final job, have it stopped (`crate::stop`).
        let running = matches!(
            answer,
            StartAnswer::Started {
                state: JobProcessState::Running { .. }
            }
        );
        return audit_only("start_after_final").map(|change| JobChange {
            request_stop: running,
            ..change
        });
    }
    match answer {
        StartAnswer::Started {
            state: JobProcessState::Running { process, .. },
        } => {
            if recorded_identity(current).is_some_and(|r| r.start_time > process.start_time) {
                return audit_only("stale_attempt");
            }
            let mut after = current.clone();
            adopt(&mut after, *process, now);
            if after == *current {
                return None;
            }
            let to = after.job.status;
            Some(JobChange {
                request_stop: false,
                after,
                audit: vec![draft("started", from, to, None, evidence)],
            })
        }
        StartAnswer::Started {
            state: JobProcessState::Exited { process, exit, .. },
        } => {
            if recorded_identity(current).is_some_and(|r| r != *process) {
                return audit_only("stale_attempt");
            }
            let verdict = verdict_from_exit(Some(exit), current.progress_status.as_deref());
            let mut after = current.clone();
            adopt(&mut after, *process, now);
            let attempt = after.job.attempt;
            after = finalize(&after, &verdict, now);
            after.job.attempt = attempt;
            Some(JobChange {
                request_stop: false,
                audit: vec![draft(
                    "transition",
                    from,
                    after.job.status,
                    verdict.class,
                    evidence,
                )],
                after,
            })
        }
        StartAnswer::Refused { status, error, .. } => {
            if recorded_identity(current).is_some() {
                // A process was recorded meanwhile (by an event): the refusal is not the
                // whole story, so it only reaches the trail.
                return audit_only("start_refused");
            }
            let verdict = crate::events::Verdict {
                status: JobStatus::Failed,
                class: Some(FailureClass::StartRefused),
                message: Some(format!(
                    "the VMA refused to start migratekit (HTTP {status} {error}); check the \
                     job's parameters and the VMA's configuration, then create a new job"
                )),
            };
            let after = finalize(current, &verdict, now);
            Some(JobChange {
                request_stop: false,
                audit: vec![draft(
                    "start_refused",
                    from,
                    JobStatus::Failed,
                    verdict.class,
                    evidence,
                )],
                after,
            })
        }
        StartAnswer::AlreadyRunning { .. } => audit_only("start_conflict"),
        StartAnswer::Unreachable { .. } => audit_only("start_unreachable"),
    }
}
