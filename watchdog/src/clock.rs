//! The monotonic clock as a plain number, so that timings logged by the daemon can be set
//! against the kernel's (`bpf_ktime_get_ns` reads the same clock) and against a benchmark's
//! own timestamps in another process on the same host.

/// Microseconds of `CLOCK_MONOTONIC` (the clock behind [`std::time::Instant`] on Linux).
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The log target of the timing lines (`RUST_LOG=info,vma_watchdog::latency=debug`).
pub const LATENCY_TARGET: &str = "vma_watchdog::latency";
