//! Progress reports: migratekit's figures onto the job, the stall flag, and what its own
//! `failed` report means (evidence, not a death).

use super::{begin_replicating, draft};
use crate::model::{Actor, JobStatus, from_ms};
use crate::store::{JobChange, JobRecord};
use api::{ProgressStatus, StoredProgress};
use serde_json::json;

/// Whether `progress` is later than what the job holds. The watchdog numbers each job's
/// updates (`sequence`); the job keeps the number of the last one it applied, so a higher
/// number is newer. (`received_at` is the VMA's clock and the job keeps no copy of it; the
/// sequence alone orders updates from one watchdog.) Figures never move backwards: an older
/// or equal report, say one the poller already applied, changes nothing.
pub fn is_newer(rec: &JobRecord, progress: &StoredProgress) -> bool {
    let sequence = i64::try_from(progress.sequence).unwrap_or(i64::MAX);
    rec.progress_sequence.is_none_or(|held| sequence > held)
}

/// migratekit's own failure report for the current attempt, as the sentence the job shows
/// (`None` unless its progress said `failed`). A partial record (recovery's index-only read
/// has no `error_message`) gives the sentence without the reason.
pub fn reported_failure(rec: &JobRecord) -> Option<&str> {
    (rec.progress_status == Some(ProgressStatus::Failed)).then(|| {
        rec.job
            .error_message
            .as_deref()
            .unwrap_or("migratekit reported failure")
    })
}

/// Copies one progress report's figures onto `after` (bytes, total, percent, stage,
/// throughput, sync type, sequence, migratekit's status), stamping `last_progress_at` and,
/// when the bytes moved, `bytes_moved_at` with `now`. The job's status is left alone:
/// callers decide what the report means for it.
///
/// A `failed` report sticks for the attempt: a later report of the same process cannot undo
/// it (migratekit does not recover from its own failure, and a report that seems to is not
/// to be trusted over it). The reason goes to `error_message` at once, so an operator sees
/// it while the job waits for its process to end.
pub fn apply_progress(after: &mut JobRecord, progress: &StoredProgress, now: i64) {
    let update = &progress.update;
    let bytes = i64::try_from(update.bytes_transferred).unwrap_or(i64::MAX);
    let moved = after.bytes_moved_at.is_none() || after.job.bytes_transferred != bytes;
    if moved {
        after.bytes_moved_at = Some(now);
    }
    let j = &mut after.job;
    j.bytes_transferred = bytes;
    j.total_bytes = update.total_bytes.and_then(|t| i64::try_from(t).ok());
    j.progress_percent = update.percent.unwrap_or_else(|| match j.total_bytes {
        Some(total) if total > 0 => bytes as f64 * 100.0 / total as f64,
        _ => j.progress_percent,
    });
    j.current_operation = Some(update.stage.clone());
    j.throughput = i64::try_from(update.throughput_bps).unwrap_or(i64::MAX);
    if let Some(sync) = update.sync_type {
        j.sync_type = Some(sync.as_str().to_owned());
    }
    j.last_progress_at = Some(from_ms(now));
    after.progress_sequence = Some(i64::try_from(progress.sequence).unwrap_or(i64::MAX));
    if after.progress_status == Some(ProgressStatus::Failed) {
        return;
    }
    after.progress_status = update.status;
    if update.status == Some(ProgressStatus::Failed) {
        let reason = update.error_message.as_deref().unwrap_or("no reason given");
        after.job.error_message = Some(format!("migratekit reported failure: {reason}"));
    }
}

/// What one polled progress answer changes on a job: the figures on a new sequence,
/// `pending`/`initializing` → `replicating`, the stall flag set or cleared, and, the first
/// time migratekit reports `failed`, a `failure_reported` entry. A failure report does not
/// end the job: the process may still run (cleaning up, or hung), and freeing its VM context
/// now would let a second replication start on the same VM. The job ends when its death is
/// reported (the verdict is then `vma_reported_failure`), or by recovery's rules.
pub fn on_progress(
    cur: &JobRecord,
    progress: &StoredProgress,
    now: i64,
    stall_ms: i64,
) -> Option<JobChange> {
    if cur.job.status.is_final() {
        return None;
    }
    let update = &progress.update;
    let mut after = cur.clone();
    let mut audit = Vec::new();
    let evidence = json!({
        "sequence": progress.sequence, "bytes_transferred": update.bytes_transferred,
        "received_at": progress.received_at, "stage": update.stage, "status": update.status,
    });
    // Any other sequence than the one held, lower ones too: a watchdog that lost its state
    // numbers a job's updates from 1 again, and the poller must not ignore it forever.
    if cur.progress_sequence != Some(seq(progress)) {
        apply_progress(&mut after, progress, now);
        if begin_replicating(&mut after, now) {
            audit.push(poller_draft("transition", cur, &after, evidence.clone()));
        }
        if reported_failure(&after).is_some() && reported_failure(cur).is_none() {
            let mut ev = evidence.clone();
            ev["error_message"] = json!(update.error_message);
            audit.push(poller_draft("failure_reported", &after, &after, ev));
            tracing::warn!(event = "failure_reported", job_id = %cur.job.id,
                pid = cur.job.pid, "migratekit reported failure; the job stays active and its \
                 VM context busy until its process is confirmed gone");
        }
    }
    stall_flag(&mut after, now, stall_ms, evidence, &mut audit);
    if after == *cur {
        return None;
    }
    after.job.updated_at = from_ms(now);
    Some(JobChange {
        after,
        audit,
        request_stop: false,
    })
}

