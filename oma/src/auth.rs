//! Bearer-token authentication: operator tokens for jobs and recovery, per-VMA tokens for
//! watchdog events. Only SHA-256 hashes of tokens are kept (in memory for operators, in the
//! database for VMAs), compared in constant time; no token reaches a log line or a response.

use crate::AppState;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

/// SHA-256 of a token, lowercase hex: what is stored and compared.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Shortest operator token accepted: a token is a password that never expires, and a short
/// one can be guessed over the network.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why operator tokens were refused. Messages name the line, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// A token is shorter than [`MIN_TOKEN_LEN`].
    #[error(
        "{source_name}: the token on line {line} has {len} characters; operator tokens need at \
         least {MIN_TOKEN_LEN} (generate one with `openssl rand -hex 32`)"
    )]
    TooShort {
        /// Where the token came from (a file's path, or the flag).
        source_name: String,
        /// Its 1-based line (1 for a flag).
        line: usize,
        /// Its length.
        len: usize,
    },
}

/// Reads operator tokens from `text`, one per line: blank lines and lines starting with `#`
/// are skipped (a comment is never a token), the rest are trimmed and must be at least
/// [`MIN_TOKEN_LEN`] characters long.
pub fn parse_tokens(source_name: &str, text: &str) -> Result<Vec<String>, TokenError> {
    let mut tokens = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let token = line.trim();
        if token.is_empty() || token.starts_with('#') {
            continue;
        }
        if token.chars().count() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort {
                source_name: source_name.to_owned(),
                line: index + 1,
                len: token.chars().count(),
            });
        }
        tokens.push(token.to_owned());
    }
    Ok(tokens)
}

/// Operator token hashes, from flags, environment or a file; replaced in place on reload.
#[derive(Default)]
pub struct OperatorTokens {
    hashes: std::sync::RwLock<Vec<String>>,
}

impl std::fmt::Debug for OperatorTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OperatorTokens({} configured)", self.hashes().len())
    }
}

fn hash_all<I: IntoIterator<Item = String>>(tokens: I) -> Vec<String> {
    tokens
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .map(|t| hash_token(&t))
        .collect()
}

impl OperatorTokens {
    /// Hashes the given tokens; empty strings are ignored.
    pub fn new<I: IntoIterator<Item = String>>(tokens: I) -> Self {
        Self {
            hashes: std::sync::RwLock::new(hash_all(tokens)),
        }
    }

    /// Replaces every token (a reload). Requests already authenticated are not affected.
    pub fn replace<I: IntoIterator<Item = String>>(&self, tokens: I) {
        *self.hashes.write().unwrap_or_else(|e| e.into_inner()) = hash_all(tokens);
    }

    fn hashes(&self) -> std::sync::RwLockReadGuard<'_, Vec<String>> {
        self.hashes.read().unwrap_or_else(|e| e.into_inner())
    }

    /// True when `token` is one of the operator tokens.
    pub fn accepts(&self, token: &str) -> bool {
        let hash = hash_token(token);
        // Check every hash, so the time does not tell which one matched.
        self.hashes().iter().fold(false, |found, h| {
            constant_time_eq(h.as_bytes(), hash.as_bytes()) | found
        })
    }

    /// True when no operator token is configured.
    pub fn is_empty(&self) -> bool {
        self.hashes().is_empty()
    }
}

/// Who called, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An operator.
    Operator,
    /// The watchdog of this VMA.
    Vma(String),
}

fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The bearer token's hash, and whether it is an operator token. This is synchronous on
/// purpose: the request body is not `Sync`, so no borrow of the request may live across an
/// await.
fn credentials(state: &AppState, request: &Request) -> Result<(bool, String), ApiError> {
    let token = bearer(request).ok_or(ApiError::Unauthorized)?;
    Ok((state.operators.accepts(token), hash_token(token)))
}

/// Who the token belongs to.
async fn identify(
    state: &AppState,
    (is_operator, hash): (bool, String),
) -> Result<Principal, ApiError> {
    if is_operator {
        return Ok(Principal::Operator);
    }
    match state.store.vma_by_token_hash(&hash).await? {
        Some(vma) => Ok(Principal::Vma(vma)),
        None => Err(ApiError::Unauthorized),
    }
}

/// Who holds `credentials` (from [`credentials`]), with every refusal counted in the metrics
/// by reason.
async fn principal(
    state: &AppState,
    credentials: Result<(bool, String), ApiError>,
) -> Result<Principal, ApiError> {
    let reason = match credentials {
        Err(_) => "missing_token",
        Ok(credentials) => match identify(state, credentials).await {
            Err(ApiError::Unauthorized) => "unknown_token",
            other => return other,
        },
    };
    state.store.metrics().auth_failure(reason);
    Err(ApiError::Unauthorized)
}

/// Counts a token of the other kind (an operator's on a VMA route, or the reverse).
fn wrong_role(state: &AppState) -> ApiError {
    state.store.metrics().auth_failure("wrong_role");
    ApiError::Forbidden
}

/// Middleware for operator endpoints: 401 without a valid token, 403 for a VMA token.
pub async fn require_operator(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match principal(&state, credentials(&state, &request)).await? {
        Principal::Operator => Ok(next.run(request).await),
        Principal::Vma(_) => Err(wrong_role(&state)),
    }
}

/// Middleware for watchdog endpoints: 401 without a valid token, 403 for an operator token.
/// The VMA's id goes into the request's extensions for the handler.
pub async fn require_vma(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match principal(&state, credentials(&state, &request)).await? {
        Principal::Vma(vma) => {
            request.extensions_mut().insert(Principal::Vma(vma));
            Ok(next.run(request).await)
        }
        Principal::Operator => Err(wrong_role(&state)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_tokens_are_matched_by_hash() {
        let tokens = OperatorTokens::new(["secret-1".to_owned(), " ".to_owned()]);
        assert!(tokens.accepts("secret-1"));
        assert!(!tokens.accepts("secret-2"));
        assert!(!format!("{tokens:?}").contains("secret"));
        assert!(constant_time_eq(b"ab", b"ab") && !constant_time_eq(b"ab", b"ac"));
        tokens.replace(["secret-2".to_owned()]);
        assert!(tokens.accepts("secret-2") && !tokens.accepts("secret-1"));
    }

    #[test]
    fn token_files_skip_comments_and_refuse_short_tokens_by_line() {
        let text = "# operators of site A\n\n  0123456789abcdef0123  \n#short\n";
        assert_eq!(parse_tokens("f", text).unwrap(), ["0123456789abcdef0123"]);
        let err = parse_tokens("/etc/oma/operator.tokens", "0123456789abcdef\nx\n").unwrap_err();
        assert_eq!(
            err,
            TokenError::TooShort {
                source_name: "/etc/oma/operator.tokens".into(),
                line: 2,
                len: 1
            }
        );
        assert!(!err.to_string().contains(": x"), "{err}");
    }
}
