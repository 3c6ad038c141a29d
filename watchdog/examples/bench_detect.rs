//! Detection benchmark, run by `cargo xtask bench detect` (release build, root, eBPF object
//! built). Prints figures; asserts nothing about time.
//!
//! 1. Latency: start a matching process, wait until the detector reported its exec, take
//!    CLOCK_MONOTONIC, SIGKILL it, and take the clock again when the exit event arrives in
//!    user space (the tokio channel the daemon reads). The kernel's own timestamp of the exit
//!    splits that into kill→tracepoint and tracepoint→user space.
//! 2. Cost: a storm of fork()+_exit(0) children that match nothing, counted per second with the
//!    detector unloaded and loaded, alternating phases in the same run.
//! 3. Memory (with `--watchdog-bin`): the real daemon's idle RSS and peak, its memory tuning
//!    off and on, alternating in the same run (`bench_detect/memory.rs`).

#[path = "bench_detect/memory.rs"]
mod memory;

use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use vma_watchdog::detector::DetectorEvent;
use vma_watchdog::detector::ebpf::EbpfDetector;

#[derive(Debug, Parser)]
struct Args {
    /// How many processes to kill for the latency figures.
    #[arg(long, default_value_t = 1000)]
    kills: u32,
    /// Seconds of fork+exit storm per phase.
    #[arg(long, default_value_t = 1.0)]
    storm_secs: f64,
    /// How many unloaded/loaded phase pairs.
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// The `vma-watchdog` binary whose memory to measure (skipped without it).
    #[arg(long)]
    watchdog_bin: Option<std::path::PathBuf>,
    /// Seconds the daemon idles after `watchdog_ready` before its memory is read.
    #[arg(long, default_value_t = 5.0)]
    idle_secs: f64,
    /// How many starts per configuration for the memory figures (median).
    #[arg(long, default_value_t = 3)]
    memory_rounds: u32,
    /// Internal: run one storm phase of this many seconds in this (fresh, small) process and
    /// print `rate cpu_us_per_proc`. The storm runs in its own process, like the unrelated
    /// programs of a real machine, so the watchdog's own memory does not slow its forks.
    #[arg(long, hide = true)]
    storm_child: Option<f64>,
}

const NAME: &str = "wdbench-sleep";

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn latency(args: &Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = dir.path().join(NAME);
    symlink("/bin/sleep", &exe).context("symlink to /bin/sleep")?;
    let (detector, mut events) = EbpfDetector::start(&[NAME.to_owned()])?;
    let (mut total, mut kernel, mut delivery) = (Vec::new(), Vec::new(), Vec::new());
    let mut missed = 0u32;
    for _ in 0..args.kills {
        let mut child = Command::new(&exe)
            .arg("100")
            .spawn()
            .context("spawn sleep")?;
        let pid = child.id();
        // Wait for the exec report, so the kill hits `sleep` and not the forked parent copy.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
                Ok(Some(DetectorEvent::Started { process, .. })) if process.pid == pid => break,
                Ok(Some(_)) => continue,
                _ => bail!("no exec event for pid {pid}"),
            }
        }
        let t0 = monotonic_ns();
        // SAFETY: kill() on our own unreaped child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let got = loop {
            match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
                Ok(Some(DetectorEvent::Exited {
                    process, ktime_ns, ..
                })) if process.pid == pid => {
                    break Some((monotonic_ns(), ktime_ns.unwrap_or(t0)));
                }
                Ok(Some(_)) => continue,
                _ => break None,
            }
        };
        child.wait()?;
        match got {
            Some((t1, kt)) => {
                total.push(t1 - t0);
                kernel.push(kt.saturating_sub(t0));
                delivery.push(t1.saturating_sub(kt));
            }
            None => missed += 1,
        }
    }
    let stats = detector.stats()?;
    for v in [&mut total, &mut kernel, &mut delivery] {
        v.sort_unstable();
    }
    println!("Detection latency, exit mode: {}", detector.exit_mode());
    println!(
        "  kills: {}, events received: {}, missed: {missed}",
        args.kills,
        total.len()
    );
    if total.is_empty() {
        bail!("no exit event arrived");
    }
    for (label, v) in [
        ("kill() -> event in user space", &total),
        ("  kill() -> tracepoint (kernel)", &kernel),
        ("  tracepoint -> user space", &delivery),
    ] {
        println!(
            "  {label:<32} p50 {:>8.1} us  p99 {:>8.1} us  max {:>8.1} us",
            percentile(v, 0.5),
            percentile(v, 0.99),
            *v.last().unwrap_or(&0) as f64 / 1000.0
        );
    }
    println!("  kernel counters: {stats:?}");
    Ok(())
}

