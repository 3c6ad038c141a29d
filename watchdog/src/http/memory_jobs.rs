//! An in-memory [`JobsView`]: the job API's behaviour without the daemon's persisted
//! registry, for tests of the API and for running the API on its own.

use std::collections::BTreeMap;
use std::sync::Mutex;

use api::{Detector, ExitStatus, FoundBy, JobId, JobProcessState, ProcessIdentity, VmaJobStatus};
use chrono::Utc;

use super::{JobsView, RegisterError};

/// Jobs kept in memory only: a restart forgets them. The daemon uses its registry instead.
#[derive(Debug, Default)]
pub struct MemoryJobs {
    jobs: Mutex<BTreeMap<JobId, VmaJobStatus>>,
}

impl MemoryJobs {
    /// An empty set of jobs.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobId, VmaJobStatus>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl JobsView for MemoryJobs {
    fn job(&self, job_id: &str) -> Option<VmaJobStatus> {
        self.lock().get(job_id).cloned()
    }

    fn jobs(&self) -> Vec<VmaJobStatus> {
        self.lock().values().cloned().collect()
    }

    fn register_process(
        &self,
        job_id: &JobId,
        process: ProcessIdentity,
        found_by: FoundBy,
    ) -> Result<VmaJobStatus, RegisterError> {
        let mut jobs = self.lock();
        if let Some(existing) = jobs.get(job_id)
            && let JobProcessState::Running {
                process: running, ..
            } = existing.state
        {
            // The same process registered twice is fine; another live one is a conflict.
            if running == process {
                return Ok(existing.clone());
            }
            if crate::launcher::proc_identity(running.pid).is_ok_and(|now| now == running) {
                return Err(RegisterError::JobRunning {
                    job_id: job_id.clone(),
                    running,
                });
            }
        }
        let status = VmaJobStatus {
            job_id: job_id.clone(),
            state: JobProcessState::Running {
                process,
                since: Utc::now(),
                found_by,
            },
        };
        jobs.insert(job_id.clone(), status.clone());
        Ok(status)
    }

    fn launched_child_exited(&self, job_id: &JobId, process: ProcessIdentity, exit: ExitStatus) {
        let mut jobs = self.lock();
        let Some(status) = jobs.get_mut(job_id) else {
            return;
        };
        if matches!(status.state, JobProcessState::Running { process: p, .. } if p == process) {
            status.state = JobProcessState::Exited {
                process,
                exit,
                exited_at: Utc::now(),
                detector: Detector::Procfs,
            };
        }
    }
}
