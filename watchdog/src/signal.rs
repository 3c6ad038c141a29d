//! Signalling a watched process without ever hitting another one that reuses its pid.

use std::io;

use api::ProcessIdentity;

use crate::{pidfd, proc_reader};

/// Why a process could not be signalled.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The process (this pid with this start time) is gone.
    #[error("process {pid} (start time {start_time}) is not running any more")]
    Gone {
        /// Its pid.
        pid: u32,
        /// Its start time.
        start_time: u64,
    },
    /// The kernel refused.
    #[error("cannot signal process {pid}: {source}; the watchdog needs root (or CAP_KILL)")]
    Kernel {
        /// Its pid.
        pid: u32,
        /// The cause.
        source: io::Error,
    },
}

/// Sends `signal` to `process` through a pidfd, after checking through that pidfd's process
/// that its start time is the one asked for: a pid recycled since is never signalled.
pub fn send(process: ProcessIdentity, signal: i32) -> Result<(), SignalError> {
    let gone = || SignalError::Gone {
        pid: process.pid,
        start_time: process.start_time,
    };
    let kernel = |source| SignalError::Kernel {
        pid: process.pid,
        source,
    };
    let fd = match pidfd::open(process.pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(gone()),
        Err(e) => return Err(kernel(e)),
    };
    // The pidfd now holds the process that had this pid when it was opened: if that one has
    // the start time asked for, the signal below can only reach it.
    match proc_reader::read_stat(process.pid) {
        Ok(Some(s)) if s.start_time == process.start_time && !s.is_dead() => {}
        Ok(_) => return Err(gone()),
        Err(e) => return Err(kernel(e)),
    }
    match pidfd::send_signal(&fd, signal) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(gone()),
        Err(e) => Err(kernel(e)),
    }
}
