//! Kill test, three OMAs on one PostgreSQL (issue 14, item 3): real `oma` processes on a
//! PostgreSQL cluster of the test's own (so it can restart it without disturbing other tests),
//! stand-in VMAs on loopback answering the watchdog API the OMA calls (job status, progress).
//!
//! (a) The OMA holding the recovery lock, mid-run, and owning some VMAs is SIGKILLed: its VMAs
//!     are polled by another OMA and recovery runs again, both within 2 lease periods.
//! (b) PostgreSQL is restarted while deaths are arriving (posted as a watchdog posts them,
//!     retried until acknowledged): every death is committed exactly once afterwards.
//! (c) The deaths are posted with the killed OMA first in the list: each goes to the next.
//! (d) The audit trail shows no job finalized twice.
//!
//! Needs PostgreSQL's binaries (Debian's `postgresql`); without them it prints `SKIP:`.

mod common;

use api::{EventBatch, EventBatchAck, ProcessEventKind};
use common::cluster::{Cluster, OmaProc, each_job_finalized_once, fresh_database};
use common::fixtures::{code, event, new_job};
use common::vma::{Answer, StandInVma, pid};
use oma::auth::hash_token;
use oma::job::on_event;
use oma::store::Store;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(3);
const VMAS: usize = 6;
const JOBS_PER_VMA: usize = 4;

fn token(i: usize) -> String {
    format!("vma-{i}-token-for-the-ha-kill-test")
}

/// Registers the VMAs and their jobs, each job running as a known process.
async fn fleet(store: &Store) -> Vec<StandInVma> {
    let mut vmas = Vec::new();
    for i in 0..VMAS {
        let vma = StandInVma::start().await;
        let id = format!("vma-{i}");
        store
            .upsert_vma(&id, &vma.url, &hash_token(&token(i)))
            .await
            .unwrap();
        for k in 0..JOBS_PER_VMA {
            let job = format!("ha-{i}-{k}");
            store
                .create_job(&new_job(&job, &format!("ctx-{job}"), &id))
                .await
                .unwrap();
            let process = pid(1000 + (i * 100 + k) as u32, 77);
            let started = [event(&job, ProcessEventKind::ProcessStarted, process, None)];
            store.apply_events(&id, &started, on_event).await.unwrap();
            vma.set(&job, Answer::Running(process));
            vma.set_progress(&job, 1, 1000, None);
        }
        vmas.push(vma);
    }
    vmas
}

/// Instance name of each VMA's lease owner.
async fn owners(store: &Store) -> HashMap<String, String> {
    let names: HashMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT instance_id, name FROM oma_instances")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .into_iter()
            .collect();
    let now = store.lease_clock_ms().await.unwrap();
    store
        .poll_leases()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.2 > now)
        .map(|(vma, owner, _, _)| (vma, names.get(&owner).cloned().unwrap_or(owner)))
        .collect()
}

