//! `cargo xtask appliance-test`: both Debian packages installed on Debian 12 booted with systemd
//! as PID 1, under qemu on its own 6.1 cloud kernel, and checked at the OMA's API and in the
//! journal (`packaging/appliance-checks.sh` says which checks).
//!
//! The VM is the one of `kill-test --vm` (the same kernel, initramfs and cached root file system,
//! see [`crate::vm`]); only the payload differs: the packages (built with
//! `cargo xtask package --dev`, once at the crates' version and once more at a higher one for
//! the upgrade), the stand-in migratekit, the checks, and a stage 2
//! (`packaging/appliance-guest-init.sh`) that adds the checks' unit and execs systemd.
//! The checks reboot the VM once: qemu ends (`-no-reboot`) and the same disk, a copy of the
//! cached root file system, boots again.
//! Results: `target/vm/appliance-serial-{1,2}.log`, `target/vm/appliance-summary.txt`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::package::{self, PackageArgs};
use crate::vm::{assets, boot, image};
use crate::{paths, setup};

/// Against hangs, not slowness: the whole guest, boot to power-off (about 6 minutes here).
const BUDGET: Duration = Duration::from_secs(1500);

/// Flags of `cargo xtask appliance-test`.
#[derive(Debug, clap::Args)]
pub struct ApplianceArgs {}

/// Builds, boots, reports; fails when a check failed. Without root it says SKIP and succeeds.
pub fn run(_args: &ApplianceArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "SKIP: appliance-test needs root (apt-get, debootstrap, dpkg-deb and mkfs.ext4 -d with root-owned files); run it as root"
        );
        return Ok(());
    }
    let started = Instant::now();
    let root = paths::workspace_root();
    let vm_dir = root.join("target").join("vm");
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    assets::ensure_host_tools()?;
    let kernel = assets::ensure_kernel(&vm_dir.join("kernel"))?;
    let busybox = assets::ensure_busybox(&vm_dir.join("busybox"))?;
    let rootfs = assets::ensure_rootfs_image(&vm_dir)?;

    let payload = payload(&root, &vm_dir)?;
    let initramfs = image::initramfs(&vm_dir, &root.join("tests").join("vm"), &busybox, &kernel)?;
    // A copy the guest writes to for real (not a snapshot): the reboot check boots it twice.
    let disk = vm_dir.join("appliance-root.ext4");
    setup::status(
        std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&rootfs)
            .arg(&disk),
    )
    .with_context(|| format!("copying {} to {}", rootfs.display(), disk.display()))?;
    let boot = |n: usize| {
        println!(
            "appliance: boot {n}: Debian 12 ({}) with systemd as PID 1 (TCG; at most {} s)",
            kernel.version,
            BUDGET.as_secs()
        );
        boot::run(&boot::Boot {
            vmlinuz: &kernel.vmlinuz,
            initramfs: &initramfs,
            rootfs: &disk,
            rootfs_snapshot: false,
            payload: &payload,
            serial_log: vm_dir.join(format!("appliance-serial-{n}.log")),
            budget: BUDGET,
        })
    };
    let mut outcome = boot(1)?;
    // The guest asked for a reboot (`VMTEST:reboot`) and qemu (`-no-reboot`) ended: boot the
    // same disk again; the checks carry on from where they were.
    if !outcome.done && !outcome.timed_out && outcome.marker("reboot").is_some() {
        let second = boot(2)?;
        outcome.markers.extend(second.markers);
        outcome.done = second.done;
        outcome.timed_out = second.timed_out;
        outcome.elapsed += second.elapsed;
    }
    let _ = std::fs::remove_file(&disk);
    let (summary, problems) = summarize(&outcome, started.elapsed());
    println!("{summary}");
    let path = vm_dir.join("appliance-summary.txt");
    std::fs::write(&path, &summary).with_context(|| format!("writing {}", path.display()))?;
    if problems > 0 {
        bail!(
            "appliance-test: {problems} problem(s) (summary above; full console in {})",
            vm_dir.join("appliance-serial-<boot>.log").display()
        );
    }
    Ok(())
}

