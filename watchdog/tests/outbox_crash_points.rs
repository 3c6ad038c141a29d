//! A death survives a crash of the watchdog at every step of its way through the outbox, in
//! both flush orders, and reaches the OMA exactly once.
//!
//! The real daemon, built with this crate's test feature `crash-points`, SIGKILLs itself at the
//! step named by `VMA_WATCHDOG_CRASH_AT` (see `vma_watchdog::outbox::crash`): before the
//! event's write, after it, while the POST is answered, after the OMA's acknowledgement but
//! before the local flush (the flush held back), after the flush, after both but before the
//! outbox forgets the event. It is then started again on the same state directory. Where the
//! flush had not completed, the case also runs as if the machine had lost power: the unflushed
//! line is taken out of the file before the restart.
//!
//! The OMA here records every batch and acknowledges it; "exactly once" is judged with the
//! real OMA's rules: it applies an event id once, and a death of a job it has already ended
//! only goes to the audit trail (`ignored_final`). So every death it receives must be either
//! the same event again, or, when the outbox lost it, the `died_while_unwatched` the restart
//! finds by `(pid, start time)` from the registry.

#[macro_use]
mod common;
mod fake_oma;

use std::path::Path;
use std::time::{Duration, Instant};

use api::{ProcessEvent, ProcessEventKind};
use common::{Standin, TIMEOUT, WatchdogProcess, privileged, secret};
use fake_oma::FakeOma;
use vma_watchdog::outbox::crash::Point;

const OMA_TOKEN: &str = "vma-token-crash";

/// One crash: where, in which order, and whether unflushed data is lost with it.
#[derive(Debug, Clone, Copy)]
struct Case {
    point: Point,
    order: &'static str,
    power_loss: bool,
}

