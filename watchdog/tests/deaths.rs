//! Privileged: the real watchdog sees each way a real stand-in migratekit dies, and writes
//! the exact event to its JSON log, its journal and its registry.
//!
//! Every case runs with `--detector procfs` and `--detector auto` (eBPF once it is built in,
//! procfs until then). Run: `cargo test -p vma-watchdog --test deaths` as root.

#[macro_use]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use api::{JobProcessState, ProcessEventKind};
use common::*;
use serde_json::Value;

struct Case {
    dir: tempfile::TempDir,
    secret: String,
    watchdog: WatchdogProcess,
}

impl Case {
    fn start(detector: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let watchdog = WatchdogProcess::start(&dir.path().join("state"), detector);
        Self {
            dir,
            secret: secret(),
            watchdog,
        }
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    /// Starts a stand-in for `job` and waits until the watchdog has registered it.
    fn standin(&self, job: &str, extra: &[&str]) -> Standin {
        let s = Standin::start(self.dir.path(), job, &self.secret, extra);
        let started = self.watchdog.wait_event("process_started", s.pid);
        assert_eq!(started["job_id"], job);
        assert_eq!(started["start_time"], s.start_time());
        s
    }

    /// Waits for the death of `s`, checks it is the only one and that journal and registry
    /// agree with the log line, then stops the watchdog and checks no output holds the secret.
    fn death(self, s: Standin, job: &str) -> Value {
        self.death_in(s, job).0
    }

    /// [`Self::death`], also handing back the test's directory (the stand-in's cwd).
    fn death_in(self, s: Standin, job: &str) -> (Value, tempfile::TempDir) {
        let line = self.watchdog.wait_event("process_exited", s.pid);
        assert_eq!(line["job_id"], job);
        assert_eq!(line["detector"], self.watchdog.detector.as_str());
        let journal = outbox_events_for(&self.state(), s.pid);
        let exits: Vec<_> = journal
            .iter()
            .filter(|e| e.kind == ProcessEventKind::ProcessExited)
            .collect();
        assert_eq!(exits.len(), 1, "one death in the journal: {journal:?}");
        let ev = exits[0];
        assert_eq!(ev.event_id.to_string(), line["event_id"].as_str().unwrap());
        assert_eq!(ev.job_id, job);
        let exit = ev.exit.expect("a death carries its exit status");
        assert_eq!(serde_json::json!(exit.code), line["exit_code"]);
        assert_eq!(serde_json::json!(exit.signal), line["signal"]);
        // Stay a zombie for a few scans first: a dead process must not be found again.
        std::thread::sleep(Duration::from_millis(500));
        s.reap();
        std::thread::sleep(Duration::from_millis(300));
        let deaths = self
            .watchdog
            .lines_for(line["pid"].as_u64().unwrap() as u32);
        let n = deaths
            .iter()
            .filter(|v| v["event"] == "process_exited")
            .count();
        assert_eq!(n, 1, "exactly one death line: {deaths:?}");
        let state = self.state();
        let log = self.watchdog.stop();
        assert_secret_absent(&self.secret, &state, &[&log]);
        let registry = vma_watchdog::registry::Registry::open(&state).unwrap();
        match registry.job_status(job).map(|s| s.state) {
            Some(JobProcessState::Exited { exit: e, .. }) => assert_eq!(e, exit),
            other => panic!("registry should say {job} exited, says {other:?}"),
        }
        (line, self.dir)
    }
}

fn sigkill(detector: &str) {
    let case = Case::start(detector);
    let s = case.standin("job-kill", &[]);
    s.kill(libc::SIGKILL);
    let line = case.death(s, "job-kill");
    assert_exit(&line, None, Some(9), Some(false));
}

fn sigterm(detector: &str) {
    let case = Case::start(detector);
    let s = case.standin("job-term", &[]);
    s.kill(libc::SIGTERM);
    let line = case.death(s, "job-term");
    assert_exit(&line, None, Some(15), Some(false));
}

fn exit3(detector: &str) {
    let case = Case::start(detector);
    let mut s = case.standin("job-exit3", &["--standin-exit-code", "3"]);
    s.trigger();
    let line = case.death(s, "job-exit3");
    assert_exit(&line, Some(3), None, Some(false));
}

fn segv(detector: &str) {
    let case = Case::start(detector);
    let mut s = case.standin("job-segv", &["--standin-crash", "segv"]);
    s.trigger();
    let (line, dir) = case.death_in(s, "job-segv");
    let cwd = dir.path();
    // The stand-in lifts its core limit; the core flag is set when the kernel wrote a dump.
    let dumped = core_written(cwd);
    assert_exit(&line, None, Some(11), Some(dumped));
    assert!(
        dumped || core_pattern_is_pipe(),
        "no core file in {} and no core pipe",
        cwd.display()
    );
}

fn core_written(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("core"))
}

