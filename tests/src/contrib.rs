//! The shipped Grafana dashboard and alert rules (`contrib/`), read for the tests that check
//! them against the daemons' metrics and a real Prometheus.

/// Where the shipped files are.
const CONTRIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib");

/// Every `expr` of the dashboard's panels, with its panel's title. Panics when the file is
/// not valid JSON or a panel queries nothing.
pub fn dashboard_expressions() -> Vec<(String, String)> {
    let path = format!("{CONTRIB}/grafana/migratekit-recovery.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid JSON: {e}"));
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let panels = dashboard["panels"].as_array().expect("a list of panels");
    let mut out = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().expect("every panel has a title");
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(!targets.is_empty(), "panel {title:?} queries nothing");
        for target in targets {
            let expr = target["expr"].as_str().expect("every target has an expr");
            out.push((title.to_owned(), expr.to_owned()));
        }
    }
    out
}

/// Every `expr` of the alert rules (`contrib/prometheus/alerts.yml`), as written.
pub fn alert_expressions() -> Vec<String> {
    let path = format!("{CONTRIB}/prometheus/alerts.yml");
    let rules = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    rules
        .split("expr:")
        .skip(1)
        .map(|rest| rest.split("for:").next().unwrap_or(rest))
        .map(|rest| {
            rest.split("labels:")
                .next()
                .unwrap_or(rest)
                .trim()
                .to_owned()
        })
        .collect()
}

/// The words of a PromQL expression that are metric names of this project (`oma_…`,
/// `vma_watchdog_…`) or `up`, outside quoted label values.
pub fn metric_words(expr: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("oma_") || word.starts_with("vma_watchdog_") || word == "up" {
            words.push(word.clone());
        }
        word.clear();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_words_skip_label_values_functions_and_labels() {
        let expr = r#"sum by (class) (rate(vma_watchdog_deaths_total{class="oma_x"}[5m])) + up"#;
        assert_eq!(metric_words(expr), ["vma_watchdog_deaths_total", "up"]);
    }
}
