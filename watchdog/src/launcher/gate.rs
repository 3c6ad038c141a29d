//! The gate that a transient systemd service runs instead of migratekit, and the watchdog's
//! side of it.
//!
//! When systemd runs, migratekit gets a transient service of its own, forked by systemd (PID 1)
//! and so inheriting nothing of the watchdog's sandbox. The unit's command line is the gate
//! (`migratekit-gate <socket name>`), never migratekit's: migratekit's argument vector carries
//! the vCenter password, and a unit's `ExecStart` is printed by `systemctl show` to any user.
//!
//! The gate connects to an abstract unix socket the watchdog listens on for this one launch
//! (its name has 128 random bits, see [`socket_name`]). The watchdog reads the peer's pid with
//! `SO_PEERCRED` and accepts it only when that process sits in the launch's own unit (its
//! cgroup, see [`in_unit`]): nothing else can be in a unit that systemd has just created for
//! the gate. It registers the pid and start time, and only then sends the argument vector and
//! environment ([`encode`]); the gate execs migratekit in the same pid. A gate that receives
//! nothing (registration refused, the watchdog gone) exits without running migratekit.

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// How long a gate waits for its go-ahead before giving up without running migratekit.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the gate execs: the program (also `argv[0]`), its arguments and its whole environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateCommand {
    /// The program, an absolute path.
    pub program: OsString,
    /// The arguments after the program.
    pub args: Vec<OsString>,
    /// The environment, `(name, value)`.
    pub env: Vec<(OsString, OsString)>,
}

/// Why a go-ahead could not be decoded, or the gate could not run its command.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The go-ahead is malformed (no program, an item without its terminator, a NUL inside).
    #[error("the watchdog's go-ahead is malformed: {0}")]
    Malformed(&'static str),
    /// Nothing came: the watchdog refused the launch or went away.
    #[error(
        "the watchdog sent no go-ahead (the launch was refused or the watchdog stopped); migratekit was not run"
    )]
    NoGoAhead,
    /// The socket could not be reached or read.
    #[error("the watchdog's launch socket failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `command` as NUL-terminated items: the program, the number of arguments in
/// decimal, each argument, then each `NAME=value` of the environment.
pub fn encode(command: &GateCommand) -> Vec<u8> {
    let mut out = Vec::new();
    let mut item = |bytes: &[u8]| {
        out.extend_from_slice(bytes);
        out.push(0);
    };
    item(command.program.as_bytes());
    item(command.args.len().to_string().as_bytes());
    for arg in &command.args {
        item(arg.as_bytes());
    }
    for (name, value) in &command.env {
        item(&[name.as_bytes(), b"=", value.as_bytes()].concat());
    }
    out
}

/// The inverse of [`encode`]. An argument can be empty; the program cannot.
pub fn decode(bytes: &[u8]) -> Result<GateCommand, GateError> {
    let body = bytes
        .strip_suffix(&[0])
        .ok_or(GateError::Malformed("the last item has no terminator"))?;
    let mut items = body.split(|b| *b == 0);
    let program = items
        .next()
        .filter(|p| !p.is_empty())
        .ok_or(GateError::Malformed("no program"))?;
    let argc: usize = items
        .next()
        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
        .ok_or(GateError::Malformed("no argument count"))?;
    let args: Vec<OsString> = items
        .by_ref()
        .take(argc)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    if args.len() != argc {
        return Err(GateError::Malformed("fewer arguments than counted"));
    }
    let env = items
        .map(|item| {
            let at = item
                .iter()
                .position(|b| *b == b'=')
                .filter(|at| *at > 0)
                .ok_or(GateError::Malformed("an environment item without a name"))?;
            Ok((
                OsString::from_vec(item[..at].to_vec()),
                OsString::from_vec(item[at + 1..].to_vec()),
            ))
        })
        .collect::<Result<_, GateError>>()?;
    Ok(GateCommand {
        program: OsString::from_vec(program.to_vec()),
        args,
        env,
    })
}

/// A fresh abstract socket name for one launch: `vma-watchdog/launch/<unit>/<32 hex>`.
pub fn socket_name(unit: &str) -> String {
    format!(
        "vma-watchdog/launch/{unit}/{}",
        uuid::Uuid::new_v4().simple()
    )
}

/// True when a `/proc/<pid>/cgroup` text puts the process in `unit`'s own cgroup
/// (`0::/system.slice/<unit>.service`, or the `name=systemd` line of a hybrid hierarchy).
pub fn in_unit(cgroup: &str, unit: &str) -> bool {
    let leaf = format!("/{unit}.service");
    cgroup.lines().any(|line| {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        (controllers.is_empty() || controllers == "name=systemd") && path.ends_with(&leaf)
    })
}

/// The watchdog's end of one launch: an abstract socket that only the launch's gate may use.
#[derive(Debug)]
pub struct GateListener {
    listener: UnixListener,
    name: String,
}

