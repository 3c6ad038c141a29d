//! `cargo xtask run`: the README's run command. Brings up the whole system on this machine:
//! `oma` on an embedded SQLite database, `vma-watchdog` (eBPF when it can load, else the
//! procfs fallback), the local VMA registered with the OMA, and a demo replication job run by
//! the stand-in migratekit, whose progress it prints until the job ends.
//!
//! Everything lives in `target/demo/` (database, watchdog state, tokens, logs). The daemons
//! keep running after the demo job until Ctrl-C, unless `--exit-when-done` is given.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{build_ebpf, paths, setup};

/// Where the OMA listens (its default).
const OMA_ADDR: &str = "127.0.0.1:8082";
/// Where the watchdog listens (its default: migratekit posts progress there).
const VMA_ADDR: &str = "127.0.0.1:8081";
/// The demo VMA's id at the OMA.
const VMA_ID: &str = "local";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Seconds the demo migratekit copies before it reports 100 % and exits 0.
    #[arg(long, default_value_t = 30)]
    demo_seconds: u32,
    /// Stop both daemons once the demo job has ended (exit status 0 only if it completed).
    #[arg(long)]
    exit_when_done: bool,
    /// Keep the database and watchdog state of an earlier run instead of starting afresh.
    #[arg(long)]
    keep_state: bool,
}

