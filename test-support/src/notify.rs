//! A stand-in for systemd's notification socket: a unix datagram socket the test binds and
//! hands to a daemon as `$NOTIFY_SOCKET`, which records every message the daemon sends
//! (`READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`), in order.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Received = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A bound notification socket and the messages it received.
#[derive(Debug)]
pub struct NotifySocket {
    env: String,
    received: Received,
    done: Arc<AtomicBool>,
}

impl NotifySocket {
    /// Binds `<dir>/notify.sock`, as systemd's `/run/systemd/notify`.
    pub fn bind_path(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        Self::serve(socket, path.display().to_string())
    }

    /// Binds the abstract name `name`, which a daemon gets as `@name`.
    pub fn bind_abstract(name: &str) -> std::io::Result<Self> {
        use std::os::linux::net::SocketAddrExt;
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        Self::serve(socket, format!("@{name}"))
    }

    fn serve(socket: UnixDatagram, env: String) -> std::io::Result<Self> {
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let received: Received = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let (sink, stop) = (Arc::clone(&received), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.0.lock().unwrap().push(text);
                    sink.1.notify_all();
                }
            }
        });
        Ok(Self {
            env,
            received,
            done,
        })
    }

    /// The value to give the daemon as `NOTIFY_SOCKET`.
    pub fn env(&self) -> &str {
        &self.env
    }

    /// Every message so far, in the order received.
    pub fn messages(&self) -> Vec<String> {
        self.received.0.lock().unwrap().clone()
    }

    /// Waits until `done(messages)` holds, and returns the messages then; panics with what was
    /// received after `timeout`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut got = self.received.0.lock().unwrap();
        loop {
            if done(&got) {
                return got.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no {what} within {timeout:?}; notifications received: {got:?}"
            );
            got = self.received.1.wait_timeout(got, deadline - now).unwrap().0;
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// How many of `messages` are exactly `WATCHDOG=1`.
pub fn pings(messages: &[String]) -> usize {
    messages.iter().filter(|m| *m == "WATCHDOG=1").count()
}

/// Asserts that `messages` hold `STOPPING=1` and no `WATCHDOG=1` after it: a stopping daemon
/// stops pinging.
pub fn assert_stopping_ends_pings(messages: &[String]) {
    let stopping = messages
        .iter()
        .position(|m| m.starts_with("STOPPING=1"))
        .unwrap_or_else(|| panic!("no STOPPING=1 in {messages:?}"));
    assert_eq!(
        pings(&messages[stopping..]),
        0,
        "pings after STOPPING=1: {messages:?}"
    );
}
