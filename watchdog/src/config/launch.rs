//! The launcher's configuration: the migratekit program, its argument template and the
//! vCenter credentials, from `--launch-*` flags or a `--launch-config` JSON file. Passwords
//! come only from this file (or files it names), never from the OMA, and are never shown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use super::secrets::read_secret_file;
use crate::launcher::{LauncherConfig, SystemdMode, VmwareCredentials};
use crate::secret::Secret;

/// The `--launch-config` file.
///
/// ```json
/// { "program": "/usr/local/bin/migratekit",
///   "args": ["migrate", "--vmware-endpoint", "{vmware_endpoint}", "--vmware-username",
///            "{vmware_username}", "--vmware-password", "{vmware_password}",
///            "--vmware-path", "{vm_path}", "--nbd-targets", "{nbd_targets}", "--job-id", "{job_id}"],
///   "credentials": { "vc1": { "endpoint": "vc.example", "username": "admin",
///                             "password_file": "/etc/vma-watchdog/vc1.password" } },
///   "log_dir": "/var/log/migratekit", "systemd": "auto" }
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchFile {
    program: PathBuf,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    credentials: BTreeMap<String, CredentialsFile>,
    #[serde(default)]
    log_dir: Option<PathBuf>,
    #[serde(default)]
    systemd: Option<SystemdFile>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SystemdFile {
    Auto,
    Never,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    endpoint: String,
    username: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
}

impl std::fmt::Debug for CredentialsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialsFile")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// What the command line says about launching.
#[derive(Debug, Default)]
pub struct LaunchFlags<'a> {
    /// `--launch-config`.
    pub file: Option<&'a Path>,
    /// `--launch-program`.
    pub program: Option<&'a Path>,
    /// `--launch-arg`...
    pub args: &'a [String],
    /// `--launch-log-dir`.
    pub log_dir: Option<&'a Path>,
    /// `--launch-no-systemd`.
    pub no_systemd: bool,
    /// `--launch-nice`.
    pub nice: i32,
    /// `--match-name`s, the names the track endpoint accepts.
    pub match_names: &'a [String],
    /// `--migratekit-path`: the binary a process must run to be migratekit (default: the
    /// program).
    pub migratekit_path: Option<&'a Path>,
    /// `--migratekit-uid`: the user it must run as (default: the watchdog's own).
    pub migratekit_uid: Option<u32>,
}

/// Builds the launcher's configuration from the flags and the file they name.
pub fn load(flags: &LaunchFlags<'_>) -> anyhow::Result<LauncherConfig> {
    let mut config = match flags.file {
        Some(file) => {
            if flags.program.is_some() || !flags.args.is_empty() {
                bail!(
                    "give either --launch-config or --launch-program/--launch-arg, not both (the file has its own program and args)"
                );
            }
            from_file(file)?
        }
        None => {
            let program = match flags.program {
                Some(p) => p.to_owned(),
                None => default_program(),
            };
            let mut config = LauncherConfig::new(program);
            if !flags.args.is_empty() {
                config.args = flags.args.to_vec();
            }
            config
        }
    };
    if let Some(dir) = flags.log_dir {
        config.log_dir = Some(dir.to_owned());
    }
    if flags.no_systemd {
        config.systemd = SystemdMode::Never;
    }
    config.match_names = flags.match_names.to_vec();
    config.nice = flags.nice;
    if let Some(path) = flags.migratekit_path {
        config.migratekit.path = path.to_owned();
    }
    if let Some(uid) = flags.migratekit_uid {
        config.migratekit.uid = uid;
    }
    Ok(config)
}

