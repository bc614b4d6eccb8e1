//! `batchctl`, the command-line client of agent-batch's gRPC API (`agent.batch.v1`): list and
//! pause jobs, trigger runs and watch them with a progress bar, inspect runs, items, references
//! and schedules, cancel and retry. Human tables by default, `--json` for scripts.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use batch_proto::batch::v1 as pb;
use batch_proto::batch::v1::batch_service_client::BatchServiceClient;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The agent-batch command-line client.
#[derive(Debug, Parser)]
#[command(name = "batchctl", version, about)]
struct Cli {
    /// The server.
    #[arg(
        long,
        global = true,
        env = "BATCH_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// The bearer token (tenants see only their own jobs and runs).
    #[arg(long, global = true, env = "BATCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Jobs: list, get, pause, resume.
    #[command(subcommand)]
    Jobs(Jobs),
    /// Start a run of a job now.
    Trigger {
        /// The job.
        job: String,
        /// Only these users (repeatable).
        #[arg(long = "user")]
        users: Vec<String>,
        /// A template instead of the job's.
        #[arg(long)]
        template: Option<String>,
        /// A parameter `key=value` merged over every item's (repeatable; values are JSON when
        /// they parse as JSON, text otherwise).
        #[arg(long = "param")]
        parameters: Vec<String>,
        /// A priority (0-100) instead of the job's.
        #[arg(long)]
        priority: Option<u32>,
        /// Follow the run with a progress bar until it ends; exit 1 unless it succeeded.
        #[arg(long)]
        watch: bool,
    },
    /// Create a run for every instant of a job's schedule in a past range.
    Backfill {
        /// The job.
        job: String,
        /// From (RFC 3339).
        #[arg(long)]
        from: DateTime<Utc>,
        /// To (RFC 3339), not after now.
        #[arg(long)]
        to: DateTime<Utc>,
    },
    /// Runs: list, get, watch.
    #[command(subcommand)]
    Runs(Runs),
    /// A run's items (results).
    Items {
        /// The run.
        run: String,
        /// Only items of this status.
        #[arg(long)]
        status: Option<String>,
        /// Only this user's items.
        #[arg(long)]
        user: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The batch references a user has received, newest first.
    References {
        /// The user.
        user: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Next fire times of the schedules (each job's own, and each preference group).
    Schedules {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Only the preference groups of this user.
        #[arg(long)]
        user: Option<String>,
        /// Only Dynamic jobs of this feature type.
        #[arg(long)]
        feature_type: Option<String>,
    },
    /// Ask a run to stop.
    Cancel {
        /// The run.
        run: String,
    },
    /// Start a run of the failed items of an ended run.
    RetryFailed {
        /// The run.
        run: String,
    },
}

#[derive(Debug, Subcommand)]
enum Jobs {
    /// Every job you may see.
    List,
    /// One job.
    Get {
        /// The job.
        job: String,
    },
    /// Pause a job's schedules.
    Pause {
        /// The job.
        job: String,
        /// Why.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Resume a paused job.
    Resume {
        /// The job.
        job: String,
    },
}

#[derive(Debug, Subcommand)]
enum Runs {
    /// Runs, newest first.
    List {
        /// Only runs of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only runs in this status.
        #[arg(long)]
        status: Option<String>,
        /// Only runs of Dynamic jobs of this feature type.
        #[arg(long)]
        feature_type: Option<String>,
        /// Only runs with an item for this user.
        #[arg(long)]
        user: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One run with its batch context.
    Get {
        /// The run.
        run: String,
    },
    /// Follow a run with a progress bar until it ends.
    Watch {
        /// The run.
        run: String,
    },
}

/// Adds the bearer token to every call.
#[derive(Clone, Debug)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

type Client = BatchServiceClient<InterceptedService<Channel, Bearer>>;

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(cli.server.clone())
        .with_context(|| format!("--server {:?} is not a URL (http://host:port)", cli.server))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cli.server))?;
    let token = cli
        .token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
        .transpose()
        .context("the token has characters a header cannot carry")?;
    Ok(BatchServiceClient::with_interceptor(channel, Bearer(token)))
}

/// A gRPC error as one line: the code and the server's message.
fn call_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn time(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or(Value::Null, |t| {
            Value::from(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        })
}

fn run_json(run: &pb::Run) -> Value {
    let progress = run.progress.unwrap_or_default();
    json!({
        "id": run.run_id,
        "job_id": run.job_id,
        "tenant": run.tenant_id,
        "status": run.status,
        "trigger": run.trigger,
        "group": run.group,
        "priority": run.priority,
        "scheduled_for": time(run.scheduled_for.as_ref()),
        "created_at": time(run.created_at.as_ref()),
        "started_at": time(run.started_at.as_ref()),
        "finished_at": time(run.finished_at.as_ref()),
        "progress": {
            "processed": progress.processed,
            "succeeded": progress.succeeded,
            "failed": progress.failed,
            "total": progress.total,
            "percentage": progress.percentage,
        },
    })
}

fn job_json(job: &pb::Job) -> Value {
    json!({
        "id": job.job_id,
        "tenant": job.tenant_id,
        "type": job.r#type,
        "enabled": job.enabled,
        "paused": (!job.pause_note.is_empty()).then_some(&job.pause_note),
        "schedule": job.schedule,
        "feature_type": job.feature_type,
        "priority": job.priority,
        "description": job.description,
    })
}

fn struct_json(value: &prost_types::Struct) -> Value {
    Value::Object(batch_proto::json::from_struct(value))
}

/// Prints rows as a table with a header, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header.iter().map(|h| (*h).to_owned()).collect()));
    for row in rows {
        println!("{}", line(row.clone()));
    }
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("encoding JSON")?
    );
    Ok(())
}

fn short_time(value: &Value) -> String {
    value.as_str().unwrap_or("-").to_owned()
}

fn print_runs(cli: &Cli, runs: &[pb::Run]) -> anyhow::Result<()> {
    if cli.json {
        return print_json(&Value::Array(runs.iter().map(run_json).collect()));
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let j = run_json(r);
            let p = r.progress.unwrap_or_default();
            vec![
                r.run_id.clone(),
                r.job_id.clone(),
                r.status.clone(),
                r.trigger.clone(),
                short_time(&j["scheduled_for"]),
                format!("{}/{} ({} failed)", p.processed, p.total, p.failed),
            ]
        })
        .collect();
    table(
        &[
            "RUN",
            "JOB",
            "STATUS",
            "TRIGGER",
            "SCHEDULED FOR",
            "PROGRESS",
        ],
        &rows,
    );
    Ok(())
}

