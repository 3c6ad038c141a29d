//! Death-to-OMA latency through the outbox, one event at a time, against a minimal OMA on
//! 127.0.0.1:0 that acknowledges everything:
//! `cargo run -p vma-watchdog --release --example bench_outbox [N]`.
//!
//! Prints, per event: the append (write + fdatasync) alone, and append to receipt by the
//! OMA's handler. Asserts nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{
    Detector, EventBatch, EventBatchAck, ExitStatus, ProcessEvent, ProcessEventKind,
    ProcessIdentity,
};
use axum::Json;
use axum::extract::State;
use tokio::sync::mpsc;
use vma_watchdog::outbox::{DeliveryConfig, Outbox, OutboxLimits, deliver};
use vma_watchdog::secret::BearerToken;

async fn intake(
    State(tx): State<mpsc::UnboundedSender<Instant>>,
    Json(batch): Json<EventBatch>,
) -> Json<EventBatchAck> {
    for _ in &batch.events {
        let _ = tx.send(Instant::now());
    }
    Json(EventBatchAck {
        applied: batch.events.len() as u32,
        acknowledged: batch.events.iter().map(|e| e.event_id).collect(),
    })
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3
    };
    println!(
        "{name:<28} p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>6.2} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/api/v1/watchdog/events", axum::routing::post(intake))
        .with_state(tx);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = std::env::temp_dir().join(format!("bench-outbox-{}", std::process::id()));
    let outbox = Arc::new(Outbox::open(&dir, OutboxLimits::default()).unwrap());
    let config = DeliveryConfig::new(
        format!("http://{addr}"),
        "vma-bench",
        BearerToken::new("t").unwrap(),
    );
    tokio::spawn(deliver(Arc::clone(&outbox), config, std::future::pending()));
    let (mut appends, mut receipts) = (Vec::new(), Vec::new());
    for i in 0..n {
        let event = ProcessEvent {
            event_id: uuid::Uuid::now_v7(),
            kind: ProcessEventKind::ProcessExited,
            job_id: api::JobId::parse(&format!("job-{i}")).unwrap(),
            process: ProcessIdentity {
                pid: i as u32,
                start_time: 1,
            },
            exit: Some(ExitStatus::from_wait_status(9, false)),
            observed_at: chrono::Utc::now(),
            detector: Detector::Ebpf,
            last_progress: None,
        };
        let start = Instant::now();
        outbox.append_async(event).await.unwrap();
        appends.push(start.elapsed());
        let received = rx.recv().await.unwrap();
        receipts.push(received - start);
        // Let the acknowledgement land before the next death, as deaths are rare.
        while outbox.stats().queued > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    println!("{n} events, one at a time, outbox in {}", dir.display());
    summary("append (write + fdatasync)", appends);
    summary("append to OMA receipt", receipts);
    std::fs::remove_dir_all(&dir).unwrap();
}
