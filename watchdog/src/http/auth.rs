//! Who may call the API: a bearer token for everything but `/health` and progress updates,
//! which come from migratekit on this host without credentials.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;

/// A secret string (a password): shown as `<redacted>` by `Debug`, never by `Display`.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into().into())
    }

    /// The secret itself, for the one place that must pass it on.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// An API token: shown as `<redacted>` by `Debug`, compared in constant time.
#[derive(Clone)]
pub struct BearerToken(Secret);

/// A token that is empty or contains whitespace or control characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the token is empty or contains whitespace or control characters; configure a non-empty printable token"
)]
pub struct InvalidToken;

impl BearerToken {
    /// Wraps a non-empty token (or password) without whitespace or control characters.
    pub fn new(token: impl Into<String>) -> Result<Self, InvalidToken> {
        let token: String = token.into();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(InvalidToken);
        }
        Ok(Self(Secret::new(token)))
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// Whether `presented` equals the token, in time that depends only on the lengths.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.expose().as_bytes(), presented)
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Compares every byte of both inputs whatever their contents, so the time taken does not
/// tell an attacker how many leading bytes were right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

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

    #[test]
    fn token_compare_and_debug() {
        let token = BearerToken::new("abc123").unwrap();
        assert!(token.matches(b"abc123"));
        assert!(!token.matches(b"abc124"));
        assert!(!token.matches(b"abc12"));
        assert!(!token.matches(b"abc1234"));
        assert!(!token.matches(b""));
        assert!(!format!("{token:?}").contains("abc"));
        assert!(BearerToken::new("").is_err());
        assert!(BearerToken::new("a b").is_err());
    }
}
