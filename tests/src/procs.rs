//! migratekit processes as the kernel sees them: finding a job's process in `/proc`, sending
//! it signals, waiting for it to be gone. A process is `(pid, start time)`: every kill checks
//! the start time first, so a recycled pid is never signalled by mistake.

use std::time::Duration;

use api::ProcessIdentity;

use crate::{HarnessError, Result};

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) -> Result<()> {
    let pid = i32::try_from(pid).map_err(|_| HarnessError::Sys {
        what: format!("pid {pid} out of range"),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    // SAFETY: kill has no memory preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(HarnessError::Sys {
            what: format!("kill({pid}, {sig})"),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Start time of `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The process's name (`comm`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// True while `process` (same pid and start time) exists and is not a zombie.
pub fn is_alive(process: ProcessIdentity) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", process.pid)) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next().unwrap_or("X");
    let start: Option<u64> = fields.nth(18).and_then(|s| s.parse().ok());
    start == Some(process.start_time) && state != "Z" && state != "X"
}

/// Sends `sig` to `process` if it is still the same process (pid and start time).
pub fn kill_process(process: ProcessIdentity, sig: i32) -> Result<()> {
    if start_time(process.pid) != Some(process.start_time) {
        return Err(HarnessError::Sys {
            what: format!(
                "process {} (start time {}) is gone; not signalling a recycled pid",
                process.pid, process.start_time
            ),
            source: std::io::Error::from_raw_os_error(libc::ESRCH),
        });
    }
    signal(process.pid, sig)
}

/// Running migratekit processes of `job_id`, found in `/proc` by name and by the job id on
/// the command line (`--job-id <id>`). The command line is read only to match the id; no
/// other argument (the vCenter password is one) is kept or printed.
pub fn migratekit_processes(job_id: &str) -> Vec<ProcessIdentity> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if comm(pid).as_deref() != Some("migratekit") {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        let matches = std::iter::from_fn(|| args.next())
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] == b"--job-id" && w[1] == job_id.as_bytes());
        if let (true, Some(start_time)) = (matches, start_time(pid)) {
            let process = ProcessIdentity { pid, start_time };
            if is_alive(process) {
                found.push(process);
            }
        }
    }
    found
}

/// Waits until `job_id` has exactly one running migratekit process and returns it.
pub fn wait_migratekit(job_id: &str, timeout: Duration) -> Result<ProcessIdentity> {
    crate::http::wait_for(
        &format!("a migratekit process of job {job_id}"),
        timeout,
        Duration::from_millis(10),
        || match migratekit_processes(job_id).as_slice() {
            [one] => Some(*one),
            _ => None,
        },
    )
}

/// Waits until `process` is gone (reaped or a zombie).
pub fn wait_gone(process: ProcessIdentity, timeout: Duration) -> Result<()> {
    crate::http::wait_for(
        &format!("process {} to end", process.pid),
        timeout,
        Duration::from_millis(5),
        || (!is_alive(process)).then_some(()),
    )
}

/// SIGKILLs every migratekit process of the given jobs: clean-up after a test.
pub fn kill_all_of(job_ids: &[String]) {
    for job in job_ids {
        for p in migratekit_processes(job) {
            let _ = kill_process(p, libc::SIGKILL);
        }
    }
}
