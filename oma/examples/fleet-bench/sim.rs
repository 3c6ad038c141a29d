//! Simulated VMAs: one loopback listener per VMA, all in this process, each answering the
//! watchdog's API as the OMA uses it (`vma_client.rs`): job status, start, stop, per-job
//! progress and the batched progress feed. Every job's progress moves once a second: at tick
//! `k` (whole seconds since its VMA started) its bytes are `(k + 1)` MiB, so a figure the OMA
//! shows says when the simulation produced it.

use api::{
    Detector, ErrorBody, ExitStatus, FoundBy, JobId, JobProcessState, ProcessIdentity,
    ProgressFeed, ProgressFeedQuery, ProgressUpdate, StoredProgress, SyncType, VmaJobStatus,
};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes a job copies per second.
pub const MIB: u64 = 1 << 20;

/// What every simulated VMA records for the measurements.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Gaps are recorded only while this is set (the measurement window).
    pub recording: AtomicBool,
    /// Progress is served only once this is set (after the jobs are created): before, every
    /// job has none yet (404, and an empty feed), so a poll writes nothing and the creation
    /// of 20,000 jobs does not wait behind 4,000 progress transactions a second.
    pub moving: AtomicBool,
    /// The OMA's poll interval, subtracted from each gap.
    pub interval_ms: AtomicU64,
    /// Poll gaps minus the interval, ms: per job (per-job GETs) or per VMA (feed requests).
    pub lags_ms: Mutex<Vec<f64>>,
    /// `GET /api/v1/progress/{id}` answered.
    pub progress_gets: AtomicU64,
    /// `GET /api/v1/progress` (feed) answered, and the jobs they carried.
    pub feed_gets: AtomicU64,
    /// Jobs carried by the feed's answers.
    pub feed_jobs: AtomicU64,
    /// `GET /api/v1/jobs/{id}` answered.
    pub status_gets: AtomicU64,
}

impl Recorder {
    fn gap(&self, last: &mut Option<Instant>) {
        let now = Instant::now();
        if let Some(before) = last.replace(now)
            && self.recording.load(Ordering::Relaxed)
        {
            let gap = now.duration_since(before).as_secs_f64() * 1000.0;
            let interval = self.interval_ms.load(Ordering::Relaxed) as f64;
            if let Ok(mut lags) = self.lags_ms.lock() {
                lags.push(gap - interval);
            }
        }
    }
}

#[derive(Debug)]
struct JobSim {
    id: JobId,
    process: ProcessIdentity,
    /// The tick and time of its death.
    dead: Option<(u64, DateTime<Utc>)>,
    last_poll: Option<Instant>,
}

/// One simulated VMA.
#[derive(Debug)]
pub struct VmaSim {
    /// Its id at the OMA.
    pub id: String,
    /// Its base URL.
    pub url: String,
    /// The token its "watchdog" presents to the OMA.
    pub token: String,
    epoch: uuid::Uuid,
    t0: Instant,
    wall_t0: DateTime<Utc>,
    jobs: Mutex<Vec<JobSim>>,
    last_feed: Mutex<Option<Instant>>,
    recorder: Arc<Recorder>,
}

