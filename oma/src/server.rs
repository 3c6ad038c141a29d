//! The `oma` server: settings, and starting the store, recovery loop, poller and HTTP server.

use crate::auth::OperatorTokens;
use crate::lease::Leases;
use crate::poller::{PollProtocol, Poller, PollerConfig};
use crate::recovery::{Recovery, RecoveryConfig};
use crate::store::{Store, StoreError};
use crate::vma_client::VmaClient;
use crate::{AppState, app};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use transport::{ClientTlsFiles, Limits, ServeStats, ServerTls, ServerTlsFiles, TlsError};

/// Everything the server needs to start. Tokens are held in memory only.
#[derive(Clone)]
pub struct Settings {
    /// `--database` value: a SQLite path/URL or a PostgreSQL URL.
    pub database: String,
    /// Operator bearer tokens.
    pub operator_tokens: Vec<String>,
    /// Bearer token the OMA presents to VMA watchdogs.
    pub vma_api_token: Option<String>,
    /// Per-request timeout of calls to VMAs.
    pub vma_timeout: Duration,
    /// Recovery settings.
    pub recovery: RecoveryConfig,
    /// Poller settings.
    pub poller: PollerConfig,
    /// VMA polling leases (several OMAs on one database).
    pub lease: crate::lease::LeaseConfig,
    /// How the poller asks VMAs (`--poll-protocol`).
    pub poll_protocol: PollProtocol,
    /// TLS, connection limits, and the files re-read on SIGHUP.
    pub net: NetSettings,
}

/// How the OMA talks over the network, and where its secrets come from so that a reload
/// (SIGHUP) can read them again.
#[derive(Clone, Default)]
pub struct NetSettings {
    /// Serve HTTPS from these files (plain HTTP when `None`).
    pub tls: Option<ServerTlsFiles>,
    /// What the OMA trusts and presents when it calls VMAs.
    pub vma_tls: ClientTlsFiles,
    /// Connection cap and timeouts.
    pub limits: Limits,
    /// Operator tokens given as flags (kept through reloads).
    pub operator_token_flags: Vec<String>,
    /// The operator token file, re-read on reload.
    pub operator_token_file: Option<std::path::PathBuf>,
    /// The token for VMAs given as a flag.
    pub vma_api_token_flag: Option<String>,
    /// The file of the token for VMAs, re-read on reload.
    pub vma_api_token_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for NetSettings {
    /// Tokens given as flags are left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetSettings")
            .field("tls", &self.tls)
            .field("vma_tls", &self.vma_tls)
            .field("limits", &self.limits)
            .field("operator_token_file", &self.operator_token_file)
            .field("vma_api_token_file", &self.vma_api_token_file)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database", &redact_url(&self.database))
            .field("operator_tokens", &self.operator_tokens.len())
            .field("recovery", &self.recovery)
            .field("poller", &self.poller)
            .field("lease", &self.lease)
            .field("poll_protocol", &self.poll_protocol)
            .field("net", &self.net)
            .finish_non_exhaustive()
    }
}

/// A database URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Why the server could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No operator token: nobody could use the API.
    #[error(
        "no operator token configured; pass --operator-token, OMA_OPERATOR_TOKEN or --operator-token-file"
    )]
    NoOperatorToken,
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listener's address could not be read.
    #[error("could not read the listening address ({0})")]
    Listener(#[from] std::io::Error),
    /// A TLS file could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A token file could not be read or holds a token that is refused.
    #[error("{0:#}")]
    Tokens(anyhow::Error),
}

/// How long the background loops get to finish at shutdown before they are cut off.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A started server; dropping it does not stop it, [`RunningServer::shutdown`] does.
#[derive(Debug)]
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The shared state (tests read the store through it).
    pub state: AppState,
    /// What the HTTP server refused or cut.
    pub stats: Arc<ServeStats>,
    /// This OMA's VMA polling leases.
    pub leases: Arc<Leases>,
    net: NetSettings,
    tls: Option<ServerTls>,
    stop: watch::Sender<bool>,
    http: JoinHandle<()>,
    background: Vec<(&'static str, JoinHandle<()>)>,
}

