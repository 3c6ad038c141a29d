//! SIGHUP: the token files and the TLS files are read again and put in force without a
//! restart, so that a rotated token or certificate never costs a moment of watching.
//!
//! Each part is reloaded on its own: a part whose file is missing, half written or refused
//! keeps the setting in force and says why (`event=reload_failed`), the others take effect
//! (`event=reloaded`). Requests and connections already open finish with what they had.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::Signal;
use transport::{ClientTlsFiles, ServerTls};

use crate::config::{Config, reread_token};
use crate::http::SharedToken;
use crate::outbox::OmaClient;
use crate::secret::BearerToken;

/// What a SIGHUP re-reads, and where it puts the result.
#[derive(Debug)]
pub(super) struct Reloader {
    api_token: SharedToken,
    api_token_file: Option<PathBuf>,
    oma: Option<OmaPart>,
    tls: Option<ServerTls>,
}

/// The client for the OMA: its token (from a file, or the flag's value kept) and TLS files.
#[derive(Debug)]
struct OmaPart {
    client: Arc<OmaClient>,
    token: BearerToken,
    token_file: Option<PathBuf>,
    tls: ClientTlsFiles,
}

impl Reloader {
    pub(super) fn new(
        config: &Config,
        api_token: SharedToken,
        oma_client: Option<Arc<OmaClient>>,
        tls: Option<ServerTls>,
    ) -> Self {
        let oma = config
            .oma
            .as_ref()
            .zip(oma_client)
            .map(|(oma, client)| OmaPart {
                client,
                token: oma.token.clone(),
                token_file: config.net.oma_token_file.clone(),
                tls: config.net.oma_tls.clone(),
            });
        Self {
            api_token,
            api_token_file: config.net.api_token_file.clone(),
            oma,
            tls,
        }
    }

    /// Reloads at every SIGHUP until `stopped` completes.
    pub(super) async fn reload_on_sighup(self, mut hup: Signal, stopped: impl Future<Output = ()>) {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => return,
                received = hup.recv() => {
                    if received.is_none() {
                        return;
                    }
                    tracing::info!(event = "reload_requested", "SIGHUP: re-reading token and TLS files");
                    daemon_support::notify::reloading();
                    self.reload();
                    daemon_support::notify::reloaded();
                }
            }
        }
    }

    /// Re-reads every part; returns whether all of them took effect.
    pub(super) fn reload(&self) -> bool {
        let mut all = true;
        let mut note = |part: &'static str, result: anyhow::Result<()>| match result {
            Ok(()) => tracing::info!(event = "reloaded", part, "reloaded"),
            Err(error) => {
                all = false;
                tracing::error!(
                    event = "reload_failed",
                    part,
                    error = format!("{error:#}"),
                    "reload failed; the previous setting stays in force"
                );
            }
        };
        if let Some(file) = &self.api_token_file {
            note(
                "api_token",
                reread_token(file, "--api-token").map(|t| self.api_token.replace(t)),
            );
        }
        if let Some(oma) = &self.oma {
            let token = match &oma.token_file {
                Some(file) => reread_token(file, "--oma-token"),
                None => Ok(oma.token.clone()),
            };
            let result = token.and_then(|token| Ok(oma.client.reload(token, &oma.tls)?));
            note("oma_client", result);
        }
        if let Some(tls) = &self.tls {
            note("tls", tls.reload().map_err(anyhow::Error::from));
        }
        all
    }
}
