//! What the bench measures while the fleet runs: the OMA's CPU and memory from `/proc`,
//! deaths' kill-to-commit, progress freshness at the OMA, and the OMA's own poll lag gauge.

use crate::oma_api::Oma;
use crate::sim::VmaSim;
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// CPU time (clock ticks, user + system) and resident memory (KiB) of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime, in clock ticks.
    pub ticks: u64,
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// VmHWM (peak RSS), KiB.
    pub hwm_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status` (`pid` 0: this process).
pub fn proc_sample(pid: u32) -> Result<ProcSample> {
    let dir = if pid == 0 {
        "/proc/self".to_owned()
    } else {
        format!("/proc/{pid}")
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).context("reading stat")?;
    // Fields after the command name, which ends at the last ')': state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("{dir}/status")).context("reading status")?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        ticks: field(14) + field(15),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// Cores used between two samples `wall` apart.
pub fn cores(before: ProcSample, after: ProcSample, wall: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    after.ticks.saturating_sub(before.ticks) as f64 / hz / wall.as_secs_f64().max(1e-9)
}

/// A small xorshift generator: which job dies and which VMAs are sampled.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock.
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(nanos | 1)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Kills up to `count` random live jobs of `vmas`, one every `every` until `until`, each
/// reported as its VMA's watchdog reports a death, without waiting for the deaths before it
/// (each VMA delivers on its own); returns each kill-to-commit (ms) and the jobs killed.
pub async fn deaths(
    oma: &Oma,
    vmas: &[Arc<VmaSim>],
    count: usize,
    every: Duration,
    until: Instant,
) -> Result<(Vec<f64>, Vec<String>)> {
    let mut rng = Rng::new();
    let mut ticker = tokio::time::interval(every);
    let mut posts = tokio::task::JoinSet::new();
    let mut killed = Vec::new();
    while killed.len() < count && Instant::now() < until {
        ticker.tick().await;
        let vma = vmas[rng.below(vmas.len())].clone();
        let Some(death) = vma.kill(rng.below(vma.len())) else {
            continue;
        };
        killed.push(death.0.to_string());
        let oma = oma.clone();
        posts.spawn(async move { oma.post_death(&vma.id, &vma.token, death).await });
    }
    let mut took = Vec::new();
    while let Some(done) = posts.join_next().await {
        took.push(done??.as_secs_f64() * 1000.0);
    }
    Ok((took, killed))
}

/// [`deaths`] on a thread of its own at nice -10 (as the watchdog runs), with its own
/// runtime and connection: the simulated VMAs' serving does not delay the deaths' posts.
pub async fn deaths_apart(
    oma: &Oma,
    vmas: &[Arc<VmaSim>],
    count: usize,
    every: Duration,
    until: Instant,
) -> Result<(Vec<f64>, Vec<String>)> {
    let (oma, vmas) = (oma.fresh()?, vmas.to_vec());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        // SAFETY: plain system calls about this thread.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, -10);
        }
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(deaths(&oma, &vmas, count, every, until)));
        let _ = tx.send(result);
    });
    rx.await.context("the deaths' thread ended")?
}

/// Jobs of `killed` that the OMA does not show final (16 questions in flight: under
/// saturation each waits seconds for a database connection).
pub async fn not_final(oma: &Oma, killed: &[String]) -> Result<usize> {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (oma, count) = (oma.clone(), open.clone());
    crate::futures_like::for_each_limited(killed.to_vec(), 16, move |id| {
        let (oma, count) = (oma.clone(), count.clone());
        async move {
            if !oma.job(&id).await?.status.is_final() {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await?;
    Ok(open.load(std::sync::atomic::Ordering::Relaxed))
}

/// What the sampler saw over the window.
#[derive(Debug, Default)]
pub struct Samples {
    /// Age (ms) of the progress the OMA showed for live jobs when asked.
    pub ages_ms: Vec<f64>,
    /// Live jobs the OMA showed no progress for.
    pub never_polled: usize,
    /// The OMA's `oma_poll_cycle_lag_seconds`, in ms.
    pub cycle_lag_ms: Vec<f64>,
    /// The OMA's peak VmRSS during the window, KiB.
    pub rss_max_kib: u64,
}

/// Until `until`: every second asks the OMA for `per_tick` random VMAs' jobs and takes the age
/// of the progress shown (simulation's production time of those bytes to now) and the OMA's
/// RSS; every 2 s reads the poll-cycle lag gauge (a scrape costs the OMA two aggregate
/// queries, so no more often than this).
pub async fn sample(
    oma: &Oma,
    vmas: &[Arc<VmaSim>],
    pid: u32,
    per_tick: usize,
    until: Instant,
) -> Result<Samples> {
    let mut rng = Rng::new();
    let mut out = Samples::default();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    while Instant::now() < until {
        ticker.tick().await;
        n += 1;
        out.rss_max_kib = out.rss_max_kib.max(proc_sample(pid)?.rss_kib);
        if n.is_multiple_of(2)
            && let Some(lag) = oma.metric("oma_poll_cycle_lag_seconds").await?
        {
            out.cycle_lag_ms.push(lag * 1000.0);
        }
        for _ in 0..per_tick {
            let vma = &vmas[rng.below(vmas.len())];
            let jobs = oma.jobs_of(&vma.id).await?;
            let now = chrono::Utc::now();
            for job in jobs.iter().filter(|j| !j.status.is_final()) {
                let bytes = u64::try_from(job.bytes_transferred).unwrap_or(0);
                match vma.produced_at(bytes) {
                    Some(at) => out.ages_ms.push((now - at).num_milliseconds() as f64),
                    None => out.never_polled += 1,
                }
            }
        }
    }
    Ok(out)
}
