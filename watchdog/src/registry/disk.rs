//! Writing the registry's file, and the thread that writes deaths a moment after they happen.

use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{FILE_NAME, Registry};

/// Writes `bytes` to a temporary file in `dir`, syncs it, renames it over the registry file
/// and syncs the directory, so the rename itself survives a power cut.
pub(super) fn replace(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    // A leftover from a crash goes first, so the file is created anew with mode 0600 (an
    // existing file would keep its mode): the registry names every job and process.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(FILE_NAME))?;
    fs::File::open(dir)?.sync_all()
}

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