/// CPU time (user + system, microseconds) used by `who` so far.
fn cpu_us(who: i32) -> f64 {
    // SAFETY: rusage is plain data (all zeroes is valid); getrusage writes into it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One storm phase: processes per second (wall clock) and CPU microseconds per process
/// (the storm process plus its reaped children, where the exit tracepoint runs).
#[derive(Debug, Clone, Copy)]
struct Phase {
    rate: f64,
    cpu_us_per_proc: f64,
}

/// Runs one storm phase in a fresh process (this binary with `--storm-child`).
fn storm(secs: f64) -> Result<Phase> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--storm-child", &secs.to_string()])
        .output()
        .context("running the storm process")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(rate)), Some(Ok(cpu_us_per_proc))) => Ok(Phase {
            rate,
            cpu_us_per_proc,
        }),
        _ => bail!("storm process printed {text:?}"),
    }
}

/// fork()+_exit(0) as fast as possible for `secs`, in this process.
fn storm_here(secs: f64) -> Phase {
    let (thread0, children0) = (cpu_us(libc::RUSAGE_SELF), cpu_us(libc::RUSAGE_CHILDREN));
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while start.elapsed() < limit {
        // SAFETY: the child only calls _exit, which is async-signal-safe after fork in a
        // multi-threaded parent.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above.
            unsafe { libc::_exit(0) };
        }
        if pid > 0 {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            n += 1;
        }
    }
    let cpu = cpu_us(libc::RUSAGE_SELF) - thread0 + cpu_us(libc::RUSAGE_CHILDREN) - children0;
    Phase {
        rate: n as f64 / start.elapsed().as_secs_f64(),
        cpu_us_per_proc: cpu / n.max(1) as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn cost(args: &Args) -> Result<()> {
    let (mut unloaded, mut loaded) = (Vec::new(), Vec::new());
    let secs = args.storm_secs;
    let mut events_in_loaded = 0usize;
    let mut exits_seen = 0u64;
    let (mut runs, mut run_ns) = (0u64, 0u128);
    // The kernel measures each program run while this fd is open.
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    for _ in 0..args.rounds {
        unloaded.push(tokio::task::spawn_blocking(move || storm(secs)).await??);
        let (detector, mut events) = EbpfDetector::start(&["migratekit".to_owned()])?;
        loaded.push(tokio::task::spawn_blocking(move || storm(secs)).await??);
        while events.try_recv().is_ok() {
            events_in_loaded += 1;
        }
        exits_seen += detector.stats()?.exits_seen;
        let [exit, exec] = detector.run_stats()?;
        runs += exit.run_count + exec.run_count;
        run_ns += exit.run_time.as_nanos() + exec.run_time.as_nanos();
        drop(detector);
    }
    let rate = |v: &[Phase]| median(v.iter().map(|p| p.rate).collect());
    let cpu = |v: &[Phase]| median(v.iter().map(|p| p.cpu_us_per_proc).collect());
    let (ur, lr, uc, lc) = (rate(&unloaded), rate(&loaded), cpu(&unloaded), cpu(&loaded));
    println!(
        "Fork+exit storm of non-matching processes ({} rounds of {secs} s per phase, alternating)",
        args.rounds
    );
    println!("  {:<10} {:>12} {:>18}", "", "proc/s", "CPU us per proc");
    println!("  {:<10} {ur:>12.0} {uc:>18.1}", "unloaded");
    println!("  {:<10} {lr:>12.0} {lc:>18.1}", "loaded");
    println!(
        "  loaded/unloaded: throughput ratio {:.3} ({:+.1} %), CPU per process ratio {:.3} ({:+.1} %)",
        lr / ur,
        (lr / ur - 1.0) * 100.0,
        lc / uc,
        (lc / uc - 1.0) * 100.0
    );
    let fmt = |v: &[Phase]| {
        v.iter()
            .map(|p| format!("{:.0}", p.rate))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("  per round proc/s, unloaded: {}", fmt(&unloaded));
    println!("  per round proc/s, loaded:   {}", fmt(&loaded));
    println!(
        "  exits seen by the kernel program: {exits_seen}; user-space events: {events_in_loaded}"
    );
    let per_run = run_ns as f64 / runs.max(1) as f64;
    println!(
        "  kernel-measured program cost: {runs} runs (exit + exec), {per_run:.0} ns per run = {:.2} % of the unloaded CPU per process",
        per_run / 1000.0 / uc * 100.0
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(secs) = args.storm_child {
        let phase = storm_here(secs);
        println!("{} {}", phase.rate, phase.cpu_us_per_proc);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        latency(&args).await?;
        cost(&args).await
    })?;
    if let Some(bin) = &args.watchdog_bin {
        let idle = Duration::from_secs_f64(args.idle_secs);
        memory::run(bin, args.memory_rounds, idle)?;
    }
    Ok(())
}
