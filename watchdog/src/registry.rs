//! The process registry: which migratekit processes run which job, kept on disk.
//!
//! After a restart it says what was running before, so that a death during the downtime is
//! still reported. Processes are keyed by `(pid, start time)`, never by pid alone. The file is
//! replaced atomically (temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves either the old or the new registry, never half of one. It holds job ids, pids, start
//! times and dates only: nothing from a command line but the job id.
//!
//! A registration is on disk before [`Registry::register`] returns. A death is not: it changes
//! memory at once and reaches the disk a moment later ([`Registry::spawn_flusher`]), or at the
//! next [`Registry::flush`]. Writing the file costs two fsyncs and a rename (tens of
//! milliseconds on a busy disk), and on the path of a death it would delay the OMA's commit
//! of that death, which shares the disk on a one-box install. The death itself is already
//! durable in the outbox; the daemon flushes the registry before the outbox forgets an
//! acknowledged event, and at start it takes a death still queued in the outbox for recorded.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use api::{Detector, ExitStatus, FoundBy, JobId, JobProcessState, ProcessIdentity, VmaJobStatus};
use chrono::{DateTime, Utc};
use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use crate::disk;
use crate::trust::ExeId;

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
    pub job_id: JobId,
    /// When the watchdog first saw it.
    pub first_seen: DateTime<Utc>,
    /// How the watchdog found it.
    pub found_by: FoundBy,
    /// The executable it runs (device and inode) when it was registered: after a restart, a
    /// process whose binary a package upgrade has since replaced on disk is still recognised
    /// by it. Absent in files written before this field existed, and when it was unreadable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<ExeId>,
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

/// The file as read: entries stay raw JSON and last exits keep their keys as text until
/// each job id has been checked, so that one id a newer rule refuses (an older watchdog took
/// `:` in job ids) skips that entry instead of stopping the daemon.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    processes: Vec<serde_json::Value>,
    last_exits: BTreeMap<String, LastExit>,
}

/// The maps are shared with the write in progress: [`Registry::flush`] takes a snapshot under
/// the lock in O(1) and encodes it outside (2.9 MB of JSON at 10,000 last exits took 12-18 ms,
/// which a death or a status read waited for). A change made meanwhile copies the (small) map
/// of running processes, or O(log n) nodes of the persistent map of last exits.
#[derive(Debug, Default)]
struct State {
    processes: Arc<BTreeMap<(u32, u64), Entry>>,
    last_exits: LastExits,
    /// Counts changes in memory; `written` is the count the file on disk holds.
    generation: u64,
    written: u64,
}

impl State {
    fn changed(&mut self) {
        self.generation += 1;
    }

    fn dirty(&self) -> bool {
        self.written != self.generation
    }
}

/// The registry, shared by the daemon and the REST API. Registrations are on disk when
/// [`Registry::register`] returns; deaths shortly after [`Registry::record_exit`] (see the
/// module's documentation).
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    state: Mutex<State>,
    /// Signalled on every change, for the flusher.
    changed: Condvar,
    /// Held while the file is written, so that writes happen one at a time, each with a
    /// snapshot taken under it: a later write never carries older state.
    writer: Mutex<()>,
    /// Writes of the file that failed since start (the metric `registry_write_errors_total`).
    write_errors: std::sync::atomic::AtomicU64,
}

