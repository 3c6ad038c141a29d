//! Privileged: threads that exit in odd orders. A stand-in whose leader thread exits first
//! (as `pthread_exit` in `main` would) and whose other threads exit one by one later, the last
//! ending the process; and one whose worker thread calls `exit_group`. The watchdog reports
//! each death once, only when the whole thread group is gone, with the process's real exit
//! status (0, the leader's, for the first: no thread's own code; the code given to
//! `exit_group` for the second).
//!
//! Every case runs with `--detector procfs` and `--detector auto` (eBPF where it loads).
//! Run: `cargo test -p vma-watchdog --test thread_order` as root.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

fn watchdog(state: &std::path::Path, detector: &str) -> WatchdogProcess {
    let standin = standin_bin();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--migratekit-path",
        standin.to_str().unwrap(),
    ];
    WatchdogProcess::start_with(state, detector, &args, &[])
}

/// Starts a stand-in with `flags`, checks it is not taken for dead while any of its threads
/// runs, then that its death is logged once with `code`.
fn ends_once(detector: &str, job: &str, flags: &[&str], code: i32) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let w = watchdog(&state, detector);
    let s = Standin::start(dir.path(), job, &secret(), flags);
    w.wait_event("process_started", s.pid);
    // The run lasts 2 s: at 1 s the leader (for dissolve) has long exited, the rest runs.
    std::thread::sleep(Duration::from_secs(1));
    let early: Vec<_> = w
        .lines_for(s.pid)
        .into_iter()
        .filter(|v| v["event"] == "process_exited")
        .collect();
    assert!(
        early.is_empty(),
        "a death logged while threads ran: {early:?}"
    );
    assert!(
        std::fs::read_to_string(format!("/proc/{}/stat", s.pid)).is_ok(),
        "the stand-in ended early"
    );
    let line = w.wait_event("process_exited", s.pid);
    // Gone as a whole when the death is reported: only the unreaped zombie is left.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid)).unwrap_or_default();
    let state_char = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    assert!(
        matches!(state_char, Some('Z') | Some('X') | None),
        "reported while alive: {stat}"
    );
    assert_eq!(line["job_id"], job);
    assert_exit(&line, Some(code), None, Some(false));
    std::thread::sleep(Duration::from_millis(1500));
    let deaths = w
        .lines_for(s.pid)
        .into_iter()
        .filter(|v| v["event"] == "process_exited" || v["event"] == "died_while_unwatched")
        .count();
    assert_eq!(deaths, 1, "{}", w.raw());
    let events = outbox_events_for(&state, s.pid);
    assert_eq!(
        events.len(),
        2,
        "a start and one death in the outbox: {events:?}"
    );
    let status = s.reap();
    assert_eq!(status.code(), Some(code));
    w.stop();
}

/// The leader exits first; the other threads exit one by one with `exit(2)`, the last ends
/// the process: exit status 0 (the leader's), reported once when the last thread is gone.
fn leader_first_then_each_thread(detector: &str) {
    let flags = ["--standin-dissolve", "--standin-run-for", "2"];
    ends_once(detector, &format!("job-dissolve-{detector}"), &flags, 0);
}

/// A worker thread calls `exit_group(6)`: the whole process ends with code 6, reported once.
fn worker_exit_group(detector: &str) {
    let flags = [
        "--standin-end-from-worker",
        "--standin-exit-code",
        "6",
        "--standin-run-for",
        "2",
    ];
    ends_once(
        detector,
        &format!("job-worker-exit-group-{detector}"),
        &flags,
        6,
    );
}

both_detectors!(leader_first_then_each_thread, worker_exit_group);
