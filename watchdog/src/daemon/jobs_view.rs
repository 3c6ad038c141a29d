//! The REST API's view of jobs ([`JobsView`]), served by the daemon's registry and detector.

use std::io;

use api::{ExitStatus, FoundBy, JobId, ProcessIdentity, VmaJobStatus};

use super::{TrackError, Tracker};
use crate::http::{JobsHealth, JobsView, RegisterError};

impl JobsView for Tracker {
    fn job(&self, job_id: &str) -> Option<VmaJobStatus> {
        self.registry().job_status(job_id)
    }

    fn jobs(&self) -> Vec<VmaJobStatus> {
        self.registry().jobs()
    }

    fn register_process(
        &self,
        job_id: &JobId,
        process: ProcessIdentity,
        found_by: FoundBy,
    ) -> Result<VmaJobStatus, RegisterError> {
        Tracker::register_process(self, job_id, process, found_by).map_err(|e| match e {
            TrackError::JobRunning { job_id, running } => {
                RegisterError::JobRunning { job_id, running }
            }
            // The process is not there to watch: the detector cannot take it.
            e @ TrackError::NotRunning { .. } => {
                RegisterError::Watch(io::Error::new(io::ErrorKind::NotFound, e.to_string()))
            }
            TrackError::Proc { source, .. } => RegisterError::Watch(source),
            e @ TrackError::Registry(_) => RegisterError::Persist(io::Error::other(e)),
        })
    }

    fn launched_child_exited(&self, _job_id: &JobId, process: ProcessIdentity, exit: ExitStatus) {
        self.child_exited(process, exit);
    }

    fn health(&self) -> JobsHealth {
        JobsHealth {
            detector: Some(self.detector_kind()),
            running: self.registry().running().len(),
            jobs: self.registry().jobs().len(),
        }
    }
}
