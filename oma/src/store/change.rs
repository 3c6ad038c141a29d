//! Writing one change to a job: the fenced row update, its audit entries and, when the job
//! reaches a final state, the release of its VM context, all inside the caller's transaction.

use super::StoreError;
use super::rows::JobRecord;
use crate::model::{Actor, ContextStatus, FailureClass, JobStatus};
use sqlx::AnyConnection;
use uuid::Uuid;

/// An audit entry to write with a change.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditDraft {
    /// `created`, `transition`, `process_recorded`, `stale_attempt`, ...
    pub action: &'static str,
    /// Status before.
    pub from: Option<JobStatus>,
    /// Status after.
    pub to: JobStatus,
    /// Who.
    pub actor: Actor,
    /// Failure class set by the change.
    pub failure_class: Option<FailureClass>,
    /// Evidence, as JSON.
    pub evidence: serde_json::Value,
}

/// The outcome of a pure decision about a job: its new row and what to record about it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobChange {
    /// The job after the change (equal to the one read when only the audit trail changes).
    pub after: JobRecord,
    /// Audit entries to append.
    pub audit: Vec<AuditDraft>,
}

/// Logs one `info` line per change of status among `drafts`, which the caller has just
/// committed for `job_id` (entries that keep the status, such as `stalled`, are not
/// transitions). Call it after the commit only: a line must never tell of a change that a
/// rollback undid. The evidence is summarised to the exit code and signal, when it holds
/// them: never a token, never a VMA's raw answer.
pub(crate) fn log_transitions(job_id: &str, drafts: &[AuditDraft]) {
    for d in drafts.iter().filter(|d| d.from != Some(d.to)) {
        // Intake keeps the exit under `exit`; recovery and start under the VMA's answer.
        let answer = &d.evidence["vma_answer"];
        let exit = [
            &d.evidence["exit"],
            &answer["state"]["exit"],
            &answer["exit"],
        ]
        .into_iter()
        .find(|e| e.is_object());
        let field = |name: &str| exit.and_then(|e| e[name].as_i64());
        tracing::info!(
            event = "job_transition",
            job_id,
            from = d.from.map_or("none", |s| s.as_str()),
            to = d.to.as_str(),
            failure_class = d.failure_class.map(|c| c.as_str()),
            actor = d.actor.as_str(),
            action = d.action,
            exit_code = field("code"),
            signal = field("signal"),
            "job changed state"
        );
    }
}

/// Writes `change` over `before`. Returns `false` when another writer changed the job since
/// it was read (the caller retries); nothing is written then.
pub(crate) async fn commit_change(
    conn: &mut AnyConnection,
    before: &JobRecord,
    change: &JobChange,
    now: i64,
) -> Result<bool, StoreError> {
    if !write_row_change(conn, before, &change.after, now).await? {
        return Ok(false);
    }
    let entries: Vec<_> = change
        .audit
        .iter()
        .map(|d| (change.after.job.id.as_str(), d))
        .collect();
    insert_audits(conn, &entries, now).await?;
    Ok(true)
}

/// The row half of a change: the fenced update and, when the job becomes final, the release of
/// its context. The caller writes the audit entries (event intake batches them).
pub(crate) async fn write_row_change(
    conn: &mut AnyConnection,
    before: &JobRecord,
    after: &JobRecord,
    now: i64,
) -> Result<bool, StoreError> {
    if after != before && !update_job(conn, before.version, after).await? {
        return Ok(false);
    }
    if before.job.status.is_active() && after.job.status.is_final() {
        release_context(conn, after, now).await?;
    }
    Ok(true)
}

