//! The watchdog's memory: the real `vma-watchdog` binary started as in production (eBPF
//! detector, an OMA URL, both tokens), left idle, its resident memory read from `/proc`.
//! Once with the memory tuning off (`VMA_WATCHDOG_MEMORY_TUNING=off`: glibc's defaults, the
//! configuration before it) and once as shipped, alternating, in the same run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vma_watchdog::memory::{TUNING_ENV, resident_of};

/// One idle daemon's memory, KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss: u64,
    peak: u64,
    anon: u64,
    file: u64,
}

/// `Rss`-like fields of `/proc/<pid>/status`, KiB.
fn status_kib(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Kills the daemon when dropped, so that a failed measurement leaves nothing running.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill() on our own child; SIGTERM lets it stop cleanly.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Starts the daemon in `dir`, waits for `watchdog_ready` in its log, then `idle`.
fn start(bin: &Path, dir: &Path, tuned: bool, idle: Duration) -> Result<Daemon> {
    let token = dir.join("token");
    std::fs::write(&token, "bench-detect-memory-token-0123456789abcdef\n")?;
    let mut cmd = Command::new(bin);
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args([
            "--detector",
            "ebpf",
            "--log-format",
            "json",
            "--vma-id",
            "bench",
        ])
        .args(["--oma-url", "http://127.0.0.1:9"])
        .arg("--oma-token-file")
        .arg(&token)
        .arg("--api-token-file")
        .arg(&token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !tuned {
        cmd.env(TUNING_ENV, "off");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("the daemon's stderr")?;
    let daemon = Daemon(child);
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let Some(line) = lines.next() else {
            bail!("{} stopped before watchdog_ready", bin.display());
        };
        if line?.contains("\"watchdog_ready\"") {
            break;
        }
        if Instant::now() > deadline {
            bail!("{} did not log watchdog_ready in 30 s", bin.display());
        }
    }
    // Keep draining its log, so that it never waits on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    std::thread::sleep(idle);
    Ok(daemon)
}

fn sample(bin: &Path, tuned: bool, idle: Duration) -> Result<Sample> {
    let dir = tempfile::tempdir()?;
    let daemon = start(bin, dir.path(), tuned, idle)?;
    let pid = daemon.0.id();
    let r = resident_of(Some(pid)).context("reading the daemon's /proc status")?;
    Ok(Sample {
        rss: r.rss / 1024,
        peak: r.peak / 1024,
        anon: status_kib(pid, "RssAnon:").unwrap_or(0),
        file: status_kib(pid, "RssFile:").unwrap_or(0),
    })
}

fn median(v: &[Sample], f: impl Fn(&Sample) -> u64) -> u64 {
    let mut x: Vec<u64> = v.iter().map(f).collect();
    x.sort_unstable();
    x[x.len() / 2]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Measures and prints the daemon's idle and peak memory, tuning off and on, `rounds` each.
pub fn run(bin: &Path, rounds: u32, idle: Duration) -> Result<()> {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        off.push(sample(bin, false, idle)?);
        on.push(sample(bin, true, idle)?);
    }
    println!(
        "Watchdog memory: {} (eBPF detector, idle {:.0} s after watchdog_ready, median of {} starts)",
        bin.display(),
        idle.as_secs_f64(),
        on.len()
    );
    println!(
        "  {:<24} {:>10} {:>10} {:>10} {:>10}",
        "", "RSS MiB", "peak MiB", "anon MiB", "file MiB"
    );
    for (label, v) in [("tuning off (before)", &off), ("tuning on (shipped)", &on)] {
        println!(
            "  {label:<24} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            mib(median(v, |s| s.rss)),
            mib(median(v, |s| s.peak)),
            mib(median(v, |s| s.anon)),
            mib(median(v, |s| s.file))
        );
    }
    let (b, a) = (median(&off, |s| s.rss), median(&on, |s| s.rss));
    println!(
        "  idle RSS on/off: {:.2} ({:+.1} MiB); target 16 MiB: {}",
        a as f64 / b as f64,
        mib(a) - mib(b),
        if a <= 16 * 1024 { "met" } else { "not met" }
    );
    Ok(())
}