fn core_pattern_is_pipe() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/core_pattern").is_ok_and(|p| p.starts_with('|'))
}

/// A worker thread that exits is not a death; the process dies once, when it is killed.
fn thread_exit(detector: &str) {
    let case = Case::start(detector);
    let s = case.standin("job-thread", &["--standin-thread-exit"]);
    std::thread::sleep(Duration::from_secs(1));
    let early: Vec<_> = case.watchdog.lines_for(s.pid);
    assert!(
        !early.iter().any(|v| v["event"] == "process_exited"),
        "false death: {early:?}"
    );
    s.kill(libc::SIGKILL);
    let line = case.death(s, "job-thread");
    assert_exit(&line, None, Some(9), Some(false));
}

/// The leader thread exits while the others run on: no death until the last thread ends,
/// then exactly one, with the group's exit code (not the leader thread's own 0).
fn leader_exit(detector: &str) {
    let case = Case::start(detector);
    let mut s = case.standin(
        "job-leader",
        &["--standin-leader-exit", "--standin-exit-code", "5"],
    );
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stat = vma_watchdog::proc_reader::read_stat(s.pid)
            .unwrap()
            .unwrap();
        if stat.leader_exited_early() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader should be gone, threads alive: {stat:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A false death would be reported within this.
    std::thread::sleep(Duration::from_secs(1));
    let early: Vec<_> = case.watchdog.lines_for(s.pid);
    assert!(
        !early.iter().any(|v| v["event"] == "process_exited"),
        "false death: {early:?}"
    );
    s.trigger();
    let line = case.death(s, "job-leader");
    assert_exit(&line, Some(5), None, Some(false));
}

/// A storm of exits of processes with other names reaches neither the log nor the journal.
fn non_matching_storm(detector: &str) {
    let case = Case::start(detector);
    let mut pids = std::collections::HashSet::new();
    for _ in 0..2000 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        pids.insert(child.id());
        child.wait().unwrap();
    }
    // One real death afterwards, so the watchdog has demonstrably caught up.
    let s = case.standin("job-after-storm", &[]);
    s.kill(libc::SIGKILL);
    let state = case.state();
    let storm_lines: Vec<_> = {
        case.watchdog.wait_event("process_exited", s.pid);
        (case.watchdog.raw().lines())
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| {
                v["pid"]
                    .as_u64()
                    .is_some_and(|p| pids.contains(&(p as u32)))
            })
            // Pids are reused: once they wrap, the stand-in below, or a stand-in of another
            // checkout's tests on the same host (an impostor here, logged with its `exe`),
            // may get a pid of the storm. Those lines are about migratekit processes, not
            // about the storm's `true`.
            .filter(|v| v["job_id"] != "job-after-storm")
            .filter(|v| {
                !v["exe"]
                    .as_str()
                    .is_some_and(|e| e.ends_with("/migratekit"))
            })
            .collect()
    };
    assert!(
        storm_lines.is_empty(),
        "events about non-matching processes: {storm_lines:?}"
    );
    // Read the journal now: `death` ends the case and removes its directory.
    let path = state.join(vma_watchdog::outbox::DIR_NAME);
    let events = vma_watchdog::outbox::read_pending(&path).unwrap();
    assert!(events.iter().any(|e| e.process.pid == s.pid), "{events:?}");
    assert!(events.iter().all(|e| !pids.contains(&e.process.pid)));
    let line = case.death(s, "job-after-storm");
    assert_exit(&line, None, Some(9), Some(false));
}

both_detectors!(
    sigkill,
    sigterm,
    exit3,
    segv,
    thread_exit,
    leader_exit,
    non_matching_storm
);
