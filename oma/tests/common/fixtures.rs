//! Fixtures shared by the store and event-intake suites.

use super::{TestDb, dead_url, store_with_vmas};
use api::{
    Detector, ExitStatus, JobId, ProcessEvent, ProcessEventKind, ProgressUpdate, StoredProgress,
};
use oma::store::{NewJob, Store};

pub fn new_job(id: &str, ctx: &str, vma: &str) -> NewJob {
    NewJob {
        id: Some(id.into()),
        vm_context_id: ctx.into(),
        vm_name: Some(format!("vm-{ctx}")),
        vma_id: vma.into(),
        sync_type: Some("full".into()),
    }
}

pub fn event(
    job: &str,
    kind: ProcessEventKind,
    p: api::ProcessIdentity,
    exit: Option<ExitStatus>,
) -> ProcessEvent {
    ProcessEvent {
        event_id: uuid::Uuid::new_v4(),
        kind,
        job_id: api::JobId::parse(job).expect("the tests' job ids follow the job-id rule"),
        process: p,
        exit,
        observed_at: chrono::Utc::now(),
        detector: Detector::Ebpf,
        last_progress: None,
    }
}

pub fn code(c: i32) -> Option<ExitStatus> {
    Some(ExitStatus {
        code: Some(c),
        signal: None,
        core_dumped: false,
        oom_killed: false,
    })
}

/// A store with `vma-1` and `vma-2` registered at addresses where nothing listens.
pub async fn setup(db: &TestDb) -> Store {
    store_with_vmas(db, &dead_url().await, &dead_url().await).await
}

/// A progress report of `job` as a watchdog stores it: stage `Transfer`, `bytes` of 1,000,000.
pub fn progress(job: &str, sequence: u64, bytes: u64) -> StoredProgress {
    let update: ProgressUpdate = serde_json::from_value(serde_json::json!({
        "stage": "Transfer", "bytes_transferred": bytes, "total_bytes": 1_000_000,
        "throughput_bps": 10, "percent": 1.5
    }))
    .unwrap();
    StoredProgress {
        job_id: JobId::parse(job).unwrap(),
        update,
        received_at: chrono::Utc::now(),
        sequence,
    }
}
