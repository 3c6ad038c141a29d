//! The outbox's exactly-once promise, checked from the watchdog's own files and the OMA's
//! audit trail while the soak runs (called from `invariants.rs`):
//!
//! - every process death of a soak job is one event: never two death event ids for the same
//!   process (`events.jsonl`, read every check, remembered across compactions);
//! - an id acknowledged once is never acknowledged again after the acknowledgements were
//!   compacted away (it would have been queued and delivered again); a line repeated within
//!   one generation is an append retried after a failed fsync, which is allowed;
//! - no event id drives two transitions at the OMA (the audit's evidence carries it);
//! - at the end, every event appended for a soak job is acknowledged.

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
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

impl Ledger {
    /// Reads the outbox in `state/outbox` once; `prefix` selects the soak's jobs.
    pub fn read(&mut self, state: &Path, prefix: &str) -> Result<(), String> {
        let dir = state.join("outbox");
        for line in lines(&dir.join("events.jsonl")) {
            // A torn last line (read during an append) parses next time.
            let Ok(stored) = serde_json::from_str::<Stored>(&line) else {
                continue;
            };
            self.event(stored.event, prefix)?;
        }
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
