//! The appliances' HTTP transport, one home for both daemons:
//!
//! - [`serve`]: HTTP/1.1 over TCP or TLS with a connection cap, a header/idle timeout and a
//!   TLS handshake timeout, stopping with a bounded wait;
//! - [`ServerTls`] and [`ClientTlsFiles`]: TLS from PEM files (rustls, `ring`), with optional
//!   client certificates both ways, re-read in place on reload;
//! - [`raise_fd_limit`]: room for the connection cap below the process's file limit.

mod serve;
mod tls;

pub use serve::{DEFAULT_MAX_CONNECTIONS, Ends, Limits, ServeStats, serve};
pub use tls::{ClientTlsFiles, ServerTls, ServerTlsFiles, TlsError};

/// File descriptors kept free of connections for the daemon's own work (database, logs,
/// `/proc` scans, outbox): the cap on connections is at most the file limit minus these.
pub const FD_RESERVE: u64 = 256;

/// Raises the soft file limit (RLIMIT_NOFILE) to fit `connections` plus [`FD_RESERVE`], as
/// far as the hard limit allows, and returns how many connections fit under the limit in
/// force afterwards (at most `connections`). Lowering is never done.
pub fn raise_fd_limit(connections: usize) -> std::io::Result<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let want = (connections as u64).saturating_add(FD_RESERVE);
    if limit.rlim_cur < want {
        let raised = libc::rlimit {
            rlim_cur: want.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own; a soft limit up to the hard one is always
        // allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    let room = limit.rlim_cur.saturating_sub(FD_RESERVE).max(1);
    Ok(connections.min(usize::try_from(room).unwrap_or(usize::MAX)))
}
