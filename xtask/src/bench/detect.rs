//! `cargo xtask bench detect`: builds the eBPF object, then runs the measuring program
//! (`watchdog/examples/bench_detect.rs`, release build) that uses the real detector.

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
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    build_ebpf::run()?;
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
        .args(["--rounds", &args.rounds.to_string()]);
    setup::status(&mut cmd).context("running the detection benchmark")
}
