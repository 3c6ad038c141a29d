//! Several OMAs on one database: the watchdog knows their URLs (`--oma-url`, repeatable or a
//! comma-separated list, in order of preference) and delivers to one at a time.
//!
//! It starts with the first. A connection failure, a timeout or a 5xx answer moves it to the
//! next (round the list), where it then stays while that one answers: the OMAs share one
//! database, and every OMA applies each event id once, so it matters not which one takes a
//! batch, nor that a batch one OMA applied without the answer arriving goes again to another.
//! A refusal (4xx: a wrong token, an unknown VMA) stays on the same OMA, since all of them
//! would say the same. While it is away from the first, it tries the first again after
//! [`PREFER_AGAIN`], so that a restarted preferred OMA gets its VMAs' events back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the watchdog stays with a fallback OMA before trying the preferred one again.
pub const PREFER_AGAIN: Duration = Duration::from_secs(60);

/// What an attempt at one OMA came to, as far as choosing the OMA goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (acknowledged, or refused with a 4xx that every OMA would give).
    Answered,
    /// It could not be reached, timed out or failed (5xx): try the next.
    Unavailable,
}

#[derive(Debug)]
struct Choice {
    current: usize,
    /// When the watchdog moved away from the preferred OMA (index 0).
    left_preferred: Option<Instant>,
}

/// The OMAs' base URLs and the one in use.
#[derive(Debug)]
pub struct OmaUrls {
    urls: Vec<String>,
    choice: Mutex<Choice>,
}

impl OmaUrls {
    /// The URLs of `list`: one base URL, or several separated by commas (the form the
    /// configuration keeps them in), each without a trailing slash.
    pub fn parse(list: &str) -> Self {
        let urls: Vec<String> = list
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        Self {
            urls: if urls.is_empty() {
                vec![String::new()]
            } else {
                urls
            },
            choice: Mutex::new(Choice {
                current: 0,
                left_preferred: None,
            }),
        }
    }

    /// The URLs, in order of preference.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The OMA to try now, as (index, base URL): the current one, or the preferred one when
    /// the watchdog has been away from it for [`PREFER_AGAIN`].
    pub fn pick(&self) -> (usize, &str) {
        self.pick_at(Instant::now())
    }

    fn pick_at(&self, now: Instant) -> (usize, &str) {
        let mut choice = self.choice.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(left) = choice.left_preferred
            && choice.current != 0
            && now.duration_since(left) >= PREFER_AGAIN
        {
            tracing::info!(event = "oma_preferred_retry", url = %self.urls[0],
                "trying the preferred OMA again");
            choice.current = 0;
        }
        (choice.current, &self.urls[choice.current])
    }

    /// Records what the attempt at OMA `index` came to; moves on to the next OMA when it was
    /// unavailable and still the current one. Returns whether the OMA changed.
    pub fn record(&self, index: usize, outcome: Outcome) -> bool {
        self.record_at(index, outcome, Instant::now())
    }

    fn record_at(&self, index: usize, outcome: Outcome, now: Instant) -> bool {
        let mut choice = self.choice.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Outcome::Answered => {
                if index == 0 {
                    choice.left_preferred = None;
                }
                false
            }
            Outcome::Unavailable if self.urls.len() > 1 && choice.current == index => {
                let next = (index + 1) % self.urls.len();
                tracing::warn!(event = "oma_failover", from = %self.urls[index], to = %self.urls[next],
                    "the OMA is unavailable; delivering to the next one");
                if index == 0 {
                    choice.left_preferred = Some(now);
                } else if next == 0 {
                    choice.left_preferred = None;
                }
                choice.current = next;
                true
            }
            Outcome::Unavailable => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_fails_over_in_order_sticks_and_goes_back_to_the_preferred_one_later() {
        let omas = OmaUrls::parse("http://a:1/, http://b:2,http://c:3");
        assert_eq!(omas.urls(), ["http://a:1", "http://b:2", "http://c:3"]);
        let t0 = Instant::now();
        assert_eq!(omas.pick_at(t0), (0, "http://a:1"));
        assert!(omas.record_at(0, Outcome::Unavailable, t0));
        assert_eq!(omas.pick_at(t0), (1, "http://b:2"));
        // A late failure of an OMA no longer in use changes nothing.
        assert!(!omas.record_at(0, Outcome::Unavailable, t0));
        assert!(!omas.record_at(1, Outcome::Answered, t0));
        let later = t0 + PREFER_AGAIN / 2;
        assert_eq!(
            omas.pick_at(later),
            (1, "http://b:2"),
            "sticks to the one that works"
        );
        let much_later = t0 + PREFER_AGAIN;
        assert_eq!(
            omas.pick_at(much_later),
            (0, "http://a:1"),
            "tries the preferred again"
        );
        assert!(omas.record_at(0, Outcome::Unavailable, much_later));
        assert_eq!(omas.pick_at(much_later), (1, "http://b:2"));
        assert!(omas.record_at(1, Outcome::Unavailable, much_later));
        assert!(omas.record_at(2, Outcome::Unavailable, much_later));
        assert_eq!(
            omas.pick_at(much_later),
            (0, "http://a:1"),
            "round the list"
        );
    }

    #[test]
    fn one_url_never_moves() {
        let omas = OmaUrls::parse("http://a:1");
        assert!(!omas.record(0, Outcome::Unavailable));
        assert_eq!(omas.pick(), (0, "http://a:1"));
    }
}