impl RunArgs {
    /// What `cargo xtask test` runs to prove the README's run command: a short demo job, then
    /// both daemons stopped, failing unless the job completed.
    pub fn for_test_suite() -> Self {
        Self {
            demo_seconds: 5,
            exit_when_done: true,
            keep_state: false,
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// A daemon started by the demo (or the contract tests); stopped with SIGTERM (then SIGKILL)
/// when dropped.
pub(crate) struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; the worst case is ESRCH.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                println!("run: {} stopped", self.name);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        println!("run: {} did not stop within 10 s and was killed", self.name);
    }
}

/// Where the demo keeps its binaries, state and tokens.
struct Demo {
    bin: PathBuf,
    dir: PathBuf,
    operator: PathBuf,
    vma_api: PathBuf,
    vma_events: PathBuf,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let demo = prepare(args)?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let oma = start_oma(&demo)?;
    let watchdog = start_watchdog(&demo, args.demo_seconds)?;
    let cli = || {
        let mut cmd = Command::new(demo.bin.join("job-recovery"));
        cmd.args(["--oma-url", &format!("http://{OMA_ADDR}")])
            .arg("--token-file")
            .arg(&demo.operator);
        cmd
    };
    let job_id = create_demo_job(&demo, &cli)?;
    let final_status = follow_job(&cli, &job_id)?;
    let _ = setup::status(cli().arg("status"));
    if args.exit_when_done {
        drop(watchdog);
        drop(oma);
        return match final_status.as_deref() {
            Some("completed") => Ok(()),
            Some(other) => bail!("the demo job ended `{other}`; see target/demo/*.log"),
            None => bail!("interrupted before the demo job ended"),
        };
    }
    println!(
        "run: the system keeps running (OMA http://{OMA_ADDR}, watchdog http://{VMA_ADDR}); Ctrl-C stops it"
    );
    println!(
        "run: try `target/debug/job-recovery --token-file {} status`",
        demo.operator.display()
    );
    while !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Sets up the toolchain, builds the binaries and the eBPF object, and clears the demo's
/// state (unless kept) with fresh tokens.
fn prepare(args: &RunArgs) -> Result<Demo> {
    setup::run().context("setting up the toolchain")?;
    build_ebpf::run().context("building the eBPF object the watchdog embeds")?;
    let root = paths::workspace_root();
    setup::build_bins(false)?;
    let dir = root.join("target").join("demo");
    if !args.keep_state && dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Demo {
        bin: root.join("target").join("debug"),
        operator: token_file(&dir, "operator.token")?,
        vma_api: token_file(&dir, "vma-api.token")?,
        vma_events: token_file(&dir, "vma-events.token")?,
        dir,
    })
}

/// The OMA on an embedded SQLite database, polling every 2 s so the demo's progress moves.
fn start_oma(demo: &Demo) -> Result<Daemon> {
    let oma = spawn(
        "oma",
        &demo.dir,
        Command::new(demo.bin.join("oma"))
            .args(["--listen", OMA_ADDR])
            .arg("--database")
            .arg(demo.dir.join("oma.db"))
            .arg("--operator-token-file")
            .arg(&demo.operator)
            .arg("--vma-api-token-file")
            .arg(&demo.vma_api)
            .args([
                "--poll-interval-secs",
                "2",
                "--recovery-interval-secs",
                "30",
            ]),
    )?;
    wait_healthy(&oma, OMA_ADDR)?;
    Ok(oma)
}

/// The watchdog, delivering to the demo's OMA and launching the stand-in migratekit, which
/// copies 10 GiB in `seconds`.
fn start_watchdog(demo: &Demo, seconds: u32) -> Result<Daemon> {
    const BYTES: u64 = 10_737_418_240;
    let rate = (BYTES / u64::from(seconds.max(1))).to_string();
    let (seconds, bytes) = (seconds.to_string(), BYTES.to_string());
    let launch_args = [
        "migrate",
        "--job-id",
        "{job_id}",
        "--vmware-path",
        "{vm_path}",
        "--standin-run-for",
        &seconds,
        "--standin-total-bytes",
        &bytes,
        "--standin-rate",
        &rate,
    ];
    let mut cmd = Command::new(demo.bin.join("vma-watchdog"));
    cmd.arg("--state-dir")
        .arg(demo.dir.join("vma"))
        .arg("--api-token-file")
        .arg(&demo.vma_api)
        .args([
            "--oma-url",
            &format!("http://{OMA_ADDR}"),
            "--vma-id",
            VMA_ID,
        ])
        .arg("--oma-token-file")
        .arg(&demo.vma_events)
        .arg("--launch-program")
        .arg(demo.bin.join("migratekit"))
        .arg("--launch-log-dir")
        .arg(demo.dir.join("jobs"));
    for arg in launch_args {
        cmd.args(["--launch-arg", arg]);
    }
    let watchdog = spawn("vma-watchdog", &demo.dir, &mut cmd)?;
    wait_healthy(&watchdog, VMA_ADDR)?;
    Ok(watchdog)
}

/// Registers the local VMA with the OMA and creates the demo job; returns its id.
fn create_demo_job(demo: &Demo, cli: &dyn Fn() -> Command) -> Result<String> {
    setup::status(
        cli()
            .args(["register-vma", VMA_ID])
            .args(["--base-url", &format!("http://{VMA_ADDR}")])
            .arg("--vma-token-file")
            .arg(&demo.vma_events),
    )
    .context("registering the local VMA with the OMA")?;
    let created = setup::output(
        cli()
            .args(["--json", "create"])
            .args(["--vm-context", "ctx-demo", "--vm-name", "demo-vm"])
            .args(["--vma", VMA_ID, "--vm-path", "/Datacenter/vm/demo-vm"]),
    )
    .context("creating the demo job")?;
    let job: serde_json::Value =
        serde_json::from_str(&created).context("reading the created job from job-recovery")?;
    let job_id = job["id"]
        .as_str()
        .context("the created job has no id")?
        .to_owned();
    println!(
        "run: demo job {job_id} created; progress every 2 s (logs in {})",
        demo.dir.display()
    );
    Ok(job_id)
}

/// Prints the job's progress every 2 s until it leaves the active states (or Ctrl-C).
fn follow_job(cli: &dyn Fn() -> Command, job_id: &str) -> Result<Option<String>> {
    const FINAL: [&str; 3] = ["completed", "failed", "cancelled"];
    while !INTERRUPTED.load(Ordering::SeqCst) {
        let out = setup::output(cli().args(["--json", "jobs"]))?;
        let jobs: serde_json::Value = serde_json::from_str(&out).context("reading the job list")?;
        let job = jobs
            .as_array()
            .and_then(|all| all.iter().find(|j| j["id"] == job_id))
            .context("the demo job vanished from the job list")?;
        let status = job["status"].as_str().unwrap_or("?").to_owned();
        println!(
            "run: job {job_id}: {status:<12} {:>5.1} %  {} bytes",
            job["progress_percent"].as_f64().unwrap_or(0.0),
            job["bytes_transferred"].as_u64().unwrap_or(0)
        );
        if FINAL.contains(&status.as_str()) {
            return Ok(Some(status));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(None)
}

/// Writes a fresh random token (hex) readable by its owner only, unless one is there.
pub(crate) fn token_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.exists() {
        let mut bytes = [0u8; 24];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .context("reading /dev/urandom for a token")?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(path)
}

/// Starts a daemon with its output in `<dir>/<name>.log`.
pub(crate) fn spawn(name: &'static str, dir: &Path, cmd: &mut Command) -> Result<Daemon> {
    let log_path = dir.join(format!("{name}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the log file handle")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    println!(
        "run: started {name} (pid {}, log {})",
        child.id(),
        log_path.display()
    );
    Ok(Daemon {
        name,
        child,
        log: log_path,
    })
}

/// Waits until `GET /health` on `addr` answers 200, failing early when the daemon exits.
pub(crate) fn wait_healthy(daemon: &Daemon, addr: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if health_ok(addr) {
            println!("run: {} is healthy on {addr}", daemon.name);
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not become healthy on {addr} within 30 s; see {}",
                daemon.name,
                daemon.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One plain HTTP/1.1 `GET /health`; true on a 200 answer.
fn health_ok(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}
