//! Boots the VM under qemu's software emulation and collects what the guest printed on its
//! serial console: every line is echoed (prefixed `vm| ` unless the guest prefixed it itself)
//! and kept in `target/vm/serial.log`; the `VMTEST:` lines are parsed into a [`Outcome`].

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The files qemu boots.
#[derive(Debug)]
pub struct Boot<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub rootfs: &'a Path,
    pub payload: &'a Path,
    pub serial_log: PathBuf,
    pub budget: Duration,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `(key, value)` of every `VMTEST:key:value` line, in order.
    pub markers: Vec<(String, String)>,
    /// libtest's `test <name> ... ok|FAILED` lines of the detector tests: `(name, passed)`.
    pub tests: Vec<(String, bool)>,
    /// libtest's summary line(s), `test result: ...`.
    pub test_results: Vec<String>,
    /// `SKIP: ...` lines of any test (a skip inside the VM proves nothing).
    pub skips: Vec<String>,
    /// The kill-test runner's JSON report, when it wrote one.
    pub report_json: Option<String>,
    /// The guest reached its power-off line.
    pub done: bool,
    /// Killed at the time budget.
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Outcome {
    /// The value of the first `VMTEST:key:...` line.
    pub fn marker(&self, key: &str) -> Option<&str> {
        self.markers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn take(&mut self, line: &str, json: &mut Option<String>) {
        if let Some(buf) = json.as_mut() {
            if line == "VMTEST:report-json-end" {
                self.report_json = json.take();
            } else {
                buf.push_str(line);
                buf.push('\n');
            }
            return;
        }
        if line == "VMTEST:report-json-begin" {
            *json = Some(String::new());
            return;
        }
        if let Some(rest) = line.strip_prefix("VMTEST:") {
            if rest == "done" {
                self.done = true;
            }
            let (key, value) = rest.split_once(':').unwrap_or((rest, ""));
            self.markers.push((key.to_owned(), value.to_owned()));
            return;
        }
        let body = line.strip_prefix("vm-detector| ").unwrap_or(line);
        if let Some(test) = body.strip_prefix("test ")
            && let Some((name, verdict)) = test.rsplit_once(" ... ")
        {
            match verdict.trim() {
                "ok" => self.tests.push((name.to_owned(), true)),
                "FAILED" => self.tests.push((name.to_owned(), false)),
                _ => {}
            }
        }
        if body.starts_with("test result:") {
            self.test_results.push(body.to_owned());
        }
        if let Some(i) = line.find("SKIP:") {
            self.skips.push(line[i..].to_owned());
        }
    }
}

/// Runs qemu until the guest powers off or the budget is spent.
pub fn run(boot: &Boot<'_>) -> Result<Outcome> {
    let drive =
        |path: &Path, extra: &str| format!("file={},if=virtio,format=raw{extra}", path.display());
    let mut cmd = Command::new("qemu-system-x86_64");
    // No -enable-kvm: /dev/kvm here is a nested mode in which Debian's kernel dies early in
    // boot; TCG works (docs/RELIABILITY.md). `snapshot=on` keeps the cached root image clean.
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(boot.vmlinuz)
        .arg("-initrd")
        .arg(boot.initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .arg("-drive")
        .arg(drive(boot.rootfs, ",snapshot=on"))
        .arg("-drive")
        .arg(drive(boot.payload, ",readonly=on"))
        .args(["-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = std::fs::File::create(&boot.serial_log)
        .with_context(|| format!("creating {}", boot.serial_log.display()))?;
    let mut outcome = Outcome::default();
    let mut json = None;
    loop {
        let left = boot.budget.saturating_sub(started.elapsed());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                writeln!(log, "{line}").context("writing the serial log")?;
                if line.starts_with("vm-") || line.starts_with("VMTEST:") {
                    println!("{line}");
                } else {
                    println!("vm| {line}");
                }
                outcome.take(&line, &mut json);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                outcome.timed_out = true;
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let _ = child.wait();
    let _ = reader.join();
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}
