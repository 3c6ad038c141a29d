//! The two tracepoint programs. Thin wrappers call `try_*` functions that return `Result`,
//! so every kernel read failure is counted instead of silently producing a wrong event.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use watchdog_common::{
    COMM_LEN, EventKind, FLAG_NAME_MATCHED, FLAG_OOM_VICTIM, FLAG_WATCHED, NSEC_PER_CLOCK_TICK,
    RawEvent, exit_mode, stats,
};

// Globals set by user space at load time (`EbpfLoader::override_global`); the names are
// `watchdog_common::globals`. Offsets come from the running kernel's BTF, never from headers.
#[unsafe(no_mangle)]
static EXIT_MODE: u32 = 0;
#[unsafe(no_mangle)]
static TP_GROUP_DEAD_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_EXIT_CODE: u32 = 0;
#[unsafe(no_mangle)]
static TASK_GROUP_LEADER: u32 = 0;
#[unsafe(no_mangle)]
static TASK_SIGNAL: u32 = 0;
#[unsafe(no_mangle)]
static TASK_START_BOOTTIME: u32 = 0;
#[unsafe(no_mangle)]
static TASK_COMM: u32 = 0;
#[unsafe(no_mangle)]
static SIGNAL_LIVE: u32 = 0;
#[unsafe(no_mangle)]
static SIGNAL_GROUP_EXIT_CODE: u32 = 0;
#[unsafe(no_mangle)]
static SIGNAL_OOM_MM: u32 = 0;

// Map names are `watchdog_common::maps`; the static's name is the map's name.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map]
static WATCHED: HashMap<u32, u64> = HashMap::with_max_entries(16 * 1024, 0);
#[map]
static MATCH_NAMES: HashMap<[u8; COMM_LEN], u8> = HashMap::with_max_entries(64, 0);
#[map]
static REPORTED: LruHashMap<[u64; 2], u8> = LruHashMap::with_max_entries(4096, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// A failed kernel read or tracepoint read (the helper's negative errno).
type ReadError = i64;

/// Reads a global; volatile so the compiler cannot fold the zero it was compiled with.
#[inline(always)]
fn global(value: &'static u32) -> u32 {
    // SAFETY: `value` is a valid static; the loader rewrote it before the program ran.
    unsafe { core::ptr::read_volatile(value) }
}

/// Reads a `T` at `base + global(offset)` from kernel memory.
#[inline(always)]
fn read<T>(base: *const u8, offset: &'static u32) -> Result<T, ReadError> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(global(offset) as usize).cast::<T>()) }
        .map_err(i64::from)
}

/// The `task_struct` of the thread the program runs in.
#[inline(always)]
fn current_task() -> *const u8 {
    // SAFETY: bpf_get_current_task has no preconditions; it returns the current task pointer.
    unsafe { bpf_get_current_task() as *const u8 }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU, one at a time.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn emit(event: RawEvent) {
    match EVENTS.reserve::<RawEvent>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(0);
            bump(stats::EVENTS_SENT);
        }
        None => bump(stats::EVENTS_DROPPED),
    }
}

/// `sched/sched_process_exit`: fires once per exiting thread.
#[tracepoint]
pub fn watchdog_exit(ctx: TracePointContext) -> u32 {
    if try_exit(&ctx).is_err() {
        bump(stats::READ_ERRORS);
    }
    0
}

