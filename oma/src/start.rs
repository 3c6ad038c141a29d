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
use crate::job::on_start_answer;
use crate::model::{FailureClass, JobStatus};
use crate::store::{JobRecord, StoreError};
use crate::vma_client::{StartAnswer, VmaAnswer};
use api::StartJobRequest;

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
            Ok(on_start_answer(current, &answer, now))
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
