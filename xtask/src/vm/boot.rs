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
    /// Boot `rootfs` under a throw-away qemu snapshot (kill-test), or write to it for real, so
    /// that a second boot finds what the first left (appliance-test's reboot).
    pub rootfs_snapshot: bool,
    pub payload: &'a Path,
    pub serial_log: PathBuf,
    pub budget: Duration,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `(key, value)` of every `VMTEST:key:value` line, in order.
    pub markers: Vec<(String, String)>,
    /// The detector tests' verdicts, from libtest's `test <name> ... ok|FAILED` lines.
    pub tests: Vec<TestVerdict>,
    /// libtest's summary line(s), `test result: ...`.
    pub test_results: Vec<String>,
    /// `SKIP: ...` lines of any test (a skip inside the VM proves nothing).
    pub skips: Vec<String>,
    /// The kill-test runner's results table (its markdown lines).
    pub kill_test_table: Vec<String>,
    /// The kill-test runner's JSON report, when it wrote one.
    pub report_json: Option<String>,
    /// The guest reached its power-off line.
    pub done: bool,
    /// Killed at the time budget.
    pub timed_out: bool,
    pub elapsed: Duration,
    /// Parser state: the test whose verdict is still to come (with `--nocapture` its output
    /// sits between `test <name> ... ` and `ok`/`FAILED`), and where it panicked.
    pending: Option<TestVerdict>,
}

/// One detector test.
#[derive(Debug, Clone, Default)]
pub struct TestVerdict {
    pub name: String,
    pub passed: bool,
    /// `panicked at <file:line>: <message>`, for a failed test.
    pub why: Option<String>,
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
        // The first marker can share a line with the firmware's last, unterminated output.
        let line = line.find("VMTEST:").map_or(line, |at| &line[at..]);
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
        let verdict = if let Some(test) = body.strip_prefix("test ")
            && let Some((name, verdict)) = test.rsplit_once(" ... ")
        {
            self.pending = Some(TestVerdict {
                name: name.to_owned(),
                ..TestVerdict::default()
            });
            verdict.trim()
        } else {
            body.trim()
        };
        if let Some(test) = self.pending.as_mut() {
            if let Some(why) = test.why.as_mut().filter(|w| w.ends_with(':')) {
                // The line after `panicked at <file:line>:` is the panic message.
                why.push(' ');
                why.push_str(body.trim());
            } else if let Some(at) = body.find("panicked at ") {
                test.why = Some(body[at..].to_owned());
            }
        }
        if matches!(verdict, "ok" | "FAILED")
            && let Some(mut test) = self.pending.take()
        {
            test.passed = verdict == "ok";
            self.tests.push(test);
        }
        if let Some(row) = line.strip_prefix("vm-kill-test| ")
            && row.starts_with('|')
        {
            self.kill_test_table.push(row.to_owned());
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
    // `-no-reboot`: a reboot of the guest ends qemu, and the caller boots it again if it wants.
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(boot.vmlinuz)
        .arg("-initrd")
        .arg(boot.initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"])
        .arg("-drive")
        .arg(drive(
            boot.rootfs,
            if boot.rootfs_snapshot {
                ",snapshot=on"
            } else {
                ""
            },
        ))
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