/// Appends audit entries with one statement per 100.
pub(crate) async fn insert_audits(
    conn: &mut AnyConnection,
    entries: &[(&str, &AuditDraft)],
    now: i64,
) -> Result<(), StoreError> {
    for chunk in entries.chunks(100) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let b = i * 8 + 1;
                format!(
                    "(${}, ${}, $1, ${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO job_audit (id, job_id, at, from_status, to_status, actor, action, \
             failure_class, evidence) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(now);
        for (job_id, draft) in chunk {
            query = query
                .bind(Uuid::now_v7().to_string())
                .bind((*job_id).to_owned())
                .bind(draft.from.map(|s| s.as_str()))
                .bind(draft.to.as_str())
                .bind(draft.actor.as_str())
                .bind(draft.action)
                .bind(draft.failure_class.map(|c| c.as_str()))
                .bind(draft.evidence.to_string());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

fn ms(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

async fn update_job(
    conn: &mut AnyConnection,
    version: i64,
    rec: &JobRecord,
) -> Result<bool, StoreError> {
    let j = &rec.job;
    let result = sqlx::query(
        "UPDATE replication_jobs SET status = $1, active = $2, progress_percent = $3, \
         current_operation = $4, bytes_transferred = $5, total_bytes = $6, throughput = $7, \
         sync_type = $8, started_at = $9, updated_at = $10, last_progress_at = $11, \
         progress_sequence = $12, bytes_moved_at = $13, stalled_since = $14, \
         progress_status = $15, completed_at = $16, error_message = $17, failure_class = $18, \
         process_pid = $19, process_start_time = $20, attempt = $21, recovery_note = $22, version = version + 1 \
         WHERE id = $23 AND version = $24",
    )
    .bind(j.status.as_str())
    .bind(i64::from(j.status.is_active()))
    .bind(j.progress_percent)
    .bind(j.current_operation.clone())
    .bind(j.bytes_transferred)
    .bind(j.total_bytes)
    .bind(j.throughput)
    .bind(j.sync_type.clone())
    .bind(ms(j.started_at))
    .bind(j.updated_at.timestamp_millis())
    .bind(ms(j.last_progress_at))
    .bind(rec.progress_sequence)
    .bind(rec.bytes_moved_at)
    .bind(ms(j.stalled_since))
    .bind(rec.progress_status.clone())
    .bind(ms(j.completed_at))
    .bind(j.error_message.clone())
    .bind(j.failure_class.map(|c| c.as_str()))
    .bind(j.pid)
    .bind(j.process_start_time)
    .bind(j.attempt)
    .bind(rec.recovery_note.clone())
    .bind(j.id.clone())
    .bind(version)
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Frees the job's VM context: `current_job_id` cleared, status `ready_for_failover` (the
/// design's rule for every final state: the VM is free for failover or a new replication; the
/// job's own status and failure class say how it ended), counters updated.
async fn release_context(
    conn: &mut AnyConnection,
    rec: &JobRecord,
    now: i64,
) -> Result<(), StoreError> {
    let job = &rec.job;
    let succeeded = job.status == JobStatus::Completed;
    let failed = job.status == JobStatus::Failed;
    // One statement: every SET expression sees the row as it was, so the CASEs all test the
    // old holder. Counters move even if (against the rules) another job holds the context.
    sqlx::query(
        "UPDATE vm_replication_contexts SET successful_jobs = successful_jobs + $1, \
         failed_jobs = failed_jobs + $2, \
         last_successful_job_id = COALESCE($3, last_successful_job_id), \
         current_status = CASE WHEN current_job_id = $4 THEN $5 ELSE current_status END, \
         last_status_change = CASE WHEN current_job_id = $4 THEN $6 ELSE last_status_change END, \
         current_job_id = CASE WHEN current_job_id = $4 THEN NULL ELSE current_job_id END \
         WHERE context_id = $7",
    )
    .bind(i64::from(succeeded))
    .bind(i64::from(failed))
    .bind(succeeded.then(|| job.id.clone()))
    .bind(job.id.clone())
    .bind(ContextStatus::ReadyForFailover.as_str())
    .bind(now)
    .bind(job.vm_context_id.clone())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
