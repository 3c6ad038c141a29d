//! `cargo xtask soak --runs N [--parallel P]`: many soaks, each with a fresh seed, P at a time,
//! and one table of them all: how docs/RELIABILITY.md's soak figures are made.
//!
//! Each lane runs its own copy of the binaries. A watchdog takes a process for a job's
//! migratekit only when it runs the configured file (same device and inode); two soaks running
//! one file would each see the other's stand-ins as their own, which one VMA never meets.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::SoakArgs;
use crate::paths;

/// The binaries a soak starts, copied for each lane.
const BINARIES: [&str; 5] = [
    "soak",
    "oma",
    "vma-watchdog",
    "migratekit",
    "migratekit-gate",
];

/// One soak of the campaign.
#[derive(Debug, Clone)]
struct Soak {
    n: usize,
    backend: String,
    detector: String,
    seed: u64,
}

/// What one soak ended with.
#[derive(Debug)]
struct Ended {
    soak: Soak,
    passed: bool,
    secs: f64,
}

/// Runs the campaign; fails when any soak found a violation (after all have run).
pub fn run(args: &SoakArgs, runs: usize) -> Result<()> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let dir = paths::workspace_root().join(format!("target/soak/campaign-{stamp}"));
    let lanes = args.parallel.clamp(1, runs.max(1));
    for lane in 0..lanes {
        copy_binaries(&dir.join(format!("bin-{lane}")))?;
    }
    let queue: VecDeque<Soak> = (0..runs).map(|n| soak(args, n)).collect::<Result<_>>()?;
    println!(
        "soak campaign: {runs} soaks of {} faults, {lanes} at a time, in {}",
        args.faults,
        dir.display()
    );
    let queue = Mutex::new(queue);
    let ended = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for lane in 0..lanes {
            let (queue, ended, dir) = (&queue, &ended, &dir);
            scope.spawn(move || lane_loop(lane, args.faults, dir, queue, ended));
        }
    });
    let mut ended = ended.into_inner().unwrap_or_else(|e| e.into_inner());
    ended.sort_by_key(|e| e.soak.n);
    summarize(&dir, &ended, args.faults)
}

/// The `n`th soak: its backend and detector (taking turns under `all`) and a fresh seed.
fn soak(args: &SoakArgs, n: usize) -> Result<Soak> {
    let pick = |given: &str, all: [&str; 2], turn: usize| -> String {
        if given == "all" {
            all[turn % 2].to_owned()
        } else {
            given.to_owned()
        }
    };
    Ok(Soak {
        n,
        backend: pick(&args.backend, ["sqlite", "postgres"], n),
        detector: pick(&args.detector, ["ebpf", "procfs"], n / 2),
        seed: fresh_seed()?,
    })
}

fn fresh_seed() -> Result<u64> {
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)
        .context("reading a seed from /dev/urandom")?;
    Ok(u64::from_le_bytes(bytes))
}

fn copy_binaries(to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let from = paths::workspace_root().join("target/debug");
    for name in BINARIES {
        std::fs::copy(from.join(name), to.join(name))
            .with_context(|| format!("copying {name} into {}", to.display()))?;
    }
    Ok(())
}

/// Takes soaks from the queue until it is empty.
fn lane_loop(
    lane: usize,
    faults: usize,
    dir: &Path,
    queue: &Mutex<VecDeque<Soak>>,
    ended: &Mutex<Vec<Ended>>,
) {
    loop {
        let Some(soak) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
            return;
        };
        let started = Instant::now();
        let passed = match run_one(lane, faults, dir, &soak) {
            Ok(passed) => passed,
            Err(error) => {
                eprintln!("soak campaign: soak {} could not run: {error:#}", soak.n);
                false
            }
        };
        let secs = started.elapsed().as_secs_f64();
        println!(
            "soak campaign: #{} {} {} seed {}: {} ({secs:.0} s)",
            soak.n,
            soak.backend,
            soak.detector,
            soak.seed,
            if passed {
                "no violation"
            } else {
                "VIOLATION (see its log)"
            }
        );
        let done = Ended { soak, passed, secs };
        ended.lock().unwrap_or_else(|e| e.into_inner()).push(done);
    }
}

/// One soak from lane `lane`'s binaries; whether it passed.
fn run_one(lane: usize, faults: usize, dir: &Path, soak: &Soak) -> Result<bool> {
    let log = std::fs::File::create(dir.join(format!("log-{}.txt", soak.n)))?;
    let status = Command::new(dir.join(format!("bin-{lane}/soak")))
        .current_dir(paths::workspace_root())
        .args(["--faults", &faults.to_string()])
        .args(["--seed", &soak.seed.to_string()])
        .args(["--backend", &soak.backend, "--detector", &soak.detector])
        .arg("--json")
        .arg(report_path(dir, soak.n))
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .status()
        .context("starting the soak runner")?;
    Ok(status.success())
}

fn report_path(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("report-{n}.json"))
}

/// Prints one row per soak, the totals and the faults by kind; fails if any soak failed.
fn summarize(dir: &Path, ended: &[Ended], per_soak: usize) -> Result<()> {
    println!(
        "\n| backend | detector | seed | faults | jobs judged | max RSS MiB oma / watchdog | max fds oma / watchdog | s | result |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let (mut faults, mut judged) = (0, 0);
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for e in ended {
        let Some(r) = print_row(dir, e) else {
            continue;
        };
        faults += count(&r["faults"]);
        judged += count(&r["judged"]);
        for (kind, n) in r["by_kind"].as_object().into_iter().flatten() {
            *kinds.entry(kind.clone()).or_default() += count(n);
        }
    }
    println!("\n| fault | count |\n| --- | --- |");
    for (kind, count) in &kinds {
        println!("| {kind} | {count} |");
    }
    let failed: Vec<&Ended> = ended.iter().filter(|e| !e.passed).collect();
    println!(
        "\nsoak campaign: {} soaks, {faults} faults, {judged} jobs judged, {} with a violation",
        ended.len(),
        failed.len()
    );
    for e in &failed {
        let s = &e.soak;
        println!(
            "  replay: cargo xtask soak --seed {} --faults {per_soak} --backend {} --detector {}",
            s.seed, s.backend, s.detector
        );
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} soaks found a violation; their logs are in {}",
            failed.len(),
            ended.len(),
            dir.display()
        );
    }
    Ok(())
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Prints the table row of `e`; returns its report when it passed.
fn print_row(dir: &Path, e: &Ended) -> Option<serde_json::Value> {
    let s = &e.soak;
    let report = std::fs::read_to_string(report_path(dir, s.n))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|_| e.passed);
    let Some(r) = report else {
        println!(
            "| {} | {} | {} | - | - | - | - | {:.0} | **violation**: {} |",
            s.backend,
            s.detector,
            s.seed,
            e.secs,
            dir.join(format!("log-{}.txt", s.n)).display()
        );
        return None;
    };
    println!(
        "| {} | {} | {} | {} | {} | {} / {} | {} / {} | {:.0} | no violation |",
        s.backend,
        s.detector,
        s.seed,
        count(&r["faults"]),
        count(&r["judged"]),
        count(&r["max_rss_kib"]["oma"]) / 1024,
        count(&r["max_rss_kib"]["vma-watchdog"]) / 1024,
        count(&r["max_fds"]["oma"]),
        count(&r["max_fds"]["vma-watchdog"]),
        e.secs
    );
    Some(r)
}
