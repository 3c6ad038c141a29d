//! The thread that writes deaths to the registry's file a moment after they happen.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Registry;

/// How long the flusher waits after a change before writing it: long enough to stay out of
/// the way of the OMA's commit of the same death (milliseconds later, on the same disk on a
/// one-box install) and to write a burst of deaths once, short enough that a crash rarely
/// finds a death that only the outbox holds.
pub const FLUSH_DELAY: Duration = Duration::from_millis(100);

/// How long the flusher waits before trying again after a failed write.
const RETRY_DELAY: Duration = Duration::from_secs(1);

impl Registry {
    /// Starts the thread that writes changes [`FLUSH_DELAY`] after they are made. It holds
    /// only a weak reference, and ends within a second of the registry being dropped; whoever
    /// stops the daemon calls [`Registry::flush`] for what is still in memory.
    pub fn spawn_flusher(self: &Arc<Self>, delay: Duration) -> io::Result<JoinHandle<()>> {
        let registry = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("registry-flush".to_owned())
            .spawn(move || {
                loop {
                    let Some(r) = registry.upgrade() else { return };
                    if !r.wait_dirty(Duration::from_secs(1)) {
                        continue;
                    }
                    drop(r);
                    std::thread::sleep(delay);
                    let Some(r) = registry.upgrade() else { return };
                    if let Err(error) = r.flush() {
                        tracing::error!(event = "registry_error", %error,
                            retry_in_ms = RETRY_DELAY.as_millis() as u64,
                            "cannot write recorded deaths to the registry; they are kept in memory and in the outbox, retrying");
                        std::thread::sleep(RETRY_DELAY);
                    }
                }
            })
    }

    /// Waits at most `limit` for a change not yet written; returns whether there is one.
    fn wait_dirty(&self, limit: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, limit, |s| !s.dirty())
            .unwrap_or_else(|p| p.into_inner());
        state.dirty()
    }
}
