//! The one rule for job ids, on every path of both appliances.
//!
//! A job id is also migratekit's `--job-id`, and the VMA turns it into file names, systemd
//! unit names and log fields. So it is short and plain: 1 to 128 ASCII letters, digits, `.`,
//! `_` or `-`, starting with a letter or digit. No `/` (paths), no whitespace or newline (a
//! forged log line), no `:` (unit names). A [`JobId`] can only be built through that check,
//! whether from an HTTP path, a JSON body, a command line in `/proc` or a file on disk.

use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

/// A validated job id. See the module documentation for the rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

/// Why a text is not a job id. The messages state the rule, so a caller can show them as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobIdError {
    /// The text is empty.
    #[error("a job id must not be empty; {RULE}")]
    Empty,
    /// The text is longer than [`JobId::MAX_LEN`] bytes.
    #[error("a job id is at most 128 characters (this one has {len}); {RULE}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The first character is not an ASCII letter or digit.
    #[error("a job id must start with a letter or digit; {RULE}")]
    BadFirst,
    /// A character outside `[A-Za-z0-9._-]`, at this byte offset.
    #[error("a job id has a character that is not allowed at position {position}; {RULE}")]
    BadChar {
        /// Byte offset of the first bad character (0-based).
        position: usize,
    },
}

const RULE: &str = "job ids are 1 to 128 letters, digits, '.', '_' or '-', starting with a \
                    letter or digit";

impl JobId {
    /// Longest job id, in bytes (every allowed character is one byte).
    pub const MAX_LEN: usize = 128;

    /// The rule as a regular expression, for the OpenAPI documents.
    pub const PATTERN: &'static str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$";

    /// Checks `raw` against the rule without copying it first, so that bytes which are not a
    /// job id (a neighbouring secret on a command line, say) are never copied anywhere. The
    /// error names a position, never the bytes.
    pub fn from_bytes(raw: &[u8]) -> Result<Self, JobIdError> {
        let first = *raw.first().ok_or(JobIdError::Empty)?;
        if raw.len() > Self::MAX_LEN {
            return Err(JobIdError::TooLong { len: raw.len() });
        }
        if !first.is_ascii_alphanumeric() {
            return Err(JobIdError::BadFirst);
        }
        if let Some(position) = raw
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || b"._-".contains(b)))
        {
            return Err(JobIdError::BadChar { position });
        }
        // Every byte is ASCII, checked above.
        Ok(Self(raw.iter().map(|&b| char::from(b)).collect()))
    }

    /// Checks `text` against the rule.
    pub fn parse(text: &str) -> Result<Self, JobIdError> {
        Self::from_bytes(text.as_bytes())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned `String`.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::str::FromStr for JobId {
    type Err = JobIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl TryFrom<String> for JobId {
    type Error = JobIdError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl TryFrom<&str> for JobId {
    type Error = JobIdError;

    fn try_from(text: &str) -> Result<Self, Self::Error> {
        Self::parse(text)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

impl Deref for JobId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for JobId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for JobId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for JobId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for JobId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl utoipa::PartialSchema for JobId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(Self::MAX_LEN))
            .pattern(Some(Self::PATTERN))
            .description(Some(RULE))
            .examples([serde_json::json!("job-20261203-001")])
            .into()
    }
}

impl utoipa::ToSchema for JobId {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_ids_the_platform_uses() {
        for id in [
            "job-1",
            "a",
            "0190f3c2-7b1e-7c6a-9d2e-1f2a3b4c5d6e",
            "vm.42_full-sync",
            &"x".repeat(128),
        ] {
            assert_eq!(JobId::parse(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn refuses_each_kind_of_bad_id_and_says_which() {
        assert_eq!(JobId::parse(""), Err(JobIdError::Empty));
        assert_eq!(
            JobId::parse(&"x".repeat(129)),
            Err(JobIdError::TooLong { len: 129 })
        );
        for id in ["-job", ".job", "_job", ":job"] {
            assert_eq!(JobId::parse(id), Err(JobIdError::BadFirst), "{id}");
        }
        for (id, position) in [
            ("job/1", 3),
            ("job 1", 3),
            ("job\n1", 3),
            ("j:1", 1),
            ("jé", 1),
        ] {
            assert_eq!(
                JobId::parse(id),
                Err(JobIdError::BadChar { position }),
                "{id:?}"
            );
        }
    }

    #[test]
    fn an_error_states_the_rule_but_never_the_text() {
        let err = JobId::from_bytes(b"secret\0password").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("letters, digits"), "{message}");
        assert!(!message.contains("secret") && !message.contains("password"));
    }

    #[test]
    fn serde_checks_the_rule() {
        let id: JobId = serde_json::from_str("\"job-7\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"job-7\"");
        let err = serde_json::from_str::<JobId>("\"job\\n7\"").unwrap_err();
        assert!(err.to_string().contains("position 3"), "{err}");
    }

    #[test]
    fn the_pattern_says_what_parse_does() {
        // The document's pattern and the code are the same rule: spot-check the boundaries
        // the pattern encodes (first character class, length cap).
        assert!(JobId::PATTERN.starts_with("^[A-Za-z0-9]"));
        assert!(JobId::PATTERN.contains("{0,127}"));
        assert!(JobId::parse(&"a".repeat(JobId::MAX_LEN)).is_ok());
        assert!(JobId::parse(&"a".repeat(JobId::MAX_LEN + 1)).is_err());
    }
}
