//! One-time import of the journal file older versions kept beside the outbox.
//!
//! Before the outbox became the daemon's only event file, every event was also appended to
//! `<state dir>/journal.jsonl`. At start, the events of such a file that the outbox does not
//! hold are queued (the OMA applies each event id at most once, so one delivered before and
//! queued again changes nothing), and the file is renamed `journal.jsonl.imported` so that
//! the import runs once.

use std::collections::HashSet;
use std::path::Path;

use api::ProcessEvent;

use crate::disk::read_json_lines;
use crate::outbox::Outbox;

/// File name of the old journal inside the state directory.
pub const LEGACY_JOURNAL: &str = "journal.jsonl";

/// Queues the old journal's events that `outbox` does not hold, then renames the file. A
/// failure is logged and the file left in place, so the next start tries again.
pub(super) fn import_journal(state_dir: &Path, outbox: &Outbox) {
    let path = state_dir.join(LEGACY_JOURNAL);
    if !path.exists() {
        return;
    }
    let events = match read_json_lines::<ProcessEvent>(&path) {
        Ok((events, _)) => events,
        Err(error) => {
            tracing::error!(%error, file = %path.display(), "cannot read the old event journal; it is left in place and read again at the next start");
            return;
        }
    };
    let queued: HashSet<_> = outbox
        .peek(usize::MAX)
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    let mut imported = 0;
    for event in events {
        if queued.contains(&event.event_id) {
            continue;
        }
        if let Err(error) = outbox.append(event) {
            tracing::error!(%error, file = %path.display(), "cannot import the old event journal into the outbox; it is left in place and imported at the next start");
            return;
        }
        imported += 1;
    }
    let done = state_dir.join(format!("{LEGACY_JOURNAL}.imported"));
    if let Err(error) = std::fs::rename(&path, &done) {
        tracing::warn!(%error, file = %path.display(), "cannot rename the imported journal; its events will be queued again at the next start (the OMA ignores repeats)");
    }
    tracing::info!(
        imported,
        file = %done.display(),
        "imported the old event journal into the outbox"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxLimits;
    use api::{Detector, ProcessEventKind, ProcessIdentity};

    fn event(pid: u32) -> ProcessEvent {
        ProcessEvent {
            event_id: uuid::Uuid::now_v7(),
            kind: ProcessEventKind::DiedWhileUnwatched,
            job_id: api::JobId::parse("job").unwrap(),
            process: ProcessIdentity { pid, start_time: 1 },
            exit: None,
            observed_at: chrono::Utc::now(),
            detector: Detector::Registry,
            last_progress: None,
        }
    }

    #[test]
    fn events_not_queued_are_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox"), OutboxLimits::default()).unwrap();
        let (a, b) = (event(1), event(2));
        outbox.append(a.clone()).unwrap();
        let lines = format!(
            "{}\n{}\n",
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        std::fs::write(dir.path().join(LEGACY_JOURNAL), lines).unwrap();
        import_journal(dir.path(), &outbox);
        assert_eq!(outbox.peek(10), vec![a, b]);
        assert!(!dir.path().join(LEGACY_JOURNAL).exists());
        import_journal(dir.path(), &outbox);
        assert_eq!(outbox.peek(10).len(), 2);
    }
}