impl GateListener {
    /// Listens on the abstract socket `name` (see [`socket_name`]).
    pub fn bind(name: String) -> std::io::Result<Self> {
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, name })
    }

    /// The socket's name, the gate's one argument.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until `timeout` for a connection whose peer `is_gate` accepts; any other peer is
    /// logged and dropped (it learns nothing). Returns the connection and the peer's pid.
    /// `gave_up` is polled too: once it returns an error (the unit could not be started), that
    /// error ends the wait.
    pub fn accept(
        &self,
        timeout: Duration,
        is_gate: impl Fn(u32) -> bool,
        mut gave_up: impl FnMut() -> std::io::Result<()>,
    ) -> std::io::Result<(UnixStream, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let pid = peer_pid(&stream)?;
                    if is_gate(pid) {
                        stream.set_nonblocking(false)?;
                        return Ok((stream, pid));
                    }
                    tracing::warn!(event = "launch_peer_refused", pid, socket = %self.name,
                        "a process outside the launch's unit connected to its socket; refused");
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            gave_up()?;
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the gate of the new unit never connected",
                ));
            }
            let mut fds = libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a short timeout so that `gave_up` is polled.
            unsafe { libc::poll(&mut fds, 1, 50) };
        }
    }
}

/// Sends the go-ahead on an accepted gate connection and closes it.
pub fn release(mut stream: UnixStream, command: &GateCommand) -> std::io::Result<()> {
    stream.write_all(&encode(command))?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// The pid of the process at the other end (`SO_PEERCRED`, taken when it connected).
fn peer_pid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt fills a ucred of the size given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

/// The gate's side: connects to `name`, waits for the go-ahead and returns the command to
/// exec. Called by the `migratekit-gate` binary, which then calls [`exec`].
pub fn receive(name: &OsStr, timeout: Duration) -> Result<GateCommand, GateError> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let mut stream = UnixStream::connect_addr(&addr)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    if bytes.is_empty() {
        return Err(GateError::NoGoAhead);
    }
    decode(&bytes)
}

/// Replaces this process with `command` (same pid); returns only on failure.
pub fn exec(command: &GateCommand) -> GateError {
    let cstr = |s: &[u8]| CString::new(s).map_err(|_| GateError::Malformed("a NUL in an item"));
    let build = || -> Result<(Vec<CString>, Vec<CString>), GateError> {
        let mut argv = vec![cstr(command.program.as_bytes())?];
        for arg in &command.args {
            argv.push(cstr(arg.as_bytes())?);
        }
        let env = command
            .env
            .iter()
            .map(|(n, v)| cstr(&[n.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<Result<_, _>>()?;
        Ok((argv, env))
    };
    let (argv, env) = match build() {
        Ok(built) => built,
        Err(e) => return e,
    };
    let ptrs = |v: &[CString]| {
        let mut p: Vec<*const libc::c_char> = v.iter().map(|s| s.as_ptr()).collect();
        p.push(std::ptr::null());
        p
    };
    let (argv_p, env_p) = (ptrs(&argv), ptrs(&env));
    // SAFETY: NUL-terminated strings and NULL-terminated arrays that outlive the call.
    unsafe { libc::execve(argv[0].as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    GateError::Io(std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> GateCommand {
        GateCommand {
            program: "/usr/bin/migratekit".into(),
            args: vec!["migrate".into(), "".into(), "--pass=a b=c".into()],
            env: vec![("A".into(), "1=2".into()), ("EMPTY".into(), "".into())],
        }
    }

    #[test]
    fn a_go_ahead_decodes_to_what_was_encoded() {
        let c = command();
        assert_eq!(decode(&encode(&c)).unwrap(), c);
        let bare = GateCommand {
            args: vec![],
            env: vec![],
            ..c
        };
        assert_eq!(decode(&encode(&bare)).unwrap(), bare);
    }

    #[test]
    fn a_truncated_or_malformed_go_ahead_is_refused() {
        let c = command();
        let bytes = encode(&c);
        let env_start = encode(&GateCommand {
            env: vec![],
            ..c.clone()
        })
        .len();
        for cut in 1..bytes.len() {
            // A prefix that stops inside an item or before the last argument is refused; one
            // that stops between two environment items is a shorter environment.
            let decoded = decode(&bytes[..cut]);
            if bytes[cut - 1] != 0 || cut < env_start {
                assert!(decoded.is_err(), "prefix of {cut} bytes accepted");
            } else {
                assert_eq!(decoded.unwrap().args, c.args);
            }
        }
        assert!(decode(b"\0\0").is_err(), "no program");
        assert!(decode(b"/p\0x\0").is_err(), "no argument count");
        assert!(
            decode(b"/p\x000\0=v\0").is_err(),
            "an environment item without a name"
        );
    }

    #[test]
    fn only_the_units_own_cgroup_is_the_unit() {
        let unit = "migratekit-job-1-abcd1234";
        assert!(in_unit(
            "0::/system.slice/migratekit-job-1-abcd1234.service\n",
            unit
        ));
        assert!(in_unit(
            "12:memory:/\n1:name=systemd:/system.slice/migratekit-job-1-abcd1234.service\n0::/\n",
            unit
        ));
        assert!(!in_unit("0::/system.slice/vma-watchdog.service\n", unit));
        assert!(!in_unit(
            "0::/system.slice/migratekit-job-1-abcd1234.service/x.service-not\n",
            unit
        ));
        assert!(!in_unit(
            "0::/system.slice/xmigratekit-job-1-abcd1234.service\n",
            unit
        ));
        // A v1 controller's path proves nothing: anyone may create a directory there.
        assert!(!in_unit(
            "4:cpu:/system.slice/migratekit-job-1-abcd1234.service\n0::/\n",
            unit
        ));
    }
}
