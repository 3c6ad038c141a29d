//! The shipped Grafana dashboard is valid JSON, every panel queries something, and every
//! expression of the dashboard and of the alert rules names at least one of the daemons'
//! metrics. That each named metric is exported and that each expression runs is checked
//! against the real daemons and a real Prometheus in `prometheus.rs` (root).

use system_tests::contrib::{alert_expressions, dashboard_expressions, metric_words};

#[test]
fn the_dashboard_is_valid_and_every_expression_names_a_metric() {
    let expressions = dashboard_expressions();
    assert!(expressions.len() >= 10, "{expressions:?}");
    for (title, expr) in expressions {
        assert!(
            !metric_words(&expr).is_empty(),
            "panel {title:?}: {expr} names no metric"
        );
    }
}

#[test]
fn every_alert_names_a_metric() {
    let expressions = alert_expressions();
    assert!(expressions.len() >= 9, "{expressions:?}");
    for expr in expressions {
        assert!(!metric_words(&expr).is_empty(), "{expr} names no metric");
    }
}
