//! Tokens on the command line, in the environment or in a file: read once, validated, and
//! never shown (their `Debug` says `<redacted>`; errors name the flag or file, never a value).

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, bail};

use crate::secret::{BearerToken, Secret};

/// A secret given as a flag or environment value. clap stores it as this type, so that
/// neither `Cli`'s `Debug` nor a clap error ever prints it.
#[derive(Clone)]
pub struct SecretArg(Secret);

impl FromStr for SecretArg {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(Secret::new(s)))
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretArg(<redacted>)")
    }
}

/// The token from `value` (flag or environment) or `file`, at most one of them. `what` names
/// the flags in the errors, e.g. `--api-token`.
pub fn token(
    value: Option<&SecretArg>,
    file: Option<&Path>,
    what: &str,
) -> anyhow::Result<Option<BearerToken>> {
    let raw = match (value, file) {
        (Some(_), Some(_)) => {
            bail!("give either {what} (or its environment variable) or {what}-file, not both")
        }
        (Some(v), None) => v.0.expose().to_owned(),
        (None, Some(path)) => read_secret_file(path, what)?,
        (None, None) => return Ok(None),
    };
    BearerToken::new(raw)
        .map(Some)
        .with_context(|| format!("the token given with {what} is unusable"))
}

/// Reads a one-line secret file (a trailing newline is dropped) and warns when other users
/// may read it.
pub fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the {what} file {}; check the path and that the watchdog may read it",
            path.display()
        )
    })?;
    if let Some(mode) = daemon_support::shared_mode(path) {
        warn_shared(SharedSecretFile {
            path: path.to_owned(),
            what: what.to_owned(),
            mode,
        });
    }
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// A secret file that users other than its owner may read or write.
#[derive(Debug)]
struct SharedSecretFile {
    path: std::path::PathBuf,
    what: String,
    mode: u32,
}

/// Warnings found before logging started: the configuration is read first (logging needs
/// it), and a warning logged then would go nowhere.
static DEFERRED: std::sync::Mutex<Vec<SharedSecretFile>> = std::sync::Mutex::new(Vec::new());

fn warn_shared(shared: SharedSecretFile) {
    if tracing::dispatcher::has_been_set() {
        log_shared(&shared);
    } else {
        DEFERRED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(shared);
    }
}

fn log_shared(shared: &SharedSecretFile) {
    tracing::warn!(event = "secret_file_shared", file = %shared.path.display(), what = %shared.what,
        mode = format!("{:04o}", shared.mode),
        "a secret file is readable or writable by other users; chmod 600 it");
}

/// Logs the warnings about secret files found while the configuration was read before
/// logging started. Call once the subscriber is installed.
pub fn log_deferred_warnings() {
    let deferred = std::mem::take(&mut *DEFERRED.lock().unwrap_or_else(|e| e.into_inner()));
    deferred.iter().for_each(log_shared);
}

/// Whether the variable `name` holds one of the watchdog's secrets or names a file it reads
/// one from: `VMA_WATCHDOG_*` with `TOKEN`, `PASSWORD`, `SECRET` or `KEY` in its name.
pub fn is_secret_variable(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes().to_ascii_uppercase();
    name.starts_with(b"VMA_WATCHDOG_")
        && [&b"TOKEN"[..], b"PASSWORD", b"SECRET", b"KEY"]
            .iter()
            .any(|word| name.windows(word.len()).any(|w| w == *word))
}

/// Removes the secret variables ([`is_secret_variable`]) from this process's environment,
/// once the configuration has read them, and overwrites their values with zeros first: the
/// kernel shows `/proc/<pid>/environ` from the memory the process started with, which
/// removing a variable alone leaves as it was. Returns their names.
///
/// # Safety
///
/// Only while the process runs a single thread: nothing else may read or change the
/// environment meanwhile (`setenv(3)` is not thread-safe).
pub unsafe fn scrub_environment() -> Vec<std::ffi::OsString> {
    let names: Vec<_> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| is_secret_variable(name))
        .collect();
    for name in &names {
        if let Ok(c_name) = std::ffi::CString::new(name.as_encoded_bytes()) {
            // SAFETY: single-threaded (the caller's promise); `getenv` returns the value in
            // the environment's own writable memory, which is overwritten within its length.
            unsafe {
                let value = libc::getenv(c_name.as_ptr());
                if !value.is_null() {
                    std::ptr::write_bytes(value, 0, libc::strlen(value));
                }
            }
        }
        // SAFETY: single-threaded, the caller's promise.
        unsafe { std::env::remove_var(name) };
    }
    names
}

/// An unguessable token kept only in memory: with no API token configured, every call to a
/// protected route is refused, since nobody can present it.
pub fn unguessable() -> BearerToken {
    use rand::Rng;
    let bytes: [u8; 32] = rand::thread_rng().r#gen();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    BearerToken::new(hex).expect("a hex string is a valid token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_at_most_and_values_are_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "file-token-123\n").unwrap();
        let flag: SecretArg = "flag-token-456".parse().unwrap();
        assert!(!format!("{flag:?}").contains("456"));
        let t = token(Some(&flag), None, "--api-token").unwrap().unwrap();
        assert!(t.matches(b"flag-token-456"));
        let t = token(None, Some(&file), "--api-token").unwrap().unwrap();
        assert!(t.matches(b"file-token-123"));
        let err = token(Some(&flag), Some(&file), "--api-token").unwrap_err();
        assert!(err.to_string().contains("not both"));
        let bad: SecretArg = "has space-secret".parse().unwrap();
        let err = format!("{:#}", token(Some(&bad), None, "--x").unwrap_err());
        assert!(!err.contains("space-secret"), "{err}");
        assert!(token(None, None, "--x").unwrap().is_none());
        assert!(!unguessable().matches(b""));
    }

    #[test]
    fn secret_variables_are_the_watchdogs_tokens_and_their_files() {
        for name in [
            "VMA_WATCHDOG_API_TOKEN",
            "VMA_WATCHDOG_OMA_TOKEN",
            "VMA_WATCHDOG_OMA_TOKEN_FILE",
            "VMA_WATCHDOG_TLS_KEY",
        ] {
            assert!(is_secret_variable(name.as_ref()), "{name}");
        }
        for name in ["VMA_WATCHDOG_STATE_DIR", "API_TOKEN", "PATH"] {
            assert!(!is_secret_variable(name.as_ref()), "{name}");
        }
    }
}
