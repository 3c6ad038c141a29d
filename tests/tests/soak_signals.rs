//! The soak's deaths by signal are real deaths: each signal its schedule sends ends the
//! stand-in by that signal. Seed 2 of the first soak found the opposite for SIGSEGV and SIGBUS
//! sent with `kill(2)`: the Rust runtime's stack-overflow handler takes the first one and
//! returns, the process lives on, and the soak waited for a death that never came. The soak
//! no longer sends those two (a real SIGSEGV is its `Segv` fate's own crash); this test keeps
//! both facts true.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use system_tests::soak::schedule::SIGNALS;

/// A stand-in that runs until killed, once it has printed its ready line (its handlers are
/// installed by then).
fn standin() -> Child {
    let mut child = Command::new(system_tests::bins::migratekit().expect("the stand-in is built"))
        .args(["migrate", "--job-id", "soak-signal-test"])
        // Nothing listens there: its progress reports fail, which it only counts.
        .args(["--standin-progress-url", "http://127.0.0.1:9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the stand-in");
    let out = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("reading its ready line");
    assert!(line.starts_with(migratekit_standin::READY), "{line:?}");
    child
}

/// The signal that ended `child`, waiting up to 5 s; `None` if it still runs.
fn ended_by(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("waiting for the stand-in") {
            return status.signal();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn every_signal_the_soak_sends_ends_the_standin_by_that_signal() {
    for signal in SIGNALS {
        let mut child = standin();
        // SAFETY: kill on our own child's pid with a valid signal number.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let ended = ended_by(&mut child);
        if ended.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert_eq!(ended, Some(signal), "signal {signal}");
    }
}

#[test]
fn a_sigsegv_sent_by_kill_is_survived_which_is_why_the_soak_does_not_send_it() {
    assert!(!SIGNALS.contains(&libc::SIGSEGV) && !SIGNALS.contains(&libc::SIGBUS));
    let mut child = standin();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGSEGV) }, 0);
    let ended = ended_by(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        ended, None,
        "the stand-in was expected to survive one SIGSEGV from kill(2)"
    );
}
