//! Detectors: the mechanisms that see migratekit processes start and die.
//!
//! Two implementations give the same events: [`ebpf`] (tracepoints, the default when it can
//! load) and [`procfs`] (polling `/proc` and pidfds, the fallback). The daemon does not care
//! which one runs beyond logging it.

pub mod ebpf;

use api::{Detector as DetectorKind, ExitStatus, ProcessIdentity};

/// One observation from a detector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectorEvent {
    /// A process whose name matches was exec'd (or found by a fallback scan).
    Started {
        /// The process.
        process: ProcessIdentity,
        /// Its name (`comm`, at most 15 bytes).
        comm: String,
    },
    /// A watched process (or one whose name matches) died: its last thread exited.
    Exited {
        /// The process.
        process: ProcessIdentity,
        /// How it died; all fields unknown when the detector could not tell.
        exit: ExitStatus,
        /// Its name (`comm`).
        comm: String,
        /// Kernel monotonic timestamp of the death (`bpf_ktime_get_ns`), when known.
        ktime_ns: Option<u64>,
    },
}

/// Control side of a running detector: which processes to watch.
///
/// Events arrive on the channel returned when the detector is started.
pub trait Detector: Send + Sync + std::fmt::Debug {
    /// Which kind of detector this is, for logs and events.
    fn kind(&self) -> DetectorKind;
    /// Watch this process (found by a `/proc` scan, started or tracked) for its death.
    fn watch(&self, process: ProcessIdentity) -> std::io::Result<()>;
    /// Stop watching it (it died, or its job was forgotten).
    fn unwatch(&self, process: ProcessIdentity) -> std::io::Result<()>;
    /// What the kernel programs counted, for the metrics: `None` for a detector without
    /// kernel programs, or when their counters cannot be read.
    fn kernel_counters(&self) -> Option<KernelCounters> {
        None
    }
    /// How deaths are decided in the kernel (`group_dead`, `signal_live`), or `none`.
    fn exit_mode_name(&self) -> &'static str {
        "none"
    }
}

/// The eBPF programs' own counters, read when Prometheus scrapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCounters {
    /// The per-CPU counters of the programs, summed.
    pub stats: ebpf::EbpfStats,
    /// Run count and time of each program (zero unless `kernel.bpf_stats_enabled` is 1).
    pub runs: Vec<ebpf::ProgramRunStats>,
}

pub mod procfs;
