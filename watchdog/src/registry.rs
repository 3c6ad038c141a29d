//! The process registry: which migratekit processes run which job, kept on disk.
//!
//! After a restart it says what was running before, so that a death during the downtime is
//! still reported. Processes are keyed by `(pid, start time)`, never by pid alone. The file is
//! replaced atomically (temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves either the old or the new registry, never half of one. It holds job ids, pids, start
//! times and dates only: nothing from a command line but the job id.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use api::{Detector, ExitStatus, FoundBy, JobProcessState, ProcessIdentity, VmaJobStatus};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// File name of the registry inside the state directory.
pub const FILE_NAME: &str = "registry.json";
/// How many jobs' last exits are kept; the oldest are forgotten beyond that, so the file
/// stays small on a VMA that runs jobs for years. The OMA has long recorded those deaths.
pub const MAX_LAST_EXITS: usize = 10_000;
const FORMAT_VERSION: u32 = 1;

/// What failed while loading or saving the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry file exists but cannot be read.
    #[error(
        "cannot read the process registry {path}: {source}; check the state directory's permissions"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The registry file is not valid JSON of the expected shape.
    #[error(
        "the process registry {path} is corrupt ({source}); move it aside to start with an empty registry (deaths during the downtime will then not be reported)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The registry was written by a newer watchdog.
    #[error(
        "the process registry {path} has format version {found}, this watchdog understands {FORMAT_VERSION}; run a watchdog at least as new as the one that wrote it"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The new registry could not be written durably.
    #[error(
        "cannot write the process registry {path}: {source}; check free space and permissions of the state directory"
    )]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// A process the watchdog knows to be running (or to have been running when it last looked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The process.
    pub process: ProcessIdentity,
    /// The job it runs.
    pub job_id: String,
    /// When the watchdog first saw it.
    pub first_seen: DateTime<Utc>,
    /// How the watchdog found it.
    pub found_by: FoundBy,
}

/// How the latest process of a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastExit {
    /// The process.
    pub process: ProcessIdentity,
    /// How it ended (all unknown for a death while the watchdog was down).
    pub exit: ExitStatus,
    /// When the end was observed.
    pub exited_at: DateTime<Utc>,
    /// What observed it.
    pub detector: Detector,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    processes: Vec<Entry>,
    last_exits: BTreeMap<String, LastExit>,
}

#[derive(Debug, Default)]
struct State {
    processes: BTreeMap<(u32, u64), Entry>,
    last_exits: BTreeMap<String, LastExit>,
}

/// The registry, shared by the daemon and the REST API. Every change is on disk before the
/// method that made it returns.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    state: Mutex<State>,
}

fn key(p: ProcessIdentity) -> (u32, u64) {
    (p.pid, p.start_time)
}

