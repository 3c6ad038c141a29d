//! The poller on the progress feed, against a loopback VMA that answers
//! `GET /api/v1/progress?since=&epoch=` (and the per-job route): progress lands in the
//! database with its audit entries, one request per VMA and interval, `more` followed, the
//! cursor kept, a new epoch answered from the beginning, stalls of jobs the feed leaves out
//! flagged; a VMA without the feed (404) is polled job by job; `--poll-protocol per-job` too.

mod common;

use api::{JobId, ProgressFeed, ProgressFeedQuery, ProgressUpdate, StoredProgress};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::vma::StandInVma;
use common::{VMA1_TOKEN, eventually, settings, start_server, test_dbs};
use oma::auth::hash_token;
use oma::model::JobStatus;
use oma::poller::PollProtocol;
use oma::store::{NewJob, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A VMA's watchdog reduced to its two progress routes, with its change feed.
#[derive(Default)]
struct FeedInner {
    epoch: uuid::Uuid,
    head: u64,
    /// Job -> (its latest change, its progress).
    jobs: HashMap<String, (u64, StoredProgress)>,
    queries: Vec<ProgressFeedQuery>,
    per_job_calls: u64,
}

#[derive(Clone)]
struct FeedVma {
    url: String,
    inner: Arc<Mutex<FeedInner>>,
}

/// Jobs per answer: small, so that the poller must follow `more`.
const CAP: usize = 2;

impl FeedVma {
    async fn start() -> Self {
        let inner = Arc::new(Mutex::new(FeedInner {
            epoch: uuid::Uuid::new_v4(),
            ..FeedInner::default()
        }));
        let router = Router::new()
            .route("/api/v1/progress", get(feed))
            .route("/api/v1/progress/{id}", get(one))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, inner }
    }

    fn set(&self, job: &str, sequence: u64, bytes: u64) {
        let update: ProgressUpdate = serde_json::from_value(serde_json::json!({
            "stage": "Transfer", "bytes_transferred": bytes, "total_bytes": 10_000,
            "throughput_bps": 10
        }))
        .unwrap();
        let stored = StoredProgress {
            job_id: JobId::parse(job).unwrap(),
            update,
            received_at: chrono::Utc::now(),
            sequence,
        };
        let mut inner = self.inner.lock().unwrap();
        inner.head += 1;
        let head = inner.head;
        inner.jobs.insert(job.into(), (head, stored));
    }

    /// A restarted watchdog: a new epoch, changes numbered from 1 again.
    fn restart(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.epoch = uuid::Uuid::new_v4();
        inner.head = 0;
        inner.jobs.clear();
    }

    fn queries(&self) -> Vec<ProgressFeedQuery> {
        self.inner.lock().unwrap().queries.clone()
    }

    fn per_job_calls(&self) -> u64 {
        self.inner.lock().unwrap().per_job_calls
    }
}

async fn feed(
    State(inner): State<Arc<Mutex<FeedInner>>>,
    Query(query): Query<ProgressFeedQuery>,
) -> Response {
    let mut inner = inner.lock().unwrap();
    inner.queries.push(query.clone());
    let since = match (query.since, query.epoch) {
        (Some(since), Some(epoch)) if epoch == inner.epoch && since <= inner.head => since,
        _ => 0,
    };
    let mut changed: Vec<&(u64, StoredProgress)> =
        inner.jobs.values().filter(|(c, _)| *c > since).collect();
    changed.sort_by_key(|(c, _)| *c);
    let more = changed.len() > CAP;
    changed.truncate(CAP);
    let cursor = if more {
        changed.last().map_or(since, |(c, _)| *c)
    } else {
        inner.head
    };
    let jobs = changed.into_iter().map(|(_, p)| p.clone()).collect();
    axum::Json(ProgressFeed {
        epoch: inner.epoch,
        cursor,
        more,
        jobs,
    })
    .into_response()
}

