//! Privileged tests of the eBPF detector against the real kernel and real processes.
//!
//! They need root, `/sys/kernel/btf/vmlinux`, tracefs and the eBPF object built into the
//! binary (`cargo xtask build-ebpf` before `cargo test`); without one of them each test prints
//! `SKIP: <why>` and returns.
//!
//! Every test runs its own detector matching a name of its own: the helper
//! `ebpf-test-child` is started through a symlink with that name (the kernel takes `comm` from
//! the name exec'd), so tests running in parallel never see each other's processes.
//!
//! Each scenario runs twice: with the tracepoint's `group_dead` field (this kernel) and with
//! the `signal->live` path that kernels without the field (5.x, 6.1) use.
//!
//! The SIGSEGV test needs a core_pattern that writes a core (the default `core` does; the
//! helper sets RLIMIT_CORE itself and runs in a temporary directory).

mod ebpf_support;

use std::process::Command;

use api::{ExitStatus, ProcessIdentity};
use ebpf_support::{Env, MemCgroup, QUIET, exited, identity, killed, wait_leader_zombie};
use vma_watchdog::detector::{Detector, DetectorEvent};

async fn killed_by_signal(name: &str, live: bool, signal: i32) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let helper = env.spawn(&["4", "hold"]);
    env.expect_started(&helper).await;
    helper.kill(signal);
    env.expect_exited(&helper, killed(signal, false)).await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

async fn exit_code_3(name: &str, live: bool) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let helper = env.spawn(&["4", "exit", "3"]);
    env.expect_started(&helper).await;
    env.expect_exited(&helper, exited(3)).await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

async fn segv_with_core(name: &str, live: bool) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let helper = env.spawn(&["4", "segv"]);
    env.expect_started(&helper).await;
    env.expect_exited(&helper, killed(libc::SIGSEGV, true))
        .await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

async fn thread_exit_is_not_a_death(name: &str, live: bool) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let mut helper = env.spawn(&["4", "thread-exit"]);
    env.expect_started(&helper).await;
    assert_eq!(helper.line(), "thread-exited");
    env.assert_quiet(helper.id.pid).await;
    helper.kill(libc::SIGKILL);
    env.expect_exited(&helper, killed(libc::SIGKILL, false))
        .await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

async fn leader_exit_then_last_thread(name: &str, live: bool, then: &str, exit: ExitStatus) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let mut helper = env.spawn(&["4", "leader-exit", then]);
    env.expect_started(&helper).await;
    wait_leader_zombie(helper.id.pid);
    env.assert_quiet(helper.id.pid).await;
    helper.send_line();
    env.expect_exited(&helper, exit).await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

macro_rules! both_paths {
    ($($name:ident => |$n:ident, $live:ident| $body:expr;)*) => {
        mod group_dead {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let ($n, $live) = (concat!("wdg-", stringify!($name)), false);
                $body.await
            })*
        }
        mod signal_live {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let ($n, $live) = (concat!("wdl-", stringify!($name)), true);
                $body.await
            })*
        }
    };
}

both_paths! {
    sigkill => |n, live| killed_by_signal(n, live, libc::SIGKILL);
    sigterm => |n, live| killed_by_signal(n, live, libc::SIGTERM);
    exit3 => |n, live| exit_code_3(n, live);
    segv_core => |n, live| segv_with_core(n, live);
    thread_exit => |n, live| thread_exit_is_not_a_death(n, live);
    leader_ret => |n, live| leader_exit_then_last_thread(n, live, "none", exited(0));
    leader_exit4 => |n, live| leader_exit_then_last_thread(n, live, "4", exited(4));
}

