//! The fleet benchmark's table, in Markdown so that it goes into `docs/BENCHMARKS.md` as is.

use serde_json::Value;

fn num(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

fn pair(v: &Value, path: &[&str], scale: f64, digits: usize) -> String {
    let mut p50 = path.to_vec();
    p50.push("p50");
    let mut p99 = path.to_vec();
    p99.push("p99");
    format!(
        "{:.digits$} / {:.digits$}",
        num(v, &p50) * scale,
        num(v, &p99) * scale
    )
}

/// One line per run.
pub fn render(rows: &[Value]) -> String {
    let mut out = String::from(
        "| VMAs / jobs | backend | protocol | OMA cores | OMA RSS MiB (peak) | poll lag p50 / p99 s | cycle lag p99 s | freshness p99 s | kill-to-commit p50 / p99 ms | idle p50 / p99 ms | recovery run s | VMA requests/s | failed polls |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let w = &r["window"];
        let requests = num(w, &["progress_gets_per_s"]) + num(w, &["feed_gets_per_s"]);
        out.push_str(&format!(
            "| {} / {} | {} | {} | {:.2} | {:.0} ({:.0}) | {} | {:.2} | {:.1} | {} | {} | {:.1} | {:.0} | {} |\n",
            r["vmas"],
            r["jobs"],
            r["backend"].as_str().unwrap_or("?"),
            r["protocol"].as_str().unwrap_or("?"),
            num(w, &["oma_cores"]),
            num(w, &["oma_rss_mib"]),
            num(w, &["oma_rss_max_mib"]),
            pair(w, &["poll_gap_lag_ms"], 0.001, 2),
            num(w, &["cycle_lag_ms", "p99"]) / 1000.0,
            num(w, &["freshness_age_ms", "p99"]) / 1000.0,
            pair(w, &["kill_to_commit_ms"], 1.0, 2),
            pair(r, &["baseline_kill_to_commit_ms"], 1.0, 2),
            num(r, &["recovery_run_s"]),
            requests,
            w["polls_failed"],
        ));
    }
    out
}

/// The machine's conditions at the end of the runs.
pub fn conditions() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "machine: {cpus} CPUs, load average at the end {}",
        load.trim()
    )
}
