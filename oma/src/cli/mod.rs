//! `job-recovery`: the operators' client of the OMA's REST API: recovery, jobs, VMAs.

mod commands;
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
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|_| CliError::TokenFile(path.display().to_string()))?
            .trim()
            .to_owned(),
        (None, None) => return Err(CliError::NoToken),
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| CliError::Decode(e.to_string()))?;
    let base = args.oma_url.trim_end_matches('/');
    let json = |v: &dyn erased::Json| v.pretty();
    Ok(match &args.command {
        Command::Scan => {
            let orphans: Vec<Decision> = call(
                args,
                &token,
                http.get(format!("{base}/api/v1/recovery/orphans")),
            )
            .await?;
            if args.json {
                json(&orphans)
            } else {
                decisions_table(orphans.iter().map(|d| (d, None)))
            }
        }
        Command::Recover { dry_run } => {
            let body = serde_json::json!({ "dry_run": dry_run });
            let report: RunReport = call(
                args,
                &token,
                http.post(format!("{base}/api/v1/recovery/run")).json(&body),
            )
            .await?;
            if args.json {
                json(&report)
            } else {
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
            }
        }
        Command::Status => {
            let status: RecoveryStatus = call(
                args,
                &token,
                http.get(format!("{base}/api/v1/recovery/status")),
            )
            .await?;
            if args.json {
                json(&status)
            } else {
                status_table(&status)
            }
        }
        Command::Jobs(filter) => {
            let jobs: Vec<Job> = call(
                args,
                &token,
                http.get(format!("{base}/api/v1/jobs"))
                    .query(&filter.query()),
            )
            .await?;
            if args.json {
                json(&jobs)
            } else {
                jobs_table(&jobs)
            }
        }
        Command::Create(create) => {
            let body = create.body().map_err(CliError::BadArgument)?;
            let (status, job): (u16, Job) = call_with_status(
                args,
                &token,
                http.post(format!("{base}/api/v1/jobs")).json(&body),
            )
            .await?;
            if args.json {
                json(&job)
            } else if status == 202 && job.status == JobStatus::Pending {
                format!(
                    "{}the VMA did not answer the start request; the job stays pending and \
                     recovery adopts its process or fails it (see `job-recovery jobs`)\n",
                    job_line(&job)
                )
            } else {
                job_line(&job)
            }
        }
        Command::RegisterVma(vma) => {
            let body = vma.body().map_err(CliError::BadArgument)?;
            let registered: serde_json::Value = call(
                args,
                &token,
                http.put(format!("{base}/api/v1/vmas/{}", vma.id))
                    .json(&body),
            )
            .await?;
            if args.json {
                json(&registered)
            } else {
                format!("VMA {} registered at {}\n", vma.id, vma.base_url)
            }
        }
    })
}

mod erased {
    /// Pretty JSON of anything serializable, without making `run` generic.
    pub trait Json {
        fn pretty(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn pretty(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_default()
        }
    }
}
