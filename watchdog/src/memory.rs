//! The watchdog's resident memory.
//!
//! Loading the eBPF detector parses the kernel's BTF (`/sys/kernel/btf/vmlinux`, 5 MiB here)
//! twice: once to find the field offsets the programs read (`detector::ebpf::layout`), once
//! inside aya's loader. Together some 20 MiB of heap, all freed once the programs are
//! attached; but glibc keeps freed heap pages mapped as long as a later allocation sits above
//! them, so without help the daemon idles with that memory still resident. [`release_freed`]
//! hands it back (`malloc_trim(0)`) once the detector is loaded; [`configure`] caps glibc's
//! malloc arenas at start, so that each thread does not keep a heap of its own.
//!
//! `VMA_WATCHDOG_MEMORY_TUNING=off` turns both off (glibc's defaults, the configuration before
//! they existed), for comparing the two in `cargo xtask bench detect`.

use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable that turns the tuning off (`off`); anything else leaves it on.
pub const TUNING_ENV: &str = "VMA_WATCHDOG_MEMORY_TUNING";

/// How many malloc arenas the daemon's threads share (glibc's default: 8 per core).
pub const ARENA_MAX: i32 = 2;

static TUNED: AtomicBool = AtomicBool::new(true);

/// The process's resident memory, from `/proc/self/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// Resident now (`VmRSS`), bytes.
    pub rss: u64,
    /// The most ever resident (`VmHWM`), bytes.
    pub peak: u64,
}

/// Reads `VmRSS` and `VmHWM` of the process `pid` (`None`: this one).
pub fn resident_of(pid: Option<u32>) -> Option<Resident> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some(Resident {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// Reads [`TUNING_ENV`] and, unless it says `off`, caps glibc's malloc arenas at
/// [`ARENA_MAX`]. Call before any thread starts. Returns whether the tuning is on.
pub fn configure() -> bool {
    let on = std::env::var_os(TUNING_ENV).is_none_or(|v| v != "off");
    TUNED.store(on, Ordering::Relaxed);
    #[cfg(target_env = "gnu")]
    if on {
        // SAFETY: mallopt only sets an allocator parameter; no thread is allocating yet.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) };
    }
    on
}

/// Whether [`configure`] left the tuning on.
pub fn tuned() -> bool {
    TUNED.load(Ordering::Relaxed)
}

/// Returns the heap freed so far to the kernel (`malloc_trim(0)`), unless the tuning is off,
/// and logs what was resident before and after (`memory_trimmed`). `after` names the step
/// that freed it.
pub fn release_freed(after: &'static str) {
    if !tuned() {
        return;
    }
    let before = resident_of(None);
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's heaps to the kernel.
    unsafe {
        libc::malloc_trim(0)
    };
    let now = resident_of(None);
    if let (Some(before), Some(now)) = (before, now) {
        tracing::info!(
            event = "memory_trimmed",
            after,
            rss_before_bytes = before.rss,
            rss_bytes = now.rss,
            peak_bytes = now.peak,
            "freed heap returned to the kernel"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_resident_memory() {
        let r = resident_of(None).expect("/proc/self/status has VmRSS and VmHWM");
        assert!(r.rss > 0 && r.peak >= r.rss, "{r:?}");
        assert_eq!(resident_of(Some(u32::MAX)), None);
    }

    #[test]
    fn trimming_returns_freed_heap() {
        // 64 MiB in small blocks (below the mmap threshold, so on the heap), all touched,
        // with one small block kept above them, then freed: only a trim returns them.
        let blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 16 * 1024]).collect();
        let pin = std::hint::black_box(Box::new([2u8; 64]));
        let before = resident_of(None).expect("resident").rss;
        drop(blocks);
        release_freed("test");
        let after = resident_of(None).expect("resident").rss;
        assert!(pin[0] == 2);
        assert!(
            after + 32 * 1024 * 1024 < before,
            "before {before}, after {after}"
        );
    }
}