fn unknown_job(id: &str) -> Response {
    let body = ErrorBody {
        error: "unknown_job".into(),
        message: format!("no job {id} on this simulated VMA"),
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

impl VmaSim {
    /// Starts VMA `id` with `jobs` jobs, whose pids count up from `first_pid`.
    pub async fn start(
        id: String,
        jobs: usize,
        first_pid: u32,
        recorder: Arc<Recorder>,
    ) -> Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let jobs = (0..jobs)
            .map(|i| {
                let pid = first_pid + i as u32;
                JobSim {
                    id: JobId::parse(&format!("{id}-j{i}")).expect("a valid job id"),
                    process: ProcessIdentity {
                        pid,
                        start_time: 400_000 + u64::from(pid),
                    },
                    dead: None,
                    last_poll: None,
                }
            })
            .collect();
        let sim = Arc::new(Self {
            token: format!("fleet-bench-token-{id}-0000"),
            id,
            url,
            epoch: uuid::Uuid::new_v4(),
            t0: Instant::now(),
            wall_t0: Utc::now(),
            jobs: Mutex::new(jobs),
            last_feed: Mutex::new(None),
            recorder,
        });
        let router = Router::new()
            .route("/api/v1/jobs/{id}", get(job_status))
            .route("/api/v1/jobs/{id}/start", post(start_job))
            .route("/api/v1/jobs/{id}/stop", post(stop_job))
            .route("/api/v1/progress/{id}", get(progress))
            .route("/api/v1/progress", get(feed))
            .with_state(sim.clone());
        let stats = Arc::new(transport::ServeStats::default());
        tokio::spawn(transport::serve(
            listener,
            router,
            None,
            transport::Limits::default(),
            stats,
            std::future::pending::<()>(),
        ));
        sim
    }

    /// Its job ids.
    pub fn job_ids(&self) -> Vec<String> {
        self.lock().iter().map(|j| j.id.to_string()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<JobSim>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tick(&self) -> u64 {
        self.t0.elapsed().as_secs()
    }

    fn index(&self, id: &str) -> Option<usize> {
        let (vma, i) = id.rsplit_once("-j")?;
        let i: usize = i.parse().ok()?;
        (vma == self.id && i < self.lock().len()).then_some(i)
    }

    /// When the simulation produced a job's `bytes` (None for 0: never polled).
    pub fn produced_at(&self, bytes: u64) -> Option<DateTime<Utc>> {
        let tick = (bytes / MIB).checked_sub(1)?;
        Some(self.wall_t0 + Duration::from_secs(tick))
    }

    fn stored(&self, job: &JobSim, tick: u64) -> StoredProgress {
        let k = job.dead.map_or(tick, |(dead, _)| dead);
        StoredProgress {
            job_id: job.id.clone(),
            update: ProgressUpdate {
                stage: "Transfer".into(),
                status: None,
                bytes_transferred: (k + 1) * MIB,
                total_bytes: Some(1 << 40),
                throughput_bps: MIB,
                percent: None,
                disk_id: Some("disk-2000".into()),
                sync_type: Some(SyncType::Full),
                error_message: None,
            },
            received_at: self.wall_t0 + Duration::from_secs(k),
            sequence: k + 1,
        }
    }

    fn state(&self, job: &JobSim) -> JobProcessState {
        match job.dead {
            None => JobProcessState::Running {
                process: job.process,
                since: self.wall_t0,
                found_by: FoundBy::Started,
            },
            Some((_, at)) => JobProcessState::Exited {
                process: job.process,
                exit: killed(),
                exited_at: at,
                detector: Detector::Ebpf,
            },
        }
    }

    /// Kills job `i` if it lives: its process, its progress as of now, for the death event.
    pub fn kill(&self, i: usize) -> Option<(JobId, ProcessIdentity, StoredProgress)> {
        let tick = self.tick();
        let mut jobs = self.lock();
        let job = jobs.get_mut(i).filter(|j| j.dead.is_none())?;
        job.dead = Some((tick, Utc::now()));
        let job = &jobs[i];
        Some((job.id.clone(), job.process, self.stored(job, tick)))
    }

    /// Jobs of this VMA.
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A SIGKILL's exit status.
pub fn killed() -> ExitStatus {
    ExitStatus {
        code: None,
        signal: Some(9),
        core_dumped: false,
        oom_killed: false,
    }
}

async fn job_status(State(sim): State<Arc<VmaSim>>, Path(id): Path<String>) -> Response {
    sim.recorder.status_gets.fetch_add(1, Ordering::Relaxed);
    let Some(i) = sim.index(&id) else {
        return unknown_job(&id);
    };
    let jobs = sim.lock();
    let body = VmaJobStatus {
        job_id: jobs[i].id.clone(),
        state: sim.state(&jobs[i]),
    };
    Json(body).into_response()
}

async fn start_job(State(sim): State<Arc<VmaSim>>, Path(id): Path<String>) -> Response {
    let Some(i) = sim.index(&id) else {
        return unknown_job(&id);
    };
    let jobs = sim.lock();
    let body = VmaJobStatus {
        job_id: jobs[i].id.clone(),
        state: sim.state(&jobs[i]),
    };
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn stop_job(Path(id): Path<String>) -> Response {
    let body = ErrorBody {
        error: "not_running".into(),
        message: format!("{id} is not running"),
    };
    (StatusCode::CONFLICT, Json(body)).into_response()
}

async fn progress(State(sim): State<Arc<VmaSim>>, Path(id): Path<String>) -> Response {
    sim.recorder.progress_gets.fetch_add(1, Ordering::Relaxed);
    let Some(i) = sim.index(&id) else {
        return unknown_job(&id);
    };
    if !sim.recorder.moving.load(Ordering::Relaxed) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let tick = sim.tick();
    let mut jobs = sim.lock();
    sim.recorder.gap(&mut jobs[i].last_poll);
    Json(sim.stored(&jobs[i], tick)).into_response()
}

/// The batched feed: every job whose latest change is after the cursor, oldest first. Job `i`
/// of `n` changes at tick `k` with change id `k * n + i + 1` (a dead job's stays at its
/// death's tick).
async fn feed(State(sim): State<Arc<VmaSim>>, Query(query): Query<ProgressFeedQuery>) -> Response {
    sim.recorder.feed_gets.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut last) = sim.last_feed.lock() {
        sim.recorder.gap(&mut last);
    }
    let same_epoch = query.epoch == Some(sim.epoch);
    let since = if same_epoch {
        query.since.unwrap_or(0)
    } else {
        0
    };
    let limit = query.limit.unwrap_or(1000).clamp(1, 1000) as usize;
    let tick = sim.tick();
    let jobs = sim.lock();
    let n = jobs.len() as u64;
    let mut changed: Vec<(u64, usize)> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.dead.map_or(tick, |(k, _)| k) * n + i as u64 + 1, i))
        .filter(|(change, _)| *change > since && sim.recorder.moving.load(Ordering::Relaxed))
        .collect();
    changed.sort_unstable();
    let more = changed.len() > limit;
    changed.truncate(limit);
    let cursor = changed.last().map_or(since, |(change, _)| *change);
    let jobs: Vec<StoredProgress> = changed
        .iter()
        .map(|&(_, i)| sim.stored(&jobs[i], tick))
        .collect();
    sim.recorder
        .feed_jobs
        .fetch_add(jobs.len() as u64, Ordering::Relaxed);
    Json(ProgressFeed {
        epoch: sim.epoch,
        cursor,
        more,
        jobs,
    })
    .into_response()
}
