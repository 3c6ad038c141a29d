//! `cargo xtask soak`: builds the daemons (with the eBPF object) and the `soak` runner of the
//! `system-tests` crate, then runs it: a long random fault schedule its seed reproduces, with
//! the invariants checked all the time (tests/src/soak/, docs/RELIABILITY.md "Soak").
//! With `--runs N`, a campaign of N soaks, several at a time ([`campaign`]).

mod campaign;

use std::process::Command;

use anyhow::{Context, Result};

use crate::{build_ebpf, paths, setup};

/// Flags of `cargo xtask soak`; passed on to the runner.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Faults in the schedule.
    #[arg(long, default_value_t = 500)]
    faults: usize,
    /// The schedule's seed; a fresh one (printed) when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// The OMA's store: `sqlite`, or `postgres` (a server of the soak's own, which it
    /// restarts as one of its faults); `all` (with `--runs`) takes turns.
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres", "all"])]
    backend: String,
    /// The watchdog's detector; `all` (with `--runs`) takes turns between `ebpf` and `procfs`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "ebpf", "procfs", "all"])]
    detector: String,
    /// Where to write the JSON report (default target/soak/report.json).
    #[arg(long, conflicts_with = "runs")]
    json: Option<std::path::PathBuf>,
    /// A campaign: this many soaks, each with a fresh seed, reports and logs kept in
    /// `target/soak/campaign-<time>/`, a table of them all at the end.
    #[arg(long, conflicts_with = "seed")]
    runs: Option<usize>,
    /// Soaks at a time in a campaign (each with its own copy of the binaries, so that one
    /// watchdog never takes the other's stand-ins for its own).
    #[arg(long, default_value_t = 2, requires = "runs")]
    parallel: usize,
}

impl SoakArgs {
    /// What `cargo xtask test` runs: a short soak (500 faults) with a fresh seed, printed.
    pub fn for_test_suite() -> Self {
        Self {
            faults: 500,
            seed: None,
            backend: "sqlite".to_owned(),
            detector: "auto".to_owned(),
            json: None,
            runs: None,
            parallel: 1,
        }
    }
}

/// Builds what the runner needs and runs it; fails on a violation.
pub fn run(args: &SoakArgs) -> Result<()> {
    if args.runs.is_none() && (args.backend == "all" || args.detector == "all") {
        anyhow::bail!("`all` takes turns between runs: give it with --runs N");
    }
    let root = paths::workspace_root();
    if !paths::ebpf_object().exists() {
        build_ebpf::run().context("building the eBPF object the watchdog embeds")?;
    }
    setup::build_bins(false)?;
    if let Some(runs) = args.runs {
        return campaign::run(args, runs);
    }
    let mut runner = Command::new(root.join("target/debug/soak"));
    runner
        .current_dir(&root)
        .args(["--faults", &args.faults.to_string()])
        .args(["--backend", &args.backend])
        .args(["--detector", &args.detector]);
    if let Some(seed) = args.seed {
        runner.args(["--seed", &seed.to_string()]);
    }
    if let Some(json) = &args.json {
        runner.arg("--json").arg(json);
    }
    setup::status(&mut runner)
        .context("the soak found a violation: the seed, the last faults and the logs are above")
}
