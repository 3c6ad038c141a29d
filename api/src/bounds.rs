//! Range and length rules for the numbers and texts of the wire types, written once so that
//! the watchdog (which takes them from migratekit and the OMA) and the OMA (which takes them
//! from watchdogs and stores them) apply the same rule.
//!
//! Each type has a `validate()` that each side calls after deserializing, rather than a
//! validating `Deserialize`: the watchdog's own files (outbox, progress log) hold these types
//! too, and an event written before a rule existed must still be read and delivered, not
//! dropped as corrupt. A broken rule is a [`FieldError`] that names the field (with its path,
//! `events[2].process.start_time`) and the rule, never the value sent.

use crate::{ProcessIdentity, ProgressUpdate, StoredProgress, TrackJobRequest};

/// Largest pid Linux can hand out (`PID_MAX_LIMIT` on 64-bit kernels, the ceiling of
/// `/proc/sys/kernel/pid_max`). Pid 0 is the idle task, never a process.
pub const PID_MAX: u32 = 4_194_304;

/// Largest value of a number the OMA stores as a signed 64-bit integer (start times, bytes,
/// sequence numbers): a larger one would wrap to a negative number in its database.
pub const I64_MAX: u64 = i64::MAX as u64;

/// Longest `stage` of a progress update, in characters.
pub const MAX_STAGE_CHARS: usize = 256;

/// Longest `disk_id` of a progress update, in characters.
pub const MAX_DISK_ID_CHARS: usize = 128;

/// Longest `error_message` of a progress update, in characters. A longer one is cut to this
/// length by [`ProgressUpdate::truncate_error_message`] instead of refused: it is migratekit's
/// last word on why it failed, and a refused update would lose its `failed` status with it.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 1024;

/// Reading whole numbers as JSON Schema counts them: `930.0` is an integer there, so a client
/// generated from the documents may send it, and serde alone refuses it for a `u32`. A number
/// with a fraction, below zero or too large for the field is still refused.
pub mod whole {
    use serde::{Deserialize, Deserializer, de::Error};

    #[derive(Clone, Copy, Deserialize)]
    #[serde(untagged)]
    enum Number {
        Unsigned(u64),
        Float(f64),
    }

    fn to<T: TryFrom<u64>, E: Error>(number: Number) -> Result<T, E> {
        let value = match number {
            Number::Unsigned(v) => v,
            // 2^64 as f64: every float below it (and not below 0) converts exactly.
            Number::Float(f)
                if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) =>
            {
                f as u64
            }
            Number::Float(_) => {
                return Err(E::custom(
                    "expected a whole number, not a fraction or a negative one",
                ));
            }
        };
        T::try_from(value).map_err(|_| E::custom("number too large for this field"))
    }

    /// A whole number into `T`.
    pub fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
        to(Number::deserialize(d)?)
    }

    /// An optional whole number into `T` (null or absent is `None`; use with `default`).
    pub fn option<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
        Option::<Number>::deserialize(d)?.map(to).transpose()
    }
}

/// The schemas that state these rules in the OpenAPI documents, built from the same constants
/// (`#[schema(schema_with = ...)]` takes a function without arguments, hence one each).
pub mod schema {
    use super::{I64_MAX, MAX_DISK_ID_CHARS, MAX_STAGE_CHARS, PID_MAX};
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, SchemaType, Type};

    fn of(kind: Type, nullable: bool) -> ObjectBuilder {
        let schema_type = if nullable {
            SchemaType::from_iter([kind, Type::Null])
        } else {
            SchemaType::new(kind)
        };
        ObjectBuilder::new().schema_type(schema_type)
    }

    fn stored_integer(nullable: bool) -> ObjectBuilder {
        of(Type::Integer, nullable)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(0))
            .maximum(Some(I64_MAX as f64))
    }

    /// A Linux pid: 1 to [`PID_MAX`].
    pub fn pid() -> ObjectBuilder {
        of(Type::Integer, false)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
            .minimum(Some(1))
            .maximum(Some(PID_MAX))
    }

    /// A count the OMA stores as a signed 64-bit integer: 0 to [`I64_MAX`].
    pub fn stored_count() -> ObjectBuilder {
        stored_integer(false)
    }

    /// [`stored_count`], or null (absent).
    pub fn optional_stored_count() -> ObjectBuilder {
        stored_integer(true)
    }

    /// A percentage, 0 to 100, or null (absent).
    pub fn optional_percent() -> ObjectBuilder {
        of(Type::Number, true)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Double)))
            .minimum(Some(0))
            .maximum(Some(100))
    }

    /// A progress update's `stage`: at most [`MAX_STAGE_CHARS`] characters.
    pub fn stage() -> ObjectBuilder {
        of(Type::String, false).max_length(Some(MAX_STAGE_CHARS))
    }

    /// A progress update's `disk_id`: at most [`MAX_DISK_ID_CHARS`] characters, or null.
    pub fn optional_disk_id() -> ObjectBuilder {
        of(Type::String, true).max_length(Some(MAX_DISK_ID_CHARS))
    }
}

