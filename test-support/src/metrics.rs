//! Scraping a daemon's `/metrics` page and reading it (the Prometheus text format) in tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Sends one plain HTTP/1.0 request (no body when `body` is empty) and returns the status code
/// and the body: enough for `/metrics` and a progress post, without an async runtime.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the daemon");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head}"));
    (status, body.to_owned())
}

/// The `/metrics` page of the daemon whose metrics listener is `addr`.
pub fn scrape(addr: SocketAddr) -> String {
    let (status, page) = http(addr, "GET", "/metrics", "");
    assert_eq!(status, 200, "GET /metrics: {page}");
    page
}

/// The value of the series written exactly as `series` (name and labels in the order the
/// daemon writes them, such as `oma_jobs{status="failed"}`), or `None` when the page lacks it.
pub fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
}

/// Every metric name on the page (from its `# TYPE` lines), for checks that an expression
/// names metrics the daemons export. A histogram's or summary's name stands for its
/// `_bucket`, `_sum` and `_count` series too, which are returned as well.
pub fn names(page: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in page.lines() {
        let mut words = line.split(' ');
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.push(name.to_owned());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.push(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\na_total 7\n\
        # TYPE h_seconds histogram\nh_seconds_count 2\n";

    #[test]
    fn series_are_found_by_their_exact_text() {
        assert_eq!(value(PAGE, "a_total{x=\"1\"}"), Some(3.0));
        assert_eq!(value(PAGE, "a_total"), Some(7.0));
        assert_eq!(value(PAGE, "a_total{x=\"2\"}"), None);
        assert_eq!(value(PAGE, "h_seconds_count"), Some(2.0));
    }

    #[test]
    fn names_include_a_histogram_s_series() {
        let names = names(PAGE);
        assert!(names.contains(&"a_total".to_owned()));
        assert!(names.contains(&"h_seconds_bucket".to_owned()));
        assert!(!names.contains(&"a_total_bucket".to_owned()));
    }
}
