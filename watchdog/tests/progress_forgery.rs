//! Forged progress updates, made the way an attacker on the VMA would: from other real
//! processes of the same user, from a child of the job's process, and from another real user.
//! Each is refused (403 `not_job_process`) and changes nothing; the job's own process still
//! reports. Real sockets, real processes.

mod common;
mod support;

use std::process::Command;

use api::{ErrorBody, FoundBy, ProgressStatus};
use support::{JobProcess, Server, sleep_launcher, start};
use vma_watchdog::http::JobsView;
use vma_watchdog::launcher::proc_identity;

/// The user the cross-user tests forge as (created when missing; root only).
const FORGER: &str = "mkit-test-forger";

/// A forged update (`status: failed`) for `job` from a new `curl` process, run as `uid`
/// when given. Returns the status code and the body of the answer.
fn forge(url: &str, uid: Option<(u32, u32)>) -> (u16, String) {
    let body = r#"{"stage":"FORGED-STAGE-MARKER","status":"failed","bytes_transferred":1,"throughput_bps":0,"error_message":"forged"}"#;
    let mut curl = Command::new("curl");
    curl.args(["-s", "-w", "\n%{http_code}", "--data-binary", body, url]);
    if let Some((uid, gid)) = uid {
        use std::os::unix::process::CommandExt;
        // As root, std drops the supplementary groups too when it switches the uid.
        curl.uid(uid).gid(gid);
    }
    let out = curl.output().expect("run curl");
    let text = String::from_utf8(out.stdout).unwrap();
    let (answer, code) = text.rsplit_once('\n').expect("a status code");
    (code.trim().parse().unwrap(), answer.to_owned())
}

fn assert_refused((code, body): (u16, String), who: &str) {
    assert_eq!(code, 403, "{who}: {body}");
    let body: ErrorBody = serde_json::from_str(&body).unwrap();
    assert_eq!(body.error, "not_job_process", "{who}");
    assert!(
        body.message.contains("progress is accepted only"),
        "{who}: {}",
        body.message
    );
}

/// Whether `curl` (the forger's tool) is installed. `cargo xtask setup` installs it, so in CI
/// (`CI` set) a missing curl is a failure, not a skip.
fn curl_available() -> bool {
    let present = Command::new("curl").arg("--version").output().is_ok();
    assert!(
        present || std::env::var_os("CI").is_none(),
        "curl is missing in CI: `cargo xtask setup` installs it"
    );
    present
}

