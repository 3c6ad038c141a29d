//! Privileged: what the real watchdog does across its own restarts: a process started before
//! it is adopted, a death during its downtime is reported once after it comes back, a process
//! still running is adopted silently, and a recycled pid is not taken for the dead process.
//!
//! Every case runs with `--detector procfs` and `--detector auto`.
//! Run: `cargo test -p vma-watchdog --test restarts` as root.

#[macro_use]
mod common;

use std::process::Command;
use std::time::Duration;

use api::{FoundBy, JobProcessState, ProcessEventKind, ProcessIdentity};
use common::*;
use vma_watchdog::registry::Registry;

/// A stand-in that runs before the watchdog starts is found by the scan, and its death reported.
fn started_before(detector: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret = secret();
    let s = Standin::start(dir.path(), "job-before", &secret, &[]);
    let w = WatchdogProcess::start(&state, detector);
    let started = w.wait_event("process_started", s.pid);
    assert_eq!(
        (started["job_id"].as_str(), started["found_by"].as_str()),
        (Some("job-before"), Some("scan"))
    );
    s.kill(libc::SIGTERM);
    let line = w.wait_event("process_exited", s.pid);
    assert_eq!(line["job_id"], "job-before");
    assert_exit(&line, None, Some(15), Some(false));
    s.reap();
    let log = w.stop();
    assert_secret_absent(&secret, &state, &[&log]);
}

/// Watchdog stops; one stand-in is killed meanwhile, another keeps running. After the restart
/// the dead one is reported once as died while unwatched (status unknown), the live one is
/// adopted without any event, and its later death is reported normally.
fn downtime(detector: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret = secret();
    let w = WatchdogProcess::start(&state, detector);
    let dead = Standin::start(dir.path(), "job-down-dead", &secret, &[]);
    let live = Standin::start(dir.path(), "job-down-live", &secret, &[]);
    // Killed during the downtime too, but not reaped: a zombie is dead as well.
    let zombie = Standin::start(dir.path(), "job-down-zombie", &secret, &[]);
    for s in [&dead, &live, &zombie] {
        w.wait_event("process_started", s.pid);
    }
    let log1 = w.stop();
    zombie.kill(libc::SIGKILL);

    let dead_pid = dead.pid;
    let dead_start = dead.start_time();
    dead.kill(libc::SIGKILL);
    dead.reap();

    let w = WatchdogProcess::start(&state, detector);
    let line = w.wait_event("died_while_unwatched", dead_pid);
    assert_eq!(line["job_id"], "job-down-dead");
    assert_eq!(line["start_time"], dead_start);
    assert_eq!(line["detector"], "registry");
    assert_exit(&line, None, None, None);
    let z = w.wait_event("died_while_unwatched", zombie.pid);
    assert_eq!(z["job_id"], "job-down-zombie");
    assert_exit(&z, None, None, None);
    let adopted = w.wait_event("process_adopted", live.pid);
    assert_eq!(adopted["job_id"], "job-down-live");

    let events = outbox_events_for(&state, dead_pid);
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            ProcessEventKind::ProcessStarted,
            ProcessEventKind::DiedWhileUnwatched
        ]
    );
    let unwatched = &events[1];
    assert_eq!(
        unwatched.event_id.to_string(),
        line["event_id"].as_str().unwrap()
    );
    assert!(
        unwatched.exit.is_none_or(|e| e.is_unknown()),
        "{unwatched:?}"
    );
    // Adopted silently: nothing new in the journal, no second start in the log.
    let live_kinds: Vec<_> = outbox_events_for(&state, live.pid)
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(live_kinds, [ProcessEventKind::ProcessStarted]);
    assert!(
        w.lines_for(live.pid)
            .iter()
            .all(|v| v["event"] != "process_started")
    );

    live.kill(libc::SIGKILL);
    let line = w.wait_event("process_exited", live.pid);
    assert_eq!(line["job_id"], "job-down-live");
    assert_exit(&line, None, Some(9), Some(false));
    live.reap();
    let log2 = w.stop();

    // A third start reports nothing again about either.
    let w = WatchdogProcess::start(&state, detector);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        w.lines_for(dead_pid).is_empty(),
        "{:?}",
        w.lines_for(dead_pid)
    );
    let log3 = w.stop();
    assert_eq!(
        outbox_events_for(&state, dead_pid).len(),
        2,
        "reported exactly once"
    );
    assert_secret_absent(&secret, &state, &[&log1, &log2, &log3]);
}

