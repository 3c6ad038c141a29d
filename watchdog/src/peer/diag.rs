//! The peer's socket found by an exact `NETLINK_SOCK_DIAG` query: one hash lookup in the
//! kernel, where reading `/proc/net/tcp` walks every bucket of the TCP hash table (262,144 on
//! the development machine: about 1.1 ms per read, whatever the number of sockets).
//!
//! The query sees the network namespace of the calling thread (a netlink socket belongs to
//! the namespace it is created in). [`super::verify`] falls back to the `/proc` tables of the
//! job's own process when this finds nothing, which covers a job in another namespace.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::SocketRow;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// `INET_DIAG_NOCOOKIE`: match whatever the socket's cookie.
const NO_COOKIE: u32 = !0;
const TCP_LISTEN: u8 = 10;
/// `nlmsghdr` (16 bytes), then `inet_diag_req_v2`: family, protocol, ext, pad, states (8
/// bytes), then the `inet_diag_sockid` (48 bytes).
const REQUEST_LEN: usize = 16 + 8 + 48;
/// Offsets in a reply's `inet_diag_msg` (after its 16-byte `nlmsghdr`): family, state, the
/// sockid at 4, then expires, rqueue, wqueue, uid and inode.
const MSG_STATE: usize = 1;
const MSG_ID: usize = 4;
const MSG_UID: usize = 4 + 48 + 12;
const MSG_INODE: usize = MSG_UID + 4;

/// The socket whose own end is `local` and whose other end is `remote`, as the kernel's TCP
/// hash finds it; `None` when there is none (or only one without an inode, in `TIME_WAIT`).
///
/// Both ends are looked up as IPv4 when both are IPv4 or IPv4-mapped: the kernel then finds
/// an IPv4 client socket and an IPv6 one connected to a mapped address alike.
pub fn lookup(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<SocketRow>> {
    let (local, remote) = (super::unmap(local), super::unmap(remote));
    let family = if local.is_ipv4() && remote.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let socket = open()?;
    let request = request(family as u8, local, remote);
    // SAFETY: the buffer is valid for its length; the socket is a netlink socket we own.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: the buffer is valid for writes of its length.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
    parse_reply(&reply[..got], local, remote)
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory-safety preconditions.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // An answer that never comes must not hold an HTTP request for long.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: the option value is a valid timeval of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// An exact-match request (no `NLM_F_DUMP`): `src` is the socket's own end, `dst` the other.
fn request(family: u8, local: SocketAddr, remote: SocketAddr) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    r[16] = family;
    r[17] = libc::IPPROTO_TCP as u8;
    r[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    r[24..24 + 48].copy_from_slice(&sockid(local, remote));
    r
}

/// `inet_diag_sockid`: ports and addresses in network byte order, interface 0, no cookie.
fn sockid(local: SocketAddr, remote: SocketAddr) -> [u8; 48] {
    let mut id = [0u8; 48];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&remote.port().to_be_bytes());
    id[4..20].copy_from_slice(&address_bytes(local.ip()));
    id[20..36].copy_from_slice(&address_bytes(remote.ip()));
    id[40..44].copy_from_slice(&NO_COOKIE.to_ne_bytes());
    id[44..48].copy_from_slice(&NO_COOKIE.to_ne_bytes());
    id
}

/// An address as the kernel's 16-byte field holds it: IPv4 in the first 4 bytes.
fn address_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn parse_reply(
    reply: &[u8],
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<Option<SocketRow>> {
    let u16_at = |at: usize| {
        reply
            .get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        reply
            .get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let short = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag reply");
    match u16_at(4).ok_or_else(short)? {
        NLMSG_ERROR => {
            let errno = -(u32_at(16).ok_or_else(short)? as i32);
            match errno {
                0 | libc::ENOENT => Ok(None),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        }
        SOCK_DIAG_BY_FAMILY => {
            let msg = 16;
            let state = *reply.get(msg + MSG_STATE).ok_or_else(short)?;
            let id = reply
                .get(msg + MSG_ID..msg + MSG_ID + 48)
                .ok_or_else(short)?;
            let uid = u32_at(msg + MSG_UID).ok_or_else(short)?;
            let inode = u32_at(msg + MSG_INODE).ok_or_else(short)?;
            // The kernel's lookup falls back to a listener when no connection matches: only
            // a connected socket with exactly these two ends is the caller's.
            let exact = id[0..2] == local.port().to_be_bytes()
                && id[2..4] == remote.port().to_be_bytes()
                && same_ip(&id[4..20], local.ip())
                && same_ip(&id[20..36], remote.ip());
            Ok(
                (exact && state != TCP_LISTEN && inode != 0).then_some(SocketRow {
                    local,
                    remote,
                    uid,
                    inode: u64::from(inode),
                }),
            )
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sock_diag reply type {other}"),
        )),
    }
}

/// Whether a 16-byte address field holds `ip`: the IPv4 form, or the IPv4-mapped IPv6 form
/// that an IPv6 socket connected to a mapped address reports.
fn same_ip(field: &[u8], ip: IpAddr) -> bool {
    let bytes = address_bytes(ip);
    if field == bytes {
        return true;
    }
    match ip {
        IpAddr::V4(v4) => field == v4.to_ipv6_mapped().octets(),
        IpAddr::V6(_) => false,
    }
}