/// What a poll that found a job's progress unchanged does to it: the stall flag, set when
/// its bytes have not moved for `stall_ms` (the progress feed answers only the jobs that
/// changed, so a job it leaves out was polled and did not move).
pub fn on_unmoved(cur: &JobRecord, now: i64, stall_ms: i64) -> Option<JobChange> {
    if cur.job.status.is_final() {
        return None;
    }
    let mut after = cur.clone();
    let mut audit = Vec::new();
    let evidence = json!({
        "sequence": cur.progress_sequence, "bytes_transferred": cur.job.bytes_transferred,
        "source": "progress_feed",
    });
    stall_flag(&mut after, now, stall_ms, evidence, &mut audit);
    if after == *cur {
        return None;
    }
    after.job.updated_at = from_ms(now);
    Some(JobChange {
        after,
        audit,
        request_stop: false,
    })
}

/// How migratekit's last progress, sent with a death or fetched for an exited process, reads
/// in the audit trail, and whether it was applied (newer than what the job held).
pub fn last_progress_evidence(p: &StoredProgress, applied: bool) -> serde_json::Value {
    json!({
        "sequence": p.sequence, "received_at": p.received_at,
        "status": p.update.status, "percent": p.update.percent,
        "bytes_transferred": p.update.bytes_transferred, "applied": applied,
    })
}

fn seq(progress: &StoredProgress) -> i64 {
    i64::try_from(progress.sequence).unwrap_or(i64::MAX)
}

fn poller_draft(
    action: &'static str,
    from: &JobRecord,
    to: &JobRecord,
    evidence: serde_json::Value,
) -> crate::store::AuditDraft {
    draft(
        Actor::Poller,
        action,
        from.job.status,
        to.job.status,
        None,
        evidence,
    )
}

/// Flags the job `stalled` when its bytes have not moved for `stall_ms`, and clears the flag
/// when they move again; each change with an audit entry. A flag, never a failure: a live
/// process is not failed on age alone.
fn stall_flag(
    after: &mut JobRecord,
    now: i64,
    stall_ms: i64,
    evidence: serde_json::Value,
    audit: &mut Vec<crate::store::AuditDraft>,
) {
    let status: JobStatus = after.job.status;
    let unmoved = after.bytes_moved_at.map(|t| now - t);
    match (after.job.stalled_since, unmoved) {
        (None, Some(age)) if age >= stall_ms => {
            after.job.stalled_since = Some(from_ms(now));
            let mut ev = evidence;
            ev["unmoved_ms"] = json!(age);
            ev["stall_threshold_ms"] = json!(stall_ms);
            audit.push(draft(Actor::Poller, "stalled", status, status, None, ev));
        }
        (Some(_), Some(age)) if age < stall_ms => {
            after.job.stalled_since = None;
            audit.push(draft(
                Actor::Poller,
                "unstalled",
                status,
                status,
                None,
                evidence,
            ));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::testing::{NOW, proc, progress, record, running};

    fn actions(change: &JobChange) -> Vec<&'static str> {
        change.audit.iter().map(|d| d.action).collect()
    }

    #[test]
    fn a_first_report_starts_a_pending_job_replicating() {
        let change = on_progress(
            &record(JobStatus::Pending),
            &progress(1, None),
            NOW,
            i64::MAX,
        )
        .expect("a change");
        assert_eq!(change.after.job.status, JobStatus::Replicating);
        assert_eq!(actions(&change), ["transition"]);
    }

    #[test]
    fn a_failure_report_is_recorded_once_and_ends_nothing() {
        let rec = running(JobStatus::Replicating, proc(10, 100));
        let failed = Some(ProgressStatus::Failed);
        let change = on_progress(&rec, &progress(1, failed), NOW, i64::MAX).expect("a change");
        assert_eq!(actions(&change), ["failure_reported"]);
        let after = change.after;
        assert_eq!(
            (after.job.status, after.job.failure_class),
            (JobStatus::Replicating, None)
        );
        assert_eq!(
            reported_failure(&after),
            Some("migratekit reported failure: disk full")
        );
        // Reported again, or followed by an in-progress report: it sticks, and is not
        // recorded twice.
        for status in [failed, Some(ProgressStatus::InProgress), None] {
            let next = on_progress(&after, &progress(2, status), NOW, i64::MAX).expect("figures");
            assert!(actions(&next).is_empty(), "{status:?}");
            assert_eq!(next.after.progress_status, failed);
            assert!(reported_failure(&next.after).is_some());
        }
    }

    #[test]
    fn a_final_job_takes_no_progress() {
        let rec = record(JobStatus::Cancelled);
        assert_eq!(on_progress(&rec, &progress(1, None), NOW, i64::MAX), None);
    }
}
