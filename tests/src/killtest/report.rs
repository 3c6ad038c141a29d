//! Results of a kill-test run: the table on stdout and the JSON file.

use std::time::Duration;

use serde::Serialize;

use super::{RunOutcome, Scenario};
use crate::system::percentile;

/// Outcome of all runs of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// Number in issue 5.
    pub number: u8,
    /// Short name.
    pub name: String,
    /// Runs done.
    pub runs: usize,
    /// Runs that passed.
    pub passed: usize,
    /// Kill-to-commit latencies measured across runs, milliseconds.
    pub latencies_ms: Vec<f64>,
    /// p50 of `latencies_ms`.
    pub p50_ms: Option<f64>,
    /// p99 of `latencies_ms`.
    pub p99_ms: Option<f64>,
    /// What went wrong, one entry per failed run.
    pub failures: Vec<String>,
}

impl ScenarioResult {
    /// An empty result for `scenario`.
    pub fn new(scenario: &Scenario) -> Self {
        Self {
            number: scenario.number,
            name: scenario.name.to_owned(),
            runs: 0,
            passed: 0,
            latencies_ms: Vec::new(),
            p50_ms: None,
            p99_ms: None,
            failures: Vec::new(),
        }
    }

    /// Adds one run.
    pub fn record(&mut self, outcome: RunOutcome) {
        self.runs += 1;
        match outcome {
            Ok(latencies) => {
                self.passed += 1;
                self.latencies_ms
                    .extend(latencies.iter().map(|d: &Duration| d.as_secs_f64() * 1e3));
            }
            Err(e) => self.failures.push(e),
        }
        self.p50_ms = percentile(&self.latencies_ms, 50.0);
        self.p99_ms = percentile(&self.latencies_ms, 99.0);
    }

    /// True when every run passed.
    pub fn ok(&self) -> bool {
        self.passed == self.runs
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ran (UTC, RFC 3339).
    pub started_at: String,
    /// The watchdog's `--detector` (with `auto`, each scenario checks which one ran).
    pub detector: String,
    /// The OMA's store: `sqlite` or `postgres` (a fresh database per run).
    pub backend: String,
    /// Kernel release.
    pub kernel: String,
    /// Runs per scenario.
    pub runs_per_scenario: usize,
    /// Wall time of the whole run, seconds.
    pub duration_secs: f64,
    /// Per scenario.
    pub scenarios: Vec<ScenarioResult>,
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

impl Report {
    /// True when every scenario passed every run.
    pub fn ok(&self) -> bool {
        self.scenarios.iter().all(ScenarioResult::ok)
    }

    /// The table, as printed and as pasted into `docs/RELIABILITY.md`.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| # | scenario | runs | passed | kill-to-commit p50 ms | p99 ms | failures |\n\
             | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for s in &self.scenarios {
            let failures = if s.failures.is_empty() {
                "none".to_owned()
            } else {
                s.failures
                    .iter()
                    .map(|f| f.replace('|', "/").replace('\n', " "))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                s.number,
                s.name,
                s.runs,
                s.passed,
                ms(s.p50_ms),
                ms(s.p99_ms),
                failures
            ));
        }
        out
    }
}
