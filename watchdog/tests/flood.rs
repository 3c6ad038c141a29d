//! Privileged: 5,000 idle TCP connections against the real `vma-watchdog` running under a
//! low file limit. Before the connection cap, 2,000 such connections made it hit EMFILE: its
//! `/proc` scans failed and a migratekit went unseen. Now it holds at most what fits under its
//! limit, closes idle connections after the header timeout, keeps descriptors for its own
//! work, still answers `/health` and still sees a real stand-in start and die, with its
//! memory bounded. Run: `cargo test -p vma-watchdog --test flood` as root.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Standin, WatchdogProcess, privileged, secret};
use tokio::io::AsyncReadExt;

const CONNECTIONS: usize = 5_000;
/// The watchdog's soft file limit at start: a service's default (systemd's `LimitNOFILE=`
/// soft value), under which 2,000 connections exhausted it.
const WATCHDOG_NOFILE: u64 = 1024;

/// Sets this process's soft file limit (the hard one stays: raising it back needs
/// CAP_SYS_RESOURCE, which a container's root may lack).
fn set_soft_nofile(soft: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let limit = libc::rlimit {
        rlim_cur: soft.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we own.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// A process's resident memory in KiB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Starts the watchdog with a soft file limit of [`WATCHDOG_NOFILE`] (inherited from this
/// process, whose own limit is lowered for the spawn only) and idle connections cut after
/// 3 s. It raises its own limit to fit its connection cap.
fn start_low_limit(state: &std::path::Path) -> WatchdogProcess {
    set_soft_nofile(WATCHDOG_NOFILE);
    let args = ["--listen", "127.0.0.1:0", "--header-timeout-secs", "3"];
    let w = WatchdogProcess::start_with(state, "procfs", &args, &[]);
    // The test itself needs a descriptor per connection.
    set_soft_nofile(u64::MAX);
    w
}

/// The watchdog's soft file limit (`Max open files` of `/proc/<pid>/limits`).
fn nofile_of(pid: u32) -> usize {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Opens one idle connection (waiting as long as the watchdog's backlog makes it) and holds
/// it until the watchdog closes it.
async fn idle_client(addr: std::net::SocketAddr, established: Arc<AtomicUsize>) {
    let connect = tokio::net::TcpStream::connect(addr);
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(120), connect).await else {
        return;
    };
    established.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(120), stream.read(&mut buf)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_neither_exhaust_the_watchdog_nor_hide_a_death() {
    if !privileged("five_thousand_idle_connections") {
        return;
    }
    common::standin_bin();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let w = start_low_limit(&dir.path().join("state"));
    let pid = w.pid();
    let addr = w.api_addr();
    let cap = w.wait_for("connection_limits", |v| v["event"] == "connection_limits");
    let cap = cap["max_connections"].as_u64().unwrap() as usize;
    let nofile = nofile_of(pid);
    let (rss_before, fds_before) = (rss_kib(pid), open_fds(pid));

    let established = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(idle_client(addr, established.clone())))
        .collect();
    // Saturated: the watchdog holds its whole cap of connections and says so. (Its fd count
    // is sampled too, for the figures: on a loaded machine idle connections are cut as fast as
    // new ones come in, so a sample may fall just after a cut.)
    let saturated = tokio::task::block_in_place(|| {
        w.wait_for("connections_at_capacity", |v| {
            v["event"] == "connections_at_capacity"
        })
    });
    assert_eq!(saturated["max"].as_u64(), Some(cap as u64), "{saturated}");
    let (fds_during, rss_during) = (open_fds(pid), rss_kib(pid));

    // A migratekit started during the flood is found by the `/proc` scan, and its death seen.
    let (w, started_s, died_s) = tokio::task::block_in_place(|| {
        let t = Instant::now();
        let s = Standin::start(dir.path(), "job-flood", &secret(), &[]);
        w.wait_event("process_started", s.pid);
        let started = t.elapsed().as_secs_f64();
        s.kill(libc::SIGKILL);
        let t = Instant::now();
        let died = w.wait_event("process_exited", s.pid);
        assert_eq!(died["job_id"], "job-flood");
        (w, started, t.elapsed().as_secs_f64())
    });
    let t = Instant::now();
    let health = reqwest::Client::new()
        .get(format!("http://{addr}/health"))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("/health is answered during the flood");
    assert!(health.status().is_success());
    let health_s = t.elapsed().as_secs_f64();
    let rss_peak = rss_during.max(rss_kib(pid));
    // Every client gets in eventually, as idle ones are cut; a few of those the kernel
    // completed with a SYN cookie while the backlog was full never reach the watchdog and
    // wait for their read timeout, so the rest is not awaited once all have connected.
    let deadline = Instant::now() + Duration::from_secs(90);
    while established.load(Ordering::Relaxed) < CONNECTIONS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    flood.iter().for_each(|task| task.abort());
    let opened = established.load(Ordering::Relaxed);
    println!(
        "flood: {opened}/{CONNECTIONS} connections opened; cap {cap}, file limit {nofile} \
         (raised from {WATCHDOG_NOFILE}); watchdog fds {fds_before} before, {fds_during} saturated; VmRSS \
         {rss_before} KiB before, {rss_peak} KiB at most during; stand-in seen started after \
         {started_s:.2} s, dead after {died_s:.2} s; /health answered in {health_s:.2} s"
    );
    assert_eq!(opened, CONNECTIONS, "every connection got in eventually");
    assert!(fds_during < nofile, "{fds_during} fds of {nofile}");
    assert!(
        rss_peak < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_peak} KiB"
    );
    let log = w.stop();
    assert!(
        !log.contains("\"accept_failed\""),
        "the watchdog ran out of descriptors"
    );
}
