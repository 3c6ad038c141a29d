//! `cargo xtask bench oma`: runs the OMA's measuring program (`oma/examples/oma-bench.rs`,
//! release build, SQLite): event intake rate and recovery scan time at 10k/100k/1M jobs.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{paths, setup};

/// Options of the OMA benchmark, passed through to the measuring program.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Largest job table to scan (the run also measures 10k and 100k).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_jobs: u64,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(paths::workspace_root())
        .args(["run", "--quiet", "--release", "--package", "oma"])
        .args(["--example", "oma-bench", "--"])
        .args(["--max-jobs", &args.max_jobs.to_string()]);
    setup::status(&mut cmd).context("running the OMA benchmark")
}
