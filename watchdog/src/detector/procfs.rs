//! The fallback detector: pidfds for deaths, periodic `/proc` scans for new processes.
//!
//! Used where eBPF cannot load (no root, no BTF, program rejected, or a build without it).
//! A pidfd becomes readable when the whole thread group has exited, so a leader thread that
//! exits while others run is not taken for a death. How the process died is known when the
//! watchdog is its parent (`waitid` on the pidfd, without reaping: the owner of the child
//! reaps it), while it is a zombie (`/proc/<pid>/stat` field 52), or, on Linux 6.15 and later,
//! after its parent reaped it (`PIDFD_GET_INFO` on the pidfd); otherwise it is unknown.
//! Processes that start and die between two scans are not seen at all: that gap is what the
//! eBPF detector closes.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{Detector as DetectorKind, ExitStatus, ProcessIdentity};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Detector, DetectorEvent};
use crate::{pidfd, proc_reader};

/// Capacity of the event channel; the daemon drains it continuously.
const CHANNEL_CAPACITY: usize = 4096;

/// What failed while starting the procfs detector.
#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    /// `/proc` cannot be read.
    #[error("cannot read /proc ({0}); the procfs detector needs procfs mounted at /proc")]
    NoProc(#[source] io::Error),
    /// The kernel has no `pidfd_open` (Linux < 5.3).
    #[error("pidfd_open is not available ({0}); the procfs detector needs Linux 5.3 or newer")]
    NoPidfd(#[source] io::Error),
    /// Not called inside a tokio runtime.
    #[error("the procfs detector must be started inside a tokio runtime")]
    NoRuntime,
}

#[derive(Debug, Default)]
struct Watched {
    tasks: HashMap<ProcessIdentity, JoinHandle<()>>,
}

/// The procfs/pidfd detector. Dropping it stops its scans and watches.
#[derive(Debug)]
pub struct ProcfsDetector {
    watched: Arc<Mutex<Watched>>,
    events: mpsc::Sender<DetectorEvent>,
    runtime: tokio::runtime::Handle,
    scanner: JoinHandle<()>,
}

impl ProcfsDetector {
    /// Starts the detector: it scans `/proc` every `scan_interval` for processes named one of
    /// `match_names`, watches each one it finds and reports it as started (its first scan
    /// reports the ones already running), and reports every watched process's death.
    pub fn start(
        match_names: Vec<String>,
        scan_interval: Duration,
    ) -> Result<(Self, mpsc::Receiver<DetectorEvent>), ProcfsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ProcfsError::NoRuntime)?;
        std::fs::read_dir("/proc").map_err(ProcfsError::NoProc)?;
        // Probe pidfd support once, on ourselves, so a missing syscall fails here and clearly.
        pidfd::open(std::process::id()).map_err(ProcfsError::NoPidfd)?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let watched = Arc::new(Mutex::new(Watched::default()));
        let scanner = runtime.spawn(scan_loop(
            match_names,
            scan_interval,
            Arc::clone(&watched),
            tx.clone(),
            runtime.clone(),
        ));
        let detector = Self {
            watched,
            events: tx,
            runtime,
            scanner,
        };
        Ok((detector, rx))
    }
}

impl Detector for ProcfsDetector {
    fn kind(&self) -> DetectorKind {
        DetectorKind::Procfs
    }

    /// Opens a pidfd on the process. Fails with `NotFound` when the process is gone or its pid
    /// now belongs to another process (start time differs).
    fn watch(&self, process: ProcessIdentity) -> io::Result<()> {
        watch(&self.watched, &self.events, &self.runtime, process)
    }

    fn unwatch(&self, process: ProcessIdentity) -> io::Result<()> {
        if let Some(task) = lock(&self.watched).tasks.remove(&process) {
            task.abort();
        }
        Ok(())
    }
}

impl Drop for ProcfsDetector {
    fn drop(&mut self) {
        self.scanner.abort();
        for (_, task) in lock(&self.watched).tasks.drain() {
            task.abort();
        }
    }
}

fn lock(w: &Mutex<Watched>) -> std::sync::MutexGuard<'_, Watched> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

