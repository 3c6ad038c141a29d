//! `cargo xtask kill-test --vm`: the eBPF-dependent checks on another kernel, Debian 12's 6.1
//! cloud kernel, whose `sched_process_exit` tracepoint has no `group_dead` field, so the
//! watchdog must decide deaths by `signal->live` (docs/EBPF.md).
//!
//! Everything comes from Debian's packages and is cached under `target/vm/` (see [`assets`]).
//! Each run builds the binaries, packs them onto a payload disk, writes an initramfs that loads
//! the virtio modules in the order of their own `depends=` ([`modules`]), boots qemu without
//! KVM (TCG), and the guest (`tests/vm/guest-init.sh`) runs: the daemon until it logs its death
//! path, the detector's privileged tests (both paths), and the kill-test scenarios (all by
//! default). `cargo xtask test` runs it as root, so CI does.
//! The host parses the serial console and fails when any step failed, skipped or timed out.
//! Results: `target/vm/serial.log`, `target/vm/summary.txt`, `target/vm/kill-test-report.json`.

// `assets`, `boot` and `image` are shared with `appliance-test`, which boots the same VM.
pub(crate) mod assets;
pub(crate) mod boot;
pub(crate) mod image;
mod modules;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{build_ebpf, paths, setup};

/// How many kill-test scenarios there are, for the guest's time budget when all run (the
/// default; `kill-test --list` names them).
const SCENARIOS: usize = 10;

/// What `kill-test --vm` was asked for.
#[derive(Debug)]
pub struct VmArgs {
    pub runs: usize,
    pub only: Vec<u8>,
    pub release: bool,
}

/// Builds, boots, reports; fails when anything in the guest failed.
pub fn run(args: &VmArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "kill-test --vm needs root (apt-get, debootstrap, mkfs.ext4 -d with root-owned files)"
        );
    }
    let root = paths::workspace_root();
    let vm_dir = root.join("target").join("vm");
    let scripts = root.join("tests").join("vm");
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    assets::ensure_host_tools()?;
    let kernel = assets::ensure_kernel(&vm_dir.join("kernel"))?;
    let busybox = assets::ensure_busybox(&vm_dir.join("busybox"))?;
    let rootfs = assets::ensure_rootfs_image(&vm_dir)?;
    println!(
        "vm: kernel {} ({})",
        kernel.version,
        kernel.vmlinuz.display()
    );

    let (binaries, plan) = guest_plan(args, &root)?;
    let payload = image::payload(&vm_dir, &scripts, &kernel, &binaries, &plan)?;
    let initramfs = image::initramfs(&vm_dir, &scripts, &busybox, &kernel)?;

    println!(
        "vm: booting (TCG, 2 CPUs, 2 GiB; at most {} s); serial output follows",
        plan.budget_s()
    );
    let outcome = boot::run(&boot::Boot {
        vmlinuz: &kernel.vmlinuz,
        initramfs: &initramfs,
        rootfs: &rootfs,
        rootfs_snapshot: true,
        payload: &payload,
        serial_log: vm_dir.join("serial.log"),
        budget: Duration::from_secs(plan.budget_s()),
    })?;
    if let Some(json) = &outcome.report_json {
        let path = vm_dir.join("kill-test-report.json");
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    let (summary, failures) = summarize(&outcome);
    println!("{summary}");
    let path = vm_dir.join("summary.txt");
    std::fs::write(&path, &summary).with_context(|| format!("writing {}", path.display()))?;
    if failures > 0 {
        bail!(
            "kill-test --vm: {failures} problem(s) on the 6.1 kernel (summary above; full console in {})",
            vm_dir.join("serial.log").display()
        );
    }
    Ok(())
}

/// The binaries the guest runs (built for the host's profile) and its plan.
fn guest_plan(args: &VmArgs, root: &Path) -> Result<(Vec<PathBuf>, image::GuestPlan)> {
    let profile = if args.release { "release" } else { "debug" };
    let profile_dir = root.join("target").join(profile);
    let detector_test = build(args.release)?;
    let names = [
        "vma-watchdog",
        "migratekit",
        "ebpf-test-child",
        "oma",
        "kill-test",
    ];
    let mut binaries: Vec<PathBuf> = names.iter().map(|b| profile_dir.join(b)).collect();
    binaries.push(detector_test.clone());
    // Empty: every scenario.
    let only: Vec<String> = args.only.iter().map(u8::to_string).collect();
    let scenarios = if only.is_empty() {
        SCENARIOS
    } else {
        only.len()
    };
    let plan = image::GuestPlan {
        host_profile_dir: profile_dir,
        detector_test: file_name(&detector_test)?,
        kill_test_runs: args.runs,
        // Against hangs, not slowness: well over what each step took in the VM here with the
        // host loaded (the detector tests 71-158 s, a scenario run 5-30 s, the load scenario's
        // 50-190 s, for which each run gets 180 s more), so a slow host still finishes.
        watchdog_timeout_s: 120,
        detector_timeout_s: 400,
        kill_test_timeout_s: 90 + args.runs as u64 * (90 * scenarios as u64 + 180),
        kill_test_only: only.join(","),
    };
    Ok((binaries, plan))
}

