//! The command line: the original's `migrate` flags (accepted, ignored, never kept) and the
//! stand-in's own `--standin-*` flags that say how to behave and how to die.

use std::time::Duration;

/// How the stand-in ends once its time is up (or a line arrives on stdin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `exit(code)`.
    Exit(i32),
    /// Killed by SIGSEGV, with a core dump allowed so the kernel sets the core flag.
    Segv,
    /// Allocates and touches memory until the OOM killer ends it (or gives up at the cap).
    Oom {
        /// Give up (exit 1) after this many MiB without being killed.
        cap_mib: u64,
    },
}

/// What the stand-in does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The job (`--job-id`, else `MIGRATEKIT_JOB_ID`).
    pub job_id: Option<String>,
    /// Worker threads besides the leader.
    pub threads: usize,
    /// How long to run before ending; `None` = until killed or told on stdin.
    pub run_for: Option<Duration>,
    /// How to end.
    pub ending: Ending,
    /// The leader thread exits (plain `exit` of the thread) right after the ready line.
    pub leader_exit: bool,
    /// One worker thread exits right after the ready line.
    pub thread_exit: bool,
    /// `--standin-dissolve`: the leader exits right after the ready line (as with
    /// `leader_exit`), and at the end every other thread exits on its own with `exit(2)` of
    /// the thread, in turn, so that the last of them ends the process (exit status 0, the
    /// leader's). No thread calls `exit_group`.
    pub dissolve: bool,
    /// `--standin-end-from-worker`: the end (`exit_group` with the exit code, or the crash)
    /// comes from a worker thread, not from the thread that decides it.
    pub end_from_worker: bool,
    /// Base URL for progress updates (`--standin-progress-url`); `None`: the environment's
    /// `MIGRATEKIT_STANDIN_PROGRESS_URL`, else the real client's `http://localhost:8081`.
    pub progress_url: Option<String>,
    /// Simulated size of the copy, in bytes.
    pub total_bytes: u64,
    /// Simulated copy rate, in bytes per second.
    pub rate: u64,
    /// Time between two progress updates.
    pub progress_interval: Duration,
    /// `--standin-linger-until PATH`: once its time is up (and its `completed` report, if
    /// any, is posted), wait until PATH exists before ending. A test then decides the moment
    /// of the end, e.g. while the watchdog is down, after a completion it has seen reported.
    pub linger_until: Option<std::path::PathBuf>,
}

/// A command line the stand-in does not understand.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// No subcommand, or not `migrate`.
    #[error("usage: migratekit migrate --job-id ID [original flags] [--standin-* flags]")]
    Usage,
    /// A `--standin-*` flag without its value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// A `--standin-*` flag with a value that does not parse (the value is not echoed).
    #[error("{0} has an invalid value")]
    BadValue(&'static str),
    /// An unknown `--standin-*` flag (other unknown flags are the original's, and ignored).
    #[error("unknown stand-in flag {0}")]
    UnknownStandin(String),
}

impl Options {
    /// Parses the arguments after the program name. `env_job_id` is `MIGRATEKIT_JOB_ID`.
    ///
    /// Values of flags the stand-in does not know (`--vmware-password` among them) are skipped
    /// without being copied anywhere, and no error message quotes an argument's value.
    pub fn parse(args: &[String], env_job_id: Option<String>) -> Result<Self, ArgsError> {
        let mut it = args.iter().map(String::as_str).peekable();
        if it.next() != Some("migrate") {
            return Err(ArgsError::Usage);
        }
        let mut o = Options {
            job_id: None,
            threads: 4,
            run_for: None,
            ending: Ending::Exit(0),
            leader_exit: false,
            thread_exit: false,
            dissolve: false,
            end_from_worker: false,
            progress_url: None,
            total_bytes: 10 << 30,
            rate: 100 << 20,
            progress_interval: Duration::from_secs(1),
            linger_until: None,
        };
        let mut exit_code = 0;
        let mut crash = false;
        let mut oom = false;
        let mut oom_cap = 4096;
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with('-') => (f, Some(v)),
                _ => (arg, None),
            };
            let mut value = |name: &'static str| -> Result<&str, ArgsError> {
                match inline {
                    Some(v) => Ok(v),
                    None => it.next().ok_or(ArgsError::MissingValue(name)),
                }
            };
            match flag {
                "--job-id" | "-job-id" => o.job_id = Some(value("--job-id")?.to_owned()),
                "--standin-threads" => {
                    o.threads = number(value("--standin-threads")?, "--standin-threads")?
                }
                "--standin-run-for" => {
                    let secs: f64 = number(value("--standin-run-for")?, "--standin-run-for")?;
                    o.run_for = Some(
                        Duration::try_from_secs_f64(secs)
                            .map_err(|_| ArgsError::BadValue("--standin-run-for"))?,
                    );
                }
                "--standin-exit-code" => {
                    exit_code = number(value("--standin-exit-code")?, "--standin-exit-code")?
                }
                "--standin-crash" => {
                    if value("--standin-crash")? != "segv" {
                        return Err(ArgsError::BadValue("--standin-crash"));
                    }
                    crash = true;
                }
                "--standin-oom" => oom = true,
                "--standin-oom-cap-mib" => {
                    oom_cap = number(value("--standin-oom-cap-mib")?, "--standin-oom-cap-mib")?
                }
                "--standin-progress-url" => {
                    o.progress_url = Some(value("--standin-progress-url")?.to_owned())
                }
                "--standin-total-bytes" => {
                    o.total_bytes =
                        number(value("--standin-total-bytes")?, "--standin-total-bytes")?
                }
                "--standin-rate" => o.rate = number(value("--standin-rate")?, "--standin-rate")?,
                "--standin-progress-interval-ms" => {
                    let ms: u64 = number(
                        value("--standin-progress-interval-ms")?,
                        "--standin-progress-interval-ms",
                    )?;
                    o.progress_interval = Duration::from_millis(ms.max(1));
                }
                "--standin-linger-until" => {
                    o.linger_until = Some(value("--standin-linger-until")?.into());
                }
                "--standin-leader-exit" => o.leader_exit = true,
                "--standin-thread-exit" => o.thread_exit = true,
                "--standin-dissolve" => {
                    o.dissolve = true;
                    o.leader_exit = true;
                }
                "--standin-end-from-worker" => o.end_from_worker = true,
                f if f.starts_with("--standin-") => {
                    return Err(ArgsError::UnknownStandin(f.to_owned()));
                }
                // An original flag: skip its value, if it has one, without looking at it.
                f if f.starts_with('-')
                    && inline.is_none()
                    && it.peek().is_some_and(|next| !next.starts_with('-')) =>
                {
                    it.next();
                }
                _ => {}
            }
        }
        o.job_id = o.job_id.or(env_job_id);
        o.ending = if crash {
            Ending::Segv
        } else if oom {
            Ending::Oom { cap_mib: oom_cap }
        } else {
            Ending::Exit(exit_code)
        };
        if o.dissolve && o.ending != Ending::Exit(0) {
            // The status of a process whose threads all exit is the leader's: 0.
            return Err(ArgsError::BadValue("--standin-dissolve"));
        }
        if (o.dissolve || o.end_from_worker) && o.threads < 1 {
            o.threads = 1;
        }
        if o.thread_exit && o.threads < 2 {
            // One worker exits early and at least one must remain to keep a thread running.
            o.threads = 2;
        }
        Ok(o)
    }
}

