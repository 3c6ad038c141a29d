//! Privileged: only this VMA's migratekit counts. A process merely named `migratekit` (a copy
//! of the binary run by another user, or by root from another path) or a second live process
//! claiming a job that already runs is ignored, found by exec or by the scan at start: logged
//! once as `impostor_ignored`, never registered or reported, and the real job is untouched.
//! A migratekit whose binary an upgrade replaced on disk is still its job's after a restart.
//!
//! Real processes, a real other user (`mkit-test-attacker`, created at test time when
//! missing). Every case runs with `--detector procfs` and `--detector auto`.
//! Run: `cargo test -p vma-watchdog --test impostors -- --test-threads=1` as root.

#[macro_use]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api::JobProcessState;
use common::*;
use serde_json::Value;

/// The user the attacker's processes run as.
const ATTACKER: &str = "mkit-test-attacker";

/// The uid of [`ATTACKER`], created when missing; `None` (with a `SKIP:` line) when it cannot be.
fn attacker_uid(test: &str) -> Option<u32> {
    match test_support::ensure_user(ATTACKER) {
        Ok((uid, _)) => Some(uid),
        Err(why) => {
            eprintln!("SKIP: {test}: {why}");
            None
        }
    }
}

/// A directory every user may enter, with a copy of the stand-in named `migratekit` in it.
fn public_copy(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("migratekit");
    std::fs::copy(standin_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// `program migrate --vmware-password <secret> --job-id <job>`, run as `uid` in `cwd`.
fn claim(program: &Path, uid: Option<u32>, job: &str, secret: &str, cwd: &Path) -> Standin {
    let mut cmd = Command::new(program);
    cmd.args(["migrate", "--vmware-password", secret, "--job-id", job]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    Standin::spawn(cmd, cwd)
}

/// Waits for the `impostor_ignored` line of `pid` and checks its reason and what it shows.
fn ignored(w: &WatchdogProcess, pid: u32, reason: &str, found_by: &str) -> Value {
    let line = w.wait_event("impostor_ignored", pid);
    assert_eq!(line["reason"], reason, "{line}");
    assert_eq!(line["found_by"], found_by, "{line}");
    assert!(
        line["exe"]
            .as_str()
            .is_some_and(|e| e.contains("migratekit"))
    );
    assert!(line["uid"].is_u64(), "{line}");
    line
}

/// After the impostors have exited 0: nothing about them anywhere, one line each, and the job
/// still runs as the real process; then the real death is reported as usual.
fn nothing_about_impostors(
    w: WatchdogProcess,
    state: &Path,
    real: Standin,
    impostors: Vec<Standin>,
) {
    let pids: Vec<u32> = impostors.iter().map(|s| s.pid).collect();
    for mut s in impostors {
        s.trigger();
        assert_eq!(s.reap().code(), Some(0));
    }
    // Several scans of the procfs detector, and time for any report.
    std::thread::sleep(Duration::from_millis(600));
    for pid in &pids {
        let lines = w.lines_for(*pid);
        let events: Vec<_> = lines.iter().map(|v| v["event"].clone()).collect();
        assert_eq!(events, ["impostor_ignored"], "pid {pid}: {lines:?}");
        assert!(
            outbox_events_for(state, *pid).is_empty(),
            "pid {pid} reached the outbox"
        );
    }
    let registry = vma_watchdog::registry::Registry::open(state).unwrap();
    match registry.job_status("job-b").map(|s| s.state) {
        Some(JobProcessState::Running { process, .. }) => assert_eq!(process.pid, real.pid),
        other => panic!("job-b should still run as pid {}: {other:?}", real.pid),
    }
    real.kill(libc::SIGKILL);
    let death = w.wait_event("process_exited", real.pid);
    assert_eq!(death["job_id"], "job-b");
    assert_exit(&death, None, Some(9), Some(false));
    real.reap();
    w.stop();
}

/// Found by exec: a copy run by another user, a copy run by root from another path, and the
/// real binary run a second time for a job that runs.
fn found_by_exec(detector: &str) {
    let Some(uid) = attacker_uid("found_by_exec") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret = secret();
    let w = WatchdogProcess::start(&state, detector);
    let real = Standin::start(dir.path(), "job-b", &secret, &[]);
    w.wait_event("process_started", real.pid);
    let copy = public_copy(dir.path(), "attacker");
    let as_other_user = claim(&copy, Some(uid), "job-b", &secret, copy.parent().unwrap());
    let line = ignored(&w, as_other_user.pid, "wrong_executable", "exec");
    assert_eq!(line["uid"], uid);
    assert_eq!(line["job_id"], "job-b");
    let elsewhere = claim(&copy, None, "job-b", &secret, dir.path());
    ignored(&w, elsewhere.pid, "wrong_executable", "exec");
    let real_binary_as_other = claim(&standin_bin(), Some(uid), "job-b", &secret, Path::new("/"));
    ignored(&w, real_binary_as_other.pid, "wrong_user", "exec");
    let second = claim(&standin_bin(), None, "job-b", &secret, dir.path());
    ignored(&w, second.pid, "job_has_live_process", "exec");
    let impostors = vec![as_other_user, elsewhere, real_binary_as_other, second];
    nothing_about_impostors(w, &state, real, impostors);
    assert_secret_absent(&secret, &state, &[]);
}

/// Found by the scan at start: the impostors run while the watchdog is down.
fn found_by_scan(detector: &str) {
    let Some(uid) = attacker_uid("found_by_scan") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret = secret();
    let w = WatchdogProcess::start(&state, detector);
    let real = Standin::start(dir.path(), "job-b", &secret, &[]);
    w.wait_event("process_started", real.pid);
    w.stop();
    let copy = public_copy(dir.path(), "attacker");
    let as_other_user = claim(&copy, Some(uid), "job-b", &secret, copy.parent().unwrap());
    let second = claim(&standin_bin(), None, "job-b", &secret, dir.path());
    let w = WatchdogProcess::start(&state, detector);
    w.wait_event("process_adopted", real.pid);
    ignored(&w, as_other_user.pid, "wrong_executable", "scan");
    ignored(&w, second.pid, "job_has_live_process", "scan");
    nothing_about_impostors(w, &state, real, vec![as_other_user, second]);
}

/// A package upgrade replaces the binary while migratekit runs: its `/proc/<pid>/exe` now
/// reads `... (deleted)` and the configured path is another file. After a restart the
/// registry's record of its executable keeps it its job's; without that record (a fresh
/// state directory) the same process would not be taken for migratekit.
fn upgraded_binary(detector: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bin = public_copy(dir.path(), "bin");
    let path_flag = ["--listen", "127.0.0.1:0", "--migratekit-path"];
    let args: Vec<&str> = path_flag
        .into_iter()
        .chain([bin.to_str().unwrap()])
        .collect();
    let w = WatchdogProcess::start_with(&state, detector, &args, &[]);
    let secret = secret();
    let s = claim(&bin, None, "job-up", &secret, dir.path());
    w.wait_event("process_started", s.pid);
    w.stop();
    // What a package manager does: a new file, renamed over the old one.
    let new = bin.with_extension("new");
    std::fs::copy(standin_bin(), &new).unwrap();
    std::fs::rename(&new, &bin).unwrap();
    let exe = std::fs::read_link(format!("/proc/{}/exe", s.pid)).unwrap();
    assert!(exe.to_string_lossy().ends_with("(deleted)"), "{exe:?}");

    let w = WatchdogProcess::start_with(&state, detector, &args, &[]);
    let adopted = w.wait_event("process_adopted", s.pid);
    assert_eq!(adopted["job_id"], "job-up");
    let fresh = WatchdogProcess::start_with(&dir.path().join("fresh"), detector, &args, &[]);
    ignored(&fresh, s.pid, "wrong_executable", "scan");
    fresh.stop();
    s.kill(libc::SIGTERM);
    let death = w.wait_event("process_exited", s.pid);
    assert_eq!(death["job_id"], "job-up");
    assert_exit(&death, None, Some(15), Some(false));
    let lines: Vec<_> = w
        .lines_for(s.pid)
        .into_iter()
        .map(|v| v["event"].clone())
        .collect();
    assert_eq!(lines, ["process_adopted", "process_exited"], "{lines:?}");
    s.reap();
    w.stop();
}

both_detectors!(found_by_exec, found_by_scan, upgraded_binary);