impl RunningServer {
    /// Stops accepting, lets requests and the background loops (recovery, poller) finish
    /// their current step for a bounded time, and closes the database.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.http.await;
        for task in daemon_support::join_within(self.background, STOP_GRACE).await {
            tracing::warn!(
                event = "stop_cut_off",
                task,
                grace_ms = STOP_GRACE.as_millis() as u64,
                "a background loop did not stop within its grace period and was cut off"
            );
        }
        self.state.store.close().await;
    }

    /// Waits until the HTTP server stops (it only stops through `shutdown`).
    pub async fn wait(self) {
        let _ = self.http.await;
    }

    /// Re-reads the token files and the TLS files (SIGHUP). Each part that fails keeps what
    /// it had and is reported; the others take effect for new requests and connections.
    pub fn reload(&self) -> Result<(), StartError> {
        let net = &self.net;
        let mut first_error = None;
        let mut note = |part: &'static str, result: Result<(), StartError>| match result {
            Ok(()) => tracing::info!(event = "reloaded", part, "reloaded"),
            Err(error) => {
                tracing::error!(event = "reload_failed", part, error = %error,
                    "reload failed; the previous setting stays in force");
                first_error.get_or_insert(error);
            }
        };
        let operators = crate::config::operator_tokens(
            &net.operator_token_flags,
            net.operator_token_file.as_ref(),
        )
        .map_err(StartError::Tokens)
        .and_then(|tokens| {
            if tokens.is_empty() {
                return Err(StartError::NoOperatorToken);
            }
            self.state.operators.replace(tokens);
            Ok(())
        });
        note("operator_tokens", operators);
        let client = crate::config::vma_api_token(
            net.vma_api_token_flag.as_ref(),
            net.vma_api_token_file.as_ref(),
        )
        .map_err(StartError::Tokens)
        .and_then(|token| Ok(self.state.vma_client.reload(token, &net.vma_tls)?));
        note("vma_client", client);
        if let Some(tls) = &self.tls {
            note("tls", tls.reload().map_err(StartError::from));
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Opens the database, starts recovery (startup run, then periodic), the poller and the
/// HTTP server on `listener`, without a metrics endpoint.
pub async fn start(settings: Settings, listener: TcpListener) -> Result<RunningServer, StartError> {
    start_with_metrics(settings, listener, None).await
}

/// [`start`], serving `/metrics` on `metrics` when given (see `crate::metrics`).
pub async fn start_with_metrics(
    settings: Settings,
    listener: TcpListener,
    metrics: Option<TcpListener>,
) -> Result<RunningServer, StartError> {
    let operators = OperatorTokens::new(settings.operator_tokens.clone());
    if operators.is_empty() {
        return Err(StartError::NoOperatorToken);
    }
    let net = settings.net.clone();
    let tls = net.tls.clone().map(ServerTls::load).transpose()?;
    let client = VmaClient::with_tls(
        settings.vma_timeout,
        settings.vma_api_token.clone(),
        &net.vma_tls,
    )?;
    let instance_id = crate::lease::new_instance_id();
    let state = open_state(&settings, operators, client, &instance_id).await?;
    let (recovery, poller) = (state.recovery.clone(), state.poller.clone());
    let (stop, stopped) = watch::channel(false);
    let mut background = vec![
        (
            "recovery",
            tokio::spawn(recovery.run_forever(stopped.clone())),
        ),
        ("poller", tokio::spawn(poller.run_forever(stopped.clone()))),
    ];
    let leases =
        Leases::with_instance_id(settings.lease.clone(), state.store.backend(), instance_id);
    let _ = state.poller.leases.set(leases.clone());
    background.push(spawn_leases(&leases, &state, stopped.clone()));
    if let Some(listener) = metrics {
        background.push(serve_metrics(listener, &state, stopped.clone()));
    }
    let addr = listener.local_addr()?;
    let limits = net.limits.fit_fd_limit(1);
    let stats = Arc::new(ServeStats::default());
    let http = tokio::spawn(transport::serve(
        listener,
        app(state.clone()),
        tls.clone(),
        limits,
        stats.clone(),
        daemon_support::stopped(stopped),
    ));
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, mutual_tls = tls.as_ref().is_some_and(ServerTls::requires_client_certificates),
        max_connections = limits.max_connections, "oma listening");
    Ok(RunningServer {
        addr,
        state,
        stats,
        leases,
        net,
        tls,
        stop,
        http,
        background,
    })
}

