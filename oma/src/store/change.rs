//! Writing one change to a job: the fenced row update, its audit entries and, when the job
//! reaches a final state, the release of its VM context, all inside the caller's transaction.

use super::batch::Writes;
use super::rows::JobRecord;
use super::{Backend, StoreError};
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
    /// Mark the job's migratekit as still to be stopped on its VMA (`stop_pending`), in the
    /// same transaction, so that neither a crash nor a dropped request between this commit
    /// and the stop request leaves the process running unknown (see `crate::stop`).
    pub request_stop: bool,
}

/// Logs one `info` line per change of status among `drafts`, and counts it in the metrics, which the caller has just
/// committed for `job_id` (entries that keep the status, such as `stalled`, are not
/// transitions). Call it after the commit only: a line must never tell of a change that a
/// rollback undid. The evidence is summarised to the exit code and signal, when it holds
/// them: never a token, never a VMA's raw answer.
pub(crate) fn log_transitions(
    metrics: &crate::metrics::Metrics,
    job_id: &str,
    drafts: &[AuditDraft],
) {
    metrics.transitions(drafts);
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
/// it was read (the caller rolls back and retries).
pub(crate) async fn commit_change(
    conn: &mut AnyConnection,
    backend: Backend,
    before: &JobRecord,
    change: &JobChange,
    now: i64,
) -> Result<bool, StoreError> {
    let mut writes = Writes::new(backend);
    if !write_row_change(conn, &mut writes, before, &change.after, now).await? {
        return Ok(false);
    }
    let entries: Vec<_> = change
        .audit
        .iter()
        .map(|d| (change.after.job.id.as_str(), d))
        .collect();
    if change.request_stop && !mark_stop_pending(conn, &mut writes, &change.after.job.id).await? {
        return Ok(false);
    }
    Ok(insert_audits(conn, &mut writes, &entries, now).await? && writes.flush(conn).await?)
}

/// Sets the job's `stop_pending`, see [`JobChange::request_stop`].
pub(crate) async fn mark_stop_pending(
    conn: &mut AnyConnection,
    w: &mut Writes<'_>,
    job_id: &str,
) -> Result<bool, StoreError> {
    let sql = format!(
        "UPDATE replication_jobs SET stop_pending = 1 WHERE id = {}",
        w.arg(job_id.to_owned())?
    );
    w.end(conn, &sql, 1).await
}

/// The row half of a change: the fenced update and, when the job becomes final, the release of
/// its context. The caller writes the audit entries (event intake batches them). Returns
/// `false` as [`commit_change`] does (on SQLite, where the writes wait for the caller's
/// flush, the flush says it instead).
pub(crate) async fn write_row_change(
    conn: &mut AnyConnection,
    writes: &mut Writes<'_>,
    before: &JobRecord,
    after: &JobRecord,
    now: i64,
) -> Result<bool, StoreError> {
    if after != before && !update_job(conn, writes, before.version, after).await? {
        return Ok(false);
    }
    if before.job.status.is_active() && after.job.status.is_final() {
        return release_context(conn, writes, after, now).await;
    }
    Ok(true)
}

/// Appends audit entries with one statement per 100.
pub(crate) async fn insert_audits(
    conn: &mut AnyConnection,
    writes: &mut Writes<'_>,
    entries: &[(&str, &AuditDraft)],
    now: i64,
) -> Result<bool, StoreError> {
    for chunk in entries.chunks(100) {
        let at = writes.arg(now)?;
        let mut values = Vec::with_capacity(chunk.len());
        for (job_id, draft) in chunk {
            values.push(format!(
                "({}, {}, {at}, {}, {}, {}, {}, {}, {})",
                writes.arg(Uuid::now_v7().to_string())?,
                writes.arg((*job_id).to_owned())?,
                writes.arg(draft.from.map(|s| s.as_str()))?,
                writes.arg(draft.to.as_str())?,
                writes.arg(draft.actor.as_str())?,
                writes.arg(draft.action)?,
                writes.arg(draft.failure_class.map(|c| c.as_str()))?,
                writes.arg(draft.evidence.to_string())?,
            ));
        }
        let sql = format!(
            "INSERT INTO job_audit (id, job_id, at, from_status, to_status, actor, action, \
             failure_class, evidence) VALUES {}",
            values.join(", ")
        );
        if !writes.end(conn, &sql, chunk.len() as u64).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn ms(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

async fn update_job(
    conn: &mut AnyConnection,
    w: &mut Writes<'_>,
    version: i64,
    rec: &JobRecord,
) -> Result<bool, StoreError> {
    let set: Vec<String> = COLUMNS
        .iter()
        .zip(bind_columns(w, rec)?)
        .map(|((name, _), value)| format!("{name} = {value}"))
        .collect();
    let sql = format!(
        "UPDATE replication_jobs SET {}, version = version + 1 WHERE id = {} AND version = {}",
        set.join(", "),
        w.arg(rec.job.id.clone())?,
        w.arg(version)?,
    );
    w.end(conn, &sql, 1).await
}

/// The columns a change of a job's row writes, in the order of [`bind_columns`], with their
/// SQL types (the multi-row `UPDATE` casts each value, since a NULL argument has no type of its
/// own on PostgreSQL). The one list of them, for the single and the batched path.
pub(super) const COLUMNS: [(&str, &str); 22] = [
    ("status", "TEXT"),
    ("active", "BIGINT"),
    ("progress_percent", "DOUBLE PRECISION"),
    ("current_operation", "TEXT"),
    ("bytes_transferred", "BIGINT"),
    ("total_bytes", "BIGINT"),
    ("throughput", "BIGINT"),
    ("sync_type", "TEXT"),
    ("started_at", "BIGINT"),
    ("updated_at", "BIGINT"),
    ("last_progress_at", "BIGINT"),
    ("progress_sequence", "BIGINT"),
    ("bytes_moved_at", "BIGINT"),
    ("stalled_since", "BIGINT"),
    ("progress_status", "TEXT"),
    ("completed_at", "BIGINT"),
    ("error_message", "TEXT"),
    ("failure_class", "TEXT"),
    ("process_pid", "BIGINT"),
    ("process_start_time", "BIGINT"),
    ("attempt", "BIGINT"),
    ("recovery_note", "TEXT"),
];

/// Binds the values of [`COLUMNS`] for `rec` as arguments of `w`, in that order, and returns
/// their placeholders (an array of the list's length, so that neither can change alone).
pub(super) fn bind_columns(
    w: &mut Writes<'_>,
    rec: &JobRecord,
) -> Result<[String; COLUMNS.len()], StoreError> {
    let j = &rec.job;
    Ok([
        w.arg(j.status.as_str())?,
        w.arg(i64::from(j.status.is_active()))?,
        w.arg(j.progress_percent)?,
        w.arg(j.current_operation.clone())?,
        w.arg(j.bytes_transferred)?,
        w.arg(j.total_bytes)?,
        w.arg(j.throughput)?,
        w.arg(j.sync_type.clone())?,
        w.arg(ms(j.started_at))?,
        w.arg(j.updated_at.timestamp_millis())?,
        w.arg(ms(j.last_progress_at))?,
        w.arg(rec.progress_sequence)?,
        w.arg(rec.bytes_moved_at)?,
        w.arg(ms(j.stalled_since))?,
        w.arg(rec.progress_status.map(|s| s.as_str()))?,
        w.arg(ms(j.completed_at))?,
        w.arg(j.error_message.clone())?,
        w.arg(j.failure_class.map(|c| c.as_str()))?,
        w.arg(j.pid)?,
        w.arg(j.process_start_time)?,
        w.arg(j.attempt)?,
        w.arg(rec.recovery_note.clone())?,
    ])
}

/// Frees the job's VM context: `current_job_id` cleared, status `ready_for_failover` (the
/// design's rule for every final state: the VM is free for failover or a new replication; the
/// job's own status and failure class say how it ended), counters updated.
async fn release_context(
    conn: &mut AnyConnection,
    w: &mut Writes<'_>,
    rec: &JobRecord,
    now: i64,
) -> Result<bool, StoreError> {
    let job = &rec.job;
    let succeeded = job.status == JobStatus::Completed;
    let failed = job.status == JobStatus::Failed;
    let holder = w.arg(job.id.clone())?;
    // One statement: every SET expression sees the row as it was, so the CASEs all test the
    // old holder. Counters move even if (against the rules) another job holds the context.
    let sql = format!(
        "UPDATE vm_replication_contexts SET successful_jobs = successful_jobs + {}, \
         failed_jobs = failed_jobs + {}, \
         last_successful_job_id = COALESCE({}, last_successful_job_id), \
         current_status = CASE WHEN current_job_id = {holder} THEN {} ELSE current_status END, \
         last_status_change = CASE WHEN current_job_id = {holder} THEN {} ELSE last_status_change END, \
         current_job_id = CASE WHEN current_job_id = {holder} THEN NULL ELSE current_job_id END \
         WHERE context_id = {}",
        w.arg(i64::from(succeeded))?,
        w.arg(i64::from(failed))?,
        w.arg(succeeded.then(|| job.id.clone()))?,
        w.arg(ContextStatus::ReadyForFailover.as_str())?,
        w.arg(now)?,
        w.arg(job.vm_context_id.clone())?,
    );
    // The context exists: the job's row references it.
    w.end(conn, &sql, 1).await
}
