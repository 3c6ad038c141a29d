//! The lane of writes that can wait (`Store::background_lane`), which the poller takes for
//! each of its transactions.
//!
//! - SQLite (one connection, handed out first come, first served): with dozens of progress
//!   transactions queued, a death's intake commits after at most one of them, not after all.
//!   Counted, not timed: each queued writer bumps a counter when its commit returns, and the
//!   test reads it when the death's commit returns. Without the lane the death came last.
//! - PostgreSQL (a pool): dozens of background writers that each hold a connection for as long
//!   as they like get only the lane's width of them; a death commits while they all wait.
//!   Without the lane they took the whole pool and the death waited for its acquire timeout.

mod common;

use api::ProcessEventKind;
use common::fixtures::{code, event, new_job, progress, setup};
use common::vma::pid;
use common::{sqlite_db, test_dbs};
use oma::job::{on_event, on_progress};
use oma::model::JobStatus;
use oma::store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Background writers queued ahead of the death.
const WRITERS: usize = 40;
/// Jobs each writer changes per transaction (a feed answer's worth).
const JOBS_PER_WRITER: usize = 20;
/// The lane's width on PostgreSQL: a quarter of its pool of 16.
const LANE_ON_POSTGRES: usize = 4;

/// Jobs each writer's transaction changes, and the dying job, started.
async fn jobs(store: &Store) -> (Vec<Vec<String>>, api::ProcessIdentity) {
    store
        .create_job(&new_job("dying", "ctx-dying", "vma-1"))
        .await
        .unwrap();
    let mut groups = Vec::new();
    for w in 0..WRITERS {
        let ids: Vec<String> = (0..JOBS_PER_WRITER).map(|n| format!("w{w}-{n}")).collect();
        for id in &ids {
            store
                .create_job(&new_job(id, &format!("ctx-{id}"), "vma-1"))
                .await
                .unwrap();
        }
        groups.push(ids);
    }
    let p = pid(4242, 77);
    let started = event("dying", ProcessEventKind::ProcessStarted, p, None);
    store
        .apply_events("vma-1", &[started], on_event)
        .await
        .unwrap();
    (groups, p)
}

async fn die(store: &Store, p: api::ProcessIdentity) {
    let death = [event("dying", ProcessEventKind::ProcessExited, p, code(9))];
    let intake = store.apply_events("vma-1", &death, on_event);
    tokio::time::timeout(Duration::from_secs(5), intake)
        .await
        .expect("the death's intake waited for the poller's writers")
        .unwrap();
    let job = store.get_job("dying").await.unwrap().job;
    assert_eq!(job.status, JobStatus::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_death_commits_ahead_of_the_pollers_queue() {
    let db = sqlite_db();
    let store = setup(&db).await;
    let (groups, p) = jobs(&store).await;
    // The poller's queue: the first place is held until every writer surely waits.
    let first = store.background_lane().await;
    let (started, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut writers = tokio::task::JoinSet::new();
    for (w, ids) in groups.into_iter().enumerate() {
        let (store, started, done) = (store.clone(), started.clone(), done.clone());
        writers.spawn(async move {
            started.fetch_add(1, Ordering::SeqCst);
            let _lane = store.background_lane().await;
            let bytes = w as u64 + 1;
            store
                .mutate_jobs(&ids, |cur, now| {
                    Ok(on_progress(
                        cur,
                        &progress(&cur.job.id, bytes, bytes),
                        now,
                        i64::MAX,
                    ))
                })
                .await
                .unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    while started.load(Ordering::SeqCst) < WRITERS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every writer is now parked in the lane (without it, in the pool's queue).
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(first);
    tokio::task::yield_now().await;
    die(&store, p).await;
    let ahead = done.load(Ordering::SeqCst);
    // One writer may have taken the connection just before the death asked for it.
    assert!(
        ahead <= 2,
        "the death committed after {ahead} of {WRITERS} queued progress commits"
    );
    while writers.join_next().await.is_some() {}
    assert_eq!(done.load(Ordering::SeqCst), WRITERS);
    let moved = store.get_job("w7-3").await.unwrap();
    assert_eq!(moved.job.bytes_transferred, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_poller_never_holds_the_whole_pool() {
    let Some(db) = test_dbs()
        .await
        .into_iter()
        .find(|db| db.backend == "postgres")
    else {
        return;
    };
    let store = setup(&db).await;
    let (_, p) = jobs(&store).await;
    // Writers that hold a connection until released: the slowest poller transactions.
    let release = Arc::new(Semaphore::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (store, release, holding) = (store.clone(), release.clone(), holding.clone());
        writers.spawn(async move {
            let _lane = store.background_lane().await;
            let _conn = store.pool().acquire().await.unwrap();
            holding.fetch_add(1, Ordering::SeqCst);
            // Closed at the end of the test: every holder lets go.
            let _ = release.acquire().await;
        });
    }
    while holding.load(Ordering::SeqCst) < LANE_ON_POSTGRES {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(holding.load(Ordering::SeqCst), LANE_ON_POSTGRES);
    die(&store, p).await;
    release.close();
    while writers.join_next().await.is_some() {}
    assert_eq!(holding.load(Ordering::SeqCst), WRITERS);
}
