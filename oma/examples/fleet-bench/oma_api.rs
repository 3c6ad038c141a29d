//! The OMA's REST API as the bench uses it: what an operator and a watchdog would send.

use anyhow::{Context, Result, bail};
use api::{EventBatch, ProcessEvent, ProcessEventKind, ProcessIdentity, StoredProgress};
use oma::model::Job;
use reqwest::StatusCode;
use std::time::{Duration, Instant};

/// A client of one OMA, holding the operator token.
#[derive(Clone)]
pub struct Oma {
    http: reqwest::Client,
    url: String,
    metrics_url: String,
    token: String,
}

impl Oma {
    /// A client of the OMA at `url` (metrics at `metrics_url`).
    pub fn new(url: &str, metrics_url: &str, token: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_owned(),
            metrics_url: metrics_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// The same OMA through a client of its own (for another runtime).
    pub fn fresh(&self) -> Result<Self> {
        Self::new(&self.url, &self.metrics_url, &self.token)
    }

    /// Waits up to 60 s for `GET /health` to answer 200.
    pub async fn wait_healthy(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = self.http.get(format!("{}/health", self.url)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the OMA at {} did not answer /health within 60 s", self.url);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `PUT /api/v1/vmas/{id}`.
    pub async fn register_vma(&self, id: &str, base_url: &str, token: &str) -> Result<()> {
        let body = serde_json::json!({ "base_url": base_url, "token": token });
        let r = self
            .http
            .put(format!("{}/api/v1/vmas/{id}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "registering VMA {id}: HTTP {}: {}",
                r.status(),
                r.text().await?
            );
        }
        Ok(())
    }

    /// `POST /api/v1/jobs` with `start` (the default): the OMA asks the VMA to start the job,
    /// which answers 201 running; the job must come back `replicating`.
    pub async fn create_job(&self, id: &str, vma_id: &str) -> Result<()> {
        let body = serde_json::json!({
            "id": id, "vm_context_id": format!("ctx-{id}"), "vm_name": format!("vm-{id}"),
            "vma_id": vma_id,
        });
        let r = self
            .http
            .post(format!("{}/api/v1/jobs", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        if r.status() != StatusCode::CREATED {
            bail!(
                "creating job {id}: HTTP {}: {}",
                r.status(),
                r.text().await?
            );
        }
        let job: Job = r.json().await?;
        if job.status.as_str() != "replicating" {
            bail!(
                "job {id} is {} after its start, not replicating",
                job.status.as_str()
            );
        }
        Ok(())
    }

    /// `GET /api/v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<Job> {
        let r = self
            .http
            .get(format!("{}/api/v1/jobs/{id}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        Ok(r.json().await?)
    }

    /// `GET /api/v1/jobs?vma_id=..&limit=1000`.
    pub async fn jobs_of(&self, vma_id: &str) -> Result<Vec<Job>> {
        let r = self
            .http
            .get(format!("{}/api/v1/jobs", self.url))
            .query(&[("vma_id", vma_id), ("limit", "1000")])
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        Ok(r.json().await?)
    }

    /// Posts one death as the VMA's watchdog does (`POST /api/v1/watchdog/events`, the VMA's
    /// own token) and returns the time to the acknowledgement, which the OMA sends after its
    /// commit.
    pub async fn post_death(
        &self,
        vma_id: &str,
        vma_token: &str,
        death: (api::JobId, ProcessIdentity, StoredProgress),
    ) -> Result<Duration> {
        let (job_id, process, last) = death;
        let batch = EventBatch {
            vma_id: vma_id.to_owned(),
            events: vec![ProcessEvent {
                event_id: uuid::Uuid::new_v4(),
                kind: ProcessEventKind::ProcessExited,
                job_id,
                process,
                exit: Some(crate::sim::killed()),
                observed_at: chrono::Utc::now(),
                detector: api::Detector::Ebpf,
                last_progress: Some(last),
            }],
        };
        let sent = Instant::now();
        let r = self
            .http
            .post(format!("{}/api/v1/watchdog/events", self.url))
            .bearer_auth(vma_token)
            .json(&batch)
            .send()
            .await?;
        let took = sent.elapsed();
        let ack: api::EventBatchAck = r.error_for_status()?.json().await?;
        if ack.applied != 1 {
            bail!("the OMA applied {} of 1 death", ack.applied);
        }
        Ok(took)
    }

    /// `POST /api/v1/recovery/run` (retried while another run holds the lock): its wall time
    /// and the decisions it made.
    pub async fn recovery_run(&self) -> Result<(Duration, usize)> {
        loop {
            let started = Instant::now();
            let r = self
                .http
                .post(format!("{}/api/v1/recovery/run", self.url))
                .bearer_auth(&self.token)
                .json(&serde_json::json!({}))
                .timeout(Duration::from_secs(900))
                .send()
                .await?;
            if r.status() == StatusCode::CONFLICT {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let took = started.elapsed();
            let report: serde_json::Value = r.error_for_status()?.json().await?;
            let decisions = report["decisions"].as_array().map_or(0, Vec::len);
            return Ok((took, decisions));
        }
    }

    /// `GET /api/v1/recovery/status`'s `poller` object.
    pub async fn poller(&self) -> Result<serde_json::Value> {
        let r = self
            .http
            .get(format!("{}/api/v1/recovery/status", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?;
        let status: serde_json::Value = r.json().await?;
        Ok(status["poller"].clone())
    }

    /// The value of the metric line `name` (no labels) on `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<Option<f64>> {
        let text = self
            .http
            .get(format!("{}/metrics", self.metrics_url))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
            .context("reading /metrics")?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok()))
    }
}
