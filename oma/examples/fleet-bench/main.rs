//! `fleet-bench`: a fleet of simulated VMAs against a running `oma`, for
//! `cargo xtask bench fleet` (which starts the OMA and prints the table). Prints one JSON
//! object with the figures on stdout, progress on stderr; asserts nothing about time.
//!
//! Phases: register the VMAs; an idle baseline (deaths on one small VMA before the fleet's
//! jobs exist); create every job through `POST /api/v1/jobs` (the simulated VMA answers the
//! start 201 running; no job has progress yet); progress starts moving; warm up; a measured window with deaths injected and freshness
//! sampled; a timed recovery run.

mod measure;
mod oma_api;
mod sim;
mod stats;

use anyhow::{Context, Result};
use clap::Parser;
use futures_like::for_each_limited;
use measure::{ProcSample, proc_sample};
use oma_api::Oma;
use serde_json::json;
use sim::{Recorder, VmaSim};
use stats::summarize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod futures_like;

/// Flags.
#[derive(Debug, Parser)]
struct Args {
    /// The OMA's REST URL.
    #[arg(long)]
    oma_url: String,
    /// The OMA's metrics URL.
    #[arg(long)]
    metrics_url: String,
    /// The OMA's pid, for `/proc`.
    #[arg(long)]
    oma_pid: u32,
    /// Operator token the OMA accepts.
    #[arg(long, env = "FLEET_OPERATOR_TOKEN")]
    operator_token: String,
    /// Simulated VMAs.
    #[arg(long, default_value_t = 1000)]
    vmas: usize,
    /// Active jobs per VMA.
    #[arg(long, default_value_t = 20)]
    jobs_per_vma: usize,
    /// The OMA's poll interval, seconds (for the gap figures).
    #[arg(long, default_value_t = 5.0)]
    poll_interval_secs: f64,
    /// Seconds of load before the window.
    #[arg(long, default_value_t = 15)]
    warmup_secs: u64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Deaths injected during the window (and up to 100 in the idle baseline).
    #[arg(long, default_value_t = 200)]
    deaths: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Up to the hard limit: a thousand listeners and their connections.
    transport::raise_fd_limit(1 << 20).context("raising the file limit")?;
    let oma = Oma::new(&args.oma_url, &args.metrics_url, &args.operator_token)?;
    oma.wait_healthy().await?;
    let recorder = Arc::new(Recorder::default());
    let interval_ms = (args.poll_interval_secs * 1000.0) as u64;
    recorder.interval_ms.store(interval_ms, Ordering::Relaxed);
    recorder.moving.store(true, Ordering::Relaxed);
    let baseline = baseline(&oma, &recorder, args.deaths.min(100)).await?;
    recorder.moving.store(false, Ordering::Relaxed);
    let fleet = start_fleet(&oma, &recorder, args.vmas, args.jobs_per_vma).await?;
    let created = create_jobs(&oma, &fleet).await?;
    recorder.moving.store(true, Ordering::Relaxed);
    eprintln!(
        "fleet-bench: progress moves; warming up {} s",
        args.warmup_secs
    );
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    let window = window(&oma, &fleet, &recorder, &args).await?;
    // Printed now too: a recovery run at saturation may take minutes.
    eprintln!("fleet-bench: window {window}");
    eprintln!(
        "fleet-bench: recovery run over {} active jobs",
        fleet.len() * args.jobs_per_vma
    );
    let (took, decisions) = oma.recovery_run().await?;
    let result = json!({
        "vmas": args.vmas, "jobs": args.vmas * args.jobs_per_vma,
        "baseline_kill_to_commit_ms": baseline,
        "create_jobs_per_s": created,
        "window": window,
        "recovery_run_s": took.as_secs_f64(), "recovery_decisions": decisions,
    });
    println!("{result}");
    Ok(())
}

/// Deaths on one small VMA before the fleet exists: kill-to-commit without poll load.
async fn baseline(oma: &Oma, recorder: &Arc<Recorder>, deaths: usize) -> Result<serde_json::Value> {
    let vma = VmaSim::start("fleet-base".into(), deaths, 100, recorder.clone()).await;
    oma.register_vma(&vma.id, &vma.url, &vma.token).await?;
    for id in vma.job_ids() {
        oma.create_job(&id, &vma.id).await?;
    }
    let vmas = [vma];
    let (took, _) = measure::deaths_apart(
        oma,
        &vmas,
        deaths,
        Duration::from_millis(50),
        Instant::now() + Duration::from_secs(60),
    )
    .await?;
    let summary = summarize(took);
    eprintln!(
        "fleet-bench: idle baseline kill-to-commit p50 {:.2} ms p99 {:.2} ms",
        summary.p50, summary.p99
    );
    Ok(serde_json::to_value(summary)?)
}

