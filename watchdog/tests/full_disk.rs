//! Privileged: the watchdog's state directory on a small real tmpfs that fills up, then frees
//! again. Deaths that happen while the outbox cannot be written are held in memory, logged,
//! shown on `/health` and in the metrics, delivered to a real (tiny) OMA from memory exactly
//! once, and written to the outbox with their acknowledgement once space returns; a restart
//! after that reports none of them again. And an OMA that accepts connections but never
//! answers does not keep what is held off the disk once it frees.
//!
//! Run: `cargo test -p vma-watchdog --test full_disk` as root (it mounts a tmpfs).

#[macro_use]
mod common;
mod fake_oma;

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use api::ProcessEventKind;
use common::*;
use fake_oma::FakeOma;
use serde_json::Value;
use test_support::metrics::{http, scrape, value};
use uuid::Uuid;

const OMA_TOKEN: &str = "oma-token-full-disk";
const VMA_ID: &str = "vma-full-disk";
/// Deaths while the disk is full: more than the free room left in the outbox file's last
/// page can take (a write into an allocated page needs no new space), so some are held.
const DEATHS: usize = 16;

/// A tmpfs of `size` mounted on `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 4096];
    let mut written = 0u64;
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // A page-sized write may leave a few bytes; take them too.
    while let Ok(n) = file.write(&block[..1])
        && n > 0
    {
        written += 1;
    }
    written
}

fn health(addr: SocketAddr) -> Value {
    let (status, body) = http(addr, "GET", "/health", "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `check` holds, or panics with `what`.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Event ids of the outbox's files: each event line's id, and each acknowledged id.
fn outbox_lines(state: &Path) -> (Vec<Uuid>, Vec<Uuid>) {
    let read = |name: &str| std::fs::read_to_string(state.join("outbox").join(name)).unwrap();
    let events = read("events.jsonl")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            v["event"]["event_id"].clone()
        })
        .map(|v| v.as_str().unwrap().parse().unwrap())
        .collect();
    let acks = read("acks.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<String>(l).unwrap().parse().unwrap())
        .collect();
    (events, acks)
}

fn watchdog(state: &Path, detector: &str, oma: &str) -> WatchdogProcess {
    let standin = standin_bin();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--migratekit-path",
        standin.to_str().unwrap(),
        "--oma-url",
        oma,
        "--oma-token",
        OMA_TOKEN,
        "--vma-id",
        VMA_ID,
        "--oma-max-backoff-ms",
        "200",
    ];
    WatchdogProcess::start_with(state, detector, &args, &[])
}

