//! Crash points of the outbox's death path, for the crash-safety tests.
//!
//! Compiled in only with the `crash-points` feature (this crate's own tests turn it on; a
//! normal build has none of it and `at` is an empty inline function). With the feature,
//! the process SIGKILLs itself at the point named by `VMA_WATCHDOG_CRASH_AT`, the first time
//! a death (not a start) passes it, so that a test can crash the real daemon at each step
//! between a death's write and its removal from the outbox, deterministically.

/// A step of a death's way through the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// In `append`, before the event's `write(2)`.
    BeforeWrite,
    /// In `append`, after the `write(2)`, before the `fdatasync` starts.
    AfterWrite,
    /// In the delivery, after the OMA answered the POST, before its acknowledgement is read.
    DuringPost,
    /// In `acknowledge`: the OMA acknowledged the event, its local flush has not completed.
    AfterAckBeforeFlush,
    /// In `append`, after the `fdatasync` returned, before anything acknowledged the event.
    AfterFlush,
    /// In `acknowledge`: acknowledged and flushed, before the acknowledgement is written.
    AfterAckAndFlush,
}

impl Point {
    /// The name `VMA_WATCHDOG_CRASH_AT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::BeforeWrite => "before_write",
            Self::AfterWrite => "after_write",
            Self::DuringPost => "during_post",
            Self::AfterAckBeforeFlush => "after_ack_before_flush",
            Self::AfterFlush => "after_flush",
            Self::AfterAckAndFlush => "after_ack_and_flush",
        }
    }

    /// Every point, in the order a death passes them (with a parallel flush, `DuringPost`
    /// and the flush race; the tests force each order).
    pub const ALL: [Point; 6] = [
        Self::BeforeWrite,
        Self::AfterWrite,
        Self::DuringPost,
        Self::AfterAckBeforeFlush,
        Self::AfterFlush,
        Self::AfterAckAndFlush,
    ];
}

#[cfg(feature = "crash-points")]
fn armed() -> Option<&'static str> {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    AT.get_or_init(|| std::env::var("VMA_WATCHDOG_CRASH_AT").ok())
        .as_deref()
}

/// SIGKILLs this process when `point` is armed and `death` says a death passes it.
#[cfg(feature = "crash-points")]
pub(crate) fn at(point: Point, death: bool) {
    if death && armed() == Some(point.name()) {
        eprintln!(
            "{{\"event\":\"crash_point\",\"point\":\"{}\"}}",
            point.name()
        );
        // SAFETY: kill(2) on this process with a valid signal has no preconditions.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// A normal build has no crash points.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub(crate) fn at(_point: Point, _death: bool) {}

/// Holds a death's `fdatasync` back (for a minute) when the point armed is
/// [`Point::AfterAckBeforeFlush`], so that the OMA's acknowledgement arrives first.
#[cfg(feature = "crash-points")]
pub(crate) fn hold_flush(death: bool) {
    if death && armed() == Some(Point::AfterAckBeforeFlush.name()) {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// A normal build holds nothing back.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub(crate) fn hold_flush(_death: bool) {}
