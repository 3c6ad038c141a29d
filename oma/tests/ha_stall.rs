//! Kill test, a STALLED lock holder: two real `oma` processes on a PostgreSQL cluster of the
//! test's own, stand-in VMAs on loopback.
//!
//! oma-a takes the recovery lock at start (its VMAs' answers held back) and is SIGSTOPped
//! mid-run: its sessions stay open and would hold the lock forever. oma-b must find oma-a's
//! heartbeat expired, end oma-a's database sessions (`stalled_oma_sessions_ended`) and complete
//! a recovery run while oma-a is still stopped. oma-a, continued, must stop its run with
//! `recovery_lock_lost` (no run recorded by it) and rejoin; the audit trail shows every job
//! finalized once.
//!
//! A second test checks on the server of `OMA_TEST_POSTGRES_URL` that a store's sessions carry
//! their `application_name`, and that a recovery lock whose session was ended reports itself
//! lost. Both print `SKIP:` without PostgreSQL.

mod common;

use api::ProcessEventKind;
use common::cluster::{Cluster, OmaProc, each_job_finalized_once, fresh_database};
use common::fixtures::{code, event, new_job};
use common::vma::{Answer, StandInVma, pid};
use oma::auth::hash_token;
use oma::job::on_event;
use oma::store::{Released, Store, application_name};
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(2);
const VMAS: usize = 2;
const JOBS_PER_VMA: usize = 3;
/// How long each VMA holds back its answers to oma-a's startup run.
const HOLD: Duration = Duration::from_secs(8);

/// The recovery lock's advisory key (`store/lock.rs`), as `pg_locks` shows it.
const LOCK_CLASSID: i64 = 0x4f4d;
const LOCK_OBJID: i64 = 0x4152_4543;

/// Registers the VMAs and their jobs, each job's process known to have exited, so that a
/// recovery run finalizes every one of them.
async fn fleet(store: &Store) -> Vec<StandInVma> {
    let mut vmas = Vec::new();
    for i in 0..VMAS {
        let vma = StandInVma::start().await;
        let id = format!("vma-{i}");
        let token = format!("vma-{i}-token-for-the-stall-test");
        store
            .upsert_vma(&id, &vma.url, &hash_token(&token))
            .await
            .unwrap();
        for k in 0..JOBS_PER_VMA {
            let job = format!("stall-{i}-{k}");
            let ctx = format!("ctx-{job}");
            store.create_job(&new_job(&job, &ctx, &id)).await.unwrap();
            let process = pid(2000 + (i * 100 + k) as u32, 77);
            let started = [event(&job, ProcessEventKind::ProcessStarted, process, None)];
            store.apply_events(&id, &started, on_event).await.unwrap();
            vma.set(&job, Answer::Exited(process, code(1).unwrap()));
        }
        vmas.push(vma);
    }
    vmas
}

/// The `application_name` of the session holding the recovery lock, if any.
async fn lock_holder(store: &Store) -> Option<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
         AND l.classid::bigint = $1 AND l.objid::bigint = $2",
    )
    .bind(LOCK_CLASSID)
    .bind(LOCK_OBJID)
    .fetch_optional(store.pool())
    .await
    .unwrap()
}

