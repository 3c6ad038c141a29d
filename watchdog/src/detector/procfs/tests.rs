use super::*;
use std::process::Command;

fn zombie_child(script: &str) -> std::process::Child {
    let mut child = Command::new("sh").args(["-c", script]).spawn().unwrap();
    let pid = child.id();
    // Wait until it has exited (a zombie: we have not reaped it).
    for _ in 0..500 {
        if proc_reader::read_stat(pid)
            .unwrap()
            .is_some_and(|s| s.is_zombie())
        {
            return child;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("child {pid} did not exit");
}

#[test]
fn the_status_of_our_own_child_is_read_without_reaping_it() {
    let mut child = zombie_child("exit 4");
    let fd = pidfd::open(child.id()).unwrap();
    let exit = pidfd::wait_nowait(&fd).expect("our child's status");
    assert_eq!((exit.code, exit.signal), (Some(4), None));
    // Still there for its owner to reap.
    assert_eq!(child.wait().unwrap().code(), Some(4));
}

#[test]
fn a_child_killed_by_a_signal_reports_the_signal() {
    let mut child = zombie_child("kill -TERM $$");
    let fd = pidfd::open(child.id()).unwrap();
    let exit = pidfd::wait_nowait(&fd).expect("our child's status");
    assert_eq!(
        (exit.code, exit.signal, exit.core_dumped),
        (None, Some(15), false)
    );
    child.wait().unwrap();
}

/// Runs `sh -c script`, whose first line of output is the pid of a grandchild it started in
/// the background; returns the `sh` and that pid.
fn sh_with_grandchild(script: &str) -> (std::process::Child, u32) {
    let mut sh = Command::new("sh")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sh.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    (sh, line.trim().parse().unwrap())
}

#[test]
fn a_zombie_that_is_not_our_child_is_read_from_proc() {
    // `sh` forks a grandchild and becomes `sleep`; the grandchild exits 6 once that is done
    // (so `sh` cannot reap it first) and stays a zombie: `sleep` never reaps.
    let (mut sh, pid) = sh_with_grandchild("sh -c 'sleep 0.3; exit 6' & echo $!; exec sleep 5");
    let mut stat = None;
    for _ in 0..500 {
        stat = proc_reader::read_stat(pid)
            .unwrap()
            .filter(|s| s.is_zombie());
        if stat.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stat = stat.expect("grandchild became a zombie");
    let fd = pidfd::open(pid).unwrap();
    assert_eq!(pidfd::wait_nowait(&fd), None, "not our child");
    let (exit, comm) = exit_status(&fd, stat.identity());
    assert_eq!(
        (exit.code, exit.signal, comm.as_str()),
        (Some(6), None, "sh")
    );
    let _ = sh.kill();
    let _ = sh.wait();
}

#[test]
fn a_gone_process_cannot_be_opened() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let err = pidfd::open(pid).unwrap_err();
    assert!(proc_reader::gone(&err), "{err}");
}

/// Whether this kernel keeps a reaped process's status for its pidfds (`PIDFD_INFO_EXIT`,
/// Linux 6.15).
fn kernel_keeps_exit_info() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (6, 15),
        _ => false,
    }
}

/// A grandchild that ends with `end` (`exit 7`, `kill -KILL $$`) once we hold its pidfd, and
/// that its parent (`sh`, not us) reaps at once, as init reaps a migratekit whose watchdog
/// was restarted. Returns the pidfd and identity once /proc no longer shows it.
fn reaped_grandchild(end: &str) -> (OwnedFd, ProcessIdentity, std::process::Child) {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let script = format!(
        "sh -c 'while [ ! -e {go} ]; do sleep 0.01; done; {end}' & echo $!; wait; exec sleep 30",
        go = go.display()
    );
    let (mut sh, pid) = sh_with_grandchild(&script);
    let process = proc_reader::read_stat(pid).unwrap().unwrap().identity();
    let fd = pidfd::open(pid).unwrap();
    std::fs::write(&go, b"").unwrap();
    for _ in 0..1000 {
        if proc_reader::read_stat(pid).unwrap().is_none() {
            return (fd, process, sh);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = sh.kill();
    let _ = sh.wait();
    panic!("grandchild {pid} was not reaped by its parent within 10 s");
}

/// How a grandchild that ended with `end` and was reaped by its own parent is reported: its
/// real status where the kernel keeps it for pidfds, unknown before 6.15 (and the test skips).
fn reaped_status(end: &str) -> Option<ExitStatus> {
    let (fd, process, mut sh) = reaped_grandchild(end);
    let (exit, _) = exit_status(&fd, process);
    let _ = sh.kill();
    let _ = sh.wait();
    if !kernel_keeps_exit_info() {
        eprintln!("SKIP: this kernel keeps no exit status for pidfds (Linux 6.15+)");
        assert!(exit.is_unknown(), "{exit:?}");
        return None;
    }
    Some(exit)
}

#[test]
fn a_process_its_parent_reaped_reports_its_exit_code_through_the_pidfd() {
    if let Some(exit) = reaped_status("exit 7") {
        assert_eq!((exit.code, exit.signal), (Some(7), None));
    }
}

#[test]
fn a_process_its_parent_reaped_reports_its_signal_through_the_pidfd() {
    if let Some(exit) = reaped_status("kill -KILL $$") {
        assert_eq!(
            (exit.code, exit.signal, exit.core_dumped),
            (None, Some(9), false)
        );
    }
}
