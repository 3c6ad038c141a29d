//! The soak's fault schedule: a list of actions made from the seed alone, before anything
//! runs, so that the same seed gives the same schedule on any machine.
//!
//! Outages are windows: a fault opens one (the link cut, the watchdog down, PostgreSQL down,
//! a slow link) and a later fault of the schedule closes it, a few faults on, so that other
//! faults (deaths, starts, cancels, restarts of the other daemon) land inside it. Which job a
//! kill or a cancel hits is drawn as a number too; the runner maps it onto the jobs it holds
//! at that moment (the n-th job still running until killed, in start order), which the
//! schedule also decides, so the mapping depends on the seed only.

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a job started by the soak ends, decided when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Runs until a `Kill` or a `Cancel` of the schedule (or the end of the soak) hits it.
    UntilKilled,
    /// Exits with this code after `after_ms`.
    Exits { code: u8, after_ms: u32 },
    /// Reports 100 % and exits 0 after `after_ms`.
    Completes { after_ms: u32 },
    /// Dies of SIGSEGV (a core dump) after `after_ms`.
    Segv { after_ms: u32 },
    /// Allocates until its memory cgroup's OOM killer kills it, after `after_ms`.
    Oom { after_ms: u32 },
    /// Its leader thread exits at once (as `pthread_exit` in `main`); after `after_ms` it
    /// reports 100 % and every other thread exits on its own, the last ending the process
    /// (exit status 0, the leader's).
    Dissolves { after_ms: u32 },
    /// A worker thread calls `exit_group(code)` after `after_ms`.
    WorkerExitGroup { code: u8, after_ms: u32 },
}

/// Whose files an [`Action::IoErrors`] window fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoTarget {
    /// The watchdog's state directory (outbox, registry, progress store).
    Watchdog,
    /// The OMA's SQLite database (its file, journal and WAL). SQLite backend only.
    Oma,
}

/// One action of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a job with this fate.
    Start(Fate),
    /// Send `signal` to the `pick`-th running job (modulo their number); with `reuse`, a new
    /// process is then forced onto the dead process's pid (`ns_last_pid`).
    Kill { pick: u32, signal: i32, reuse: bool },
    /// Cancel the `pick`-th running job through the OMA.
    Cancel { pick: u32 },
    /// Restart the OMA: SIGKILL (`crash`) or SIGTERM, then start it again.
    RestartOma { crash: bool },
    /// Stop the watchdog: SIGKILL (`crash`) or SIGTERM. [`Action::WatchdogUp`] follows.
    WatchdogDown { crash: bool },
    /// Start the watchdog again.
    WatchdogUp,
    /// Cut the veth link between the OMA's and the VMA's namespaces.
    Cut,
    /// Restore the link.
    Restore,
    /// `tc netem` on the VMA's end of the link: delay (ms, with jitter) and loss (%).
    Slow { delay_ms: u16, loss_pct: u8 },
    /// Remove the netem qdisc.
    Fast,
    /// Stop PostgreSQL (fast shutdown). Only on the postgres backend.
    PostgresDown,
    /// Start PostgreSQL again.
    PostgresUp,
    /// Fill the small file system under the watchdog's state directory.
    DiskFull,
    /// Free it again.
    DiskFreed,
    /// `write`, `pwrite`, `fsync` and `fdatasync` on `target`'s files fail with `errno`
    /// (through the soak's `LD_PRELOAD` shim).
    IoErrors { target: IoTarget, errno: i32 },
    /// The injected errors stop.
    IoHealed,
}

/// One fault: its index, the pause before it, and what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Position in the schedule, from 0.
    pub index: usize,
    /// Pause before the action, in milliseconds.
    pub pause_ms: u32,
    /// The action.
    pub action: Action,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fault #{} (after {} ms): {:?}",
            self.index, self.pause_ms, self.action
        )
    }
}

/// The signals a `Kill` draws from: those whose default action ends the stand-in. Not
/// SIGSEGV or SIGBUS: the Rust runtime's stack-overflow handler takes a first one sent by
/// `kill(2)` and returns (seed 2 found it: the process lived on), and not SIGPIPE, which it
/// ignores; a real SIGSEGV is the `Segv` fate's own crash.
pub const SIGNALS: [i32; 9] = [
    libc::SIGKILL,
    libc::SIGTERM,
    libc::SIGABRT,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];

