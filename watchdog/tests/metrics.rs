//! Privileged: the real watchdog's `/metrics`, scraped over a real socket, counts a real
//! stand-in migratekit's start and SIGKILL, the outbox that holds them (no OMA here), and a
//! forged progress update refused. Run: `cargo test -p vma-watchdog --test metrics` as root.

#[macro_use]
mod common;

use std::net::SocketAddr;

use common::*;
use test_support::metrics::{http, scrape, value};

fn killed_migratekit_is_counted(detector: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let standin = standin_bin();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--migratekit-path",
        standin.to_str().unwrap(),
    ];
    let watchdog = WatchdogProcess::start_with(&state, detector, &args, &[]);
    let line = watchdog.wait_for("metrics_listening", |v| v["event"] == "metrics_listening");
    let metrics: SocketAddr = line["addr"].as_str().unwrap().parse().unwrap();
    let build = format!(
        r#"vma_watchdog_build_info{{version="{}",detector="{}","#,
        env!("CARGO_PKG_VERSION"),
        watchdog.detector
    );
    assert!(scrape(metrics).contains(&build), "{}", scrape(metrics));
    let s = Standin::start(dir.path(), "job-metrics", &secret(), &[]);
    watchdog.wait_event("process_started", s.pid);
    let page = scrape(metrics);
    assert_eq!(
        value(&page, "vma_watchdog_processes_watched"),
        Some(1.0),
        "{page}"
    );
    // From this test's process, not the job's: refused, and counted.
    let path = "/api/v1/progress/job-metrics/update";
    let (status, _) = http(watchdog.api_addr(), "POST", path, r#"{"status":"failed"}"#);
    assert_eq!(status, 403);
    s.kill(libc::SIGKILL);
    watchdog.wait_event("process_exited", s.pid);
    let page = scrape(metrics);
    let expect = [
        (r#"vma_watchdog_deaths_total{class="process_killed"}"#, 1.0),
        ("vma_watchdog_processes_watched", 0.0),
        // The start and the death wait in the outbox: no OMA is configured.
        ("vma_watchdog_outbox_events", 2.0),
        (
            r#"vma_watchdog_progress_updates_total{result="refused"}"#,
            1.0,
        ),
        (
            r#"vma_watchdog_http_requests_total{route="/api/v1/progress/{job_id}/update",status="403"}"#,
            1.0,
        ),
        ("vma_watchdog_registry_write_errors_total", 0.0),
        ("vma_watchdog_ebpf_ring_events_lost_total", 0.0),
    ];
    for (series, want) in expect {
        assert_eq!(
            value(&page, series),
            Some(want),
            "{detector}: {series}\n{page}"
        );
    }
    let bytes = value(&page, "vma_watchdog_outbox_bytes").unwrap();
    assert!(bytes > 0.0, "{page}");
    // The daemon's own memory, read from its /proc at the scrape: resident now, at most the peak.
    let rss = value(&page, "vma_watchdog_resident_memory_bytes").unwrap();
    let peak = value(&page, "vma_watchdog_resident_memory_peak_bytes").unwrap();
    assert!(rss > 1e6 && rss <= peak, "rss {rss}, peak {peak}\n{page}");
    if watchdog.detector == "ebpf" {
        // The programs' run statistics are there; they count only while the kernel's BPF
        // statistics are enabled (a host-wide sysctl this test leaves alone).
        let stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled");
        let runs = value(
            &page,
            r#"vma_watchdog_ebpf_program_runs_total{program="watchdog_exit"}"#,
        );
        match stats.as_deref().map(str::trim) {
            Ok("1") => assert!(runs.is_some_and(|n| n > 0.0), "{page}"),
            _ => assert_eq!(runs, Some(0.0), "{page}"),
        }
    }
    s.reap();
    watchdog.stop();
}

both_detectors!(killed_migratekit_is_counted);