fn signal(oma: &OmaProc, sig: libc::c_int) {
    let rc = unsafe { libc::kill(oma.child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({sig})");
}

/// Whether the process is stopped (state `T` in `/proc/<pid>/stat`).
fn is_stopped(oma: &OmaProc) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", oma.child.id())).unwrap();
    let state = stat.rsplit_once(") ").unwrap().1;
    state.starts_with('T')
}

fn job_calls(vmas: &[StandInVma]) -> u64 {
    vmas.iter().map(|v| v.inner.lock().unwrap().job_calls).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_lock_holder_loses_its_sessions_and_its_run() {
    let Some(cluster) = Cluster::start("ha-stall-test-postgres") else {
        eprintln!(
            "SKIP: a_stalled_lock_holder...: no PostgreSQL binaries (apt-get install postgresql)"
        );
        return;
    };
    let database = fresh_database(&cluster, "ha_stall_test").await;
    let store = Store::connect(&database).await.unwrap();
    let vmas = fleet(&store).await;
    let dir = tempfile::tempdir().unwrap();
    let jobs = (VMAS * JOBS_PER_VMA) as u64;

    for vma in &vmas {
        vma.inner.lock().unwrap().delay_ms = HOLD.as_millis() as u64;
    }
    let a = OmaProc::start("oma-a", &database, dir.path(), LEASE).await;
    common::eventually(20, "oma-a's run asked every job", || {
        let n = job_calls(&vmas);
        async move { (n >= jobs).then_some(()) }
    })
    .await;
    let b = OmaProc::start("oma-b", &database, dir.path(), LEASE).await;
    // oma-a holds the lock, in a session named after it; its run is under way.
    let holder = lock_holder(&store)
        .await
        .expect("the recovery lock is held");
    assert!(holder.starts_with("oma/oma-a/"), "held by {holder}");
    assert!(store.recent_runs(10).await.unwrap().is_empty());

    signal(&a, libc::SIGSTOP);
    let stopped = Instant::now();
    let stopped_ms = oma::model::now_ms();
    for vma in &vmas {
        vma.inner.lock().unwrap().delay_ms = 0;
    }
    let ended = common::eventually(30, "oma-b ended oma-a's sessions", || {
        let n = b.log_events("stalled_oma_sessions_ended");
        async move { (n > 0).then(|| stopped.elapsed()) }
    })
    .await;
    let recovered = common::eventually(30, "oma-b's recovery run", || {
        let store = store.clone();
        async move {
            let runs = store.recent_runs(10).await.ok()?;
            let run = runs.iter().find(|r| r.started_at_ms >= stopped_ms)?;
            Some((stopped.elapsed(), run.finalized))
        }
    })
    .await;
    assert!(is_stopped(&a), "oma-a is still stopped");
    let holder = lock_holder(&store).await;
    assert!(
        holder.as_ref().is_none_or(|h| !h.starts_with("oma/oma-a/")),
        "oma-a no longer holds the lock: {holder:?}"
    );
    assert_eq!(recovered.1 as u64, jobs, "oma-b's run finalized every job");
    // Logged once the run has returned, a moment after its record is committed.
    common::eventually(10, "oma-b's recovery_after_oma_lost line", || {
        let n = b.log_events("recovery_after_oma_lost");
        async move { (n > 0).then_some(()) }
    })
    .await;
    assert_eq!(b.log_events("recovery_after_oma_lost"), 1);
    eprintln!(
        "HA stall: lease period {:.0} s; oma-a SIGSTOPped holding the recovery lock; oma-b ended its sessions {:.2} s and completed recovery {:.2} s after the stop ({} jobs finalized)",
        LEASE.as_secs_f64(),
        ended.as_secs_f64(),
        recovered.0.as_secs_f64(),
        recovered.1
    );

    resume_the_stalled_oma(&store, &a).await;
    each_job_finalized_once(&store, "stall", VMAS, JOBS_PER_VMA).await;
    store.close().await;
    drop((a, b));
    drop(cluster);
}

/// Continues oma-a: its run must stop on the lost lock (recording nothing), and it rejoins.
async fn resume_the_stalled_oma(store: &Store, a: &OmaProc) {
    signal(a, libc::SIGCONT);
    let resumed = Instant::now();
    common::eventually(30, "oma-a's run stopped on the lost lock", || {
        let n = a.log_events("recovery_lock_lost");
        async move { (n == 1).then_some(()) }
    })
    .await;
    common::eventually(30, "oma-a rejoined", || {
        let n = a.log_events("oma_instance_rejoined");
        async move { (n == 1).then_some(()) }
    })
    .await;
    eprintln!(
        "HA stall: oma-a continued; its run stopped (recovery_lock_lost) and it rejoined within {:.2} s",
        resumed.elapsed().as_secs_f64()
    );
    let runs = store.recent_runs(10).await.unwrap();
    assert_eq!(runs.len(), 1, "oma-a recorded no run: {runs:#?}");
}

#[tokio::test]
async fn sessions_carry_the_instance_name_and_an_ended_lock_session_is_lost() {
    let Some(db) = common::test_dbs()
        .await
        .into_iter()
        .find(|db| db.backend == "postgres")
    else {
        eprintln!("SKIP: sessions_carry_the_instance_name...: OMA_TEST_POSTGRES_URL is not set");
        return;
    };
    let id = oma::lease::new_instance_id();
    let name = application_name("a rather long OMA name, with spaces and ü", &id);
    assert!(name.len() <= 63 && name.ends_with(&id), "{name}");
    let store = Store::connect_as(&db.url, &name).await.unwrap();
    let own: String = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(own, name);

    let mut lock = store.try_recovery_lock().await.unwrap().expect("free");
    assert!(lock.check().await.held());
    let other = Store::connect(&db.url).await.unwrap();
    let ended = other.end_instance_sessions(&name).await.unwrap();
    assert!(ended >= 1, "ended {ended}");
    assert!(
        matches!(lock.check().await, Released::Lost),
        "an ended session no longer holds the lock"
    );
    // `pg_terminate_backend` signals the backend; the lock goes when it has exited.
    let mut again = common::eventually(10, "the lock freed", || {
        let other = other.clone();
        async move { other.try_recovery_lock().await.unwrap() }
    })
    .await;
    assert!(again.check().await.held());
    assert!(again.release().await.held());
    other.close().await;
    store.close().await;
}