fn progress_calls(vma: &StandInVma) -> u64 {
    vma.inner.lock().unwrap().progress_calls.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_omas_survive_a_killed_lock_holder_and_a_database_restart() {
    let Some(cluster) = Cluster::start("ha-test-postgres") else {
        eprintln!(
            "SKIP: three_omas_survive...: no PostgreSQL binaries (apt-get install postgresql)"
        );
        return;
    };
    let database = fresh_database(&cluster, "ha_kill_test").await;
    let store = Store::connect(&database).await.unwrap();
    let vmas = fleet(&store).await;
    let dir = tempfile::tempdir().unwrap();

    // (a)
    let omas = kill_the_lock_holder(&store, &vmas, &database, dir.path()).await;

    // (b), (c): deaths posted with the dead oma-1 first, PostgreSQL restarted meanwhile.
    let urls: Vec<String> = omas.iter().map(|o| o.url.clone()).collect();
    let report = post_deaths_across_a_restart(&cluster, &urls).await;
    eprintln!(
        "HA (b, c): {} deaths posted, {} of them while PostgreSQL restarted ({:.2} s); {} attempts failed, {} deaths went first to the dead oma-1 and on to the next",
        report.deaths,
        report.during_restart,
        report.restart.as_secs_f64(),
        report.failed_attempts,
        report.failed_over
    );
    assert_eq!(
        report.failed_over, report.deaths,
        "each death moved past oma-1"
    );
    assert!(
        report.during_restart > 0,
        "deaths arrived during the restart: {report:?}"
    );

    // (d) Every job final, with exactly one final transition in its audit trail.
    let store = Store::connect(&database).await.unwrap();
    each_job_finalized_once(&store, "ha", VMAS, JOBS_PER_VMA).await;
    store.close().await;
    drop(omas);
    drop(cluster);
}

/// (a) oma-1 starts first: its startup recovery run asks every VMA, each answer held back for
/// 8 s, so the run holds the recovery lock while the others start (their startup runs find it
/// taken) and the leases spread. oma-1 is then SIGKILLed; its VMAs must be polled by another
/// OMA and recovery run again, both within 2 lease periods. Returns the three OMAs (oma-1
/// dead).
async fn kill_the_lock_holder(
    store: &Store,
    vmas: &[StandInVma],
    database: &str,
    dir: &Path,
) -> Vec<OmaProc> {
    for vma in vmas {
        vma.inner.lock().unwrap().delay_ms = 8000;
    }
    let mut omas = vec![OmaProc::start("oma-1", database, dir, LEASE).await];
    vmas[0].wait_job_calls(1).await;
    for name in ["oma-2", "oma-3"] {
        omas.push(OmaProc::start(name, database, dir, LEASE).await);
    }
    let victims = victims_once_spread(store).await;
    omas[0].child.kill().unwrap(); // SIGKILL, mid-run, holding the recovery lock.
    let killed = Instant::now();
    let killed_ms = oma::model::now_ms();
    for vma in vmas {
        vma.inner.lock().unwrap().delay_ms = 0;
    }
    let calls_at_kill: Vec<u64> = vmas.iter().map(progress_calls).collect();
    let taken = common::eventually(30, "oma-1's VMAs taken over", || {
        let (store, victims) = (store.clone(), victims.clone());
        async move {
            let owners = owners(&store).await;
            (victims.iter())
                .all(|v| owners.get(v).is_some_and(|o| o != "oma-1"))
                .then(|| killed.elapsed())
        }
    })
    .await;
    let rerun = common::eventually(30, "recovery run again", || {
        let store = store.clone();
        async move {
            let runs = store.recent_runs(100).await.ok()?;
            let run = runs.iter().find(|r| r.started_at_ms >= killed_ms)?;
            Some(Duration::from_millis(
                (run.started_at_ms - killed_ms) as u64,
            ))
        }
    })
    .await;
    // Polled again by a survivor: progress requests on the victims' VMAs after the kill.
    common::eventually(30, "the victims' VMAs polled again", || {
        let ok = victims.iter().all(|v| {
            let i: usize = v.trim_start_matches("vma-").parse().unwrap();
            progress_calls(&vmas[i]) > calls_at_kill[i] + 2
        });
        async move { ok.then_some(()) }
    })
    .await;
    eprintln!(
        "HA (a): lease period {:.0} s; oma-1's {} VMAs taken over {:.2} s after SIGKILL, recovery ran again {:.2} s after it",
        LEASE.as_secs_f64(),
        victims.len(),
        taken.as_secs_f64(),
        rerun.as_secs_f64()
    );
    assert!(
        taken <= 2 * LEASE,
        "takeover within 2 lease periods: {taken:?}"
    );
    assert!(
        rerun <= 2 * LEASE,
        "recovery again within 2 lease periods: {rerun:?}"
    );
    // Logged once the run has returned, a moment after its record is committed.
    let reruns = || -> usize {
        (omas[1..].iter())
            .map(|o| o.log_events("recovery_after_oma_lost"))
            .sum()
    };
    common::eventually(10, "a survivor's recovery_after_oma_lost line", || {
        let n = reruns();
        async move { (n > 0).then_some(()) }
    })
    .await;
    assert_eq!(
        reruns(),
        1,
        "one survivor found oma-1 dead and ran recovery"
    );
    omas
}

/// Waits until the VMAs are spread over the three OMAs, checks that no recovery run has ended
/// yet (oma-1's is under way), and returns oma-1's VMAs.
async fn victims_once_spread(store: &Store) -> Vec<String> {
    let spread = common::eventually(20, "the VMAs spread over three OMAs", || {
        let store = store.clone();
        async move {
            let owners = owners(&store).await;
            let per: HashSet<&String> = owners.values().collect();
            (owners.len() == VMAS && per.len() == 3).then_some(owners)
        }
    })
    .await;
    let runs_before = store.recent_runs(100).await.unwrap().len();
    assert_eq!(runs_before, 0, "oma-1's startup run is still under way");
    let victims: Vec<String> = (spread.iter())
        .filter(|(_, o)| *o == "oma-1")
        .map(|(v, _)| v.clone())
        .collect();
    assert!(!victims.is_empty(), "oma-1 owns some VMAs: {spread:?}");
    victims
}

#[derive(Debug, Default)]
struct DeathReport {
    deaths: usize,
    /// Deaths whose delivery began while the cluster restarted.
    during_restart: usize,
    failed_attempts: usize,
    failed_over: usize,
    /// How long the cluster was restarting (stopped for 1 s of it).
    restart: Duration,
}

/// Posts every job's death as the VMAs' watchdogs do, one sender per VMA at once, one batch
/// per death: the preferred (first) OMA first, the next after a failure (connection, 5xx), the
/// same event until acknowledged. The cluster is restarted a moment after they begin.
async fn post_deaths_across_a_restart(cluster: &Cluster, urls: &[String]) -> DeathReport {
    let (dir, admin) = (cluster.dir.clone(), cluster.admin.clone());
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let c = Cluster { dir, admin };
        let began = Instant::now();
        c.restart();
        std::mem::forget(c);
        (began, Instant::now())
    });
    let senders: Vec<_> = (0..VMAS)
        .map(|i| tokio::spawn(post_deaths_of(i, urls.to_vec())))
        .collect();
    let mut report = DeathReport::default();
    let mut tried = Vec::new();
    for sender in senders {
        let (part, times) = sender.await.unwrap();
        report.deaths += part.deaths;
        report.failed_attempts += part.failed_attempts;
        report.failed_over += part.failed_over;
        tried.extend(times);
    }
    let (began, ended) = restart.join().unwrap();
    report.restart = ended - began;
    report.during_restart = tried
        .iter()
        .filter(|t| **t >= began && **t <= ended)
        .count();
    report
}

