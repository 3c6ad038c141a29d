//! Forgetting a job's progress once the OMA has recorded how the job ended.
//!
//! The progress store keeps the latest update of each job so that the death event can carry
//! migratekit's last word and the OMA's poller can read it. Once the OMA has acknowledged
//! the death, it holds both, and the entry is only memory and disk that grow with every job
//! the VMA runs.

use std::sync::Arc;

use api::{JobId, JobProcessState, ProcessEvent, ProcessEventKind};

use crate::outbox::AckObserver;
use crate::progress::ProgressStore;
use crate::registry::Registry;

/// Forgets the progress of jobs whose death the OMA has acknowledged.
#[derive(Debug)]
pub(super) struct ForgetProgress {
    pub(super) registry: Arc<Registry>,
    pub(super) progress: Arc<ProgressStore>,
}

impl ForgetProgress {
    /// The jobs among `events` whose acknowledged death is of their latest process. A job
    /// started again since (a new process registered, running or already dead and not yet
    /// acknowledged) keeps its progress: that is the new attempt's.
    fn finished_jobs(&self, events: &[ProcessEvent]) -> Vec<JobId> {
        let mut jobs: Vec<JobId> = events
            .iter()
            .filter(|e| e.kind != ProcessEventKind::ProcessStarted)
            .filter(|e| {
                matches!(self.registry.job_status(&e.job_id).map(|s| s.state),
                    Some(JobProcessState::Exited { process, .. }) if process == e.process)
            })
            .map(|e| e.job_id.clone())
            .collect();
        jobs.sort();
        jobs.dedup();
        jobs
    }
}

impl AckObserver for ForgetProgress {
    fn acknowledged(&self, events: &[ProcessEvent]) {
        let jobs = self.finished_jobs(events);
        if jobs.is_empty() {
            return;
        }
        match self.progress.forget_many(&jobs) {
            Ok(0) => {}
            Ok(forgotten) => tracing::info!(event = "progress_forgotten", forgotten,
                jobs = ?jobs.iter().map(JobId::as_str).collect::<Vec<_>>(),
                "forgot the progress of jobs whose death the OMA has recorded"),
            // Kept in memory and on disk: the bound of the store still holds, and the entry
            // goes at the next restart's compaction or when the store is full.
            Err(error) => tracing::warn!(event = "progress_forget_failed", %error,
                "could not forget the progress of jobs the OMA has finished; it is kept"),
        }
    }
}

#[cfg(test)]
mod tests {
    use api::{Detector, ExitStatus, FoundBy, ProcessIdentity, ProgressUpdate};
    use uuid::Uuid;

    use super::*;
    use crate::outbox::{Outbox, OutboxLimits};

    fn death(job: &JobId, process: ProcessIdentity) -> ProcessEvent {
        ProcessEvent {
            event_id: Uuid::now_v7(),
            kind: ProcessEventKind::ProcessExited,
            job_id: job.clone(),
            process,
            exit: Some(ExitStatus::from_wait_status(9, false)),
            observed_at: chrono::Utc::now(),
            detector: Detector::Procfs,
            last_progress: None,
        }
    }

    fn update() -> ProgressUpdate {
        serde_json::from_str(r#"{"stage":"Transfer","bytes_transferred":1,"throughput_bps":1}"#)
            .unwrap()
    }

    /// A registry, a progress store and an outbox wired as the daemon wires them.
    fn wired(dir: &std::path::Path) -> (Arc<Registry>, Arc<ProgressStore>, Outbox) {
        let registry = Arc::new(Registry::open(dir).unwrap());
        let progress = Arc::new(ProgressStore::open(dir).unwrap());
        let outbox = Outbox::open(&dir.join("outbox"), OutboxLimits::default()).unwrap();
        let observer = ForgetProgress {
            registry: Arc::clone(&registry),
            progress: Arc::clone(&progress),
        };
        outbox.set_ack_observer(Arc::new(observer)).unwrap();
        (registry, progress, outbox)
    }

    const P1: ProcessIdentity = ProcessIdentity {
        pid: 4242,
        start_time: 7,
    };
    const P2: ProcessIdentity = ProcessIdentity {
        pid: 4343,
        start_time: 9,
    };

    #[test]
    fn an_acknowledged_death_forgets_the_jobs_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, progress, outbox) = wired(dir.path());
        let job = JobId::parse("job-a").unwrap();
        registry.register(P1, &job, FoundBy::Started).unwrap();
        progress.record(&job, update()).unwrap();
        registry.record_exit(P1, ExitStatus::default(), Detector::Procfs);
        let event = death(&job, P1);
        outbox.append(event.clone()).unwrap();
        assert!(progress.get("job-a").is_some(), "kept until acknowledged");
        assert_eq!(outbox.acknowledge(&[event.event_id]).unwrap(), 1);
        assert!(progress.get("job-a").is_none());
        drop(progress);
        assert!(ProgressStore::open(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_job_started_again_keeps_the_new_attempts_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, progress, outbox) = wired(dir.path());
        let job = JobId::parse("job-b").unwrap();
        registry.register(P1, &job, FoundBy::Started).unwrap();
        registry.record_exit(P1, ExitStatus::default(), Detector::Procfs);
        let event = death(&job, P1);
        outbox.append(event.clone()).unwrap();
        // The job runs again before the OMA acknowledges the first death.
        registry.register(P2, &job, FoundBy::Started).unwrap();
        progress.record(&job, update()).unwrap();
        assert_eq!(outbox.acknowledge(&[event.event_id]).unwrap(), 1);
        assert!(progress.get("job-b").is_some(), "the second attempt's");
        // A start event acknowledged says nothing about the job's end.
        let mut started = death(&job, P2);
        started.kind = ProcessEventKind::ProcessStarted;
        outbox.append(started.clone()).unwrap();
        outbox.acknowledge(&[started.event_id]).unwrap();
        assert!(progress.get("job-b").is_some());
    }
}
