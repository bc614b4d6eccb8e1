//! `batch-server`, the agent-batch binary: `serve` (the default) serves the gRPC API, fires
//! schedules and executes runs; `check-config` validates a jobs file and shows when each job
//! fires next; `run` runs one occurrence of a job now, in process, to completion; `migrate`
//! brings the schema up to date.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

mod api;
mod auth;
mod check_config;
mod jobs;
mod run;
mod serve;
mod settings;
mod wiring;

/// The agent-batch server.
#[derive(Debug, Parser)]
#[command(name = "batch-server", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a jobs file and show the next fire times of its jobs.
    CheckConfig {
        /// The jobs file.
        #[arg(default_value = "config/jobs.json", env = "BATCH_JOBS_FILE")]
        file: PathBuf,
        /// How many fire times to show per job.
        #[arg(long, default_value_t = 1)]
        next: usize,
        /// Compute fire times after this instant (RFC 3339) instead of now.
        #[arg(long, value_parser = parse_instant)]
        from: Option<DateTime<Utc>>,
        /// Print `{"jobs":[{"id","type","next":[…]}]}` instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one occurrence of a job now, in this process, and print its batch context.
    /// Exits 0 when every item succeeded, 1 when some did not, 2 on an error.
    Run(run::RunArgs),
    /// Serve the gRPC API, fire schedules and execute runs (the default command).
    Serve(Box<serve::ServeArgs>),
    /// Bring the database schema up to date and exit (for deploy pipelines).
    Migrate {
        /// The database.
        #[arg(
            long,
            env = "BATCH_DATABASE_URL",
            default_value = "sqlite://data/batch.db?mode=rwc",
            hide_env_values = true
        )]
        database_url: String,
        /// Also create the stand-in tables of users, categories and preferences.
        #[arg(long, env = "BATCH_EXTERNAL_TABLES")]
        external_tables: Option<bool>,
    },
}

fn parse_instant(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{text:?} is not an RFC 3339 instant (2027-03-14T07:00:00Z): {e}"))
}

/// Runs `future` on a multi-threaded runtime; errors print with their causes and exit 2.
fn block_on(future: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    // `serve` is the default command.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.len() == 1 {
        argv.push("serve".into());
    }
    let matches = <Cli as clap::CommandFactory>::command().get_matches_from(argv);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Serve(mut args) => {
            init_logs();
            let (path, required) = match &args.config {
                Some(path) => (path.clone(), true),
                None => (PathBuf::from("config/server.toml"), false),
            };
            match settings::SettingsFile::read(&path, required) {
                Ok(file) => {
                    if let Some(serve) = matches.subcommand_matches("serve") {
                        file.apply(&mut args, serve);
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            }
            block_on(serve::serve(*args))
        }
        Command::Migrate {
            database_url,
            external_tables,
        } => {
            init_logs();
            block_on(async move {
                let store = batch_store::Store::connect(&database_url)
                    .await
                    .with_context(|| {
                        format!(
                            "opening the database {}",
                            batch_store::redact(&database_url)
                        )
                    })?;
                store.migrate().await.context("migrating")?;
                if external_tables.unwrap_or(false) {
                    store
                        .migrate_external()
                        .await
                        .context("migrating the external stand-in tables")?;
                }
                println!("migrated {}", batch_store::redact(&database_url));
                Ok(())
            })
        }
        Command::CheckConfig {
            file,
            next,
            from,
            json,
        } => check_config::run(&file, next, from.unwrap_or_else(Utc::now), json),
        Command::Run(args) => {
            init_logs();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(run::run(args.clone())) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    if let Some(hint) = run::missing_hint(&args.jobs) {
                        eprintln!("hint: {hint}");
                    }
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Logs go to stderr: warnings, and `info` of the service itself, unless `RUST_LOG` says
/// otherwise; one JSON object per line with `BATCH_LOG_FORMAT=json`, text otherwise. sqlx's
/// statement logs stay off below warnings.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,batch_app=info,batch_server=info,sqlx=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("BATCH_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}
