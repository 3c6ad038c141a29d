//! `oma-bench`: figures for the OMA on SQLite. Prints, asserts nothing about time.
//!
//!   cargo run -p oma --release --example oma-bench [-- --max-jobs 1000000]
//!
//! 1. Watchdog-event intake over HTTP (`POST /api/v1/watchdog/events`, batches of 100,
//!    every event a real transition or identity record), and the same through the store alone.
//! 2. Recovery scan with 10k / 100k / 1M jobs of which 1 % are active: the indexed read of the
//!    active set (what every recovery and poller cycle starts with), the query plan that proves
//!    the index is used, and a full recovery plan against a stand-in VMA on 127.0.0.1.

use api::{
    Detector, ExitStatus, FoundBy, JobProcessState, ProcessEvent, ProcessEventKind,
    ProcessIdentity, VmaJobStatus,
};
use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use oma::AppState;
use oma::auth::{OperatorTokens, hash_token};
use oma::job::on_event;
use oma::poller::{Poller, PollerConfig};
use oma::recovery::{Recovery, RecoveryConfig};
use oma::store::{NewJob, Store};
use oma::vma_client::VmaClient;
use sqlx::Row;
use std::sync::Arc;
use std::time::{Duration, Instant};

const VMA_TOKEN: &str = "bench-vma-token-0000000001";

fn events_for(job: &str, n: u32) -> [ProcessEvent; 2] {
    let process = ProcessIdentity {
        pid: 1000 + n,
        start_time: 50_000 + u64::from(n),
    };
    let mk = |kind, exit| ProcessEvent {
        event_id: uuid::Uuid::new_v4(),
        kind,
        job_id: api::JobId::parse(job).unwrap(),
        process,
        exit,
        observed_at: chrono::Utc::now(),
        detector: Detector::Ebpf,
        last_progress: None,
    };
    let killed = ExitStatus {
        code: None,
        signal: Some(9),
        core_dumped: false,
        oom_killed: false,
    };
    [
        mk(ProcessEventKind::ProcessStarted, None),
        mk(ProcessEventKind::ProcessExited, Some(killed)),
    ]
}

async fn create_jobs(store: &Store, prefix: &str, n: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let new = NewJob {
            id: Some(id.clone()),
            vm_context_id: format!("ctx-{id}"),
            vm_name: Some("vm".into()),
            vma_id: "vma-1".into(),
            sync_type: None,
        };
        store.create_job(&new).await.expect("create job");
        ids.push(id);
    }
    ids
}

