//! Reading `/proc`: finding migratekit processes and the job each one runs.
//!
//! Everything here treats `/proc/<pid>/cmdline` and `/proc/<pid>/environ` as hostile: they
//! carry the vCenter password (`--vmware-password`). The only thing ever taken out of them is
//! the job id; the raw bytes are zeroed before their buffer is freed, and no error message
//! quotes them.

use std::fs;
use std::io::{self, Read};
use std::path::PathBuf;

use api::{JobId, ProcessIdentity};

/// Longest process name the kernel keeps (`TASK_COMM_LEN` - 1).
pub const COMM_MAX: usize = 15;

/// Flags of the original migratekit whose value is a secret: their value is skipped without
/// being looked at, so that a password that happens to read `--job-id` is never taken for one.
const SECRET_FLAGS: &[&str] = &["--vmware-password", "-vmware-password"];

/// Why `/proc/<pid>/stat` could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatError {
    /// The `(comm)` part is missing: this is not a stat line.
    #[error("stat line has no '(comm)' part; is this really /proc/<pid>/stat?")]
    NoComm,
    /// A field is missing or not a number.
    #[error(
        "stat field {field} is missing or not a number; the kernel's stat format is not understood"
    )]
    BadField {
        /// 1-based field number as in proc(5).
        field: usize,
    },
}

/// The fields of `/proc/<pid>/stat` the watchdog uses (numbered as in proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Field 1: the pid.
    pub pid: u32,
    /// Field 2: the name, without its parentheses (may contain spaces and parentheses).
    pub comm: String,
    /// Field 3: state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Field 20: number of live threads.
    pub num_threads: u64,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
    /// Field 52: the wait status while the task is a zombie (0 otherwise, or on old kernels).
    pub exit_code: Option<u32>,
}

impl Stat {
    /// The `(pid, start time)` identity of this process.
    pub fn identity(&self) -> ProcessIdentity {
        ProcessIdentity {
            pid: self.pid,
            start_time: self.start_time,
        }
    }

    /// True when the leader task has exited (it may still have live threads).
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }

    /// True when the whole process has exited and only its zombie waits to be reaped.
    pub fn is_dead(&self) -> bool {
        self.is_zombie() && !self.leader_exited_early()
    }

    /// True when the leader thread has exited while other threads of its group still run.
    ///
    /// The zombie leader itself stays counted until it is reaped, so a plain zombie shows one
    /// thread and a zombie leader with live threads shows more.
    pub fn leader_exited_early(&self) -> bool {
        self.is_zombie() && self.num_threads > 1
    }
}

/// Parses one `/proc/<pid>/stat` line.
///
/// The name is whatever lies between the first `(` and the *last* `)`: a process may call
/// itself `a) (b` and the fields after it must still be found.
pub fn parse_stat(line: &str) -> Result<Stat, StatError> {
    let open = line.find('(').ok_or(StatError::NoComm)?;
    let close = line.rfind(')').ok_or(StatError::NoComm)?;
    if close < open {
        return Err(StatError::NoComm);
    }
    let pid = line[..open]
        .trim()
        .parse()
        .map_err(|_| StatError::BadField { field: 1 })?;
    let comm = line[open + 1..close].to_owned();
    // Fields from 3 on, so field N is at index N - 3.
    let rest: Vec<&str> = line[close + 1..].split_ascii_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied();
    let number = |n: usize| -> Result<u64, StatError> {
        field(n)
            .and_then(|f| f.parse().ok())
            .ok_or(StatError::BadField { field: n })
    };
    let state = field(3)
        .and_then(|s| s.chars().next())
        .ok_or(StatError::BadField { field: 3 })?;
    Ok(Stat {
        pid,
        comm,
        state,
        num_threads: number(20)?,
        start_time: number(22)?,
        exit_code: field(52).and_then(|f| f.parse().ok()),
    })
}

/// Reads and parses `/proc/<pid>/stat`. `Ok(None)` when the process does not exist (any more).
pub fn read_stat(pid: u32) -> io::Result<Option<Stat>> {
    match fs::read_to_string(proc_path(pid, "stat")) {
        Ok(line) => parse_stat(&line)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// True when the name of a process (`comm`) is one of `names`, comparing as the kernel
/// does: a name longer than 15 bytes is cut to its first 15.
pub fn comm_matches(comm: &str, names: &[String]) -> bool {
    names.iter().any(|n| truncate_comm(n) == comm.as_bytes())
}

/// A name cut to the length the kernel keeps in `comm`.
pub fn truncate_comm(name: &str) -> &[u8] {
    let b = name.as_bytes();
    &b[..b.len().min(COMM_MAX)]
}

/// A running process whose name matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundProcess {
    /// The process.
    pub identity: ProcessIdentity,
    /// Its name.
    pub comm: String,
    /// The job it runs, when its command line or environment names a valid one.
    pub job_id: Option<JobId>,
}

/// Scans `/proc` for processes whose name is one of `names`.
///
/// A process that vanishes mid-scan is skipped. The start time is read again after the job id,
/// so a job id is never attributed to a new process that took over a recycled pid.
pub fn scan(names: &[String]) -> io::Result<Vec<FoundProcess>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(Some(stat)) = read_stat(pid) else {
            continue;
        };
        // A zombie is a death already happened, not a process to start watching.
        if !comm_matches(&stat.comm, names) || stat.is_dead() {
            continue;
        }
        if let Some(p) = inspect(stat.identity(), stat.comm) {
            found.push(p);
        }
    }
    found.sort_by_key(|p| p.identity.pid);
    Ok(found)
}