fn watch(
    watched: &Arc<Mutex<Watched>>,
    events: &mpsc::Sender<DetectorEvent>,
    runtime: &tokio::runtime::Handle,
    process: ProcessIdentity,
) -> io::Result<()> {
    let mut w = lock(watched);
    if w.tasks.contains_key(&process) {
        return Ok(());
    }
    let fd = pidfd::open(process.pid)?;
    // The pidfd pins whatever process holds the pid now; make sure it is ours. A zombie is
    // still ours: its stat stays until it is reaped, and the pidfd reports it at once.
    match proc_reader::read_stat(process.pid)? {
        Some(s) if s.start_time == process.start_time => {}
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "process {} (start time {}) is gone",
                    process.pid, process.start_time
                ),
            ));
        }
    }
    let _entered = runtime.enter();
    // SAFETY: the OwnedFd is moved into the AsyncFd, which alone owns and closes it, so the
    // descriptor stays open and the same for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    let task = runtime.spawn(wait_for_death(
        fd,
        process,
        Arc::clone(watched),
        events.clone(),
    ));
    w.tasks.insert(process, task);
    Ok(())
}

async fn wait_for_death(
    fd: AsyncFd<OwnedFd>,
    process: ProcessIdentity,
    watched: Arc<Mutex<Watched>>,
    events: mpsc::Sender<DetectorEvent>,
) {
    // Readable means the thread group is gone. An error here cannot happen for a pidfd; should
    // it, reporting the death with an unknown status is better than never reporting it.
    let _ = fd.readable().await;
    lock(&watched).tasks.remove(&process);
    let (exit, comm) = exit_status(fd.get_ref(), process);
    let _ = events
        .send(DetectorEvent::Exited {
            process,
            exit,
            comm,
            ktime_ns: None,
        })
        .await;
}

/// How a process whose pidfd became readable died, as far as the kernel can still tell.
fn exit_status(fd: &OwnedFd, process: ProcessIdentity) -> (ExitStatus, String) {
    let comm = proc_reader::read_stat(process.pid)
        .ok()
        .flatten()
        .filter(|s| s.start_time == process.start_time);
    if let Some(exit) = pidfd::wait_nowait(fd) {
        let name = comm.map(|s| s.comm).unwrap_or_default();
        return (exit, name);
    }
    match comm {
        // Field 52 of a zombie is what wait() would return: the group's exit status when the
        // group exited (exit_group, fatal signal), even when the leader thread had exited on
        // its own before (checked on 6.18 by the leader-exit test).
        // The kernel shows 0 there to a reader without ptrace-read access: that 0 would be a
        // false success, so the field is used only where it is readable.
        Some(s) if s.is_zombie() && may_read_exit_code(process.pid) => {
            let exit = s
                .exit_code
                .map(|raw| ExitStatus::from_wait_status(raw, false))
                .unwrap_or_default();
            (exit, s.comm)
        }
        Some(s) => (ExitStatus::default(), s.comm),
        // Gone from /proc: its parent (init, after a restart of the watchdog) has reaped it.
        // Since Linux 6.15 the pidfd still holds its wait status.
        None => (
            pidfd::exit_info(fd)
                .map(|raw| ExitStatus::from_wait_status(raw, false))
                .unwrap_or_default(),
            String::new(),
        ),
    }
}

/// Whether `/proc/<pid>/stat` field 52 shows us the real exit code: root, or the process's
/// owner (`/proc/<pid>` belongs to root for a non-dumpable process, which we then cannot read).
fn may_read_exit_code(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    me == 0 || std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == me)
}

async fn scan_loop(
    names: Vec<String>,
    interval: Duration,
    watched: Arc<Mutex<Watched>>,
    events: mpsc::Sender<DetectorEvent>,
    runtime: tokio::runtime::Handle,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let names2 = names.clone();
        let found = match tokio::task::spawn_blocking(move || proc_reader::scan(&names2)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "procfs detector: scanning /proc failed; retrying at the next interval");
                continue;
            }
            Err(_) => continue,
        };
        for p in found {
            if lock(&watched).tasks.contains_key(&p.identity) {
                continue;
            }
            // Watch before reporting, so a death right after the report is not missed. A
            // process that died in between is simply not reported: it was never seen alive.
            if watch(&watched, &events, &runtime, p.identity).is_err() {
                continue;
            }
            let started = DetectorEvent::Started {
                process: p.identity,
                comm: p.comm,
            };
            if events.send(started).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
