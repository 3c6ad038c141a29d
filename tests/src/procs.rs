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

/// The nice value of each of the process's threads (field 19 of `/proc/<pid>/task/*/stat`).
pub fn thread_nices(pid: u32) -> Vec<i64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            let after_name = &stat[stat.rfind(')')? + 1..];
            after_name.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

/// The process's name (`comm`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// True while `process` (same pid and start time) exists and has a live thread. A zombie
/// leader whose other threads still run (the leader called `pthread_exit`) is alive.
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
    if start != Some(process.start_time) {
        return false;
    }
    if state != "Z" && state != "X" {
        return true;
    }
    std::fs::read_dir(format!("/proc/{}/task", process.pid))
        .map(|d| d.count() > 1)
        .unwrap_or(false)
}

/// Makes this process the reaper of orphaned migratekit processes and reaps them.
///
/// When the harness SIGKILLs a watchdog, the migratekit processes it launched are orphaned.
/// On a real VMA, init reaps them when they die; in this sandbox pid 1 does not, and a zombie
/// keeps its pid forever (which defeats the pid-reuse scenario and leaks). So the harness
/// declares itself a child subreaper, and a thread reaps exactly those zombies among its
/// children that are migratekit (never the daemons it waits for itself).
pub fn reap_orphans() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        std::thread::spawn(|| {
            let me = std::process::id().to_string();
            loop {
                std::thread::sleep(Duration::from_millis(20));
                let Ok(dir) = std::fs::read_dir("/proc") else {
                    continue;
                };
                for entry in dir.flatten() {
                    let Some(pid) = entry
                        .file_name()
                        .to_str()
                        .and_then(|s| s.parse::<i32>().ok())
                    else {
                        continue;
                    };
                    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                        continue;
                    };
                    let Some(close) = stat.rfind(')') else {
                        continue;
                    };
                    let name = stat.get(stat.find('(').map_or(0, |i| i + 1)..close);
                    let mut f = stat[close + 1..].split_whitespace();
                    let (state, ppid) = (f.next(), f.next());
                    if state == Some("Z") && ppid == Some(me.as_str()) && name == Some("migratekit")
                    {
                        let mut status = 0;
                        // SAFETY: waitpid on a specific pid with a valid status pointer.
                        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                    }
                }
            }
        });
    });
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
    // A start the watchdog was still carrying out can bring a process up just after a scan;
    // scan again until two scans in a row find nothing (bounded), so no stand-in outlives its
    // test and lands in the next test's /proc scan.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut quiet_scans = 0;
    while quiet_scans < 2 && std::time::Instant::now() < deadline {
        let found: Vec<_> = job_ids
            .iter()
            .flat_map(|job| migratekit_processes(job))
            .collect();
        for p in &found {
            let _ = kill_process(*p, libc::SIGKILL);
        }
        quiet_scans = if found.is_empty() { quiet_scans + 1 } else { 0 };
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
