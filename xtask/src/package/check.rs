//! What `cargo xtask package --check` proves about the two packages, without installing them on
//! this machine: their files and modes, their conffiles, that they depend only on packages this
//! Debian release has (at versions it has), that the watchdog carries its eBPF object, that the
//! unit files pass `systemd-analyze verify` against the packaged binaries, and that the token
//! generator the postinst scripts run makes private tokens and never replaces one.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::setup;

/// One file a package must ship: its path in the package and its `ls -l` mode.
struct Expected {
    path: &'static str,
    mode: &'static str,
}

const fn file(path: &'static str, mode: &'static str) -> Expected {
    Expected { path, mode }
}

/// What each package holds, and the tokens its postinst generates.
struct Spec {
    name: &'static str,
    files: &'static [Expected],
    conffiles: &'static [&'static str],
    tokens: &'static [&'static str],
}

const SPECS: [Spec; 2] = [
    Spec {
        name: "vma-watchdog",
        files: &[
            file("usr/bin/vma-watchdog", "-rwxr-xr-x"),
            file("usr/libexec/vma-watchdog/make-token", "-rwxr-xr-x"),
            file("usr/libexec/vma-watchdog/migratekit-gate", "-rwxr-xr-x"),
            file("etc/default/vma-watchdog", "-rw-r--r--"),
            file("usr/lib/systemd/system/vma-watchdog.service", "-rw-r--r--"),
            file("usr/share/doc/vma-watchdog/INSTALL.md", "-rw-r--r--"),
        ],
        conffiles: &["/etc/default/vma-watchdog"],
        tokens: &["/etc/vma-watchdog/api.token", "/etc/vma-watchdog/oma.token"],
    },
    Spec {
        name: "oma",
        files: &[
            file("usr/bin/oma", "-rwxr-xr-x"),
            file("usr/bin/job-recovery", "-rwxr-xr-x"),
            file("usr/libexec/oma/make-token", "-rwxr-xr-x"),
            // It may hold a PostgreSQL URL with its password.
            file("etc/default/oma", "-rw-------"),
            file("usr/lib/systemd/system/oma.service", "-rw-r--r--"),
            file("usr/share/doc/oma/INSTALL.md", "-rw-r--r--"),
            file("usr/share/oma/prometheus/alerts.yml", "-rw-r--r--"),
            file("usr/share/oma/prometheus/alerts_test.yml", "-rw-r--r--"),
            file("usr/share/oma/prometheus/prometheus.yml", "-rw-r--r--"),
            file(
                "usr/share/oma/grafana/migratekit-recovery.json",
                "-rw-r--r--",
            ),
        ],
        conffiles: &["/etc/default/oma"],
        tokens: &["/etc/oma/operator.token", "/etc/oma/vma-api.token"],
    },
];

/// What a package may depend on: packages every Debian 12 system has or can install.
const ALLOWED_DEPENDS: [&str; 3] = ["libc6", "libgcc-s1", "adduser"];

/// Runs every check on the packages `debs` (one per [`super::PACKAGES`], in that order).
pub fn all(debs: &[PathBuf]) -> Result<()> {
    let mut passed = 0;
    for (spec, deb) in SPECS.iter().zip(debs) {
        let scratch = tempfile::tempdir().context("a scratch directory")?;
        // In order: each later check reads what an earlier one unpacked into `scratch`.
        let checks: [(&str, &dyn Fn() -> Result<()>); 6] = [
            ("control fields and dependencies", &|| control(spec, deb)),
            ("files and modes", &|| contents(spec, deb)),
            ("conffiles and maintainer scripts", &|| {
                control_files(spec, deb, scratch.path())
            }),
            ("extracted", &|| extract(deb, &scratch.path().join("root"))),
            ("unit file (systemd-analyze verify)", &|| {
                verify_unit(spec, &scratch.path().join("root"))
            }),
            ("token generation (the postinst's calls, for real)", &|| {
                tokens(spec, scratch.path())
            }),
        ];
        for (what, check) in checks {
            check().with_context(|| format!("{}: {what}", spec.name))?;
            println!("package: check {}: {what}: ok", spec.name);
            passed += 1;
        }
    }
    ebpf_embedded(&debs[0]).context("vma-watchdog: eBPF object embedded")?;
    println!("package: check vma-watchdog: eBPF object embedded: ok");
    passed += 1;
    println!("package: {passed} passed, 0 failed");
    Ok(())
}