/// Follows `run` until it ends, with a progress bar on a terminal (or one line per change
/// otherwise). Returns the final run.
async fn watch(client: &mut Client, run: &str, json_lines: bool) -> anyhow::Result<pb::Run> {
    let mut stream = client
        .watch_run(pb::WatchRunRequest {
            run_id: run.to_owned(),
        })
        .await
        .map_err(call_error)?
        .into_inner();
    let bar = indicatif::ProgressBar::new(0);
    if !json_lines {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {pos}/{len} ({percent}%)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    }
    let mut last = None;
    while let Some(message) = stream.message().await.map_err(call_error)? {
        let Some(run) = message.run else { continue };
        let progress = run.progress.unwrap_or_default();
        if json_lines {
            println!("{}", run_json(&run));
        } else {
            bar.set_length(progress.total);
            bar.set_position(progress.processed);
            bar.set_message(format!("{} {}", run.run_id, run.status));
        }
        last = Some(run);
    }
    if !json_lines {
        bar.finish();
    }
    last.context("the server ended the watch without any progress")
}

async fn execute(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut client = connect(cli).await?;
    match &cli.command {
        Command::Jobs(Jobs::List) => {
            let jobs = client
                .list_jobs(pb::ListJobsRequest {})
                .await
                .map_err(call_error)?
                .into_inner()
                .jobs;
            if cli.json {
                print_json(&Value::Array(jobs.iter().map(job_json).collect()))?;
            } else {
                let rows: Vec<Vec<String>> = jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.job_id.clone(),
                            j.tenant_id.clone(),
                            j.r#type.clone(),
                            if j.pause_note.is_empty() {
                                j.schedule.clone()
                            } else {
                                format!("paused: {}", j.pause_note)
                            },
                        ]
                    })
                    .collect();
                table(&["JOB", "TENANT", "TYPE", "SCHEDULE"], &rows);
            }
        }
        Command::Jobs(Jobs::Get { job }) => {
            let job = client
                .get_job(pb::GetJobRequest {
                    job_id: job.clone(),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .job
                .context("the server answered no job")?;
            print_json(&job_json(&job))?;
        }
        Command::Jobs(Jobs::Pause { job, note }) => {
            client
                .pause_job(pb::PauseJobRequest {
                    job_id: job.clone(),
                    note: note.clone(),
                })
                .await
                .map_err(call_error)?;
            println!("{job} paused");
        }
        Command::Jobs(Jobs::Resume { job }) => {
            let answer = client
                .resume_job(pb::ResumeJobRequest {
                    job_id: job.clone(),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            println!(
                "{job} {}",
                if answer.was_paused {
                    "resumed"
                } else {
                    "was not paused"
                }
            );
        }
        Command::Trigger {
            job,
            users,
            template,
            parameters,
            priority,
            watch: follow,
        } => {
            let mut map = serde_json::Map::new();
            for parameter in parameters {
                let Some((key, value)) = parameter.split_once('=') else {
                    bail!("--param {parameter:?} is not key=value");
                };
                let value = serde_json::from_str(value).unwrap_or_else(|_| Value::from(value));
                map.insert(key.to_owned(), value);
            }
            let run = client
                .trigger_job(pb::TriggerJobRequest {
                    job_id: job.clone(),
                    user_ids: users.clone(),
                    template_id: template.clone().unwrap_or_default(),
                    parameters: (!map.is_empty()).then(|| batch_proto::json::to_struct(&map)),
                    priority: *priority,
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .run
                .context("the server answered no run")?;
            if !follow {
                if cli.json {
                    print_json(&run_json(&run))?;
                } else {
                    println!("run {} of {} queued", run.run_id, run.job_id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let last = watch(&mut client, &run.run_id, cli.json).await?;
            if !cli.json {
                println!("run {} {}", last.run_id, last.status);
            }
            return Ok(if last.status == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Backfill { job, from, to } => {
            let stamp = |t: &DateTime<Utc>| prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: 0,
            };
            let answer = client
                .backfill_job(pb::BackfillJobRequest {
                    job_id: job.clone(),
                    from: Some(stamp(from)),
                    to: Some(stamp(to)),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            if cli.json {
                print_json(&json!({"run_ids": answer.run_ids, "existed": answer.existed}))?;
            } else {
                println!(
                    "{} runs created, {} instants had a run already",
                    answer.run_ids.len(),
                    answer.existed
                );
            }
        }
        Command::Runs(Runs::List {
            job,
            status,
            feature_type,
            user,
            limit,
        }) => {
            let mut runs = Vec::new();
            let mut token = String::new();
            while runs.len() < *limit {
                let page = client
                    .list_runs(pb::ListRunsRequest {
                        job_id: job.clone().unwrap_or_default(),
                        status: status.clone().unwrap_or_default(),
                        feature_type: feature_type.clone().unwrap_or_default(),
                        user_id: user.clone().unwrap_or_default(),
                        page_token: token.clone(),
                        page_size: u32::try_from((*limit - runs.len()).min(1_000)).unwrap_or(1_000),
                        ..pb::ListRunsRequest::default()
                    })
                    .await
                    .map_err(call_error)?
                    .into_inner();
                runs.extend(page.runs);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            runs.truncate(*limit);
            print_runs(cli, &runs)?;
        }
        Command::Runs(Runs::Get { run }) => {
            let answer = client
                .get_run(pb::GetRunRequest {
                    run_id: run.clone(),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            let run = answer.run.context("the server answered no run")?;
            let mut value = run_json(&run);
            value["context"] = answer.context.as_ref().map_or(Value::Null, struct_json);
            print_json(&value)?;
        }
        Command::Runs(Runs::Watch { run }) => {
            let last = watch(&mut client, run, cli.json).await?;
            if !cli.json {
                println!("run {} {}", last.run_id, last.status);
            }
        }
        Command::Items {
            run,
            status,
            user,
            limit,
        } => {
            let mut items = Vec::new();
            let mut token = String::new();
            while items.len() < *limit {
                let page = client
                    .list_run_items(pb::ListRunItemsRequest {
                        run_id: run.clone(),
                        status: status.clone().unwrap_or_default(),
                        user_id: user.clone().unwrap_or_default(),
                        page_token: token.clone(),
                        page_size: 1_000,
                    })
                    .await
                    .map_err(call_error)?
                    .into_inner();
                items.extend(page.items);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            items.truncate(*limit);
            if cli.json {
                print_json(&Value::Array(
                    items
                        .iter()
                        .map(|i| {
                            json!({
                                "seq": i.seq, "key": i.key, "user_id": i.user_id,
                                "status": i.status, "attempts": i.attempts,
                                "last_error": i.last_error,
                                "result": i.result.as_ref().map_or(Value::Null, struct_json),
                            })
                        })
                        .collect(),
                ))?;
            } else {
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|i| {
                        vec![
                            i.key.clone(),
                            i.user_id.clone(),
                            i.status.clone(),
                            i.attempts.to_string(),
                            i.last_error.clone(),
                        ]
                    })
                    .collect();
                table(&["ITEM", "USER", "STATUS", "ATTEMPTS", "LAST ERROR"], &rows);
            }
        }
        Command::References { user, limit } => {
            let references = client
                .list_user_references(pb::ListUserReferencesRequest {
                    user_id: user.clone(),
                    page_token: String::new(),
                    page_size: u32::try_from((*limit).min(1_000)).unwrap_or(1_000),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .references;
            if cli.json {
                print_json(&Value::Array(
                    references
                        .iter()
                        .map(|r| {
                            json!({
                                "run_id": r.run_id, "job_id": r.job_id, "user_id": r.user_id,
                                "created_at": time(r.created_at.as_ref()),
                            })
                        })
                        .collect(),
                ))?;
            } else {
                let rows: Vec<Vec<String>> = references
                    .iter()
                    .map(|r| {
                        vec![
                            r.run_id.clone(),
                            r.job_id.clone(),
                            short_time(&time(r.created_at.as_ref())),
                        ]
                    })
                    .collect();
                table(&["RUN", "JOB", "HANDED OUT"], &rows);
            }
        }
        Command::Schedules {
            job,
            user,
            feature_type,
        } => {
            let schedules = client
                .get_schedules(pb::GetSchedulesRequest {
                    job_id: job.clone().unwrap_or_default(),
                    feature_type: feature_type.clone().unwrap_or_default(),
                    user_id: user.clone().unwrap_or_default(),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .schedules;
            if cli.json {
                print_json(&Value::Array(
                    schedules
                        .iter()
                        .map(|s| {
                            json!({
                                "job_id": s.job_id, "group": s.group, "schedule": s.schedule,
                                "users": s.users, "nominal": time(s.nominal.as_ref()),
                                "fire_at": time(s.fire_at.as_ref()),
                                "paused": (!s.pause_note.is_empty()).then_some(&s.pause_note),
                                "feature_type": s.feature_type,
                            })
                        })
                        .collect(),
                ))?;
            } else {
                let rows: Vec<Vec<String>> = schedules
                    .iter()
                    .map(|s| {
                        vec![
                            short_time(&time(s.fire_at.as_ref())),
                            s.job_id.clone(),
                            s.schedule.clone(),
                            if s.group.is_empty() {
                                String::new()
                            } else {
                                format!("{} users", s.users)
                            },
                            s.pause_note.clone(),
                        ]
                    })
                    .collect();
                table(&["NEXT FIRE", "JOB", "SCHEDULE", "GROUP", "PAUSED"], &rows);
            }
        }
        Command::Cancel { run } => {
            client
                .cancel_run(pb::CancelRunRequest {
                    run_id: run.clone(),
                })
                .await
                .map_err(call_error)?;
            println!("run {run} asked to stop");
        }
        Command::RetryFailed { run } => {
            let retry = client
                .retry_failed_items(pb::RetryFailedItemsRequest {
                    run_id: run.clone(),
                })
                .await
                .map_err(call_error)?
                .into_inner()
                .run
                .context("the server answered no run")?;
            if cli.json {
                print_json(&run_json(&retry))?;
            } else {
                println!("run {} retries the failed items of {run}", retry.run_id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(execute(&cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
