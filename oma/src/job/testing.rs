//! Job records for the unit tests of the lifecycle rules and the recovery table.

use crate::model::{Job, JobStatus, from_ms};
use crate::store::JobRecord;
use api::{ExitStatus, ProcessIdentity, StoredProgress};

/// Milliseconds of the fixed "now" the tests decide at.
pub const NOW: i64 = 1_800_000_000_000;

/// An active job `job-1` on `vma-1` in `status`, created a minute before [`NOW`], with no
/// process and no progress yet.
pub fn record(status: JobStatus) -> JobRecord {
    let created = from_ms(NOW - 60_000);
    let job = Job::new(
        "job-1".into(),
        "ctx-1".into(),
        "vma-1".into(),
        status,
        created,
    );
    JobRecord {
        version: 1,
        ..JobRecord::new(job)
    }
}

/// `record(status)` with `process` recorded as attempt 1, seen 50 s before [`NOW`].
pub fn running(status: JobStatus, process: ProcessIdentity) -> JobRecord {
    let mut rec = record(status);
    rec.job.pid = Some(i64::from(process.pid));
    rec.job.process_start_time = Some(process.start_time as i64);
    rec.job.attempt = 1;
    rec.job.started_at = Some(from_ms(NOW - 50_000));
    rec
}

/// A process identity.
pub fn proc(pid: u32, start_time: u64) -> ProcessIdentity {
    ProcessIdentity { pid, start_time }
}

/// An exit status from a raw wait status (`code << 8`, or the signal number).
pub fn exit(wait_status: u32) -> ExitStatus {
    ExitStatus::from_wait_status(wait_status, false)
}

/// Progress number `sequence` of `job-1`, with migratekit's `status`.
pub fn progress(sequence: u64, status: Option<api::ProgressStatus>) -> StoredProgress {
    StoredProgress {
        job_id: "job-1".parse().expect("a valid job id"),
        update: api::ProgressUpdate {
            stage: "Transfer".into(),
            status,
            bytes_transferred: sequence * 1000,
            total_bytes: Some(100_000),
            throughput_bps: 10,
            percent: None,
            disk_id: None,
            sync_type: None,
            error_message: status
                .filter(|s| *s == api::ProgressStatus::Failed)
                .map(|_| "disk full".into()),
        },
        received_at: from_ms(NOW - 1_000),
        sequence,
    }
}
