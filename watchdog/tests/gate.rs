//! The gate a migratekit unit runs, with the real `migratekit-gate` binary: it runs migratekit
//! in its own pid once released, nothing without the go-ahead, and the watchdog's end gives
//! the go-ahead to no other process that reaches the socket. (systemd itself, which forks the
//! gate in a unit, is exercised by `cargo xtask appliance-test`.)

use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::process::{Child, Command};
use std::time::Duration;

use vma_watchdog::launcher::gate::{self, GateCommand, GateListener};

fn start_gate(listener: &GateListener) -> Child {
    Command::new(env!("CARGO_BIN_EXE_migratekit-gate"))
        .arg(listener.name())
        .spawn()
        .expect("starting migratekit-gate")
}

fn shell(script: &str, out: &std::path::Path) -> GateCommand {
    GateCommand {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: vec![
            ("OUT".into(), out.into()),
            ("SECRET_ARG".into(), "pass word".into()),
        ],
    }
}

#[test]
fn a_released_gate_runs_the_command_in_its_own_pid_and_an_outsider_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let listener = GateListener::bind(gate::socket_name("test-unit")).unwrap();
    // An outsider connects first: it must learn nothing and not stop the launch.
    let mut outsider =
        UnixStream::connect_addr(&SocketAddr::from_abstract_name(listener.name()).unwrap())
            .unwrap();
    let mut child = start_gate(&listener);
    let gate_pid = child.id();
    let (stream, pid) = listener
        .accept(Duration::from_secs(10), |pid| pid == gate_pid, || Ok(()))
        .unwrap();
    assert_eq!(pid, gate_pid);
    let mut leaked = Vec::new();
    outsider
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    outsider.read_to_end(&mut leaked).unwrap();
    assert!(leaked.is_empty(), "the outsider was sent {leaked:?}");
    gate::release(stream, &shell(r#"echo "$$ $SECRET_ARG" > "$OUT""#, &out)).unwrap();
    assert!(child.wait().unwrap().success());
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        written.trim(),
        format!("{gate_pid} pass word"),
        "same pid, given env"
    );
}

#[test]
fn a_gate_without_go_ahead_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let listener = GateListener::bind(gate::socket_name("test-unit")).unwrap();
    let mut child = start_gate(&listener);
    let gate_pid = child.id();
    let (stream, _) = listener
        .accept(Duration::from_secs(10), |pid| pid == gate_pid, || Ok(()))
        .unwrap();
    // Registration refused: the connection is closed unanswered.
    drop(stream);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(!out.exists());
}

#[test]
fn the_wait_ends_when_the_unit_could_not_start() {
    let listener = GateListener::bind(gate::socket_name("test-unit")).unwrap();
    let error = listener
        .accept(
            Duration::from_secs(10),
            |_| true,
            || Err(std::io::Error::other("systemd-run failed")),
        )
        .unwrap_err();
    assert_eq!(error.to_string(), "systemd-run failed");
    let error = listener
        .accept(Duration::from_millis(200), |_| true, || Ok(()))
        .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
}
