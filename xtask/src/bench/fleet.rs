//! `cargo xtask bench fleet`: the real `oma` (release, shipped 5 s poll interval) against a
//! fleet of simulated VMAs (`oma/examples/fleet-bench/`), on SQLite or PostgreSQL, with the
//! old poll protocol (one request per job) and the new one (one feed request per VMA) side
//! by side: one fresh OMA and database per row. Prints a table; asserts nothing about time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{paths, postgres, setup};

mod table;

const OPERATOR_TOKEN: &str = "fleet-bench-operator-token-0001";

/// Database of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
    /// One run on each.
    Both,
}

/// Poll protocol of the OMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// One request per job (`--poll-protocol per-job`).
    Old,
    /// The batched feed, one request per VMA (`--poll-protocol auto`).
    New,
    /// Old, then new.
    Both,
}

/// Options of the fleet benchmark.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated VMAs.
    #[arg(long, default_value_t = 1000)]
    pub vmas: usize,
    /// Active jobs per VMA.
    #[arg(long, default_value_t = 20)]
    pub jobs_per_vma: usize,
    /// Database.
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    pub backend: Backend,
    /// Poll protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Both)]
    pub protocol: Protocol,
    /// OMAs sharing the database (only 1 in this build).
    #[arg(long, default_value_t = 1)]
    pub omas: usize,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Seconds of load before the window.
    #[arg(long, default_value_t = 15)]
    pub warmup_secs: u64,
    /// Deaths injected during the window.
    #[arg(long, default_value_t = 200)]
    pub deaths: usize,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    if args.omas != 1 {
        bail!(
            "--omas {}: this benchmark drives one OMA; several OMAs sharing the VMAs through leases are exercised by `cargo test -p oma --test ha` (three OMAs on PostgreSQL)",
            args.omas
        );
    }
    setup::status(
        setup::cargo()
            .args(["build", "--release", "--package", "oma", "--bin", "oma"])
            .args(["--example", "fleet-bench"]),
    )
    .context("building oma and fleet-bench")?;
    let release = target_dir().join("release");
    let oma = release.join("oma");
    let bench = release.join("examples").join("fleet-bench");
    let has_flag = setup::output(Command::new(&oma).arg("--help"))?.contains("--poll-protocol");
    let mut protocols = Vec::new();
    if matches!(args.protocol, Protocol::Old | Protocol::Both) {
        protocols.push("old");
    }
    if matches!(args.protocol, Protocol::New | Protocol::Both) {
        if has_flag {
            protocols.push("new");
        } else {
            println!("new protocol: not available in this build (oma has no --poll-protocol)");
        }
    }
    let backends: &[&str] = match args.backend {
        Backend::Sqlite => &["sqlite"],
        Backend::Postgres => &["postgres"],
        Backend::Both => &["sqlite", "postgres"],
    };
    raise_fd_limit();
    let mut rows = Vec::new();
    for backend in backends {
        for protocol in &protocols {
            println!(
                "== {} VMAs / {} jobs, {backend}, protocol {protocol}",
                args.vmas,
                args.vmas * args.jobs_per_vma
            );
            let run = Run {
                oma: &oma,
                bench: &bench,
                backend,
                protocol,
                has_flag,
                args,
            };
            let mut row = run.go()?;
            row["backend"] = (*backend).into();
            row["protocol"] = (*protocol).into();
            rows.push(row);
            // After every row, so that a later failure loses nothing.
            println!("\n{}", table::render(&rows));
        }
    }
    println!("{}", table::conditions());
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::workspace_root().join("target"))
}

/// The file limit up to its hard limit, inherited by the OMA and the bench.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One row: a fresh database and OMA, the bench against it.
struct Run<'a> {
    oma: &'a Path,
    bench: &'a Path,
    backend: &'a str,
    protocol: &'a str,
    has_flag: bool,
    args: &'a Args,
}

impl Run<'_> {
    fn go(&self) -> Result<Value> {
        let dir = tempfile::tempdir()?;
        let db = Database::create(self.backend, self.protocol, dir.path())?;
        let (port, metrics) = (free_port()?, free_port()?);
        let log = std::fs::File::create(dir.path().join("oma.log"))?;
        let mut cmd = Command::new(self.oma);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .args(["--database", &db.url, "--operator-token", OPERATOR_TOKEN])
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.has_flag {
            let value = if self.protocol == "old" {
                "per-job"
            } else {
                "auto"
            };
            cmd.args(["--poll-protocol", value]);
        }
        let oma = OmaProcess(cmd.spawn().context("starting oma")?);
        let out = Command::new(self.bench)
            .args(["--oma-url", &format!("http://127.0.0.1:{port}")])
            .args(["--metrics-url", &format!("http://127.0.0.1:{metrics}")])
            .args(["--oma-pid", &oma.0.id().to_string()])
            .args(["--vmas", &self.args.vmas.to_string()])
            .args(["--jobs-per-vma", &self.args.jobs_per_vma.to_string()])
            .args(["--secs", &self.args.secs.to_string()])
            .args(["--warmup-secs", &self.args.warmup_secs.to_string()])
            .args(["--deaths", &self.args.deaths.to_string()])
            .env("FLEET_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .stderr(Stdio::inherit())
            .output()
            .context("running fleet-bench")?;
        drop(oma);
        db.drop_database();
        if !out.status.success() {
            let tail = std::fs::read_to_string(dir.path().join("oma.log")).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(20).collect();
            bail!(
                "fleet-bench failed ({}); the OMA's last log lines:\n{}",
                out.status,
                tail.join("\n")
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("fleet-bench printed {line:?}"))
    }
}

/// The OMA, stopped with SIGTERM (SIGKILL after 10 s) when dropped.
struct OmaProcess(Child);

impl Drop for OmaProcess {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The run's database: a SQLite file, or a fresh database on the test PostgreSQL server.
struct Database {
    url: String,
    admin: Option<(String, String)>,
}

impl Database {
    fn create(backend: &str, protocol: &str, dir: &Path) -> Result<Self> {
        if backend == "sqlite" {
            let url = dir.join("oma.db").display().to_string();
            return Ok(Self { url, admin: None });
        }
        let admin = admin_url()?;
        let name = format!("fleet_{}_{protocol}", std::process::id());
        psql(&admin, &format!("DROP DATABASE IF EXISTS {name}"))?;
        psql(&admin, &format!("CREATE DATABASE {name}"))?;
        let (base, _) = admin
            .rsplit_once('/')
            .context("the PostgreSQL URL has no database")?;
        Ok(Self {
            url: format!("{base}/{name}"),
            admin: Some((admin, name)),
        })
    }

    fn drop_database(&self) {
        if let Some((admin, name)) = &self.admin
            && let Err(e) = psql(
                admin,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )
        {
            eprintln!("fleet: could not drop database {name}: {e:#}");
        }
    }
}

/// `OMA_TEST_POSTGRES_URL`, else a server already on the test port (the lead's, another
/// worktree's), else the test server started here.
fn admin_url() -> Result<String> {
    if let Ok(url) = std::env::var("OMA_TEST_POSTGRES_URL") {
        return Ok(url);
    }
    let running = "postgres://postgres@127.0.0.1:55432/postgres";
    if psql(running, "SELECT 1").is_ok() {
        return Ok(running.to_owned());
    }
    postgres::start_test_server()
}

fn psql(url: &str, sql: &str) -> Result<()> {
    setup::output(Command::new("psql").args([url, "-v", "ON_ERROR_STOP=1", "-qc", sql])).map(drop)
}
