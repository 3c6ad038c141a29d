//! Privileged: the daemon as a library, as the REST API will use it: a process the watchdog
//! started is tracked before it can die unseen, its status is queryable, and its exact exit
//! status is read from the kernel (`waitid` on the pidfd: the test process is its parent).
//!
//! Run: `cargo test -p vma-watchdog --test track` as root.

mod common;

use std::time::{Duration, Instant};

use api::{ExitStatus, FoundBy, JobProcessState, ProcessEventKind, ProcessIdentity};
use clap::Parser;
use common::*;
use vma_watchdog::config::{Cli, Config};
use vma_watchdog::daemon::{Daemon, TrackError};
use vma_watchdog::http::{JobsView, RegisterError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_process_is_tracked_queried_and_its_exit_read() {
    if !privileged("a_started_process_is_tracked_queried_and_its_exit_read") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // A name nothing has, so only `track` can make the daemon watch the stand-in.
    let args = [
        "--detector",
        "procfs",
        "--match-name",
        "no-such-proc",
        "--state-dir",
    ];
    let cli = Cli::try_parse_from(
        ["vma-watchdog"]
            .iter()
            .chain(&args)
            .copied()
            .chain([state.to_str().unwrap()]),
    );
    let daemon = Daemon::start(Config::load(cli.unwrap()).unwrap())
        .await
        .unwrap();
    let tracker = daemon.tracker();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.follow_events(async {
        let _ = stopped.await;
    }));

    let secret = secret();
    let mut s = Standin::start(
        dir.path(),
        "job-tracked",
        &secret,
        &["--standin-exit-code", "7"],
    );
    let me = ProcessIdentity {
        pid: s.pid,
        start_time: s.start_time(),
    };
    let status = tracker
        .register_process(
            &api::JobId::parse("job-tracked").unwrap(),
            me,
            FoundBy::Started,
        )
        .unwrap();
    assert!(matches!(status.state, JobProcessState::Running { process, .. } if process == me));
    // Again: changes nothing.
    tracker
        .register_process(
            &api::JobId::parse("job-tracked").unwrap(),
            me,
            FoundBy::Started,
        )
        .unwrap();
    let bogus = ProcessIdentity {
        pid: s.pid,
        start_time: me.start_time + 1,
    };
    let err = tracker
        .register_process(
            &api::JobId::parse("job-x").unwrap(),
            bogus,
            FoundBy::Tracked,
        )
        .unwrap_err();
    assert!(matches!(err, TrackError::NotRunning { .. }), "{err}");
    // Another live process for a job that already runs is refused.
    let other = Standin::start(dir.path(), "job-other", &secret, &[]);
    let other_id = ProcessIdentity {
        pid: other.pid,
        start_time: other.start_time(),
    };
    let err = tracker
        .register_process(
            &api::JobId::parse("job-tracked").unwrap(),
            other_id,
            FoundBy::Tracked,
        )
        .unwrap_err();
    assert!(
        matches!(err, TrackError::JobRunning { running, .. } if running == me),
        "{err}"
    );
    drop(other);
    // The same through the REST API's view of jobs.
    let view: std::sync::Arc<dyn JobsView> = std::sync::Arc::new(tracker.clone());
    assert_eq!(
        view.job("job-tracked"),
        tracker.registry().job_status("job-tracked")
    );
    assert!(view.jobs().iter().any(|j| j.job_id == "job-tracked"));
    assert!(matches!(
        view.register_process(
            &api::JobId::parse("job-tracked").unwrap(),
            other_id,
            FoundBy::Tracked
        ),
        Err(RegisterError::JobRunning { .. } | RegisterError::Watch(_))
    ));

    let registry = tracker.registry();
    match registry.job_status("job-tracked").map(|j| j.state) {
        Some(JobProcessState::Running {
            process, found_by, ..
        }) => {
            assert_eq!((process, found_by), (me, FoundBy::Started));
        }
        other => panic!("job-tracked should be running, is {other:?}"),
    }
    assert!(registry.job_status("job-x").is_none());

    s.trigger();
    let deadline = Instant::now() + TIMEOUT;
    let exit = loop {
        if let Some(JobProcessState::Exited { process, exit, .. }) =
            registry.job_status("job-tracked").map(|j| j.state)
        {
            assert_eq!(process, me);
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "no exit recorded within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (exit.code, exit.signal, exit.core_dumped),
        (Some(7), None, false)
    );
    // The watchdog peeked at its child's status without reaping it: the owner still can.
    assert_eq!(s.reap().code(), Some(7));
    let journal = wait_outbox_events(&state, me.pid, 2).await;
    assert_eq!(journal.len(), 2, "started and exited: {journal:?}");
    stop.send(()).unwrap();
    running.await.unwrap();
    assert_secret_absent(&secret, &state, &[]);
}

/// A child handed over with `track_child` is registered as started (even when the detector saw
/// it first), its exact status is read, and the watchdog reaps it after recording the death.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_handed_over_is_reported_then_reaped() {
    if !privileged("a_child_handed_over_is_reported_then_reaped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = [
        "vma-watchdog",
        "--detector",
        "procfs",
        "--scan-interval-ms",
        "50",
        "--state-dir",
    ];
    let cli = Cli::try_parse_from(args.iter().copied().chain([state.to_str().unwrap()]));
    let daemon = Daemon::start(Config::load(cli.unwrap()).unwrap())
        .await
        .unwrap();
    let tracker = daemon.tracker();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.follow_events(async {
        let _ = stopped.await;
    }));

    let secret = secret();
    let mut child = std::process::Command::new(standin_bin())
        .args([
            "migrate",
            "--vmware-password",
            &secret,
            "--job-id",
            "job-child",
        ])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    let stdout = child.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready).unwrap();
    assert!(ready.starts_with("migratekit-standin ready"), "{ready:?}");
    // Let the detector's scan find it first, as it often does in production.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = child.id();
    let process = tracker
        .track_child(child, &api::JobId::parse("job-child").unwrap())
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(process.pid, pid);
    let registry = tracker.registry();
    match registry.job_status("job-child").map(|j| j.state) {
        Some(JobProcessState::Running { found_by, .. }) => assert_eq!(found_by, FoundBy::Started),
        other => panic!("job-child should be running, is {other:?}"),
    }

    signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + TIMEOUT;
    let exit = loop {
        if let Some(JobProcessState::Exited { exit, .. }) =
            registry.job_status("job-child").map(|j| j.state)
        {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "no exit recorded within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (exit.code, exit.signal, exit.core_dumped),
        (None, Some(9), false)
    );
    // Reaped by the watchdog: the pid no longer exists (not even as a zombie).
    while vma_watchdog::proc_reader::read_stat(pid)
        .unwrap()
        .is_some_and(|s| s.start_time == process.start_time)
    {
        assert!(Instant::now() < deadline, "the child was not reaped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kinds: Vec<_> = outbox_events_for(&state, pid)
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            ProcessEventKind::ProcessStarted,
            ProcessEventKind::ProcessExited
        ]
    );
    stop.send(()).unwrap();
    running.await.unwrap();
    assert_secret_absent(&secret, &state, &[]);
}

