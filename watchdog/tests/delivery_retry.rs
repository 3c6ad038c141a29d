//! A delivery waiting out a long back-off retries at once when the OMA calls the watchdog's
//! API with the token (its poller, recovery or a start): a restarted OMA or a healed link
//! gets the queued deaths within moments, not after up to `--oma-max-backoff-ms`.

mod fake_oma;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{Detector, ExitStatus, ProcessEvent, ProcessEventKind, ProcessIdentity};
use fake_oma::{FakeOma, free_port};
use vma_watchdog::http::BearerToken;
use vma_watchdog::outbox::{DeliveryConfig, Outbox, OutboxLimits, run_delivery};

const OMA_TOKEN: &str = "oma-token-for-this-vma";

fn death() -> ProcessEvent {
    ProcessEvent {
        event_id: uuid::Uuid::now_v7(),
        kind: ProcessEventKind::ProcessExited,
        job_id: "job-1".into(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_call_from_the_oma_ends_the_delivery_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let outbox =
        Arc::new(Outbox::open(&dir.path().join("outbox"), OutboxLimits::default()).unwrap());
    let event = death();
    outbox.append(event.clone()).unwrap();
    // Nothing listens on the OMA's port yet: the first attempt fails, and the next one waits
    // 15-30 s (half to all of the first back-off step).
    let port = free_port();
    let mut config = DeliveryConfig::new(
        format!("http://127.0.0.1:{port}"),
        "vma-1",
        BearerToken::new(OMA_TOKEN).unwrap(),
    );
    config.initial_backoff = Duration::from_secs(30);
    config.max_backoff = Duration::from_secs(60);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delivery = tokio::spawn(run_delivery(Arc::clone(&outbox), config, async move {
        let _ = stopped.await;
    }));
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
    let (mut state, jobs) = support::state(dir.path(), support::sleep_launcher());
    state.outbox = Some(Arc::clone(&outbox));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = support::serve_on(listener, state, jobs);
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
    let answer = client
        .get(api.url("/api/v1/jobs/job-1"))
        .bearer_auth(support::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    let (received, _) = oma
        .wait_for(Duration::from_secs(10), |e| e.event_id == event.event_id)
        .await
        .expect("the queued death reaches the OMA after its call, well within the back-off");
    assert_eq!(received, event);
    eprintln!("delivered {:?} after the OMA's call", asked.elapsed());
    // The acknowledgement is recorded right after the OMA's answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox.stats().queued != 0 {
        assert!(
            Instant::now() < deadline,
            "the acknowledgement was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let _ = stop.send(());
    delivery.await.unwrap();
    api.stop().await;
}
