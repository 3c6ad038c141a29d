//! `kill-test`: runs the kill-test scenarios of issue 5 (or the kill-to-commit benchmark)
//! against the real daemons. Run through `cargo xtask kill-test`, which builds everything first.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use system_tests::killtest::{self, bench};

/// Kill tests of the whole system: real oma, real vma-watchdog, stand-in migratekit.
#[derive(Debug, Parser)]
#[command(name = "kill-test")]
struct Args {
    /// Runs of each scenario.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Only these scenario numbers (comma-separated), e.g. `--only 3,4`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// The watchdog's detector: `auto` (eBPF when it loads), `ebpf` or `procfs` (the fallback,
    /// proven on its own).
    #[arg(long, default_value = "auto", value_parser = ["auto", "ebpf", "procfs"])]
    detector: String,
    /// The OMA's store: `sqlite` (a file per run) or `postgres` (a fresh database per run on
    /// the server at --postgres-url, dropped after it).
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    backend: String,
    /// With --backend postgres: a server URL whose user may create databases.
    #[arg(long, env = "OMA_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/kill-test/report.json")]
    json: PathBuf,
    /// List the scenarios and what each proves, then exit.
    #[arg(long)]
    list: bool,
    /// Instead of the scenarios, measure kill-to-commit latency over this many SIGKILLs.
    #[arg(long)]
    bench: Option<usize>,
    /// With --bench: run the OMA with the tests' short intervals (polling every 0.2 s)
    /// instead of the shipped ones (every 5 s).
    #[arg(long, requires = "bench")]
    busy: bool,
    /// With --bench: both daemons over HTTPS with mutual TLS.
    #[arg(long, requires = "bench")]
    tls: bool,
    /// With --bench: measure twice in this run, both daemons with metrics off, then with
    /// metrics on and scraped every second, and print the two side by side.
    #[arg(long, requires = "bench")]
    metrics_compare: bool,
    /// With --bench: the watchdog's two flush orders (serial, parallel) side by side, each
    /// over the --bench kills in alternating rounds, then --unwatched-kills kills with its
    /// delivery off (only the OMA's polling and recovery notice the death).
    #[arg(long, requires = "bench")]
    flush_compare: bool,
    /// With --flush-compare: rounds the two orders alternate in.
    #[arg(long, default_value_t = 2, requires = "flush_compare")]
    rounds: usize,
    /// With --flush-compare: kills with the delivery off (default: as many as --bench; each
    /// waits for the OMA's next poll, 2.5 s on average).
    #[arg(long, requires = "flush_compare")]
    unwatched_kills: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scenarios: Vec<_> = killtest::all()
        .into_iter()
        .filter(|s| args.only.is_empty() || args.only.contains(&s.number))
        .collect();
    if args.list {
        for s in &scenarios {
            println!("{} {}: {}", s.number, s.name, s.proves);
        }
        return Ok(());
    }
    if !system_tests::is_root() {
        eprintln!("SKIP: kill-test: needs root (eBPF, killing processes, namespaces, cgroups)");
        return Ok(());
    }
    if let Some(kills) = args.bench {
        let run = |metrics| {
            bench::kill_to_commit(kills, args.busy, &args.detector, args.tls, metrics)
                .context("kill-to-commit benchmark")
        };
        if args.flush_compare {
            let unwatched = args.unwatched_kills.unwrap_or(kills);
            let figures = bench::flush_compare(kills, args.rounds, unwatched, &args.detector)
                .context("kill-to-commit, one flush against two")?;
            println!("{figures}");
            write_json(&args.json, &figures)?;
            return Ok(());
        }
        if args.metrics_compare {
            let (off, on) = (run(false)?, run(true)?);
            println!("metrics off: {off}\n\nmetrics on: {on}\n");
            println!(
                "side by side (ms), metrics off vs on: p50 {:.2} vs {:.2}, p99 {:.2} vs {:.2}, \
                 max {:.2} vs {:.2}; baseline fdatasync p50 {:.2} vs {:.2}",
                off.p50_ms,
                on.p50_ms,
                off.p99_ms,
                on.p99_ms,
                off.max_ms,
                on.max_ms,
                off.fdatasync_p50_ms,
                on.fdatasync_p50_ms
            );
            write_json(&args.json, &[off, on])?;
            return Ok(());
        }
        let figures = run(true)?;
        println!("{figures}");
        write_json(&args.json, &figures)?;
        return Ok(());
    }
    let backend = match (args.backend.as_str(), args.postgres_url) {
        ("postgres", Some(admin_url)) => killtest::Backend::Postgres { admin_url },
        ("postgres", None) => anyhow::bail!(
            "--backend postgres needs --postgres-url or OMA_TEST_POSTGRES_URL (a server whose \
             user may create databases; oma/scripts/start-test-postgres.sh starts one)"
        ),
        _ => killtest::Backend::Sqlite,
    };
    eprintln!(
        "kill-test: the watchdog runs with --detector {}, the OMA on {}",
        args.detector,
        backend.name()
    );
    let report = killtest::run(&scenarios, args.runs, &args.detector, &backend);
    println!("{}", report.table());
    write_json(&args.json, &report)?;
    eprintln!("report written to {}", args.json.display());
    if !report.ok() {
        anyhow::bail!("some kill-test scenarios failed; see the table above");
    }
    Ok(())
}

fn write_json(path: &PathBuf, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}; check the path", path.display()))
}
