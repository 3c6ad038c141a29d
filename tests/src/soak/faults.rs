//! Applying the schedule's actions to the running system, and the outages they leave open.

use std::process::Command;
use std::time::{Instant, SystemTime};

use super::Soak;
use super::jobs::SoakJob;
use super::schedule::{Action, Fate, Fault, IoTarget};

/// Which outages are open now, and when the system was last made whole.
#[derive(Debug)]
pub struct Outages {
    pub watchdog_down: bool,
    pub cut: bool,
    pub slow: bool,
    pub postgres_down: bool,
    /// The OMA was stopped while PostgreSQL was down, or while its files failed; it starts
    /// again when that ends.
    pub oma_down: bool,
    /// The watchdog's state directory is full. Not an outage: deaths must still reach the
    /// OMA (from the watchdog's memory) in time.
    pub disk_full: bool,
    /// Writes and fsyncs of one daemon's files fail (an outage while it lasts), with the
    /// shim's failure count and the daemon's storage error lines when it began.
    pub io_errors: Option<(IoTarget, usize, usize)>,
    /// A watchdog start waits for its state directory to be writable again (its outbox
    /// compacts when it opens).
    pub watchdog_deferred: bool,
    /// When the last open outage closed (or the soak started).
    pub whole_since: Instant,
}

impl Outages {
    pub fn new() -> Self {
        Self {
            watchdog_down: false,
            cut: false,
            slow: false,
            postgres_down: false,
            oma_down: false,
            disk_full: false,
            io_errors: None,
            watchdog_deferred: false,
            whole_since: Instant::now(),
        }
    }

    /// Nothing open: both daemons up, the link up and fast, the database up.
    pub fn whole(&self) -> bool {
        !(self.watchdog_down
            || self.cut
            || self.slow
            || self.postgres_down
            || self.oma_down
            || self.io_errors.is_some())
    }

    /// Notes that an outage closed; the system is whole again if it was the last.
    pub(super) fn closed(&mut self) {
        if self.whole() {
            self.whole_since = Instant::now();
        }
    }
}

/// The fault's kind for the report's table (a death by signal is counted per signal).
pub fn kind(fault: &Fault) -> String {
    match fault.action {
        Action::Start(fate) => match fate {
            Fate::UntilKilled => "start (runs until killed)".into(),
            Fate::Exits { .. } => "start (exits with a code)".into(),
            Fate::Completes { .. } => "start (completes)".into(),
            Fate::Segv { .. } => "start (crashes, SIGSEGV)".into(),
            Fate::Oom { .. } => "start (OOM-killed in a cgroup)".into(),
            Fate::Dissolves { .. } => {
                "start (leader thread exits first, then each thread in turn)".into()
            }
            Fate::WorkerExitGroup { .. } => "start (a worker thread calls exit_group)".into(),
        },
        Action::Kill { signal, reuse, .. } => format!(
            "kill ({}){}",
            signal_name(signal),
            if reuse { ", pid reused" } else { "" }
        ),
        Action::Cancel { .. } => "cancel".into(),
        Action::RestartOma { crash: true } => "OMA SIGKILL + restart".into(),
        Action::RestartOma { crash: false } => "OMA SIGTERM + restart".into(),
        Action::WatchdogDown { crash: true } => "watchdog SIGKILL (down)".into(),
        Action::WatchdogDown { crash: false } => "watchdog SIGTERM (down)".into(),
        Action::WatchdogUp => "watchdog up".into(),
        Action::Cut => "link cut".into(),
        Action::Restore => "link restored".into(),
        Action::Slow { .. } => "slow lossy link on (netem, or tbf)".into(),
        Action::Fast => "slow link off".into(),
        Action::PostgresDown => "PostgreSQL stop".into(),
        Action::PostgresUp => "PostgreSQL start".into(),
        Action::DiskFull => "watchdog state directory full".into(),
        Action::DiskFreed => "watchdog state directory freed".into(),
        Action::IoErrors { target, errno } => format!(
            "{} on the {} files (write/fsync)",
            if errno == libc::EIO { "EIO" } else { "ENOSPC" },
            match target {
                IoTarget::Watchdog => "watchdog's",
                IoTarget::Oma => "OMA's",
            }
        ),
        Action::IoHealed => "write/fsync errors end".into(),
    }
}

