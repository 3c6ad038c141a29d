//! The outbox forgets an acknowledged death only once the registry's file holds it, so a
//! crash never leaves a death known to neither (reported twice at the next start).

use std::fs;
use std::sync::Arc;

use api::{Detector, ExitStatus, FoundBy, ProcessEvent, ProcessEventKind, ProcessIdentity};
use uuid::Uuid;
use vma_watchdog::outbox::{AckBarrier, Outbox, OutboxError, OutboxLimits};
use vma_watchdog::registry::Registry;

fn death(process: ProcessIdentity) -> ProcessEvent {
    ProcessEvent {
        event_id: Uuid::now_v7(),
        kind: ProcessEventKind::ProcessExited,
        job_id: api::JobId::parse("job-a").unwrap(),
        process,
        exit: Some(ExitStatus::from_wait_status(9, false)),
        observed_at: chrono::Utc::now(),
        detector: Detector::Ebpf,
        last_progress: None,
    }
}

const P: ProcessIdentity = ProcessIdentity {
    pid: 4242,
    start_time: 777,
};

/// A registry in `state` and an outbox beside it that waits for the registry, as the daemon
/// wires them.
fn wired(state: &std::path::Path, outbox_dir: &std::path::Path) -> (Arc<Registry>, Outbox) {
    let registry = Arc::new(Registry::open(state).unwrap());
    let outbox = Outbox::open(outbox_dir, OutboxLimits::default()).unwrap();
    outbox
        .set_ack_barrier(Arc::clone(&registry) as Arc<dyn AckBarrier>)
        .unwrap();
    (registry, outbox)
}

#[test]
fn acknowledging_writes_the_registry_first() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, outbox) = wired(dir.path(), &dir.path().join("outbox"));
    registry
        .register(P, &api::JobId::parse("job-a").unwrap(), FoundBy::Started)
        .unwrap();
    let exit = ExitStatus::from_wait_status(9, false);
    registry.record_exit(P, exit, Detector::Ebpf).unwrap();
    let event = death(P);
    outbox.append(event.clone()).unwrap();
    assert_eq!(
        Registry::open(dir.path()).unwrap().running().len(),
        1,
        "the death is not in the file yet"
    );
    assert_eq!(outbox.pending_death(P), Some(event.clone()));

    assert_eq!(outbox.acknowledge(&[event.event_id]).unwrap(), 1);
    let on_disk = Registry::open(dir.path()).unwrap();
    assert!(on_disk.running().is_empty());
    assert_eq!(on_disk.exit_of(P).map(|x| x.exit), Some(exit));
    assert_eq!(outbox.pending_death(P), None);
}

#[test]
fn when_the_registry_cannot_be_written_the_events_stay_queued() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    let (registry, outbox) = wired(&state, &dir.path().join("outbox"));
    registry
        .register(P, &api::JobId::parse("job-a").unwrap(), FoundBy::Started)
        .unwrap();
    registry.record_exit(P, ExitStatus::default(), Detector::Ebpf);
    let event = death(P);
    outbox.append(event.clone()).unwrap();
    fs::remove_dir_all(&state).unwrap();

    let err = outbox.acknowledge(&[event.event_id]).unwrap_err();
    assert!(matches!(err, OutboxError::Barrier(_)), "{err}");
    assert!(err.to_string().contains("sent again"), "{err}");
    assert!(
        err.to_string()
            .contains("cannot write the process registry"),
        "{err}"
    );
    assert_eq!(outbox.peek(10), std::slice::from_ref(&event));

    fs::create_dir(&state).unwrap();
    assert_eq!(outbox.acknowledge(&[event.event_id]).unwrap(), 1);
    assert!(outbox.peek(10).is_empty());
    assert!(Registry::open(&state).unwrap().exit_of(P).is_some());
}

#[test]
fn a_second_barrier_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, outbox) = wired(dir.path(), &dir.path().join("outbox"));
    assert!(outbox.set_ack_barrier(registry).is_err());
}