fn number<T: std::str::FromStr>(v: &str, name: &'static str) -> Result<T, ArgsError> {
    v.parse().map_err(|_| ArgsError::BadValue(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, ArgsError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Options::parse(&args, None)
    }

    #[test]
    fn original_flags_are_accepted_and_the_password_is_not_kept() {
        let o = parse(&[
            "migrate",
            "--vmware-endpoint",
            "vc.local",
            "--vmware-username",
            "admin",
            "--vmware-password",
            "hunter2",
            "--vmware-path",
            "/dc/vm/x",
            "--nbd-export-name",
            "e",
            "--job-id",
            "job-1",
            "--standin-run-for",
            "1.5",
            "--standin-exit-code",
            "3",
        ])
        .unwrap();
        assert_eq!(o.job_id.as_deref(), Some("job-1"));
        assert_eq!(o.run_for, Some(Duration::from_millis(1500)));
        assert_eq!(o.ending, Ending::Exit(3));
        assert!(!format!("{o:?}").contains("hunter2"));
    }

    #[test]
    fn the_environment_gives_the_job_id_when_the_flag_does_not() {
        let args = vec!["migrate".to_owned()];
        let o = Options::parse(&args, Some("env-job".into())).unwrap();
        assert_eq!(o.job_id.as_deref(), Some("env-job"));
        let args = vec!["migrate".to_owned(), "--job-id=flag-job".to_owned()];
        let o = Options::parse(&args, Some("env-job".into())).unwrap();
        assert_eq!(o.job_id.as_deref(), Some("flag-job"));
    }

    #[test]
    fn behaviours_are_parsed() {
        let o = parse(&[
            "migrate",
            "--standin-crash",
            "segv",
            "--standin-leader-exit",
        ])
        .unwrap();
        assert_eq!((o.ending, o.leader_exit), (Ending::Segv, true));
        let o = parse(&[
            "migrate",
            "--standin-oom",
            "--standin-thread-exit",
            "--standin-threads",
            "1",
        ])
        .unwrap();
        assert_eq!(
            (o.ending, o.thread_exit, o.threads),
            (Ending::Oom { cap_mib: 4096 }, true, 2)
        );
        let o = parse(&[
            "migrate",
            "--standin-progress-url",
            "http://127.0.0.1:9",
            "--standin-total-bytes=5000",
            "--standin-rate",
            "100",
            "--standin-progress-interval-ms",
            "50",
            "--standin-linger-until",
            "/tmp/end-now",
        ])
        .unwrap();
        assert_eq!(o.progress_url.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(o.linger_until, Some("/tmp/end-now".into()));
        assert_eq!((o.total_bytes, o.rate), (5000, 100));
        assert_eq!(o.progress_interval, Duration::from_millis(50));
    }

    #[test]
    fn bad_command_lines_are_refused_without_echoing_values() {
        assert_eq!(parse(&[]), Err(ArgsError::Usage));
        assert_eq!(parse(&["replicate"]), Err(ArgsError::Usage));
        assert_eq!(
            parse(&["migrate", "--standin-run-for"]),
            Err(ArgsError::MissingValue("--standin-run-for"))
        );
        let err = parse(&["migrate", "--standin-exit-code", "secret"]).unwrap_err();
        assert!(!err.to_string().contains("secret"));
        assert!(matches!(
            parse(&["migrate", "--standin-nope"]),
            Err(ArgsError::UnknownStandin(_))
        ));
    }
}