/// The outage windows the schedule opens and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Watchdog,
    Link,
    Netem,
    Postgres,
    Disk,
    Io,
}

impl Window {
    fn close(self) -> Action {
        match self {
            Window::Watchdog => Action::WatchdogUp,
            Window::Link => Action::Restore,
            Window::Netem => Action::Fast,
            Window::Postgres => Action::PostgresUp,
            Window::Disk => Action::DiskFreed,
            Window::Io => Action::IoHealed,
        }
    }
}

/// The schedule's own model of what it has done: which windows are open (and the index
/// that closes each), and how many jobs run until killed.
struct Model {
    open: Vec<(Window, usize)>,
    running: u32,
    postgres: bool,
}

/// `faults` faults from `seed`; `postgres` allows PostgreSQL restarts. Every window the
/// schedule opens is closed again by its last fault.
pub fn make(seed: u64, faults: usize, postgres: bool) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model {
        open: Vec::new(),
        running: 0,
        postgres,
    };
    let mut out = Vec::with_capacity(faults);
    for index in 0..faults {
        let remaining = faults - index;
        let action = if let Some(pos) = model
            .open
            .iter()
            .position(|&(_, due)| due <= index || remaining <= model.open.len())
        {
            model.open.remove(pos).0.close()
        } else {
            draw(&mut rng, &mut model, index, remaining)
        };
        out.push(Fault {
            index,
            pause_ms: rng.gen_range(20..400),
            action,
        });
    }
    out
}

