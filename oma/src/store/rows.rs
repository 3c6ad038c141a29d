//! Mapping between database rows and the model.

use super::StoreError;
use crate::model::{
    Actor, AuditEntry, ContextStatus, FailureClass, Job, JobStatus, VmContext, from_ms,
};
use sqlx::Row;
use sqlx::any::AnyRow;

/// Columns of `replication_jobs`, in the order `job_from_row` reads them.
pub(crate) const JOB_COLUMNS: &str = "id, vm_context_id, vma_id, status, progress_percent, \
    current_operation, bytes_transferred, total_bytes, throughput, sync_type, created_at, \
    started_at, updated_at, last_progress_at, progress_sequence, bytes_moved_at, stalled_since, \
    progress_status, completed_at, error_message, failure_class, process_pid, \
    process_start_time, attempt, recovery_note, version";

/// A job with the bookkeeping columns the API does not show.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// The job as the API shows it.
    pub job: Job,
    /// Last VMA progress sequence seen.
    pub progress_sequence: Option<i64>,
    /// Last time the byte count moved (unix ms).
    pub bytes_moved_at: Option<i64>,
    /// migratekit's own status from the latest progress (`failed` sticks for the attempt).
    pub progress_status: Option<api::ProgressStatus>,
    /// Recovery's last keep/wait opinion (`keep`, `wait`).
    pub recovery_note: Option<String>,
    /// Optimistic-locking version read with the row.
    pub version: i64,
}

impl JobRecord {
    /// `job` with no bookkeeping yet (no progress seen, version 0).
    pub fn new(job: Job) -> Self {
        Self {
            job,
            progress_sequence: None,
            bytes_moved_at: None,
            progress_status: None,
            recovery_note: None,
            version: 0,
        }
    }

    /// Milliseconds the owner has been silent, counted from the last progress; only when no
    /// progress ever came, from when the process was first seen, and only before that from
    /// the creation of the job.
    pub fn silence_ms(&self, now_ms: i64) -> i64 {
        let since = self
            .job
            .last_progress_at
            .or(self.job.started_at)
            .unwrap_or(self.job.created_at);
        now_ms - since.timestamp_millis()
    }
}

fn parse<T>(
    column: &'static str,
    value: String,
    parse: fn(&str) -> Option<T>,
) -> Result<T, StoreError> {
    parse(&value).ok_or(StoreError::Corrupt { column, value })
}

fn parse_opt<T>(
    column: &'static str,
    value: Option<String>,
    f: fn(&str) -> Option<T>,
) -> Result<Option<T>, StoreError> {
    value.map(|v| parse(column, v, f)).transpose()
}

fn ms_opt(row: &AnyRow, column: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
    Ok(row.try_get::<Option<i64>, _>(column)?.map(from_ms))
}

/// Reads one `replication_jobs` row selected with [`JOB_COLUMNS`].
pub(crate) fn job_from_row(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let job = Job {
        id: row.try_get("id")?,
        vm_context_id: row.try_get("vm_context_id")?,
        vma_id: row.try_get("vma_id")?,
        status: parse("status", row.try_get("status")?, JobStatus::parse)?,
        progress_percent: row.try_get("progress_percent")?,
        current_operation: row.try_get("current_operation")?,
        bytes_transferred: row.try_get("bytes_transferred")?,
        total_bytes: row.try_get("total_bytes")?,
        throughput: row.try_get("throughput")?,
        sync_type: row.try_get("sync_type")?,
        created_at: from_ms(row.try_get("created_at")?),
        started_at: ms_opt(row, "started_at")?,
        updated_at: from_ms(row.try_get("updated_at")?),
        last_progress_at: ms_opt(row, "last_progress_at")?,
        stalled_since: ms_opt(row, "stalled_since")?,
        completed_at: ms_opt(row, "completed_at")?,
        error_message: row.try_get("error_message")?,
        failure_class: parse_opt(
            "failure_class",
            row.try_get("failure_class")?,
            FailureClass::parse,
        )?,
        pid: row.try_get("process_pid")?,
        process_start_time: row.try_get("process_start_time")?,
        attempt: row.try_get("attempt")?,
    };
    Ok(JobRecord {
        job,
        progress_sequence: row.try_get("progress_sequence")?,
        bytes_moved_at: row.try_get("bytes_moved_at")?,
        progress_status: parse_opt(
            "progress_status",
            row.try_get("progress_status")?,
            api::ProgressStatus::parse,
        )?,
        recovery_note: row.try_get("recovery_note")?,
        version: row.try_get("version")?,
    })
}

