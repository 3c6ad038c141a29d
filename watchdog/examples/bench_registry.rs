//! What writing the registry costs when it holds many last exits, and how long a death or a
//! status read waits for the registry's lock while a write goes on:
//! `cargo run -p vma-watchdog --release --example bench_registry [EXITS]`.
//!
//! Runs twice, with 1 last exit (the baseline) and with EXITS (default 10,000, the most the
//! registry keeps): each run times `flush` after one recorded death (encode, write, two
//! fsyncs, rename), then reads job statuses on one thread while another flushes without
//! pause, and prints how long each read waited. Last, it times `record_exit` (the registry's
//! step on the path of a death) for deaths of new jobs, which at EXITS push the oldest last
//! exit out: first with no write in progress, then while another thread writes without
//! pause. Asserts nothing.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::{Detector, ExitStatus, FoundBy, ProcessIdentity};
use vma_watchdog::registry::{FILE_NAME, Registry};

const ROUNDS: usize = 20;

fn job(text: &str) -> api::JobId {
    api::JobId::parse(text).expect("the benchmark's job ids follow the rule")
}

fn identity(pid: u32) -> ProcessIdentity {
    ProcessIdentity {
        pid,
        start_time: u64::from(pid) * 7,
    }
}

/// A registry in `dir` holding `exits` last exits, built from the file format the registry
/// itself writes (one real exit, copied under other job ids).
fn fill(dir: &Path, exits: usize) -> Registry {
    let registry = Registry::open(dir).expect("open");
    registry
        .register(identity(1), &job("job-0"), FoundBy::Started)
        .expect("register");
    registry.record_exit(identity(1), ExitStatus::default(), Detector::Ebpf);
    registry.flush().expect("flush");
    let path = dir.join(FILE_NAME);
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
    let template = file["last_exits"]["job-0"].clone();
    let last_exits = file["last_exits"].as_object_mut().expect("last_exits");
    for i in 1..exits {
        last_exits.insert(format!("job-{i}"), template.clone());
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&file).expect("encode")).expect("write");
    drop(registry);
    Registry::open(dir).expect("reopen")
}

fn percentiles(mut us: Vec<u128>) -> String {
    us.sort_unstable();
    let at = |p: usize| us[(us.len() * p / 100).min(us.len() - 1)];
    format!(
        "p50 {:>6} us  p99 {:>6} us  max {:>6} us",
        at(50),
        at(99),
        us[us.len() - 1]
    )
}

fn run(exits: usize) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry = Arc::new(fill(dir.path(), exits));
    let size = std::fs::metadata(dir.path().join(FILE_NAME)).map_or(0, |m| m.len());
    let mut flushes = Vec::new();
    for round in 0..ROUNDS {
        let pid = 1_000 + round as u32;
        registry
            .register(
                identity(pid),
                &job(&format!("job-{round}")),
                FoundBy::Started,
            )
            .expect("register");
        registry.record_exit(identity(pid), ExitStatus::default(), Detector::Ebpf);
        let start = Instant::now();
        registry.flush().expect("flush");
        flushes.push(start.elapsed().as_micros());
    }
    // Reads of a job's status (they take the same lock as a death) during back-to-back
    // writes; each write has a change to carry.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (registry, stop) = (Arc::clone(&registry), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut pid = 100_000;
            while !stop.load(Ordering::Relaxed) {
                pid += 1;
                let _ = registry.register(identity(pid), &job("job-writer"), FoundBy::Scan);
                registry.record_exit(identity(pid), ExitStatus::default(), Detector::Ebpf);
                registry.flush().expect("flush");
            }
        })
    };
    let mut reads = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let start = Instant::now();
        let _ = registry.job_status("job-1");
        reads.push(start.elapsed().as_micros());
        std::thread::sleep(Duration::from_micros(200));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    println!(
        "{exits:>6} last exits ({:>5} KiB file): flush {}\n{:>32} read during flushes {} ({} reads)",
        size / 1024,
        percentiles(flushes),
        "",
        percentiles(reads.clone()),
        reads.len()
    );
    let quiet = deaths(&registry, 200_000, 50, false);
    let writing = deaths(&registry, 300_000, 50, true);
    println!(
        "{:>32} death, no write going on {}\n{:>32} death during writes     {}",
        "",
        percentiles(quiet),
        "",
        percentiles(writing)
    );
}

/// `record_exit` of `rounds` registered processes of new jobs; with `writing`, while another
/// thread flushes without pause, else with the registry written after each death (untimed).
fn deaths(registry: &Arc<Registry>, first_pid: u32, rounds: u32, writing: bool) -> Vec<u128> {
    for pid in first_pid..first_pid + rounds {
        registry
            .register(identity(pid), &job(&format!("new-{pid}")), FoundBy::Started)
            .expect("register");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writing.then(|| {
        let (registry, stop) = (Arc::clone(registry), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                registry.flush().expect("flush");
                std::thread::yield_now();
            }
        })
    });
    let mut took = Vec::new();
    for pid in first_pid..first_pid + rounds {
        let start = Instant::now();
        registry.record_exit(identity(pid), ExitStatus::default(), Detector::Ebpf);
        took.push(start.elapsed().as_micros());
        if writing {
            std::thread::sleep(Duration::from_millis(2));
        } else {
            registry.flush().expect("flush");
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(writer) = writer {
        writer.join().expect("writer");
    }
    took
}

fn main() {
    let exits: usize = std::env::args()
        .nth(1)
        .map_or(10_000, |n| n.parse().expect("EXITS must be a number"));
    run(1);
    run(exits);
}
