//! An operator's cancel.

use super::{Verdict, draft, finalize};
use crate::model::{Actor, JobStatus};
use crate::store::{JobChange, JobRecord, StoreError};
use serde_json::json;

/// Cancels an active job: `cancelled` through the one finalize path (so its VM context is
/// released like any final state's), with the operator's reason, and its migratekit marked
/// to be stopped on the VMA in the same transaction (`crate::stop`). A final job cannot be
/// cancelled.
pub fn cancel(cur: &JobRecord, reason: Option<&str>, now: i64) -> Result<JobChange, StoreError> {
    if cur.job.status.is_final() {
        return Err(StoreError::IllegalTransition {
            job_id: cur.job.id.clone(),
            status: cur.job.status,
            why: "a job in a final state cannot be cancelled",
        });
    }
    let message = reason.unwrap_or("cancelled by an operator").to_owned();
    let verdict = Verdict::settled(JobStatus::Cancelled, Some(message));
    let after = finalize(cur, &verdict, now);
    Ok(JobChange {
        request_stop: true,
        audit: vec![draft(
            Actor::Operator,
            verdict.action,
            cur.job.status,
            JobStatus::Cancelled,
            None,
            json!({ "reason": reason }),
        )],
        after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::testing::{NOW, proc, running};

    #[test]
    fn cancel_finalizes_and_asks_for_a_stop() {
        let rec = running(JobStatus::Replicating, proc(10, 100));
        let change = cancel(&rec, Some("wrong VM"), NOW).unwrap();
        let job = &change.after.job;
        assert_eq!(job.status, JobStatus::Cancelled);
        assert_eq!(job.error_message.as_deref(), Some("wrong VM"));
        assert!(job.completed_at.is_some() && change.request_stop);
        let again = cancel(&change.after, None, NOW).unwrap_err();
        assert!(matches!(again, StoreError::IllegalTransition { .. }));
    }
}
