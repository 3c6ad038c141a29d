//! A stand-in the watchdog launched itself and the OOM killer of its memory cgroup killed is
//! reported `oom_killed`, every time. The launcher's own `waitid` sees the same death (as a
//! plain SIGKILL, with no OOM flag) at about the moment the eBPF detector does; the detector's
//! exact evidence must win that race, not whichever report comes first.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use api::{JobProcessState, ProcessIdentity, VmaJobStatus};
use common::{WatchdogProcess, privileged};

const API_TOKEN: &str = "api-token-oom-3d9";
const ROUNDS: usize = 10;

/// A memory cgroup (v1) with a small limit under this process's own, removed on drop.
struct MemCgroup(PathBuf);

impl MemCgroup {
    fn create(name: &str, limit_bytes: u64) -> Option<Self> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let own = cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        })?;
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/memory{own}/{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).ok()?;
        let cgroup = Self(dir);
        let limit = limit_bytes.to_string();
        std::fs::write(cgroup.0.join("memory.limit_in_bytes"), &limit).ok()?;
        // Without swap limited too, the kernel could swap instead of killing.
        let memsw = cgroup.0.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            std::fs::write(memsw, &limit).ok()?;
        }
        Some(cgroup)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

async fn start_job(http: &reqwest::Client, base: &str, job: &str) -> ProcessIdentity {
    let r = http
        .post(format!("{base}/api/v1/jobs/{job}/start"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "start {job}: {}", r.text().await.unwrap());
    match r.json::<VmaJobStatus>().await.unwrap().state {
        JobProcessState::Running { process, .. } => process,
        other => panic!("job {job} not running after start: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launched_standin_killed_by_the_oom_killer_is_reported_oom_killed() {
    if !privileged("launched_oom") {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let program = common::standin_bin();
    // Each stand-in allocates until killed five seconds after it starts: time enough to move
    // it into its small memory cgroup first, even on a loaded machine. Should it start outside
    // anyway, it gives up at 256 MiB (and the test fails) instead of pressing on the host's
    // memory. Its progress goes nowhere (port 9 refuses).
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--api-token",
        API_TOKEN,
        "--launch-no-systemd",
        "--launch-program",
        program.to_str().unwrap(),
    ];
    for arg in [
        "migrate",
        "--job-id",
        "{job_id}",
        "--standin-oom",
        "--standin-oom-cap-mib",
        "256",
        "--standin-run-for",
        "5",
    ] {
        args.extend(["--launch-arg", arg]);
    }
    let env = [("MIGRATEKIT_STANDIN_PROGRESS_URL", "http://127.0.0.1:9")];
    let w = WatchdogProcess::start_with(state.path(), "auto", &args, &env);
    if w.detector != "ebpf" {
        eprintln!(
            "SKIP: launched_oom: the eBPF detector is not available (run `cargo xtask build-ebpf`); the procfs detector never knows of OOM kills"
        );
        w.stop();
        return;
    }
    let base = format!("http://{}", w.api_addr());
    let http = reqwest::Client::new();
    // All ten at once: the deaths then come together, as under load, where the race was lost.
    let mut running = Vec::new();
    for i in 0..ROUNDS {
        let Some(cgroup) = MemCgroup::create(&format!("wd-launch-oom-{i}"), 64 << 20) else {
            eprintln!(
                "SKIP: launched_oom: cannot create a cgroup v1 memory group under /sys/fs/cgroup/memory"
            );
            w.stop();
            return;
        };
        let process = start_job(&http, &base, &format!("oom-{i}")).await;
        cgroup.add(process.pid);
        running.push((process, cgroup));
    }
    let mut wrong = Vec::new();
    for (process, _cgroup) in &running {
        let line = w.wait_event("process_exited", process.pid);
        if line["oom_killed"] != true || line["signal"] != libc::SIGKILL {
            wrong.push(line);
        }
    }
    let log = w.stop();
    assert!(
        wrong.is_empty(),
        "{} of {ROUNDS} OOM kills not reported as such: {wrong:#?}\nlog:\n{log}",
        wrong.len()
    );
}
