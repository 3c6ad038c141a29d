//! `cargo xtask bench <which>`: benchmarks that print figures (never timed assertions).

use anyhow::Result;
use clap::Subcommand;

mod detect;
mod fleet;
mod oma;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Which {
    /// Kill-to-event latency of the eBPF detector and its cost on a fork+exit storm.
    Detect(detect::Args),
    /// The OMA against 1,000 simulated VMAs: CPU, RSS, poll lag, freshness, kill-to-commit,
    /// recovery time; old and new poll protocols side by side.
    Fleet(fleet::Args),
    /// Watchdog-event intake rate and recovery scan time of the OMA on SQLite.
    Oma(oma::Args),
}

/// Runs one benchmark.
pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Detect(args) => detect::run(&args),
        Which::Fleet(args) => fleet::run(&args),
        Which::Oma(args) => oma::run(&args),
    }
}