async fn refused_count(server: &Server) -> u64 {
    let health: serde_json::Value = reqwest::get(server.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    health["progress"]["refused_updates"].as_u64().unwrap()
}

/// A server and job `job-a` registered as a running [`JobProcess`] that has reported once.
async fn job_a(dir: &std::path::Path) -> (Server, JobProcess) {
    let server = start(dir, sleep_launcher()).await;
    let job = JobProcess::start(&[], server.addr.port(), "job-a");
    let identity = proc_identity(job.pid()).unwrap();
    server
        .jobs
        .register_process(
            &api::JobId::parse("job-a").unwrap(),
            identity,
            FoundBy::Tracked,
        )
        .unwrap();
    (server, job)
}

/// The job's own process posts; the answer comes on a blocking thread (bash is synchronous).
async fn post_from_job(
    job: JobProcess,
    from_child: bool,
    bytes: u64,
    status: &'static str,
) -> (JobProcess, u16) {
    tokio::task::spawn_blocking(move || {
        let mut job = job;
        let code = job.post(from_child, bytes, status);
        (job, code)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_updates_from_other_processes_of_the_same_user_are_refused() {
    if !curl_available() {
        eprintln!("SKIP: curl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, job) = job_a(dir.path()).await;
    let (job, code) = post_from_job(job, false, 100, "in_progress").await;
    assert_eq!(code, 200, "the job's own process reports");
    let before = server.state.progress.get("job-a").unwrap();
    let refused_before = refused_count(&server).await;

    let url = server.url("/api/v1/progress/job-a/update");
    let forged = tokio::task::spawn_blocking(move || forge(&url, None));
    assert_refused(forged.await.unwrap(), "another process of the same user");
    // A child of the job's process holds its own socket: it is not the registered process.
    let (job, code) = post_from_job(job, true, 900, "failed").await;
    assert_eq!(code, 403, "a child of the job's process");
    // A job nobody registered has no process whose updates could count.
    let url = server.url("/api/v1/progress/job-nobody/update");
    let unknown = tokio::task::spawn_blocking(move || forge(&url, None));
    assert_refused(unknown.await.unwrap(), "an unregistered job");

    assert_eq!(server.state.progress.get("job-a").unwrap(), before);
    assert!(server.state.progress.get("job-nobody").is_none());
    // Other tests of this file refuse updates too: the counter only grows.
    assert!(refused_count(&server).await >= refused_before + 3);

    let (_job, code) = post_from_job(job, false, 200, "in_progress").await;
    assert_eq!(code, 200, "the job's own process still reports");
    let after = server.state.progress.get("job-a").unwrap();
    assert_eq!(
        (after.sequence, after.update.bytes_transferred),
        (before.sequence + 1, 200)
    );
    assert_eq!(after.update.status, Some(ProgressStatus::InProgress));
    server.stop().await;
}

/// The forger's uid and gid, creating the user when it does not exist.
fn forger() -> Result<(u32, u32), String> {
    test_support::ensure_user(FORGER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_updates_from_another_user_are_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: forging as another user needs root (to create the user and switch to it)");
        return;
    }
    if !curl_available() {
        eprintln!("SKIP: curl is not installed");
        return;
    }
    let (uid, gid) = match forger() {
        Ok(ids) => ids,
        Err(why) => {
            eprintln!("SKIP: cannot create the user {FORGER}: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let (server, job) = job_a(dir.path()).await;
    let (job, code) = post_from_job(job, false, 100, "in_progress").await;
    assert_eq!(code, 200);
    let before = server.state.progress.get("job-a").unwrap();

    let url = server.url("/api/v1/progress/job-a/update");
    let forged = tokio::task::spawn_blocking(move || forge(&url, Some((uid, gid))));
    assert_refused(forged.await.unwrap(), "another user");
    assert_eq!(server.state.progress.get("job-a").unwrap(), before);

    let (_job, code) = post_from_job(job, false, 300, "in_progress").await;
    assert_eq!(code, 200, "the job's own process still reports");
    let after = server.state.progress.get("job-a").unwrap();
    assert_eq!(
        (after.sequence, after.update.bytes_transferred),
        (before.sequence + 1, 300)
    );
    server.stop().await;
}

const API_TOKEN: &str = "api-token-forgery-4d1";

/// SIGKILLs a pid when dropped (the test's stand-in, whatever way the test ends).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions. Not `common::signal`, which
        // panics on failure: a panic while a failed test unwinds would abort the run.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

/// The real watchdog on `127.0.0.1:port`, launching stand-ins whose leader thread exits right
/// after start (the workers run on and report progress every 100 ms): the harder case for
/// the lookup, whose leader's `/proc/<pid>/fd` then lists nothing.
fn leaderless_watchdog(state: &std::path::Path, port: u16) -> common::WatchdogProcess {
    let listen = format!("127.0.0.1:{port}");
    let progress = format!("http://127.0.0.1:{port}");
    let program = common::standin_bin();
    let mut args = vec![
        "--listen",
        &listen,
        "--api-token",
        API_TOKEN,
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
        "--standin-leader-exit",
    ];
    for arg in &template {
        args.extend(["--launch-arg", arg]);
    }
    common::WatchdogProcess::start_with(
        state,
        "auto",
        &args,
        &[("MIGRATEKIT_STANDIN_PROGRESS_URL", &progress)],
    )
}

/// The job's latest progress once it has at least `sequence` updates.
async fn progress_at_least(base: &str, job: &str, sequence: u64) -> api::StoredProgress {
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        let r = http
            .get(format!("{base}/api/v1/progress/{job}"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            let p: api::StoredProgress = r.json().await.unwrap();
            if p.sequence >= sequence {
                return p;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{job}: fewer than {sequence} updates"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standins_own_updates_count_and_forged_ones_are_refused_and_logged() {
    if !common::privileged("the_standins_own_updates_count_and_forged_ones_are_refused_and_logged")
        || !curl_available()
    {
        return;
    }
    let Ok((uid, gid)) = forger() else {
        eprintln!("SKIP: cannot create the user {FORGER}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = test_support::free_port([127, 0, 0, 1].into()).unwrap();
    let w = leaderless_watchdog(dir.path(), port);
    let base = format!("http://127.0.0.1:{port}");
    let started = reqwest::Client::new()
        .post(format!("{base}/api/v1/jobs/job-r/start"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 201);
    let status: api::VmaJobStatus = started.json().await.unwrap();
    let api::JobProcessState::Running { process, .. } = status.state else {
        panic!("job-r is not running: {status:?}");
    };
    // The stand-in outlives the watchdog (its own session): it must not outlive the test.
    let _standin = KillOnDrop(process.pid);
    let first = progress_at_least(&base, "job-r", 2).await;

    let url = format!("{base}/api/v1/progress/job-r/update");
    let forged =
        tokio::task::spawn_blocking(move || (forge(&url, Some((uid, gid))), forge(&url, None)));
    let (as_forger, as_root) = forged.await.unwrap();
    assert_refused(as_forger, "another user");
    assert_refused(as_root, "another process of root");

    let line = w.wait_for("progress_refused", |v| {
        v["event"] == "progress_refused" && v["job_id"] == "job-r" && v["peer_uid"] == uid
    });
    assert!(
        line["reason"].as_str().unwrap().contains("not held by pid"),
        "{line}"
    );
    w.wait_for("a second progress_refused", |v| {
        v["event"] == "progress_refused" && v["peer_uid"] == 0
    });
    // The stand-in's own updates (from a worker thread; its leader has exited) go on.
    let later = progress_at_least(&base, "job-r", first.sequence + 3).await;
    assert_ne!(later.update.status, Some(ProgressStatus::Failed));
    assert_ne!(later.update.stage, "FORGED-STAGE-MARKER");
    let health: serde_json::Value = reqwest::get(format!("{base}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["progress"]["refused_updates"], 2, "{health}");
    let log = w.stop();
    assert!(
        !log.contains("FORGED-STAGE-MARKER"),
        "a refused body reached the log"
    );
}
