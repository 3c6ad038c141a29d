//! Test helper for `tests/ebpf_detector.rs`: a small multi-threaded process that ends in the
//! way it is told. Not part of the daemon. The tests run it under other names (symlinks) so
//! that each test matches only its own processes.
//!
//! Usage: `ebpf-test-child <threads> <mode> [arg]`, modes:
//! - `hold`: keep running until killed;
//! - `exit CODE`: call `exit(CODE)` (exit_group) from the main thread;
//! - `segv`: raise SIGSEGV with RLIMIT_CORE unlimited, so the kernel dumps core;
//! - `thread-exit`: one worker thread returns, then print `thread-exited` and hold;
//! - `leader-exit CODE|none`: the leader thread exits alone (raw `SYS_exit`, what
//!   `pthread_exit` does in the kernel); the workers wait for a line on stdin, then either
//!   call `exit(CODE)` or, with `none`, all return so the last thread ends the process.
//!
//! - `oom`: wait for a line on stdin, then allocate and touch memory until killed (run it in
//!   a memory cgroup with a small limit to get an OOM kill).
//!
//! Each mode prints `ready` on stdout once all its threads run.

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn hold_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn spawn_holders(n: usize) {
    for _ in 0..n {
        std::thread::spawn(|| hold_forever());
    }
}

/// Dies of SIGSEGV with a core dump allowed, once `threads` threads hold.
fn segv(threads: usize) -> ! {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &unlimited) };
    spawn_holders(threads);
    say("ready");
    // Rust's runtime installs a SIGSEGV handler (stack-overflow detection) that would
    // swallow a raised signal; restore the default action, which dumps core.
    // SAFETY: resetting a handler to SIG_DFL and raising a signal on ourselves.
    unsafe {
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        libc::raise(libc::SIGSEGV);
    }
    unreachable!("SIGSEGV did not kill the process");
}

/// The leader thread exits on its own while `threads` workers run on; the first line on
/// stdin then ends the process with exit code `code`, or, when `code` is not a number, lets
/// the workers return one by one.
fn leader_exit(threads: usize, code: String) -> ! {
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    for _ in 0..threads {
        let rx = rx.clone();
        // Workers park until the stdin reader says go, then return.
        std::thread::spawn(move || {
            let _ = rx.lock().map(|r| r.recv());
        });
    }
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        if let Ok(code) = code.parse::<i32>() {
            std::process::exit(code);
        }
        drop(tx);
    });
    say("ready");
    // SAFETY: SYS_exit ends only the calling thread, exactly as pthread_exit does in
    // the kernel, without unwinding Rust frames; the other threads keep running.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("SYS_exit returned");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let mode = args.get(2).map(String::as_str).unwrap_or("hold");
    let arg = args.get(3).cloned().unwrap_or_default();
    match mode {
        "hold" => {
            spawn_holders(threads);
            say("ready");
            hold_forever();
        }
        "exit" => {
            spawn_holders(threads);
            say("ready");
            std::process::exit(arg.parse().unwrap_or(1));
        }
        "segv" => segv(threads),
        "thread-exit" => {
            spawn_holders(threads);
            let short = std::thread::spawn(|| ());
            let _ = short.join();
            say("ready");
            say("thread-exited");
            hold_forever();
        }
        "leader-exit" => leader_exit(threads, arg),
        "oom" => {
            spawn_holders(threads);
            say("ready");
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            let mut hog: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touch every page so the memory is really charged to the cgroup.
                hog.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hog);
            }
        }
        other => {
            eprintln!("unknown mode {other}: see the comment at the top of ebpf-test-child.rs");
            std::process::exit(2);
        }
    }
}