/// The launcher's own `waitid` status, handed over before it reaps, is recorded once; the
/// detector's report of the same death adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_handed_over_by_the_launcher_is_recorded_once() {
    if !privileged("a_status_handed_over_by_the_launcher_is_recorded_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["vma-watchdog", "--detector", "auto", "--state-dir"];
    let cli = Cli::try_parse_from(args.iter().copied().chain([state.to_str().unwrap()]));
    let daemon = Daemon::start(Config::load(cli.unwrap()).unwrap())
        .await
        .unwrap();
    let tracker = daemon.tracker();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.follow_events(async {
        let _ = stopped.await;
    }));
    let secret = secret();
    let mut s = Standin::start(
        dir.path(),
        "job-launched",
        &secret,
        &["--standin-exit-code", "9"],
    );
    let me = ProcessIdentity {
        pid: s.pid,
        start_time: s.start_time(),
    };
    tracker
        .register_process(
            &api::JobId::parse("job-launched").unwrap(),
            me,
            FoundBy::Started,
        )
        .unwrap();
    s.trigger();
    while !vma_watchdog::proc_reader::read_stat(me.pid)
        .unwrap()
        .is_some_and(|st| st.is_dead())
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exit = ExitStatus {
        code: Some(9),
        ..ExitStatus::default()
    };
    tracker.child_exited(me, exit);
    tracker.child_exited(me, exit);
    // Give the detector time to report the same death.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = outbox_events_for(&state, me.pid);
    let exits: Vec<_> = events
        .iter()
        .filter(|e| e.kind == ProcessEventKind::ProcessExited)
        .collect();
    assert_eq!(exits.len(), 1, "{events:?}");
    assert_eq!(exits[0].exit, Some(exit));
    s.reap();
    stop.send(()).unwrap();
    running.await.unwrap();
}

/// Every recorded event is in the outbox (the daemon's one durable copy), in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_events_are_queued_in_the_outbox() {
    if !privileged("journaled_events_are_queued_in_the_outbox") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["vma-watchdog", "--detector", "auto", "--state-dir"];
    let cli = Cli::try_parse_from(args.iter().copied().chain([state.to_str().unwrap()]));
    let config = Config::load(cli.unwrap()).unwrap();
    let daemon = Daemon::start(config).await.unwrap();
    let tracker = daemon.tracker();
    let outbox = tracker.outbox().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.follow_events(async {
        let _ = stopped.await;
    }));
    let secret = secret();
    let s = Standin::start(dir.path(), "job-outbox", &secret, &[]);
    let me = ProcessIdentity {
        pid: s.pid,
        start_time: s.start_time(),
    };
    tracker
        .register_process(
            &api::JobId::parse("job-outbox").unwrap(),
            me,
            FoundBy::Started,
        )
        .unwrap();
    s.kill(libc::SIGKILL);
    // The outbox appends an event to its file before it queues it in memory: once both events
    // are queued, the file holds them too.
    let deadline = Instant::now() + TIMEOUT;
    let queued = loop {
        let queued: Vec<_> = outbox
            .peek(10_000)
            .into_iter()
            .filter(|e| e.process == me)
            .collect();
        if queued.len() >= 2 {
            break queued;
        }
        assert!(
            Instant::now() < deadline,
            "the exit was not queued within {TIMEOUT:?}: {queued:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(matches!(
        tracker.registry().job_status("job-outbox").map(|j| j.state),
        Some(JobProcessState::Exited { .. })
    ));
    let journal = outbox_events_for(&state, me.pid);
    assert_eq!(
        queued, journal,
        "the file on disk holds exactly the queued events"
    );
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[1].exit.and_then(|e| e.signal), Some(9));
    s.reap();
    stop.send(()).unwrap();
    running.await.unwrap();
    assert_secret_absent(&secret, dir.path(), &[]);
}
