//! Issue 13, end to end: a real Prometheus server (Debian's `prometheus`, installed by
//! `cargo xtask setup`, run here with a configuration and storage of its own, never the
//! package's service) scrapes a real OMA and watchdog. A job's migratekit is SIGKILLed, and
//! Prometheus's own query API must then say: one more `process_killed` death, one failed job,
//! an empty outbox.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use system_tests::contrib::{alert_expressions, dashboard_expressions, metric_words};
use system_tests::system::{PATIENCE, System, SystemOptions};

/// How often the test's Prometheus scrapes: fast, so the test does not wait long.
const SCRAPE_INTERVAL: &str = "1s";

/// A Prometheus server of the test's own, stopped on drop.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::blocking::Client,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping the OMA's and the watchdog's metrics endpoints, under the
    /// job names the shipped alert rules expect.
    fn start(oma: SocketAddr, watchdog: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
             rule_files: [\"{rules}\"]\n\
             scrape_configs:\n\
             - job_name: oma\n  static_configs: [{{targets: [\"{oma}\"]}}]\n\
             - job_name: vma-watchdog\n  static_configs: [{{targets: [\"{watchdog}\"]}}]\n",
            rules = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../contrib/prometheus/alerts.yml"
            ),
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = test_support::free_port([127, 0, 0, 1].into()).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (Debian's `prometheus` package: run `cargo xtask setup`)");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::blocking::Client::new(),
            _dir: dir,
        }
    }

    /// The values of an instant query's result, or `None` while Prometheus cannot answer.
    fn query(&self, promql: &str) -> Option<Vec<f64>> {
        let answer = self.evaluates(promql)?;
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        let result = answer["data"]["result"].as_array()?;
        Some(
            result
                .iter()
                .filter_map(|r| r["value"][1].as_str()?.parse().ok())
                .collect(),
        )
    }

    /// Prometheus's answer to the instant query `promql` (`None` while it cannot answer).
    fn evaluates(&self, promql: &str) -> Option<serde_json::Value> {
        let answer: serde_json::Value = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .ok()?
            .json()
            .ok()?;
        Some(answer)
    }

    /// The single value of `promql` (summed, with 0 when nothing matches).
    fn value(&self, promql: &str) -> Option<f64> {
        let values = self.query(&format!("sum({promql}) or vector(0)"))?;
        values.first().copied()
    }

    /// Waits until `promql` is `want`; panics after `limit` with what Prometheus said last.
    fn wait_value(&self, promql: &str, want: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.value(promql);
            if last == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("Prometheus: {promql} is {last:?}, not {want}, after {limit:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_sees_a_killed_migratekit_fail_its_job_and_the_outbox_drain() {
    if !system_tests::skip_unless_root("prometheus_sees_a_killed_migratekit") {
        return;
    }
    let sys = System::start(&SystemOptions::default()).expect("starting oma and vma-watchdog");
    let (Some(oma), Some(watchdog)) = (sys.oma.metrics, sys.watchdog.metrics) else {
        panic!("the harness serves both daemons' metrics by default");
    };
    let prometheus = Prometheus::start(oma, watchdog);
    // Both targets scraped and up.
    prometheus.wait_value("up", 2.0, PATIENCE);
    let process = sys.start_job("prom-kill", "").expect("job starts");
    sys.wait_recorded("prom-kill", process)
        .expect("OMA records the process");
    // A scrape after the start, so the baseline is the count just before the kill.
    prometheus.wait_value("vma_watchdog_processes_watched", 1.0, PATIENCE);
    let deaths = r#"vma_watchdog_deaths_total{class="process_killed"}"#;
    let before = prometheus.value(deaths).expect("Prometheus answers");
    sys.kill_and_wait("prom-kill", process, libc::SIGKILL)
        .expect("the death reaches the OMA");
    prometheus.wait_value(deaths, before + 1.0, PATIENCE);
    prometheus.wait_value(r#"oma_jobs{status="failed"}"#, 1.0, PATIENCE);
    prometheus.wait_value("vma_watchdog_outbox_events", 0.0, PATIENCE);
    prometheus.wait_value(
        r#"oma_transitions_total{to="failed",failure_class="process_killed"}"#,
        1.0,
        PATIENCE,
    );
    // Exactly one death: a few more scrapes change nothing.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(prometheus.value(deaths), Some(before + 1.0));
    // The death reached the OMA, so the histogram of its delivery has one observation.
    assert_eq!(
        prometheus.value("vma_watchdog_death_to_ack_seconds_count"),
        Some(1.0)
    );
    shipped_expressions_run(&sys, &prometheus);
    // The shipped rules loaded, and none fires on a healthy system.
    let rules: serde_json::Value = prometheus
        .http
        .get(format!("{}/api/v1/rules", prometheus.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(loaded >= 9, "the alert rules are loaded: {rules}");
    assert_eq!(
        prometheus.query("ALERTS{alertstate=\"firing\"}"),
        Some(vec![])
    );
}

/// Every metric that the dashboard's and the alerts' expressions name is on the daemons' own
/// `/metrics` pages (after a job's start and death, every family has a series), and every
/// dashboard expression runs in Prometheus.
fn shipped_expressions_run(sys: &System, prometheus: &Prometheus) {
    let mut exported = vec!["up".to_owned()];
    for addr in [sys.oma.metrics, sys.watchdog.metrics]
        .into_iter()
        .flatten()
    {
        exported.extend(test_support::metrics::names(
            &test_support::metrics::scrape(addr),
        ));
    }
    let dashboard = dashboard_expressions();
    let alerts = alert_expressions()
        .into_iter()
        .map(|e| ("alert".to_owned(), e));
    for (panel, expr) in dashboard.iter().cloned().chain(alerts) {
        for word in metric_words(&expr) {
            assert!(
                exported.contains(&word),
                "{panel}: {expr} names {word}, which neither daemon exports"
            );
        }
    }
    for (panel, expr) in dashboard {
        // Grafana's own variables are not PromQL; the dashboard uses none in expressions.
        let answer = prometheus.evaluates(&expr).expect("Prometheus answers");
        assert_eq!(
            answer["status"], "success",
            "panel {panel:?}: {expr}: {answer}"
        );
    }
}
