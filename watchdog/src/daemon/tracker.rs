//! The handle the REST API uses: job status queries, and registering the processes it starts
//! or is asked to track, before they can die unseen.

use std::sync::Arc;

use api::{FoundBy, ProcessIdentity};

use super::Core;
use crate::journal::Journal;
use crate::procfs;
use crate::registry::{Registry, RegistryError};

/// Shared handle on the daemon's state: the registry, the journal and the detector.
#[derive(Debug, Clone)]
pub struct Tracker(pub(super) Arc<Core>);

impl Tracker {
    /// The registry, for read-only queries (`job_status`, `jobs`).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.0.registry
    }

    /// The journal (the outbox reads the file at `journal().path()`).
    pub fn journal(&self) -> &Arc<Journal> {
        &self.0.journal
    }

    /// Registers and watches a process of `job_id` (one the watchdog started, or one adopted
    /// through the track endpoint). Call it before the process can die unseen: for a child,
    /// before reaping it (a zombie child is still tracked, and its exit status read). Returns
    /// `false` when it was already registered. The process's name is not checked here: the
    /// caller decides what it is willing to track.
    pub async fn track(
        &self,
        process: ProcessIdentity,
        job_id: &str,
        found_by: FoundBy,
    ) -> Result<bool, TrackError> {
        self.check_running(process)?;
        Ok(self.0.register(process, job_id, found_by).await?)
    }

    /// Takes over a child the caller spawned for `job_id`: registers it (found by `Started`),
    /// watches it, and reaps it once its death is recorded, so its exit status is read before
    /// anyone reaps it. On failure the child is handed back, still unreaped.
    pub async fn track_child(
        &self,
        child: std::process::Child,
        job_id: &str,
    ) -> Result<ProcessIdentity, (TrackError, std::process::Child)> {
        let pid = child.id();
        let stat = match procfs::read_stat(pid) {
            Ok(Some(s)) => s,
            Ok(None) => {
                let e = TrackError::NotRunning { pid, start_time: 0 };
                return Err((e, child));
            }
            Err(source) => return Err((TrackError::Proc { pid, source }, child)),
        };
        let process = stat.identity();
        // Hand the child over first: should it be dead already, the registration reports its
        // death at once and must find it there to reap it.
        self.0
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(process, child);
        match self.0.register(process, job_id, FoundBy::Started).await {
            Ok(_) => {
                // Its death may have been recorded already (seen by the detector before this
                // call): then nobody else will reap it.
                if self.0.registry.get(process).is_none() {
                    self.0.reap(process);
                }
                Ok(process)
            }
            Err(e) => {
                let child = self
                    .0
                    .children
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&process);
                Err((e.into(), child.expect("the child was inserted above")))
            }
        }
    }

    fn check_running(&self, process: ProcessIdentity) -> Result<(), TrackError> {
        let stat = procfs::read_stat(process.pid).map_err(|source| TrackError::Proc {
            pid: process.pid,
            source,
        })?;
        if stat.is_none_or(|s| s.start_time != process.start_time) {
            return Err(TrackError::NotRunning {
                pid: process.pid,
                start_time: process.start_time,
            });
        }
        Ok(())
    }
}

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
