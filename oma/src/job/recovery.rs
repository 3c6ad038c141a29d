//! Carrying out recovery's decision (`crate::recovery::decide`) on a job.

use super::{Verdict, adopt, end_on_exit, finalize};
use crate::model::Actor;
use crate::recovery::{Action, Decision};
use crate::store::{AuditDraft, JobChange, JobRecord};

/// Whether `decision`, taken on the job as `read`, no longer holds for the job as it is now:
/// its status or recorded process changed, or (for a finalize or wait, which rest on silence
/// or on the VMA's answer about the process) new progress came in between.
pub fn superseded(read: &JobRecord, current: &JobRecord, decision: &Decision) -> bool {
    let same_attempt = current.job.status == read.job.status
        && current.job.pid == read.job.pid
        && current.job.process_start_time == read.job.process_start_time;
    let same_progress = decision.action == Action::Keep
        || current.job.last_progress_at == read.job.last_progress_at;
    !(same_attempt && same_progress)
}

/// The row change and audit entry that carry out `decision` on `current`. Keep and wait
/// write an audit entry only when recovery's opinion of the job changes, so the trail shows
/// each change with its evidence instead of one line per job per interval.
pub fn on_decision(
    current: &JobRecord,
    decision: &Decision,
    actor: Actor,
    now: i64,
) -> Option<JobChange> {
    let mut after = current.clone();
    let action = match decision.action {
        Action::Finalize => {
            let verdict;
            (after, verdict) = match &decision.exit {
                // The process exited: the same ending as a death event's, on the full record
                // (migratekit's last word first, fetched with the decision, when still newer).
                Some(exit) => {
                    let last = decision.last_progress.as_ref();
                    let (after, verdict, _) = end_on_exit(current, None, Some(exit), last, now);
                    (after, verdict)
                }
                None => {
                    let verdict = Verdict {
                        class: decision.failure_class,
                        ..Verdict::settled(decision.to_status, decision.message.clone())
                    };
                    (finalize(current, &verdict, now), verdict)
                }
            };
            verdict.action
        }
        Action::Keep => {
            if let Some(process) = decision.adopt {
                adopt(&mut after, process, now);
            }
            after.recovery_note = Some("keep".into());
            if decision.adopt.is_some() {
                "process_recorded"
            } else {
                "recovery_keep"
            }
        }
        Action::Wait => {
            after.recovery_note = Some("wait".into());
            "recovery_wait"
        }
    };
    if after == *current {
        return None;
    }
    Some(JobChange {
        request_stop: false,
        audit: vec![AuditDraft {
            action,
            from: Some(current.job.status),
            to: after.job.status,
            actor,
            failure_class: after
                .job
                .failure_class
                .filter(|_| decision.action == Action::Finalize),
            evidence: decision.evidence.clone(),
        }],
        after,
    })
}