fn from_file(path: &Path) -> anyhow::Result<LauncherConfig> {
    let text = read_secret_file(path, "--launch-config")?;
    // serde's messages about data errors may quote a value (a password in the wrong place):
    // only the position is shown for those.
    let file: LaunchFile = serde_json::from_str(&text).map_err(|e| {
        let detail = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => e.to_string(),
            _ => format!(
                "a field is unknown or has the wrong type at line {} column {}",
                e.line(),
                e.column()
            ),
        };
        anyhow::anyhow!(
            "the launch config {} is not valid: {detail}; see docs/WATCHDOG.md for its fields",
            path.display()
        )
    })?;
    let mut config = LauncherConfig::new(file.program);
    if let Some(args) = file.args {
        config.args = args;
    }
    config.log_dir = file.log_dir;
    if let Some(SystemdFile::Never) = file.systemd {
        config.systemd = SystemdMode::Never;
    }
    for (name, c) in file.credentials {
        let password = match (c.password, c.password_file) {
            (Some(p), None) => p,
            (None, Some(f)) => read_secret_file(&f, "password_file")
                .with_context(|| format!("credentials {name:?} in {}", path.display()))?,
            _ => bail!(
                "credentials {name:?} in {} need exactly one of password and password_file",
                path.display()
            ),
        };
        let password = Secret::new(password);
        let (endpoint, username) = (c.endpoint, c.username);
        config.credentials.insert(
            name,
            VmwareCredentials {
                endpoint,
                username,
                password,
            },
        );
    }
    Ok(config)
}

/// `migratekit` next to this executable (how a build tree and a package lay it out), else
/// the first one on `PATH`, else the bare name (a start then fails with advice).
fn default_program() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("migratekit")));
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("migratekit"))
                .find(|p| p.is_file())
        })
    };
    sibling
        .filter(|p| p.is_file())
        .or_else(on_path)
        .unwrap_or_else(|| PathBuf::from("migratekit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_gives_program_args_and_hidden_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "from-file-pw\n").unwrap();
        let file = dir.path().join("launch.json");
        let json = serde_json::json!({
            "program": "/opt/mk", "args": ["migrate", "--job-id", "{job_id}"],
            "credentials": {
                "a": {"endpoint": "vc-a", "username": "u", "password": "inline-pw"},
                "b": {"endpoint": "vc-b", "username": "u", "password_file": pw}
            },
            "systemd": "never"
        });
        std::fs::write(&file, json.to_string()).unwrap();
        let names = ["migratekit".to_owned()];
        let flags = LaunchFlags {
            file: Some(&file),
            match_names: &names,
            ..Default::default()
        };
        let c = load(&flags).unwrap();
        assert_eq!(c.program, Path::new("/opt/mk"));
        assert_eq!(c.systemd, SystemdMode::Never);
        assert_eq!(c.credentials["a"].password.expose(), "inline-pw");
        assert_eq!(c.credentials["b"].password.expose(), "from-file-pw");
        let shown = format!("{c:?}");
        assert!(!shown.contains("inline-pw") && !shown.contains("from-file-pw"));
    }

    #[test]
    fn migratekit_is_the_program_run_as_the_watchdog_unless_told_otherwise() {
        let program = Path::new("/opt/wrapper.sh");
        let flags = LaunchFlags {
            program: Some(program),
            ..Default::default()
        };
        let c = load(&flags).unwrap();
        assert_eq!(c.migratekit.path, program);
        assert_eq!(c.migratekit.uid, crate::trust::own_uid());
        let flags = LaunchFlags {
            program: Some(program),
            migratekit_path: Some(Path::new("/usr/bin/migratekit")),
            migratekit_uid: Some(4242),
            ..Default::default()
        };
        let c = load(&flags).unwrap();
        assert_eq!(c.migratekit.path, Path::new("/usr/bin/migratekit"));
        assert_eq!(c.migratekit.uid, 4242);
    }

    #[test]
    fn a_misplaced_password_is_not_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("launch.json");
        std::fs::write(&file, r#"{"program": "/x", "systemd": "leaked-pw"}"#).unwrap();
        let flags = LaunchFlags {
            file: Some(&file),
            ..Default::default()
        };
        let err = format!("{:#}", load(&flags).unwrap_err());
        assert!(!err.contains("leaked-pw"), "{err}");
        assert!(err.contains("line 1"), "{err}");
        let flags = LaunchFlags {
            file: Some(&file),
            program: Some(Path::new("/y")),
            ..Default::default()
        };
        assert!(load(&flags).unwrap_err().to_string().contains("not both"));
    }
}