/// The watchdog's flags for `oma` and `order`; the registry's file is held back (as in
/// `restarts.rs`) so that only the outbox decides what the restart knows.
fn flags(dir: &Path, oma: &FakeOma, order: &str) -> Vec<String> {
    let token = dir.join("oma.token");
    std::fs::write(&token, OMA_TOKEN).unwrap();
    [
        "--listen",
        "127.0.0.1:0",
        "--registry-flush-ms",
        "600000",
        "--oma-max-backoff-ms",
        "200",
        "--vma-id",
        "vma-1",
        "--outbox-flush-order",
        order,
        "--oma-url",
        &oma.url(),
        "--oma-token-file",
        token.to_str().unwrap(),
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// Waits until `pid` (a child of this test, not yet reaped) has died on its own.
fn wait_dead(pid: u32, why: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if stat.is_empty() || state == Some("Z") {
            return;
        }
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `done` every 20 ms for up to TIMEOUT; panics with `w`'s log.
fn wait_until(w: &WatchdogProcess, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "no {what} within {TIMEOUT:?}; log:\n{}",
            w.raw()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn deaths_of(oma: &FakeOma, pid: u32) -> Vec<ProcessEvent> {
    oma.received()
        .into_iter()
        .map(|(e, _)| e)
        .filter(|e| e.process.pid == pid && e.kind != ProcessEventKind::ProcessStarted)
        .collect()
}

fn pending_for(state: &Path, pid: u32) -> usize {
    common::outbox_events_for(state, pid).len()
}

/// Takes the death of `pid` out of the outbox's file, as a power loss takes a line that was
/// written but not flushed.
fn lose_unflushed_death(state: &Path, pid: u32) {
    let file = state
        .join(vma_watchdog::outbox::DIR_NAME)
        .join("events.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let kept: String = text
        .lines()
        .filter(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let e = &v["event"];
            !(e["process"]["pid"] == pid && e["kind"] != "process_started")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(kept, text, "the death's line was written before the crash");
    std::fs::write(&file, kept).unwrap();
}

/// The real OMA's verdict on what it received about one process: how many deaths change the
/// job (an id is applied once; once the job has ended, another death is audit only).
fn applied(deaths: &[ProcessEvent]) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut ended = false;
    let mut applied = 0;
    for e in deaths {
        if seen.insert(e.event_id) && !ended {
            applied += 1;
            ended = true;
        }
    }
    applied
}

fn crash_and_restart(rt: &tokio::runtime::Runtime, detector: &str, case: Case) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let oma = rt.block_on(FakeOma::start(
        ([127, 0, 0, 1], 0).into(),
        OMA_TOKEN,
        "vma-1",
    ));
    let flags = flags(dir.path(), &oma, case.order);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let w = WatchdogProcess::start_with(
        &state,
        detector,
        &flags,
        &[("VMA_WATCHDOG_CRASH_AT", case.point.name())],
    );
    let s = Standin::start(dir.path(), "job-crash", &secret(), &[]);
    let pid = s.pid;
    // The start is delivered and forgotten: what follows concerns the death alone.
    wait_until(&w, "start delivered", || {
        oma.events_of("job-crash")
            .iter()
            .any(|e| e.process.pid == pid)
            && pending_for(&state, pid) == 0
    });
    s.kill(libc::SIGKILL);
    wait_dead(
        w.pid(),
        &format!("{case:?}: the watchdog did not reach its crash point"),
    );
    let log1 = w.kill9();
    assert!(
        log1.contains(&format!("\"point\":\"{}\"", case.point.name())),
        "{case:?}: the watchdog died elsewhere than at its crash point:\n{log1}"
    );
    let _ = s.reap();
    if case.power_loss {
        lose_unflushed_death(&state, pid);
    }
    let w = WatchdogProcess::start_with(&state, detector, &flags, &[]);
    wait_until(&w, "the death delivered and forgotten", || {
        !deaths_of(&oma, pid).is_empty() && pending_for(&state, pid) == 0
    });
    let log2 = w.stop();
    let deaths = deaths_of(&oma, pid);
    let context =
        format!("{case:?}: the OMA received {deaths:#?}\nfirst run:\n{log1}\nrestart:\n{log2}");
    assert_eq!(applied(&deaths), 1, "{context}");
    let start_time = deaths[0].process.start_time;
    assert!(
        deaths.iter().all(|e| e.process.start_time == start_time),
        "{context}"
    );
    let first = &deaths[0];
    for later in &deaths[1..] {
        // The same event sent again, or the death found again after the outbox lost it.
        let refound = case.power_loss
            && later.kind == ProcessEventKind::DiedWhileUnwatched
            && first.kind == ProcessEventKind::ProcessExited;
        assert!(later.event_id == first.event_id || refound, "{context}");
    }
    if case.point == Point::BeforeWrite || (case.power_loss && case.point == Point::AfterWrite) {
        assert_eq!(
            first.kind,
            ProcessEventKind::DiedWhileUnwatched,
            "{context}"
        );
    } else if !case.power_loss {
        assert_eq!(first.kind, ProcessEventKind::ProcessExited, "{context}");
    }
    rt.block_on(oma.stop());
}

/// Every crash point in both orders; with a parallel flush, also the power losses that leave
/// the line unflushed (the serial order acknowledges nothing before its flush).
fn crash_at_every_point(detector: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for order in ["parallel", "serial"] {
        for point in Point::ALL {
            if order == "serial" && point == Point::AfterAckBeforeFlush {
                continue;
            }
            let case = Case {
                point,
                order,
                power_loss: false,
            };
            eprintln!("{case:?}");
            crash_and_restart(&rt, detector, case);
        }
    }
    for point in [Point::AfterWrite, Point::AfterAckBeforeFlush] {
        let case = Case {
            point,
            order: "parallel",
            power_loss: true,
        };
        eprintln!("{case:?}");
        crash_and_restart(&rt, detector, case);
    }
}

both_detectors!(crash_at_every_point);
