//! A memory cgroup with a small limit, for the OOM scenario. Works on cgroup v2 (unified
//! hierarchy with the memory controller) and on v1 (`/sys/fs/cgroup/memory`).

use std::path::{Path, PathBuf};

use crate::{HarnessError, Result};

/// A memory cgroup the harness made; removed on drop (after killing what is left in it).
#[derive(Debug)]
pub struct MemCgroup {
    dir: PathBuf,
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value)
        .map_err(|e| HarnessError::io(format!("writing {value} to {}", path.display()), e))
}

impl MemCgroup {
    /// Creates cgroup `name` limited to `limit_bytes` of memory and no swap.
    pub fn create(name: &str, limit_bytes: u64) -> Result<Self> {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "memory"));
        let dir = if v2 {
            root.join(name)
        } else {
            root.join("memory").join(name)
        };
        if !dir.parent().is_some_and(Path::is_dir) {
            return Err(HarnessError::io(
                "no memory cgroup controller found (neither cgroup v2 with memory nor /sys/fs/cgroup/memory)",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::io(format!("creating cgroup {}", dir.display()), e))?;
        let cg = Self { dir };
        if v2 {
            write(&cg.dir.join("memory.max"), &limit_bytes.to_string())?;
            // Absent when swap accounting is off; then there is no swap to escape into either.
            let _ = write(&cg.dir.join("memory.swap.max"), "0");
        } else {
            write(
                &cg.dir.join("memory.limit_in_bytes"),
                &limit_bytes.to_string(),
            )?;
            let _ = write(&cg.dir.join("memory.swappiness"), "0");
            let _ = write(
                &cg.dir.join("memory.memsw.limit_in_bytes"),
                &limit_bytes.to_string(),
            );
        }
        Ok(cg)
    }

    /// The `cgroup.procs` file: a pid written here moves into the cgroup.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.procs_file()).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let _ = crate::procs::signal(pid, libc::SIGKILL);
        }
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
