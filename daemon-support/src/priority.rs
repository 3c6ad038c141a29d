//! CPU priority: the watchdog runs above the bulk work it watches, and starts migratekit at
//! normal priority.
//!
//! A death is reported through a chain of short steps (the ring buffer's reader, the outbox's
//! fsync, the delivery), each a thread that must get a CPU at once. On a VMA whose cores are
//! busy with migratekit's copy threads, a normal-priority watchdog waits its turn at every
//! step; measured on two cores, that wait is most of the tail of the kill-to-commit latency
//! (docs/BENCHMARKS.md). Like auditd's `priority_boost`, the watchdog raises its own priority
//! at start, before any other thread exists, so that every thread it creates inherits it.

use std::io;

/// The watchdog's default nice value.
pub const DEFAULT_NICE: i32 = -10;

/// Sets the nice value of the calling thread (and of every thread and child it creates
/// afterwards). Raising the priority (a negative value) needs root or `CAP_SYS_NICE`.
pub fn set_nice(nice: i32) -> io::Result<()> {
    // SAFETY: a plain system call; `0` names the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Checks a nice value from the command line.
pub fn check(flag: &str, nice: i32) -> Result<i32, String> {
    if (-20..=19).contains(&nice) {
        Ok(nice)
    } else {
        Err(format!(
            "{flag} {nice} is not a nice value; give one from -20 (highest priority) to 19"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_values_out_of_range_are_refused_with_the_range() {
        assert_eq!(check("--nice", -20), Ok(-20));
        assert_eq!(check("--nice", 19), Ok(19));
        let err = check("--launch-nice", 20).unwrap_err();
        assert!(
            err.contains("--launch-nice 20") && err.contains("-20"),
            "{err}"
        );
        assert!(check("--nice", -21).is_err());
    }

    #[test]
    fn lowering_the_priority_of_a_thread_is_always_allowed_and_inherited() {
        // On a thread of its own, so the test's other threads keep theirs.
        std::thread::spawn(|| {
            set_nice(5).unwrap();
            // SAFETY: plain system calls.
            let (own, child) = unsafe {
                *libc::__errno_location() = 0;
                let own = libc::getpriority(libc::PRIO_PROCESS, 0);
                let child = std::thread::spawn(|| libc::getpriority(libc::PRIO_PROCESS, 0))
                    .join()
                    .unwrap();
                (own, child)
            };
            assert_eq!((own, child), (5, 5));
        })
        .join()
        .unwrap();
    }
}