async fn one(State(inner): State<Arc<Mutex<FeedInner>>>, Path(id): Path<String>) -> Response {
    let mut inner = inner.lock().unwrap();
    inner.per_job_calls += 1;
    match inner.jobs.get(&id) {
        Some((_, p)) => axum::Json(p.clone()).into_response(),
        None => reqwest::StatusCode::NOT_FOUND.into_response(),
    }
}

async fn create(store: &Store, id: &str) {
    let new = NewJob {
        id: Some(id.into()),
        vm_context_id: format!("ctx-{id}"),
        vm_name: Some("vm".into()),
        vma_id: "vma-1".into(),
        sync_type: None,
    };
    store.create_job(&new).await.unwrap();
}

async fn register(store: &Store, url: &str) {
    store
        .upsert_vma("vma-1", url, &hash_token(VMA1_TOKEN))
        .await
        .unwrap();
}

async fn bytes_are(store: &Store, id: &str, want: i64) -> Option<()> {
    (store.get_job(id).await.unwrap().job.bytes_transferred == want).then_some(())
}

async fn actions(store: &Store, id: &str) -> Vec<String> {
    let audit = store.audit(id).await.unwrap();
    audit.into_iter().map(|e| e.action).collect()
}

fn metric(store: &Store, series: &str) -> f64 {
    let mut page = String::new();
    prometheus_client::encoding::text::encode(&mut page, store.metrics().registry()).unwrap();
    test_support::metrics::value(&page, series).unwrap_or(0.0)
}

/// An OMA on `db` that flags a job stalled after 400 ms unmoved, polling a feed VMA
/// registered as `vma-1`.
async fn stalls_after_400ms(db: &common::TestDb) -> (FeedVma, oma::server::RunningServer, Store) {
    let mut s = settings(db);
    s.poller.stall_threshold = Duration::from_millis(400);
    let vma = FeedVma::start().await;
    let server = start_server(s).await;
    let store = server.state.store.clone();
    register(&store, &vma.url).await;
    (vma, server, store)
}