fn dpkg_deb(args: &[&str], deb: &Path) -> Result<String> {
    setup::output(Command::new("dpkg-deb").args(args).arg(deb))
}

fn control(spec: &Spec, deb: &Path) -> Result<()> {
    let field = |name: &str| -> Result<String> {
        let value = setup::output(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))?;
        Ok(value.trim().to_owned())
    };
    ensure!(
        field("Package")? == spec.name,
        "Package is not {}",
        spec.name
    );
    ensure!(
        field("Architecture")? == "amd64",
        "Architecture is not amd64"
    );
    let depends = field("Depends")?;
    ensure!(!depends.is_empty(), "no Depends at all (libc6 at least)");
    let debian12 = std::fs::read_to_string("/etc/debian_version")
        .is_ok_and(|v| v.trim_start().starts_with("12"));
    for dep in depends.split(',').map(str::trim) {
        let (name, constraint) = match dep.split_once(' ') {
            Some((name, rest)) => (name, Some(rest.trim_matches(|c| c == '(' || c == ')'))),
            None => (dep, None),
        };
        ensure!(
            ALLOWED_DEPENDS.contains(&name),
            "depends on {name}, which is not one of {ALLOWED_DEPENDS:?}"
        );
        // On Debian 12 itself: the version asked for is one this release has.
        if let (true, Some(constraint)) = (debian12, constraint) {
            satisfied_here(name, constraint)?;
        }
    }
    Ok(())
}

/// Whether the installed `name` (this Debian 12 system's) satisfies `constraint` (`>= 2.34`).
fn satisfied_here(name: &str, constraint: &str) -> Result<()> {
    let installed =
        setup::output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", name]))
            .with_context(|| {
                format!("{name} is not installed here, so its version cannot be compared")
            })?;
    let (op, version) = constraint
        .split_once(' ')
        .with_context(|| format!("unreadable version constraint {constraint:?}"))?;
    let op = match op {
        ">=" => "ge",
        ">>" => "gt",
        "<=" => "le",
        "<<" => "lt",
        "=" => "eq",
        other => bail!("unknown version operator {other}"),
    };
    let ok = Command::new("dpkg")
        .args(["--compare-versions", installed.trim(), op, version])
        .status()?
        .success();
    ensure!(
        ok,
        "needs {name} ({constraint}) but Debian 12 has {}",
        installed.trim()
    );
    Ok(())
}

fn contents(spec: &Spec, deb: &Path) -> Result<()> {
    let listing = dpkg_deb(&["--contents"], deb)?;
    // `-rwxr-xr-x root/root  12345 2026-12-03 10:00 ./usr/bin/oma`
    let entries: Vec<(&str, &str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| (f[0], f[1], f[5].trim_start_matches("./")))
        })
        .collect();
    for want in spec.files {
        let (mode, owner, _) = entries
            .iter()
            .find(|(_, _, p)| *p == want.path)
            .with_context(|| format!("no {} in the package", want.path))?;
        ensure!(
            *mode == want.mode,
            "{} has mode {mode}, not {}",
            want.path,
            want.mode
        );
        ensure!(
            *owner == "root/root" || *owner == "0/0",
            "{} is owned by {owner}",
            want.path
        );
    }
    // Tokens are made on the machine, never shipped.
    let config_dir = format!("etc/{}/", spec.name);
    if let Some((_, _, p)) = entries
        .iter()
        .find(|(_, _, p)| p.starts_with(&config_dir) && p.len() > config_dir.len())
    {
        bail!("the package ships {p}: tokens must be generated at install, not shipped");
    }
    Ok(())
}

