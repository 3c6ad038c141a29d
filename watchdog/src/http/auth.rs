//! Who may call the API: a bearer token for everything but `/health` and progress updates,
//! which come from migratekit on this host without credentials.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use crate::secret::BearerToken;

/// Whether a peer is on this host: `127.0.0.0/8`, `::1`, or `::ffff:127.x.y.z`.
pub fn is_loopback_peer(peer: &SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Middleware: 403 unless the peer is on this host (progress updates).
pub async fn require_loopback(
    ConnectInfo(ends): ConnectInfo<transport::Ends>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let peer = ends.peer;
    if is_loopback_peer(&peer) {
        Ok(next.run(request).await)
    } else {
        tracing::warn!(%peer, path = %request.uri().path(), "refused a progress update from another host");
        Err(ApiError::NotLoopback)
    }
}

/// The API token in force, replaced in place when its file is re-read (SIGHUP): requests
/// already checked keep their answer, later ones are checked against the new token. Clones
/// share it.
#[derive(Debug, Clone)]
pub struct SharedToken(Arc<RwLock<BearerToken>>);

impl SharedToken {
    /// Holds `token`.
    pub fn new(token: BearerToken) -> Self {
        Self(Arc::new(RwLock::new(token)))
    }

    /// Puts `token` in force for every later request.
    pub fn replace(&self, token: BearerToken) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    /// Whether `presented` equals the token in force (see [`BearerToken::matches`]).
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .matches(presented)
    }
}

impl From<BearerToken> for SharedToken {
    fn from(token: BearerToken) -> Self {
        Self::new(token)
    }
}

/// Middleware: 401 (no detail) unless `Authorization: Bearer <token>` matches.
pub async fn require_token(
    State(token): State<SharedToken>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            let (scheme, rest) = v.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
        });
    match presented {
        Some(presented) if token.matches(presented) => Ok(next.run(request).await),
        _ => Err(ApiError::Unauthorized),
    }
}

/// Middleware behind [`require_token`]: a call that carries the API token comes from the
/// OMA (its poller, recovery, a start), so the OMA is reachable again; the outbox's delivery
/// need not wait out its back-off.
pub async fn note_oma_call(
    State(outbox): State<Option<Arc<crate::outbox::Outbox>>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(outbox) = outbox {
        outbox.oma_called();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_classification() {
        let peer = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_loopback_peer(&peer("127.0.0.1:1")));
        assert!(is_loopback_peer(&peer("127.0.0.2:1")));
        assert!(is_loopback_peer(&peer("[::1]:1")));
        assert!(is_loopback_peer(&peer("[::ffff:127.0.0.1]:1")));
        assert!(!is_loopback_peer(&peer("10.0.0.5:1")));
        assert!(!is_loopback_peer(&peer("192.168.1.1:1")));
        assert!(!is_loopback_peer(&peer("[::ffff:10.0.0.1]:1")));
        assert!(!is_loopback_peer(&peer("[fe80::1]:1")));
        assert!(!is_loopback_peer(&peer("0.0.0.0:1")));
    }
}
