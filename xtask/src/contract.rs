//! `cargo xtask contract`: the REST contract of both daemons, checked by a fuzzer no one here
//! wrote. Schemathesis (pinned, from PyPI, in a virtual environment under `target/`) reads the
//! committed documents (`docs/openapi/oma.json`, `docs/openapi/vma-watchdog.json`) and runs
//! every check (`--checks all`: server errors, undocumented statuses, response schemas,
//! schema-valid requests refused, schema-violating requests accepted, ...) in every phase,
//! stateful links included, against the real `oma` and `vma-watchdog` binaries started on
//! loopback. Any failure fails the run; the counts of cases are printed.
//!
//! Then a client generated from each document by openapi-python-client (pinned, same
//! environment) drives a job through each daemon (`xtask/contract/drive_jobs.py`): on the OMA
//! create, read, audit, cancel (the OMA starting and stopping it on the real watchdog); on the
//! watchdog start, read, stop.
//!
//! The watchdog runs with the procfs detector and launches the stand-in migratekit, so this
//! needs no privilege. Everything lives in `target/contract/` (databases, state, tokens, logs
//! and each run's full Schemathesis output).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run::{Daemon, spawn, token_file, wait_healthy};
use crate::{paths, setup};

/// The releases the contract tests are written against, from PyPI.
const PINS: [&str; 2] = ["schemathesis==4.32.5", "openapi-python-client==0.29.1"];

#[derive(Debug, clap::Args)]
pub struct ContractArgs {
    /// Cases generated per operation and phase (Schemathesis' `--max-examples`).
    #[arg(long, default_value_t = 50)]
    max_examples: u32,
    /// Seed of the generated data: fixed by default so that CI repeats the same cases; pass
    /// another to explore further.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl ContractArgs {
    /// What `cargo xtask test` runs.
    pub fn for_test_suite() -> Self {
        Self {
            max_examples: 50,
            seed: 1,
        }
    }
}

/// The virtual environment of the contract tools.
fn venv() -> PathBuf {
    paths::workspace_root().join("target").join("openapi-venv")
}

/// The version of `package` installed in the virtual environment, if any.
fn installed(package: &str) -> Option<String> {
    let python = venv().join("bin").join("python");
    let code = format!("import importlib.metadata as m; print(m.version('{package}'))");
    setup::output(Command::new(python).args(["-c", &code]))
        .ok()
        .map(|v| v.trim().to_owned())
}

