//! Several `--oma-url`s (several OMAs on one database): the real delivery task delivers to the
//! first OMA that answers, moves on when one is down (connection refused) or failing (5xx),
//! and stays with the one that works.

mod fake_oma;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api::{Detector, ExitStatus, ProcessEvent, ProcessEventKind, ProcessIdentity};
use fake_oma::{FakeOma, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vma_watchdog::outbox::{DeliveryConfig, Outbox, OutboxLimits, deliver};
use vma_watchdog::secret::BearerToken;

const OMA_TOKEN: &str = "oma-token-for-this-vma";

fn death(job: &str) -> ProcessEvent {
    ProcessEvent {
        event_id: uuid::Uuid::now_v7(),
        kind: ProcessEventKind::ProcessExited,
        job_id: api::JobId::parse(job).unwrap(),
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

/// An HTTP server that answers every request 503, counting them.
async fn failing_oma() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if buf[..n].windows(4).any(|w| w == b"POST") {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let answer =
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                        if conn.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, count)
}

async fn drained(outbox: &Outbox) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox.stats().queued != 0 {
        assert!(Instant::now() < deadline, "the outbox was not delivered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn deaths_go_past_a_down_and_a_failing_oma_and_stay_with_the_one_that_answers() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", free_port());
    let (failing, failing_posts) = failing_oma().await;
    let good = FakeOma::start(([127, 0, 0, 1], 0).into(), OMA_TOKEN, "vma-1").await;
    let spare = FakeOma::start(([127, 0, 0, 1], 0).into(), OMA_TOKEN, "vma-1").await;
    let outbox =
        Arc::new(Outbox::open(&dir.path().join("outbox"), OutboxLimits::default()).unwrap());
    let first = death("job-1");
    outbox.append(first.clone()).unwrap();
    let urls = [down, failing, good.url(), spare.url()].join(",");
    let config = DeliveryConfig::new(urls, "vma-1", BearerToken::new(OMA_TOKEN).unwrap());
    let metrics = Arc::clone(&config.metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delivery = tokio::spawn(deliver(Arc::clone(&outbox), config, async move {
        let _ = stopped.await;
    }));
    drained(&outbox).await;
    assert_eq!(
        good.events_of("job-1").len(),
        1,
        "the third URL got the death"
    );
    assert_eq!(
        failing_posts.load(Ordering::SeqCst),
        1,
        "the failing OMA was tried once"
    );

    // The next death goes straight to the OMA that answered.
    let second = death("job-2");
    outbox.append(second.clone()).unwrap();
    drained(&outbox).await;
    assert_eq!(good.events_of("job-2").len(), 1);
    assert_eq!(failing_posts.load(Ordering::SeqCst), 1, "not tried again");
    assert!(spare.received().is_empty(), "the fourth was never needed");
    let page = metrics_page(&metrics);
    assert!(
        page.contains("vma_watchdog_delivery_failovers_total 2"),
        "two moves counted:\n{page}"
    );
    let _ = stop.send(());
    delivery.await.unwrap();
}

fn metrics_page(metrics: &vma_watchdog::metrics::Metrics) -> String {
    let mut page = String::new();
    prometheus_client::encoding::text::encode(&mut page, metrics.registry()).unwrap();
    page
}

#[test]
fn several_oma_urls_are_kept_in_order_from_flags_and_lists() {
    use clap::Parser;
    use vma_watchdog::config::{Cli, Config};
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "vma-watchdog",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--oma-url",
        "http://oma-1:8082/",
        "--oma-url",
        "http://oma-2:8082,http://oma-3:8082",
        "--oma-token",
        "oma-secret",
    ];
    let config = Config::load(Cli::try_parse_from(args).unwrap()).unwrap();
    assert_eq!(
        config.oma.unwrap().url,
        "http://oma-1:8082,http://oma-2:8082,http://oma-3:8082"
    );
    let bad = [
        "vma-watchdog",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--oma-url",
        "http://oma-1:8082,oma-2:8082",
        "--oma-token",
        "oma-secret",
    ];
    let err = Config::load(Cli::try_parse_from(bad).unwrap()).unwrap_err();
    assert!(err.to_string().contains("oma-2:8082"), "{err}");
}
