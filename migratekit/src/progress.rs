//! Progress reporting exactly as migratekit's own client does it: `POST
//! http://localhost:8081/api/v1/progress/{job_id}/update` with a JSON body, no credentials,
//! a 5 s timeout, the job id from `MIGRATEKIT_PROGRESS_JOB_ID`, HTTP 200 expected.
//!
//! A plain blocking HTTP/1.1 client over `TcpStream`: one connection per update, closed
//! after the answer. Failures are reported on stderr (the first, then every 20th) and never
//! stop the stand-in.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The real client's base URL.
pub const DEFAULT_URL: &str = "http://localhost:8081";
/// The environment variable the real client reads its job id from.
pub const JOB_ENV: &str = "MIGRATEKIT_PROGRESS_JOB_ID";
/// The real client's timeout for one update.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A base URL that is not `http://host[:port][/prefix]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--standin-progress-url must look like http://host:port (got {0:?})")]
pub struct BadUrl(pub String);

/// Where updates go: host, port and the full request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
    path: String,
}

impl Target {
    /// `base` (`http://host[:port][/prefix]`) plus the progress path of `job_id`.
    pub fn new(base: &str, job_id: &str) -> Result<Self, BadUrl> {
        let bad = || BadUrl(base.to_owned());
        let rest = base.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = port.map_or(Ok(80), |p| p.parse().map_err(|_| bad()))?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path: format!(
                "{}/api/v1/progress/{job_id}/update",
                prefix.trim_end_matches('/')
            ),
        })
    }
}

/// The simulated copy and its reports.
#[derive(Debug)]
pub struct Reporter {
    target: Target,
    total_bytes: u64,
    rate: u64,
    started: Instant,
    /// Set once `completed` is posted, so a late periodic update never follows it.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    finished: bool,
    failures: u64,
}

impl Reporter {
    /// A copy of `total_bytes` at `rate` bytes/s, starting now.
    pub fn new(target: Target, total_bytes: u64, rate: u64) -> Self {
        Self {
            target,
            total_bytes: total_bytes.max(1),
            rate,
            started: Instant::now(),
            state: Mutex::new(State::default()),
        }
    }

    /// Posts the current `in_progress` update (nothing once `completed` was posted).
    pub fn report(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.finished {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = ((self.rate as f64 * elapsed) as u64).min(self.total_bytes);
        let body = self.body("in_progress", done, self.rate);
        self.send(&mut state, &body);
    }

    /// Posts 100 % `completed`; later `report` calls do nothing. Returns whether the
    /// watchdog took it (HTTP 200).
    pub fn complete(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.finished = true;
        let body = self.body("completed", self.total_bytes, 0);
        self.send(&mut state, &body)
    }

    fn body(&self, status: &str, done: u64, throughput: u64) -> String {
        let percent = done as f64 * 100.0 / self.total_bytes as f64;
        format!(
            r#"{{"stage":"Transfer","status":"{status}","bytes_transferred":{done},"total_bytes":{},"throughput_bps":{throughput},"percent":{percent:.2},"disk_id":"disk-2000","sync_type":"full"}}"#,
            self.total_bytes
        )
    }

    /// Posts `body`; returns whether it was taken (HTTP 200).
    fn send(&self, state: &mut State, body: &str) -> bool {
        match post(&self.target, body) {
            Ok(200) => {
                if state.failures > 0 {
                    eprintln!(
                        "migratekit-standin: progress updates work again after {} failures",
                        state.failures
                    );
                }
                state.failures = 0;
                true
            }
            result => {
                if state.failures.is_multiple_of(20) {
                    let why = match result {
                        Ok(status) => format!("HTTP {status}"),
                        Err(e) => e.to_string(),
                    };
                    eprintln!(
                        "migratekit-standin: progress update to {}:{}{} failed: {why}",
                        self.target.host, self.target.port, self.target.path
                    );
                }
                state.failures += 1;
                false
            }
        }
    }
}

/// One `POST` within [`TIMEOUT`]; returns the HTTP status. Every address of the host is
/// tried in turn (`localhost` may be `::1` and `127.0.0.1`), as Go's dialer does.
pub fn post(target: &Target, body: &str) -> std::io::Result<u16> {
    let deadline = Instant::now() + TIMEOUT;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
    };
    let mut last = None;
    let mut stream = None;
    for addr in (target.host.as_str(), target.port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, left()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = stream.ok_or_else(|| {
        last.unwrap_or_else(|| std::io::Error::other("the host name has no address"))
    })?;
    let host = if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    };
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: migratekit-standin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        target.path,
        body.len()
    );
    stream.set_write_timeout(Some(left()?))?;
    stream.write_all(request.as_bytes())?;
    stream.set_read_timeout(Some(left()?))?;
    // The status line is all that matters; read until it is complete.
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed() {
        let t = Target::new("http://localhost:8081", "j-1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("localhost", 8081));
        assert_eq!(t.path, "/api/v1/progress/j-1/update");
        let t = Target::new("http://[::1]:9/base/", "j").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert_eq!(t.path, "/base/api/v1/progress/j/update");
        assert_eq!(Target::new("http://h", "j").unwrap().port, 80);
        assert!(Target::new("https://h:1", "j").is_err());
        assert!(Target::new("http://:1", "j").is_err());
        assert!(Target::new("http://h:x", "j").is_err());
    }

    #[test]
    fn a_post_reaches_a_real_socket_and_reads_the_status() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&got).contains("\"sync_type\":\"full\"}") {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let r = Reporter::new(
            Target::new(&format!("http://127.0.0.1:{port}"), "j").unwrap(),
            1000,
            10,
        );
        assert!(r.complete(), "the 200 answer counts as taken");
        let request = server.join().unwrap();
        assert!(request.starts_with("POST /api/v1/progress/j/update HTTP/1.1\r\n"));
        assert!(!request.to_ascii_lowercase().contains("authorization"));
        assert!(
            request.contains(r#""status":"completed","bytes_transferred":1000,"total_bytes":1000"#),
            "{request}"
        );
        assert!(request.contains(r#""percent":100.00"#));
        assert_eq!(r.state.lock().unwrap().failures, 0);
        // Nothing listens any more: a failure is counted, not fatal; nothing follows completed.
        r.report();
        assert_eq!(
            r.state.lock().unwrap().failures,
            0,
            "no update after completed"
        );
    }
}
