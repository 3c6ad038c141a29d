//! Types shared by the kernel programs (`watchdog-ebpf`) and the daemon (`vma-watchdog`).
//!
//! Everything that crosses the kernel/user boundary is defined once, here: the ring-buffer
//! record, the event kinds, the names of maps, programs and globals, and the indices of the
//! statistics counters. Layouts are `#[repr(C)]` with no implicit padding, checked at compile
//! time, so both sides read the same bytes.
#![no_std]

/// Length of a task name (`comm`), including the terminating NUL (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Nanoseconds per clock tick: `/proc/<pid>/stat` field 22 is `start_boottime / (1e9 / USER_HZ)`
/// with `USER_HZ` = 100 on every Linux architecture the watchdog runs on.
pub const NSEC_PER_CLOCK_TICK: u64 = 1_000_000_000 / 100;

/// What a [`RawEvent`] reports. Values are part of the wire format between kernel and user
/// space: never reuse or renumber one; add new kinds with new values.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The last thread of a watched or name-matched process exited: the process is dead.
    Exited = 1,
    /// A process whose name matches was exec'd; the kernel has added it to the watched map.
    Started = 2,
}

impl EventKind {
    /// Decodes the `kind` field of a [`RawEvent`]; `None` for a value this build does not know.
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Exited),
            2 => Some(Self::Started),
            _ => None,
        }
    }
}

/// [`RawEvent::flags`] bit: the process was chosen by the OOM killer (`signal->oom_mm` set).
pub const FLAG_OOM_VICTIM: u32 = 1 << 0;
/// [`RawEvent::flags`] bit: the process was in the watched-tgid map.
pub const FLAG_WATCHED: u32 = 1 << 1;
/// [`RawEvent::flags`] bit: the process name matched the configured names.
pub const FLAG_NAME_MATCHED: u32 = 1 << 2;

/// One record in the ring buffer. 48 bytes, 8-byte aligned, no padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent {
    /// An [`EventKind`] value.
    pub kind: u32,
    /// Thread-group id of the process (the pid as `ps` shows it).
    pub tgid: u32,
    /// Start time of the process in clock ticks since boot, as `/proc/<pid>/stat` field 22:
    /// the group leader's `start_boottime` divided by [`NSEC_PER_CLOCK_TICK`].
    pub start_time: u64,
    /// `bpf_ktime_get_ns()` when the event happened (CLOCK_MONOTONIC, nanoseconds).
    pub ktime_ns: u64,
    /// Raw wait status for [`EventKind::Exited`] (`(code << 8) | signal`, `0x80` = core
    /// dumped), as `waitpid` would return it; 0 for [`EventKind::Started`].
    pub exit_status: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Name of the process (the group leader's `comm`), NUL-padded.
    pub comm: [u8; COMM_LEN],
}

// The record must have no implicit padding: the kernel writes every byte, user space reads them.
const _: () = assert!(core::mem::size_of::<RawEvent>() == 48);
const _: () = assert!(core::mem::align_of::<RawEvent>() == 8);

impl RawEvent {
    /// The name as bytes, up to the first NUL.
    pub fn comm_bytes(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.comm[..end]
    }
}

/// Names of the maps in the eBPF object.
pub mod maps {
    /// Ring buffer of [`crate::RawEvent`]s.
    pub const EVENTS: &str = "EVENTS";
    /// Hash map: tgid (`u32`) → start time in clock ticks (`u64`, 0 = any start time).
    pub const WATCHED: &str = "WATCHED";
    /// Hash map: NUL-padded name (`[u8; COMM_LEN]`) → `u8` (unused), the names to match.
    pub const MATCH_NAMES: &str = "MATCH_NAMES";
    /// LRU hash map: (tgid, leader `start_boottime`) already reported, used only when deaths
    /// are decided from `signal->live` (no `group_dead` in the tracepoint), where several
    /// exiting threads can see the counter at zero.
    pub const REPORTED: &str = "REPORTED";
    /// Per-CPU array of `u64` counters, indexed by [`crate::stats`].
    pub const STATS: &str = "STATS";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// Tracepoint program for `sched/sched_process_exit`.
    pub const EXIT: &str = "watchdog_exit";
    /// Tracepoint program for `sched/sched_process_exec`.
    pub const EXEC: &str = "watchdog_exec";
}

/// Indices into the [`maps::STATS`] per-CPU array.
pub mod stats {
    /// Every `sched_process_exit` hit (one per thread).
    pub const EXITS_SEEN: u32 = 0;
    /// Exits of the last thread of a process (whatever the filter says).
    pub const GROUP_DEATHS: u32 = 1;
    /// Events written to the ring buffer.
    pub const EVENTS_SENT: u32 = 2;
    /// Events lost because the ring buffer was full.
    pub const EVENTS_DROPPED: u32 = 3;
    /// Errors reading kernel memory (bad offsets would show here).
    pub const READ_ERRORS: u32 = 4;
    /// Number of counters.
    pub const COUNT: u32 = 5;
}

/// How the exit program decides that a thread exit is the death of its process.
/// Values are set by user space in [`globals::EXIT_MODE`]; never reuse one.
pub mod exit_mode {
    /// Read the tracepoint's `group_dead` field at [`crate::globals::TP_GROUP_DEAD_OFFSET`].
    pub const TRACEPOINT_GROUP_DEAD: u32 = 1;
    /// Read `task->signal->live`: zero once every thread has passed its decrement in `do_exit`.
    pub const SIGNAL_LIVE: u32 = 2;
}

/// Names of the read-only globals that user space sets at load (`EbpfLoader::override_global`).
/// All are `u32`; offsets are byte offsets found in `/sys/kernel/btf/vmlinux`.
pub mod globals {
    /// One of [`crate::exit_mode`].
    pub const EXIT_MODE: &str = "EXIT_MODE";
    /// Offset of `group_dead` in the `sched_process_exit` record (from tracefs).
    pub const TP_GROUP_DEAD_OFFSET: &str = "TP_GROUP_DEAD_OFFSET";
    /// `task_struct.exit_code`.
    pub const TASK_EXIT_CODE: &str = "TASK_EXIT_CODE";
    /// `task_struct.group_leader`.
    pub const TASK_GROUP_LEADER: &str = "TASK_GROUP_LEADER";
    /// `task_struct.signal`.
    pub const TASK_SIGNAL: &str = "TASK_SIGNAL";
    /// `task_struct.start_boottime`.
    pub const TASK_START_BOOTTIME: &str = "TASK_START_BOOTTIME";
    /// `task_struct.comm`.
    pub const TASK_COMM: &str = "TASK_COMM";
    /// `signal_struct.live` (an `atomic_t`).
    pub const SIGNAL_LIVE: &str = "SIGNAL_LIVE";
    /// `signal_struct.group_exit_code`.
    pub const SIGNAL_GROUP_EXIT_CODE: &str = "SIGNAL_GROUP_EXIT_CODE";
    /// `signal_struct.oom_mm`.
    pub const SIGNAL_OOM_MM: &str = "SIGNAL_OOM_MM";
}
