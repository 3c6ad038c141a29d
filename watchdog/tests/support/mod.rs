//! Shared set-up for the API tests: a real server on a real socket.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

use vma_watchdog::http::{self, AppState, DEFAULT_BODY_LIMIT, MemoryJobs};
use vma_watchdog::launcher::{Launcher, LauncherConfig, SystemdMode};
use vma_watchdog::progress::ProgressStore;
use vma_watchdog::secret::BearerToken;

pub const TOKEN: &str = "test-token-0123456789";

/// A running API server and what it serves.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    pub jobs: Arc<MemoryJobs>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops the server and waits until it has closed its listener.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A launcher that runs `/bin/sleep {seconds}` and tracks processes named `sleep`.
pub fn sleep_launcher() -> LauncherConfig {
    let mut config = LauncherConfig::new("/bin/sleep");
    config.args = vec!["{seconds}".into()];
    config.match_names = vec!["sleep".into()];
    config.systemd = SystemdMode::Never;
    config
}

pub fn state(dir: &Path, launcher: LauncherConfig) -> (AppState, Arc<MemoryJobs>) {
    let jobs = Arc::new(MemoryJobs::new());
    let state = AppState {
        progress: Arc::new(ProgressStore::open(dir).unwrap()),
        jobs: jobs.clone(),
        launcher: Arc::new(Launcher::new(launcher)),
        token: BearerToken::new(TOKEN).unwrap().into(),
        outbox: None,
        body_limit: DEFAULT_BODY_LIMIT,
        stopped: Arc::default(),
        metrics: vma_watchdog::metrics::Metrics::new(),
    };
    (state, jobs)
}

/// Serves on an already bound listener.
pub fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    jobs: Arc<MemoryJobs>,
) -> Server {
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(http::serve(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        state,
        jobs,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Serves on `127.0.0.1:0`.
pub async fn start(dir: &Path, launcher: LauncherConfig) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (state, jobs) = state(dir, launcher);
    serve_on(listener, state, jobs)
}

pub fn progress_body(bytes: u64) -> serde_json::Value {
    serde_json::json!({
        "stage": "Transfer", "status": "in_progress", "bytes_transferred": bytes,
        "total_bytes": 1000, "throughput_bps": 100, "percent": bytes as f64 / 10.0,
        "disk_id": "disk-2000", "sync_type": "full"
    })
}

/// `GET url` with the token, decoded as `T`.
pub async fn get_json<T: serde::de::DeserializeOwned>(client: &reqwest::Client, url: &str) -> T {
    client
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The signal that ended the job's process, once the API reports it exited (at most 10 s).
pub async fn exit_signal(client: &reqwest::Client, url: &str) -> Option<i32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let job: api::VmaJobStatus = get_json(client, url).await;
        if let api::JobProcessState::Exited { exit, .. } = job.state {
            return exit.signal;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the death was never recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A bash process that posts progress for a job when told to, one line on stdin per post
/// (`self BYTES STATUS` or `child BYTES STATUS`), and prints each answer's status code.
/// `self` posts from bash itself (`/dev/tcp` and builtins: no other process is involved),
/// so it is the process that was registered; `child` posts through a `curl` it starts.
const POSTER: &str = r#"
port=$1; job=$2
while read -r mode bytes status; do
  body="{\"stage\":\"Transfer\",\"status\":\"$status\",\"bytes_transferred\":$bytes,\"total_bytes\":1000,\"throughput_bps\":100,\"disk_id\":\"disk-2000\",\"sync_type\":\"full\"}"
  if [ "$mode" = child ]; then
    curl -s -o /dev/null -w '%{http_code}\n' --data-binary "$body" "http://127.0.0.1:$port/api/v1/progress/$job/update"
  else
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'POST /api/v1/progress/%s/update HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' "$job" "${#body}" "$body" >&3
    read -r _ code _ <&3
    exec 3<&-
    echo "$code"
  fi
done
"#;

/// The job's own process: the bash [`POSTER`], registered for the job.
pub struct JobProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl JobProcess {
    /// Starts it; `prefix` is a command that execs it (`ip netns exec NAME`), or empty.
    pub fn start(prefix: &[&str], port: u16, job: &str) -> Self {
        let command = [prefix, &["/bin/bash", "-c", POSTER, "poster"]].concat();
        let mut child = Command::new(command[0])
            .args(&command[1..])
            .args([&port.to_string(), job])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start bash");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// Its pid (the prefix execs, so it is bash's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Posts `bytes` with `status` (from itself, or from a child when `from_child`).
    pub fn post(&mut self, from_child: bool, bytes: u64, status: &str) -> u16 {
        let mode = if from_child { "child" } else { "self" };
        writeln!(self.stdin, "{mode} {bytes} {status}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("no status code from the poster: {line:?}"))
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
