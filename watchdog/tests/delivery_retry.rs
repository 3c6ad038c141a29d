//! A delivery waiting out a long back-off, or hung on a connection that died in an outage,
//! retries at once when the OMA calls the watchdog's API with the token (its poller, recovery
//! or a start): a restarted OMA or a healed link gets the queued deaths within moments, not
//! after up to `--oma-max-backoff-ms` or the request timeout.

mod fake_oma;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{Detector, ExitStatus, ProcessEvent, ProcessEventKind, ProcessIdentity};
use fake_oma::{FakeOma, free_port};
use vma_watchdog::outbox::{DeliveryConfig, Outbox, OutboxLimits, deliver};
use vma_watchdog::secret::BearerToken;

const OMA_TOKEN: &str = "oma-token-for-this-vma";

fn death() -> ProcessEvent {
    ProcessEvent {
        event_id: uuid::Uuid::now_v7(),
        kind: ProcessEventKind::ProcessExited,
        job_id: api::JobId::parse("job-1").unwrap(),
        process: ProcessIdentity {
            pid: 4321,
            start_time: 99,
        },
        exit: Some(ExitStatus::from_wait_status(9, false)),
        observed_at: chrono::Utc::now(),
        detector: Detector::Ebpf,
        last_progress: None,
    }
}

/// An outbox in `dir` holding one death, and its delivery to `oma_url` running with
/// `tune` applied to the configuration; stop it with the sender.
fn delivering(
    dir: &std::path::Path,
    oma_url: String,
    tune: impl FnOnce(&mut DeliveryConfig),
) -> (
    Arc<Outbox>,
    ProcessEvent,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let outbox = Arc::new(Outbox::open(&dir.join("outbox"), OutboxLimits::default()).unwrap());
    let event = death();
    outbox.append(event.clone()).unwrap();
    let mut config = DeliveryConfig::new(oma_url, "vma-1", BearerToken::new(OMA_TOKEN).unwrap());
    tune(&mut config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delivery = tokio::spawn(deliver(Arc::clone(&outbox), config, async move {
        let _ = stopped.await;
    }));
    (outbox, event, stop, delivery)
}

/// Waits up to 10 s for the outbox to be empty; panics with `why` otherwise.
async fn drained(outbox: &Outbox, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox.stats().queued != 0 {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The API, a real server, with `outbox`.
fn api_with(
    dir: &std::path::Path,
    outbox: &Arc<Outbox>,
    listener: tokio::net::TcpListener,
) -> support::Server {
    let (mut state, jobs) = support::state(dir, support::sleep_launcher());
    state.outbox = Some(Arc::clone(outbox));
    support::serve_on(listener, state, jobs)
}

/// What the OMA's poller does: an authenticated GET of a job.
async fn oma_polls(api: &support::Server) {
    let answer = reqwest::Client::new()
        .get(api.url("/api/v1/jobs/job-1"))
        .bearer_auth(support::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
}

/// Answers `POST /api/v1/watchdog/events` by hand on `listener`: the first connection gets
/// no answer at all (a connection lost in an outage), later ones acknowledge every id.
/// Returns the ids acknowledged.
async fn hanging_then_answering_oma(
    listener: tokio::net::TcpListener,
) -> Arc<std::sync::Mutex<Vec<uuid::Uuid>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&acked);
    tokio::spawn(async move {
        let mut hung = Vec::new();
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            if hung.is_empty() {
                // Kept open and never answered.
                hung.push(conn);
                continue;
            }
            let mut request = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let n = conn.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                let Some(end) = text.find("\r\n\r\n") else {
                    continue;
                };
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if request.len() >= end + 4 + length {
                    break request[end + 4..end + 4 + length].to_vec();
                }
            };
            let batch: api::EventBatch = serde_json::from_slice(&body).unwrap();
            let ids: Vec<uuid::Uuid> = batch.events.iter().map(|e| e.event_id).collect();
            seen.lock().unwrap().extend(&ids);
            let ack = serde_json::to_vec(&api::EventBatchAck {
                applied: ids.len() as u32,
                acknowledged: ids,
            })
            .unwrap();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                ack.len()
            );
            conn.write_all(head.as_bytes()).await.unwrap();
            conn.write_all(&ack).await.unwrap();
        }
    });
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_from_the_oma_abandons_a_hung_delivery_for_a_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let oma = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", oma.local_addr().unwrap());
    let acked = hanging_then_answering_oma(oma).await;
    let (outbox, event, stop, delivery) = delivering(dir.path(), url, |c| {
        c.request_timeout = Duration::from_secs(60);
    });
    let api = api_with(
        dir.path(),
        &outbox,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    // The first attempt hangs on its connection; the OMA's call after the gap ends it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(acked.lock().unwrap().is_empty());
    let asked = Instant::now();
    oma_polls(&api).await;
    drained(
        &outbox,
        "the hung delivery was not abandoned for a new connection",
    )
    .await;
    eprintln!("delivered {:?} after the OMA's call", asked.elapsed());
    assert_eq!(*acked.lock().unwrap(), [event.event_id]);
    let _ = stop.send(());
    delivery.await.unwrap();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_call_from_the_oma_ends_the_delivery_back_off() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the OMA's port yet: the first attempt fails, and the next one waits
    // 15-30 s (half to all of the first back-off step).
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (outbox, event, stop, delivery) = delivering(dir.path(), url, |c| {
        c.initial_backoff = Duration::from_secs(30);
        c.max_backoff = Duration::from_secs(60);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox.stats().failed_attempts == 0 {
        assert!(Instant::now() < deadline, "the first delivery never failed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let oma = FakeOma::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        OMA_TOKEN,
        "vma-1",
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = api_with(dir.path(), &outbox, listener);
    let client = reqwest::Client::new();
    // A call without the token says nothing about the OMA: the back-off goes on.
    let anonymous = client.get(api.url("/api/v1/jobs")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        oma.received().is_empty(),
        "retried on an unauthenticated call"
    );

    // The OMA's poller asks for a job: the delivery retries now, not in 15-30 s.
    let asked = Instant::now();
    oma_polls(&api).await;
    let (received, _) = oma
        .wait_for(Duration::from_secs(10), |e| e.event_id == event.event_id)
        .await
        .expect("the queued death reaches the OMA after its call, well within the back-off");
    assert_eq!(received, event);
    eprintln!("delivered {:?} after the OMA's call", asked.elapsed());
    // The acknowledgement is recorded right after the OMA's answer.
    drained(&outbox, "the acknowledgement was never recorded").await;

    let _ = stop.send(());
    delivery.await.unwrap();
    api.stop().await;
}
