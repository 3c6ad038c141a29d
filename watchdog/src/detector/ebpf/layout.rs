//! What the kernel programs need to know about the running kernel, found at load time:
//! field offsets from `/sys/kernel/btf/vmlinux` and the `sched_process_exit` record format
//! from tracefs. Nothing here comes from headers compiled for one kernel.

use std::path::{Path, PathBuf};

use watchdog_common::{exit_mode, globals};

use super::EbpfError;
use super::btf::Btf;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where tracefs may be mounted, in the order the kernel documentation prefers.
const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// How the exit program decides that a thread exit is the death of its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitMode {
    /// The tracepoint has a `group_dead` field at this byte offset (kernel 6.16 and later).
    TracepointGroupDead {
        /// Offset of `group_dead` in the tracepoint record.
        offset: u32,
    },
    /// No `group_dead` field (5.x, 6.1): read `task->signal->live`, report once per process.
    SignalLive,
}

impl ExitMode {
    /// A short name for the metrics' `build_info`: `group_dead` or `signal_live`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::TracepointGroupDead { .. } => "group_dead",
            Self::SignalLive => "signal_live",
        }
    }
}

impl std::fmt::Display for ExitMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TracepointGroupDead { offset } => {
                write!(f, "tracepoint field group_dead (offset {offset})")
            }
            Self::SignalLive => write!(f, "task->signal->live reaching 0 (no group_dead field)"),
        }
    }
}

/// Every value the programs read from globals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLayout {
    /// How deaths are decided.
    pub exit_mode: ExitMode,
    /// `(global name, byte offset)` of each kernel struct member the programs read.
    pub offsets: Vec<(&'static str, u32)>,
}

/// The struct members the programs read, by global name.
const FIELDS: [(&str, &str, &str); 8] = [
    (globals::TASK_EXIT_CODE, "task_struct", "exit_code"),
    (globals::TASK_GROUP_LEADER, "task_struct", "group_leader"),
    (globals::TASK_SIGNAL, "task_struct", "signal"),
    (
        globals::TASK_START_BOOTTIME,
        "task_struct",
        "start_boottime",
    ),
    (globals::TASK_COMM, "task_struct", "comm"),
    (globals::SIGNAL_LIVE, "signal_struct", "live"),
    (
        globals::SIGNAL_GROUP_EXIT_CODE,
        "signal_struct",
        "group_exit_code",
    ),
    (globals::SIGNAL_OOM_MM, "signal_struct", "oom_mm"),
];

/// The mounted tracefs directory, if any.
pub fn tracefs_dir() -> Option<PathBuf> {
    TRACEFS_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("events").is_dir())
}

/// Offset of `group_dead` in a tracepoint `format` file's text, when the field exists.
pub fn group_dead_offset(format: &str) -> Option<u32> {
    let line = format.lines().find(|l| l.contains(" group_dead;"))?;
    let offset = line
        .split(';')
        .find_map(|part| part.trim().strip_prefix("offset:"))?;
    offset.trim().parse().ok()
}

impl KernelLayout {
    /// Reads BTF and the tracepoint format of the running kernel. `force_signal_live` selects
    /// the path for kernels without `group_dead` even when the field exists (for tests).
    pub fn probe(force_signal_live: bool) -> Result<Self, EbpfError> {
        let data = std::fs::read(VMLINUX_BTF).map_err(|source| EbpfError::NoBtf {
            path: VMLINUX_BTF.into(),
            source,
        })?;
        let btf = Btf::parse(&data)?;
        let mut offsets = Vec::with_capacity(FIELDS.len());
        for (global, strukt, member) in FIELDS {
            offsets.push((global, btf.member_offset(strukt, member)?));
        }
        let tracefs = tracefs_dir().ok_or(EbpfError::TracefsMissing)?;
        let format_path = tracefs.join("events/sched/sched_process_exit/format");
        let format = read_format(&format_path)?;
        let exit_mode = match group_dead_offset(&format) {
            Some(offset) if !force_signal_live => ExitMode::TracepointGroupDead { offset },
            _ => ExitMode::SignalLive,
        };
        Ok(Self { exit_mode, offsets })
    }

    /// The values of the two mode globals.
    pub fn mode_globals(&self) -> [(&'static str, u32); 2] {
        match self.exit_mode {
            ExitMode::TracepointGroupDead { offset } => [
                (globals::EXIT_MODE, exit_mode::TRACEPOINT_GROUP_DEAD),
                (globals::TP_GROUP_DEAD_OFFSET, offset),
            ],
            ExitMode::SignalLive => [
                (globals::EXIT_MODE, exit_mode::SIGNAL_LIVE),
                (globals::TP_GROUP_DEAD_OFFSET, 0),
            ],
        }
    }
}

fn read_format(path: &Path) -> Result<String, EbpfError> {
    std::fs::read_to_string(path).map_err(|source| EbpfError::TracepointFormat {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_dead_offset_is_read_from_the_format_text() {
        let with = "\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;\n\
                    \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(group_dead_offset(with), Some(32));
        let without = "\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
                       \tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;\n";
        assert_eq!(group_dead_offset(without), None);
    }

    #[test]
    fn offsets_come_from_this_kernels_btf() {
        let Ok(data) = std::fs::read(VMLINUX_BTF) else {
            eprintln!("SKIP: {VMLINUX_BTF} is not readable here");
            return;
        };
        let btf = Btf::parse(&data).expect("vmlinux BTF parses");
        for (_, strukt, member) in FIELDS {
            let offset = btf.member_offset(strukt, member).expect("member found");
            assert!(
                offset > 0 && offset < 16 * 1024,
                "{strukt}.{member} at {offset}"
            );
        }
        assert!(matches!(
            btf.member_offset("task_struct", "no_such_member"),
            Err(super::super::btf::BtfError::NoMember { .. })
        ));
    }
}
