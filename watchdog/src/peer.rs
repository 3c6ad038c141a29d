//! Which process is at the other end of a loopback TCP connection.
//!
//! Progress updates come from migratekit without credentials, so the only way to tell the
//! job's own process from any other local process is to look the connection up in `/proc`:
//! the peer's address and port give the row of its socket in `/proc/<pid>/net/tcp` (or
//! `tcp6`) and that row the socket's inode; the process holds that inode if one of the links
//! in its `/proc/<pid>/fd` reads `socket:[<inode>]`. The row is asked of the kernel first
//! with an exact `sock_diag` query (`diag.rs`: a hash lookup, where reading the table walks
//! every bucket); only when that finds nothing are the tables read, through the job's own
//! process (`/proc/<pid>/net`), so that they are those of its network namespace.
//!
//! A process is `(pid, start time)`: the start time is checked before and after the lookup,
//! so a pid that is reused in between is never mistaken for the job's process. Threads share
//! their process's fd table and count as the process; a child process does not, even though
//! it may hold the same socket, because it is not the process the registry watches.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use api::ProcessIdentity;

use crate::launcher::proc_start_time;

mod diag;

/// The two ends of an accepted connection, as the server sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The server's own address and port on this connection (not the listener's, which may
    /// be a wildcard).
    pub local: SocketAddr,
}

