//! Kill → OMA receipt latency through the whole VMA side: the real `vma-watchdog` binary
//! (REST API, detector, outbox with its fsync, delivery) and a tiny real OMA on 127.0.0.1.
//! Each round starts a stand-in migratekit through `POST /api/v1/jobs/{id}/start`, SIGKILLs
//! it, and measures until the OMA has received its `process_exited` event. It also measures
//! the fsync cost of one outbox append on the same filesystem, the floor of each death.
//!
//! ```sh
//! cargo build --release -p vma-watchdog -p migratekit-standin
//! sudo cargo run --release -p vma-watchdog --example bench_link -- 200 [auto|ebpf|procfs]
//! ```

#[path = "../tests/fake_oma/mod.rs"]
mod fake_oma;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use api::{JobProcessState, ProcessEventKind, VmaJobStatus};
use fake_oma::{FakeOma, free_port};

const API_TOKEN: &str = "bench-api-token";
const OMA_TOKEN: &str = "bench-oma-token";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(200), |a| a.parse())?;
    let detector = args.next().unwrap_or_else(|| "auto".to_owned());
    let bin_dir = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .context("the example runs from target/<profile>/examples")?
        .to_owned();
    let (watchdog, standin) = (bin_dir.join("vma-watchdog"), bin_dir.join("migratekit"));
    if !watchdog.is_file() || !standin.is_file() {
        bail!(
            "build the binaries first: cargo build [--release] -p vma-watchdog -p migratekit-standin"
        );
    }
    let dir = tempfile::tempdir()?;
    let fsync = fsync_cost(dir.path(), 200)?;

    let oma = FakeOma::start("127.0.0.1:0".parse()?, OMA_TOKEN, "bench-vma").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(&watchdog)
        .args([
            "--log-format",
            "json",
            "--detector",
            &detector,
            "--listen",
            &listen,
        ])
        .args([
            "--api-token",
            API_TOKEN,
            "--oma-url",
            &oma.url(),
            "--oma-token",
            OMA_TOKEN,
        ])
        .args([
            "--vma-id",
            "bench-vma",
            "--launch-no-systemd",
            "--launch-program",
        ])
        .arg(&standin)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env(
            "MIGRATEKIT_STANDIN_PROGRESS_URL",
            format!("http://{listen}"),
        )
        .stderr(Stdio::piped())
        .spawn()
        .context("start vma-watchdog")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().context("watchdog stderr")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("\"detector_selected\"") || line.contains("\"api_listening\"") {
                let _ = tx.send(line);
            }
        }
    });
    let mut detector_line = String::new();
    for _ in 0..2 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("watchdog start")?;
        if line.contains("detector_selected") {
            detector_line = line;
        }
    }
    let http = reqwest::Client::new();
    let mut latencies = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let job = format!("bench-{i}");
        let r = http
            .post(format!("http://{listen}/api/v1/jobs/{job}/start"))
            .bearer_auth(API_TOKEN)
            .json(&serde_json::json!({}))
            .send()
            .await?;
        if r.status() != 201 {
            bail!("start {job}: {} {}", r.status(), r.text().await?);
        }
        let JobProcessState::Running { process, .. } = r.json::<VmaJobStatus>().await?.state else {
            bail!("{job} is not running after its start");
        };
        let killed = Instant::now();
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(process.pid as i32, libc::SIGKILL) };
        let (_, at) = oma
            .wait_for(Duration::from_secs(20), |e| {
                e.job_id == job && e.kind == ProcessEventKind::ProcessExited
            })
            .await
            .with_context(|| format!("the death of {job} never reached the OMA"))?;
        latencies.push(at - killed);
    }
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    oma.stop().await;

    let detector = serde_json::from_str::<serde_json::Value>(&detector_line)
        .ok()
        .and_then(|v| v["detector"].as_str().map(str::to_owned))
        .unwrap_or_default();
    println!(
        "kill -> OMA receipt over {rounds} kills ({detector} detector, one outbox fsync each):"
    );
    print_stats(&mut latencies);
    println!("outbox append (write + fdatasync) on the same filesystem, 200 appends:");
    print_stats(&mut fsync.clone());
    Ok(())
}

/// Times `n` appends to a fresh outbox: the one durable write each death costs.
fn fsync_cost(dir: &std::path::Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let outbox = vma_watchdog::outbox::Outbox::open(&dir.join("fsync"), Default::default())?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let event = api::ProcessEvent {
            event_id: uuid::Uuid::now_v7(),
            kind: ProcessEventKind::ProcessExited,
            job_id: format!("fsync-{i}"),
            process: api::ProcessIdentity {
                pid: 1,
                start_time: 1,
            },
            exit: None,
            observed_at: chrono::Utc::now(),
            detector: api::Detector::Procfs,
            last_progress: None,
        };
        let start = Instant::now();
        outbox.append(event)?;
        out.push(start.elapsed());
    }
    Ok(out)
}

fn print_stats(samples: &mut [Duration]) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(pick(0.50)),
        ms(pick(0.99)),
        ms(samples[samples.len() - 1])
    );
}
