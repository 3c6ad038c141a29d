//! Errors of the eBPF detector. Each message says what to do.

use std::path::PathBuf;

use aya::maps::MapError;
use aya::programs::ProgramError;
use thiserror::Error;

use super::BtfError;

/// Why the eBPF detector could not start. Each message says what to do.
#[derive(Debug, Error)]
pub enum EbpfError {
    /// The binary was built without the eBPF object.
    #[error(
        "eBPF object not built into this binary: run `cargo xtask build-ebpf`, then rebuild vma-watchdog"
    )]
    ObjectNotBuilt,
    /// Not running as root.
    #[error(
        "the eBPF detector needs root (CAP_BPF, CAP_PERFMON): run vma-watchdog as root, or use --detector procfs"
    )]
    NotRoot,
    /// No kernel BTF.
    #[error(
        "cannot read {path}: {source}; the kernel needs CONFIG_DEBUG_INFO_BTF=y for the eBPF detector (use --detector procfs otherwise)"
    )]
    NoBtf {
        /// The BTF file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The kernel BTF lacks something the programs need.
    #[error(
        "kernel BTF unusable: {0}; this kernel's task_struct differs from what the eBPF programs expect (use --detector procfs)"
    )]
    Btf(#[from] BtfError),
    /// tracefs is not mounted.
    #[error(
        "tracefs is not mounted at /sys/kernel/tracing: run `mount -t tracefs nodev /sys/kernel/tracing` (or `cargo xtask setup`)"
    )]
    TracefsMissing,
    /// The tracepoint format file could not be read.
    #[error(
        "cannot read the tracepoint format {path}: {source}; check that the kernel has sched tracepoints (CONFIG_TRACEPOINTS)"
    )]
    TracepointFormat {
        /// The format file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A match name is empty.
    #[error("a process name to match is empty: pass a name such as `migratekit`")]
    EmptyMatchName,
    /// The object could not be loaded (maps created, relocations).
    #[error("loading the eBPF object failed: {0}; rebuild it with `cargo xtask build-ebpf`")]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object.
    #[error("program {0} missing from the eBPF object: rebuild it with `cargo xtask build-ebpf`")]
    MissingProgram(&'static str),
    /// A map is missing or has the wrong type.
    #[error("map {name} unusable: {source}; rebuild the eBPF object with `cargo xtask build-ebpf`")]
    Map {
        /// The map.
        name: &'static str,
        /// What went wrong.
        source: MapError,
    },
    /// The verifier rejected a program.
    #[error(
        "the kernel rejected program {program}: {io_error}; verifier log ends with:\n{log_tail}"
    )]
    Rejected {
        /// The program.
        program: &'static str,
        /// The error of the load syscall.
        io_error: std::io::Error,
        /// The last lines of the verifier log.
        log_tail: String,
    },
    /// Loading or attaching a program failed otherwise.
    #[error("attaching program {program} to its tracepoint failed: {source}")]
    Attach {
        /// The program.
        program: &'static str,
        /// What went wrong.
        source: ProgramError,
    },
    /// The kernel's information about a loaded program could not be read.
    #[error("reading the kernel's statistics of program {program} failed: {source}")]
    ProgramInfo {
        /// The program.
        program: &'static str,
        /// What went wrong.
        source: ProgramError,
    },
    /// Called outside a tokio runtime.
    #[error("EbpfDetector::start must be called inside a tokio runtime")]
    NoRuntime,
    /// The ring buffer could not be registered with tokio.
    #[error("cannot poll the eBPF ring buffer: {0}")]
    Poll(std::io::Error),
}