/// Installs Python's venv module (Debian's `python3-venv`), Schemathesis and
/// openapi-python-client, pinned, into `target/openapi-venv`; returns whether it installed
/// anything.
pub fn ensure_tools() -> Result<bool> {
    let present = PINS.iter().all(|pin| {
        pin.split_once("==")
            .is_some_and(|(name, version)| installed(name).as_deref() == Some(version))
    });
    if present {
        println!(
            "setup: {} in {}: present",
            PINS.join(", "),
            venv().display()
        );
        return Ok(false);
    }
    let has_venv = || {
        Command::new("python3")
            .args(["-c", "import ensurepip, venv"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_venv() {
        setup::install_debian_packages("setup", &["python3", "python3-venv"])?;
    }
    println!(
        "setup: {}: installing into {}",
        PINS.join(", "),
        venv().display()
    );
    setup::status(Command::new("python3").args(["-m", "venv"]).arg(venv()))
        .context("creating the virtual environment for Schemathesis")?;
    setup::status(
        Command::new(venv().join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PINS),
    )
    .context(
        "installing Schemathesis and openapi-python-client from PyPI; check that pypi.org is \
         reachable",
    )?;
    Ok(true)
}

pub fn run(args: &ContractArgs) -> Result<()> {
    ensure_tools()?;
    setup::build_bins(false)?;
    let root = paths::workspace_root();
    let dir = root.join("target").join("contract");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bin = root.join("target").join("debug");
    let token = fs::read_to_string(token_file(&dir, "api.token")?)?;
    let mut counts = Vec::new();
    {
        let (oma, addr) = start_oma(&bin, &dir)?;
        counts.push(schemathesis(args, &dir, "oma", &addr, &token)?);
        drop(oma);
    }
    {
        let (watchdog, addr) = start_watchdog(&bin, &dir, &Jobs::Fuzzed)?;
        counts.push(schemathesis(args, &dir, "vma-watchdog", &addr, &token)?);
        drop(watchdog);
    }
    for (name, line) in counts {
        println!("contract: {name}: {line}");
    }
    generated_clients(&bin, &dir)
}

/// Generates a Python client from each committed document and drives a job through each
/// daemon with it, the two daemons joined as in production (the OMA starts and stops its job
/// on the watchdog, which reports the death back).
fn generated_clients(bin: &Path, dir: &Path) -> Result<()> {
    let clients = dir.join("clients");
    for (name, package) in [("oma", "oma_client"), ("vma-watchdog", "vma_client")] {
        let document = paths::workspace_root()
            .join("docs")
            .join("openapi")
            .join(format!("{name}.json"));
        setup::output(
            Command::new(venv().join("bin").join("openapi-python-client"))
                .args(["generate", "--meta", "none", "--overwrite"])
                .arg("--path")
                .arg(&document)
                .arg("--output-path")
                .arg(clients.join(package))
                .env("PATH", venv_path()?),
        )
        .with_context(|| format!("generating a Python client from {}", document.display()))?;
    }
    let jobs = dir.join("jobs-clients");
    let (oma, oma_addr) = start_oma(bin, &jobs)?;
    let (watchdog, vma_addr) = start_watchdog(bin, &jobs, &Jobs::Driven { oma: &oma_addr })?;
    let drive = |args: &[&std::ffi::OsStr]| {
        setup::status(
            Command::new(venv().join("bin").join("python"))
                .arg(paths::workspace_root().join("xtask/contract/drive_jobs.py"))
                .args(args),
        )
    };
    let (oma_url, vma_url) = (format!("http://{oma_addr}"), format!("http://{vma_addr}"));
    drive(&[
        "oma".as_ref(),
        clients.as_os_str(),
        oma_url.as_ref(),
        vma_url.as_ref(),
        jobs.join("api.token").as_os_str(),
        jobs.join("events.token").as_os_str(),
    ])
    .context("the OMA's generated client could not drive a job; its message above says where")?;
    drive(&[
        "watchdog".as_ref(),
        clients.as_os_str(),
        vma_url.as_ref(),
        jobs.join("api.token").as_os_str(),
    ])
    .context(
        "the watchdog's generated client could not drive a job; its message above says where",
    )?;
    drop(watchdog);
    drop(oma);
    Ok(())
}

/// `PATH` with the virtual environment first (openapi-python-client runs `ruff` from it).
fn venv_path() -> Result<std::ffi::OsString> {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(venv().join("bin")).chain(std::env::split_paths(&rest)))
        .context("building PATH for openapi-python-client")
}

/// A loopback address no one listens on now.
fn free_addr() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.to_string())
}

/// The OMA on SQLite with the operator token; calls to VMAs (the fuzzer registers VMAs at
/// made-up URLs) give up after a second.
fn start_oma(bin: &Path, dir: &Path) -> Result<(Daemon, String)> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    token_file(dir, "api.token")?;
    let addr = free_addr()?;
    let oma = spawn(
        "oma",
        dir,
        Command::new(bin.join("oma"))
            .args(["--listen", &addr])
            .arg("--database")
            .arg(dir.join("oma.db"))
            .arg("--operator-token-file")
            .arg(dir.join("api.token"))
            .arg("--vma-api-token-file")
            .arg(dir.join("api.token"))
            .args(["--vma-timeout-secs", "1"]),
    )?;
    wait_healthy(&oma, &addr)?;
    Ok((oma, addr))
}

/// What the watchdog's jobs are for.
enum Jobs<'a> {
    /// Schemathesis' starts: each a real stand-in migratekit that ends after 3 s, so that the
    /// many the fuzzer starts do not pile up; no OMA.
    Fuzzed,
    /// The generated clients' jobs: they run until stopped (a minute at most), and deaths go
    /// to the OMA at this address as VMA `local` with the token `events.token`.
    Driven { oma: &'a str },
}