fn signal_name(signal: i32) -> String {
    // SAFETY: strsignal returns a pointer to a static or thread-local string.
    let text = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(signal)) };
    format!("{signal} {}", text.to_string_lossy())
}

impl Soak {
    /// Applies one action; returns what it did, for the fault log.
    pub(super) fn apply(&mut self, fault: &Fault) -> Result<String, String> {
        let harness = |what: &str| {
            let what = what.to_owned();
            move |e: crate::HarnessError| format!("{what}: {e}")
        };
        match fault.action {
            Action::Start(fate) => Ok(self.start_job(fate)),
            Action::Kill {
                pick,
                signal,
                reuse,
            } => Ok(self.kill_pick(pick, signal, reuse)),
            Action::Cancel { pick } => Ok(self.cancel_pick(pick)),
            Action::RestartOma { crash } => {
                match crash {
                    true => self.sys.oma.sigkill(),
                    false => self.sys.oma.stop(),
                }
                .map_err(harness("stopping the OMA"))?;
                // On PostgreSQL down, the OMA cannot start (it opens its store first): it
                // comes back with the database; likewise while its files fail.
                let files_fail = matches!(self.outages.io_errors, Some((IoTarget::Oma, ..)));
                if !self.outages.postgres_down && !files_fail {
                    self.sys
                        .oma
                        .start_again()
                        .map_err(harness("restarting the OMA"))?;
                    return Ok("restarted".into());
                }
                self.outages.oma_down = true;
                Ok("stopped; restarts when its store is back".into())
            }
            Action::WatchdogDown { crash } => {
                match crash {
                    true => self.sys.watchdog.sigkill(),
                    false => self.sys.watchdog.stop(),
                }
                .map_err(harness("stopping the watchdog"))?;
                self.outages.watchdog_down = true;
                Ok("down".into())
            }
            Action::WatchdogUp if self.watchdog_blocked() => {
                self.outages.watchdog_deferred = true;
                Ok("deferred until its state directory can be written".into())
            }
            Action::WatchdogUp => {
                self.sys
                    .watchdog
                    .start_again()
                    .map_err(harness("restarting the watchdog"))?;
                self.outages.watchdog_down = false;
                self.outages.closed();
                Ok("up".into())
            }
            Action::Cut => self.link(true),
            Action::Restore => self.link(false),
            Action::Slow { delay_ms, loss_pct } => self.netem(Some((delay_ms, loss_pct))),
            Action::Fast => self.netem(None),
            Action::PostgresDown => self.postgres(false),
            Action::PostgresUp => self.postgres(true),
            Action::DiskFull => self.disk(true),
            Action::DiskFreed => self.disk(false),
            Action::IoErrors { target, errno } => self.io_errors(Some((target, errno))),
            Action::IoHealed => self.io_errors(None),
        }
    }

    /// Closes every open outage (the end of the soak).
    pub(super) fn heal(&mut self) -> Result<(), String> {
        let mut closing = Vec::new();
        if self.outages.postgres_down {
            closing.push(Action::PostgresUp);
        }
        if self.outages.disk_full {
            closing.push(Action::DiskFreed);
        }
        if self.outages.io_errors.is_some() {
            closing.push(Action::IoHealed);
        }
        if self.outages.watchdog_down {
            closing.push(Action::WatchdogUp);
        }
        if self.outages.cut {
            closing.push(Action::Restore);
        }
        if self.outages.slow {
            closing.push(Action::Fast);
        }
        for action in closing {
            self.apply(&Fault {
                index: usize::MAX,
                pause_ms: 0,
                action,
            })?;
        }
        Ok(())
    }

