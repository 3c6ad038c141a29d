//! Arguments of the `jobs`, `create` and `register-vma` subcommands, and the request each
//! turns into.

use crate::model::JobStatus;
use crate::routes::jobs::CreateJobRequest;
use api::StartJobRequest;
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `job-recovery jobs`: filters of `GET /api/v1/jobs`.
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// Only jobs in this status (pending, replicating, failed, ...).
    #[arg(long, value_parser = parse_status)]
    pub status: Option<JobStatus>,
    /// Only jobs of this VMA.
    #[arg(long)]
    pub vma: Option<String>,
    /// Only jobs of this VM context.
    #[arg(long)]
    pub vm_context: Option<String>,
    /// At most this many, from 1 to 1000 (the server's range).
    #[arg(long, default_value_t = crate::store::JobFilter::DEFAULT_LIMIT,
        value_parser = clap::value_parser!(i64).range(1..=crate::store::JobFilter::MAX_LIMIT))]
    pub limit: i64,
}

fn parse_status(text: &str) -> Result<JobStatus, String> {
    JobStatus::parse(text).ok_or_else(|| {
        let all: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status {text:?}; use one of {}", all.join(", "))
    })
}

impl JobsArgs {
    /// The query string.
    pub fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = vec![("limit", self.limit.to_string())];
        if let Some(status) = self.status {
            query.push(("status", status.as_str().to_owned()));
        }
        if let Some(vma) = &self.vma {
            query.push(("vma_id", vma.clone()));
        }
        if let Some(ctx) = &self.vm_context {
            query.push(("vm_context_id", ctx.clone()));
        }
        query
    }
}

/// `job-recovery create`: a job, and the parameters for the VMA's migratekit template.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The VM context to replicate (created when new; then --vm-name is required).
    #[arg(long)]
    pub vm_context: String,
    /// The registered VMA that runs the job.
    #[arg(long)]
    pub vma: String,
    /// Job id (default: a generated UUID).
    #[arg(long)]
    pub id: Option<String>,
    /// VM name, for a new VM context.
    #[arg(long)]
    pub vm_name: Option<String>,
    /// `full` or `incremental`.
    #[arg(long, value_parser = parse_sync_type)]
    pub sync_type: Option<api::SyncType>,
    /// Only record the job; do not ask the VMA to start migratekit.
    #[arg(long)]
    pub no_start: bool,
    /// VMware inventory path of the VM (`{vm_path}` in the VMA's template).
    #[arg(long)]
    pub vm_path: Option<String>,
    /// NBD export name of a single disk (`{nbd_export_name}`).
    #[arg(long)]
    pub nbd_export_name: Option<String>,
    /// NBD targets of a multi-disk job (`{nbd_targets}`).
    #[arg(long)]
    pub nbd_targets: Option<String>,
    /// Name of a vCenter credential set configured on the VMA (never a password).
    #[arg(long)]
    pub credentials: Option<String>,
    /// Further template values, as KEY=VALUE (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
}

impl CreateArgs {
    /// The body of `POST /api/v1/jobs`.
    pub fn body(&self) -> Result<CreateJobRequest, String> {
        let mut parameters = BTreeMap::new();
        for pair in &self.params {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("--param {pair:?} is not KEY=VALUE"))?;
            parameters.insert(key.to_owned(), value.to_owned());
        }
        Ok(CreateJobRequest {
            id: self.id.clone(),
            vm_context_id: self.vm_context.clone(),
            vm_name: self.vm_name.clone(),
            vma_id: self.vma.clone(),
            sync_type: self.sync_type,
            start: !self.no_start,
            params: StartJobRequest {
                vm_path: self.vm_path.clone(),
                nbd_targets: self.nbd_targets.clone(),
                nbd_export_name: self.nbd_export_name.clone(),
                credentials: self.credentials.clone(),
                parameters,
            },
        })
    }
}

/// `job-recovery register-vma`: a VMA's id, its watchdog's URL and the token its watchdog
/// presents when it posts events (the OMA keeps only its hash).
#[derive(Debug, Clone, Args)]
pub struct RegisterVmaArgs {
    /// VMA id.
    pub id: String,
    /// Base URL of the VMA's watchdog API, e.g. http://127.0.0.1:8081.
    #[arg(long)]
    pub base_url: String,
    /// The watchdog's event token.
    #[arg(long, env = "OMA_NEW_VMA_TOKEN", hide_env_values = true)]
    pub vma_token: Option<String>,
    /// File holding the watchdog's event token.
    #[arg(long)]
    pub vma_token_file: Option<PathBuf>,
}

impl RegisterVmaArgs {
    /// The body of `PUT /api/v1/vmas/{id}`.
    pub fn body(&self) -> Result<serde_json::Value, String> {
        let token = match (&self.vma_token, &self.vma_token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|_| format!("could not read VMA token file {}", path.display()))?
                .trim()
                .to_owned(),
            (None, None) => {
                return Err(
                    "no VMA token; pass --vma-token-file, --vma-token or OMA_NEW_VMA_TOKEN".into(),
                );
            }
        };
        Ok(serde_json::json!({ "base_url": self.base_url, "token": token }))
    }
}

/// `--sync-type`: the values the OMA accepts, refused here before a request is sent.
fn parse_sync_type(text: &str) -> Result<api::SyncType, String> {
    api::SyncType::parse(text).ok_or_else(|| format!("`{text}` is not `full` or `incremental`"))
}
