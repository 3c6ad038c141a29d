//! `job-recovery`: the operators' client of the OMA's REST API: recovery, jobs, VMAs.

mod commands;
pub mod seed;
mod tables;

use crate::model::{Job, JobStatus};
use crate::recovery::{Decision, RunReport};
use crate::routes::recovery::RecoveryStatus;
use api::ErrorBody;
use clap::{Parser, Subcommand};
pub use commands::{CreateArgs, JobsArgs, RegisterVmaArgs};
use serde::de::DeserializeOwned;
use std::time::Duration;
use tables::{decisions_table, job_line, jobs_table, status_table};

/// Drive the OMA: see what recovery would change, recover, show status, list and create jobs,
/// register VMAs.
#[derive(Debug, Parser)]
#[command(name = "job-recovery", version, about)]
pub struct CliArgs {
    /// Base URL of the OMA.
    #[arg(
        long,
        env = "OMA_URL",
        default_value = "http://127.0.0.1:8082",
        global = true
    )]
    pub oma_url: String,
    /// Operator bearer token.
    #[arg(long, env = "OMA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File holding the operator token.
    #[arg(long, env = "OMA_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// CA that an `https://` OMA's certificate must chain to (PEM); nothing else is trusted.
    #[arg(long, env = "OMA_CA_FILE", global = true)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for an OMA that requires one (mutual TLS).
    #[arg(long, env = "OMA_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// Private key of --client-cert (PEM).
    #[arg(long, env = "OMA_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the active jobs recovery would change now, with the evidence.
    Scan,
    /// Run recovery now (or only show its decisions with --dry-run).
    Recover {
        /// Decide and report, but change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Jobs per status, the latest recovery runs and the poller's health.
    Status,
    /// List jobs (newest first) with status and progress.
    Jobs(JobsArgs),
    /// Create a job and start migratekit for it on its VMA (unless --no-start).
    Create(CreateArgs),
    /// Register a VMA (or replace its URL and event token).
    RegisterVma(RegisterVmaArgs),
}

/// Why a command failed, in one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No token anywhere.
    #[error("no operator token; pass --token, OMA_TOKEN or --token-file")]
    NoToken,
    /// The token file could not be read.
    #[error("could not read token file {0}")]
    TokenFile(String),
    /// The OMA did not answer.
    #[error("cannot reach the OMA at {url}: is it running? ({reason})")]
    Unreachable {
        /// Base URL tried.
        url: String,
        /// Transport error.
        reason: String,
    },
    /// 401.
    #[error("the OMA refused the token (401 unauthorized); check --token or OMA_TOKEN")]
    Unauthorized,
    /// 403.
    #[error("the token is not an operator token (403 forbidden)")]
    Forbidden,
    /// Any other error answer.
    #[error("the OMA answered HTTP {status}: {message}")]
    Http {
        /// HTTP status.
        status: u16,
        /// The OMA's message.
        message: String,
    },
    /// A command-line value is unusable.
    #[error("{0}")]
    BadArgument(String),
    /// The answer did not parse.
    #[error("the OMA's answer did not parse ({0}); are client and server the same version?")]
    Decode(String),
    /// An `https://` URL without a CA to verify it.
    #[error(
        "{0} is an https:// URL, but no CA is given to verify it; pass --ca-file (OMA_CA_FILE)"
    )]
    HttpsWithoutCa(String),
    /// A TLS file is unusable.
    #[error(transparent)]
    Tls(#[from] transport::TlsError),
}

async fn call<T: DeserializeOwned>(
    args: &CliArgs,
    token: &str,
    request: reqwest::RequestBuilder,
) -> Result<T, CliError> {
    call_with_status(args, token, request)
        .await
        .map(|(_, body)| body)
}

/// Like [`call`], also returning the success status (the job creation tells 201 from 202).
async fn call_with_status<T: DeserializeOwned>(
    args: &CliArgs,
    token: &str,
    request: reqwest::RequestBuilder,
) -> Result<(u16, T), CliError> {
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| CliError::Unreachable {
            url: args.oma_url.clone(),
            reason: e.without_url().to_string(),
        })?;
    match response.status().as_u16() {
        status @ 200..=299 => response
            .json()
            .await
            .map(|body| (status, body))
            .map_err(|e| CliError::Decode(e.without_url().to_string())),
        401 => Err(CliError::Unauthorized),
        403 => Err(CliError::Forbidden),
        status => Err(CliError::Http {
            status,
            message: response
                .json::<ErrorBody>()
                .await
                .map(|b| b.message)
                .unwrap_or_else(|_| "no error body".into()),
        }),
    }
}

/// Runs the command and returns what to print on stdout.
pub async fn run(args: &CliArgs) -> Result<String, CliError> {
    let client = Client {
        args,
        token: token(args)?,
        http: http_client(args)?,
        base: args.oma_url.trim_end_matches('/'),
    };
    match &args.command {
        Command::Scan => client.scan().await,
        Command::Recover { dry_run } => client.recover(*dry_run).await,
        Command::Status => client.status().await,
        Command::Jobs(filter) => client.jobs(filter).await,
        Command::Create(create) => client.create(create).await,
        Command::RegisterVma(vma) => client.register_vma(vma).await,
    }
}