    fn start_job(&mut self, fate: Fate) -> String {
        // The soak's pid in the id: the harness finds processes by job id in `/proc`, and two
        // soaks on one machine must never take each other's.
        let id = format!("soak-{}-{}", std::process::id(), self.jobs.len());
        let job = SoakJob::new(id, fate);
        if let Err(e) = self
            .sys
            .watchdog
            .set_behaviour(&job.id, &job.standin_args())
        {
            return format!("not started: {e}");
        }
        if matches!(fate, Fate::Oom { .. }) {
            let name = job.id.clone();
            match crate::cgroup::MemCgroup::create(&name, 64 << 20) {
                Ok(cg) => {
                    let _ = self.sys.watchdog.set_cgroup(&job.id, &cg.procs_file());
                    self.cgroups.push(cg);
                }
                Err(e) => return format!("not started: no memory cgroup: {e}"),
            }
        }
        let id = job.id.clone();
        match self.sys.oma.create_job(&id, &job.context(), "vma-1") {
            Ok(created) => {
                let mut job = job;
                if let (Some(pid), Some(start)) = (created.pid, created.process_start_time) {
                    job.process = Some(api::ProcessIdentity {
                        pid: pid as u32,
                        start_time: start as u64,
                    });
                }
                let status = format!("{id} {:?} {}", created.status, job.standin_args());
                self.jobs.push(job);
                status
            }
            // The OMA refused or was unreachable: no job, nothing to judge.
            Err(e) => format!("{id} not created: {e}"),
        }
    }

    /// Indexes of the jobs a `Kill` or `Cancel` may hit, in start order.
    fn running(&self) -> Vec<usize> {
        (0..self.jobs.len())
            .filter(|&i| self.jobs[i].runs_until_killed() && !self.jobs[i].judged)
            .collect()
    }

    fn kill_pick(&mut self, pick: u32, signal: i32, reuse: bool) -> String {
        let running = self.running();
        if running.is_empty() {
            return "no job to kill".into();
        }
        let i = running[pick as usize % running.len()];
        let done = self.kill(i, signal);
        match (reuse, self.jobs[i].killed, self.jobs[i].process) {
            (true, Some(_), Some(p)) => match crate::killtest::occupy_pid(p.pid) {
                // The new process (`sleep 60`) holds the dead job's pid while the daemons
                // judge the job; it is reaped when the soak ends.
                Ok(decoy) => {
                    self.decoys.push(decoy);
                    format!("{done}; pid {} reused by a new process", p.pid)
                }
                Err(e) => format!("{done}; pid not reused: {e}"),
            },
            _ => done,
        }
    }

    /// Signals job `i`'s process (found in `/proc` if the OMA has not recorded it yet).
    pub(super) fn kill(&mut self, i: usize, signal: i32) -> String {
        let job = &mut self.jobs[i];
        if job.process.is_none() {
            job.process = crate::procs::migratekit_processes(&job.id).first().copied();
        }
        let Some(p) = job.process else {
            return format!("{}: no process yet, not killed", job.id);
        };
        let at = SystemTime::now();
        if let Err(e) = crate::procs::kill_process(p, signal) {
            return format!("{}: {e}", job.id);
        }
        // Counted as a death only once the process is gone: a signal it survived would make
        // the soak wait for a death that never came.
        match crate::procs::wait_gone(p, std::time::Duration::from_secs(5)) {
            Ok(()) => {
                job.killed = Some((at, signal));
                format!("{} pid {} killed with signal {signal}", job.id, p.pid)
            }
            Err(_) => format!("{} pid {} survived signal {signal}", job.id, p.pid),
        }
    }

