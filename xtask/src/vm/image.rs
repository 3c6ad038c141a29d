//! The two things built for every run: the initramfs (busybox, the virtio modules in the order
//! their own `depends=` give, and
//! `tests/vm/initramfs-init.sh`, as a `newc` cpio archive written here, so no `cpio` tool is
//! needed) and the payload disk (the test binaries, `tests/vm/guest-init.sh` and its `env`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::assets::{self, Kernel};
use super::modules::{self, Module};

/// The drivers stage 1 loads for the two virtio disks; what they depend on, and the order,
/// come from the modules themselves ([`modules::load_order`]).
const DISK_DRIVERS: [&str; 2] = ["virtio_pci", "virtio_blk"];

/// The drivers stage 2 loads: veth, for the partition scenario's link.
const GUEST_DRIVERS: [&str; 1] = ["veth"];

/// What the guest runs, written to `/vm/env` for `guest-init.sh`.
#[derive(Debug)]
pub struct GuestPlan {
    /// The host's `target/<profile>`, baked into the test binaries as CARGO_BIN_EXE_* paths.
    pub host_profile_dir: PathBuf,
    /// File name of the detector test binary inside `/vm/bin`.
    pub detector_test: String,
    /// Kill-test scenarios (`3,5`); empty for all of them.
    pub kill_test_only: String,
    pub kill_test_runs: usize,
    pub watchdog_timeout_s: u64,
    pub detector_timeout_s: u64,
    pub kill_test_timeout_s: u64,
}

impl GuestPlan {
    /// Seconds the guest may take at most, steps plus boot and power-off.
    pub fn budget_s(&self) -> u64 {
        self.watchdog_timeout_s + self.detector_timeout_s + self.kill_test_timeout_s + 180
    }

    fn env_file(&self) -> String {
        let mut env = String::new();
        let _ = writeln!(
            env,
            "HOST_PROFILE_DIR='{}'",
            self.host_profile_dir.display()
        );
        let _ = writeln!(env, "DETECTOR_TEST='{}'", self.detector_test);
        let _ = writeln!(env, "KILL_TEST_ONLY='{}'", self.kill_test_only);
        let _ = writeln!(env, "KILL_TEST_RUNS={}", self.kill_test_runs);
        let _ = writeln!(env, "WATCHDOG_TIMEOUT={}", self.watchdog_timeout_s);
        let _ = writeln!(env, "DETECTOR_TIMEOUT={}", self.detector_timeout_s);
        let _ = writeln!(env, "KILL_TEST_TIMEOUT={}", self.kill_test_timeout_s);
        env
    }
}

/// Builds `vm_dir/payload.ext4`: `bin/` (the given binaries), `guest-init.sh`, `env`, and
/// `modules/` (veth and what it depends on, with their load order in `modules/order`).
/// Returns the image's path.
pub fn payload(
    vm_dir: &Path,
    scripts: &Path,
    kernel: &Kernel,
    binaries: &[PathBuf],
    plan: &GuestPlan,
) -> Result<PathBuf> {
    let stage = vm_dir.join("payload");
    let _ = std::fs::remove_dir_all(&stage);
    for sub in ["bin", "modules"] {
        std::fs::create_dir_all(stage.join(sub))
            .with_context(|| format!("creating {}", stage.join(sub).display()))?;
    }
    let mut bytes = 0;
    for bin in binaries {
        let name = bin.file_name().context("binary path without a file name")?;
        bytes += copy(bin, &stage.join("bin").join(name))?;
    }
    copy(&scripts.join("guest-init.sh"), &stage.join("guest-init.sh"))?;
    let order = modules::load_order(&kernel.modules, &GUEST_DRIVERS)?;
    for module in &order {
        copy(&module.path, &stage.join(module_file(module)))?;
    }
    std::fs::write(stage.join("modules/order"), order_file(&order))
        .context("writing the guest's module order")?;
    std::fs::write(stage.join("env"), plan.env_file()).context("writing the guest's env file")?;
    let image = vm_dir.join("payload.ext4");
    // ext4 metadata and the journal need room beyond the files themselves.
    let size_mib = bytes / (1 << 20) * 5 / 4 + 64;
    assets::make_ext4(&stage, &image, "vmpayload", size_mib)?;
    Ok(image)
}

/// A hard link when possible (same file system, no copy), else a copy. Returns the size.
pub(crate) fn copy(from: &Path, to: &Path) -> Result<u64> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(std::fs::metadata(to)
        .with_context(|| format!("reading {}", to.display()))?
        .len())
}

/// Writes `vm_dir/initramfs.cpio` and returns its path.
pub fn initramfs(
    vm_dir: &Path,
    scripts: &Path,
    busybox: &Path,
    kernel: &Kernel,
) -> Result<PathBuf> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init before anything can mount devtmpfs; without the
    // node, init would run with no output at all.
    cpio.char_device("dev/console", 5, 1);
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    cpio.file("init", 0o755, &read(&scripts.join("initramfs-init.sh"))?);
    cpio.file("bin/busybox", 0o755, &read(busybox)?);
    let order = modules::load_order(&kernel.modules, &DISK_DRIVERS)?;
    for module in &order {
        cpio.file(&module_file(module), 0o644, &read(&module.path)?);
    }
    cpio.file("modules/order", 0o644, order_file(&order).as_bytes());
    let out = vm_dir.join("initramfs.cpio");
    let mut file =
        std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    file.write_all(&cpio.finish())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// Where a module goes in the initramfs or the payload: `modules/<name>.ko`.
fn module_file(module: &Module) -> String {
    format!("modules/{}.ko", module.name)
}

/// The load order the init scripts follow: one module name a line.
fn order_file(order: &[Module]) -> String {
    order.iter().map(|m| format!("{}\n", m.name)).collect()
}

/// A `newc` ("070701") cpio archive, the format the kernel unpacks into its initial rootfs.
#[derive(Debug, Default)]
struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 0, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, 0, data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major << 8) | minor, &[]);
    }

    /// `rdev` packs (major << 8 | minor); the header stores the two halves apart.
    fn entry(&mut self, name: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let name_len = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name_len,
            0,
        ];
        let mut header = String::from("070701");
        for f in fields {
            let _ = write!(header, "{f:08X}");
        }
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, &[]);
        self.out
    }
}
