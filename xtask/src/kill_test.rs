//! `cargo xtask kill-test`: builds the daemons (with the eBPF object) and the `kill-test`
//! runner of the `system-tests` crate, then runs it. The scenarios themselves live in
//! `tests/src/killtest/`, next to the harness the end-to-end tests share.
//!
//! `cargo xtask kill-test --bench 200 [--release]` runs the kill-to-commit latency benchmark
//! instead.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{build_ebpf, paths, setup};

/// Flags of `cargo xtask kill-test`; passed on to the runner.
#[derive(Debug, clap::Args)]
pub struct KillTestArgs {
    /// Runs of each scenario.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Only these scenario numbers (comma-separated), e.g. `--only 3,4`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// The watchdog's detector: `auto` (eBPF when it loads), `ebpf` or `procfs`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "ebpf", "procfs"])]
    detector: String,
    /// The OMA's store: `sqlite`, or `postgres` (a fresh database per run on the server of
    /// OMA_TEST_POSTGRES_URL, else on the test server `cargo xtask test` starts).
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    backend: String,
    /// With --backend postgres: the server (its user may create databases).
    #[arg(long, env = "OMA_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Where to write the JSON report (default target/kill-test/report.json).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Measure kill-to-commit latency over this many SIGKILLs instead of running scenarios.
    #[arg(long)]
    bench: Option<usize>,
    /// With --bench: the OMA polls every 0.2 s (the tests' setting) instead of every 5 s.
    #[arg(long, requires = "bench")]
    busy: bool,
    /// With --bench: both daemons over HTTPS with mutual TLS.
    #[arg(long, requires = "bench")]
    tls: bool,
    /// With --bench: metrics off, then on and scraped every second, side by side in one run.
    #[arg(long, requires = "bench")]
    metrics_compare: bool,
    /// With --bench: the watchdog's flush orders serial and parallel side by side over the
    /// same number of kills, then kills with its delivery off (see docs/BENCHMARKS.md).
    #[arg(long, requires = "bench")]
    flush_compare: bool,
    /// With --flush-compare: rounds the two orders alternate in.
    #[arg(long, requires = "flush_compare")]
    rounds: Option<usize>,
    /// With --flush-compare: kills with the delivery off (default: as many as --bench).
    #[arg(long, requires = "flush_compare")]
    unwatched_kills: Option<usize>,
    /// List the scenarios and what each proves.
    #[arg(long)]
    list: bool,
    /// Build and run everything optimized (for benchmark figures).
    #[arg(long)]
    release: bool,
    /// Run the eBPF detector's tests and the scenarios (all by default) in a qemu VM on
    /// Debian 12's 6.1 kernel (no `group_dead`; see docs/RELIABILITY.md).
    #[arg(long, conflicts_with_all = ["bench", "list", "json", "detector", "backend"])]
    vm: bool,
}

impl KillTestArgs {
    /// What `cargo xtask test` runs in the VM: the detector's tests and every scenario, twice,
    /// on Debian 12's 6.1 kernel.
    pub fn for_test_suite_vm() -> Self {
        Self {
            vm: true,
            ..Self::for_test_suite()
        }
    }

    /// What `cargo xtask test` runs after [`Self::for_test_suite`]: every scenario once more on
    /// the fallback detector, where eBPF cannot load (no BTF, an old kernel, no privileges).
    pub fn for_test_suite_procfs() -> Self {
        Self {
            runs: 1,
            detector: "procfs".to_owned(),
            json: Some("target/kill-test/report-procfs.json".into()),
            ..Self::for_test_suite()
        }
    }

    /// What `cargo xtask test` runs after the SQLite runs: every scenario once with the OMA on
    /// PostgreSQL (a fresh database per run on the server at `postgres_url`).
    pub fn for_test_suite_postgres(postgres_url: &str) -> Self {
        Self {
            runs: 1,
            backend: "postgres".to_owned(),
            postgres_url: Some(postgres_url.to_owned()),
            json: Some("target/kill-test/report-postgres.json".into()),
            ..Self::for_test_suite()
        }
    }

    /// What `cargo xtask test` runs: every scenario, the default number of runs, on the
    /// detector the watchdog picks by itself (eBPF where it loads).
    pub fn for_test_suite() -> Self {
        Self {
            runs: 2,
            detector: "auto".to_owned(),
            backend: "sqlite".to_owned(),
            postgres_url: None,
            only: Vec::new(),
            json: None,
            bench: None,
            busy: false,
            tls: false,
            metrics_compare: false,
            flush_compare: false,
            rounds: None,
            unwatched_kills: None,
            list: false,
            release: false,
            vm: false,
        }
    }
}

/// Builds what the runner needs and runs it; fails when a scenario fails.
pub fn run(args: &KillTestArgs) -> Result<()> {
    if args.vm {
        let (runs, only, release) = (args.runs, args.only.clone(), args.release);
        return crate::vm::run(&crate::vm::VmArgs {
            runs,
            only,
            release,
        });
    }
    let root = paths::workspace_root();
    if !paths::ebpf_object().exists() {
        build_ebpf::run().context("building the eBPF object the watchdog embeds")?;
    }
    setup::build_bins(args.release)?;
    let profile = if args.release { "release" } else { "debug" };
    let mut runner = Command::new(root.join("target").join(profile).join("kill-test"));
    runner
        .current_dir(&root)
        .args(["--runs", &args.runs.to_string()])
        .args(["--detector", &args.detector])
        .args(["--backend", &args.backend]);
    if args.backend == "postgres" {
        let url = match &args.postgres_url {
            Some(url) => url.clone(),
            None => crate::postgres::start_test_server()
                .context("--backend postgres needs a server: set OMA_TEST_POSTGRES_URL")?,
        };
        runner.env("OMA_TEST_POSTGRES_URL", url);
    }
    if !args.only.is_empty() {
        let only: Vec<String> = args.only.iter().map(u8::to_string).collect();
        runner.args(["--only", &only.join(",")]);
    }
    if let Some(json) = &args.json {
        runner.arg("--json").arg(json);
    }
    if let Some(kills) = args.bench {
        runner.args(["--bench", &kills.to_string()]);
        if args.busy {
            runner.arg("--busy");
        }
        if args.tls {
            runner.arg("--tls");
        }
        if args.metrics_compare {
            runner.arg("--metrics-compare");
        }
        if args.flush_compare {
            runner.arg("--flush-compare");
        }
        if let Some(rounds) = args.rounds {
            runner.args(["--rounds", &rounds.to_string()]);
        }
        if let Some(n) = args.unwatched_kills {
            runner.args(["--unwatched-kills", &n.to_string()]);
        }
    }
    if args.list {
        runner.arg("--list");
    }
    setup::status(&mut runner).context("kill-test scenarios failed (table above)")
}
