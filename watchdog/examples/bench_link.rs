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

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
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

    // The fake OMA commits each batch with one fdatasync on the same disk, as the real one
    // does, so the watchdog's own fsyncs around a death compete with it as they do in use.
    let oma = FakeOma::start_durable(
        "127.0.0.1:0".parse()?,
        OMA_TOKEN,
        "bench-vma",
        &dir.path().join("oma-commits"),
    )
    .await;
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
        .env("RUST_LOG", "info,vma_watchdog::latency=debug")
        .env(
            "MIGRATEKIT_STANDIN_PROGRESS_URL",
            format!("http://{listen}"),
        )
        .stderr(Stdio::piped())
        .spawn()
        .context("start vma-watchdog")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().context("watchdog stderr")?;
    let timings = Timings::default();
    let seen = timings.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("\"detector_selected\"") || line.contains("\"api_listening\"") {
                let _ = tx.send(line);
            } else if line.contains("_timing\"") {
                seen.add(&line);
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
    let mut commits = Vec::with_capacity(rounds);
    let mut kills = Vec::with_capacity(rounds);
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
        let killed_us = vma_watchdog::clock::monotonic_us();
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(process.pid as i32, libc::SIGKILL) };
        let (event, at) = oma
            .wait_for(Duration::from_secs(20), |e| {
                e.job_id.as_str() == job && e.kind == ProcessEventKind::ProcessExited
            })
            .await
            .with_context(|| format!("the death of {job} never reached the OMA"))?;
        latencies.push(at - killed);
        let committed = loop {
            match oma.committed_at(event.event_id) {
                Some(c) => break c,
                None => tokio::time::sleep(Duration::from_micros(200)).await,
            }
        };
        commits.push(committed - killed);
        let received_us = killed_us + (at - killed).as_micros() as u64;
        kills.push((
            event.event_id.to_string(),
            process.pid,
            killed_us,
            received_us,
        ));
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
    println!("kill -> OMA commit (the fake OMA's fdatasync of the batch):");
    print_stats(&mut commits);
    println!("outbox append (write + fdatasync) on the same filesystem, 200 appends:");
    print_stats(&mut fsync.clone());
    // Give the last timing lines time to arrive from the pipe.
    std::thread::sleep(Duration::from_millis(200));
    timings.print_split(&kills);
    Ok(())
}

/// The watchdog's `death_timing` and `delivery_timing` lines by event id, and its
/// `receive_timing` lines by pid (monotonic microseconds), to split each kill's latency into
/// its steps.
#[derive(Clone, Default)]
struct Timings(Arc<Mutex<HashMap<String, serde_json::Value>>>);

impl Timings {
    fn add(&self, line: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return;
        };
        let key = match v["event"].as_str() {
            Some("death_timing") => v["event_id"].as_str().map(|id| format!("death {id}")),
            Some("receive_timing") => v["pid"].as_u64().map(|pid| format!("receive {pid}")),
            Some("delivery_timing") => v["first_event_id"]
                .as_str()
                .map(|id| format!("delivery {id}")),
            _ => None,
        };
        if let Some(key) = key {
            self.0.lock().unwrap().insert(key, v);
        }
    }

    /// Prints p50/p99 of each step: kill to the daemon's report (detection and wake-up),
    /// the registry's record in memory, the outbox append (fsync), the append to the
    /// delivery's POST (wake-up), the POST to the OMA's receipt, and the POST to the recorded
    /// ack (which writes the registry's file first).
    fn print_split(&self, kills: &[(String, u32, u64, u64)]) {
        let map = self.0.lock().unwrap();
        let mut steps: Vec<(&str, Vec<Duration>)> = [
            "kill -> report starts (detection)",
            "report -> registry recorded (memory)",
            "registry -> outbox append returns (fsync)",
            "append -> delivery POST starts (wake-up)",
            "POST -> OMA receipt",
            "POST -> ack recorded (registry + ack fsyncs)",
        ]
        .into_iter()
        .map(|name| (name, Vec::new()))
        .collect();
        let mut reporters: HashMap<String, usize> = HashMap::new();
        let us = |v: &serde_json::Value, k: &str| v[k].as_u64();
        let gap = |a: u64, b: u64| Duration::from_micros(b.saturating_sub(a));
        for (id, pid, killed, received) in kills {
            let (Some(d), Some(p), Some(rc)) = (
                map.get(&format!("death {id}")),
                map.get(&format!("delivery {id}")),
                map.get(&format!("receive {pid}")),
            ) else {
                continue;
            };
            let thread = d["thread"].as_str().unwrap_or("?");
            let who = if thread.starts_with("reap-") {
                "launcher reaper"
            } else {
                "detector"
            };
            *reporters.entry(who.to_owned()).or_default() += 1;
            let (Some(r), Some(a), Some(g), Some(post), Some(ack)) = (
                us(rc, "received_us"),
                us(d, "appended_us"),
                us(d, "registry_us"),
                us(p, "post_us"),
                us(p, "acked_us"),
            ) else {
                continue;
            };
            for (i, (from, to)) in [
                (*killed, r),
                (r, g),
                (g, a),
                (a, post),
                (post, *received),
                (post, ack),
            ]
            .into_iter()
            .enumerate()
            {
                steps[i].1.push(gap(from, to));
            }
        }
        println!(
            "split per kill ({} with timing lines; reported by {reporters:?}):",
            steps[0].1.len()
        );
        for (name, mut samples) in steps {
            if samples.is_empty() {
                continue;
            }
            print!("{name:<48}");
            print_stats(&mut samples);
        }
    }
}

/// Times `n` appends to a fresh outbox: the one durable write each death costs.
fn fsync_cost(dir: &std::path::Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let outbox = vma_watchdog::outbox::Outbox::open(&dir.join("fsync"), Default::default())?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let event = api::ProcessEvent {
            event_id: uuid::Uuid::now_v7(),
            kind: ProcessEventKind::ProcessExited,
            job_id: api::JobId::parse(&format!("fsync-{i}")).unwrap(),
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