impl Registry {
    /// Loads the registry from `state_dir` (empty when there is none yet).
    pub fn open(state_dir: &Path) -> Result<Self, RegistryError> {
        let path = state_dir.join(FILE_NAME);
        let disk = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<OnDisk>(&bytes).map_err(|source| {
                RegistryError::Corrupt {
                    path: path.clone(),
                    source,
                }
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => OnDisk {
                version: FORMAT_VERSION,
                ..OnDisk::default()
            },
            Err(source) => return Err(RegistryError::Read { path, source }),
        };
        if disk.version != FORMAT_VERSION {
            return Err(RegistryError::Version {
                path,
                found: disk.version,
            });
        }
        let state = State {
            processes: disk
                .processes
                .into_iter()
                .map(|e| (key(e.process), e))
                .collect(),
            last_exits: disk.last_exits,
        };
        Ok(Self {
            dir: state_dir.to_owned(),
            state: Mutex::new(state),
        })
    }

    /// Path of the registry file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated (each change is
        // one insert or remove), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a running process of `job_id`. Returns `false` when the process was already
    /// registered, or has already died as this job's process: that changes nothing, except that an explicit registration (`Started`,
    /// `Tracked`) overrides what a scan or exec event recorded first (the detector often sees
    /// a process the watchdog started before the starter gets to register it).
    pub fn register(
        &self,
        process: ProcessIdentity,
        job_id: &str,
        found_by: FoundBy,
    ) -> Result<bool, RegistryError> {
        let mut state = self.lock();
        if let Some(existing) = state.processes.get_mut(&key(process)) {
            let explicit = |f: FoundBy| matches!(f, FoundBy::Started | FoundBy::Tracked);
            if explicit(found_by) && !explicit(existing.found_by) {
                let before = existing.clone();
                existing.found_by = found_by;
                existing.job_id = job_id.to_owned();
                if let Err(e) = self.save(&state) {
                    state.processes.insert(key(process), before);
                    return Err(e);
                }
            }
            return Ok(false);
        }
        // Its death has been recorded already: registering it again would report it twice.
        if state
            .last_exits
            .get(job_id)
            .is_some_and(|x| x.process == process)
        {
            return Ok(false);
        }
        let entry = Entry {
            process,
            job_id: job_id.to_owned(),
            first_seen: Utc::now(),
            found_by,
        };
        state.processes.insert(key(process), entry);
        if let Err(e) = self.save(&state) {
            state.processes.remove(&key(process));
            return Err(e);
        }
        Ok(true)
    }

    /// Records that `process` ended and forgets it as running. Returns its entry, or `None`
    /// (changing nothing) when it was not registered, so a death is reported at most once.
    pub fn record_exit(
        &self,
        process: ProcessIdentity,
        exit: ExitStatus,
        detector: Detector,
    ) -> Result<Option<Entry>, RegistryError> {
        let mut state = self.lock();
        let Some(entry) = state.processes.remove(&key(process)) else {
            return Ok(None);
        };
        let last = LastExit {
            process,
            exit,
            exited_at: Utc::now(),
            detector,
        };
        let previous = state.last_exits.insert(entry.job_id.clone(), last);
        let pruned = prune(&mut state.last_exits);
        if let Err(e) = self.save(&state) {
            state.last_exits.extend(pruned);
            // Put everything back so memory never claims what the disk does not hold.
            match previous {
                Some(p) => state.last_exits.insert(entry.job_id.clone(), p),
                None => state.last_exits.remove(&entry.job_id),
            };
            state.processes.insert(key(process), entry);
            return Err(e);
        }
        Ok(Some(entry))
    }

    /// The registered process with this identity, if any.
    pub fn get(&self, process: ProcessIdentity) -> Option<Entry> {
        self.lock().processes.get(&key(process)).cloned()
    }

    /// The recorded end of this process, if it was the last process of its job to end.
    pub fn exit_of(&self, process: ProcessIdentity) -> Option<LastExit> {
        let state = self.lock();
        state
            .last_exits
            .values()
            .find(|x| x.process == process)
            .cloned()
    }

    /// Every process registered as running.
    pub fn running(&self) -> Vec<Entry> {
        self.lock().processes.values().cloned().collect()
    }

    /// What the watchdog knows about one job: its running process (the newest, should there
    /// be several), else how its last process ended; `None` for a job never seen.
    pub fn job_status(&self, job_id: &str) -> Option<VmaJobStatus> {
        let state = self.lock();
        status_of(&state, job_id)
    }

    /// [`Self::job_status`] of every job the watchdog knows, sorted by job id.
    pub fn jobs(&self) -> Vec<VmaJobStatus> {
        let state = self.lock();
        let mut ids: Vec<&String> = state.processes.values().map(|e| &e.job_id).collect();
        ids.extend(state.last_exits.keys());
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| status_of(&state, id))
            .collect()
    }

    /// Writes the whole registry to a temporary file, syncs it, renames it over the old one
    /// and syncs the directory, so the rename itself survives a power cut.
    fn save(&self, state: &State) -> Result<(), RegistryError> {
        let path = self.path();
        let disk = OnDisk {
            version: FORMAT_VERSION,
            processes: state.processes.values().cloned().collect(),
            last_exits: state.last_exits.clone(),
        };
        let write = || -> io::Result<()> {
            let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
            let mut f = fs::File::create(&tmp)?;
            serde_json::to_writer_pretty(&mut f, &disk).map_err(io::Error::other)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| RegistryError::Write {
            path: path.clone(),
            source,
        })
    }
}

/// Removes the oldest last exits beyond [`MAX_LAST_EXITS`] and returns them.
fn prune(exits: &mut BTreeMap<String, LastExit>) -> Vec<(String, LastExit)> {
    if exits.len() <= MAX_LAST_EXITS {
        return Vec::new();
    }
    let mut by_age: Vec<(&String, DateTime<Utc>)> =
        exits.iter().map(|(k, v)| (k, v.exited_at)).collect();
    by_age.sort_by_key(|(_, at)| *at);
    let old: Vec<String> = by_age[..exits.len() - MAX_LAST_EXITS]
        .iter()
        .map(|(k, _)| (*k).clone())
        .collect();
    old.into_iter()
        .filter_map(|k| exits.remove_entry(&k))
        .collect()
}

fn status_of(state: &State, job_id: &str) -> Option<VmaJobStatus> {
    let running = state
        .processes
        .values()
        .filter(|e| e.job_id == job_id)
        .max_by_key(|e| (e.first_seen, e.process.start_time));
    let state = match (running, state.last_exits.get(job_id)) {
        (Some(e), _) => JobProcessState::Running {
            process: e.process,
            since: e.first_seen,
            found_by: e.found_by,
        },
        (None, Some(x)) => JobProcessState::Exited {
            process: x.process,
            exit: x.exit,
            exited_at: x.exited_at,
            detector: x.detector,
        },
        (None, None) => return None,
    };
    Some(VmaJobStatus {
        job_id: job_id.to_owned(),
        state,
    })
}

#[cfg(test)]
mod tests;
