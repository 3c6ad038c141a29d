use super::*;

/// A real stat line of this kernel with the comm replaced, so field positions are realistic.
fn stat_line(comm: &str) -> String {
    format!(
        "4242 ({comm}) S 1 4242 4242 0 -1 4194560 1335 0 0 0 3 1 0 0 20 0 7 0 987654 \
         1234567 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 2304"
    )
}

#[test]
fn stat_fields_are_found_for_a_plain_name() {
    let s = parse_stat(&stat_line("migratekit")).unwrap();
    assert_eq!(s.pid, 4242);
    assert_eq!(s.comm, "migratekit");
    assert_eq!(s.state, 'S');
    assert_eq!(s.num_threads, 7);
    assert_eq!(s.start_time, 987654);
    assert_eq!(s.exit_code, Some(2304));
}

#[test]
fn stat_fields_are_found_when_the_name_has_spaces_and_parentheses() {
    for comm in ["a b", "x) (y", "))", "((", ") S 1 2 3 (", ""] {
        let s = parse_stat(&stat_line(comm)).unwrap();
        assert_eq!(s.comm, comm, "comm {comm:?}");
        assert_eq!(s.start_time, 987654, "comm {comm:?}");
        assert_eq!(s.state, 'S', "comm {comm:?}");
    }
}

#[test]
fn stat_of_an_old_kernel_without_field_52_has_no_exit_code() {
    let line = "1 (init) S 0 1 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 55 1 1 1";
    let s = parse_stat(line).unwrap();
    assert_eq!((s.start_time, s.exit_code), (55, None));
}

#[test]
fn malformed_stat_lines_are_refused() {
    assert_eq!(parse_stat("garbage"), Err(StatError::NoComm));
    assert_eq!(
        parse_stat("1 (x) S 1 2"),
        Err(StatError::BadField { field: 20 })
    );
    assert_eq!(parse_stat("x (y) S"), Err(StatError::BadField { field: 1 }));
}

#[test]
fn own_stat_parses_and_matches_our_pid() {
    let me = read_stat(std::process::id()).unwrap().unwrap();
    assert_eq!(me.pid, std::process::id());
    assert!(me.start_time > 0);
    assert!(!me.is_zombie());
}

fn cmdline(args: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for a in args {
        v.extend_from_slice(a.as_bytes());
        v.push(0);
    }
    v
}

#[test]
fn job_id_is_taken_from_the_command_line_in_both_spellings() {
    let c = cmdline(&["migratekit", "migrate", "--job-id", "job-20251001-abc"]);
    assert_eq!(job_id_from_cmdline(&c).as_deref(), Some("job-20251001-abc"));
    let c = cmdline(&["migratekit", "migrate", "--job-id=j.1_2"]);
    assert_eq!(job_id_from_cmdline(&c).as_deref(), Some("j.1_2"));
    let c = cmdline(&["migratekit", "migrate", "-job-id", "j2"]);
    assert_eq!(job_id_from_cmdline(&c).as_deref(), Some("j2"));
    assert_eq!(
        job_id_from_cmdline(&cmdline(&["migratekit", "migrate"])),
        None
    );
    assert_eq!(
        job_id_from_cmdline(&cmdline(&["migratekit", "--job-id"])),
        None
    );
}

#[test]
fn the_password_is_never_taken_for_a_job_id() {
    let secret = "--job-id";
    let c = cmdline(&[
        "migratekit",
        "migrate",
        "--vmware-password",
        secret,
        "--job-id",
        "real-job",
    ]);
    assert_eq!(job_id_from_cmdline(&c).as_deref(), Some("real-job"));
    // A password given as `--vmware-password=--job-id=x` is not a job-id flag either.
    let c = cmdline(&["migratekit", "--vmware-password=--job-id=x"]);
    assert_eq!(job_id_from_cmdline(&c), None);
}

#[test]
fn job_ids_with_strange_bytes_are_refused_not_copied() {
    // The one rule of `api::JobId`: no ':' (unit names), and a letter or digit first.
    for bad in ["a b", "p@ss", "x/y", "é", "j:1", "-job", ".job"] {
        let c = cmdline(&["migratekit", "--job-id", bad]);
        assert_eq!(job_id_from_cmdline(&c), None, "{bad:?}");
    }
    let long = "j".repeat(api::JobId::MAX_LEN + 1);
    assert_eq!(
        job_id_from_cmdline(&cmdline(&["m", "--job-id", &long])),
        None
    );
}

#[test]
fn job_id_is_taken_from_the_environment() {
    let env = cmdline(&[
        "PATH=/bin",
        "VMWARE_PASSWORD=hunter2",
        "MIGRATEKIT_JOB_ID=env-job",
    ]);
    assert_eq!(job_id_from_environ(&env).as_deref(), Some("env-job"));
    let env = cmdline(&["MIGRATEKIT_PROGRESS_JOB_ID=progress-job"]);
    assert_eq!(job_id_from_environ(&env).as_deref(), Some("progress-job"));
    let env = cmdline(&["MIGRATEKIT_PROGRESS_JOB_ID=p", "MIGRATEKIT_JOB_ID=m"]);
    assert_eq!(job_id_from_environ(&env).as_deref(), Some("m"));
    assert_eq!(
        job_id_from_environ(&cmdline(&["XMIGRATEKIT_JOB_ID=no"])),
        None
    );
}

#[test]
fn nothing_but_the_job_id_is_kept_from_a_secret_laden_command_line() {
    let secret = "S3cr3t-Pa55";
    let c = cmdline(&[
        "migratekit",
        "migrate",
        "--vmware-password",
        secret,
        "--job-id",
        "j9",
    ]);
    let found = FoundProcess {
        identity: ProcessIdentity {
            pid: 1,
            start_time: 2,
        },
        comm: "migratekit".into(),
        job_id: job_id_from_cmdline(&c),
    };
    assert!(!format!("{found:?}").contains(secret));
    let secret_buf = SecretBytes(c);
    assert!(!format!("{secret_buf:?}").contains(secret));
}

#[test]
fn names_match_as_the_kernel_truncates_them() {
    let names = vec![
        "migratekit".to_owned(),
        "a-very-long-process-name".to_owned(),
    ];
    assert!(comm_matches("migratekit", &names));
    assert!(comm_matches("a-very-long-pro", &names));
    assert!(!comm_matches("migratekit2", &names));
    assert!(!comm_matches("bash", &names));
}
