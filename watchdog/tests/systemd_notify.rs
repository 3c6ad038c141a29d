//! Privileged: the real watchdog under a stand-in for systemd's notification socket. It says
//! `READY=1` with its status once started, `RELOADING=1` then `READY=1` around a SIGHUP,
//! `STOPPING=1` at shutdown, and pings `WATCHDOG=1` only while its loops make progress: with
//! its state directory on a file system frozen by `fsfreeze` (what a snapshot backup does),
//! the event loop blocks on the outbox's write of a start, the pings stop, and they resume
//! once the file system is thawed.
//!
//! Run: `cargo test -p vma-watchdog --test systemd_notify` as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use test_support::notify::{NotifySocket, assert_stopping_ends_pings, pings};

/// `WatchdogSec=4`: a ping every 2 s. Long enough that a loaded machine never misses one for
/// a healthy daemon, short enough for a test.
const WATCHDOG_USEC: &str = "4000000";

/// A small ext4 file system on a loop device, mounted for the test; unmounted when dropped.
struct LoopFs {
    mount: PathBuf,
}

impl LoopFs {
    fn mount(dir: &Path) -> Result<Self, String> {
        let image = dir.join("fs.img");
        let mount = dir.join("fs");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let file = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        file.set_len(64 << 20).map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount))?;
        Ok(Self { mount })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// The file system frozen; thawed when dropped, which must come before anything waits for a
/// process blocked on it (a kill does not end a process in an uninterruptible write).
struct Frozen<'a>(&'a Path);

impl<'a> Frozen<'a> {
    fn freeze(fs: &'a LoopFs) -> Self {
        run(Command::new("fsfreeze").arg("-f").arg(&fs.mount)).expect("fsfreeze -f");
        Self(&fs.mount)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(self.0).status();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

#[test]
fn notifies_systemd_and_withholds_watchdog_pings_while_its_event_loop_is_stuck() {
    let name = "notifies_systemd_and_withholds_watchdog_pings_while_its_event_loop_is_stuck";
    if !privileged(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = match LoopFs::mount(dir.path()) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIP: {name}: cannot mount a loop file system to freeze ({why})");
            return;
        }
    };
    let state = fs.mount.join("state");
    std::fs::create_dir(&state).unwrap();
    let socket = NotifySocket::bind_path(dir.path()).unwrap();
    let watchdog = WatchdogProcess::start_with(
        &state,
        "auto",
        &["--listen", "127.0.0.1:0"],
        &[
            ("NOTIFY_SOCKET", socket.env()),
            ("WATCHDOG_USEC", WATCHDOG_USEC),
        ],
    );
    watchdog.wait_for("systemd_notify", |v| v["event"] == "systemd_notify");
    // READY=1 comes first, with the detector the ready log line names; pings follow.
    let got = socket.wait_until("two pings", TIMEOUT, |m| pings(m) >= 2);
    let ready = &got[0];
    assert!(ready.starts_with("READY=1\nSTATUS=detector "), "{got:?}");
    assert!(
        ready.contains(&format!("detector {};", watchdog.detector)),
        "{ready:?}"
    );
    assert!(ready.contains("watching 0 migratekit") && ready.contains("outbox: 0 event"));

    signal(watchdog.pid(), libc::SIGHUP);
    let got = socket.wait_until("RELOADING=1 then READY=1", TIMEOUT, |m| {
        m.iter()
            .skip_while(|m| !m.starts_with("RELOADING=1\n"))
            .skip(1)
            .any(|m| m.starts_with("READY=1\n"))
    });
    assert!(got.iter().any(|m| m.contains("MONOTONIC_USEC=")));

    // The event loop records a new migratekit in the outbox, on the frozen file system.
    let frozen = Frozen::freeze(&fs);
    let standin = Standin::start(dir.path(), "job-frozen", &secret(), &[]);
    let withheld = watchdog.wait_for("watchdog_ping_withheld", |v| {
        v["event"] == "watchdog_ping_withheld"
    });
    assert!(
        withheld["loops"].as_str().unwrap().contains("event loop"),
        "{withheld}"
    );
    let before = pings(&socket.messages());
    // Three ping intervals: a healthy daemon would ping three times.
    std::thread::sleep(Duration::from_secs(6));
    let during = pings(&socket.messages()) - before;
    assert!(
        during <= 1,
        "{during} pings while the event loop was stuck (one may have been on its way)"
    );
    drop(frozen);
    watchdog.wait_for("watchdog_ping_resumed", |v| {
        v["event"] == "watchdog_ping_resumed"
    });
    watchdog.wait_event("process_started", standin.pid);
    let resumed = pings(&socket.messages());
    socket.wait_until("a ping after the thaw", TIMEOUT, |m| pings(m) > resumed);

    watchdog.stop();
    assert_stopping_ends_pings(&socket.messages());
    drop(standin);
}
