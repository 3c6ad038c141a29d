//! The kill-test runner behind `cargo xtask kill-test`: runs each scenario of issue 5 a number
//! of times against real daemons and real processes, and reports a table and JSON.

mod backend;
pub mod bench;
mod report;
mod scenarios;
mod scenarios_load;
mod scenarios_net;
mod scenarios_trust;
mod scenarios_unwatched;

use std::time::{Duration, Instant};

pub use backend::{Backend, FreshDatabase, oma_config};
pub use report::{Report, ScenarioResult};
pub(crate) use scenarios::occupy_pid;

/// What one run of a scenario gives back: kill-to-commit latencies it measured.
pub type RunOutcome = Result<Vec<Duration>, String>;

/// One scenario: its number in issue 5, a short name, and the function that runs it once.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Number in issue 5.
    pub number: u8,
    /// Short name for the table.
    pub name: &'static str,
    /// What it proves, for the docs and `--list`.
    pub proves: &'static str,
    /// Runs it once.
    pub run: fn(run: &Run) -> RunOutcome,
}

/// What one run of a scenario is given.
#[derive(Debug, Clone)]
pub struct Run {
    /// The run's index (scenarios vary what they do by it).
    pub index: usize,
    /// The watchdog's `--detector`: `auto`, `ebpf` or `procfs`.
    pub detector: String,
    /// The run's own PostgreSQL database, on the postgres backend (dropped after the run).
    pub database: Option<std::sync::Arc<FreshDatabase>>,
}

impl Run {
    /// The OMA's settings for this run: the tests' intervals, on the run's backend. An OMA in
    /// a network namespace (`in_netns`) reaches PostgreSQL over its Unix socket.
    pub fn oma_config(&self, in_netns: bool) -> Result<crate::oma::OmaConfig, String> {
        backend::oma_config(self.database.as_deref(), in_netns)
    }
}

/// Every scenario, in issue order.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            number: 1,
            name: "oma-restart",
            proves: "OMA SIGKILLed or stopped mid-job: live jobs kept and polled again, a job that died meanwhile failed with its class",
            run: scenarios::oma_restart,
        },
        Scenario {
            number: 2,
            name: "watchdog-restart",
            proves: "watchdog SIGKILLed or stopped mid-job: running processes adopted, none failed; a death during the downtime reported as died_while_unwatched",
            run: scenarios::watchdog_restart,
        },
        Scenario {
            number: 3,
            name: "migratekit-dies",
            proves: "SIGKILL, SIGTERM, SIGSEGV (core), exit 3 and an OOM kill in a memory cgroup each give the right class and evidence",
            run: scenarios::migratekit_dies,
        },
        Scenario {
            number: 4,
            name: "partition",
            proves: "veth link between the OMA's and the VMA's namespaces cut while jobs die: each death arrives exactly once after the link returns, polling resumes, nothing failed as unreachable",
            run: scenarios_net::partition,
        },
        Scenario {
            number: 5,
            name: "threads",
            proves: "a worker thread exiting and the leader thread exiting while others run are not deaths; the real death afterwards is reported once",
            run: scenarios::threads,
        },
        Scenario {
            number: 6,
            name: "pid-reuse",
            proves: "a new process on a dead job's pid (forced with ns_last_pid) is not adopted; the job is reported dead",
            run: scenarios::pid_reuse,
        },
        Scenario {
            number: 7,
            name: "load",
            proves: "50 concurrent jobs with random kills and restarts of both daemons: every job ends as what really happened to its process dictates (its real end against the watchdog's real downtimes), none stays active",
            run: scenarios_load::load,
        },
        Scenario {
            number: 8,
            name: "bad-input",
            proves: "malformed, oversized, unauthenticated and wrong-VMA requests to both APIs are refused, change nothing, and both daemons stay up",
            run: scenarios_net::bad_input,
        },
        Scenario {
            number: 9,
            name: "trust",
            proves: "a local user's impostor migratekit processes (a copy, the real binary as another user, a copy run by root) and forged progress (a failed report) change nothing; the real death is reported as usual",
            run: scenarios_trust::trust,
        },
        Scenario {
            number: 10,
            name: "unwatched-completion",
            proves: "a stand-in reports completed at 100 % and ends while the watchdog is down: the job ends completed with a completed_unwatched audit entry, not died_while_unwatched",
            run: scenarios_unwatched::unwatched_completion,
        },
    ]
}

/// Runs `scenario` `runs` times with the watchdog's `detector`, the OMA on `backend`, and
/// collects the outcome.
pub fn run_scenario(
    scenario: &Scenario,
    runs: usize,
    detector: &str,
    backend: &Backend,
) -> ScenarioResult {
    let mut result = ScenarioResult::new(scenario);
    for i in 0..runs {
        let started = Instant::now();
        let outcome = backend.fresh().and_then(|database| {
            let run = Run {
                index: i,
                detector: detector.to_owned(),
                database: database.map(std::sync::Arc::new),
            };
            std::panic::catch_unwind(|| (scenario.run)(&run))
                .unwrap_or_else(|p| Err(panic_text(&p)))
        });
        eprintln!(
            "  scenario {} {} run {}/{}: {} ({:.1} s)",
            scenario.number,
            scenario.name,
            i + 1,
            runs,
            match &outcome {
                Ok(_) => "ok".to_owned(),
                Err(e) => format!("FAILED: {e}"),
            },
            started.elapsed().as_secs_f64()
        );
        result.record(outcome);
    }
    result
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".into())
}

/// Turns a harness error into a run failure.
pub(crate) fn fail<E: std::fmt::Display>(context: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{context}: {e}")
}

/// Fails the run with `message` unless `cond`.
pub(crate) fn check(cond: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(message()) }
}

/// Runs every scenario in `scenarios` `runs` times, the watchdog with `--detector detector`,
/// the OMA on `backend`.
pub fn run(scenarios: &[Scenario], runs: usize, detector: &str, backend: &Backend) -> Report {
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    let mut results = Vec::new();
    for s in scenarios {
        eprintln!("scenario {} {}: {}", s.number, s.name, s.proves);
        results.push(run_scenario(s, runs, detector, backend));
    }
    Report {
        started_at,
        detector: detector.to_owned(),
        backend: backend.name().to_owned(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        runs_per_scenario: runs,
        duration_secs: started.elapsed().as_secs_f64(),
        scenarios: results,
    }
}
