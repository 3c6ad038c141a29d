//! `soak`: the real daemons and stand-in migratekit processes under a long, seeded, random
//! fault schedule, with the invariants checked all the time (see `system_tests::soak`). Run
//! through `cargo xtask soak`, which builds everything first.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use system_tests::soak::{self, SoakConfig};

/// A seeded soak of the whole system.
#[derive(Debug, Parser)]
#[command(name = "soak")]
struct Args {
    /// Faults in the schedule.
    #[arg(long, default_value_t = 500)]
    faults: usize,
    /// The schedule's seed (a fresh one, printed, when not given).
    #[arg(long)]
    seed: Option<u64>,
    /// The OMA's store: `sqlite`, or `postgres` (a server of the soak's own, which it
    /// restarts as one of its faults).
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    backend: String,
    /// The watchdog's detector.
    #[arg(long, default_value = "auto", value_parser = ["auto", "ebpf", "procfs"])]
    detector: String,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/soak/report.json")]
    json: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !system_tests::is_root() {
        eprintln!("SKIP: soak: needs root (eBPF, killing processes, namespaces, cgroups)");
        return Ok(());
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let config = SoakConfig {
        faults: args.faults,
        seed,
        postgres: args.backend == "postgres",
        detector: args.detector,
        workspace: std::env::current_dir().context("reading the working directory")?,
    };
    let report = match soak::run(&config) {
        Ok(report) => report,
        Err(violation) => {
            eprintln!("{violation}");
            anyhow::bail!("the soak found a violation (seed {seed}); see above");
        }
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!(
        "soak: seed {seed}: {} faults, {} jobs judged, no violation ({:.1} s); report in {}",
        report.faults,
        report.judged,
        report.duration_secs,
        args.json.display()
    );
    Ok(())
}
