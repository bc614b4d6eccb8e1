//! `batch-server`, the agent-batch binary. Today it checks a jobs file and shows when each job
//! fires next; later issues add `run`, `serve` and `migrate`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

mod check_config;

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
}

fn parse_instant(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{text:?} is not an RFC 3339 instant (2027-03-14T07:00:00Z): {e}"))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig {
            file,
            next,
            from,
            json,
        } => check_config::run(&file, next, from.unwrap_or_else(Utc::now), json),
    }
}
