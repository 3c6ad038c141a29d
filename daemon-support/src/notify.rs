//! systemd's readiness and watchdog protocol (`sd_notify(3)`), spoken by both daemons the same
//! way: `READY=1` once a daemon serves, `STATUS=` lines for `systemctl status`,
//! `RELOADING=1` around a SIGHUP reload, `STOPPING=1` at shutdown, and `WATCHDOG=1` only while
//! every loop of the daemon is making progress.
//!
//! The protocol is one datagram per message on the unix socket named by `$NOTIFY_SOCKET` (a
//! path, or an abstract name written `@name`). Without that variable (no systemd, or a unit of
//! another `Type=`) every call here does nothing.
//!
//! **Liveness.** Each loop of a daemon holds a [`Heartbeat`] and stamps it every time it goes
//! round; an idle wait stamps it too through [`Heartbeat::waiting`], so a loop that has nothing
//! to do is not taken for a stuck one. A thread of its own ([`start`]) sends `WATCHDOG=1` every
//! half of `$WATCHDOG_USEC`, but only when every live heartbeat is fresh (stamped within that
//! half period). A loop blocked inside its work (a write to a frozen file system, a database
//! lock that is never released, a deadlock) stops stamping, the pings stop, and systemd restarts
//! the daemon once `WatchdogSec=` has passed. The pinging thread is not a tokio task, so a
//! runtime whose every worker is blocked cannot keep pinging either.

use std::future::Future;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The variables systemd sets for a notifying service; read once and removed, so that a child
/// (migratekit) can neither inherit nor misuse them.
const SOCKET_VAR: &str = "NOTIFY_SOCKET";
const WATCHDOG_USEC_VAR: &str = "WATCHDOG_USEC";
const WATCHDOG_PID_VAR: &str = "WATCHDOG_PID";

/// The longest time between two stamps of an idle loop: short enough for any sensible
/// `WatchdogSec=`, long enough to cost nothing.
const MAX_BEAT_PERIOD: Duration = Duration::from_secs(1);

/// Why the notification socket named by `$NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The variable holds something that is not a socket address.
    #[error(
        "NOTIFY_SOCKET={value:?} is not a unix socket path or an abstract name (@name): {source}; start the daemon from its systemd unit or unset NOTIFY_SOCKET"
    )]
    Address {
        /// The variable's value.
        value: String,
        /// Why the address is refused.
        #[source]
        source: io::Error,
    },
    /// No datagram socket could be made.
    #[error("cannot create the socket for systemd's notifications: {0}")]
    Socket(#[source] io::Error),
    /// `$WATCHDOG_USEC` is not a positive number of microseconds.
    #[error(
        "WATCHDOG_USEC={0:?} is not a positive number of microseconds; check WatchdogSec= in the unit"
    )]
    WatchdogUsec(String),
}

/// What [`take_from_env`] found: where notifications go, and the watchdog period when systemd
/// asked for pings. For the daemon's start-up log line.
#[derive(Debug, Clone)]
pub struct Active {
    /// The socket (`$NOTIFY_SOCKET`).
    pub socket: String,
    /// `WatchdogSec=` (from `$WATCHDOG_USEC`), when systemd expects pings.
    pub watchdog: Option<Duration>,
}

impl Active {
    /// How often `WATCHDOG=1` is sent: half of `WatchdogSec=`, as `sd_watchdog_enabled(3)`
    /// recommends.
    pub fn ping_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }
}

#[derive(Debug)]
struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    active: Active,
}

static NOTIFIER: OnceLock<Notifier> = OnceLock::new();

/// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (the latter only when `$WATCHDOG_PID`, if set,
/// names this process), removes all three from the environment, and makes every later call of
/// this module talk to that socket. `Ok(None)` when systemd is not listening.
///
/// # Safety
///
/// Only while the process runs a single thread: it changes the environment, which
/// `setenv(3)` does not allow while another thread may read it.
pub unsafe fn take_from_env() -> Result<Option<Active>, NotifyError> {
    let socket = std::env::var(SOCKET_VAR).ok();
    let usec = std::env::var(WATCHDOG_USEC_VAR).ok();
    let for_pid = std::env::var(WATCHDOG_PID_VAR).ok();
    for name in [SOCKET_VAR, WATCHDOG_USEC_VAR, WATCHDOG_PID_VAR] {
        // SAFETY: single-threaded, the caller's promise.
        unsafe { std::env::remove_var(name) };
    }
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let ours = for_pid.is_none_or(|pid| pid.trim() == std::process::id().to_string());
    let watchdog = match usec.filter(|_| ours) {
        None => None,
        Some(text) => match text.trim().parse::<u64>() {
            Ok(us) if us > 0 => Some(Duration::from_micros(us)),
            _ => return Err(NotifyError::WatchdogUsec(text)),
        },
    };
    let address = address(&socket).map_err(|source| NotifyError::Address {
        value: socket.clone(),
        source,
    })?;
    let datagram = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
    let active = Active { socket, watchdog };
    let _ = NOTIFIER.set(Notifier {
        socket: datagram,
        address,
        active: active.clone(),
    });
    Ok(Some(active))
}

