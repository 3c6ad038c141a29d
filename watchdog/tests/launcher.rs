//! The launcher with real processes: registration before the program can run, nothing run
//! when registration fails, and survival of the launching process's death.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{ProcessIdentity, StartJobRequest};
use vma_watchdog::launcher::{
    LaunchError, Launcher, LauncherConfig, SystemdMode, proc_comm, proc_identity,
};

fn config(program: &str, args: &[&str]) -> LauncherConfig {
    let mut config = LauncherConfig::new(program);
    config.args = args.iter().map(|a| a.to_string()).collect();
    config.systemd = SystemdMode::Never;
    config
}

#[tokio::test]
async fn a_program_that_exits_at_once_is_registered_before_it_runs() {
    let launcher = Launcher::new(config("/bin/true", &[]));
    let seen: Arc<Mutex<Option<(ProcessIdentity, String)>>> = Arc::default();
    let record = Arc::clone(&seen);
    let (launched, registered) = launcher
        .launch(
            &api::JobId::parse("job-quick").unwrap(),
            &StartJobRequest::default(),
            move |process| {
                // At this point the child exists but has not exec'd: its name is still ours.
                let comm = proc_comm(process.pid).expect("the process exists while registering");
                assert_eq!(proc_identity(process.pid).unwrap(), process);
                *record.lock().unwrap() = Some((process, comm));
                Ok::<_, std::io::Error>(process)
            },
        )
        .await
        .unwrap();
    let exit = launched.wait_for_exit().unwrap();
    assert_eq!((exit.code, exit.signal), (Some(0), None));
    // Not reaped yet: still a zombie whose status a detector could read.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", launched.process.pid)).unwrap();
    assert_eq!(stat.rsplit_once(") ").unwrap().1.chars().next(), Some('Z'));
    let pid = launched.process.pid;
    let registered_at_launch = launched.process;
    assert!(launched.reap().expect("our child").unwrap().success());
    assert!(proc_identity(pid).is_err(), "reaped");
    let (process, comm) = seen.lock().unwrap().clone().expect("registered");
    assert_eq!(process, registered_at_launch);
    assert_eq!(registered, registered_at_launch);
    assert_ne!(
        comm, "true",
        "registration must happen before the program runs"
    );
}

#[tokio::test]
async fn a_refused_registration_means_the_program_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let launcher = Launcher::new(config("/bin/sh", &["-c", "echo ran > {marker}"]));
    let mut request = StartJobRequest::default();
    request
        .parameters
        .insert("marker".into(), marker.display().to_string());
    let pid = Arc::new(Mutex::new(None));
    let seen_pid = Arc::clone(&pid);
    let result = launcher
        .launch(
            &api::JobId::parse("job-refused").unwrap(),
            &request,
            move |process: ProcessIdentity| {
                *seen_pid.lock().unwrap() = Some(process.pid);
                Err::<(), _>("registry is full")
            },
        )
        .await;
    assert!(
        matches!(result, Err(LaunchError::Registration("registry is full"))),
        "{result:?}"
    );
    let pid = pid.lock().unwrap().expect("registration was attempted");
    // The gate made the child exit; give a wrongly released one time to write the marker.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !marker.exists(),
        "the program ran although its registration failed"
    );
    assert!(proc_identity(pid).is_err() || proc_comm(pid).unwrap() != "sh");
}

#[tokio::test]
async fn the_password_never_appears_in_the_logged_argv() {
    let mut config = config(
        "/bin/sh",
        &[
            "-c",
            "exit 0",
            "sh",
            "--vmware-password",
            "{vmware_password}",
        ],
    );
    config.credentials.insert(
        "vc".into(),
        vma_watchdog::launcher::VmwareCredentials {
            endpoint: "vc".into(),
            username: "u".into(),
            password: vma_watchdog::secret::Secret::new("hunter2-secret"),
        },
    );
    let launcher = Launcher::new(config);
    let request = StartJobRequest {
        credentials: Some("vc".into()),
        ..Default::default()
    };
    let (launched, ()) = launcher
        .launch(&api::JobId::parse("job-pw").unwrap(), &request, |_| {
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap();
    let shown = format!("{:?} {:?}", launched.redacted_argv(), launched);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(launched.redacted_argv().contains(&"<redacted>".to_string()));
    launched.reap().expect("our child").unwrap();
}

const ROLE: &str = "VMALINK_LAUNCHER_ROLE";

/// Parent: runs this same test binary as the launcher, kills the launcher's whole process
/// group with SIGKILL, and checks that the launched process lives on.
/// Child (with `VMALINK_LAUNCHER_ROLE` set): launches `sleep`, prints its identity, waits.
#[test]
fn the_started_process_survives_the_death_of_the_launcher() {
    if std::env::var_os(ROLE).is_some() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let launcher = Launcher::new(config("/bin/sleep", &["60"]));
            let (launched, ()) = launcher
                .launch(
                    &api::JobId::parse("job-survivor").unwrap(),
                    &StartJobRequest::default(),
                    |_| Ok::<_, std::io::Error>(()),
                )
                .await
                .unwrap();
            println!(
                "LAUNCHED {} {}",
                launched.process.pid, launched.process.start_time
            );
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        return;
    }
    // Become the subreaper of what we start, so the orphaned sleep can be reaped here.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut launcher = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_started_process_survives_the_death_of_the_launcher",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "1")
        .process_group(0)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let launcher_pid = launcher.id() as i32;
    let mut lines = BufReader::new(launcher.stdout.take().unwrap()).lines();
    let line = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| Some(l.split_once("LAUNCHED ")?.1.to_owned()))
        .expect("the launcher reports what it started");
    // The harness prints "test name ... " before the line, without a newline.
    let mut fields = line.split_whitespace().map(|f| f.parse::<u64>().unwrap());
    let process = ProcessIdentity {
        pid: fields.next().unwrap() as u32,
        start_time: fields.next().unwrap(),
    };
    // SAFETY: signalling the launcher's own process group, then reaping it.
    unsafe { libc::kill(-launcher_pid, libc::SIGKILL) };
    launcher.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        proc_identity(process.pid).unwrap(),
        process,
        "the started process died with its launcher"
    );
    assert_eq!(proc_comm(process.pid).unwrap(), "sleep");
    // SAFETY: plain queries and signals on a pid we own through the subreaper.
    unsafe {
        assert_eq!(
            libc::getsid(process.pid as i32),
            process.pid as i32,
            "its own session"
        );
        assert_ne!(libc::getpgid(process.pid as i32), launcher_pid);
        libc::kill(process.pid as i32, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(process.pid as i32, &mut status, 0);
    }
}