/// The store (opened and migrated, its sessions named after this OMA instance), recovery and
/// the poller, shared by the routes and the background tasks.
async fn open_state(
    settings: &Settings,
    operators: OperatorTokens,
    client: VmaClient,
    instance_id: &str,
) -> Result<AppState, StartError> {
    let application_name = crate::store::application_name(&settings.lease.name, instance_id);
    let store = Store::connect_as(&settings.database, &application_name).await?;
    tracing::info!(database = %redact_url(&settings.database), backend = ?store.backend(), "database ready");
    let backend = match store.backend() {
        crate::store::Backend::Sqlite => "sqlite",
        crate::store::Backend::Postgres => "postgres",
    };
    store.metrics().set_settings(
        backend,
        settings.recovery.interval,
        settings.poller.stall_threshold,
    );
    let recovery = Arc::new(Recovery::new(
        store.clone(),
        client.clone(),
        settings.recovery.clone(),
    ));
    let poller = Arc::new(
        Poller::new(store.clone(), client.clone(), settings.poller.clone())
            .with_protocol(settings.poll_protocol),
    );
    Ok(AppState {
        store,
        operators: Arc::new(operators),
        recovery,
        poller,
        vma_client: client,
    })
}

/// Starts the lease task; when it removes an OMA whose heartbeat expired, recovery runs again
/// here (that OMA may have died mid-run, holding the recovery lock, which its database session
/// freed when it died).
fn spawn_leases(
    leases: &Arc<Leases>,
    state: &AppState,
    stopped: watch::Receiver<bool>,
) -> (&'static str, JoinHandle<()>) {
    let recovery = state.recovery.clone();
    let retry_every = leases.period() / 3;
    let instance_lost = Arc::new(move || {
        let recovery = recovery.clone();
        tokio::spawn(recover_after_loss(recovery, retry_every));
    });
    let task = leases
        .clone()
        .run_forever(state.store.clone(), instance_lost, stopped);
    ("poll leases", tokio::spawn(task))
}

/// Runs recovery after another OMA was found dead, retrying while a run holds the lock (the
/// dead OMA's session may take a moment to end) for up to six retries a third of a lease
/// period apart.
async fn recover_after_loss(recovery: Arc<crate::recovery::Recovery>, retry_every: Duration) {
    use crate::recovery::{RecoveryError, Trigger};
    for attempt in 0..7 {
        match recovery.run(Trigger::Periodic, false).await {
            Err(RecoveryError::Busy) => tokio::time::sleep(retry_every).await,
            Ok(report) => {
                tracing::info!(
                    event = "recovery_after_oma_lost",
                    attempt,
                    examined = report.run.examined,
                    finalized = report.run.finalized,
                    "recovery ran again after another OMA was found dead"
                );
                return;
            }
            Err(error) => {
                tracing::warn!(event = "recovery_after_oma_lost_failed", %error,
                    "recovery after another OMA was found dead failed; the periodic run retries");
                return;
            }
        }
    }
}

/// Serves `/metrics` on `listener` until `stopped` says true.
fn serve_metrics(
    listener: TcpListener,
    state: &AppState,
    stopped: watch::Receiver<bool>,
) -> (&'static str, JoinHandle<()>) {
    let scraped = Arc::new(crate::metrics::Scraped {
        state: state.clone(),
    });
    let serving =
        daemon_support::metrics::serve(listener, scraped, daemon_support::stopped(stopped));
    ("metrics endpoint", tokio::spawn(serving))
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://oma:s3cret@db:5432/oma"),
            "postgres://oma:***@db:5432/oma"
        );
        assert_eq!(super::redact_url("oma.db"), "oma.db");
    }
}