/// A process watched by tgid (its name matches nothing) is reported; after `unwatch` it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_tgid_without_name_match() {
    let Some(mut env) = Env::start("wd-no-such-name", false) else {
        return;
    };
    let mut watched = Command::new("sleep")
        .arg("100")
        .spawn()
        .expect("sleep starts");
    let mut unwatched = Command::new("sleep")
        .arg("100")
        .spawn()
        .expect("sleep starts");
    let (w, u) = (identity(watched.id()), identity(unwatched.id()));
    env.detector.watch(w).expect("watch");
    env.detector.watch(u).expect("watch");
    env.detector.unwatch(u).expect("unwatch");
    env.detector.unwatch(u).expect("unwatching twice is fine");
    watched.kill().expect("kill");
    unwatched.kill().expect("kill");
    match env.next_for(w.pid).await {
        DetectorEvent::Exited {
            process,
            exit,
            comm,
            ..
        } => {
            assert_eq!(
                (process, exit, comm.as_str()),
                (w, killed(libc::SIGKILL, false), "sleep")
            );
        }
        other => panic!("expected an exit, got {other:?}"),
    }
    env.assert_quiet(u.pid).await;
    let _ = (watched.wait(), unwatched.wait());
    env.assert_no_read_errors();
}

/// A watch whose start time is not the process's (its pid was recycled since) reports nothing:
/// the dying process is not the one that was asked about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_with_other_start_time_is_not_this_process() {
    let Some(mut env) = Env::start("wd-stale-watch", false) else {
        return;
    };
    let mut sleep = Command::new("sleep")
        .arg("100")
        .spawn()
        .expect("sleep starts");
    let real = identity(sleep.id());
    let stale = ProcessIdentity {
        pid: real.pid,
        start_time: real.start_time.saturating_sub(1000),
    };
    env.detector.watch(stale).expect("watch");
    sleep.kill().expect("kill");
    env.assert_quiet(real.pid).await;
    let _ = sleep.wait();
    env.assert_no_read_errors();
}

/// 2,000 exits of unrelated processes while the detector watches reach user space as nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_exits_produce_no_events() {
    let Some(mut env) = Env::start("wd-quiet-match", false) else {
        return;
    };
    // It must outlive the 2,000 exits below, which take minutes under emulation (on Debian's
    // 6.1 kernel in `kill-test --vm` a 100 s sleep ended on its own during them and its
    // genuine exit was reported); the test kills it.
    let mut keep = Command::new("sleep")
        .arg("86400")
        .spawn()
        .expect("sleep starts");
    env.detector.watch(identity(keep.id())).expect("watch");
    let before = env.detector.stats().expect("stats");
    for _ in 0..2000 {
        let status = Command::new("true").status().expect("true runs");
        assert!(status.success());
    }
    let after = env.detector.stats().expect("stats");
    assert!(
        after.exits_seen - before.exits_seen >= 2000,
        "the exit program ran: {before:?} -> {after:?}"
    );
    if let Ok(event) = tokio::time::timeout(QUIET, env.events.recv()).await {
        let now = env.detector.stats().expect("stats");
        panic!(
            "an event reached user space: {event:?}; watched sleep {}; stats {before:?} -> {after:?} -> {now:?}",
            keep.id()
        );
    }
    assert_eq!(
        after.events_sent, before.events_sent,
        "the kernel sent events: {after:?}"
    );
    keep.kill().expect("kill");
    let _ = keep.wait();
    env.assert_no_read_errors();
}

/// A process killed by the OOM killer of its memory cgroup carries the OOM flag (and SIGKILL).
async fn oom_kill(name: &str, live: bool) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let Some(cgroup) = MemCgroup::create(name, 64 << 20) else {
        eprintln!("SKIP: cannot create a cgroup v1 memory group under /sys/fs/cgroup/memory");
        return;
    };
    let mut helper = env.spawn(&["2", "oom"]);
    env.expect_started(&helper).await;
    cgroup.add(helper.id.pid);
    helper.send_line();
    let oom = ExitStatus {
        code: None,
        signal: Some(libc::SIGKILL),
        core_dumped: false,
        oom_killed: true,
    };
    env.expect_exited(&helper, oom).await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
    drop(cgroup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_killed_group_dead() {
    oom_kill("wdg-oom", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_killed_signal_live() {
    oom_kill("wdl-oom", true).await;
}