fn try_exit(ctx: &TracePointContext) -> Result<(), ReadError> {
    bump(stats::EXITS_SEEN);
    let mode = global(&EXIT_MODE);
    let task = current_task();
    // Is this the last thread of its group? Only then is it a process death.
    if mode == exit_mode::TRACEPOINT_GROUP_DEAD {
        // SAFETY: the offset comes from this kernel's tracepoint format; read_at checks bounds.
        let dead: u8 = unsafe { ctx.read_at(global(&TP_GROUP_DEAD_OFFSET) as usize) }?;
        if dead == 0 {
            return Ok(());
        }
    } else {
        // `do_exit` decrements `signal->live` before this tracepoint: zero means every thread
        // has passed that point. Several threads exiting at once can all see zero, so the
        // REPORTED map below makes the report happen once.
        let signal: *const u8 = read(task, &TASK_SIGNAL)?;
        let live: i32 = read(signal, &SIGNAL_LIVE)?;
        if live != 0 {
            return Ok(());
        }
    }
    bump(stats::GROUP_DEATHS);

    // Cheapest filter first: the watched tgids, then the name of the process.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let leader: *const u8 = read(task, &TASK_GROUP_LEADER)?;
    let mut flags = 0;
    let mut start_ns = None;
    if let Some(want) = WATCHED.get_ptr(tgid) {
        // SAFETY: the pointer from a successful lookup is valid for this program run.
        let want = unsafe { *want };
        let ns: u64 = read(leader, &TASK_START_BOOTTIME)?;
        start_ns = Some(ns);
        // A start time that differs means the watched process is gone and its pid was
        // recycled: the new process is not the one user space asked about.
        if want == 0 || want == ns / NSEC_PER_CLOCK_TICK {
            flags |= FLAG_WATCHED;
        }
        // Either way this tgid is dead now; a later process must not inherit the entry.
        let _ = WATCHED.remove(tgid);
    }
    // The group leader's name, not this thread's: worker threads may rename themselves.
    let comm: [u8; COMM_LEN] = read(leader, &TASK_COMM)?;
    if MATCH_NAMES.get_ptr(comm).is_some() {
        flags |= FLAG_NAME_MATCHED;
    }
    if flags == 0 {
        return Ok(());
    }

    let start_ns: u64 = match start_ns {
        Some(ns) => ns,
        None => read(leader, &TASK_START_BOOTTIME)?,
    };
    if mode != exit_mode::TRACEPOINT_GROUP_DEAD
        && REPORTED
            .insert([u64::from(tgid), start_ns], 1, u64::from(BPF_NOEXIST))
            .is_err()
    {
        // Another thread of this process already reported its death.
        return Ok(());
    }

    // What waitpid() would return: the group's exit code when the group was killed or called
    // exit_group (every thread then exits with it, core flag included), otherwise the leader's
    // own exit code (a leader that called pthread_exit leaves 0, like wait()).
    let signal: *const u8 = read(task, &TASK_SIGNAL)?;
    let group_code: i32 = read(signal, &SIGNAL_GROUP_EXIT_CODE)?;
    let status = if group_code != 0 {
        group_code
    } else {
        read::<i32>(leader, &TASK_EXIT_CODE)?
    };
    let oom_mm: u64 = read(signal, &SIGNAL_OOM_MM)?;
    if oom_mm != 0 {
        flags |= FLAG_OOM_VICTIM;
    }
    emit(RawEvent {
        kind: EventKind::Exited as u32,
        tgid,
        start_time: start_ns / NSEC_PER_CLOCK_TICK,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        exit_status: status as u32,
        flags,
        comm,
    });
    Ok(())
}

/// `sched/sched_process_exec`: a process whose new name matches is reported and watched from
/// this instant, whoever started it.
#[tracepoint]
pub fn watchdog_exec(ctx: TracePointContext) -> u32 {
    if try_exec(&ctx).is_err() {
        bump(stats::READ_ERRORS);
    }
    0
}

fn try_exec(_ctx: &TracePointContext) -> Result<(), ReadError> {
    // After exec the task's comm is already the new program's name.
    let comm = bpf_get_current_comm().map_err(i64::from)?;
    if MATCH_NAMES.get_ptr(comm).is_none() {
        return Ok(());
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let task = current_task();
    let leader: *const u8 = read(task, &TASK_GROUP_LEADER)?;
    let start_ns: u64 = read(leader, &TASK_START_BOOTTIME)?;
    let start_time = start_ns / NSEC_PER_CLOCK_TICK;
    // If the map is full the name filter still catches the death; only the FLAG_WATCHED bit
    // would be missing, so the error is ignored.
    let _ = WATCHED.insert(tgid, start_time, 0);
    emit(RawEvent {
        kind: EventKind::Started as u32,
        tgid,
        start_time,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        exit_status: 0,
        flags: FLAG_NAME_MATCHED | FLAG_WATCHED,
        comm,
    });
    Ok(())
}
