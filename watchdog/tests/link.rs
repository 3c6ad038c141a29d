//! The watchdog as the OMA sees it: the real `vma-watchdog` binary with its REST API on a
//! real port and its deliveries going to a tiny real OMA on 127.0.0.1, jobs started through
//! the API as real stand-in migratekit processes that post their own progress.

mod common;
mod fake_oma;

use std::path::Path;
use std::time::{Duration, Instant};

use api::{JobProcessState, ProcessEventKind, ProcessIdentity, StoredProgress, VmaJobStatus};
use common::{TIMEOUT, WatchdogProcess, privileged, signal, standin_bin};
use fake_oma::{FakeOma, free_port};

const API_TOKEN: &str = "api-token-e2e-5b1";
const OMA_TOKEN: &str = "oma-token-e2e-7c2";
const VMA_ID: &str = "vma-e2e";

/// A watchdog on `127.0.0.1:port` that delivers to `oma_url` and launches the stand-in,
/// which posts progress to this same port every 100 ms; `extra` template arguments follow.
fn watchdog(state: &Path, port: u16, oma_url: &str, extra: &[&str]) -> WatchdogProcess {
    let listen = format!("127.0.0.1:{port}");
    let progress = format!("http://127.0.0.1:{port}");
    let program = standin_bin();
    let mut args = vec![
        "--listen",
        &listen,
        "--api-token",
        API_TOKEN,
        "--oma-url",
        oma_url,
        "--oma-token",
        OMA_TOKEN,
        "--vma-id",
        VMA_ID,
        "--oma-max-backoff-ms",
        "200",
        "--launch-no-systemd",
        "--launch-program",
        program.to_str().unwrap(),
    ];
    let template = [
        "migrate",
        "--job-id",
        "{job_id}",
        "--standin-progress-interval-ms",
        "100",
        "--standin-rate",
        "1000000",
        "--standin-total-bytes",
        "1000000000",
    ];
    for arg in template.iter().chain(extra) {
        args.extend(["--launch-arg", arg]);
    }
    let w = WatchdogProcess::start_with(
        state,
        "auto",
        &args,
        &[("MIGRATEKIT_STANDIN_PROGRESS_URL", &progress)],
    );
    assert_eq!(w.api_addr().port(), port);
    w
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        let url = format!("{}{path}", self.base);
        self.http
            .get(url)
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// `GET /health` (open, no token needed).
    async fn health(&self) -> serde_json::Value {
        let url = format!("{}/health", self.base);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Starts a job and returns its process.
    async fn start(&self, job: &str) -> ProcessIdentity {
        let url = format!("{}/api/v1/jobs/{job}/start", self.base);
        let r = self
            .http
            .post(url)
            .bearer_auth(API_TOKEN)
            .json(&serde_json::json!({}));
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 201, "start {job}: {}", r.text().await.unwrap());
        match r.json::<VmaJobStatus>().await.unwrap().state {
            JobProcessState::Running { process, .. } => process,
            other => panic!("job {job} not running after start: {other:?}"),
        }
    }

    /// Waits until the job's progress has at least `sequence` updates; returns the latest.
    async fn progress_at_least(&self, job: &str, sequence: u64) -> StoredProgress {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let r = self.get(&format!("/api/v1/progress/{job}")).await;
            if r.status() == 200 {
                let p: StoredProgress = r.json().await.unwrap();
                if p.sequence >= sequence {
                    return p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "job {job}: fewer than {sequence} updates"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn exits(oma: &FakeOma, job: &str) -> Vec<api::ProcessEvent> {
    let events = oma.events_of(job);
    events
        .into_iter()
        .filter(|e| e.kind != ProcessEventKind::ProcessStarted)
        .collect()
}

/// Start through the API (with the token; 401 without), progress posted by migratekit
/// itself, SIGKILL → exactly one `process_exited` with signal 9 at the OMA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launched_job_reports_progress_and_its_kill_reaches_the_oma_once() {
    if !privileged("a_launched_job_reports_progress_and_its_kill_reaches_the_oma_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let oma = FakeOma::start("127.0.0.1:0".parse().unwrap(), OMA_TOKEN, VMA_ID).await;
    let port = free_port();
    let w = watchdog(dir.path(), port, &oma.url(), &[]);
    let api = Api::new(port);
    let anonymous = reqwest::get(format!("{}/api/v1/jobs", api.base))
        .await
        .unwrap();
    assert_eq!(
        anonymous.status(),
        401,
        "a call without the token is refused"
    );
    let p = api.start("job-kill").await;
    // The watchdog runs above normal priority, every thread of it; migratekit at normal.
    let nices = |pid: u32| -> Vec<i64> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|t| {
                let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap();
                // Field 19 is the nice value; fields are counted after the `(comm)`.
                let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
                after_comm.split(' ').nth(16).unwrap().parse().unwrap()
            })
            .collect()
    };
    let watchdog_nices = nices(w.pid());
    assert!(
        watchdog_nices.iter().all(|&n| n == -10),
        "{watchdog_nices:?}"
    );
    assert!(nices(p.pid).iter().all(|&n| n == 0), "{:?}", nices(p.pid));
    let first = api.progress_at_least("job-kill", 2).await;
    let later = api.progress_at_least("job-kill", first.sequence + 2).await;
    assert!(later.update.bytes_transferred > first.update.bytes_transferred);
    assert_eq!(later.update.total_bytes, Some(1_000_000_000));
    assert_eq!(later.update.disk_id.as_deref(), Some("disk-2000"));

    let killed = Instant::now();
    signal(p.pid, libc::SIGKILL);
    let (event, at) = oma
        .wait_for(TIMEOUT, |e| {
            e.job_id == "job-kill" && e.kind == ProcessEventKind::ProcessExited
        })
        .await
        .expect("the death reaches the OMA");
    eprintln!(
        "kill -> OMA receipt: {:?} ({} detector)",
        at - killed,
        w.detector
    );
    assert_eq!(event.process, p);
    assert_eq!(event.exit.and_then(|e| e.signal), Some(9));
    // Anything else still in flight would arrive within this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        exits(&oma, "job-kill").len(),
        1,
        "{:?}",
        oma.events_of("job-kill")
    );

    // The watchdog counts a batch as delivered only once it has written the acknowledgement
    // down (the registry first, then the outbox's own file): a moment after the OMA had it.
    let deadline = Instant::now() + TIMEOUT;
    let health = loop {
        let health = api.health().await;
        if health["outbox"]["delivered"].as_u64().unwrap() >= 2 {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 2 events delivered after {TIMEOUT:?}: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Watchdogs of tests running in parallel see each other's stand-ins: only lower bounds.
    assert_eq!(health["detector"], serde_json::json!(w.detector));
    assert!(
        health["registry"]["jobs"].as_u64().unwrap() >= 1,
        "{health}"
    );
    let status: VmaJobStatus = api.get("/api/v1/jobs/job-kill").await.json().await.unwrap();
    assert!(matches!(status.state, JobProcessState::Exited { exit, .. } if exit.signal == Some(9)));
    let log = w.stop();
    assert!(
        !log.contains(API_TOKEN) && !log.contains(OMA_TOKEN),
        "a token reached the log"
    );
    oma.stop().await;
}

/// The OMA is down while three jobs complete: the deaths wait on disk and arrive, each once,
/// when it comes up; migratekit's last update is 100 % completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deaths_while_the_oma_is_down_are_delivered_when_it_comes_up() {
    if !privileged("deaths_while_the_oma_is_down_are_delivered_when_it_comes_up") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let oma_addr = format!("127.0.0.1:{}", free_port());
    let port = free_port();
    let w = watchdog(
        dir.path(),
        port,
        &format!("http://{oma_addr}"),
        &["--standin-run-for", "1"],
    );
    let api = Api::new(port);
    let jobs = ["job-down-1", "job-down-2", "job-down-3"];
    for job in jobs {
        api.start(job).await;
    }
    for job in jobs {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let p = api.progress_at_least(job, 1).await;
            if p.update.status == Some(api::ProgressStatus::Completed) {
                assert_eq!(p.update.percent, Some(100.0));
                assert_eq!(p.update.bytes_transferred, 1_000_000_000);
                break;
            }
            assert!(Instant::now() < deadline, "{job} never reported completed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // All three have exited and wait in the outbox while delivery keeps failing.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let health = api.health().await;
        let failed = health["outbox"]["failed_attempts"].as_u64().unwrap();
        let queued = health["outbox"]["queued"].as_u64().unwrap();
        let mut exited = 0;
        for job in jobs {
            let path = format!("/api/v1/jobs/{job}");
            let status: VmaJobStatus = api.get(&path).await.json().await.unwrap();
            exited += usize::from(matches!(status.state, JobProcessState::Exited { .. }));
        }
        // Three starts and three exits at least (parallel tests' stand-ins are seen too).
        if exited == 3 && queued >= 6 && failed > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "deaths not queued: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let oma = FakeOma::start(oma_addr.parse().unwrap(), OMA_TOKEN, VMA_ID).await;
    for job in jobs {
        let (event, _) = oma
            .wait_for(TIMEOUT, |e| {
                e.job_id == job && e.kind == ProcessEventKind::ProcessExited
            })
            .await
            .expect("the queued death is delivered");
        assert_eq!(event.exit.and_then(|e| e.code), Some(0), "{event:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for job in jobs {
        assert_eq!(exits(&oma, job).len(), 1, "{job}: {:?}", oma.events_of(job));
    }
    w.stop();
    oma.stop().await;
}

/// The watchdog is SIGKILLed and restarted while migratekit runs: the process is adopted,
/// its progress keeps flowing, nothing is reported dead; its later death is reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_adopted_after_a_watchdog_sigkill_and_keeps_reporting() {
    if !privileged("a_running_job_is_adopted_after_a_watchdog_sigkill_and_keeps_reporting") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let oma = FakeOma::start("127.0.0.1:0".parse().unwrap(), OMA_TOKEN, VMA_ID).await;
    let port = free_port();
    let w = watchdog(dir.path(), port, &oma.url(), &[]);
    let api = Api::new(port);
    let p = api.start("job-adopt").await;
    let before = api.progress_at_least("job-adopt", 3).await;
    w.kill9();
    // Updates fail while it is down; migratekit carries on.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let w = watchdog(dir.path(), port, &oma.url(), &[]);
    w.wait_event("process_adopted", p.pid);
    let after = api
        .progress_at_least("job-adopt", before.sequence + 3)
        .await;
    assert!(after.update.bytes_transferred > before.update.bytes_transferred);
    let status: VmaJobStatus = api
        .get("/api/v1/jobs/job-adopt")
        .await
        .json()
        .await
        .unwrap();
    assert!(matches!(status.state, JobProcessState::Running { process, .. } if process == p));
    assert!(
        exits(&oma, "job-adopt").is_empty(),
        "{:?}",
        oma.events_of("job-adopt")
    );

    signal(p.pid, libc::SIGKILL);
    oma.wait_for(TIMEOUT, |e| {
        e.job_id == "job-adopt" && e.kind == ProcessEventKind::ProcessExited
    })
    .await
    .expect("the death of the adopted process reaches the OMA");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        exits(&oma, "job-adopt").len(),
        1,
        "{:?}",
        oma.events_of("job-adopt")
    );
    w.stop();
    oma.stop().await;
}

/// A job completes with the OMA up: its death event carries migratekit's last update (100 %
/// `completed`, the same sequence the progress API shows), so the OMA needs no poll to know it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_death_carries_the_last_progress_migratekit_posted() {
    if !privileged("a_death_carries_the_last_progress_migratekit_posted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let oma_addr = format!("127.0.0.1:{}", free_port());
    let oma = FakeOma::start(oma_addr.parse().unwrap(), OMA_TOKEN, VMA_ID).await;
    let port = free_port();
    let w = watchdog(
        dir.path(),
        port,
        &format!("http://{oma_addr}"),
        &["--standin-run-for", "1"],
    );
    let api = Api::new(port);
    let job = "job-last-word";
    api.start(job).await;
    let (event, _) = oma
        .wait_for(TIMEOUT, |e| {
            e.job_id == job && e.kind == ProcessEventKind::ProcessExited
        })
        .await
        .expect("the death is delivered");
    assert_eq!(event.exit.and_then(|e| e.code), Some(0), "{event:?}");
    let carried = event
        .last_progress
        .expect("the death carries the last progress");
    assert_eq!(carried.update.status, Some(api::ProgressStatus::Completed));
    assert_eq!(carried.update.percent, Some(100.0));
    assert_eq!(carried.update.bytes_transferred, 1_000_000_000);
    // The OMA acknowledged the death, which carries the last progress: the watchdog then
    // forgets the job's progress, so the store does not grow with every job ever run.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let response = api.get(&format!("/api/v1/progress/{job}")).await;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            let body: api::ErrorBody = response.json().await.unwrap();
            assert_eq!(body.error, "no_progress");
            break;
        }
        let shown: StoredProgress = response.json().await.unwrap();
        assert_eq!(carried, shown, "the event holds the latest update");
        assert!(Instant::now() < deadline, "progress never forgotten");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.wait_for("progress_forgotten", |v| v["event"] == "progress_forgotten");
    let started = oma
        .events_of(job)
        .into_iter()
        .find(|e| e.kind == ProcessEventKind::ProcessStarted);
    assert!(started.is_some_and(|e| e.last_progress.is_none()));
    w.stop();
    oma.stop().await;
}
