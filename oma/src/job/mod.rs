//! A job's lifecycle: every rule that changes a job's state lives here, once.
//!
//! Each path that learns something about a job calls one pure function of this module with
//! the job as read and the evidence, and gets back the [`JobChange`] to commit (the new row and
//! its audit entries); the store writes it in one fenced transaction.
//!
//! | Evidence                                   | Caller                     | Function                 |
//! |--------------------------------------------|----------------------------|--------------------------|
//! | a watchdog process event                   | intake (`store::runs`)     | [`on_event`]             |
//! | a progress report polled from the VMA      | `poller`                   | [`on_progress`]          |
//! | the VMA's answer to a start request        | `start`                    | [`on_start_answer`]      |
//! | recovery's decision (`recovery::decide`)   | `recovery`                 | [`on_decision`]          |
//! | an operator's cancel                       | `routes::jobs`             | [`cancel`]               |
//!
//! They share these steps, each written once:
//! - [`adopt`]: record a process as the job's current attempt; a job still `pending` or
//!   `initializing` starts replicating ([`begin_replicating`]).
//! - [`apply_progress`]: copy a newer progress report's figures ([`is_newer`]).
//! - [`verdict_from_exit`]: the final state that exit evidence implies, given migratekit's
//!   own last word ([`LastWord`]: a `failed` report is the cause; a `completed` report
//!   decides an end whose status is unknown); [`end_on_exit`] applies the last progress
//!   first, then the verdict.
//! - [`finalize`]: move the job to a final state (the store releases its VM context in the
//!   same transaction).
//! - [`superseded`]: whether a decision taken on an earlier read still holds.
//!
//! Invariants: a job leaves an active state only on evidence (a death, the VMA's answer,
//! silence past a threshold, an operator); nothing but an operator moves it out of a final
//! state; a report about another attempt (other pid or start time) only reaches the audit
//! trail; migratekit's own `failed` report is evidence, not a death: the job stays active,
//! and its VM context busy, until its process is confirmed gone.

mod cancel;
mod event;
mod progress;
mod recovery;
mod start;
mod verdict;

pub use cancel::cancel;
pub use event::on_event;
pub use progress::{
    apply_progress, is_newer, last_progress_evidence, on_progress, on_unmoved, reported_failure,
};
pub use recovery::{on_decision, superseded};
pub use start::on_start_answer;
pub use verdict::{
    COMPLETED_UNWATCHED, LastWord, TRANSITION, Verdict, end_on_exit, last_word_evidence,
    verdict_from_exit,
};

use crate::model::{Actor, FailureClass, JobStatus, from_ms};
use crate::store::{AuditDraft, JobChange, JobRecord};
use api::ProcessIdentity;

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

/// The one rule for "the process is running": a job still `pending` or `initializing`
/// becomes `replicating`, with `started_at` set if it was not. Returns whether the status
/// moved.
pub fn begin_replicating(rec: &mut JobRecord, now: i64) -> bool {
    let j = &mut rec.job;
    if !matches!(j.status, JobStatus::Pending | JobStatus::Initializing) {
        return false;
    }
    j.status = JobStatus::Replicating;
    j.started_at = j.started_at.or(Some(from_ms(now)));
    true
}

/// Records `process` as the job's current attempt (a new attempt when it is not the
/// recorded one; replacing a recorded one also forgets that attempt's failure report) and
/// starts the job replicating. Leaves the record untouched when it already says exactly that.
pub fn adopt(rec: &mut JobRecord, process: ProcessIdentity, now: i64) {
    let before = rec.clone();
    let recorded = recorded_identity(rec);
    if recorded != Some(process) {
        rec.job.attempt += 1;
    }
    // A failure report belongs to the attempt that made it; reports that came before any
    // process was recorded are the first attempt's own.
    if recorded.is_some_and(|r| r != process)
        && rec.progress_status == Some(api::ProgressStatus::Failed)
    {
        rec.progress_status = None;
        rec.job.error_message = None;
    }
    rec.job.pid = Some(i64::from(process.pid));
    rec.job.process_start_time = i64::try_from(process.start_time).ok();
    rec.job.started_at = rec.job.started_at.or(Some(from_ms(now)));
    begin_replicating(rec, now);
    if *rec != before {
        rec.job.updated_at = from_ms(now);
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
    after.recovery_note = None;
    after
}

/// An audit entry by `actor`.
fn draft(
    actor: Actor,
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
        actor,
        failure_class: class,
        evidence,
    }
}

/// A change that only appends one audit entry, leaving the job as it is.
fn audit_only(
    rec: &JobRecord,
    actor: Actor,
    action: &'static str,
    evidence: serde_json::Value,
) -> JobChange {
    let status = rec.job.status;
    JobChange {
        after: rec.clone(),
        audit: vec![draft(actor, action, status, status, None, evidence)],
        request_stop: false,
    }
}

#[cfg(test)]
pub(crate) mod testing;
