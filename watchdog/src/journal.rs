//! The local journal: every process event, one JSON line each, appended and fsynced before
//! anything else happens to it. The OMA delivery (outbox) reads from here.
//!
//! Each line is an [`api::ProcessEvent`]; its `event_id` (UUID v7, so ids sort by time) is
//! assigned here, when the event is first written, and never changes afterwards.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use api::{Detector, ExitStatus, ProcessEvent, ProcessEventKind, ProcessIdentity};
use chrono::Utc;
use uuid::Uuid;

/// File name of the journal inside the state directory.
pub const FILE_NAME: &str = "journal.jsonl";

/// What failed while writing or reading the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal could not be opened or repaired.
    #[error(
        "cannot open the event journal {path}: {source}; check the state directory's permissions"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An event could not be written durably.
    #[error(
        "cannot append to the event journal {path}: {source}; check free space in the state directory"
    )]
    Append {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The journal could not be read.
    #[error("cannot read the event journal {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// The append side of the journal. Appends from several tasks are serialized.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

impl Journal {
    /// Opens (or creates) the journal in `state_dir`.
    ///
    /// A crash in the middle of an append can leave a last line without its newline; a newline
    /// is added then, so the next event starts on a line of its own and the torn one is skipped
    /// by readers instead of corrupting its successor.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let path = state_dir.join(FILE_NAME);
        let open = || -> io::Result<File> {
            let mut file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&path)?;
            let len = file.metadata()?.len();
            if len > 0 {
                let mut last = [0u8; 1];
                file.seek(SeekFrom::Start(len - 1))?;
                file.read_exact(&mut last)?;
                if last[0] != b'\n' {
                    file.write_all(b"\n")?;
                    file.sync_data()?;
                }
            } else {
                // A new file: make its directory entry durable too.
                File::open(state_dir)?.sync_all()?;
            }
            Ok(file)
        };
        let file = open().map_err(|source| JournalError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Builds an event with a fresh id and the current time, writes it and syncs it to disk.
    /// The event is returned only once it is durable.
    pub fn record(
        &self,
        kind: ProcessEventKind,
        job_id: &str,
        process: ProcessIdentity,
        exit: Option<ExitStatus>,
        detector: Detector,
    ) -> Result<ProcessEvent, JournalError> {
        let event = ProcessEvent {
            event_id: Uuid::now_v7(),
            kind,
            job_id: job_id.to_owned(),
            process,
            exit,
            observed_at: Utc::now(),
            detector,
        };
        let mut line = serde_json::to_vec(&event).map_err(|e| JournalError::Append {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // One write call per line: with O_APPEND the line lands whole at the end.
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(|source| JournalError::Append {
                path: self.path.clone(),
                source,
            })?;
        Ok(event)
    }
}

/// Reads every complete event of the journal at `path`, oldest first. Lines that do not parse
/// (a torn last line after a crash) are skipped; an absent journal reads as empty.
pub fn read_events(path: &Path) -> Result<Vec<ProcessEvent>, JournalError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(JournalError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut events = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|source| JournalError::Read {
            path: path.to_owned(),
            source,
        })?;
        if let Ok(event) = serde_json::from_str(&line) {
            events.push(event);
        }
    }
    Ok(events)
}

/// Size of the journal in bytes (0 when absent), for the outbox's bound on disk use.
pub fn size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> ProcessIdentity {
        ProcessIdentity {
            pid: 7,
            start_time: 70,
        }
    }

    #[test]
    fn events_are_appended_with_distinct_ordered_ids_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let exit = ExitStatus::from_wait_status(0x300, false);
        let a = j
            .record(
                ProcessEventKind::ProcessStarted,
                "job",
                p(),
                None,
                Detector::Procfs,
            )
            .unwrap();
        let b = j
            .record(
                ProcessEventKind::ProcessExited,
                "job",
                p(),
                Some(exit),
                Detector::Procfs,
            )
            .unwrap();
        assert!(a.event_id < b.event_id, "v7 ids sort by time");
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let c = j
            .record(
                ProcessEventKind::DiedWhileUnwatched,
                "job2",
                p(),
                None,
                Detector::Registry,
            )
            .unwrap();
        assert_eq!(read_events(j.path()).unwrap(), vec![a, b, c]);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_does_not_swallow_the_next_event() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let a = j
            .record(
                ProcessEventKind::ProcessStarted,
                "job",
                p(),
                None,
                Detector::Procfs,
            )
            .unwrap();
        let path = j.path().to_owned();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"event_id":"0190"#).unwrap();
        drop(f);
        let j = Journal::open(dir.path()).unwrap();
        let b = j
            .record(
                ProcessEventKind::DiedWhileUnwatched,
                "job",
                p(),
                None,
                Detector::Registry,
            )
            .unwrap();
        assert_eq!(read_events(&path).unwrap(), vec![a, b]);
        assert!(size(&path) > 0);
    }

    #[test]
    fn an_absent_journal_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_events(&dir.path().join(FILE_NAME)).unwrap().is_empty());
    }
}