/// Starts and registers the simulated VMAs.
async fn start_fleet(
    oma: &Oma,
    recorder: &Arc<Recorder>,
    vmas: usize,
    jobs: usize,
) -> Result<Vec<Arc<VmaSim>>> {
    let mut fleet = Vec::with_capacity(vmas);
    for v in 0..vmas {
        let first_pid = 1000 + (v * jobs) as u32;
        fleet.push(VmaSim::start(format!("fleet-{v}"), jobs, first_pid, recorder.clone()).await);
    }
    let oma2 = oma.clone();
    for_each_limited(fleet.clone(), 16, move |vma| {
        let oma = oma2.clone();
        async move { oma.register_vma(&vma.id, &vma.url, &vma.token).await }
    })
    .await
    .context("registering the VMAs")?;
    eprintln!("fleet-bench: {vmas} VMAs registered");
    Ok(fleet)
}

/// Creates every job (16 requests in flight); returns jobs created per second.
async fn create_jobs(oma: &Oma, fleet: &[Arc<VmaSim>]) -> Result<f64> {
    let started = Instant::now();
    let jobs: Vec<(String, String)> = fleet
        .iter()
        .flat_map(|v| v.job_ids().into_iter().map(|j| (j, v.id.clone())))
        .collect();
    let n = jobs.len();
    let oma2 = oma.clone();
    for_each_limited(jobs, 16, move |(job, vma)| {
        let oma = oma2.clone();
        async move { oma.create_job(&job, &vma).await }
    })
    .await
    .context("creating the jobs")?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "fleet-bench: {n} jobs created in {:.1} s ({rate:.0}/s)",
        started.elapsed().as_secs_f64()
    );
    Ok(rate)
}

/// The measured window: deaths, freshness and RSS samples, CPU over the whole window, the
/// poll gaps the simulated VMAs saw, and the poller's own counts.
async fn window(
    oma: &Oma,
    fleet: &[Arc<VmaSim>],
    recorder: &Recorder,
    args: &Args,
) -> Result<serde_json::Value> {
    eprintln!("fleet-bench: measuring for {} s", args.secs);
    let poller_before = oma.poller().await?;
    let (oma0, self0): (ProcSample, ProcSample) = (proc_sample(args.oma_pid)?, proc_sample(0)?);
    for counter in [
        &recorder.progress_gets,
        &recorder.feed_gets,
        &recorder.feed_jobs,
        &recorder.status_gets,
    ] {
        counter.store(0, Ordering::Relaxed);
    }
    let started = Instant::now();
    recorder.recording.store(true, Ordering::Relaxed);
    let until = started + Duration::from_secs(args.secs);
    let every = Duration::from_secs_f64(args.secs as f64 / args.deaths.max(1) as f64);
    let (deaths, samples) = tokio::join!(
        measure::deaths_apart(oma, fleet, args.deaths, every, until),
        measure::sample(oma, fleet, args.oma_pid, 5, until),
    );
    let wall = started.elapsed();
    recorder.recording.store(false, Ordering::Relaxed);
    let (oma1, self1) = (proc_sample(args.oma_pid)?, proc_sample(0)?);
    let (deaths, samples) = (deaths?, samples?);
    let poller_after = oma.poller().await?;
    let delta =
        |k: &str| poller_after[k].as_u64().unwrap_or(0) - poller_before[k].as_u64().unwrap_or(0);
    let lags = std::mem::take(&mut *recorder.lags_ms.lock().unwrap_or_else(|e| e.into_inner()));
    let per_s =
        |c: &std::sync::atomic::AtomicU64| c.swap(0, Ordering::Relaxed) as f64 / wall.as_secs_f64();
    Ok(json!({
        "secs": wall.as_secs_f64(),
        "oma_cores": measure::cores(oma0, oma1, wall),
        "oma_rss_mib": oma1.rss_kib as f64 / 1024.0,
        "oma_rss_max_mib": samples.rss_max_kib.max(oma1.rss_kib) as f64 / 1024.0,
        "oma_hwm_mib": oma1.hwm_kib as f64 / 1024.0,
        "sim_cores": measure::cores(self0, self1, wall),
        "poll_gap_lag_ms": summarize(lags),
        "cycle_lag_ms": summarize(samples.cycle_lag_ms),
        "freshness_age_ms": summarize(samples.ages_ms),
        "never_polled": samples.never_polled,
        "kill_to_commit_ms": summarize(deaths.0.clone()),
        "deaths_not_final": measure::not_final(oma, &deaths.1).await?,
        "polls_ok": delta("polls_ok"), "polls_failed": delta("polls_failed"),
        "progress_gets_per_s": per_s(&recorder.progress_gets),
        "feed_gets_per_s": per_s(&recorder.feed_gets),
        "feed_jobs_per_s": per_s(&recorder.feed_jobs),
        "status_gets_per_s": per_s(&recorder.status_gets),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    }))
}
