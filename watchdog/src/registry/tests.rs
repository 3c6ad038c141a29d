use super::*;

fn p(pid: u32, start_time: u64) -> ProcessIdentity {
    ProcessIdentity { pid, start_time }
}

fn id(text: &str) -> JobId {
    JobId::parse(text).unwrap()
}

#[test]
fn an_empty_state_dir_gives_an_empty_registry() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(dir.path()).unwrap();
    assert!(r.running().is_empty());
    assert!(r.jobs().is_empty());
    assert_eq!(r.job_status("nope"), None);
    assert!(!r.path().exists(), "opening alone writes nothing");
}

#[test]
fn registrations_and_exits_survive_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(dir.path()).unwrap();
    assert!(r.register(p(10, 100), &id("job-a"), FoundBy::Scan).unwrap());
    assert!(
        !r.register(p(10, 100), &id("job-a"), FoundBy::Exec).unwrap(),
        "idempotent"
    );
    assert!(
        r.register(p(11, 110), &id("job-b"), FoundBy::Started)
            .unwrap()
    );
    let exit = ExitStatus::from_wait_status(9, false);
    assert!(r.exit_of(p(11, 110)).is_none());
    let gone = r.record_exit(p(11, 110), exit, Detector::Procfs);
    assert_eq!(r.exit_of(p(11, 110)).map(|x| x.exit), Some(exit));
    assert_eq!(gone.map(|e| e.job_id).as_deref(), Some("job-b"));
    assert_eq!(
        r.record_exit(p(11, 110), exit, Detector::Procfs),
        None,
        "once"
    );
    r.flush().unwrap();
    drop(r);

    let r = Registry::open(dir.path()).unwrap();
    let running = r.running();
    assert_eq!(running.len(), 1);
    assert_eq!(
        (running[0].process, running[0].found_by),
        (p(10, 100), FoundBy::Scan)
    );
    match r.job_status("job-a").unwrap().state {
        JobProcessState::Running {
            process, found_by, ..
        } => {
            assert_eq!((process, found_by), (p(10, 100), FoundBy::Scan));
        }
        other => panic!("job-a should run, got {other:?}"),
    }
    match r.job_status("job-b").unwrap().state {
        JobProcessState::Exited {
            process,
            exit: e,
            detector,
            ..
        } => {
            assert_eq!((process, e, detector), (p(11, 110), exit, Detector::Procfs));
        }
        other => panic!("job-b should have exited, got {other:?}"),
    }
    let ids: Vec<String> = r
        .jobs()
        .into_iter()
        .map(|j| j.job_id.into_string())
        .collect();
    assert_eq!(ids, ["job-a", "job-b"]);
}

#[test]
fn the_same_pid_with_another_start_time_is_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(dir.path()).unwrap();
    r.register(p(10, 100), &id("old"), FoundBy::Scan).unwrap();
    assert!(r.register(p(10, 200), &id("new"), FoundBy::Exec).unwrap());
    assert_eq!(r.get(p(10, 100)).unwrap().job_id, "old");
    assert_eq!(r.get(p(10, 200)).unwrap().job_id, "new");
    assert_eq!(
        r.record_exit(p(10, 300), ExitStatus::default(), Detector::Procfs),
        None
    );
}

#[test]
fn a_running_process_wins_over_an_older_exit_of_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(dir.path()).unwrap();
    r.register(p(1, 1), &id("job"), FoundBy::Scan).unwrap();
    r.record_exit(p(1, 1), ExitStatus::default(), Detector::Registry);
    r.register(p(2, 2), &id("job"), FoundBy::Started).unwrap();
    assert!(matches!(
        r.job_status("job").unwrap().state,
        JobProcessState::Running { process, .. } if process == p(2, 2)
    ));
}

#[test]
fn a_leftover_temporary_file_from_a_crash_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(dir.path()).unwrap();
    r.register(p(10, 100), &id("job-a"), FoundBy::Scan).unwrap();
    drop(r);
    // A crash in the middle of the next save leaves a half-written temporary file.
    fs::write(
        dir.path().join(format!("{FILE_NAME}.tmp")),
        b"{\"version\":1,\"proc",
    )
    .unwrap();
    let r = Registry::open(dir.path()).unwrap();
    assert_eq!(r.running().len(), 1);
    // And the next save replaces it.
    r.register(p(11, 110), &id("job-b"), FoundBy::Scan).unwrap();
    assert_eq!(Registry::open(dir.path()).unwrap().running().len(), 2);
}