fn control_files(spec: &Spec, deb: &Path, scratch: &Path) -> Result<()> {
    let dir = scratch.join("DEBIAN");
    setup::status(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&dir))?;
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("no {name} script"))
    };
    let conffiles = read("conffiles")?;
    let listed: Vec<&str> = conffiles.lines().map(str::trim).collect();
    ensure!(
        listed == spec.conffiles,
        "conffiles are {listed:?}, not {:?}",
        spec.conffiles
    );
    let postinst = read("postinst")?;
    for token in spec.tokens {
        ensure!(postinst.contains(token), "the postinst never makes {token}");
    }
    let unit = format!("{}.service", spec.name);
    // Enabled, and on an upgrade restarted (not stopped before it and started after).
    ensure!(
        postinst.contains(&format!("deb-systemd-helper enable {unit}"))
            && postinst.contains("_dh_action=restart"),
        "the postinst does not enable {unit} and restart it on upgrade"
    );
    // The tokens (and the OMA's user) exist before the service is first started.
    let made = postinst.find("make-token").unwrap_or(usize::MAX);
    let started = postinst.find("deb-systemd-invoke").unwrap_or(0);
    ensure!(
        made < started,
        "the postinst starts {unit} before it makes the tokens"
    );
    for script in ["postinst", "prerm", "postrm"] {
        setup::status(Command::new("sh").arg("-n").arg(dir.join(script)))
            .with_context(|| format!("the {script} is not valid sh"))?;
    }
    let prerm = read("prerm")?;
    ensure!(
        prerm.contains("\"$1\" = remove") && !prerm.contains("upgrade"),
        "the prerm stops {unit} on upgrade too: {prerm}"
    );
    let postrm = read("postrm")?;
    ensure!(
        postrm.contains("\"$1\" = \"purge\"")
            && postrm.contains(&format!("/var/lib/{}", spec.name)),
        "the postrm does not remove the state at purge"
    );
    ensure!(
        !postrm.contains("#DEBHELPER#") && !postinst.contains("#DEBHELPER#"),
        "#DEBHELPER# was not replaced"
    );
    Ok(())
}

fn extract(deb: &Path, root: &Path) -> Result<()> {
    setup::status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))
}

/// `systemd-analyze verify` of the packaged unit, its `ExecStart` pointed at the packaged
/// binary (a copy of the unit in the scratch directory; the machine's own units stand for the
/// rest, `multi-user.target` and the like), so that a wrong binary path, an unknown directive
/// or a bad value fails here. Any complaint fails, not only those that set its exit status.
fn verify_unit(spec: &Spec, root: &Path) -> Result<()> {
    let packaged = root.join(format!("usr/lib/systemd/system/{}.service", spec.name));
    let text = std::fs::read_to_string(&packaged)?;
    let binary = format!("/usr/bin/{}", spec.name);
    ensure!(
        text.contains(&format!("ExecStart={binary} ")),
        "the unit does not start {binary}"
    );
    let extracted = root.join(binary.trim_start_matches('/'));
    let here = text.replace(
        &format!("ExecStart={binary} "),
        &format!("ExecStart={} ", extracted.display()),
    );
    let dir = root
        .parent()
        .context("the scratch directory")?
        .join("units");
    std::fs::create_dir_all(&dir)?;
    let unit = dir.join(format!("{}.service", spec.name));
    std::fs::write(&unit, here)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .context("running systemd-analyze (cargo xtask setup installs it)")?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}",
        said.trim()
    );
    Ok(())
}

