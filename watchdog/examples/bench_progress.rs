//! Measures the two ways of keeping the latest progress per job on disk, side by side, and
//! the store as built: `cargo run -p vma-watchdog --release --example bench_progress [N]`.
//!
//! - append: one JSON line appended and `fdatasync`ed per update (what `ProgressStore` does);
//! - rewrite: the job's file rewritten atomically per update (temp, fsync, rename, dir fsync).
//!
//! Prints updates per second and per-update latency percentiles; asserts nothing.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use api::ProgressUpdate;
use vma_watchdog::progress::ProgressStore;

const JOBS: usize = 40;

fn update(bytes: u64) -> ProgressUpdate {
    serde_json::from_value(serde_json::json!({
        "stage": "Transfer", "status": "in_progress", "bytes_transferred": bytes,
        "total_bytes": 10_000_000_000u64, "throughput_bps": 123_456_789, "percent": 42.5,
        "disk_id": "disk-2000", "sync_type": "incremental"
    }))
    .unwrap()
}

fn report(name: &str, mut samples: Vec<Duration>, total: Duration) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{name:<28} {:>8.0} updates/s   p50 {:>7.1} us   p99 {:>7.1} us   max {:>8.1} us",
        samples.len() as f64 / total.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        samples.last().unwrap().as_secs_f64() * 1e6,
    );
}

fn bench_append(dir: &Path, n: usize) {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .unwrap();
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let mut line = serde_json::to_vec(&update(i as u64)).unwrap();
        line.push(b'\n');
        log.write_all(&line).unwrap();
        log.sync_data().unwrap();
        samples.push(t.elapsed());
    }
    report("append + fdatasync", samples, start.elapsed());
}

fn bench_rewrite(dir: &Path, n: usize) {
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let path = dir.join(format!("job-{}.json", i % JOBS));
        let tmp = dir.join(format!("job-{}.json.tmp", i % JOBS));
        let mut file = File::create(&tmp).unwrap();
        file.write_all(&serde_json::to_vec(&update(i as u64)).unwrap())
            .unwrap();
        file.sync_all().unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        File::open(dir).unwrap().sync_all().unwrap();
        samples.push(t.elapsed());
    }
    report("rewrite (tmp+fsync+rename)", samples, start.elapsed());
}

fn bench_store(dir: &Path, n: usize) {
    let store = ProgressStore::open(dir).unwrap();
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        store
            .record(
                &api::JobId::parse(&format!("job-{}", i % JOBS)).unwrap(),
                update(i as u64),
            )
            .unwrap();
        samples.push(t.elapsed());
    }
    report("ProgressStore::record", samples, start.elapsed());
    drop(store);
    let t = Instant::now();
    let store = ProgressStore::open(dir).unwrap();
    println!(
        "reopen with {} jobs: {:.1} ms",
        store.all().len(),
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// One thread per job, all posting at once, as dozens of migratekit processes do.
fn bench_store_concurrent(dir: &Path, n: usize) {
    let store = std::sync::Arc::new(ProgressStore::open(dir).unwrap());
    let start = Instant::now();
    let threads: Vec<_> = (0..JOBS)
        .map(|job| {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                for i in 0..n / JOBS {
                    let t = Instant::now();
                    store
                        .record(
                            &api::JobId::parse(&format!("job-{job}")).unwrap(),
                            update(i as u64),
                        )
                        .unwrap();
                    samples.push(t.elapsed());
                }
                samples
            })
        })
        .collect();
    let samples = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    report("ProgressStore, 40 threads", samples, start.elapsed());
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let base = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!("{n} updates over {JOBS} jobs, in {}", base.display());
    for (i, bench) in [
        bench_append,
        bench_rewrite,
        bench_store,
        bench_store_concurrent,
    ]
    .into_iter()
    .enumerate()
    {
        let dir = base.join(format!("bench-progress-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        bench(&dir, n);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