#[test]
fn a_failed_registration_changes_nothing_in_memory_and_a_failed_flush_keeps_the_death() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    let r = Registry::open(&state).unwrap();
    r.register(p(10, 100), &id("job-a"), FoundBy::Scan).unwrap();
    fs::remove_dir_all(&state).unwrap();
    let err = r
        .register(p(11, 110), &id("job-b"), FoundBy::Scan)
        .unwrap_err();
    assert!(matches!(err, RegistryError::Write { .. }), "{err}");
    assert_eq!(r.running().len(), 1);
    assert_eq!(r.job_status("job-b"), None);

    // A death is recorded in memory whatever the disk does; the write fails and says why,
    // and the change waits for the next flush.
    assert!(
        r.record_exit(p(10, 100), ExitStatus::default(), Detector::Procfs)
            .is_some()
    );
    let err = r.flush().unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot write the process registry"),
        "{err}"
    );
    assert!(r.is_dirty());
    assert!(r.running().is_empty());
    fs::create_dir(&state).unwrap();
    r.flush().unwrap();
    assert!(!r.is_dirty());
    let reloaded = Registry::open(&state).unwrap();
    assert!(reloaded.running().is_empty());
    assert!(reloaded.exit_of(p(10, 100)).is_some());
}

#[test]
fn a_death_reaches_the_file_at_the_next_flush_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(dir.path()).unwrap();
    r.register(p(10, 100), &id("job"), FoundBy::Started)
        .unwrap();
    assert!(!r.is_dirty(), "a registration is written before it returns");
    r.record_exit(
        p(10, 100),
        ExitStatus::from_wait_status(9, false),
        Detector::Ebpf,
    );
    assert!(r.is_dirty());
    assert_eq!(Registry::open(dir.path()).unwrap().running().len(), 1);
    r.flush().unwrap();
    let reloaded = Registry::open(dir.path()).unwrap();
    assert!(reloaded.running().is_empty());
    assert_eq!(
        reloaded.exit_of(p(10, 100)).map(|x| x.exit.signal),
        Some(Some(9))
    );
    // Nothing to write: the file is left alone.
    let before = fs::metadata(r.path()).unwrap().modified().unwrap();
    r.flush().unwrap();
    assert_eq!(fs::metadata(r.path()).unwrap().modified().unwrap(), before);
}

#[test]
fn the_flusher_writes_deaths_on_its_own_and_ends_with_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let r = std::sync::Arc::new(Registry::open(dir.path()).unwrap());
    let flusher = r
        .spawn_flusher(std::time::Duration::from_millis(5))
        .unwrap();
    for i in 0..20 {
        r.register(p(i, 1), &id(&format!("job-{i}")), FoundBy::Scan)
            .unwrap();
    }
    for i in 0..20 {
        r.record_exit(p(i, 1), ExitStatus::default(), Detector::Procfs);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r.is_dirty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher never wrote"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let reloaded = Registry::open(dir.path()).unwrap();
    assert!(reloaded.running().is_empty());
    assert_eq!(reloaded.jobs().len(), 20);
    drop(r);
    flusher.join().unwrap();
}

#[test]
fn a_corrupt_or_newer_registry_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(FILE_NAME), b"not json").unwrap();
    let err = Registry::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("move it aside"), "{err}");
    fs::write(
        dir.path().join(FILE_NAME),
        br#"{"version":99,"processes":[],"last_exits":{}}"#,
    )
    .unwrap();
    let err = Registry::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, RegistryError::Version { found: 99, .. }),
        "{err}"
    );
}