fn file_name(path: &Path) -> Result<String> {
    Ok(path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy()
        .into_owned())
}

/// Builds the eBPF object (if missing), the daemons, the stand-in, the runner and the
/// detector test binary; returns the latter's path (from cargo's JSON messages).
fn build(release: bool) -> Result<PathBuf> {
    if !paths::ebpf_object().exists() {
        build_ebpf::run().context("building the eBPF object the watchdog embeds")?;
    }
    setup::build_bins(release)?;
    let messages = setup::output(
        setup::cargo()
            .args([
                "test",
                "-p",
                "vma-watchdog",
                "--test",
                "ebpf_detector",
                "--no-run",
            ])
            .args(["--message-format=json"])
            .args(release.then_some("--release")),
    )
    .context("building the eBPF detector's tests")?;
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == "ebpf_detector")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no ebpf_detector test executable")
}

/// The report printed at the end and kept in `target/vm/summary.txt`, and its problem count.
fn summarize(outcome: &boot::Outcome) -> (String, usize) {
    let mut s =
        String::from("\n== kill-test --vm: Debian 12 6.1 cloud kernel under qemu (TCG) ==\n");
    let mut problems = summarize_steps(&mut s, outcome);
    problems += summarize_tests(&mut s, outcome);
    let _ = writeln!(s, "kill-test scenarios:");
    for row in &outcome.kill_test_table {
        let _ = writeln!(s, "  {row}");
    }
    let report = match outcome.report_json {
        Some(_) => "target/vm/kill-test-report.json",
        None => "none",
    };
    let _ = writeln!(s, "kill-test report:     {report}");
    if outcome.timed_out {
        problems += 1;
        let _ = writeln!(s, "TIMED OUT: the VM was killed at its time budget");
    } else if !outcome.done {
        problems += 1;
        let _ = writeln!(
            s,
            "the guest stopped before its last step (see the console above)"
        );
    }
    let elapsed = outcome.elapsed.as_secs_f64();
    let _ = writeln!(s, "elapsed:              {elapsed:.0} s");
    let verdict = if problems == 0 { "PASS" } else { "FAIL" };
    let _ = writeln!(s, "verdict:              {verdict}");
    (s, problems)
}

/// The guest's facts and its steps; returns the problems among them (fatal lines, failed
/// steps).
fn summarize_steps(s: &mut String, outcome: &boot::Outcome) -> usize {
    let mut problems = 0;
    let show = |key: &str| outcome.marker(key).unwrap_or("(not reported)").to_owned();
    let _ = writeln!(s, "kernel:               {}", show("kernel"));
    let _ = writeln!(s, "group_dead field:     {}", show("group_dead"));
    let _ = writeln!(s, "BTF:                  {}", show("btf"));
    let _ = writeln!(s, "watchdog death path:  {}", show("exit_mode"));
    for (key, value) in &outcome.markers {
        if key == "fatal" {
            problems += 1;
            let _ = writeln!(s, "FATAL:                {value}");
        }
        if key == "step" {
            let failed = !value.contains(":rc=0:");
            problems += usize::from(failed);
            let verdict = if failed { "FAILED" } else { "ok" };
            let _ = writeln!(s, "step {value:<40} {verdict}");
        }
    }
    problems
}

/// The detector tests and the skips; returns the problems (failed tests, or none ran).
fn summarize_tests(s: &mut String, outcome: &boot::Outcome) -> usize {
    let passed = outcome.tests.iter().filter(|t| t.passed).count();
    let failed = outcome.tests.len() - passed;
    let _ = writeln!(s, "detector tests:       {passed} passed, {failed} failed");
    for test in &outcome.tests {
        let verdict = if test.passed { "ok" } else { "FAILED" };
        let why = test.why.as_deref().filter(|_| !test.passed).unwrap_or("");
        let _ = writeln!(s, "  {verdict:<6} {} {why}", test.name);
    }
    for line in &outcome.test_results {
        let _ = writeln!(s, "  {line}");
    }
    let mut problems = failed;
    if outcome.tests.is_empty() {
        problems += 1;
        let _ = writeln!(s, "  no detector test ran");
    }
    // Not counted as problems: a detector test for the group_dead path may rightly skip on a
    // kernel without that field. A missing BTF or tracefs fails the watchdog step instead.
    if !outcome.skips.is_empty() {
        let _ = writeln!(s, "skipped:              {}", outcome.skips.len());
        for skip in &outcome.skips {
            let _ = writeln!(s, "  {skip}");
        }
    }
    problems
}