/// Reads the job id of `identity` and checks that the pid still belongs to it afterwards.
/// `None` when the process is gone (or a zombie) or its pid now belongs to another process.
pub fn inspect(identity: ProcessIdentity, comm: String) -> Option<FoundProcess> {
    let job_id = read_job_id(identity.pid);
    match read_stat(identity.pid) {
        Ok(Some(s)) if s.start_time == identity.start_time && !s.is_dead() => Some(FoundProcess {
            identity,
            comm,
            job_id,
        }),
        _ => None,
    }
}

/// The job id of a process: `--job-id` on its command line, else `MIGRATEKIT_JOB_ID` (or the
/// progress client's `MIGRATEKIT_PROGRESS_JOB_ID`) in its environment.
///
/// A leader thread that has exited has no memory map left, so its `cmdline` and `environ`
/// read empty; the other threads' copies under `task/` are tried then.
pub fn read_job_id(pid: u32) -> Option<JobId> {
    let mut dirs = vec![PathBuf::from(format!("/proc/{pid}"))];
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        dirs.extend(tasks.flatten().map(|t| t.path()).take(8));
    }
    for dir in dirs {
        let cmdline = SecretBytes::read(dir.join("cmdline"));
        if let Some(id) = job_id_from_cmdline(cmdline.bytes()) {
            return Some(id);
        }
        let environ = SecretBytes::read(dir.join("environ"));
        if let Some(id) = job_id_from_environ(environ.bytes()) {
            return Some(id);
        }
        if !cmdline.bytes().is_empty() {
            // The process has a command line and it names no job: other threads share it.
            return None;
        }
    }
    None
}

/// Extracts the job id from a NUL-separated command line; nothing else is copied out.
pub fn job_id_from_cmdline(cmdline: &[u8]) -> Option<JobId> {
    let mut args = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty());
    while let Some(arg) = args.next() {
        if SECRET_FLAGS.iter().any(|f| arg == f.as_bytes()) {
            args.next();
            continue;
        }
        for flag in ["--job-id", "-job-id"] {
            if arg == flag.as_bytes() {
                return args.next().and_then(valid_job_id);
            }
            if let Some(v) = arg
                .strip_prefix(flag.as_bytes())
                .and_then(|r| r.strip_prefix(b"="))
            {
                return valid_job_id(v);
            }
        }
    }
    None
}

/// Extracts the job id from a NUL-separated environment block; nothing else is copied out.
pub fn job_id_from_environ(environ: &[u8]) -> Option<JobId> {
    ["MIGRATEKIT_JOB_ID=", "MIGRATEKIT_PROGRESS_JOB_ID="]
        .iter()
        .find_map(|key| {
            environ
                .split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(key.as_bytes()))
        })
        .and_then(valid_job_id)
}

/// The job id in `raw`, checked by [`JobId::from_bytes`] before a byte is copied: anything
/// that is not a job id is refused rather than copied, so a mangled command line can never
/// leak a neighbouring secret through it.
fn valid_job_id(raw: &[u8]) -> Option<JobId> {
    JobId::from_bytes(raw).ok()
}

/// Bytes read from `cmdline` or `environ`, zeroed when dropped so no copy of a secret is left
/// in freed memory. A read error yields no bytes: its message could only say "gone".
struct SecretBytes(Vec<u8>);

impl SecretBytes {
    fn read(path: PathBuf) -> Self {
        let mut buf = Vec::new();
        if let Ok(mut f) = fs::File::open(path) {
            // Reading into a buffer that may grow reallocates and leaves old copies behind,
            // so read with a generous fixed capacity first.
            buf.reserve(64 * 1024);
            let _ = f.read_to_end(&mut buf);
        }
        Self(buf)
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // Volatile so the compiler cannot drop the wipe as a dead store.
            // SAFETY: `b` is a valid, exclusive reference into the buffer.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.0.len())
    }
}

fn proc_path(pid: u32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

/// True for the errors that mean "this process is gone".
pub fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
mod tests;
