//! Tokens on the command line, in the environment or in a file: read once, validated, and
//! never shown (their `Debug` says `<redacted>`; errors name the flag or file, never a value).

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, bail};

use crate::http::{BearerToken, Secret};

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
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the {what} file {}; check the path and that the watchdog may read it",
            path.display()
        )
    })?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), "a secret file is readable by other users; chmod 600 it");
    }
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
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
}
