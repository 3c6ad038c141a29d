//! Progress updates from a non-loopback peer are refused (403), seen through a real socket.
//!
//! Every address on 127.0.0.0/8 is loopback, so a second address on this host cannot show
//! the refusal. The test makes its own network namespace whose `lo` also holds a
//! non-loopback address, creates both the server's listener and the client's socket inside
//! it (`setns` applies to the calling thread only), and deletes the namespace at the end.
//! No packet leaves that namespace.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use support::{JobProcess, progress_body, serve_on, sleep_launcher, state};
use vma_watchdog::http::JobsView;

const ADDRESS: &str = "10.231.77.1";

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn create() -> Result<Self, String> {
        let name = format!("vmalink-test-{}", std::process::id());
        let ns = Self(name.clone());
        ip(&["netns", "add", &name])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        // The non-loopback address sits on the namespace's own `lo`: no kernel module
        // (dummy, veth) is needed, and the peer address is still outside 127.0.0.0/8.
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ADDRESS}/32"),
            "dev",
            "lo",
        ])?;
        Ok(ns)
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a valid namespace descriptor affects this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.0]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Posts a progress update to the server through its address `via` (inside the
/// namespace) with a hand-written HTTP/1.1 request, and returns the status code. The kernel
/// uses the destination's own address as the source, so the server sees `via` as the peer.
fn post_via(via: &str, port: u16) -> u16 {
    let mut stream = TcpStream::connect((via, port)).expect("connect to the server");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let peer_seen = stream.local_addr().unwrap();
    assert_eq!(peer_seen.ip().to_string(), via);
    let body = progress_body(5).to_string();
    write!(
        stream,
        "POST /api/v1/progress/job-n/update HTTP/1.1\r\nHost: {via}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

#[tokio::test]
async fn progress_update_from_a_non_loopback_peer_is_refused() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: creating a network namespace needs root");
        return;
    }
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIP: cannot create a network namespace ({why})");
            return;
        }
    };
    let listener = ns.run(|| {
        let listener = TcpListener::bind("0.0.0.0:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    });
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let (state, jobs) = state(dir.path(), sleep_launcher());
    let server = serve_on(
        tokio::net::TcpListener::from_std(listener).unwrap(),
        state,
        jobs,
    );
    // The loopback post comes from job-n's own process, inside the namespace: progress
    // counts only from the job's process, which the watchdog finds in that process's own
    // network namespace (the server's thread is in another one).
    let netns = format!("/var/run/netns/{}", ns.0);
    let job = JobProcess::start(&["nsenter", &format!("--net={netns}")], port, "job-n");
    let identity = vma_watchdog::launcher::proc_identity(job.pid()).unwrap();
    server
        .jobs
        .register_process(
            &api::JobId::parse("job-n").unwrap(),
            identity,
            api::FoundBy::Tracked,
        )
        .unwrap();

    let remote = tokio::task::spawn_blocking(move || {
        let remote = ns.run(move || post_via(ADDRESS, port));
        let mut job = job;
        (remote, job.post(false, 5, "in_progress"), ns)
    });
    let (remote, local, _ns) = remote.await.unwrap();
    assert_eq!(remote, 403, "a peer at {ADDRESS} must be refused");
    assert_eq!(
        local, 200,
        "the job's process on a loopback address in the same namespace is accepted"
    );
    assert_eq!(server.state.progress.get("job-n").unwrap().sequence, 1);
    server.stop().await;
}