/// Runs each `make-token FILE OWNER` call of the postinst, from the package, against a scratch
/// root (`DPKG_ROOT`): the token is made private and random; a second run, an operator's own
/// file and a symbolic link are all left alone.
fn tokens(spec: &Spec, scratch: &Path) -> Result<()> {
    let postinst = std::fs::read_to_string(scratch.join("DEBIAN/postinst"))?;
    let target = scratch.join("target");
    let calls: Vec<(String, String, String)> = postinst
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[0].ends_with("/make-token"))
                .then(|| (f[0].to_owned(), f[1].to_owned(), f[2].to_owned()))
        })
        .collect();
    ensure!(
        calls.len() == spec.tokens.len(),
        "the postinst calls make-token {} times, not {}",
        calls.len(),
        spec.tokens.len()
    );
    for (script, file, owner) in &calls {
        let script = scratch.join("root").join(script.trim_start_matches('/'));
        // A user only the installed package creates (oma) is not on this machine.
        let owner = if user_exists(owner.split(':').next().unwrap_or(owner)) {
            owner.clone()
        } else {
            "nobody:nogroup".to_owned()
        };
        let run = || {
            setup::status(
                Command::new(&script)
                    .args([file, &owner])
                    .env("DPKG_ROOT", &target),
            )
        };
        run()?;
        let made = target.join(file.trim_start_matches('/'));
        let first = std::fs::read_to_string(&made)?;
        let hex = first.trim_end_matches('\n');
        ensure!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && first.ends_with('\n'),
            "{file} does not hold 64 hex digits"
        );
        let meta = std::fs::symlink_metadata(&made)?;
        ensure!(
            meta.permissions().mode() & 0o7777 == 0o600,
            "{file} is not 0600"
        );
        ensure!(
            meta.uid() == uid_of(owner.split(':').next().unwrap_or(&owner))?,
            "{file} is not owned by {owner}"
        );
        run()?;
        ensure!(
            std::fs::read_to_string(&made)? == first,
            "a second run replaced {file}"
        );
    }
    // Two runs of two tokens gave two different ones.
    let texts: Vec<String> = calls
        .iter()
        .map(|(_, f, _)| std::fs::read_to_string(target.join(f.trim_start_matches('/'))))
        .collect::<Result<_, _>>()?;
    ensure!(texts[0] != texts[1], "both tokens are the same");
    operator_files_survive(&scratch.join("root"), &calls[0].0, scratch)
}

/// An operator's own token, and a symbolic link where a token goes, are never replaced.
fn operator_files_survive(root: &Path, script: &str, scratch: &Path) -> Result<()> {
    let script = root.join(script.trim_start_matches('/'));
    let target = scratch.join("operator");
    std::fs::create_dir_all(target.join("etc"))?;
    let own = target.join("etc/own.token");
    std::fs::write(&own, "the-operators-token\n")?;
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o640))?;
    std::os::unix::fs::symlink("/nonexistent/elsewhere", target.join("etc/link.token"))?;
    for file in ["/etc/own.token", "/etc/link.token"] {
        setup::status(
            Command::new(&script)
                .args([file, "root:root"])
                .env("DPKG_ROOT", &target),
        )?;
    }
    ensure!(
        std::fs::read_to_string(&own)? == "the-operators-token\n",
        "the operator's token was replaced"
    );
    ensure!(
        std::fs::metadata(&own)?.permissions().mode() & 0o777 == 0o640,
        "the operator's token's mode was changed"
    );
    ensure!(
        std::fs::symlink_metadata(target.join("etc/link.token"))?
            .file_type()
            .is_symlink(),
        "a symbolic link was replaced"
    );
    Ok(())
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn uid_of(name: &str) -> Result<u32> {
    let line = setup::output(Command::new("getent").args(["passwd", name]))?;
    line.split(':')
        .nth(2)
        .and_then(|u| u.trim().parse().ok())
        .with_context(|| format!("no uid for {name}"))
}

/// The watchdog's binary carries the kernel programs (their names are in the embedded object's
/// symbol table), so the package never falls back to procfs for want of them.
fn ebpf_embedded(deb: &Path) -> Result<()> {
    let scratch = tempfile::tempdir()?;
    extract(deb, scratch.path())?;
    let binary = std::fs::read(scratch.path().join("usr/bin/vma-watchdog"))?;
    let found = [b"watchdog_exit".as_slice(), b"watchdog_exec".as_slice()]
        .iter()
        .all(|name| binary.windows(name.len()).any(|w| w == *name));
    ensure!(
        found,
        "the packaged vma-watchdog has no eBPF object embedded (no watchdog_exit/watchdog_exec): was `cargo xtask build-ebpf` run?"
    );
    Ok(())
}
