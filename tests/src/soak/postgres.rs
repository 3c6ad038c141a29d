//! The soak's own PostgreSQL cluster on the postgres backend: a server of its own, since the
//! soak stops and starts it (a shared test server must never be restarted under other runs).
//! It is made by `oma/scripts/start-test-postgres.sh` (the store tests' script) in a
//! temporary directory on a free port, and stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running (or stopped) cluster.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    script: PathBuf,
    /// Its admin URL (`postgres://postgres@127.0.0.1:<port>/postgres`).
    pub url: String,
}

impl Cluster {
    /// Creates and starts a cluster; `workspace` is the checkout (for the script).
    pub fn start(workspace: &Path) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("soak-pg-")
            .tempdir()
            .map_err(|e| format!("creating the soak's PostgreSQL directory: {e}"))?;
        let port = crate::http::free_port(std::net::IpAddr::from([127, 0, 0, 1]))
            .map_err(|e| format!("finding a free port for PostgreSQL: {e}"))?;
        let mut cluster = Self {
            dir,
            port,
            script: workspace.join("oma/scripts/start-test-postgres.sh"),
            url: String::new(),
        };
        cluster.url = cluster.up()?;
        Ok(cluster)
    }

    /// Starts the server (the script leaves a running one alone) and returns its URL.
    pub fn up(&self) -> Result<String, String> {
        let out = Command::new(&self.script)
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .output()
            .map_err(|e| format!("running {}: {e}", self.script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "starting the soak's PostgreSQL failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the server with a fast shutdown: open connections are cut, as in a crash of
    /// the database host's service.
    pub fn down(&self) -> Result<(), String> {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("no /usr/lib/postgresql ({e}): is PostgreSQL installed?"))?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("pg_ctl").exists())
            .max()
            .ok_or("no pg_ctl under /usr/lib/postgresql/*/bin")?;
        // The server runs as `postgres` (it refuses root), so pg_ctl must too.
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path())
            .args(args)
            .output()
            .map_err(|e| format!("running pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.pg_ctl(&["stop", "-m", "immediate", "-w"]) {
            eprintln!("soak: stopping its PostgreSQL: {e}");
        }
    }
}
