//! What the watchdog keeps is nobody else's: its tokens are not in migratekit's environment
//! nor in its own once read, its state directory is 0700 with every file 0600 (also when the
//! directory existed with a wider mode), and a token file other users may read is named in
//! a warning that reaches the log. The real binary and the real stand-in, as root.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{TIMEOUT, WatchdogProcess, privileged, standin_bin};

const API_TOKEN: &str = "api-token-env-secret-93f1";
const OMA_TOKEN: &str = "oma-token-file-secret-4ab7";

/// A watchdog whose API token comes from `VMA_WATCHDOG_API_TOKEN` and whose OMA token comes
/// from a file named by `VMA_WATCHDOG_OMA_TOKEN_FILE`, made 0644 on purpose. Its OMA does not
/// listen: deaths stay queued, which changes nothing here.
fn watchdog(root: &Path, state: &Path) -> (WatchdogProcess, u16, std::path::PathBuf) {
    let token_file = root.join("oma.token");
    std::fs::write(&token_file, format!("{OMA_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = test_support::free_port([127, 0, 0, 1].into()).unwrap();
    let oma_port = test_support::free_port([127, 0, 0, 1].into()).unwrap();
    let (listen, oma_url) = (
        format!("127.0.0.1:{port}"),
        format!("http://127.0.0.1:{oma_port}"),
    );
    let progress = format!("http://127.0.0.1:{port}");
    let program = standin_bin();
    let mut args = vec!["--listen", &listen, "--oma-url", &oma_url];
    args.extend([
        "--launch-no-systemd",
        "--launch-program",
        program.to_str().unwrap(),
    ]);
    for arg in [
        "migrate",
        "--job-id",
        "{job_id}",
        "--standin-progress-interval-ms",
        "100",
    ] {
        args.extend(["--launch-arg", arg]);
    }
    let w = WatchdogProcess::start_with(
        state,
        "procfs",
        &args,
        &[
            ("VMA_WATCHDOG_API_TOKEN", API_TOKEN),
            // Not a secret: the watchdog keeps it, migratekit does not get it either.
            ("VMA_WATCHDOG_VMA_ID", "vma-private-state"),
            ("VMA_WATCHDOG_OMA_TOKEN_FILE", token_file.to_str().unwrap()),
            ("MIGRATEKIT_STANDIN_PROGRESS_URL", &progress),
        ],
    );
    (w, port, token_file)
}

/// Starts `job` through the API; returns its pid.
async fn start_job(port: u16, job: &str) -> u32 {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v1/jobs/{job}/start"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let status: api::VmaJobStatus = response.json().await.unwrap();
    match status.state {
        api::JobProcessState::Running { process, .. } => process.pid,
        other => panic!("not running: {other:?}"),
    }
}

/// Kills the stand-in when dropped, however the test ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

fn environ(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned()
}

fn umask_of(pid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    line["Umask:".len()..].trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_in_no_environment_and_a_shared_token_file_is_logged() {
    if !privileged("tokens_are_in_no_environment_and_a_shared_token_file_is_logged") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (w, port, token_file) = watchdog(root.path(), &root.path().join("state"));
    let pid = start_job(port, "job-env").await;
    let _kill = KillOnDrop(pid);
    let child = environ(pid);
    assert!(child.contains("MIGRATEKIT_JOB_ID=job-env"), "{child}");
    for secret in [
        API_TOKEN,
        OMA_TOKEN,
        "VMA_WATCHDOG_",
        token_file.to_str().unwrap(),
    ] {
        assert!(
            !child.contains(secret),
            "{secret} in migratekit's environment"
        );
    }
    // The watchdog's own: removed once read, the values overwritten in place, since the
    // kernel shows the memory the process started with.
    let own = environ(w.pid());
    for secret in [API_TOKEN, token_file.to_str().unwrap()] {
        assert!(
            !own.contains(secret),
            "{secret} in the watchdog's environment"
        );
    }
    assert!(
        own.contains("VMA_WATCHDOG_VMA_ID=vma-private-state"),
        "{own}"
    );
    let scrubbed = w.wait_for("environment_scrubbed", |v| {
        v["event"] == "environment_scrubbed"
    });
    let names = scrubbed["variables"].as_str().unwrap();
    assert!(names.contains("VMA_WATCHDOG_API_TOKEN") && names.contains("_OMA_TOKEN_FILE"));
    // Read before logging started, logged once it had.
    let shared = w.wait_for("secret_file_shared", |v| v["event"] == "secret_file_shared");
    assert_eq!(shared["file"], token_file.to_str().unwrap());
    assert_eq!(shared["mode"], "0644");
    assert_eq!(shared["level"], "WARN");
    let log = w.stop();
    for secret in [API_TOKEN, OMA_TOKEN] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_of_the_state_dir_is_private_and_a_wide_dir_is_fixed() {
    if !privileged("every_file_of_the_state_dir_is_private_and_a_wide_dir_is_fixed") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (w, port, _) = watchdog(root.path(), &state);
    let fixed = w.wait_for("state_dir_mode_fixed", |v| {
        v["event"] == "state_dir_mode_fixed"
    });
    assert_eq!(
        (fixed["was"].as_str(), fixed["now"].as_str()),
        (Some("0755"), Some("0700"))
    );
    let pid = start_job(port, "job-modes").await;
    let _kill = KillOnDrop(pid);
    // The registry, the outbox (a start event) and the progress log all exist by now.
    let deadline = Instant::now() + TIMEOUT;
    while !state.join("progress.jsonl").exists()
        || std::fs::metadata(state.join("progress.jsonl"))
            .unwrap()
            .len()
            == 0
    {
        assert!(Instant::now() < deadline, "no progress stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // migratekit gets the umask the watchdog was started with, not the watchdog's 0077.
    assert_eq!(umask_of(&pid.to_string()), umask_of("self"));
    assert_eq!(umask_of(&w.pid().to_string()), "0077");
    let mut seen = Vec::new();
    check_modes(&state, &mut seen);
    for name in ["registry.json", "progress.jsonl", "outbox/events.jsonl"] {
        assert!(
            seen.iter().any(|p| p.ends_with(name)),
            "{name} not found in {seen:?}"
        );
    }
    w.stop();
}

/// Asserts 0700 for `dir` and every directory below it, 0600 for every file; lists them.
fn check_modes(dir: &Path, seen: &mut Vec<std::path::PathBuf>) {
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            check_modes(&path, seen);
        } else {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
        seen.push(path);
    }
}