/// The HTTP client: rustls, trusting `--ca-file` only, presenting the client certificate
/// when given. An `https://` OMA without a CA is refused before any request.
fn http_client(args: &CliArgs) -> Result<reqwest::Client, CliError> {
    let tls = transport::ClientTlsFiles {
        ca: args.ca_file.clone(),
        cert: args.client_cert.clone(),
        key: args.client_key.clone(),
    };
    if args.oma_url.starts_with("https://") && !tls.can_verify_servers() {
        return Err(CliError::HttpsWithoutCa(args.oma_url.clone()));
    }
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(120));
    tls.apply(builder)?
        .build()
        .map_err(|e| CliError::Decode(e.to_string()))
}

/// The operator token, from `--token`/`OMA_TOKEN` or else from the token file.
fn token(args: &CliArgs) -> Result<String, CliError> {
    match (&args.token, &args.token_file) {
        (Some(t), _) => Ok(t.clone()),
        (None, Some(path)) => Ok(std::fs::read_to_string(path)
            .map_err(|_| CliError::TokenFile(path.display().to_string()))?
            .trim()
            .to_owned()),
        (None, None) => Err(CliError::NoToken),
    }
}

/// What every command needs to call the OMA.
struct Client<'a> {
    args: &'a CliArgs,
    token: String,
    http: reqwest::Client,
    /// The OMA's base URL without a trailing slash.
    base: &'a str,
}

impl Client<'_> {
    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, CliError> {
        call(self.args, &self.token, request).await
    }

    /// JSON with `--json`, else the table `table` makes.
    fn render<T: serde::Serialize>(&self, value: &T, table: impl FnOnce(&T) -> String) -> String {
        if self.args.json {
            serde_json::to_string_pretty(value).unwrap_or_default()
        } else {
            table(value)
        }
    }

    async fn scan(&self) -> Result<String, CliError> {
        let url = format!("{}/api/v1/recovery/orphans", self.base);
        let orphans: Vec<Decision> = self.call(self.http.get(url)).await?;
        Ok(self.render(&orphans, |o| decisions_table(o.iter().map(|d| (d, None)))))
    }

    async fn recover(&self, dry_run: bool) -> Result<String, CliError> {
        let url = format!("{}/api/v1/recovery/run", self.base);
        let body = serde_json::json!({ "dry_run": dry_run });
        let report: RunReport = self.call(self.http.post(url).json(&body)).await?;
        Ok(self.render(&report, |report| {
            let run = &report.run;
            let mut out = format!(
                "{} run: examined {}, kept {}, finalized {}, waiting {}, superseded {}\n",
                if run.dry_run { "dry" } else { "real" },
                run.examined,
                run.kept,
                run.finalized,
                run.waiting,
                run.superseded
            );
            out.push_str(&decisions_table(
                report
                    .decisions
                    .iter()
                    .map(|d| (&d.decision, Some(d.applied))),
            ));
            out
        }))
    }

    async fn status(&self) -> Result<String, CliError> {
        let url = format!("{}/api/v1/recovery/status", self.base);
        let status: RecoveryStatus = self.call(self.http.get(url)).await?;
        Ok(self.render(&status, status_table))
    }

    async fn jobs(&self, filter: &JobsArgs) -> Result<String, CliError> {
        let url = format!("{}/api/v1/jobs", self.base);
        let jobs: Vec<Job> = self.call(self.http.get(url).query(&filter.query())).await?;
        Ok(self.render(&jobs, |jobs| jobs_table(jobs)))
    }

    async fn create(&self, create: &CreateArgs) -> Result<String, CliError> {
        let body = create.body().map_err(CliError::BadArgument)?;
        let url = format!("{}/api/v1/jobs", self.base);
        let (status, job): (u16, Job) =
            call_with_status(self.args, &self.token, self.http.post(url).json(&body)).await?;
        Ok(self.render(&job, |job| {
            if status == 202 && job.status == JobStatus::Pending {
                format!(
                    "{}the VMA did not answer the start request; the job stays pending and \
                     recovery adopts its process or fails it (see `job-recovery jobs`)\n",
                    job_line(job)
                )
            } else {
                job_line(job)
            }
        }))
    }

    async fn register_vma(&self, vma: &RegisterVmaArgs) -> Result<String, CliError> {
        let body = vma.body().map_err(CliError::BadArgument)?;
        let url = format!("{}/api/v1/vmas/{}", self.base, vma.id);
        let registered: serde_json::Value = self.call(self.http.put(url).json(&body)).await?;
        Ok(self.render(&registered, |_| {
            format!("VMA {} registered at {}\n", vma.id, vma.base_url)
        }))
    }
}