/// Why a value breaks its rule. The message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// A text is longer than its limit.
    #[error("field `{field}` has {len} characters; at most {max} are accepted")]
    TooLong {
        /// The field, with its path.
        field: String,
        /// Its length in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A number is outside its range.
    #[error("field `{field}` is out of range: it must be {rule}")]
    OutOfRange {
        /// The field, with its path.
        field: String,
        /// The range, in words.
        rule: &'static str,
    },
}

impl FieldError {
    /// The field, with its path.
    pub fn field(&self) -> &str {
        match self {
            Self::TooLong { field, .. } | Self::OutOfRange { field, .. } => field,
        }
    }

    /// The same error for a field inside `parent` (`process` → `events[2].process`).
    #[must_use]
    pub fn within(self, parent: &str) -> Self {
        let path = |field: String| format!("{parent}.{field}");
        match self {
            Self::TooLong { field, len, max } => Self::TooLong {
                field: path(field),
                len,
                max,
            },
            Self::OutOfRange { field, rule } => Self::OutOfRange {
                field: path(field),
                rule,
            },
        }
    }
}

fn out_of_range(field: &str, rule: &'static str) -> FieldError {
    FieldError::OutOfRange {
        field: field.to_owned(),
        rule,
    }
}

fn check_pid(field: &str, pid: u32) -> Result<(), FieldError> {
    if (1..=PID_MAX).contains(&pid) {
        Ok(())
    } else {
        Err(out_of_range(
            field,
            "a Linux process id, from 1 to 4194304 (the kernel's pid_max limit)",
        ))
    }
}

fn check_i64(field: &str, value: u64) -> Result<(), FieldError> {
    if value <= I64_MAX {
        Ok(())
    } else {
        Err(out_of_range(
            field,
            "at most 9223372036854775807 (2^63 - 1, the largest value the OMA stores)",
        ))
    }
}

fn check_len(field: &str, text: Option<&str>, max: usize) -> Result<(), FieldError> {
    // Counting stops just past the limit: a 60 KiB text costs no more than a short one.
    let len = text.map_or(0, |t| t.chars().take(max + 1).count());
    if len <= max {
        Ok(())
    } else {
        Err(FieldError::TooLong {
            field: field.to_owned(),
            len: text.map_or(0, |t| t.chars().count()),
            max,
        })
    }
}

impl ProcessIdentity {
    /// `pid` is a Linux pid (1 to [`PID_MAX`]) and `start_time` at most `i64::MAX` (the OMA
    /// stores it as a signed 64-bit integer; `/proc` counts clock ticks since boot, far below).
    pub fn validate(&self) -> Result<(), FieldError> {
        check_pid("pid", self.pid)?;
        check_i64("start_time", self.start_time)
    }
}

impl TrackJobRequest {
    /// `pid` is a Linux pid (1 to [`PID_MAX`]).
    pub fn validate(&self) -> Result<(), FieldError> {
        check_pid("pid", self.pid)
    }
}