/// The watchdog with the procfs detector, launching the stand-in migratekit, without systemd
/// and at normal priority, so that it needs no privilege. The OMA presents the same token as
/// the operators (`api.token`).
fn start_watchdog(bin: &Path, dir: &Path, jobs: &Jobs) -> Result<(Daemon, String)> {
    let addr = free_addr()?;
    let mut cmd = Command::new(bin.join("vma-watchdog"));
    cmd.arg("--state-dir")
        .arg(dir.join("vma"))
        .args(["--listen", &addr, "--detector", "procfs", "--nice", "0"])
        .arg("--api-token-file")
        .arg(dir.join("api.token"))
        .arg("--launch-no-systemd")
        .arg("--launch-program")
        .arg(bin.join("migratekit"))
        .arg("--launch-log-dir")
        .arg(dir.join("jobs"));
    let seconds = match jobs {
        Jobs::Fuzzed => "3",
        Jobs::Driven { oma } => {
            cmd.args(["--oma-url", &format!("http://{oma}"), "--vma-id", "local"])
                .arg("--oma-token-file")
                .arg(token_file(dir, "events.token")?);
            "60"
        }
    };
    for arg in [
        "migrate",
        "--job-id",
        "{job_id}",
        "--standin-run-for",
        seconds,
    ] {
        cmd.args(["--launch-arg", arg]);
    }
    let watchdog = spawn("vma-watchdog", dir, &mut cmd)?;
    wait_healthy(&watchdog, &addr)?;
    Ok((watchdog, addr))
}

/// Runs Schemathesis on the committed document `docs/openapi/<name>.json` against `addr`;
/// returns the line that counts the cases. Its whole output goes to
/// `target/contract/<name>-schemathesis.txt`, and to the terminal when it fails.
fn schemathesis(
    args: &ContractArgs,
    dir: &Path,
    name: &'static str,
    addr: &str,
    token: &str,
) -> Result<(&'static str, String)> {
    let document = paths::workspace_root()
        .join("docs")
        .join("openapi")
        .join(format!("{name}.json"));
    println!("contract: {name}: Schemathesis on {}", document.display());
    let out = Command::new(venv().join("bin").join("st"))
        .arg("run")
        .arg(&document)
        .args(["--url", &format!("http://{addr}")])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", token.trim()),
        ])
        .args(["--checks", "all", "--no-color"])
        .args(["--max-examples", &args.max_examples.to_string()])
        .args(["--seed", &args.seed.to_string()])
        // Its cache (`.schemathesis/`) goes under target/, not into the source tree.
        .current_dir(dir)
        .output()
        .context("starting Schemathesis (run `cargo xtask setup`)")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let report = dir.join(format!("{name}-schemathesis.txt"));
    fs::write(&report, &text).with_context(|| format!("writing {}", report.display()))?;
    let cases = cases_line(&text).unwrap_or_else(|| "no count of cases found".into());
    if !out.status.success() {
        println!("{text}");
        bail!(
            "Schemathesis found the {name} API and its document (docs/openapi/{name}.json) \
             disagreeing: {cases}; the failures above say where (all of it in {}). Fix the \
             server or the document, and add a test of the fix",
            report.display()
        );
    }
    Ok((name, cases))
}

/// The counts Schemathesis prints under `Test cases:` ("1182 generated, 1182 passed").
fn cases_line(output: &str) -> Option<String> {
    let mut lines = output.lines();
    lines.find(|l| l.trim() == "Test cases:")?;
    lines.next().map(|l| l.trim().to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_count_of_cases_is_read_from_the_summary() {
        let out =
            "Warnings:\n  x\n\nTest cases:\n  626 generated, 626 passed, 8 skipped\n\nSeed: 2\n";
        assert_eq!(
            super::cases_line(out).as_deref(),
            Some("626 generated, 626 passed, 8 skipped")
        );
        assert_eq!(super::cases_line("nothing"), None);
    }
}