/// Builds both packages twice (the second time at a higher version, for the upgrade) and
/// writes `vm_dir/appliance.ext4`: `debs/`, `debs/upgrade/`, `bin/migratekit`, the checks and
/// the stage 2 as `guest-init.sh`.
fn payload(root: &Path, vm_dir: &Path) -> Result<PathBuf> {
    let stage = vm_dir.join("appliance");
    let _ = std::fs::remove_dir_all(&stage);
    let debs = package::run(&PackageArgs::for_appliance(stage.join("debs"), None))
        .context("building the packages the VM installs")?;
    let version = deb_version(&debs[0])?;
    let upgrade = format!("{version}+upgrade1");
    let upgraded = package::run(&PackageArgs::for_appliance(
        stage.join("upgrade"),
        Some(upgrade),
    ))
    .context("building the packages of the upgrade")?;
    // Only the watchdog's is upgraded; the OMA's stays as installed.
    let watchdog = upgraded
        .iter()
        .find(|d| file_name(d).starts_with("vma-watchdog_"))
        .context("no vma-watchdog package among the upgrade's")?;
    let upgrade_dir = stage.join("debs/upgrade");
    std::fs::create_dir_all(&upgrade_dir)
        .with_context(|| format!("creating {}", upgrade_dir.display()))?;
    let mut bytes = image::copy(watchdog, &upgrade_dir.join(file_name(watchdog)))?;
    std::fs::remove_dir_all(stage.join("upgrade"))
        .context("removing the unused upgrade packages")?;

    // `package --dev` built every binary of the workspace, the stand-in among them.
    std::fs::create_dir_all(stage.join("bin")).context("creating the payload's bin/")?;
    bytes += image::copy(
        &root.join("target/debug/migratekit"),
        &stage.join("bin/migratekit"),
    )?;
    let packaging = root.join("packaging");
    for (from, to) in [
        ("appliance-checks.sh", "appliance-checks.sh"),
        ("appliance-guest-init.sh", "guest-init.sh"),
    ] {
        image::copy(&packaging.join(from), &stage.join(to))?;
    }
    for deb in &debs {
        bytes += std::fs::metadata(deb)
            .with_context(|| format!("reading {}", deb.display()))?
            .len();
    }
    let image = vm_dir.join("appliance.ext4");
    // ext4 metadata and the journal need room beyond the files themselves.
    assets::make_ext4(&stage, &image, "vmpayload", bytes / (1 << 20) * 5 / 4 + 64)?;
    Ok(image)
}

/// `0.1.0-1` of `target/.../vma-watchdog_0.1.0-1_amd64.deb`.
fn deb_version(deb: &Path) -> Result<String> {
    file_name(deb)
        .split('_')
        .nth(1)
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "{} is not named <package>_<version>_<arch>.deb",
                deb.display()
            )
        })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The report printed at the end and kept in `target/vm/appliance-summary.txt`, and its
/// problem count (a failed check, a fatal line, no check at all, no power-off line).
fn summarize(outcome: &boot::Outcome, wall: Duration) -> (String, usize) {
    let mut s = String::from(
        "\n== appliance-test: Debian 12, systemd as PID 1, both packages, qemu (TCG) ==\n",
    );
    let mut problems = 0;
    let mut checks = 0;
    for (key, value) in &outcome.markers {
        match key.as_str() {
            "check" => {
                checks += 1;
                let failed = value.contains(":FAILED");
                problems += usize::from(failed);
                let (name, verdict) = value.split_once(':').unwrap_or((value, ""));
                let _ = writeln!(s, "check {name:<12} {verdict}");
            }
            "fatal" => {
                problems += 1;
                let _ = writeln!(s, "FATAL: {value}");
            }
            "done" => {}
            _ => {
                let _ = writeln!(s, "{key:<13} {value}");
            }
        }
    }
    if checks == 0 {
        problems += 1;
        let _ = writeln!(s, "no check ran (see the console above)");
    }
    if outcome.timed_out {
        problems += 1;
        let _ = writeln!(s, "TIMED OUT: the VM was killed at its time budget");
    } else if !outcome.done {
        problems += 1;
        let _ = writeln!(s, "the guest stopped before its last check");
    }
    let _ = writeln!(s, "VM time       {:.0} s", outcome.elapsed.as_secs_f64());
    let _ = writeln!(
        s,
        "wall time     {:.0} s (packages, image, VM)",
        wall.as_secs_f64()
    );
    let verdict = if problems == 0 { "PASS" } else { "FAIL" };
    let _ = writeln!(s, "verdict       {verdict}");
    (s, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(markers: &[(&str, &str)], done: bool) -> boot::Outcome {
        let mut outcome = boot::Outcome::default();
        outcome.markers = markers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        outcome.done = done;
        outcome
    }

    #[test]
    fn every_failed_check_and_a_missing_end_are_problems() {
        let wall = Duration::from_secs(1);
        let passed = outcome(&[("check", "install:ok (3 s)"), ("done", "")], true);
        let (summary, problems) = summarize(&passed, wall);
        assert_eq!(problems, 0, "{summary}");
        assert!(summary.contains("verdict       PASS"));
        let failed = outcome(
            &[
                ("check", "install:ok (3 s)"),
                ("check", "kill9:FAILED (4 s)"),
                ("fatal", "initramfs: no disk"),
            ],
            false,
        );
        let (summary, problems) = summarize(&failed, wall);
        // The failed check, the fatal line, and no power-off line.
        assert_eq!(problems, 3, "{summary}");
        assert!(summary.contains("check kill9        FAILED (4 s)"));
        let (_, problems) = summarize(&outcome(&[], true), wall);
        assert_eq!(problems, 1, "no check ran");
    }

    #[test]
    fn the_version_comes_from_the_package_file_name() {
        let deb = Path::new("/x/vma-watchdog_0.1.0-1_amd64.deb");
        assert_eq!(deb_version(deb).unwrap(), "0.1.0-1");
        assert!(deb_version(Path::new("/x/odd.deb")).is_err());
    }
}