impl ProgressUpdate {
    /// Every number in range and every text within its limit:
    ///
    /// - `percent`, when given, a finite number from 0 to 100;
    /// - `bytes_transferred`, `total_bytes`, `throughput_bps` at most `i64::MAX` (the OMA
    ///   stores them as signed 64-bit integers);
    /// - `total_bytes`, when given, at least `bytes_transferred`: a copy cannot have moved
    ///   more than there is, and a percentage computed from such figures would pass 100;
    /// - `stage` at most [`MAX_STAGE_CHARS`], `disk_id` [`MAX_DISK_ID_CHARS`] and
    ///   `error_message` [`MAX_ERROR_MESSAGE_CHARS`] characters (call
    ///   [`ProgressUpdate::truncate_error_message`] first to cut the last one rather than
    ///   refuse it).
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(percent) = self.percent
            && !(percent.is_finite() && (0.0..=100.0).contains(&percent))
        {
            return Err(out_of_range("percent", "a finite number from 0 to 100"));
        }
        check_i64("bytes_transferred", self.bytes_transferred)?;
        check_i64("throughput_bps", self.throughput_bps)?;
        if let Some(total) = self.total_bytes {
            check_i64("total_bytes", total)?;
            if total < self.bytes_transferred {
                return Err(out_of_range(
                    "total_bytes",
                    "at least bytes_transferred when both are given",
                ));
            }
        }
        check_len("stage", Some(&self.stage), MAX_STAGE_CHARS)?;
        check_len("disk_id", self.disk_id.as_deref(), MAX_DISK_ID_CHARS)?;
        check_len(
            "error_message",
            self.error_message.as_deref(),
            MAX_ERROR_MESSAGE_CHARS,
        )
    }

    /// Cuts an `error_message` longer than [`MAX_ERROR_MESSAGE_CHARS`] down to that length:
    /// its beginning and its end (a Go error chain names the root cause last) around a marker
    /// that says how long it was. Returns the original length in characters when it cut.
    pub fn truncate_error_message(&mut self) -> Option<usize> {
        let message = self.error_message.as_mut()?;
        let len = message.chars().count();
        if len <= MAX_ERROR_MESSAGE_CHARS {
            return None;
        }
        let marker = format!(" [... cut by the VMA watchdog: {len} characters in all ...] ");
        let keep = MAX_ERROR_MESSAGE_CHARS.saturating_sub(marker.chars().count());
        let head: String = message.chars().take(keep / 2).collect();
        let tail: String = message.chars().skip(len - (keep - keep / 2)).collect();
        *message = format!("{head}{marker}{tail}");
        Some(len)
    }
}