/// Draws a new action for the model's state.
fn draw(rng: &mut StdRng, model: &mut Model, index: usize, remaining: usize) -> Action {
    let is_open = |m: &Model, w| m.open.iter().any(|&(o, _)| o == w);
    // Room to close a window opened now before the schedule ends.
    let may_open = remaining > model.open.len() + 3;
    // No start while the watchdog's state cannot be written: it refuses to launch what it
    // cannot register durably (the start fails by design, docs/OPERATIONS.md).
    let may_start = !is_open(model, Window::Disk) && !is_open(model, Window::Io);
    loop {
        let roll = rng.gen_range(0..116);
        let window = match roll {
            0..=29 if model.running < 12 && may_start => return start(rng, model),
            30..=49 if model.running > 0 => {
                model.running -= 1;
                let signal = SIGNALS[rng.gen_range(0..SIGNALS.len())];
                return Action::Kill {
                    pick: rng.r#gen(),
                    signal,
                    reuse: rng.gen_bool(0.2),
                };
            }
            50..=57 if model.running > 0 => {
                model.running -= 1;
                return Action::Cancel { pick: rng.r#gen() };
            }
            58..=65 => {
                return Action::RestartOma {
                    crash: rng.gen_bool(0.5),
                };
            }
            66..=75 if may_open && !is_open(model, Window::Watchdog) => Window::Watchdog,
            76..=83 if may_open && !is_open(model, Window::Link) => Window::Link,
            84..=91 if may_open && !is_open(model, Window::Netem) => Window::Netem,
            92..=99 if may_open && model.postgres && !is_open(model, Window::Postgres) => {
                Window::Postgres
            }
            100..=107 if may_open && !is_open(model, Window::Disk) => Window::Disk,
            108..=115 if may_open && !is_open(model, Window::Io) => Window::Io,
            _ => continue,
        };
        model.open.push((window, index + rng.gen_range(2..8)));
        return match window {
            Window::Watchdog => Action::WatchdogDown {
                crash: rng.gen_bool(0.5),
            },
            Window::Link => Action::Cut,
            Window::Netem => Action::Slow {
                delay_ms: rng.gen_range(5..200),
                loss_pct: rng.gen_range(0..20),
            },
            Window::Postgres => Action::PostgresDown,
            Window::Disk => Action::DiskFull,
            Window::Io => Action::IoErrors {
                // The OMA's files only on SQLite: PostgreSQL's are its own server's.
                target: if !model.postgres && rng.gen_bool(0.5) {
                    IoTarget::Oma
                } else {
                    IoTarget::Watchdog
                },
                errno: if rng.gen_bool(0.5) {
                    libc::EIO
                } else {
                    libc::ENOSPC
                },
            },
        };
    }
}

/// A `Start` with a drawn fate: half run until killed, the rest end on their own.
fn start(rng: &mut StdRng, model: &mut Model) -> Action {
    let after_ms = rng.gen_range(200..6000);
    let fate = match rng.gen_range(0..12) {
        0..=4 => {
            model.running += 1;
            Fate::UntilKilled
        }
        5 | 6 => Fate::Exits {
            code: rng.gen_range(1..=255),
            after_ms,
        },
        7 => Fate::Completes { after_ms },
        8 => Fate::Segv { after_ms },
        9 => Fate::Dissolves { after_ms },
        10 => Fate::WorkerExitGroup {
            code: rng.gen_range(1..=255),
            after_ms,
        },
        _ => Fate::Oom { after_ms },
    };
    Action::Start(fate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule_and_another_seed_another() {
        assert_eq!(make(7, 300, true), make(7, 300, true));
        assert_ne!(make(7, 300, true), make(8, 300, true));
    }

    #[test]
    fn every_window_opened_is_closed_and_none_twice() {
        for seed in 0..50 {
            let mut open: Vec<&str> = Vec::new();
            for f in make(seed, 200, true) {
                let (w, opens) = match f.action {
                    Action::WatchdogDown { .. } => ("watchdog", true),
                    Action::WatchdogUp => ("watchdog", false),
                    Action::Cut => ("link", true),
                    Action::Restore => ("link", false),
                    Action::Slow { .. } => ("netem", true),
                    Action::Fast => ("netem", false),
                    Action::PostgresDown => ("postgres", true),
                    Action::PostgresUp => ("postgres", false),
                    Action::DiskFull => ("disk", true),
                    Action::DiskFreed => ("disk", false),
                    Action::IoErrors { .. } => ("io", true),
                    Action::IoHealed => ("io", false),
                    _ => continue,
                };
                if opens {
                    assert!(!open.contains(&w), "seed {seed}: {w} opened twice at {f}");
                    open.push(w);
                } else {
                    assert!(open.contains(&w), "seed {seed}: {w} closed unopened at {f}");
                    open.retain(|&o| o != w);
                }
            }
            assert!(open.is_empty(), "seed {seed}: left open {open:?}");
        }
    }

    #[test]
    fn postgres_faults_only_on_postgres_and_every_kind_is_drawn() {
        let sqlite = make(3, 2000, false);
        assert!(!sqlite.iter().any(|f| f.action == Action::PostgresDown));
        let pg = make(3, 2000, true);
        let has = |p: &dyn Fn(&Action) -> bool| pg.iter().any(|f| p(&f.action));
        assert!(has(&|a| matches!(a, Action::PostgresDown)));
        assert!(has(&|a| matches!(a, Action::Kill { reuse: true, .. })));
        assert!(has(&|a| matches!(a, Action::Cancel { .. })));
        assert!(has(&|a| matches!(a, Action::RestartOma { crash: true })));
        assert!(has(&|a| matches!(a, Action::WatchdogDown { crash: false })));
        assert!(has(&|a| matches!(a, Action::Slow { .. })));
        assert!(has(&|a| matches!(a, Action::Start(Fate::Oom { .. }))));
        assert!(has(&|a| matches!(a, Action::Start(Fate::Dissolves { .. }))));
        assert!(has(&|a| matches!(
            a,
            Action::Start(Fate::WorkerExitGroup { .. })
        )));
        assert!(has(&|a| matches!(a, Action::DiskFull)));
        assert!(has(&|a| matches!(
            a,
            Action::IoErrors {
                target: IoTarget::Watchdog,
                ..
            }
        )));
        let sqlite_has = |p: &dyn Fn(&Action) -> bool| sqlite.iter().any(|f| p(&f.action));
        assert!(sqlite_has(&|a| matches!(
            a,
            Action::IoErrors {
                target: IoTarget::Oma,
                ..
            }
        )));
        assert!(!has(&|a| matches!(
            a,
            Action::IoErrors {
                target: IoTarget::Oma,
                ..
            }
        )));
    }
}
