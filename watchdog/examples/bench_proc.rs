//! The `/proc` scan the watchdog runs at start and every `--scan-interval-ms` with the procfs
//! detector, measured side by side with the same scan written with the `procfs` crate:
//! `cargo run -p vma-watchdog --release --example bench_proc [PROCESSES] [ROUNDS]`.
//!
//! Both find the processes named `migratekit` among every process of the host (PROCESSES
//! extra sleepers are started to make the table bigger) and read their start time; the
//! hand-written reader also takes the job id from the command line, as the watchdog does. The
//! `procfs` variant stops at `stat` (its `cmdline` returns owned strings, which is what the
//! reader may not do with a password on the line), so it does strictly less work. Prints the
//! time per scan (p50/p99) for each, two rounds alternately; asserts nothing.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]
}

fn measure(name: &str, rounds: usize, mut scan: impl FnMut() -> usize) {
    let mut samples = Vec::with_capacity(rounds);
    let mut found = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        found = scan();
        samples.push(started.elapsed());
    }
    let p50 = percentile(&mut samples, 0.50);
    let p99 = percentile(&mut samples, 0.99);
    println!(
        "{name:<40} p50 {:>8.1} us  p99 {:>8.1} us  ({found} found, {rounds} scans)",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
}

fn crate_scan(name: &str) -> usize {
    let Ok(all) = procfs::process::all_processes() else {
        return 0;
    };
    all.flatten()
        .filter_map(|p| p.stat().ok())
        .filter(|stat| stat.comm == name && stat.state != 'Z')
        // The identity the watchdog needs, as the hand-written reader produces it.
        .map(|stat| (stat.pid, stat.starttime))
        .collect::<Vec<_>>()
        .len()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (extra, rounds) = (
        args.first().copied().unwrap_or(500),
        args.get(1).copied().unwrap_or(200),
    );
    let sleepers: Vec<Child> = (0..extra)
        .filter_map(|_| Command::new("sleep").arg("600").spawn().ok())
        .collect();
    let total = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .count()
        })
        .unwrap_or(0);
    println!(
        "/proc holds {total} processes ({} sleepers started for the run)",
        sleepers.len()
    );
    let names = vec!["migratekit".to_owned()];
    // The same work first, untimed, so both start with warm dentry caches.
    let _ = vma_watchdog::proc_reader::scan(&names);
    let _ = crate_scan("migratekit");
    for round in 1..=2 {
        println!("round {round}:");
        measure("hand-written reader (proc_reader::scan)", rounds, || {
            vma_watchdog::proc_reader::scan(&names).map_or(0, |found| found.len())
        });
        measure("procfs crate (all_processes + stat)", rounds, || {
            crate_scan("migratekit")
        });
    }
    for mut child in sleepers {
        let _ = child.kill();
        let _ = child.wait();
    }
}
