//! The outbox's exactly-once promise, checked from the watchdog's own files and the OMA's
//! audit trail while the soak runs (called from `invariants.rs`):
//!
//! - every process death of a soak job is one event: never two death event ids for the same
//!   process (`events.jsonl`, read every check, remembered across compactions);
//! - an id acknowledged once is never acknowledged again after the acknowledgements were
//!   compacted away (it would have been queued and delivered again); a line repeated within
//!   one generation is an append retried after a failed fsync, which is allowed;
//! - no event id drives two transitions at the OMA (the audit's evidence carries it);
//! - at the end, every event appended for a soak job is acknowledged. An event gone from
//!   `events.jsonl` counts as acknowledged: the outbox drops lines only when it compacts, and a
//!   compaction keeps every pending event; the ack line may have come and gone between two
//!   reads (soak seed 6821138225733380978: acknowledged, then compacted by a restart 2 s
//!   later). It may then never be acknowledged again.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use api::{ProcessEvent, ProcessEventKind, ProcessIdentity};
use uuid::Uuid;

/// What the outbox's files have shown so far.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every event of a soak job seen in `events.jsonl`.
    events: HashMap<Uuid, ProcessEvent>,
    /// The death event id of each process.
    deaths: HashMap<ProcessIdentity, Uuid>,
    /// The acknowledgement file's ids as last read, in order.
    acks_now: Vec<Uuid>,
    /// Ids acknowledged in earlier generations (before a compaction emptied the file).
    acked_before: HashSet<Uuid>,
    /// Events appended (distinct ids), for the report.
    pub appended: usize,
}

#[derive(serde::Deserialize)]
struct Stored {
    event: ProcessEvent,
}

fn lines(path: &Path) -> Vec<String> {
    read_lines(path).unwrap_or_default()
}

/// The lines of `path`, or `None` when it cannot be read.
fn read_lines(path: &Path) -> Option<Vec<String>> {
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.lines().map(str::to_owned).collect())
}

impl Ledger {
    /// Reads the outbox in `state/outbox` once; `prefix` selects the soak's jobs.
    pub fn read(&mut self, state: &Path, prefix: &str) -> Result<(), String> {
        let dir = state.join("outbox");
        let Some(file) = read_lines(&dir.join("events.jsonl")) else {
            // Not there yet (before the first start), or unreadable this once.
            return Ok(());
        };
        let mut present = HashSet::new();
        for line in file {
            // A torn last line (read during an append) parses next time.
            let Ok(stored) = serde_json::from_str::<Stored>(&line) else {
                continue;
            };
            present.insert(stored.event.event_id);
            self.event(stored.event, prefix)?;
        }
        // Compacted away: acknowledged (see the module's documentation). Counted once the
        // acknowledgements are read: the acks file may still be the older generation's.
        let gone = self.events.keys().filter(|id| !present.contains(id));
        let gone: Vec<Uuid> = gone.copied().collect();
        let acks: Vec<Uuid> = lines(&dir.join("acks.jsonl"))
            .iter()
            .filter_map(|l| serde_json::from_str::<Uuid>(l).ok())
            .collect();
        let same_generation =
            acks.len() >= self.acks_now.len() && acks[..self.acks_now.len()] == self.acks_now[..];
        if !same_generation {
            self.acked_before.extend(self.acks_now.drain(..));
        }
        if let Some(again) = acks.iter().find(|id| self.acked_before.contains(id)) {
            let what = self.events.get(again).map(|e| e.job_id.to_string());
            return Err(format!(
                "outbox: event {again} (job {what:?}) was acknowledged again after its acknowledgement had been compacted away: it was queued and delivered twice"
            ));
        }
        self.acks_now = acks;
        let gone = gone.into_iter().filter(|id| !self.acks_now.contains(id));
        self.acked_before.extend(gone.collect::<Vec<_>>());
        Ok(())
    }

