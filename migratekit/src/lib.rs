//! A stand-in for migratekit in tests.
//!
//! Like the Go original it runs several OS threads, takes `migrate --job-id ID` (or
//! `MIGRATEKIT_JOB_ID`) and accepts the original's other flags, `--vmware-password` included,
//! without keeping them. The `--standin-*` flags say how it ends: exit code, SIGSEGV, OOM, and
//! thread tricks (leader exits first, a worker exits early) that must not look like a death,
//! and ends in odd thread orders: `--standin-dissolve` (the leader exits first, the others
//! later one by one, the last ending the process) and `--standin-end-from-worker` (a worker
//! thread calls `exit_group`).
//!
//! Once exec'd with all its threads up it prints one line on stdout,
//! `migratekit-standin ready pid=<pid> job_id=<id> threads=<n>`; tests wait for it before
//! killing. It then ends after `--standin-run-for` seconds, or when any line arrives on stdin
//! (end of input does nothing), or when killed; `--standin-linger-until PATH` holds the end
//! (after the `completed` report) until PATH exists. An end of its own is announced by one
//! last line, [`ENDING`], with the wall-clock time.
//!
//! With `MIGRATEKIT_PROGRESS_JOB_ID` set, it reports progress like the real client (see
//! [`progress`]): a simulated copy of `--standin-total-bytes` at `--standin-rate` bytes/s,
//! one update every `--standin-progress-interval-ms`, and, when it ends with exit code 0,
//! 100 % `completed` just before it exits.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

mod args;
pub mod progress;

pub use args::{ArgsError, Ending, Options};

/// Environment variable that overrides the progress base URL (`--standin-progress-url` wins).
pub const PROGRESS_URL_ENV: &str = "MIGRATEKIT_STANDIN_PROGRESS_URL";

/// The ready line's first word, for tests to look for.
pub const READY: &str = "migratekit-standin ready";

/// The first words of the line printed just before the process ends on its own:
/// `migratekit-standin ending pid=<pid> job_id=<id> unix_us=<wall clock, µs>
/// completed=<accepted|refused|none>` (`completed`: how its 100 % report was answered).
pub const ENDING: &str = "migratekit-standin ending";

/// Set at the end of a `--standin-dissolve` run: every thread exits on its own.
static DISSOLVE: AtomicBool = AtomicBool::new(false);

/// The end a worker carries out (`--standin-end-from-worker`).
static WORKER_END: Mutex<Option<Ending>> = Mutex::new(None);

/// Runs the stand-in. Returns only on an error before the threads are up; otherwise it ends
/// the process as `options` say.
pub fn run(options: &Options) -> anyhow::Result<()> {
    let reporter = reporter(options)?.map(Arc::new);
    let barrier = Arc::new(Barrier::new(options.threads + 1));
    for i in 0..options.threads {
        let barrier = Arc::clone(&barrier);
        let exits_early = options.thread_exit && i == 0;
        // The last worker never exits early: it reports progress.
        let reports = (i + 1 == options.threads)
            .then(|| reporter.clone())
            .flatten()
            .map(|r| (r, options.progress_interval));
        thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || worker(i, &barrier, exits_early, reports.as_ref()))?;
    }
    barrier.wait();

    let (trigger_tx, trigger) = mpsc::channel::<()>();
    if options.dissolve {
        // No thread blocked in a read of stdin: each thread must be able to exit on its own.
        std::mem::forget(trigger_tx);
    } else {
        thread::Builder::new()
            .name("stdin".into())
            .spawn(move || watch_stdin(&trigger_tx))?;
    }

    let job = options.job_id.as_deref().unwrap_or("-");
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{READY} pid={} job_id={job} threads={}",
        std::process::id(),
        live_threads()
    )?;
    out.flush()?;
    drop(out);

    if options.leader_exit {
        // Another thread takes over the ending; the leader then exits on its own while the
        // rest of the process runs on.
        let options = options.clone();
        thread::Builder::new()
            .name("conductor".into())
            .spawn(move || conduct(&options, &trigger, reporter.as_deref()))?;
        leader_exit();
    }
    conduct(options, &trigger, reporter.as_deref())
}

/// The progress reporter, when `MIGRATEKIT_PROGRESS_JOB_ID` names a job (as for the real
/// client, nothing is reported without it).
fn reporter(options: &Options) -> anyhow::Result<Option<progress::Reporter>> {
    let Some(job) = std::env::var(progress::JOB_ENV)
        .ok()
        .filter(|j| !j.is_empty())
    else {
        return Ok(None);
    };
    let base = options
        .progress_url
        .clone()
        .or_else(|| std::env::var(PROGRESS_URL_ENV).ok())
        .unwrap_or_else(|| progress::DEFAULT_URL.to_owned());
    let target = progress::Target::new(&base, &job)?;
    Ok(Some(progress::Reporter::new(
        target,
        options.total_bytes,
        options.rate,
    )))
}