/// The socket address `$NOTIFY_SOCKET` names: a path, or with a leading `@` an abstract name.
fn address(value: &str) -> io::Result<SocketAddr> {
    match value.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None if value.starts_with('/') => SocketAddr::from_pathname(value),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor an abstract name",
        )),
    }
}

/// Whether notifications go anywhere.
pub fn is_active() -> bool {
    NOTIFIER.get().is_some()
}

/// Sends one message (`KEY=value` lines); does nothing without systemd. The first failure is
/// logged, none is returned: the daemon's work does not depend on systemd hearing it.
pub fn send(message: &str) {
    let Some(n) = NOTIFIER.get() else { return };
    if let Err(error) = n.socket.send_to_addr(message.as_bytes(), &n.address) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(event = "notify_failed", socket = %n.active.socket, %error,
                "cannot send a notification to systemd; the unit may be marked failed (start timeout or watchdog)");
        }
    }
}

/// The latest status text, sent again with the `READY=1` that ends a reload.
fn last_status() -> &'static Mutex<String> {
    static LAST: OnceLock<Mutex<String>> = OnceLock::new();
    LAST.get_or_init(Mutex::default)
}

fn remember(status: &str) -> String {
    let line = one_line(status);
    *last_status().lock().unwrap_or_else(|e| e.into_inner()) = line.clone();
    line
}

/// `READY=1` with the status text: the daemon serves.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", remember(status)));
}

/// `READY=1` again after [`reloading`], with the status text in force before the reload.
pub fn reloaded() {
    let status = last_status()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    send(&format!("READY=1\nSTATUS={status}"));
}

/// `STATUS=`: what `systemctl status` shows.
pub fn status(status: &str) {
    send(&format!("STATUS={}", remember(status)));
}

/// `RELOADING=1`, stamped with `CLOCK_MONOTONIC` as systemd 253 and later want it; follow
/// with [`ready`] once the reload is done.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    send(&format!(
        "RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC={usec}"
    ));
}

/// Set by [`stopping`]: the watchdog pings end there, since the loops are being stopped
/// (systemd's stop timeout, not its watchdog, bounds a shutdown).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// `STOPPING=1`: the daemon is shutting down. No watchdog ping follows it.
pub fn stopping() {
    STOPPING.store(true, Ordering::Relaxed);
    send("STOPPING=1\nSTATUS=stopping");
}

/// A status text never spans lines: a newline would start another `KEY=` of the message.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// The loops' heartbeats, each held weakly: a loop that has ended (and dropped its heartbeat)
/// no longer counts.
fn beats() -> &'static Mutex<Vec<Weak<Beat>>> {
    static BEATS: OnceLock<Mutex<Vec<Weak<Beat>>>> = OnceLock::new();
    BEATS.get_or_init(Mutex::default)
}

/// The moment the heartbeats' stamps count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

#[derive(Debug)]
struct Beat {
    name: &'static str,
    last_ms: AtomicU64,
}

/// The heartbeat of one loop; see the module's documentation. Dropping it takes the loop out
/// of the watchdog's reckoning.
#[derive(Debug, Clone)]
pub struct Heartbeat(Arc<Beat>);

impl Heartbeat {
    /// A heartbeat named `name` (for the log line that says which loop stopped), stamped now.
    pub fn new(name: &'static str) -> Self {
        let beat = Arc::new(Beat {
            name,
            last_ms: AtomicU64::new(now_ms()),
        });
        let mut all = beats().lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|b| b.strong_count() > 0);
        all.push(Arc::downgrade(&beat));
        Self(beat)
    }

    /// Stamps the heartbeat: the loop is going round.
    pub fn beat(&self) {
        self.0.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Awaits `wait` (the loop's idle wait: for work, for a timer, for a back-off), stamping
    /// the heartbeat meanwhile, since a loop that waits is not stuck. Without a systemd
    /// watchdog this is `wait` alone.
    pub async fn waiting<F: Future>(&self, wait: F) -> F::Output {
        self.beat();
        let Some(period) = beat_period() else {
            return wait.await;
        };
        tokio::pin!(wait);
        loop {
            tokio::select! {
                out = &mut wait => {
                    self.beat();
                    return out;
                }
                () = tokio::time::sleep(period) => self.beat(),
            }
        }
    }
}

/// How often an idle loop stamps its heartbeat, when a watchdog is active.
fn beat_period() -> Option<Duration> {
    let interval = NOTIFIER.get()?.active.ping_interval()?;
    Some((interval / 4).clamp(Duration::from_millis(10), MAX_BEAT_PERIOD))
}

/// The names of the loops whose heartbeat is older than `max_age`.
fn stale(max_age: Duration) -> Vec<&'static str> {
    let now = now_ms();
    let max = max_age.as_millis() as u64;
    let all = beats().lock().unwrap_or_else(|e| e.into_inner());
    all.iter()
        .filter_map(Weak::upgrade)
        .filter(|b| now.saturating_sub(b.last_ms.load(Ordering::Relaxed)) > max)
        .map(|b| b.name)
        .collect()
}

