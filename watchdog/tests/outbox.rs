//! The durable outbox: on disk before `append` returns, delivered exactly once to a real
//! HTTP server on 127.0.0.1:0 across server outages and watchdog restarts.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{
    Detector, EventBatch, EventBatchAck, ExitStatus, ProcessEvent, ProcessEventKind,
    ProcessIdentity,
};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use uuid::Uuid;
use vma_watchdog::outbox::{DeliveryConfig, Outbox, OutboxError, OutboxLimits, deliver};
use vma_watchdog::secret::BearerToken;

const TOKEN: &str = "vma-token-42";

fn event(n: u32) -> ProcessEvent {
    ProcessEvent {
        event_id: Uuid::new_v4(),
        kind: ProcessEventKind::ProcessExited,
        job_id: api::JobId::parse(&format!("job-{n}")).unwrap(),
        process: ProcessIdentity {
            pid: 1000 + n,
            start_time: 5000 + u64::from(n),
        },
        exit: Some(ExitStatus::from_wait_status(9, false)),
        observed_at: chrono::Utc::now(),
        detector: Detector::Ebpf,
        last_progress: None,
    }
}

fn ids(events: &[ProcessEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

#[test]
fn events_survive_a_drop_and_reopen_and_acks_stick() {
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<ProcessEvent> = (0..3).map(event).collect();
    let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
    for e in &events {
        outbox.append(e.clone()).unwrap();
    }
    drop(outbox);
    let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
    assert_eq!(outbox.peek(10), events);
    assert_eq!(
        outbox
            .acknowledge(&[events[1].event_id, Uuid::new_v4()])
            .unwrap(),
        1
    );
    drop(outbox);
    let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
    assert_eq!(
        ids(&outbox.peek(10)),
        vec![events[0].event_id, events[2].event_id]
    );
    assert_eq!(outbox.stats().queued, 2);
}

#[test]
fn a_torn_last_line_is_skipped_and_later_appends_are_intact() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
    let first = event(1);
    outbox.append(first.clone()).unwrap();
    drop(outbox);
    // A crash in the middle of an append leaves half a line without its newline.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("events.jsonl"))
        .unwrap();
    file.write_all(br#"{"appended_at":"2026-01-01T00:00:00Z","event":{"event_id":"#)
        .unwrap();
    drop(file);
    let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
    assert_eq!(outbox.peek(10), vec![first.clone()]);
    let second = event(2);
    outbox.append(second.clone()).unwrap();
    drop(outbox);
    let outbox = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
    assert_eq!(outbox.peek(10), vec![first, second]);
}

#[test]
fn a_full_outbox_refuses_new_events_with_a_clear_error_and_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let limits = OutboxLimits {
        max_events: 3,
        max_bytes: 1 << 20,
    };
    let outbox = Outbox::open(dir.path(), limits).unwrap();
    let kept: Vec<ProcessEvent> = (0..3).map(event).collect();
    for e in &kept {
        outbox.append(e.clone()).unwrap();
    }
    let err = outbox.append(event(9)).unwrap_err();
    assert!(
        matches!(
            err,
            OutboxError::Full {
                queued: 3,
                max_events: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("outbox full (3/3 events"),
        "{err}"
    );
    let stats = outbox.stats();
    assert_eq!((stats.queued, stats.refused), (3, 1));
    assert_eq!(outbox.peek(10), kept);
    // Once something is acknowledged there is room again.
    outbox.acknowledge(&[kept[0].event_id]).unwrap();
    outbox.append(event(10)).unwrap();

    let small = tempfile::tempdir().unwrap();
    let by_bytes = Outbox::open(
        small.path(),
        OutboxLimits {
            max_events: 100,
            max_bytes: 600,
        },
    )
    .unwrap();
    by_bytes.append(event(1)).unwrap();
    let err = (0..10)
        .find_map(|n| by_bytes.append(event(n)).err())
        .expect("the byte bound");
    assert!(
        matches!(err, OutboxError::Full { max_bytes: 600, .. }),
        "{err:?}"
    );
    assert!(by_bytes.stats().queued_bytes <= 600);
}

/// A tiny OMA: records every event id it receives and acknowledges per `policy`.
#[derive(Clone, Default)]
struct Oma {
    received: Arc<Mutex<Vec<Uuid>>>,
    acked: Arc<Mutex<HashMap<Uuid, u32>>>,
    /// Acknowledge only the first event of each batch (to exercise partial acks).
    first_only: bool,
}

async fn intake(
    State(oma): State<Oma>,
    headers: HeaderMap,
    Json(batch): Json<EventBatch>,
) -> Result<Json<EventBatchAck>, StatusCode> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) || batch.vma_id != "vma-1" {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let mut ids = ids(&batch.events);
    oma.received.lock().unwrap().extend(&ids);
    if oma.first_only {
        ids.truncate(1);
    }
    let mut acked = oma.acked.lock().unwrap();
    for id in &ids {
        *acked.entry(*id).or_default() += 1;
    }
    Ok(Json(EventBatchAck {
        applied: ids.len() as u32,
        acknowledged: ids,
    }))
}

/// Serves the tiny OMA on `addr` until the returned sender is dropped or fired.
async fn serve_oma(
    addr: SocketAddr,
    oma: Oma,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/api/v1/watchdog/events", axum::routing::post(intake))
        .with_state(oma);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (addr, stop, task)
}

fn config(addr: SocketAddr) -> DeliveryConfig {
    let mut config = DeliveryConfig::new(
        format!("http://{addr}"),
        "vma-1",
        BearerToken::new(TOKEN).unwrap(),
    );
    config.batch_size = 4;
    config.initial_backoff = Duration::from_millis(20);
    config.max_backoff = Duration::from_millis(200);
    config.request_timeout = Duration::from_secs(30);
    config
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start_delivery(
    outbox: &Arc<Outbox>,
    addr: SocketAddr,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(deliver(Arc::clone(outbox), config(addr), async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

#[tokio::test]
async fn delivery_survives_oma_outage_and_watchdog_restart_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let oma = Oma::default();
    let (addr, oma_stop, oma_task) = serve_oma("127.0.0.1:0".parse().unwrap(), oma.clone()).await;
    let outbox = Arc::new(Outbox::open(dir.path(), OutboxLimits::default()).unwrap());
    let (delivery_stop, delivery_task) = start_delivery(&outbox, addr);
    let mut sent = Vec::new();
    for n in 0..6 {
        let e = event(n);
        sent.push(e.event_id);
        outbox.append(e).unwrap();
    }
    wait_for("the first events to be delivered", || {
        outbox.stats().queued == 0
    })
    .await;
    assert_eq!(outbox.stats().delivered, 6);

    // The OMA goes down; three deaths happen meanwhile.
    oma_stop.send(()).unwrap();
    oma_task.await.unwrap();
    for n in 6..9 {
        let e = event(n);
        sent.push(e.event_id);
        outbox.append_async(e).await.unwrap();
    }
    wait_for("failed attempts while the OMA is down", || {
        outbox.stats().failed_attempts >= 3
    })
    .await;
    assert_eq!(outbox.stats().queued, 3);

    // The watchdog restarts (delivery stopped, outbox reopened from disk) while the OMA is down.
    delivery_stop.send(()).unwrap();
    delivery_task.await.unwrap();
    drop(outbox);
    let outbox = Arc::new(Outbox::open(dir.path(), OutboxLimits::default()).unwrap());
    assert_eq!(outbox.stats().queued, 3);
    let (delivery_stop, delivery_task) = start_delivery(&outbox, addr);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The OMA comes back on the same address.
    let (_, oma_stop, oma_task) = serve_oma(addr, oma.clone()).await;
    wait_for("the backlog to be delivered", || outbox.stats().queued == 0).await;
    delivery_stop.send(()).unwrap();
    delivery_task.await.unwrap();
    oma_stop.send(()).unwrap();
    oma_task.await.unwrap();

    let received = oma.received.lock().unwrap().clone();
    let acked = oma.acked.lock().unwrap().clone();
    assert_eq!(received, sent, "each event received once, in order");
    assert!(
        sent.iter().all(|id| acked.get(id) == Some(&1)),
        "each event acknowledged exactly once"
    );
    drop(outbox);
    let reopened = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
    assert_eq!(
        reopened.stats().queued,
        0,
        "acknowledged events stay gone after a restart"
    );
}

#[tokio::test]
async fn only_acknowledged_ids_are_removed_and_the_rest_is_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let oma = Oma {
        first_only: true,
        ..Oma::default()
    };
    let (addr, oma_stop, oma_task) = serve_oma("127.0.0.1:0".parse().unwrap(), oma.clone()).await;
    let outbox = Arc::new(Outbox::open(dir.path(), OutboxLimits::default()).unwrap());
    let sent: Vec<Uuid> = (0..5)
        .map(|n| {
            let e = event(n);
            let id = e.event_id;
            outbox.append(e).unwrap();
            id
        })
        .collect();
    let (delivery_stop, delivery_task) = start_delivery(&outbox, addr);
    wait_for("every event to be acknowledged", || {
        outbox.stats().queued == 0
    })
    .await;
    delivery_stop.send(()).unwrap();
    delivery_task.await.unwrap();
    oma_stop.send(()).unwrap();
    oma_task.await.unwrap();
    let acked = oma.acked.lock().unwrap().clone();
    assert!(sent.iter().all(|id| acked.get(id) == Some(&1)), "{acked:?}");
    // Event 0 went out once; the others were sent again until acknowledged.
    let received = oma.received.lock().unwrap().clone();
    assert_eq!(received.iter().filter(|id| **id == sent[0]).count(), 1);
    assert_eq!(received.iter().filter(|id| **id == sent[4]).count(), 4);
}

/// Runs `f` with a subscriber that writes log lines into a string, and returns them.
fn capture_logs(f: impl FnOnce()) -> String {
    let buffer = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = Arc::clone(&buffer);
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || SharedWriter(Arc::clone(&sink)))
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8(buffer.lock().unwrap().clone()).unwrap()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn filling_full_and_torn_states_each_leave_a_clear_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let limits = OutboxLimits {
        max_events: 10,
        max_bytes: 1 << 20,
    };
    let below = capture_logs(|| {
        let outbox = Outbox::open(dir.path(), limits).unwrap();
        (0..7).for_each(|n| outbox.append(event(n)).unwrap());
    });
    assert!(!below.contains("80%"), "{below}");
    let logs = capture_logs(|| {
        let outbox = Outbox::open(dir.path(), limits).unwrap();
        (7..10).for_each(|n| outbox.append(event(n)).unwrap());
        assert!(outbox.append(event(10)).is_err());
    });
    assert_eq!(logs.matches("outbox over 80% full").count(), 1, "{logs}");
    assert!(logs.contains("WARN"), "{logs}");
    assert!(
        logs.contains("ERROR") && logs.contains("outbox full: refusing a new event"),
        "{logs}"
    );

    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("events.jsonl"))
        .unwrap();
    file.write_all(b"{\"appended_at\":").unwrap();
    let logs = capture_logs(|| {
        let outbox = Outbox::open(dir.path(), limits).unwrap();
        assert_eq!(outbox.stats().queued, 10);
    });
    assert!(
        logs.contains("skipped a torn last line in the outbox"),
        "{logs}"
    );
}