/// A worker: where the original copies disk blocks. One of them reports progress.
fn worker(
    index: usize,
    barrier: &Barrier,
    exits_early: bool,
    reports: Option<&(Arc<progress::Reporter>, Duration)>,
) {
    barrier.wait();
    if exits_early {
        thread::sleep(Duration::from_millis(100));
        return;
    }
    let mut next_report = std::time::Instant::now();
    loop {
        if let Some((reporter, every)) = reports
            && std::time::Instant::now() >= next_report
        {
            reporter.report();
            next_report = std::time::Instant::now() + *every;
        }
        if DISSOLVE.load(Ordering::SeqCst) {
            // In turn, by index: the workers leave one after another, in no set relation
            // to the thread that started the dissolving.
            thread::sleep(Duration::from_millis(40 * (index as u64 % 5)));
            exit_thread();
        }
        if index == 0 {
            let end = WORKER_END.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(ending) = end {
                end_group(ending);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Ends the calling thread only (`exit(2)`, not `exit_group`), exit code 0.
fn exit_thread() -> ! {
    // SAFETY: SYS_exit ends this thread only; no Rust frame of it runs again.
    unsafe {
        libc::syscall(libc::SYS_exit, 0);
    }
    std::process::abort()
}

/// Ends the whole thread group from this thread: `exit_group(2)` itself for an exit code.
fn end_group(ending: Ending) -> ! {
    match ending {
        // SAFETY: exit_group ends every thread of the process with this code.
        Ending::Exit(code) => unsafe {
            libc::syscall(libc::SYS_exit_group, code);
            std::process::abort()
        },
        other => end(other),
    }
}

/// Forwards every line that arrives on stdin as a trigger; end of input is not a trigger.
fn watch_stdin(trigger: &mpsc::Sender<()>) {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        if line.is_err() || trigger.send(()).is_err() {
            break;
        }
    }
    // Keep the channel open so the conductor's wait is not cut short by end of input.
    loop {
        thread::park();
    }
}

/// Waits for the time to be up (or a trigger) and ends the process; a successful end
/// reports 100 % `completed` first, as the real client does. With `--standin-linger-until`
/// it then waits for that file. Its last line, [`ENDING`], says when it ends (wall clock)
/// and whether its `completed` report was taken, so a test can set what really happened
/// against the watchdog's downtimes instead of predicting it.
fn conduct(
    options: &Options,
    trigger: &mpsc::Receiver<()>,
    reporter: Option<&progress::Reporter>,
) -> ! {
    match options.run_for {
        Some(d) => {
            let _ = trigger.recv_timeout(d);
        }
        None => {
            let _ = trigger.recv();
        }
    }
    let completed = match (options.ending, reporter) {
        (Ending::Exit(0), Some(reporter)) => Some(reporter.complete()),
        _ => None,
    };
    if let Some(path) = &options.linger_until {
        while !path.exists() {
            thread::sleep(Duration::from_millis(20));
        }
    }
    let completed = match completed {
        Some(true) => "accepted",
        Some(false) => "refused",
        None => "none",
    };
    let unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{ENDING} pid={} job_id={} unix_us={unix_us} completed={completed}",
        std::process::id(),
        options.job_id.as_deref().unwrap_or("-"),
    );
    let _ = out.flush();
    drop(out);
    if options.dissolve {
        DISSOLVE.store(true, Ordering::SeqCst);
        exit_thread();
    }
    if options.end_from_worker {
        *WORKER_END.lock().unwrap_or_else(|e| e.into_inner()) = Some(options.ending);
        loop {
            thread::park();
        }
    }
    end(options.ending)
}

/// Ends the whole process the way `ending` says, from any thread.
fn end(ending: Ending) -> ! {
    match ending {
        Ending::Exit(code) => std::process::exit(code),
        Ending::Segv => segv(),
        Ending::Oom { cap_mib } => oom(cap_mib),
    }
}

fn segv() -> ! {
    // SAFETY: plain libc calls. The Rust runtime's own SIGSEGV handler (for stack overflow
    // reports) is replaced by the default action first, and core dumps are allowed so the
    // kernel sets the core-dumped flag, as it would for the real program on a VMA.
    unsafe {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &unlimited);
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        libc::raise(libc::SIGSEGV);
    }
    // Not reached: the default action of SIGSEGV ends the process.
    std::process::abort()
}

fn oom(cap_mib: u64) -> ! {
    const CHUNK: usize = 16 << 20;
    let mut held: Vec<Vec<u8>> = Vec::new();
    for _ in 0..cap_mib.div_ceil(16) {
        // Touch every page so the memory is really charged, not just reserved.
        let mut chunk = vec![0u8; CHUNK];
        for page in chunk.chunks_mut(4096) {
            page[0] = 1;
        }
        held.push(chunk);
    }
    eprintln!(
        "migratekit-standin: not OOM-killed after {cap_mib} MiB; run it in a cgroup with a smaller memory.max"
    );
    std::process::exit(1)
}

/// The leader thread exits alone, as `pthread_exit` in the leader would: the raw `exit`
/// system call ends only the calling thread and unwinds nothing.
fn leader_exit() -> ! {
    // SAFETY: SYS_exit ends this thread only; no Rust frame of it runs again.
    unsafe {
        libc::syscall(libc::SYS_exit, 0);
    }
    std::process::abort()
}

/// Number of live threads of this process, from `/proc/self/stat` (field 20).
fn live_threads() -> usize {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_ascii_whitespace().nth(17)?.parse().ok()
        })
        .unwrap_or(0)
}