    fn cancel_pick(&mut self, pick: u32) -> String {
        let running = self.running();
        if running.is_empty() {
            return "no job to cancel".into();
        }
        let i = running[pick as usize % running.len()];
        let id = self.jobs[i].id.clone();
        let body = serde_json::json!({ "reason": "soak" });
        let answer: crate::Result<serde_json::Value> = self.sys.oma.client().call(
            reqwest::Method::POST,
            &format!("/api/v1/jobs/{id}/cancel"),
            Some(&body),
            200,
        );
        match answer {
            Ok(_) => {
                self.jobs[i].cancelled = Some(Instant::now());
                format!("{id} cancelled")
            }
            Err(e) => format!("{id} not cancelled: {e}"),
        }
    }

    fn link(&mut self, cut: bool) -> Result<String, String> {
        let net = self
            .sys
            .net
            .as_ref()
            .ok_or("the soak's system has no namespaces")?;
        if cut {
            net.cut().map_err(|e| format!("cutting the link: {e}"))?;
        } else {
            net.restore()
                .map_err(|e| format!("restoring the link: {e}"))?;
        }
        self.outages.cut = cut;
        self.outages.closed();
        Ok(if cut { "cut" } else { "restored" }.into())
    }

    /// A slow, lossy link on both ends of the veth pair (`None` removes it): `tc netem`
    /// with delay, jitter and loss; on a kernel without netem (`sch_netem`), a token bucket
    /// (`tbf`) at 128 kbit/s that drops what would wait longer than the delay, which makes
    /// the link both slow and lossy under load.
    fn netem(&mut self, spec: Option<(u16, u8)>) -> Result<String, String> {
        let net = self
            .sys
            .net
            .as_ref()
            .ok_or("the soak's system has no namespaces")?;
        let mut used = "off";
        for ns in [&net.oma_ns, &net.vma_ns] {
            let dev = veth_in(ns)?;
            let tc = |qdisc: &[String]| {
                let mut tc = Command::new("tc");
                tc.args(["-n", ns.as_str(), "qdisc"]);
                match spec {
                    Some(_) => tc.args(["replace", "dev", &dev, "root"]).args(qdisc),
                    None => tc.args(["del", "dev", &dev, "root"]),
                };
                run(&mut tc, "tc (iproute2)")
            };
            let Some((delay, loss)) = spec else {
                tc(&[])?;
                continue;
            };
            let netem = [
                "netem".into(),
                "delay".into(),
                format!("{delay}ms"),
                format!("{}ms", delay / 2),
                "loss".into(),
                format!("{loss}%"),
            ];
            let tbf = [
                "tbf".into(),
                "rate".into(),
                "128kbit".into(),
                "burst".into(),
                "4kb".into(),
                "latency".into(),
                format!("{delay}ms"),
            ];
            used = "netem";
            if let Err(e) = tc(&netem) {
                if !e.contains("qdisc kind is unknown") {
                    return Err(e);
                }
                used = "tbf (no netem in this kernel)";
                tc(&tbf)?;
            }
        }
        self.outages.slow = spec.is_some();
        self.outages.closed();
        Ok(match spec {
            Some((d, l)) => format!("{used}: delay {d} ms, loss {l} %"),
            None => "off".into(),
        })
    }

    fn postgres(&mut self, up: bool) -> Result<String, String> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or("PostgreSQL fault on the SQLite backend")?;
        if !up {
            cluster.down()?;
            self.outages.postgres_down = true;
            return Ok("stopped".into());
        }
        cluster.up()?;
        // An OMA restart that came while the database was down left it stopped.
        self.sys
            .oma
            .start_again()
            .map_err(|e| format!("starting the OMA after PostgreSQL returned: {e}"))?;
        self.outages.postgres_down = false;
        self.outages.oma_down = false;
        self.outages.closed();
        Ok("started".into())
    }
}

/// The veth interface in namespace `ns`.
fn veth_in(ns: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "type", "veth"])
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|name| name.split(['@', ':']).next())
        .map(str::to_owned)
        .ok_or_else(|| format!("no veth interface in namespace {ns}: {text:?}"))
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("running {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
