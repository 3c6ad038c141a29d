//! The harness's own pieces against the real things they drive: an OMA restarted on its
//! database, a namespaced OMA reached over the veth pair and cut off, a memory cgroup that
//! OOM-kills, and pid-safe kills of the stand-in.

use std::time::Duration;

use system_tests::cgroup::MemCgroup;
use system_tests::netns::NetPair;
use system_tests::oma::{Oma, OmaConfig};
use system_tests::procs;

#[test]
fn oma_keeps_its_jobs_across_sigkill_and_restart() {
    let mut oma = Oma::start(&OmaConfig::default(), system_tests::http::client()).unwrap();
    // A VMA nobody listens on: the start cannot reach it, the job stays pending (202), and
    // it is still there, with its audit trail, after a crash and restart.
    oma.register_vma("vma-x", "http://127.0.0.1:9", "0123456789abcdef0123")
        .unwrap();
    // Every thread of the OMA runs above normal priority when it may raise it (root here);
    // otherwise it says so and runs at normal priority.
    let nices = procs::thread_nices(oma.daemon().pid().unwrap());
    let expected = if system_tests::is_root() { -10 } else { 0 };
    assert!(
        !nices.is_empty() && nices.iter().all(|&n| n == expected),
        "{nices:?}"
    );
    if !system_tests::is_root() {
        assert!(
            oma.daemon()
                .log()
                .contains("cannot set the OMA's CPU priority")
        );
    }
    let created = oma.create_job("j1", "ctx-1", "vma-x").unwrap();
    assert!(created.status.is_active(), "{created:?}");
    oma.sigkill().unwrap();
    oma.start_again().unwrap();
    let job = oma.job("j1").unwrap();
    assert_eq!(job.vma_id, "vma-x");
    assert!(!oma.audit("j1").unwrap().is_empty());
    assert!(oma.recovery_status().unwrap().is_object());
}

#[test]
fn a_namespaced_oma_is_reached_over_the_veth_pair_and_cut_off() {
    if !system_tests::skip_unless_root("namespaced_oma") {
        return;
    }
    let net = NetPair::create().unwrap();
    let config = OmaConfig {
        ip: net.oma_ip,
        netns: Some(net.oma_ns.clone()),
        ..OmaConfig::default()
    };
    // The VMA's side reaches the OMA over the link.
    let oma = Oma::start(&config, NetPair::client_in(&net.vma_ns).unwrap()).unwrap();
    assert!(oma.jobs().unwrap().is_empty());
    net.cut().unwrap();
    assert!(
        oma.client()
            .wait_healthy(Duration::from_millis(1500))
            .is_err()
    );
    net.restore().unwrap();
    oma.client().wait_healthy(Duration::from_secs(10)).unwrap();
    // The root namespace cannot reach it at all.
    let outside = system_tests::http::JsonClient::new(system_tests::http::client(), oma.url, None);
    assert!(outside.wait_healthy(Duration::from_millis(300)).is_err());
}

#[test]
fn the_memory_cgroup_oom_kills_the_stand_in() {
    if !system_tests::skip_unless_root("memory_cgroup") {
        return;
    }
    let cg = MemCgroup::create(&format!("system-tests-{}", std::process::id()), 32 << 20).unwrap();
    let procs_file = cg.procs_file();
    let mk = system_tests::bins::migratekit().unwrap();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec {} migrate --job-id oom-h --standin-run-for 0.1 --standin-oom --standin-oom-cap-mib 512",
            procs_file.display(),
            mk.display()
        ))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}

#[test]
fn kills_check_the_start_time_so_a_recycled_pid_is_never_signalled() {
    let mk = system_tests::bins::migratekit().unwrap();
    let mut child = std::process::Command::new(&mk)
        .args(["migrate", "--job-id", "harness-kill"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let p = procs::wait_migratekit("harness-kill", Duration::from_secs(10)).unwrap();
    assert_eq!(p.pid, child.id());
    let wrong = api::ProcessIdentity {
        pid: p.pid,
        start_time: p.start_time + 1,
    };
    assert!(procs::kill_process(wrong, libc::SIGKILL).is_err());
    assert!(procs::is_alive(p));
    procs::kill_process(p, libc::SIGKILL).unwrap();
    let _ = child.wait();
    assert!(!procs::is_alive(p));
}