/// An older watchdog took ':' in job ids: such an entry is skipped (with a warning), and the
/// rest of the file still loads.
#[test]
fn an_entry_whose_job_id_breaks_the_rule_is_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let exit = r#"{"process":{"pid":3,"start_time":3},"exit":{"code":0,"signal":null,
        "core_dumped":false,"oom_killed":false},"exited_at":"2026-01-01T00:00:00Z",
        "detector":"procfs"}"#;
    let file = format!(
        r#"{{"version":1,"processes":[
            {{"process":{{"pid":1,"start_time":1}},"job_id":"job:old","first_seen":"2026-01-01T00:00:00Z","found_by":"scan"}},
            {{"process":{{"pid":2,"start_time":2}},"job_id":"job-ok","first_seen":"2026-01-01T00:00:00Z","found_by":"scan"}}],
          "last_exits":{{"job:gone":{exit},"job-done":{exit}}}}}"#
    );
    fs::write(dir.path().join(FILE_NAME), file).unwrap();
    let r = Registry::open(dir.path()).unwrap();
    let running: Vec<_> = r.running().into_iter().map(|e| e.job_id).collect();
    assert_eq!(running, [id("job-ok")]);
    assert!(r.job_status("job-done").is_some());
    assert!(r.job_status("job:gone").is_none() && r.job_status("job:old").is_none());
    // A defect other than the id is still corruption.
    fs::write(
        dir.path().join(FILE_NAME),
        br#"{"version":1,"processes":[{"job_id":"job-ok"}],"last_exits":{}}"#,
    )
    .unwrap();
    assert!(matches!(
        Registry::open(dir.path()),
        Err(RegistryError::Corrupt { .. })
    ));
}

#[test]
fn only_the_newest_last_exits_are_kept() {
    let t0 = DateTime::from_timestamp(1_000_000, 0).unwrap();
    let last = |i: usize, at: i64| LastExit {
        process: p(i as u32, 1),
        exit: ExitStatus::default(),
        exited_at: t0 + chrono::Duration::seconds(at),
        detector: Detector::Procfs,
    };
    // Job ids in the reverse order of age, so that id order cannot pass for age order.
    let job = |i: usize| id(&format!("job-{:05}", MAX_LAST_EXITS + 10 - i));
    let mut exits = LastExits::default();
    let mut dropped = Vec::new();
    for i in 0..MAX_LAST_EXITS + 3 {
        dropped.extend(exits.insert(job(i), last(i, i as i64)));
    }
    let names: Vec<&JobId> = dropped.iter().map(|(k, _)| k).collect();
    assert_eq!(names, [&job(0), &job(1), &job(2)]);
    assert_eq!(exits.len(), MAX_LAST_EXITS);
    // A job's newer exit replaces its older one, and makes it the newest: the next job to
    // come in drops the oldest remaining (job(4)), not it.
    assert!(exits.insert(job(3), last(3, 1_000_000)).is_empty());
    let dropped = exits.insert(id("job-new"), last(0, 1_000_001));
    let names: Vec<&JobId> = dropped.iter().map(|(k, _)| k).collect();
    assert_eq!(names, [&job(4)]);
    assert_eq!(
        exits.get(&job(3)).map(|x| x.exited_at.timestamp()),
        Some(2_000_000)
    );
    // Loading a file with more entries than the limit keeps the newest.
    let file: BTreeMap<JobId, LastExit> = (0..MAX_LAST_EXITS + 2)
        .map(|i| (job(i), last(i, i as i64)))
        .collect();
    let loaded = LastExits::from_file(file);
    assert_eq!(loaded.len(), MAX_LAST_EXITS);
    assert!(loaded.get(&job(1)).is_none() && loaded.get(&job(2)).is_some());
}

#[test]
fn an_explicit_registration_overrides_what_a_detector_found_first() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(dir.path()).unwrap();
    r.register(p(10, 100), &id("from-cmdline"), FoundBy::Exec)
        .unwrap();
    assert!(
        !r.register(p(10, 100), &id("from-api"), FoundBy::Started)
            .unwrap()
    );
    let e = Registry::open(dir.path()).unwrap().get(p(10, 100)).unwrap();
    assert_eq!(
        (e.job_id.as_str(), e.found_by),
        ("from-api", FoundBy::Started)
    );
    // A later scan or exec event does not undo it.
    assert!(
        !r.register(p(10, 100), &id("from-cmdline"), FoundBy::Scan)
            .unwrap()
    );
    assert_eq!(r.get(p(10, 100)).unwrap().found_by, FoundBy::Started);
}

#[test]
fn a_process_whose_death_is_recorded_is_not_registered_again() {
    let dir = tempfile::tempdir().unwrap();
    let r = Registry::open(dir.path()).unwrap();
    r.register(p(10, 100), &id("job"), FoundBy::Exec).unwrap();
    r.record_exit(p(10, 100), ExitStatus::default(), Detector::Procfs);
    assert!(
        !r.register(p(10, 100), &id("job"), FoundBy::Started)
            .unwrap()
    );
    assert!(r.running().is_empty());
}