    fn event(&mut self, event: ProcessEvent, prefix: &str) -> Result<(), String> {
        if !event.job_id.as_str().starts_with(prefix) || self.events.contains_key(&event.event_id) {
            return Ok(());
        }
        if event.kind != ProcessEventKind::ProcessStarted {
            let first = *self.deaths.entry(event.process).or_insert(event.event_id);
            if first != event.event_id {
                return Err(format!(
                    "outbox: the death of job {} (pid {}, start time {}) was recorded twice, as events {first} and {}",
                    event.job_id, event.process.pid, event.process.start_time, event.event_id
                ));
            }
        }
        self.appended += 1;
        self.events.insert(event.event_id, event);
        Ok(())
    }

    /// Events appended for soak jobs and not acknowledged (yet).
    pub fn unacknowledged(&self) -> Vec<&ProcessEvent> {
        let acked: HashSet<&Uuid> = self.acks_now.iter().chain(&self.acked_before).collect();
        self.events
            .values()
            .filter(|e| !acked.contains(&e.event_id))
            .collect()
    }
}

/// No event id drives two transitions in one job's audit trail.
pub fn applied_once(job: &str, audit: &[oma::model::AuditEntry]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for entry in audit.iter().filter(|a| a.from_status != Some(a.to_status)) {
        let Some(id) = crate::system::json_find(&entry.evidence, "event_id") else {
            continue;
        };
        if !seen.insert(id.to_string()) {
            return Err(format!(
                "job {job}: event {id} was applied twice at the OMA: {audit:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(job: &str, pid: u32) -> ProcessEvent {
        ProcessEvent {
            event_id: Uuid::now_v7(),
            kind: ProcessEventKind::ProcessExited,
            job_id: api::JobId::parse(job).unwrap(),
            process: ProcessIdentity { pid, start_time: 7 },
            exit: None,
            observed_at: chrono::Utc::now(),
            detector: api::Detector::Procfs,
            last_progress: None,
        }
    }

    fn write(state: &Path, events: &[&ProcessEvent], acks: &[Uuid]) {
        let dir = state.join("outbox");
        std::fs::create_dir_all(&dir).unwrap();
        let lines: String = events
            .iter()
            .map(|e| format!("{}\n", serde_json::json!({ "event": e })))
            .collect();
        std::fs::write(dir.join("events.jsonl"), lines).unwrap();
        let acks: String = acks.iter().map(|a| format!("\"{a}\"\n")).collect();
        std::fs::write(dir.join("acks.jsonl"), acks).unwrap();
    }

    #[test]
    fn an_event_compacted_away_between_two_reads_was_acknowledged_once() {
        let state = tempfile::tempdir().unwrap();
        let (a, b) = (event("soak-1-1", 10), event("soak-1-2", 11));
        let mut ledger = Ledger::default();
        write(state.path(), &[&a, &b], &[]);
        ledger.read(state.path(), "soak-1-").unwrap();
        assert_eq!(ledger.unacknowledged().len(), 2);
        // `a` acknowledged, then compacted away before the next read saw its ack.
        write(state.path(), &[&b], &[]);
        ledger.read(state.path(), "soak-1-").unwrap();
        let pending: Vec<Uuid> = ledger.unacknowledged().iter().map(|e| e.event_id).collect();
        assert_eq!(pending, vec![b.event_id]);
        // Acknowledged again later: it was delivered twice.
        write(state.path(), &[&b], &[a.event_id]);
        let error = ledger.read(state.path(), "soak-1-").unwrap_err();
        assert!(error.contains("acknowledged again"), "{error}");
    }

    #[test]
    fn a_compaction_read_between_its_two_files_is_no_double_acknowledgement() {
        let state = tempfile::tempdir().unwrap();
        let a = event("soak-2-1", 10);
        let mut ledger = Ledger::default();
        write(state.path(), &[&a], &[]);
        ledger.read(state.path(), "soak-2-").unwrap();
        // The new events file without `a`, the acks file still the old one with its ack.
        write(state.path(), &[], &[a.event_id]);
        ledger.read(state.path(), "soak-2-").unwrap();
        // Then the new, empty acks file.
        write(state.path(), &[], &[]);
        ledger.read(state.path(), "soak-2-").unwrap();
        assert!(ledger.unacknowledged().is_empty());
    }
}