#[tokio::test]
async fn feed_progress_lands_with_its_audit_and_unmoved_jobs_are_flagged_stalled() {
    for db in test_dbs().await {
        let (vma, server, store) = stalls_after_400ms(&db).await;
        let jobs: Vec<String> = (0..5).map(|n| format!("feed-{n}")).collect();
        for (n, job) in jobs.iter().enumerate() {
            create(&store, job).await;
            vma.set(job, 1, 100 * (n as u64 + 1));
        }
        for (n, job) in jobs.iter().enumerate() {
            let want = 100 * (n as i64 + 1);
            eventually(10, "feed progress", || bytes_are(&store, job, want)).await;
            let rec = store.get_job(job).await.unwrap();
            assert_eq!(rec.job.status, JobStatus::Replicating, "{}", db.backend);
            assert_eq!(rec.progress_sequence, Some(1));
            assert_eq!(actions(&store, job).await, ["created", "transition"]);
        }
        // One request per answer, never one per job; `more` was followed with the cursor.
        assert_eq!(vma.per_job_calls(), 0);
        let queries = vma.queries();
        assert!(
            queries
                .iter()
                .any(|q| q.since.unwrap_or(0) > 0 && q.epoch.is_some())
        );
        // feed-0 keeps moving, feed-1 does not: only feed-1 is flagged, by the sweep.
        for seq in 2..8 {
            vma.set("feed-0", seq, 1000 + seq);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stalled = |id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .get_job(id)
                    .await
                    .unwrap()
                    .job
                    .stalled_since
                    .map(|_| ())
            }
        };
        eventually(10, "stall flag of an unmoved job", || stalled("feed-1")).await;
        assert!(
            actions(&store, "feed-1")
                .await
                .contains(&"stalled".to_owned())
        );
        assert!(
            store
                .get_job("feed-0")
                .await
                .unwrap()
                .job
                .stalled_since
                .is_none()
        );
        // It moves again: unflagged, through the feed.
        vma.set("feed-1", 2, 5000);
        eventually(10, "stall cleared", || async {
            let job = store.get_job("feed-1").await.unwrap().job;
            (job.bytes_transferred == 5000 && job.stalled_since.is_none()).then_some(())
        })
        .await;
        // A restarted watchdog numbers its changes from 1 again (its jobs' sequences go on,
        // from its disk): the stale cursor is answered from the beginning.
        vma.restart();
        vma.set("feed-2", 2, 7);
        eventually(10, "progress after a new epoch", || {
            bytes_are(&store, "feed-2", 7)
        })
        .await;
        assert!(metric(&store, "oma_poll_requests_total{protocol=\"feed\"}") > 0.0);
        // Every commit of the feed and of the stall sweep went through the lane.
        assert!(metric(&store, "oma_background_write_wait_seconds_count") >= 4.0);
        assert_eq!(
            metric(&store, "oma_poll_requests_total{protocol=\"per_job\"}"),
            0.0
        );
        let health = server.state.poller.health();
        assert!(
            health.polls_ok > 0 && health.jobs_tracked == 5,
            "{health:?}"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_vma_without_the_feed_is_polled_job_by_job_and_counted() {
    let db = common::sqlite_db();
    let vma = StandInVma::start().await;
    let server = start_server(settings(&db)).await;
    let store = server.state.store.clone();
    register(&store, &vma.url).await;
    create(&store, "old-1").await;
    vma.set_progress("old-1", 1, 321, None);
    eventually(10, "per-job progress", || bytes_are(&store, "old-1", 321)).await;
    assert_eq!(actions(&store, "old-1").await, ["created", "transition"]);
    assert!(vma.progress_calls("old-1") > 0);
    assert_eq!(metric(&store, "oma_poll_feed_fallbacks_total"), 1.0);
    // Remembered: the VMA is not asked for the feed again before the re-probe.
    let calls = vma.progress_calls("old-1");
    eventually(10, "more per-job polls", || async {
        (vma.progress_calls("old-1") >= calls + 3).then_some(())
    })
    .await;
    assert_eq!(metric(&store, "oma_poll_feed_fallbacks_total"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn the_per_job_protocol_never_asks_the_feed() {
    let db = common::sqlite_db();
    let mut s = settings(&db);
    s.poll_protocol = PollProtocol::PerJob;
    let vma = FeedVma::start().await;
    let server = start_server(s).await;
    let store = server.state.store.clone();
    register(&store, &vma.url).await;
    for job in ["pj-1", "pj-2"] {
        create(&store, job).await;
        vma.set(job, 1, 64);
    }
    for job in ["pj-1", "pj-2"] {
        eventually(10, "per-job progress", || bytes_are(&store, job, 64)).await;
    }
    assert!(vma.per_job_calls() >= 2);
    assert!(vma.queries().is_empty(), "the feed was asked");
    assert_eq!(metric(&store, "oma_poll_feed_fallbacks_total"), 0.0);
    server.shutdown().await;
}

/// More unmoved jobs than one transaction of the stall sweep takes (200): every one of them
/// is flagged, none left out between the chunks (each a transaction of its own in the
/// poller's lane, so that deaths wait for one chunk at most, not for the whole fleet).
#[tokio::test]
async fn a_whole_fleet_stalling_at_once_is_flagged_chunk_by_chunk() {
    const JOBS: usize = 230;
    let db = common::sqlite_db();
    let (vma, server, store) = stalls_after_400ms(&db).await;
    let jobs: Vec<String> = (0..JOBS).map(|n| format!("fleet-{n}")).collect();
    for (n, job) in jobs.iter().enumerate() {
        create(&store, job).await;
        vma.set(job, 1, n as u64 + 1);
    }
    eventually(
        30,
        "every job's progress, then every job flagged stalled",
        || async {
            let mut stalled = 0;
            for job in &jobs {
                let rec = store.get_job(job).await.unwrap().job;
                stalled += usize::from(rec.stalled_since.is_some() && rec.bytes_transferred > 0);
            }
            (stalled == JOBS).then_some(())
        },
    )
    .await;
    for job in jobs.iter().step_by(23) {
        assert!(
            actions(&store, job).await.contains(&"stalled".to_owned()),
            "{job}"
        );
    }
    server.shutdown().await;
}