impl From<transport::Ends> for Connection {
    fn from(ends: transport::Ends) -> Self {
        Self {
            peer: ends.peer,
            local: ends.local,
        }
    }
}

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`: what the lookup needs of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketRow {
    /// The socket's own address.
    pub local: SocketAddr,
    /// The address it is connected to (all zeros for a listener).
    pub remote: SocketAddr,
    /// The owner's user id (the effective uid of whoever created the socket).
    pub uid: u32,
    /// The socket's inode (0 for a socket no process holds, e.g. in `TIME_WAIT`).
    pub inode: u64,
}

/// Why a connection could not be shown to come from the expected process.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The process is gone.
    #[error("the job's process (pid {pid}) no longer runs")]
    Gone {
        /// Its pid.
        pid: u32,
    },
    /// The pid belongs to another process now (or was reused during the lookup).
    #[error("pid {pid} is now another process (start time {now}, registered {registered})")]
    Replaced {
        /// The pid.
        pid: u32,
        /// The start time the registry holds.
        registered: u64,
        /// The start time `/proc` shows.
        now: u64,
    },
    /// No socket in the process's network namespace has these two ends.
    #[error(
        "no TCP socket from {} to {} in the network namespace of pid {pid}",
        conn.peer,
        conn.local
    )]
    NoSocket {
        /// The job's pid.
        pid: u32,
        /// The connection.
        conn: Connection,
    },
    /// The socket exists but the process does not hold it: another process made the call.
    #[error("the connection's socket (inode {}, uid {}) is not held by pid {pid}", row.inode, row.uid)]
    NotHeld {
        /// The job's pid.
        pid: u32,
        /// The peer's socket.
        row: SocketRow,
    },
    /// `/proc` could not be read.
    #[error("cannot read {path}: {source}")]
    Proc {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl PeerError {
    /// The peer's socket row, when it was found (its uid says who made the call).
    pub fn row(&self) -> Option<SocketRow> {
        match self {
            Self::NotHeld { row, .. } => Some(*row),
            _ => None,
        }
    }
}

/// Checks that `conn` comes from `process` (or one of its threads) and returns the peer's
/// socket row.
pub fn verify(process: ProcessIdentity, conn: Connection) -> Result<SocketRow, PeerError> {
    let pid = process.pid;
    check_identity(process)?;
    let views = views_of(pid);
    let row = match diag::lookup(conn.peer, conn.local) {
        Ok(Some(row)) => row,
        // Not in the watchdog's network namespace (or no sock_diag in this kernel): the
        // tables of the job's own namespace, read the slow way.
        Ok(None) | Err(_) => find_row(&views, conn)?.ok_or(PeerError::NoSocket { pid, conn })?,
    };
    let held = holds_inode(&views, row.inode)?;
    // Checked again after the lookup: if the pid died and was reused while we read its
    // fds, the start time differs now and the answer is about another process.
    check_identity(process)?;
    if held {
        Ok(row)
    } else {
        Err(PeerError::NotHeld { pid, row })
    }
}

fn check_identity(process: ProcessIdentity) -> Result<(), PeerError> {
    let pid = process.pid;
    match proc_start_time(pid) {
        Ok(now) if now == process.start_time => Ok(()),
        Ok(now) => Err(PeerError::Replaced {
            pid,
            registered: process.start_time,
            now,
        }),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidData) => {
            Err(PeerError::Gone { pid })
        }
        Err(source) => Err(PeerError::Proc {
            path: format!("/proc/{pid}/stat").into(),
            source,
        }),
    }
}

/// The `/proc` directories through which the process's fd table and network namespace can
/// be read: the process itself, then its threads. The threads matter when the leader thread
/// has exited while the others run: its own directory then lists no fds.
fn views_of(pid: u32) -> Views {
    Views {
        base: PathBuf::from(format!("/proc/{pid}")),
        pid,
    }
}

struct Views {
    base: PathBuf,
    pid: u32,
}

impl Views {
    /// The thread directories other than the leader's, read only when the leader's view
    /// gave nothing (the common case never lists the threads).
    fn threads(&self) -> Vec<PathBuf> {
        let task = self.base.join("task");
        let Ok(entries) = std::fs::read_dir(&task) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str() != Some(&self.pid.to_string()))
            .map(|e| e.path())
            .collect()
    }
}

/// The peer's socket row in the process's network namespace, or `None`.
fn find_row(views: &Views, conn: Connection) -> Result<Option<SocketRow>, PeerError> {
    for (table, peer, local) in lookup_forms(conn) {
        let path = views.base.join("net").join(table);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // A zombie leader has no network namespace left: read through a live thread.
            Err(_) => match read_via_threads(views, table) {
                Some(text) => text,
                None => continue,
            },
        };
        let found = text.lines().filter_map(parse_row).find(|row| {
            // A row without an inode (`TIME_WAIT`) belongs to no process.
            row.inode != 0 && same_end(row.local, peer) && same_end(row.remote, local)
        });
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn read_via_threads(views: &Views, table: &str) -> Option<String> {
    views
        .threads()
        .into_iter()
        .find_map(|t| std::fs::read_to_string(t.join("net").join(table)).ok())
}

/// The tables to look in and the two ends as they appear there. An IPv4 peer (or an
/// IPv4-mapped one, as a dual-stack listener sees it) is in `tcp` when the client used an
/// IPv4 socket and in `tcp6`, mapped, when it used an IPv6 socket.
fn lookup_forms(conn: Connection) -> Vec<(&'static str, SocketAddr, SocketAddr)> {
    let (peer, local) = (unmap(conn.peer), unmap(conn.local));
    if peer.is_ipv4() && local.is_ipv4() {
        vec![
            ("tcp", peer, local),
            ("tcp6", to_mapped(peer), to_mapped(local)),
        ]
    } else {
        vec![("tcp6", to_mapped(peer), to_mapped(local))]
    }
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn to_mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// Address and port equal; an IPv6 scope id or flow label is not in the table.
fn same_end(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip() && a.port() == b.port()
}

/// Whether the process's fd table holds `inode`. One readlink per fd of the leader's table;
/// the threads' directories are read only if the leader's lists nothing (it has exited).
/// Threads share one table, so the first non-empty one is the process's.
fn holds_inode(views: &Views, inode: u64) -> Result<bool, PeerError> {
    let needle = format!("socket:[{inode}]");
    match scan_fds(&views.base.join("fd"), &needle) {
        Ok(Scan::Found) => return Ok(true),
        Ok(Scan::NotFound) => return Ok(false),
        Ok(Scan::Empty) | Err(_) => {}
    }
    for thread in views.threads() {
        match scan_fds(&thread.join("fd"), &needle) {
            Ok(Scan::Found) => return Ok(true),
            Ok(Scan::NotFound) => return Ok(false),
            Ok(Scan::Empty) | Err(_) => {}
        }
    }
    let path = views.base.join("fd");
    match std::fs::read_dir(&path) {
        Ok(_) => Ok(false),
        Err(source) => Err(PeerError::Proc { path, source }),
    }
}

enum Scan {
    Found,
    NotFound,
    Empty,
}

fn scan_fds(dir: &Path, needle: &str) -> std::io::Result<Scan> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    let mut any = false;
    let mut name = [0u8; 24];
    let mut target = [0u8; 64];
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let file = entry.file_name();
        let file = file.as_encoded_bytes();
        // fd numbers are at most 10 digits; anything longer is not an fd.
        let Some(slot) = name.get_mut(..=file.len()) else {
            continue;
        };
        slot[..file.len()].copy_from_slice(file);
        slot[file.len()] = 0;
        any = true;
        // Relative to the open directory, into a stack buffer: no path is walked from
        // `/proc` and nothing is allocated per fd (measured: 0.7 us a link against 1 us).
        // SAFETY: `name` is NUL-terminated and `target` is valid for writes of its length.
        let len = unsafe {
            libc::readlinkat(
                handle.as_raw_fd(),
                name.as_ptr().cast(),
                target.as_mut_ptr().cast(),
                target.len(),
            )
        };
        // An fd closed between the listing and the readlink (-1) is simply not it.
        if usize::try_from(len).is_ok_and(|len| target.get(..len) == Some(needle.as_bytes())) {
            return Ok(Scan::Found);
        }
    }
    Ok(if any { Scan::NotFound } else { Scan::Empty })
}

/// Any process holding the socket `inode`, found by reading every process's fds: for the
/// log line of a refused call only (it costs one readlink per fd on the host).
pub fn find_any_holder(inode: u64) -> Option<u32> {
    let needle = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            matches!(
                scan_fds(Path::new(&format!("/proc/{pid}/fd")), &needle),
                Ok(Scan::Found)
            )
        })
}

/// Parses one row of `/proc/net/tcp` or `/proc/net/tcp6`; `None` for the header line or
/// anything else that is not a row.
///
/// A row reads `sl local remote st tx:rx tr:when retrnsmt uid timeout inode ...`. Addresses
/// are hex: IPv4 one 32-bit word, IPv6 four, each printed as the kernel holds it in memory
/// (network byte order read as a native integer, so byte-swapped per word on little-endian
/// hosts); ports are plain hex numbers.
pub fn parse_row(line: &str) -> Option<SocketRow> {
    let mut fields = line.split_whitespace();
    let slot = fields.next()?;
    if !slot.ends_with(':') {
        return None;
    }
    let local = parse_end(fields.next()?)?;
    let remote = parse_end(fields.next()?)?;
    let mut rest = fields.skip(4);
    let uid = rest.next()?.parse().ok()?;
    let inode = rest.nth(1)?.parse().ok()?;
    Some(SocketRow {
        local,
        remote,
        uid,
        inode,
    })
}

fn parse_end(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?.to_ne_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn word(hex: &str) -> Option<u32> {
    u32::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests;