fn death_while_disk_full(detector: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let oma = rt.block_on(FakeOma::start(
        ([127, 0, 0, 1], 0).into(),
        OMA_TOKEN,
        VMA_ID,
    ));
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("fs");
    let _tmpfs = Tmpfs::mount(&mount, "2m");
    let state = mount.join("state");
    std::fs::create_dir(&state).unwrap();
    let w = watchdog(&state, detector, &oma.url());
    let metrics_line = w.wait_for("metrics_listening", |v| v["event"] == "metrics_listening");
    let metrics: SocketAddr = metrics_line["addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(health(w.api_addr())["storage"]["state"], "ok");
    let job = |n: usize| format!("job-full-{detector}-{}-{n}", std::process::id());
    let standins: Vec<Standin> = (0..DEATHS)
        .map(|n| Standin::start(dir.path(), &job(n), &secret(), &[]))
        .collect();
    for s in &standins {
        w.wait_event("process_started", s.pid);
    }
    wait_until("the starts at the OMA", || {
        (0..DEATHS).all(|n| !oma.events_of(&job(n)).is_empty())
    });
    let filled = fill(&mount.join("filler"));
    eprintln!("filled the tmpfs with {filled} bytes");
    for s in &standins {
        s.kill(libc::SIGKILL);
    }
    for s in &standins {
        w.wait_event("process_exited", s.pid);
    }
    // Some deaths could not be written: held, logged, on /health and in the metrics.
    let degraded = w.wait_for("storage_degraded", |v| v["event"] == "storage_degraded");
    assert!(
        degraded["error"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{degraded}"
    );
    let h = health(w.api_addr());
    assert_eq!(h["storage"]["state"], "degraded", "{h}");
    assert!(h["storage"]["held_in_memory"].as_u64().unwrap() >= 1, "{h}");
    assert!(
        h["storage"]["error"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{h}"
    );
    let page = scrape(metrics);
    assert_eq!(
        value(&page, "vma_watchdog_storage_degraded"),
        Some(1.0),
        "{page}"
    );
    assert!(
        value(&page, "vma_watchdog_events_held_in_memory").unwrap() >= 1.0,
        "{page}"
    );
    assert!(
        value(&page, "vma_watchdog_outbox_write_errors_total").unwrap() >= 1.0,
        "{page}"
    );
    let held: HashSet<Uuid> = held_ids(&w);
    assert!(!held.is_empty());
    // Every death reaches the OMA while the disk is still full.
    wait_until("every death at the OMA", || {
        (0..DEATHS).all(|n| deaths_at(&oma, &job(n)).len() == 1)
    });
    assert_eq!(health(w.api_addr())["storage"]["state"], "degraded");

    std::fs::remove_file(mount.join("filler")).unwrap();
    w.wait_for("storage_recovered", |v| v["event"] == "storage_recovered");
    let h = health(w.api_addr());
    assert_eq!(
        (&h["storage"]["state"], &h["storage"]["held_in_memory"]),
        (&Value::from("ok"), &Value::from(0)),
        "{h}"
    );
    assert!(h["storage"]["written_after_recovery"].as_u64().unwrap() >= held.len() as u64);
    // The outbox now holds each held death once, acknowledged once; nothing is pending.
    wait_until("every event acknowledged in the outbox", || {
        read_pending(&state).is_empty()
    });
    let (events, acks) = outbox_lines(&state);
    for id in &held {
        assert_eq!(
            events.iter().filter(|e| *e == id).count(),
            1,
            "{id} in events.jsonl"
        );
        assert_eq!(
            acks.iter().filter(|e| *e == id).count(),
            1,
            "{id} in acks.jsonl"
        );
    }
    // Delivered from memory once: the OMA got each held event exactly once.
    let received = oma.received();
    for id in &held {
        let times = received.iter().filter(|(e, _)| e.event_id == *id).count();
        assert_eq!(times, 1, "held event {id} reached the OMA {times} times");
    }
    // A restart reports none of the deaths again.
    let log = w.stop();
    let w = watchdog(&state, detector, &oma.url());
    std::thread::sleep(Duration::from_secs(2));
    for s in &standins {
        assert!(
            !w.lines_for(s.pid)
                .iter()
                .any(|v| v["event"] == "died_while_unwatched"),
            "pid {} reported again after the restart:\n{}",
            s.pid,
            w.raw()
        );
    }
    for n in 0..DEATHS {
        assert_eq!(deaths_at(&oma, &job(n)).len(), 1, "{}\n{log}", job(n));
    }
    w.stop();
    for s in standins {
        s.reap();
    }
    rt.block_on(oma.stop());
}

/// Ids of the events the watchdog said it held in memory.
fn held_ids(w: &WatchdogProcess) -> HashSet<Uuid> {
    w.raw()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["event"] == "event_held_in_memory")
        .map(|v| v["event_id"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// The distinct death events (ids) the OMA received for `job`.
fn deaths_at(oma: &FakeOma, job: &str) -> HashSet<Uuid> {
    oma.events_of(job)
        .into_iter()
        .filter(|e| e.kind != ProcessEventKind::ProcessStarted)
        .map(|e| e.event_id)
        .collect()
}

fn read_pending(state: &Path) -> Vec<api::ProcessEvent> {
    vma_watchdog::outbox::read_pending(&state.join("outbox")).unwrap()
}

/// The disk frees while a delivery from memory hangs (an OMA that accepts and never answers:
/// a listener nobody accepts on, its connections completed by the kernel): the held death is
/// written within a retry, not when the POST gives up (soak seed 16026862061546120504).
/// Ordered, not timed: `storage_recovered` must come before the hung POST's
/// `memory_delivery_failed`, which comes at the client's 10 s request timeout.
fn held_deaths_reach_the_disk_while_the_oma_hangs(detector: &str) {
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let oma = format!("http://{}", hung.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("fs");
    let _tmpfs = Tmpfs::mount(&mount, "2m");
    let state = mount.join("state");
    std::fs::create_dir(&state).unwrap();
    let w = watchdog(&state, detector, &oma);
    let job = |n: usize| format!("job-hung-{detector}-{}-{n}", std::process::id());
    let standins: Vec<Standin> = (0..DEATHS)
        .map(|n| Standin::start(dir.path(), &job(n), &secret(), &[]))
        .collect();
    for s in &standins {
        w.wait_event("process_started", s.pid);
    }
    fill(&mount.join("filler"));
    // Deaths until one is held (the first may still fit in the outbox file's last page).
    for s in &standins {
        s.kill(libc::SIGKILL);
        w.wait_event("process_exited", s.pid);
        if w.raw().contains("\"event_held_in_memory\"") {
            break;
        }
    }
    assert!(
        w.raw().contains("\"event_held_in_memory\""),
        "no death was held in memory:\n{}",
        w.raw()
    );
    // The delivery from memory starts at once and hangs; free the disk while it does.
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::remove_file(mount.join("filler")).unwrap();
    w.wait_for("storage_recovered", |v| v["event"] == "storage_recovered");
    let log = w.raw();
    let recovered = log.find("\"storage_recovered\"").unwrap();
    assert!(
        !log[..recovered].contains("\"memory_delivery_failed\""),
        "the held death was written only after the hung delivery gave up:\n{log}"
    );
    assert_eq!(health(w.api_addr())["storage"]["state"], "ok");
    w.stop();
    for s in standins {
        s.kill(libc::SIGKILL);
        s.reap();
    }
    drop(hung);
}

both_detectors!(
    death_while_disk_full,
    held_deaths_reach_the_disk_while_the_oma_hangs
);
