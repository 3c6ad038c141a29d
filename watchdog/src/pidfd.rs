//! The pidfd system calls, in one leaf module: the procfs detector waits on pidfds and reads
//! exit statuses through them, and `signal` signals through them, so that neither ever acts
//! on a pid that another process has taken since.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use api::ExitStatus;

/// `pidfd_open(pid, 0)`.
pub fn open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_send_signal(fd, signal, NULL, 0)`: signals exactly the process the pidfd holds,
/// whichever process has its pid by now.
pub fn send_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a plain syscall on a pidfd we own; no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `waitid(P_PIDFD, WEXITED | WNOHANG | WNOWAIT)`: the status of our own child without reaping
/// it. `None` when the process is not our child (or was already reaped).
pub fn wait_nowait(fd: &OwnedFd) -> Option<ExitStatus> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid value and waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: the fd is a live pidfd and `info` is a valid, writable siginfo_t.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            flags,
        )
    };
    // SAFETY: after a successful waitid on an exited child, the sigchld fields are set.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if rc != 0 || pid == 0 {
        return None;
    }
    Some(match info.si_code {
        libc::CLD_EXITED => ExitStatus {
            code: Some(status),
            ..ExitStatus::default()
        },
        libc::CLD_KILLED | libc::CLD_DUMPED => ExitStatus {
            signal: Some(status),
            core_dumped: info.si_code == libc::CLD_DUMPED,
            ..ExitStatus::default()
        },
        _ => ExitStatus::default(),
    })
}

/// `ioctl(PIDFD_GET_INFO)` asking for `PIDFD_INFO_EXIT`: the wait status of a process that has
/// been reaped, which the kernel keeps for as long as a pidfd to it is open (Linux 6.15 and
/// later). `None` before the reap, and on older kernels, which do not know the ioctl (ENOTTY)
/// or the flag (the mask comes back without it).
pub fn exit_info(fd: &OwnedFd) -> Option<u32> {
    // SAFETY: pidfd_info is plain data; all-zero bytes are a valid value.
    let mut info: libc::pidfd_info = unsafe { std::mem::zeroed() };
    info.mask = u64::from(libc::PIDFD_INFO_EXIT);
    // SAFETY: the fd is a live pidfd and `info` a writable pidfd_info of the size that the
    // request number encodes.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::PIDFD_GET_INFO, &mut info) };
    if rc != 0 || info.mask & u64::from(libc::PIDFD_INFO_EXIT) == 0 {
        return None;
    }
    // The kernel's `exit_code`, in wait(2)'s layout; the cast keeps its bits.
    Some(info.exit_code as u32)
}