impl StoredProgress {
    /// The update's rules ([`ProgressUpdate::validate`]), under `update`, and `sequence` at
    /// most `i64::MAX` (the OMA stores it as a signed 64-bit integer).
    pub fn validate(&self) -> Result<(), FieldError> {
        check_i64("sequence", self.sequence)?;
        self.update.validate().map_err(|e| e.within("update"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> ProgressUpdate {
        serde_json::from_str(
            r#"{"stage":"Transfer","bytes_transferred":10,"total_bytes":100,
                "throughput_bps":5,"percent":10.0,"disk_id":"disk-2000"}"#,
        )
        .unwrap()
    }

    fn refused(change: impl FnOnce(&mut ProgressUpdate)) -> FieldError {
        let mut u = update();
        change(&mut u);
        u.validate().unwrap_err()
    }

    #[test]
    fn percent_is_finite_and_from_0_to_100() {
        for bad in [-50.0, 100.5, f64::NAN, f64::INFINITY] {
            let err = refused(|u| u.percent = Some(bad));
            assert_eq!(err.field(), "percent", "{bad}");
            assert!(err.to_string().contains("from 0 to 100"), "{err}");
        }
        for good in [0.0, -0.0, 100.0, 42.5] {
            let mut u = update();
            u.percent = Some(good);
            assert_eq!(u.validate(), Ok(()), "{good}");
        }
    }

    #[test]
    fn byte_counts_fit_an_i64_and_total_is_not_below_transferred() {
        assert_eq!(
            refused(|u| u.bytes_transferred = 1 << 63).field(),
            "bytes_transferred"
        );
        assert_eq!(
            refused(|u| u.throughput_bps = u64::MAX).field(),
            "throughput_bps"
        );
        assert_eq!(refused(|u| u.total_bytes = Some(9)).field(), "total_bytes");
        let mut u = update();
        u.total_bytes = None;
        u.bytes_transferred = I64_MAX;
        assert_eq!(u.validate(), Ok(()), "no total: nothing to compare with");
    }

    #[test]
    fn texts_have_limits_that_name_the_field() {
        let err = refused(|u| u.stage = "s".repeat(MAX_STAGE_CHARS + 1));
        assert_eq!(
            err,
            FieldError::TooLong {
                field: "stage".into(),
                len: 257,
                max: 256
            }
        );
        assert_eq!(
            err.to_string(),
            "field `stage` has 257 characters; at most 256 are accepted"
        );
        // Characters, not bytes: 256 three-byte characters pass.
        let mut u = update();
        u.stage = "€".repeat(MAX_STAGE_CHARS);
        assert_eq!(u.validate(), Ok(()));
        let err = refused(|u| u.disk_id = Some("d".repeat(129)));
        assert_eq!(err.field(), "disk_id");
        let err = refused(|u| u.error_message = Some("e".repeat(1025)));
        assert_eq!(err.field(), "error_message");
    }

    #[test]
    fn a_long_error_message_keeps_its_head_and_tail_around_a_marker() {
        let mut u = update();
        let long = format!("HEAD {} ROOT CAUSE", "é".repeat(5000));
        u.error_message = Some(long.clone());
        assert_eq!(u.truncate_error_message(), Some(long.chars().count()));
        let cut = u.error_message.clone().unwrap();
        assert!(cut.chars().count() <= MAX_ERROR_MESSAGE_CHARS, "{cut}");
        assert!(cut.starts_with("HEAD "), "{cut}");
        assert!(cut.ends_with(" ROOT CAUSE"), "{cut}");
        assert!(cut.contains("cut by the VMA watchdog: 5016 characters in all"));
        assert_eq!(u.validate(), Ok(()));
        // Within the limit: untouched.
        assert_eq!(u.truncate_error_message(), None);
        assert_eq!(u.error_message.as_deref(), Some(cut.as_str()));
    }

    #[test]
    fn process_identity_pid_and_start_time() {
        let ok = ProcessIdentity {
            pid: PID_MAX,
            start_time: I64_MAX,
        };
        assert_eq!(ok.validate(), Ok(()));
        let err = ProcessIdentity {
            pid: 1,
            start_time: 1 << 63,
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field(), "start_time");
        let err = err.within("events[0].process");
        assert_eq!(err.field(), "events[0].process.start_time");
        for pid in [0, PID_MAX + 1] {
            let err = ProcessIdentity { pid, start_time: 1 }
                .validate()
                .unwrap_err();
            assert_eq!(err.field(), "pid");
            assert!(err.to_string().contains("4194304"), "{err}");
            assert_eq!(
                TrackJobRequest { pid }.validate().unwrap_err().field(),
                "pid"
            );
        }
    }

    #[test]
    fn stored_progress_checks_its_sequence_and_its_update() {
        let mut stored = StoredProgress {
            job_id: crate::JobId::parse("j1").unwrap(),
            update: update(),
            received_at: chrono::Utc::now(),
            sequence: 1,
        };
        assert_eq!(stored.validate(), Ok(()));
        stored.update.percent = Some(-50.0);
        assert_eq!(stored.validate().unwrap_err().field(), "update.percent");
        stored.update.percent = None;
        stored.sequence = u64::MAX;
        assert_eq!(stored.validate().unwrap_err().field(), "sequence");
    }

    #[test]
    fn whole_numbers_may_be_written_as_json_schema_integers() {
        let track: TrackJobRequest = serde_json::from_str(r#"{"pid": 930.0}"#).unwrap();
        assert_eq!(track.pid, 930);
        for bad in [
            r#"{"pid": 930.5}"#,
            r#"{"pid": -1}"#,
            r#"{"pid": 4294967296}"#,
            r#"{"pid": "1"}"#,
        ] {
            assert!(
                serde_json::from_str::<TrackJobRequest>(bad).is_err(),
                "{bad}"
            );
        }
        let u: ProgressUpdate = serde_json::from_str(
            r#"{"stage":"s","bytes_transferred":1.0,"throughput_bps":0,"total_bytes":null}"#,
        )
        .unwrap();
        assert_eq!((u.bytes_transferred, u.total_bytes), (1, None));
        let u: ProgressUpdate = serde_json::from_str(
            r#"{"stage":"s","bytes_transferred":1,"throughput_bps":0,"total_bytes":2e3}"#,
        )
        .unwrap();
        assert_eq!(u.total_bytes, Some(2000));
    }
}
