//! What the VM is made of, all from Debian's packages and cached under `target/vm/`: the host
//! tools (qemu, debootstrap, mkfs.ext4), Debian 12's 6.1 cloud kernel with its modules,
//! busybox for the initramfs, and the bookworm root file system as an ext4 image. Every step
//! checks its result first, so a second run downloads and builds nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup;

/// The meta-package whose dependency names the current 6.1 cloud kernel of Debian 12.
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// Packages the guest's root file system gets on top of `--variant=minbase`: `ip` (loopback,
/// the partition scenario's veth link and namespaces), `ps`/`pgrep`, `insmod`, `curl` (the
/// trust scenario's forged progress, posted as another user; the appliance checks' API calls),
/// and for `appliance-test`, which boots the same image with systemd as PID 1: `systemd`,
/// `systemd-sysv`, `dbus`, `adduser` (the oma package's postinst) and `jq`.
const ROOTFS_PACKAGES: &str = "iproute2,procps,kmod,curl,systemd,systemd-sysv,dbus,adduser,jq";
/// Written into the root file system and next to its image once built: what they hold, so a
/// cache built with other packages is built again.
const ROOTFS_STAMP: &str = ".kill-test-packages";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Size of the root file system image; the guest writes to tmpfs and a qemu snapshot.
const ROOTFS_IMAGE_MIB: u64 = 1024;

/// The extracted kernel package.
#[derive(Debug)]
pub struct Kernel {
    /// `vmlinuz-<version>`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>/kernel` inside the extracted package.
    pub modules: PathBuf,
    /// The kernel release, e.g. `6.1.0-48-cloud-amd64`.
    pub version: String,
}

/// Installs qemu, debootstrap and e2fsprogs with apt-get when one of them is missing.
pub fn ensure_host_tools() -> Result<()> {
    setup::ensure_debian_packages(
        "vm",
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("debootstrap", "debootstrap"),
            ("mkfs.ext4", "e2fsprogs"),
            ("dpkg-deb", "dpkg"),
        ],
    )
    .map(|_| ())
}

/// Downloads and extracts Debian 12's 6.1 cloud kernel into `dir` unless it is there.
pub fn ensure_kernel(dir: &Path) -> Result<Kernel> {
    let extracted = dir.join("x");
    if let Some(kernel) = find_kernel(&extracted)? {
        return Ok(kernel);
    }
    let deps = setup::output(Command::new("apt-cache").args(["depends", KERNEL_META]))
        .with_context(|| format!("asking apt-cache which kernel {KERNEL_META} depends on"))?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-6.1"))
        .with_context(|| {
            format!("{KERNEL_META} names no linux-image-6.1 package; is this Debian 12 (bookworm)?")
        })?
        .to_owned();
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .with_context(|| format!("creating {}", download.display()))?;
    println!("vm: downloading {package} (apt-get download)");
    setup::status(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&download),
    )
    .with_context(|| format!("apt-get download {package}"))?;
    let deb = single_deb(&download)?;
    let partial = dir.join("x.partial");
    let _ = std::fs::remove_dir_all(&partial);
    setup::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))
        .with_context(|| format!("extracting {}", deb.display()))?;
    std::fs::rename(&partial, &extracted)
        .with_context(|| format!("renaming {} to {}", partial.display(), extracted.display()))?;
    find_kernel(&extracted)?.with_context(|| {
        format!(
            "{} holds no boot/vmlinuz-6.1*; the package layout changed",
            extracted.display()
        )
    })
}

fn find_kernel(extracted: &Path) -> Result<Option<Kernel>> {
    let Ok(entries) = std::fs::read_dir(extracted.join("boot")) else {
        return Ok(None);
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("vmlinuz-")
            && version.starts_with("6.1.")
        {
            let modules = extracted.join("lib/modules").join(version).join("kernel");
            if !modules.is_dir() {
                bail!(
                    "{} is missing; remove {} and run again",
                    modules.display(),
                    extracted.display()
                );
            }
            return Ok(Some(Kernel {
                vmlinuz: extracted.join("boot").join(&name),
                modules,
                version: version.to_owned(),
            }));
        }
    }
    Ok(None)
}

