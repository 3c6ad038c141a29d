//! The HTTP server both daemons run: HTTP/1.1 over plain TCP or TLS, with every connection
//! bounded in number and in how long it may sit idle or dribble its headers.
//!
//! Each accepted connection holds a permit of a semaphore sized [`Limits::max_connections`];
//! at the cap the server stops accepting (new clients wait in the kernel's backlog) instead of
//! running out of file descriptors, which would also starve the daemon's own work (the
//! watchdog's `/proc` scans, its outbox). A connection that does not complete a request's
//! headers within [`Limits::header_read_timeout`] (a slow client, or an idle keep-alive
//! connection waiting for its next request) is closed, and so is one whose TLS handshake takes
//! longer than [`Limits::handshake_timeout`]. The handler sees the peer's address as axum's
//! `ConnectInfo<SocketAddr>`, and both ends of the connection as `ConnectInfo<Ends>`: a
//! server that must tell which local process made a loopback call (the watchdog's progress
//! gate) needs its own end too, since the listener's address may be a wildcard.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::tls::ServerTls;

/// How many connections a server holds at once by default. A daemon raises its file limit to
/// fit ([`crate::raise_fd_limit`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// The bounds every connection is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a connection has to send a request's headers, counted from when it is ready for
    /// the next request: an idle keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
    /// Time a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Time given to open connections to finish their requests at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Both ends of an accepted connection, as the server sees them; handlers get it as
/// `ConnectInfo<Ends>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ends {
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The server's own address and port on this connection (not the listener's, which may
    /// be a wildcard).
    pub local: SocketAddr,
}

impl Limits {
    /// These limits with a connection cap per listener that fits, for all `listeners`, under
    /// the process's file limit (raised as far as the hard limit allows, see
    /// [`crate::raise_fd_limit`]), so that a full table of connections never leaves the
    /// daemon without descriptors for its own work. Logs the limits in force
    /// (`connection_limits`) and, when the cap had to come down, `connection_cap_lowered`.
    pub fn fit_fd_limit(mut self, listeners: usize) -> Self {
        let listeners = listeners.max(1);
        let wanted = self.max_connections;
        match crate::raise_fd_limit(wanted.saturating_mul(listeners)) {
            Ok(fits) if fits / listeners < wanted => {
                let per_listener = (fits / listeners).max(1);
                tracing::warn!(
                    event = "connection_cap_lowered",
                    wanted,
                    fits = per_listener,
                    listeners,
                    "the file limit leaves room for fewer connections than \
                     configured; raise LimitNOFILE= or lower --max-connections"
                );
                self.max_connections = per_listener;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(event = "connection_cap_unchecked", %error,
                "cannot read the file limit; keeping the connection cap"),
        }
        tracing::info!(
            event = "connection_limits",
            max_connections = self.max_connections,
            listeners,
            header_timeout_ms = self.header_read_timeout.as_millis() as u64,
            handshake_timeout_ms = self.handshake_timeout.as_millis() as u64,
            "connections are bounded per listener"
        );
        self
    }
}

/// Counters of what the server refused or cut, for `/health`.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Connections whose TLS handshake failed or timed out (a plain-HTTP client on the TLS
    /// port, an unknown CA, a missing client certificate).
    pub handshakes_failed: AtomicU64,
    /// Times the server stopped accepting because it held `max_connections`.
    pub at_capacity: AtomicU64,
    /// Accept errors (for example the process's file limit).
    pub accept_errors: AtomicU64,
}

/// Serves `router` on `listener` until `shutdown` completes, then lets open connections finish
/// for at most [`Limits::shutdown_grace`]. With `tls`, every connection is TLS.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<ServerTls>,
    limits: Limits,
    stats: Arc<ServeStats>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Logged at 1, 2, 4, 8, ... times: a flood must not become a flood of lines.
                let n = stats.at_capacity.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        event = "connections_at_capacity",
                        max = limits.max_connections,
                        count = n,
                        "every connection slot is taken; new connections wait until \
                         one closes (idle ones close after the header timeout)"
                    );
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&stats, &error).await;
                    continue;
                }
            },
            // Stop accepting; open connections are drained below.
            () = &mut shutdown => break,
        };
        let connection = Connection {
            router: router.clone(),
            tls: tls.clone(),
            limits,
            stats: stats.clone(),
        };
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            connection.run(stream, peer, watcher).await;
            drop(permit);
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(grace_ms = limits.shutdown_grace.as_millis() as u64,
                "connections still open at the end of the shutdown grace period are dropped");
        }
    }
}

/// An accept that failed: most often the file limit. Waiting a little keeps a full table from
/// turning the loop into a busy spin, and closing connections frees descriptors meanwhile.
async fn accept_failed(stats: &ServeStats, error: &std::io::Error) {
    let n = stats.accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(event = "accept_failed", %error, count = n,
            "accepting a connection failed; if it says too many open files, raise the \
             daemon's file limit (LimitNOFILE=) or lower its connection cap");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// One accepted connection and what serving it needs.
struct Connection {
    router: Router,
    tls: Option<ServerTls>,
    limits: Limits,
    stats: Arc<ServeStats>,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let _ = stream.set_nodelay(true);
        // An accepted socket always has a local address; should the call fail, the peer's
        // own address stands in, which matches no client socket, so a handler that checks
        // the connection's owner refuses rather than accepts it unchecked.
        let ends = Ends {
            peer,
            local: stream.local_addr().unwrap_or(peer),
        };
        let router = self.router;
        let service = tower::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(ConnectInfo(ends));
            let mut router = router.clone();
            async move {
                let response = tower::Service::call(&mut router, request).await;
                Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
            }
        });
        let service = TowerToHyperService::new(service);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        let Some(tls) = self.tls else {
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let _ = watcher.watch(conn).await;
            return;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let handshake =
            tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(stream));
        match handshake.await {
            Ok(Ok(stream)) => {
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let _ = watcher.watch(conn).await;
            }
            Ok(Err(error)) => handshake_failed(&self.stats, peer, &error.to_string()),
            Err(_) => handshake_failed(&self.stats, peer, "timed out"),
        }
    }
}

fn handshake_failed(stats: &ServeStats, peer: SocketAddr, why: &str) {
    stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
    tracing::info!(event = "tls_handshake_failed", %peer, reason = why,
        "a TLS handshake failed (a plain-HTTP client, an untrusted certificate or a missing \
         client certificate)");
}