/// One VMA's sender: its jobs' deaths, 250 ms apart; returns its counts and when each death's
/// delivery began.
async fn post_deaths_of(i: usize, urls: Vec<String>) -> (DeathReport, Vec<Instant>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut report = DeathReport::default();
    let mut tried = Vec::new();
    for k in 0..JOBS_PER_VMA {
        let job = format!("ha-{i}-{k}");
        let process = pid(1000 + (i * 100 + k) as u32, 77);
        let death = event(&job, ProcessEventKind::ProcessExited, process, code(1));
        let batch = EventBatch {
            vma_id: format!("vma-{i}"),
            events: vec![death.clone()],
        };
        tried.push(Instant::now());
        let mut current = 0;
        loop {
            let sent = http
                .post(format!("{}/api/v1/watchdog/events", urls[current]))
                .bearer_auth(token(i))
                .json(&batch)
                .send()
                .await;
            let acked = match sent {
                Ok(r) if r.status().is_success() => r
                    .json::<EventBatchAck>()
                    .await
                    .is_ok_and(|a| a.acknowledged.contains(&death.event_id)),
                Ok(r) if r.status().is_server_error() => false,
                Ok(r) => panic!("refused: {}", r.status()),
                Err(_) => {
                    report.failed_over += usize::from(current == 0);
                    current = (current + 1) % urls.len();
                    false
                }
            };
            if acked {
                break;
            }
            report.failed_attempts += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report.deaths += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (report, tried)
}