fn single_deb(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))
}

/// The statically linked busybox of Debian's `busybox-static`, for the initramfs.
pub fn ensure_busybox(dir: &Path) -> Result<PathBuf> {
    let busybox = dir.join("x/bin/busybox");
    if busybox.is_file() {
        return Ok(busybox);
    }
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .with_context(|| format!("creating {}", download.display()))?;
    println!("vm: downloading busybox-static (apt-get download)");
    setup::status(
        Command::new("apt-get")
            .args(["download", "busybox-static"])
            .current_dir(&download),
    )
    .context("apt-get download busybox-static")?;
    let deb = single_deb(&download)?;
    setup::status(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("x")),
    )
    .with_context(|| format!("extracting {}", deb.display()))?;
    if !busybox.is_file() {
        bail!("busybox-static has no bin/busybox at {}", busybox.display());
    }
    Ok(busybox)
}

/// Debootstraps bookworm into `vm_dir/rootfs` once, then makes `vm_dir/rootfs.ext4` from it.
pub fn ensure_rootfs_image(vm_dir: &Path) -> Result<PathBuf> {
    let image = vm_dir.join("rootfs.ext4");
    let image_stamp = vm_dir.join(format!("rootfs.ext4{ROOTFS_STAMP}"));
    let current = |stamp: &Path| std::fs::read_to_string(stamp).is_ok_and(|s| s == ROOTFS_PACKAGES);
    if image.is_file() && current(&image_stamp) {
        return Ok(image);
    }
    let rootfs = vm_dir.join("rootfs");
    // The stamp is written after debootstrap succeeded; a rootfs without it was interrupted
    // or has other packages.
    if !current(&rootfs.join(ROOTFS_STAMP)) {
        let partial = vm_dir.join("rootfs.partial");
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_dir_all(&rootfs);
        println!("vm: debootstrap --variant=minbase {SUITE} (a few minutes, once)");
        setup::status(
            Command::new("debootstrap")
                .args(["--variant=minbase", &format!("--include={ROOTFS_PACKAGES}")])
                .arg(SUITE)
                .arg(&partial)
                .arg(MIRROR),
        )
        .with_context(|| format!("debootstrap {SUITE} into {}", partial.display()))?;
        std::fs::write(partial.join(ROOTFS_STAMP), ROOTFS_PACKAGES)
            .context("stamping the root file system with its packages")?;
        std::fs::rename(&partial, &rootfs)
            .with_context(|| format!("renaming {} to {}", partial.display(), rootfs.display()))?;
    }
    println!("vm: making {} from {}", image.display(), rootfs.display());
    let tmp = vm_dir.join("rootfs.ext4.partial");
    make_ext4(&rootfs, &tmp, "vmroot", ROOTFS_IMAGE_MIB)?;
    std::fs::rename(&tmp, &image)
        .with_context(|| format!("renaming {} to {}", tmp.display(), image.display()))?;
    std::fs::write(&image_stamp, ROOTFS_PACKAGES)
        .with_context(|| format!("writing {}", image_stamp.display()))?;
    Ok(image)
}

/// An ext4 image of `size_mib` holding a copy of `dir` (`mkfs.ext4 -d`, no loop mount needed).
pub fn make_ext4(dir: &Path, image: &Path, label: &str, size_mib: u64) -> Result<()> {
    let _ = std::fs::remove_file(image);
    setup::output(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d"])
            .arg(dir)
            .arg(image)
            .arg(format!("{size_mib}M")),
    )
    .with_context(|| format!("mkfs.ext4 -d {} {}", dir.display(), image.display()))?;
    Ok(())
}
