//! The `oma` server: settings, and starting the store, recovery loop, poller and HTTP server.

use crate::auth::OperatorTokens;
use crate::poller::{Poller, PollerConfig};
use crate::recovery::{Recovery, RecoveryConfig};
use crate::store::{Store, StoreError};
use crate::vma_client::VmaClient;
use crate::{AppState, app};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database", &redact_url(&self.database))
            .field("operator_tokens", &self.operator_tokens.len())
            .field("recovery", &self.recovery)
            .field("poller", &self.poller)
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

/// Why the server could not start.
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
}

/// A started server; dropping it does not stop it, [`RunningServer::shutdown`] does.
#[derive(Debug)]
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The shared state (tests read the store through it).
    pub state: AppState,
    stop: oneshot::Sender<()>,
    http: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops the background loops and the HTTP server, and closes the database.
    pub async fn shutdown(self) {
        for task in &self.background {
            task.abort();
        }
        let _ = self.stop.send(());
        let _ = self.http.await;
        for task in self.background {
            let _ = task.await;
        }
        self.state.store.close().await;
    }

    /// Waits until the HTTP server stops (it only stops through `shutdown`).
    pub async fn wait(self) {
        let _ = self.http.await;
    }
}

/// Opens the database, starts recovery (startup run, then periodic), the poller and the
/// HTTP server on `listener`.
pub async fn start(settings: Settings, listener: TcpListener) -> Result<RunningServer, StartError> {
    let operators = OperatorTokens::new(settings.operator_tokens.clone());
    if operators.is_empty() {
        return Err(StartError::NoOperatorToken);
    }
    let store = Store::connect(&settings.database).await?;
    tracing::info!(database = %redact_url(&settings.database), backend = ?store.backend(), "database ready");
    let client = VmaClient::new(settings.vma_timeout, settings.vma_api_token.clone());
    let recovery = Arc::new(Recovery::new(
        store.clone(),
        client.clone(),
        settings.recovery.clone(),
    ));
    let poller = Arc::new(Poller::new(
        store.clone(),
        client.clone(),
        settings.poller.clone(),
    ));
    let state = AppState {
        store,
        operators: Arc::new(operators),
        recovery: recovery.clone(),
        poller: poller.clone(),
        vma_client: client,
    };
    let background = vec![
        tokio::spawn(recovery.run_forever()),
        tokio::spawn(poller.run_forever()),
    ];
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let router = app(state.clone());
    let http = tokio::spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(%addr, "oma listening");
    Ok(RunningServer {
        addr,
        state,
        stop,
        http,
        background,
    })
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