async fn start_vma() -> String {
    // Answers "running" for every job, as a healthy VMA would.
    let router = Router::new().route(
        "/api/v1/jobs/{id}",
        get(|Path(id): Path<api::JobId>| async move {
            Json(VmaJobStatus {
                job_id: id,
                state: JobProcessState::Running {
                    process: ProcessIdentity {
                        pid: 1,
                        start_time: 1,
                    },
                    since: chrono::Utc::now(),
                    found_by: FoundBy::Scan,
                },
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

fn engines(store: &Store) -> (Arc<Recovery>, Arc<Poller>) {
    let client = VmaClient::new(Duration::from_secs(5), None);
    let recovery = RecoveryConfig {
        interval: Duration::from_secs(60),
        stale_threshold: Duration::from_secs(1800),
        concurrency: 32,
    };
    let poller = PollerConfig {
        interval: Duration::from_secs(5),
        max_backoff: Duration::from_secs(300),
        per_vma_concurrency: 4,
        stall_threshold: Duration::from_secs(900),
    };
    (
        Arc::new(Recovery::new(store.clone(), client.clone(), recovery)),
        Arc::new(Poller::new(store.clone(), client, poller)),
    )
}

async fn bench_intake(dir: &std::path::Path, vma_url: &str) -> anyhow::Result<()> {
    const JOBS: u32 = 2_500; // two events each: 5,000 events, 50 batches of 100
    let store = Store::connect(&dir.join("intake.db").display().to_string()).await?;
    if std::env::var("OMA_BENCH_ID_ONLY_INDEX").as_deref() == Ok("1") {
        // A/B: the id-only partial index of migration 0001 instead of 0002's covering one.
        sqlx::query("DROP INDEX replication_jobs_active_decision")
            .execute(store.pool())
            .await?;
        sqlx::query(
            "CREATE INDEX replication_jobs_active ON replication_jobs (id) WHERE active = 1",
        )
        .execute(store.pool())
        .await?;
        println!("intake with the id-only active index (OMA_BENCH_ID_ONLY_INDEX=1)");
    }
    store
        .upsert_vma("vma-1", vma_url, &hash_token(VMA_TOKEN))
        .await?;
    let (recovery, poller) = engines(&store);
    let state = AppState {
        store: store.clone(),
        operators: Arc::new(OperatorTokens::new(["bench-operator-token".to_owned()])),
        recovery,
        poller,
        vma_client: VmaClient::new(Duration::from_secs(5), None),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/api/v1/watchdog/events", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, oma::app(state)).await });

    let http = reqwest::Client::new();
    for (label, prefix) in [("HTTP", "h"), ("store only", "s")] {
        let ids = create_jobs(&store, prefix, JOBS).await;
        let events: Vec<ProcessEvent> = ids
            .iter()
            .enumerate()
            .flat_map(|(i, id)| events_for(id, i as u32))
            .collect();
        let start = Instant::now();
        let mut applied = 0;
        for chunk in events.chunks(100) {
            if label == "HTTP" {
                let body = api::EventBatch {
                    vma_id: "vma-1".into(),
                    events: chunk.to_vec(),
                };
                let ack: api::EventBatchAck = http
                    .post(&url)
                    .bearer_auth(VMA_TOKEN)
                    .json(&body)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                applied += ack.applied;
            } else {
                applied += store.apply_events("vma-1", chunk, on_event).await?.1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "intake ({label}): {} events in {:.3} s = {:.0} events/s ({} applied, batches of 100)",
            events.len(),
            secs,
            events.len() as f64 / secs,
            applied
        );
    }
    store.close().await;
    Ok(())
}

/// Adds jobs `from..to` (every 100th active) with their contexts, in one statement each.
async fn seed(store: &Store, from: i64, to: i64) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp_millis();
    let mut tx = store.pool().begin().await?;
    sqlx::query(&format!(
        "WITH RECURSIVE seq(n) AS (SELECT {from} UNION ALL SELECT n + 1 FROM seq WHERE n < {to} - 1) \
         INSERT INTO vm_replication_contexts (context_id, vm_name, current_status, current_job_id, last_status_change, created_at) \
         SELECT 'ctx-' || n, 'vm-' || n, CASE WHEN n % 100 = 0 THEN 'replicating' ELSE 'ready_for_failover' END, \
         CASE WHEN n % 100 = 0 THEN 'job-' || n END, {now}, {now} FROM seq"
    )).execute(&mut *tx).await?;
    sqlx::query(&format!(
        "WITH RECURSIVE seq(n) AS (SELECT {from} UNION ALL SELECT n + 1 FROM seq WHERE n < {to} - 1) \
         INSERT INTO replication_jobs (id, vm_context_id, vma_id, status, active, created_at, updated_at, last_progress_at) \
         SELECT 'job-' || n, 'ctx-' || n, 'vma-1', CASE WHEN n % 100 = 0 THEN 'replicating' ELSE 'completed' END, \
         CASE WHEN n % 100 = 0 THEN 1 ELSE 0 END, {now}, {now}, {now} FROM seq"
    )).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

async fn bench_scan(dir: &std::path::Path, vma_url: &str, max_jobs: i64) -> anyhow::Result<()> {
    let store = Store::connect(&dir.join("scan.db").display().to_string()).await?;
    store
        .upsert_vma("vma-1", vma_url, &hash_token(VMA_TOKEN))
        .await?;
    let plan: Vec<String> = sqlx::query(&format!(
        "EXPLAIN QUERY PLAN SELECT {} FROM replication_jobs WHERE active = 1",
        oma::store::DECISION_COLUMNS
    ))
    .fetch_all(store.pool())
    .await?
    .iter()
    .filter_map(|r| r.try_get::<String, _>("detail").ok())
    .collect();
    println!("recovery's active-set query plan: {}", plan.join("; "));
    let (recovery, _) = engines(&store);
    let mut have = 0;
    for total in [10_000i64, 100_000, 1_000_000]
        .into_iter()
        .filter(|t| *t <= max_jobs)
    {
        let start = Instant::now();
        seed(&store, have, total).await?;
        have = total;
        let seeded = start.elapsed();
        // The seeding wrote up to 900,000 rows in one transaction; a running OMA's WAL is
        // checkpointed as it goes, so measure reads against a checkpointed file too.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(store.pool())
            .await?;
        let mut best = Duration::MAX;
        let mut active = 0;
        for _ in 0..5 {
            let start = Instant::now();
            active = store.active_jobs().await?.len();
            best = best.min(start.elapsed());
        }
        let (mut decision_best, mut ids_best) = (Duration::MAX, Duration::MAX);
        for _ in 0..5 {
            let start = Instant::now();
            let n = store.active_jobs_for_decision().await?.len();
            decision_best = decision_best.min(start.elapsed());
            let start = Instant::now();
            let m = store.active_job_ids().await?.len();
            ids_best = ids_best.min(start.elapsed());
            assert_eq!((n, m), (active, active));
        }
        println!(
            "scan: {total:>9} jobs, {active:>6} active: recovery's read (decision columns) {:>8.2} ms, \
             poller's read (ids) {:>8.2} ms (best of 5)",
            decision_best.as_secs_f64() * 1e3,
            ids_best.as_secs_f64() * 1e3
        );
        let start = Instant::now();
        let counted: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM replication_jobs WHERE active = 1")
                .fetch_one(store.pool())
                .await?
                .try_get("n")?;
        println!(
            "scan: {total:>9} jobs: index-only count of the active set ({counted}) {:>8.2} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
        let start = Instant::now();
        let decisions = recovery.plan().await?.len();
        let planned = start.elapsed();
        println!(
            "scan: {total:>9} jobs, {active:>6} active: full-row read {:>8.2} ms (best of 5); \
             full recovery plan incl. {decisions} VMA calls {:>8.1} ms (seeded in {:.1} s)",
            best.as_secs_f64() * 1e3,
            planned.as_secs_f64() * 1e3,
            seeded.as_secs_f64()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let max_jobs = args
        .iter()
        .position(|a| a == "--max-jobs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let vma_url = start_vma().await;
    bench_intake(dir.path(), &vma_url).await?;
    bench_scan(dir.path(), &vma_url, max_jobs).await?;
    Ok(())
}
