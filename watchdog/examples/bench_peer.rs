//! What checking the caller of a progress update costs, side by side with the update itself:
//! `cargo run -p vma-watchdog --release --example bench_peer [FDS] [CONNECTIONS] [ROUNDS]`.
//!
//! This process plays migratekit: it holds FDS open files (default 300) and CONNECTIONS
//! (default 50) extra loopback TCP connections, so that both its fd table and the TCP
//! tables are of a realistic size. Then it times, ROUNDS times each (default 2,000):
//!
//! - `peer::verify` for one of its own connections (the check every update pays): the
//!   start time read twice, one exact `sock_diag` query, one readlink per fd;
//! - the same check for a process that does not hold the socket (a refusal);
//! - one read of `/proc/<pid>/net/tcp`, what the check costs more when the socket is not in
//!   the watchdog's network namespace (and what every check cost before `sock_diag`);
//! - `find_any_holder`, the search of every process on the host that a refusal's log line
//!   makes at most once a second;
//! - `ProgressStore::record` (the update's own cost without the check: encode, append,
//!   `fdatasync`);
//! - a whole `POST /api/v1/progress/{id}/update` over HTTP on loopback, check included.
//!
//! Asserts nothing.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{FoundBy, ProgressUpdate};
use vma_watchdog::http::{self, AppState, DEFAULT_BODY_LIMIT, JobsView, MemoryJobs};
use vma_watchdog::launcher::{Launcher, LauncherConfig, proc_identity};
use vma_watchdog::peer::{self, Connection};
use vma_watchdog::progress::ProgressStore;
use vma_watchdog::secret::BearerToken;

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{name:<44} p50 {:>8.1} us   p99 {:>8.1} us   max {:>8.1} us",
        pct(0.50).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        samples.last().unwrap().as_secs_f64() * 1e6,
    );
}

fn time(rounds: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn update(bytes: u64) -> ProgressUpdate {
    serde_json::from_value(serde_json::json!({
        "stage": "Transfer", "status": "in_progress", "bytes_transferred": bytes,
        "total_bytes": 10_000_000_000u64, "throughput_bps": 123_456_789, "percent": 42.5,
        "disk_id": "disk-2000", "sync_type": "incremental"
    }))
    .unwrap()
}

/// `n` loopback connections (both ends held here), like migratekit's NBD and vCenter ones.
fn connections(n: usize) -> (Vec<TcpStream>, Connection) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut held = Vec::new();
    let mut last = None;
    for _ in 0..n.max(1) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        last = Some(Connection {
            peer,
            local: server.local_addr().unwrap(),
        });
        held.extend([client, server]);
    }
    (held, last.unwrap())
}

fn bench_lookup(rounds: usize, conn: Connection) {
    let me = proc_identity(std::process::id()).unwrap();
    report(
        "peer::verify (accepted)",
        time(rounds, || {
            peer::verify(me, conn).unwrap();
        }),
    );
    let mut other = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let other_id = proc_identity(other.id()).unwrap();
    report(
        "peer::verify (refused: another process)",
        time(rounds, || {
            peer::verify(other_id, conn).unwrap_err();
        }),
    );
    let _ = other.kill();
    let _ = other.wait();
    let table = format!("/proc/{}/net/tcp", std::process::id());
    report(
        "read /proc/<pid>/net/tcp (fallback path)",
        time(rounds.min(500), || {
            std::fs::read_to_string(&table).unwrap();
        }),
    );
    let inode = peer::verify(me, conn).unwrap().inode;
    report(
        "find_any_holder (whole host, log only)",
        time(rounds.min(200), || {
            peer::find_any_holder(inode).unwrap();
        }),
    );
}

fn bench_store(rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = ProgressStore::open(dir.path()).unwrap();
    let mut i = 0;
    report(
        "ProgressStore::record (update, no check)",
        time(rounds, || {
            i += 1;
            store.record(&job_b(), update(i)).unwrap();
        }),
    );
}

/// Whole updates over HTTP from this process, registered as the job's process.
async fn bench_http(rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Arc::new(MemoryJobs::new());
    let me = proc_identity(std::process::id()).unwrap();
    jobs.register_process(&job_b(), me, FoundBy::Tracked)
        .unwrap();
    let state = AppState {
        progress: Arc::new(ProgressStore::open(dir.path()).unwrap()),
        jobs,
        launcher: Arc::new(Launcher::new(LauncherConfig::new("/bin/false"))),
        token: BearerToken::new("bench-token").unwrap().into(),
        outbox: None,
        body_limit: DEFAULT_BODY_LIMIT,
        stopped: Arc::default(),
        metrics: vma_watchdog::metrics::Metrics::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/api/v1/progress/job-b/update",
        listener.local_addr().unwrap()
    );
    tokio::spawn(http::serve(listener, state, std::future::pending()));
    let client = reqwest::Client::new();
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        let r = client
            .post(&url)
            .json(&update(i as u64))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        samples.push(t.elapsed());
    }
    report("POST progress update over HTTP (check incl.)", samples);
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (fds, conns, rounds) = (arg(1, 300), arg(2, 50), arg(3, 2000));
    let files: Vec<_> = (0..fds)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let (held, conn) = connections(conns);
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let rows = |t: &str| std::fs::read_to_string(t).map_or(0, |s| s.lines().count() - 1);
    println!(
        "{open} fds in this process; {} rows in /proc/net/tcp, {} in tcp6; {rounds} rounds",
        rows("/proc/net/tcp"),
        rows("/proc/net/tcp6")
    );
    bench_lookup(rounds, conn);
    bench_store(rounds);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(bench_http(rounds));
    drop((files, held));
}

fn job_b() -> api::JobId {
    api::JobId::parse("job-b").expect("a valid job id")
}
