//! `job-recovery`: the operators' client of the OMA's recovery API.

use crate::recovery::{Decision, RunReport};
use crate::routes::recovery::RecoveryStatus;
use api::ErrorBody;
use clap::{Parser, Subcommand};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Drive the OMA's job recovery: see what would be recovered, recover, or show status.
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
    /// The answer did not parse.
    #[error("the OMA's answer did not parse ({0}); are client and server the same version?")]
    Decode(String),
}

async fn call<T: DeserializeOwned>(
    args: &CliArgs,
    token: &str,
    request: reqwest::RequestBuilder,
) -> Result<T, CliError> {
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| CliError::Unreachable {
            url: args.oma_url.clone(),
            reason: e.without_url().to_string(),
        })?;
    match response.status().as_u16() {
        200 => response
            .json()
            .await
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

fn decisions_table<'a>(rows: impl Iterator<Item = (&'a Decision, Option<bool>)>) -> String {
    let mut out = format!(
        "{:<38} {:<12} {:<14} {:<9} {:<10} {:<24} {}\n",
        "JOB", "VMA", "STATUS", "ACTION", "TO", "CLASS", "APPLIED"
    );
    let mut n = 0;
    for (d, applied) in rows {
        n += 1;
        let action = serde_json::to_value(d.action)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        out.push_str(&format!(
            "{:<38} {:<12} {:<14} {:<9} {:<10} {:<24} {}\n",
            d.job_id,
            d.vma_id,
            d.from_status.as_str(),
            action.unwrap_or_default(),
            d.to_status.as_str(),
            d.failure_class.map(|c| c.as_str()).unwrap_or("-"),
            applied.map(|a| if a { "yes" } else { "no" }).unwrap_or("-"),
        ));
    }
    if n == 0 {
        out.push_str("(no jobs)\n");
    }
    out
}

fn status_table(status: &RecoveryStatus) -> String {
    let mut out = format!("active jobs: {}\n", status.active_jobs);
    for (s, n) in &status.jobs_by_status {
        out.push_str(&format!("  {s:<16} {n}\n"));
    }
    out.push_str("last recovery runs:\n");
    for run in &status.last_runs {
        let at = crate::model::from_ms(run.started_at_ms).to_rfc3339();
        out.push_str(&format!(
            "  {at} {:<9} {} examined {} kept {} finalized {} waiting {} superseded {}\n",
            run.trigger,
            if run.dry_run { "dry " } else { "real" },
            run.examined,
            run.kept,
            run.finalized,
            run.waiting,
            run.superseded
        ));
    }
    let p = &status.poller;
    out.push_str(&format!(
        "poller: cycles {} tracked {} backing off {} polls ok {} failed {} last cycle {}\n",
        p.cycles,
        p.jobs_tracked,
        p.jobs_backing_off,
        p.polls_ok,
        p.polls_failed,
        p.last_cycle_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "never".into())
    ));
    if let Some(e) = &p.last_error {
        out.push_str(&format!("poller last error: {e}\n"));
    }
    out
}
