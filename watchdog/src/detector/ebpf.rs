//! The eBPF detector: tracepoint programs on `sched_process_exit` and `sched_process_exec`
//! (crate `watchdog-ebpf`), filtered in the kernel, read from a ring buffer.
//!
//! See `docs/EBPF.md` for how the programs decide that a process died.

mod btf;
mod error;
mod layout;
mod reader;

use std::sync::Mutex;

use api::{Detector as DetectorKind, ProcessIdentity};
use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{ProgramError, TracePoint};
use aya::{Ebpf, EbpfLoader};
use tokio::sync::mpsc;
use watchdog_common::{COMM_LEN, maps, programs, stats};

pub use btf::BtfError;
pub use error::EbpfError;
pub use layout::{ExitMode, KernelLayout, VMLINUX_BTF};

use super::{Detector, DetectorEvent};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded by `build.rs`; empty when it
/// was not built.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watchdog-ebpf.o"));

/// How many decoded events may wait for the daemon before the reader stops draining the ring.
const CHANNEL_CAPACITY: usize = 4096;

/// Options of [`EbpfDetector::start_with`].
#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// Process names (`comm`, at most 15 bytes; longer names are cut like the kernel does).
    pub match_names: Vec<String>,
    /// Use the `signal->live` path even where the tracepoint has `group_dead`. This is the
    /// path of 5.x and 6.1 kernels; forcing it lets it be tested on a newer kernel.
    pub force_signal_live: bool,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EbpfStats {
    /// Thread exits seen by the exit program.
    pub exits_seen: u64,
    /// Exits that were the last thread of their process.
    pub group_deaths: u64,
    /// Events written to the ring buffer.
    pub events_sent: u64,
    /// Events lost because the ring buffer was full.
    pub events_dropped: u64,
    /// Failed kernel reads (would show wrong offsets).
    pub read_errors: u64,
}

/// Run statistics of one program, as the kernel counts them while BPF statistics are
/// enabled (`aya::sys::enable_stats(Stats::RunTime)` or `sysctl kernel.bpf_stats_enabled=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramRunStats {
    /// The program (`watchdog_common::programs`).
    pub program: &'static str,
    /// How many times it ran.
    pub run_count: u64,
    /// Total time spent in it.
    pub run_time: std::time::Duration,
}

/// A running eBPF detector. Dropping it detaches the programs and stops its reader task.
pub struct EbpfDetector {
    watched: Mutex<BpfHashMap<MapData, u32, u64>>,
    stats: PerCpuArray<MapData, u64>,
    exit_mode: ExitMode,
    reader: tokio::task::JoinHandle<()>,
    // Holds the attached programs; dropped last.
    ebpf: Ebpf,
}

impl std::fmt::Debug for EbpfDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfDetector")
            .field("exit_mode", &self.exit_mode)
            .finish_non_exhaustive()
    }
}

impl Drop for EbpfDetector {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The NUL-padded kernel form of a name, cut to 15 bytes like `comm`.
pub fn comm_key(name: &str) -> [u8; COMM_LEN] {
    let mut key = [0u8; COMM_LEN];
    let bytes = name.as_bytes();
    let len = bytes.len().min(COMM_LEN - 1);
    key[..len].copy_from_slice(&bytes[..len]);
    key
}

/// True when the embedded object is present (`cargo xtask build-ebpf` ran before the build).
pub fn object_built() -> bool {
    !OBJECT.is_empty()
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

/// Puts the process names to match into the kernel's map, before any program attaches, so
/// that the programs filter from their first event.
fn fill_match_names(ebpf: &mut Ebpf, match_names: &[String]) -> Result<(), EbpfError> {
    let mut names: BpfHashMap<_, [u8; COMM_LEN], u8> = BpfHashMap::try_from(
        ebpf.map_mut(maps::MATCH_NAMES)
            .ok_or(EbpfError::MissingProgram(maps::MATCH_NAMES))?,
    )
    .map_err(map_err(maps::MATCH_NAMES))?;
    for name in match_names {
        if name.len() >= COMM_LEN {
            tracing::warn!(name = %name, "process names are at most 15 bytes in the kernel; matching the first 15");
        }
        names
            .insert(comm_key(name), 1, 0)
            .map_err(map_err(maps::MATCH_NAMES))?;
    }
    Ok(())
}

impl EbpfDetector {
    /// Loads and attaches both programs, matching `match_names`, and starts the reader task.
    pub fn start(
        match_names: &[String],
    ) -> Result<(EbpfDetector, mpsc::Receiver<DetectorEvent>), EbpfError> {
        Self::start_with(&EbpfOptions {
            match_names: match_names.to_vec(),
            force_signal_live: false,
        })
    }

    /// [`EbpfDetector::start`] with all options.
    pub fn start_with(
        options: &EbpfOptions,
    ) -> Result<(EbpfDetector, mpsc::Receiver<DetectorEvent>), EbpfError> {
        let started = Self::load(options);
        // Loaded or not, the kernel's BTF was read and parsed on the way (see crate::memory).
        crate::memory::release_freed("ebpf_load");
        started
    }

    fn load(
        options: &EbpfOptions,
    ) -> Result<(EbpfDetector, mpsc::Receiver<DetectorEvent>), EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::ObjectNotBuilt);
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(EbpfError::NotRoot);
        }
        if options.match_names.iter().any(String::is_empty) {
            return Err(EbpfError::EmptyMatchName);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EbpfError::NoRuntime)?;
        let layout = KernelLayout::probe(options.force_signal_live)?;
        raise_memlock_limit();

