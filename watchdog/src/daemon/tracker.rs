//! The handle the REST API uses: job status queries, and registering the processes it starts
//! or is asked to track, before they can die unseen.
//!
//! Every method is synchronous and may block briefly on an fsync: call it from a blocking
//! thread (`spawn_blocking`) in async code.

use std::sync::Arc;
use std::time::Duration;

use api::{ExitStatus, FoundBy, JobId, ProcessIdentity, VmaJobStatus};

use super::Core;
use crate::outbox::Outbox;
use crate::proc_reader;
use crate::registry::{Registry, RegistryError};
use crate::trust::ExeId;

/// Shared handle on the daemon's state: the registry, the outbox and the detector.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// The daemon's state, shared with its event loop.
    core: Arc<Core>,
}

impl Tracker {
    /// A handle on `core`.
    pub(super) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// The daemon's state, for the event loop that owns this tracker.
    pub(super) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The registry, for read-only queries (`job_status`, `jobs`).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.core.registry
    }

    /// Latest progress per job (the REST API's progress routes share it).
    pub fn progress(&self) -> &Arc<crate::progress::ProgressStore> {
        &self.core.progress
    }

    /// The outbox: every event the daemon recorded and the OMA has not acknowledged yet.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.core.outbox
    }

    /// Events held in memory while the outbox cannot be written.
    pub fn spill(&self) -> &Arc<crate::outbox::spill::Spill> {
        &self.core.spill
    }

    /// The detector that runs.
    pub fn detector_kind(&self) -> api::Detector {
        self.core.detector.kind()
    }

    /// The kernel programs' counters, when the eBPF detector runs.
    pub fn kernel_counters(&self) -> Option<crate::detector::KernelCounters> {
        self.core.detector.kernel_counters()
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.core.metrics
    }

    /// Registers `process` as running `job_id` (started by the launcher, or adopted through
    /// the track endpoint) and watches it. When this returns `Ok` the registration is on disk
    /// and the process watched, so its death cannot go unseen; a process that has died already
    /// (a zombie) is reported at once. Registering the same process again changes nothing, but
    /// an explicit `Started`/`Tracked` replaces what the detector recorded first. The process's
    /// name is not checked here: the caller decides what it is willing to track.
    pub fn register_process(
        &self,
        job_id: &JobId,
        process: ProcessIdentity,
        found_by: FoundBy,
    ) -> Result<VmaJobStatus, TrackError> {
        let stat = proc_reader::read_stat(process.pid).map_err(|source| TrackError::Proc {
            pid: process.pid,
            source,
        })?;
        if stat.is_none_or(|s| s.start_time != process.start_time) {
            return Err(TrackError::NotRunning {
                pid: process.pid,
                start_time: process.start_time,
            });
        }
        let other = self
            .core
            .registry
            .running()
            .into_iter()
            .find(|e| &e.job_id == job_id && e.process != process);
        if let Some(other) = other {
            return Err(TrackError::JobRunning {
                job_id: job_id.clone(),
                running: other.process,
            });
        }
        // A process the launcher started is registered before it execs migratekit: the binary
        // it is about to run is the configured one. Any other runs its binary already.
        let exe = match found_by {
            FoundBy::Started => ExeId::of_path(&self.core.migratekit.path),
            _ => ExeId::of_process(process.pid),
        };
        self.core.register(process, job_id, found_by, exe.ok())?;
        self.core
            .registry
            .job_status(job_id)
            .ok_or(TrackError::NotRunning {
                pid: process.pid,
                start_time: process.start_time,
            })
    }

    /// Takes over a child the caller spawned for `job_id`: registers it (found by `Started`),
    /// watches it, and reaps it once its death is recorded, so its exact exit status is read
    /// before anyone reaps it. On failure the child is handed back, still unreaped.
    pub fn track_child(
        &self,
        child: std::process::Child,
        job_id: &JobId,
    ) -> Result<ProcessIdentity, (TrackError, std::process::Child)> {
        let pid = child.id();
        let process = match proc_reader::read_stat(pid) {
            Ok(Some(s)) => s.identity(),
            Ok(None) => {
                let e = TrackError::NotRunning { pid, start_time: 0 };
                return Err((e, child));
            }
            Err(source) => return Err((TrackError::Proc { pid, source }, child)),
        };
        // Hand the child over first: should it be dead already, the registration reports its
        // death at once and must find it there to reap it.
        let children = || self.core.children.lock().unwrap_or_else(|e| e.into_inner());
        children().insert(process, child);
        match self.register_process(job_id, process, FoundBy::Started) {
            Ok(_) => {
                // Its death may have been recorded already (seen by the detector before this
                // call): then nobody else will reap it.
                if self.core.registry.get(process).is_none() {
                    self.core.reap(process);
                }
                Ok(process)
            }
            Err(e) => {
                let child = children().remove(&process);
                Err((e, child.expect("the child was inserted above")))
            }
        }
    }

    /// A child the caller started has exited with `exit` (from its own `waitid`): records the
    /// death with this exact status now, before the caller reaps it. The detector's own report
    /// of the same death is then recognised and dropped.
    ///
    /// With the eBPF detector, a SIGKILL is first left to the detector for up to
    /// `DETECTOR_GRACE`: its report of the same death also says whether the OOM killer sent
    /// the signal (`signal->oom_mm`), which `waitid` cannot tell, and it arrives within
    /// milliseconds. Any other end is told as exactly by `waitid` as by the detector.
    pub fn child_exited(&self, process: ProcessIdentity, exit: ExitStatus) {
        let kind = self.core.detector.kind();
        let may_be_oom = exit.signal == Some(libc::SIGKILL) && !exit.oom_killed;
        if kind == api::Detector::Ebpf
            && may_be_oom
            && !self.core.await_report(process, DETECTOR_GRACE)
        {
            tracing::warn!(
                event = "detector_report_missing",
                pid = process.pid,
                grace_ms = DETECTOR_GRACE.as_millis() as u64,
                "the eBPF detector did not report a SIGKILLed child in time; reporting the launcher's status, which cannot tell an OOM kill"
            );
        }
        self.core.report_death(process, exit, kind);
    }
}

/// How long the launcher's reaper leaves a SIGKILL to the eBPF detector's report (which
/// knows whether it was the OOM killer) before reporting its own status. Only a lost event
/// (a full ring buffer) ever waits this long.
pub const DETECTOR_GRACE: Duration = Duration::from_secs(1);

/// Why a process could not be tracked.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// No process with this pid and start time exists (any more).
    #[error(
        "no process {pid} with start time {start_time} is running; check the pid and read its start time from field 22 of /proc/<pid>/stat"
    )]
    NotRunning {
        /// The pid asked for.
        pid: u32,
        /// The start time asked for.
        start_time: u64,
    },
    /// The job already has another live process.
    #[error(
        "job {job_id} already runs as pid {} (start time {}); stop it or track that process instead",
        running.pid, running.start_time
    )]
    JobRunning {
        /// The job.
        job_id: JobId,
        /// Its live process.
        running: ProcessIdentity,
    },
    /// `/proc/<pid>/stat` could not be read.
    #[error("cannot read /proc/{pid}/stat: {source}")]
    Proc {
        /// The pid asked for.
        pid: u32,
        /// The cause.
        source: std::io::Error,
    },
    /// The registry could not record it.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}
