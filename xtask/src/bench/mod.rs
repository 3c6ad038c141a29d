//! `cargo xtask bench <which>`: benchmarks that print figures (never timed assertions).

use anyhow::Result;
use clap::Subcommand;

mod detect;
mod oma;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Which {
    /// Kill-to-event latency of the eBPF detector and its cost on a fork+exit storm.
    Detect(detect::Args),
    /// Watchdog-event intake rate and recovery scan time of the OMA on SQLite.
    Oma(oma::Args),
}

/// Runs one benchmark.
pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Detect(args) => detect::run(&args),
        Which::Oma(args) => oma::run(&args),
    }
}
