//! Secrets the watchdog holds (API tokens, the OMA's token, vCenter passwords), in types that
//! never print them. A leaf module: the configuration, the launcher, the outbox's delivery and
//! the HTTP API all hold secrets, and none of them should depend on another to do so.

use std::sync::Arc;

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

#[cfg(test)]
mod tests {
    use super::*;

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