/// The columns recovery's decision reads (see `decision_record_from_row`); migration 0003's
/// partial index holds all of them, so the read is index-only.
pub const DECISION_COLUMNS: &str = "id, vma_id, status, created_at, started_at, \
    last_progress_at, progress_status, progress_sequence, process_pid, process_start_time, \
    attempt";

/// Reads a row selected with [`DECISION_COLUMNS`] into a *partial* record: the columns
/// recovery's decision table and its fencing read are real, every other field is its default
/// (empty context id, zero progress, version 0). Decoding 11 columns instead of 26 through the
/// `Any` driver is what keeps the scan of 10,000 active jobs cheap. Such a record is only ever
/// decided on; every write re-reads the full row inside its own transaction.
pub(crate) fn decision_record_from_row(row: &AnyRow) -> Result<JobRecord, StoreError> {
    let status = parse("status", row.try_get("status")?, JobStatus::parse)?;
    let created_at = from_ms(row.try_get("created_at")?);
    let mut job = Job::new(
        row.try_get("id")?,
        String::new(),
        row.try_get("vma_id")?,
        status,
        created_at,
    );
    job.started_at = ms_opt(row, "started_at")?;
    job.last_progress_at = ms_opt(row, "last_progress_at")?;
    job.pid = row.try_get("process_pid")?;
    job.process_start_time = row.try_get("process_start_time")?;
    job.attempt = row.try_get("attempt")?;
    let mut rec = JobRecord::new(job);
    // Whether the VMA's last progress is newer than the job's (for an exited job).
    rec.progress_sequence = row.try_get("progress_sequence")?;
    rec.progress_status = parse_opt(
        "progress_status",
        row.try_get("progress_status")?,
        api::ProgressStatus::parse,
    )?;
    Ok(rec)
}

/// Columns of `vm_replication_contexts`.
pub(crate) const CONTEXT_COLUMNS: &str = "context_id, vm_name, current_status, current_job_id, \
    total_jobs_run, successful_jobs, failed_jobs, last_successful_job_id, last_status_change";

/// Reads one `vm_replication_contexts` row selected with [`CONTEXT_COLUMNS`].
pub(crate) fn context_from_row(row: &AnyRow) -> Result<VmContext, StoreError> {
    Ok(VmContext {
        context_id: row.try_get("context_id")?,
        vm_name: row.try_get("vm_name")?,
        current_status: parse(
            "current_status",
            row.try_get("current_status")?,
            ContextStatus::parse,
        )?,
        current_job_id: row.try_get("current_job_id")?,
        total_jobs_run: row.try_get("total_jobs_run")?,
        successful_jobs: row.try_get("successful_jobs")?,
        failed_jobs: row.try_get("failed_jobs")?,
        last_successful_job_id: row.try_get("last_successful_job_id")?,
        last_status_change: from_ms(row.try_get("last_status_change")?),
    })
}

/// Reads one `job_audit` row.
pub(crate) fn audit_from_row(row: &AnyRow) -> Result<AuditEntry, StoreError> {
    let evidence: String = row.try_get("evidence")?;
    Ok(AuditEntry {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        at: from_ms(row.try_get("at")?),
        from_status: parse_opt("from_status", row.try_get("from_status")?, JobStatus::parse)?,
        to_status: parse("to_status", row.try_get("to_status")?, JobStatus::parse)?,
        actor: parse("actor", row.try_get("actor")?, Actor::parse)?,
        action: row.try_get("action")?,
        failure_class: parse_opt(
            "failure_class",
            row.try_get("failure_class")?,
            FailureClass::parse,
        )?,
        evidence: serde_json::from_str(&evidence).map_err(|_| StoreError::Corrupt {
            column: "evidence",
            value: evidence.clone(),
        })?,
    })
}