/// What to undo in memory when a registration could not be written.
enum Undo {
    Remove,
    Restore(Entry),
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
        let processes = valid_entries(&path, disk.processes)?;
        let state = State {
            processes: Arc::new(processes.into_iter().map(|e| (key(e.process), e)).collect()),
            last_exits: LastExits::from_file(valid_last_exits(&path, disk.last_exits)),
            generation: 0,
            written: 0,
        };
        Ok(Self {
            dir: state_dir.to_owned(),
            state: Mutex::new(state),
            changed: Condvar::new(),
            writer: Mutex::new(()),
            write_errors: std::sync::atomic::AtomicU64::new(0),
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

    /// Records a running process of `job_id`, on disk before returning. Returns `false` when
    /// the process was already registered, or has already died as this job's process: that
    /// changes nothing, except that an explicit registration (`Started`, `Tracked`) overrides
    /// what a scan or exec event recorded first (the detector often sees a process the
    /// watchdog started before the starter gets to register it).
    pub fn register(
        &self,
        process: ProcessIdentity,
        job_id: &JobId,
        found_by: FoundBy,
    ) -> Result<bool, RegistryError> {
        self.register_exe(process, job_id, found_by, None)
    }

    /// [`Registry::register`], recording the executable the process runs (see [`Entry::exe`]).
    pub fn register_exe(
        &self,
        process: ProcessIdentity,
        job_id: &JobId,
        found_by: FoundBy,
        exe: Option<ExeId>,
    ) -> Result<bool, RegistryError> {
        let explicit = |f: FoundBy| matches!(f, FoundBy::Started | FoundBy::Tracked);
        let undo = {
            let mut state = self.lock();
            let undo = if let Some(existing) =
                Arc::make_mut(&mut state.processes).get_mut(&key(process))
            {
                if !explicit(found_by) || explicit(existing.found_by) {
                    return Ok(false);
                }
                let before = existing.clone();
                existing.found_by = found_by;
                existing.job_id = job_id.clone();
                existing.exe = exe.or(existing.exe);
                Undo::Restore(before)
            } else if state
                .last_exits
                .get(job_id)
                .is_some_and(|x| x.process == process)
            {
                // Its death has been recorded already: registering it again would report it
                // twice.
                return Ok(false);
            } else {
                let entry = Entry {
                    process,
                    job_id: job_id.clone(),
                    first_seen: Utc::now(),
                    found_by,
                    exe,
                };
                Arc::make_mut(&mut state.processes).insert(key(process), entry);
                Undo::Remove
            };
            // In the same critical section as the change, so that no write in between can
            // hold the change while claiming an older generation.
            state.changed();
            undo
        };
        self.changed.notify_all();
        if let Err(e) = self.flush() {
            // Memory never claims a registration the disk does not hold. Should the process
            // have died meanwhile, its recorded death stays.
            let mut state = self.lock();
            match undo {
                Undo::Remove => {
                    Arc::make_mut(&mut state.processes).remove(&key(process));
                }
                Undo::Restore(before) => {
                    if let Some(entry) = Arc::make_mut(&mut state.processes).get_mut(&key(process))
                    {
                        *entry = before;
                    }
                }
            }
            state.changed();
            return Err(e);
        }
        Ok(matches!(undo, Undo::Remove))
    }

    /// Records that `process` ended and forgets it as running, in memory at once; the file
    /// follows (see the module's documentation). Returns its entry, or `None` (changing
    /// nothing) when it was not registered, so a death is recorded at most once.
    pub fn record_exit(
        &self,
        process: ProcessIdentity,
        exit: ExitStatus,
        detector: Detector,
    ) -> Option<Entry> {
        let mut state = self.lock();
        if !state.processes.contains_key(&key(process)) {
            return None;
        }
        let entry = Arc::make_mut(&mut state.processes).remove(&key(process))?;
        let last = LastExit {
            process,
            exit,
            exited_at: Utc::now(),
            detector,
        };
        state.last_exits.insert(entry.job_id.clone(), last);
        state.changed();
        drop(state);
        self.changed.notify_all();
        Some(entry)
    }

    /// Writes every change made so far to disk (nothing when there is none), and returns once
    /// it is durable.
    pub fn flush(&self) -> Result<(), RegistryError> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (generation, processes, last_exits) = {
            let state = self.lock();
            if !state.dirty() {
                return Ok(());
            }
            let State {
                processes,
                last_exits,
                generation,
                ..
            } = &*state;
            (
                *generation,
                Arc::clone(processes),
                last_exits.by_job().clone(),
            )
        };
        encode(&processes, &last_exits)
            // Replaced whole and created anew with mode 0600: the registry names every job
            // and process.
            .and_then(|bytes| disk::replace_atomically(&self.path(), &bytes))
            .map_err(|source| {
                self.write_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                RegistryError::Write {
                    path: self.path(),
                    source,
                }
            })?;
        let mut state = self.lock();
        state.written = state.written.max(generation);
        Ok(())
    }

    /// How many writes of the file have failed since the registry was opened.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether changes are waiting to be written.
    pub fn is_dirty(&self) -> bool {
        self.lock().dirty()
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
            .exits()
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
        let mut ids: Vec<&JobId> = state.processes.values().map(|e| &e.job_id).collect();
        ids.extend(state.last_exits.jobs());
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| status_of(&state, id))
            .collect()
    }
}

/// The registry as its file holds it: pretty JSON, so an operator can read it.
fn encode(
    processes: &BTreeMap<(u32, u64), Entry>,
    last_exits: &OrdMap<JobId, LastExit>,
) -> io::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Borrowed<'a> {
        version: u32,
        processes: Vec<&'a Entry>,
        last_exits: &'a OrdMap<JobId, LastExit>,
    }
    let disk = Borrowed {
        version: FORMAT_VERSION,
        processes: processes.values().collect(),
        last_exits,
    };
    let mut bytes = serde_json::to_vec_pretty(&disk).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
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
    // Only valid ids are ever stored, so an id that matched one parses.
    let job_id = JobId::parse(job_id).ok()?;
    Some(VmaJobStatus { job_id, state })
}

/// The registered processes of the file, less those whose job id breaks the rule (each
/// skipped with a warning). Any other defect is corruption, as before.
fn valid_entries(path: &Path, raw: Vec<serde_json::Value>) -> Result<Vec<Entry>, RegistryError> {
    let mut entries = Vec::with_capacity(raw.len());
    for value in raw {
        let id = value
            .get("job_id")
            .and_then(|v| v.as_str())
            .map(JobId::parse);
        if let Some(Err(error)) = id {
            let pid = value.pointer("/process/pid").and_then(|v| v.as_u64());
            tracing::warn!(event = "registry_entry_skipped", file = %path.display(), pid,
                reason = %error, "skipped a registered process whose job id is not valid under the job-id rule; it is no longer watched and its death will not be reported");
            continue;
        }
        let entry = serde_json::from_value(value).map_err(|source| RegistryError::Corrupt {
            path: path.to_owned(),
            source,
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

/// The last exits of the file, less those whose job id breaks the rule (each skipped with a
/// warning).
fn valid_last_exits(path: &Path, raw: BTreeMap<String, LastExit>) -> BTreeMap<JobId, LastExit> {
    raw.into_iter()
        .filter_map(|(id, last)| match JobId::parse(&id) {
            Ok(id) => Some((id, last)),
            Err(error) => {
                tracing::warn!(event = "registry_entry_skipped", file = %path.display(),
                    pid = last.process.pid, reason = %error,
                    "skipped the last exit of a job whose id is not valid under the job-id rule");
                None
            }
        })
        .collect()
}

mod flush;
mod last_exits;

use last_exits::LastExits;

pub use flush::FLUSH_DELAY;

#[cfg(test)]
mod tests;
