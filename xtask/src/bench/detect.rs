//! `cargo xtask bench detect`: builds the eBPF object, then runs the measuring program
//! (`watchdog/examples/bench_detect.rs`, release build) that uses the real detector, and
//! measures the memory of the real `vma-watchdog` daemon (release build, as packaged).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{build_ebpf, paths, setup};

/// Options of the detection benchmark, passed through to the measuring program.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many processes to kill for the latency figures.
    #[arg(long, default_value_t = 1000)]
    pub kills: u32,
    /// Seconds of fork+exit storm per phase (loaded or unloaded).
    #[arg(long, default_value_t = 1.0)]
    pub storm_secs: f64,
    /// How many loaded/unloaded phase pairs to alternate.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Seconds the daemon idles after `watchdog_ready` before its memory is read.
    #[arg(long, default_value_t = 5.0)]
    pub idle_secs: f64,
    /// Daemon starts per memory configuration (tuning off, on); the median is printed.
    #[arg(long, default_value_t = 3)]
    pub memory_rounds: u32,
}

/// Where cargo puts the release build of the daemon.
fn release_watchdog() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::workspace_root().join("target"))
        .join("release")
        .join("vma-watchdog")
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    build_ebpf::run()?;
    setup::status(
        Command::new("cargo")
            .current_dir(paths::workspace_root())
            .args([
                "build",
                "--quiet",
                "--release",
                "--package",
                "vma-watchdog",
                "--bin",
                "vma-watchdog",
            ]),
    )
    .context("building the release vma-watchdog")?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(paths::workspace_root())
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "vma-watchdog",
            "--example",
            "bench_detect",
            "--",
        ])
        .args(["--kills", &args.kills.to_string()])
        .args(["--storm-secs", &args.storm_secs.to_string()])
        .args(["--rounds", &args.rounds.to_string()])
        .arg("--watchdog-bin")
        .arg(release_watchdog())
        .args(["--idle-secs", &args.idle_secs.to_string()])
        .args(["--memory-rounds", &args.memory_rounds.to_string()]);
    setup::status(&mut cmd).context("running the detection benchmark")
}
