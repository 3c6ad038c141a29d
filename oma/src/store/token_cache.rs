//! VMA tokens by hash, from memory: every event batch is authenticated, and asking the
//! database each time costs a round trip through its one SQLite connection on the path of
//! every death.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a token found in the database is trusted without asking again. A token replaced
/// through another OMA on the same PostgreSQL database stops working here within this time; one
/// replaced through this OMA stops at once.
pub const TOKEN_TTL: Duration = Duration::from_secs(10);

/// Token hash -> (VMA id, when it was read). Only tokens that exist are kept, so a VMA
/// registered through another OMA is accepted at once.
#[derive(Debug, Default)]
pub(crate) struct TokenCache(Mutex<HashMap<String, (String, Instant)>>);

impl TokenCache {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // Each change is one insert or clear: a poisoned map is still whole.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VMA of `hash`, when read less than [`TOKEN_TTL`] ago.
    pub(crate) fn get(&self, hash: &str) -> Option<String> {
        let map = self.map();
        let (vma, at) = map.get(hash)?;
        (at.elapsed() < TOKEN_TTL).then(|| vma.clone())
    }

    pub(crate) fn insert(&self, hash: &str, vma: &str) {
        let mut map = self.map();
        // Hashes of replaced tokens would otherwise stay for the process's lifetime.
        map.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
        map.insert(hash.to_owned(), (vma.to_owned(), Instant::now()));
    }

    /// Forgets every token: a VMA's token was replaced.
    pub(crate) fn clear(&self) {
        self.map().clear();
    }
}