/// Starts the thread that pings systemd's watchdog, when systemd asked for pings; returns
/// whether it did. Each ping is sent only if every heartbeat is fresh; the first withheld ping
/// and the first ping after are logged (`watchdog_ping_withheld`, `watchdog_ping_resumed`).
pub fn start() -> io::Result<bool> {
    let Some(interval) = NOTIFIER.get().and_then(|n| n.active.ping_interval()) else {
        return Ok(false);
    };
    epoch();
    std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || {
            let mut withheld = false;
            loop {
                std::thread::sleep(interval);
                if STOPPING.load(Ordering::Relaxed) {
                    return;
                }
                let late = stale(interval);
                if late.is_empty() {
                    send("WATCHDOG=1");
                    if std::mem::take(&mut withheld) {
                        tracing::info!(event = "watchdog_ping_resumed",
                            "every loop is making progress again; systemd watchdog pings resumed");
                    }
                } else if !std::mem::replace(&mut withheld, true) {
                    tracing::error!(event = "watchdog_ping_withheld", loops = ?late,
                        stale_after_ms = interval.as_millis() as u64,
                        "a loop has stopped making progress; withholding systemd's watchdog ping, so systemd restarts the daemon unless it recovers within WatchdogSec");
                }
            }
        })?;
    Ok(true)
}

/// Logs what [`take_from_env`] found (`event=systemd_notify` when systemd listens, an error
/// when its variables are unusable) and starts the watchdog pings when systemd asked for them.
/// Both daemons call it once their log is set up.
pub fn announce(found: Result<Option<Active>, NotifyError>) {
    let active = match found {
        Ok(Some(active)) => active,
        Ok(None) => return,
        Err(error) => {
            tracing::error!(event = "notify_unusable", %error,
                "systemd's notification variables are unusable; not notifying systemd");
            return;
        }
    };
    let pings = match start() {
        Ok(started) => started,
        Err(error) => {
            tracing::error!(event = "notify_unusable", %error,
                "cannot start the thread that pings systemd's watchdog; systemd will restart this daemon when WatchdogSec= passes");
            false
        }
    };
    tracing::info!(event = "systemd_notify", socket = %active.socket,
        watchdog_ms = active.watchdog.map(|w| w.as_millis() as u64),
        ping_interval_ms = active.ping_interval().filter(|_| pings).map(|i| i.as_millis() as u64),
        "notifying systemd: READY once serving, STATUS, STOPPING, and watchdog pings while every loop makes progress");
}

/// Sends `status()` as `STATUS=` every `every` until `stopped` completes. A daemon spawns it
/// beside its loops; without systemd it returns at once.
pub async fn refresh_status(
    every: Duration,
    status: impl Fn() -> String,
    stopped: impl Future<Output = ()>,
) {
    if !is_active() {
        return;
    }
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            () = tokio::time::sleep(every) => self::status(&status()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        assert!(
            address("/run/systemd/notify")
                .unwrap()
                .as_pathname()
                .is_some()
        );
        use std::os::linux::net::SocketAddrExt;
        let abs = address("@sd-notify-test").unwrap();
        assert_eq!(abs.as_abstract_name(), Some(&b"sd-notify-test"[..]));
        assert!(address("relative/path").is_err());
    }

    #[test]
    fn status_text_stays_on_one_line() {
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }

    #[test]
    fn a_heartbeat_goes_stale_and_a_dropped_one_stops_counting() {
        let beat = Heartbeat::new("test loop");
        assert!(!stale(Duration::from_secs(60)).contains(&"test loop"));
        std::thread::sleep(Duration::from_millis(30));
        assert!(stale(Duration::from_millis(10)).contains(&"test loop"));
        beat.beat();
        assert!(!stale(Duration::from_secs(60)).contains(&"test loop"));
        drop(beat);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!stale(Duration::from_millis(10)).contains(&"test loop"));
    }
}