        let mut loader = EbpfLoader::new();
        if !needs_kernel_btf() {
            // Parsed by `new` (some 14 MiB of heap) and only used for CO-RE relocations:
            // freed now rather than kept through the load.
            loader.btf(None);
        }
        let mode_globals = layout.mode_globals();
        for (name, value) in layout.offsets.iter().chain(mode_globals.iter()) {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(OBJECT)?;

        fill_match_names(&mut ebpf, &options.match_names)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(EbpfError::Map {
                name,
                source: MapError::InvalidName { name: name.into() },
            })
        };
        let watched = BpfHashMap::try_from(take(&mut ebpf, maps::WATCHED)?)
            .map_err(map_err(maps::WATCHED))?;
        let stats =
            PerCpuArray::try_from(take(&mut ebpf, maps::STATS)?).map_err(map_err(maps::STATS))?;
        let ring =
            RingBuf::try_from(take(&mut ebpf, maps::EVENTS)?).map_err(map_err(maps::EVENTS))?;

        // The reader is registered before the programs attach so that no event waits unread.
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let ring = {
            let _guard = runtime.enter();
            // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd
            // owns the RingBuf; nothing else closes or replaces that fd.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    ring,
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| EbpfError::Poll(e.into()))?
        };
        for (program, category, name) in [
            (programs::EXEC, "sched", "sched_process_exec"),
            (programs::EXIT, "sched", "sched_process_exit"),
        ] {
            attach(&mut ebpf, program, category, name)?;
        }
        let reader = runtime.spawn(reader::read_ring(ring, tx));
        tracing::info!(exit_mode = %layout.exit_mode, names = ?options.match_names, "eBPF detector attached; deaths decided by {}", layout.exit_mode);
        let detector = EbpfDetector {
            watched: Mutex::new(watched),
            stats,
            exit_mode: layout.exit_mode,
            reader,
            ebpf,
        };
        Ok((detector, rx))
    }

    /// How this detector decides deaths.
    pub fn exit_mode(&self) -> ExitMode {
        self.exit_mode
    }

    /// Run count and run time of both programs (zero unless BPF statistics are enabled).
    pub fn run_stats(&self) -> Result<[ProgramRunStats; 2], EbpfError> {
        let one = |program: &'static str| -> Result<ProgramRunStats, EbpfError> {
            let info = self
                .ebpf
                .program(program)
                .ok_or(EbpfError::MissingProgram(program))?
                .info()
                .map_err(|source| EbpfError::ProgramInfo { program, source })?;
            Ok(ProgramRunStats {
                program,
                run_count: info.run_count(),
                run_time: info.run_time(),
            })
        };
        Ok([one(programs::EXIT)?, one(programs::EXEC)?])
    }

    /// The kernel-side counters, summed over CPUs.
    pub fn stats(&self) -> Result<EbpfStats, EbpfError> {
        let read = |index: u32| -> Result<u64, EbpfError> {
            let values = self.stats.get(&index, 0).map_err(map_err(maps::STATS))?;
            Ok(values.iter().sum())
        };
        Ok(EbpfStats {
            exits_seen: read(stats::EXITS_SEEN)?,
            group_deaths: read(stats::GROUP_DEATHS)?,
            events_sent: read(stats::EVENTS_SENT)?,
            events_dropped: read(stats::EVENTS_DROPPED)?,
            read_errors: read(stats::READ_ERRORS)?,
        })
    }
}

fn attach(
    ebpf: &mut Ebpf,
    program: &'static str,
    category: &str,
    name: &str,
) -> Result<(), EbpfError> {
    let tp: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or(EbpfError::MissingProgram(program))?
        .try_into()
        .map_err(|source| EbpfError::Attach { program, source })?;
    tp.load().map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let log_tail = lines[lines.len().saturating_sub(20)..].join("\n");
            EbpfError::Rejected {
                program,
                io_error,
                log_tail,
            }
        }
        source => EbpfError::Attach { program, source },
    })?;
    tp.attach(category, name)
        .map_err(|source| EbpfError::Attach { program, source })?;
    Ok(())
}

/// True when the embedded object has CO-RE relocations, which aya applies against the
/// kernel's BTF. Ours has none (offsets come from `layout`, set as globals); this keeps a
/// future object that has some working.
fn needs_kernel_btf() -> bool {
    aya_obj::Object::parse(OBJECT).map_or(true, |object| object.has_btf_relocations())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; failure only leaves the old limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels 5.11 and later");
    }
}

fn io_err(e: MapError) -> std::io::Error {
    match e {
        MapError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other),
    }
}

impl Detector for EbpfDetector {
    fn kind(&self) -> DetectorKind {
        DetectorKind::Ebpf
    }

    fn watch(&self, process: ProcessIdentity) -> std::io::Result<()> {
        let mut map = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(process.pid, process.start_time, 0)
            .map_err(io_err)
    }

    fn unwatch(&self, process: ProcessIdentity) -> std::io::Result<()> {
        let mut map = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        match map.remove(&process.pid) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => match io_err(e) {
                e if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                e => Err(e),
            },
        }
    }

    fn exit_mode_name(&self) -> &'static str {
        self.exit_mode.name()
    }

    fn kernel_counters(&self) -> Option<super::KernelCounters> {
        // Run statistics may be refused (an old kernel); the counters are still worth having.
        let runs = self.run_stats().map(Vec::from).unwrap_or_default();
        match self.stats() {
            Ok(stats) => Some(super::KernelCounters { stats, runs }),
            Err(error) => {
                tracing::warn!(event = "ebpf_stats_unreadable", %error,
                    "cannot read the eBPF programs' counters for the metrics");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_object_needs_no_kernel_btf() {
        if !super::object_built() {
            eprintln!("SKIP: the eBPF object is not built (cargo xtask build-ebpf)");
            return;
        }
        // The loader drops the kernel's BTF before loading only when this holds.
        assert!(!super::needs_kernel_btf());
    }
}