/// The registry names a pid that now belongs to another process (another start time): a
/// non-matching `sleep`, and a stand-in of a newer job. The old job is reported dead; the
/// `sleep` is left alone; the new stand-in is a new process of its own job.
fn pid_reuse(detector: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let secret = secret();
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let sleeper_pid = sleeper.id();
    let sleeper_start = vma_watchdog::proc_reader::read_stat(sleeper_pid)
        .unwrap()
        .unwrap()
        .start_time;
    let newer = Standin::start(dir.path(), "job-new", &secret, &[]);
    // What an earlier watchdog would have written for processes that held these pids before.
    let old_on_sleeper = ProcessIdentity {
        pid: sleeper_pid,
        start_time: sleeper_start - 1,
    };
    let old_on_newer = ProcessIdentity {
        pid: newer.pid,
        start_time: newer.start_time() - 1,
    };
    {
        let r = Registry::open(&state).unwrap();
        r.register(
            old_on_sleeper,
            &api::JobId::parse("job-old-a").unwrap(),
            FoundBy::Scan,
        )
        .unwrap();
        r.register(
            old_on_newer,
            &api::JobId::parse("job-old-b").unwrap(),
            FoundBy::Started,
        )
        .unwrap();
    }

    let w = WatchdogProcess::start(&state, detector);
    for (old, job) in [(old_on_sleeper, "job-old-a"), (old_on_newer, "job-old-b")] {
        let line = w.wait_for(&format!("died_while_unwatched of {job}"), |v| {
            v["event"] == "died_while_unwatched" && v["job_id"] == job
        });
        assert_eq!(
            (line["pid"].as_u64(), line["start_time"].as_u64()),
            (Some(old.pid.into()), Some(old.start_time))
        );
        assert_exit(&line, None, None, None);
    }
    let started = w.wait_event("process_started", newer.pid);
    assert_eq!(
        (started["job_id"].as_str(), started["start_time"].as_u64()),
        (Some("job-new"), Some(newer.start_time()))
    );
    assert!(
        w.lines_for(sleeper_pid)
            .iter()
            .all(|v| v["event"] == "died_while_unwatched")
    );

    // The sleep's death is nobody's business; the new stand-in's is job-new's.
    sleeper.kill().unwrap();
    newer.kill(libc::SIGKILL);
    let line = w.wait_event("process_exited", newer.pid);
    assert_eq!(line["job_id"], "job-new");
    assert_eq!(line["start_time"], newer.start_time());
    assert_exit(&line, None, Some(9), Some(false));
    std::thread::sleep(Duration::from_millis(300));
    sleeper.wait().unwrap();
    newer.reap();
    assert!(
        w.lines_for(sleeper_pid)
            .iter()
            .all(|v| v["event"] == "died_while_unwatched")
    );
    let log = w.stop();

    let r = Registry::open(&state).unwrap();
    // Only this test's jobs: the /proc scan also sees any other migratekit on the machine.
    let ours = ["job-old-a", "job-old-b", "job-new"];
    let running: Vec<_> = r
        .running()
        .into_iter()
        .filter(|e| ours.contains(&e.job_id.as_str()))
        .collect();
    assert!(running.is_empty(), "{running:?}");
    for (job, process) in [("job-old-a", old_on_sleeper), ("job-old-b", old_on_newer)] {
        match r.job_status(job).map(|s| s.state) {
            Some(JobProcessState::Exited {
                process: p, exit, ..
            }) => {
                assert_eq!(p, process);
                assert!(exit.is_unknown());
            }
            other => panic!("{job} should be exited, is {other:?}"),
        }
    }
    assert_secret_absent(&secret, &state, &[&log]);
}

/// A stand-in without `--job-id` that takes its job from `MIGRATEKIT_JOB_ID`.
fn job_from_environment(detector: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret = secret();
    let w = WatchdogProcess::start(&state, detector);
    let mut cmd = Command::new(standin_bin());
    cmd.args([
        "migrate",
        "--vmware-password",
        &secret,
        "--standin-exit-code",
        "0",
    ])
    .env("MIGRATEKIT_JOB_ID", "job-env")
    .env("VMWARE_PASSWORD", &secret);
    let mut s = Standin::spawn(cmd, dir.path());
    let started = w.wait_event("process_started", s.pid);
    assert_eq!(started["job_id"], "job-env");
    s.trigger();
    let line = w.wait_event("process_exited", s.pid);
    assert_exit(&line, Some(0), None, Some(false));
    s.reap();
    let log = w.stop();
    assert_secret_absent(&secret, &state, &[&log]);
}

/// The watchdog is SIGKILLed after reporting a death but before its registry's file caught up
/// (held back with a long flush delay): the file still lists the process as running, yet the
/// next start finds the death queued in the outbox and does not report it a second time.
fn crash_before_the_registry_is_written(detector: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret = secret();
    let slow = ["--listen", "127.0.0.1:0", "--registry-flush-ms", "600000"];
    let w = WatchdogProcess::start_with(&state, detector, &slow, &[]);
    let s = Standin::start(dir.path(), "job-crash", &secret, &[]);
    w.wait_event("process_started", s.pid);
    let pid = s.pid;
    s.kill(libc::SIGKILL);
    let exited = w.wait_event("process_exited", pid);
    s.reap();
    let log1 = w.kill9();
    let on_disk = Registry::open(&state).unwrap();
    assert!(
        on_disk.running().iter().any(|e| e.process.pid == pid),
        "the registry's file should still list the dead process: {:?}",
        on_disk.running()
    );
    drop(on_disk);

    let w = WatchdogProcess::start(&state, detector);
    let queued = w.wait_event("death_already_queued", pid);
    assert_eq!(queued["event_id"], exited["event_id"]);
    let log2 = w.stop();
    let kinds: Vec<_> = outbox_events_for(&state, pid)
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            ProcessEventKind::ProcessStarted,
            ProcessEventKind::ProcessExited
        ],
        "reported exactly once"
    );
    // The clean stop wrote the file: a third start has nothing to say about the process.
    let on_disk = Registry::open(&state).unwrap();
    // (Only this test's process: a scan also registers other tests' stand-ins.)
    assert!(
        !on_disk.running().iter().any(|e| e.process.pid == pid),
        "{:?}",
        on_disk.running()
    );
    let recorded = on_disk.exit_of(ProcessIdentity {
        pid,
        start_time: exited["start_time"].as_u64().unwrap(),
    });
    assert_eq!(recorded.and_then(|x| x.exit.signal), Some(9));
    assert!(!log2.contains("died_while_unwatched"), "{log2}");
    assert_secret_absent(&secret, &state, &[&log1, &log2]);
}

both_detectors!(
    started_before,
    downtime,
    pid_reuse,
    job_from_environment,
    crash_before_the_registry_is_written
);
