//! What the tests of `oma`, `vma-watchdog` and the system tests share: ports that stay free,
//! and daemons whose log output nobody reads.

pub mod failio;
pub mod metrics;
pub mod notify;
pub mod openapi_copy;
pub mod pki;

use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use rand::Rng;

/// A TCP port free right now on `ip`, for a server that comes up (or back) later on a known
/// address. It is taken below the kernel's ephemeral range: a port the kernel handed out for
/// `:0` and got back would soon go to another test's listener or outgoing connection, while
/// the gap until the server binds it can last seconds (a daemon's restart).
pub fn free_port(ip: IpAddr) -> io::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = ephemeral_low.saturating_sub(12_000).max(1_024);
    let high = ephemeral_low.max(low + 1);
    let mut last_error = io::Error::other("no port tried");
    for _ in 0..200 {
        let port = rand::thread_rng().gen_range(low..high);
        match std::net::TcpListener::bind((ip, port)) {
            Ok(_) => return Ok(port),
            Err(e) => last_error = e,
        }
    }
    Err(io::Error::new(
        last_error.kind(),
        format!("no free port on {ip} between {low} and {high}: {last_error}"),
    ))
}

/// A pipe of one page (the smallest the kernel makes) filled to the brim, for a daemon's log:
/// its every write blocks until the test reads. Returns both ends and how many bytes of filler
/// come before the daemon's first line.
pub fn stuffed_pipe() -> io::Result<(PipeReader, PipeWriter, usize)> {
    let (reader, mut writer) = io::pipe()?;
    // SAFETY: fcntl on a descriptor owned here.
    if unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Filled without blocking, then made blocking again before a daemon inherits it, so that
    // its writes wait instead of failing.
    set_nonblocking(&writer, true)?;
    let mut stuffed = 0;
    loop {
        match writer.write(&[b'#'; 512]) {
            Ok(n) => stuffed += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    set_nonblocking(&writer, false)?;
    Ok((reader, writer, stuffed))
}

fn set_nonblocking(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor owned by the caller, with flags read from it.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A child process killed (and reaped) when dropped, so that a failing test leaves no daemon
/// behind.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to `limit` for `child` to exit; `None` if it still runs.
pub fn wait_within(child: &mut Child, limit: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything `reader` gives until its end, read on a thread of its own; `None` if the end
/// has not come within `limit` (a writer still holds the pipe open).
pub fn read_to_end_within(mut reader: PipeReader, limit: Duration) -> Option<Vec<u8>> {
    let (done, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes);
        let _ = done.send(bytes);
    });
    read.recv_timeout(limit).ok()
}

/// The uid and gid of the system user `name`, created (no home, no login shell) when it does
/// not exist: attack tests run their processes as another real user. Needs root to create.
/// Two tests may create the same user at once, so it looks again whatever `useradd` said.
pub fn ensure_user(name: &str) -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Option<u32> {
        let out = std::process::Command::new("id")
            .args([flag, name])
            .output()
            .ok()?;
        out.status.success().then_some(())?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id("-u").is_none() {
        let out = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(name)
            .output()
            .map_err(|e| format!("running useradd: {e}"))?;
        if id("-u").is_none() {
            return Err(format!(
                "cannot create the user {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok((id("-u").ok_or("no uid")?, id("-g").ok_or("no gid")?))
}
