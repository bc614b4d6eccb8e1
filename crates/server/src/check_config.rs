//! `batch-server check-config`: validates a jobs file and lists the next fires of its jobs.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use batch_domain::config::{Job, parse_jobs_file};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

#[derive(Serialize)]
struct Report<'a> {
    jobs: Vec<JobReport<'a>>,
}

#[derive(Serialize)]
struct JobReport<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    batch_type: String,
    next: Vec<String>,
}

/// Exit status for a jobs file that cannot be read or is not valid.
const INVALID: u8 = 2;

pub(crate) fn run(file: &Path, next: usize, from: DateTime<Utc>, json: bool) -> ExitCode {
    let text = match std::fs::read_to_string(file)
        .with_context(|| format!("reading jobs file {}", file.display()))
    {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(INVALID);
        }
    };
    let jobs = match parse_jobs_file(&text) {
        Ok(jobs) => jobs,
        Err(problems) => {
            eprint!("{}: {problems}", file.display());
            return ExitCode::from(INVALID);
        }
    };
    let output = if json {
        let report = Report {
            jobs: jobs
                .jobs
                .iter()
                .map(|job| JobReport {
                    id: job.id.as_str(),
                    batch_type: job.batch_type.to_string(),
                    next: next_fires(job, from, next)
                        .iter()
                        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
                        .collect(),
                })
                .collect(),
        };
        match serde_json::to_string(&report) {
            Ok(text) => text + "\n",
            Err(e) => {
                eprintln!("error: encoding the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        table(&jobs.jobs, from, next)
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(output.as_bytes());
    ExitCode::SUCCESS
}

/// The next `count` fire instants of a job after `from`; none for disabled or manual jobs.
fn next_fires(job: &Job, from: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
    match job.effective_schedule() {
        Some(schedule) if job.enabled => schedule
            .upcoming(job.id.as_str(), from, count)
            .into_iter()
            .map(|(_, fire)| fire)
            .collect(),
        _ => Vec::new(),
    }
}

fn describe(job: &Job) -> String {
    let schedule = match (job.effective_schedule(), &job.dynamic) {
        (Some(s), Some(_)) => format!("preferences, default {s}"),
        (None, Some(_)) => "preferences only".to_owned(),
        (Some(s), None) => s.to_string(),
        (None, None) => "manual only".to_owned(),
    };
    if job.enabled {
        schedule
    } else {
        format!("{schedule} (disabled)")
    }
}

fn table(jobs: &[Job], from: DateTime<Utc>, count: usize) -> String {
    let rows: Vec<[String; 4]> = jobs
        .iter()
        .map(|job| {
            let next = next_fires(job, from, count)
                .iter()
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
                .collect::<Vec<_>>()
                .join(", ");
            [
                job.id.to_string(),
                job.batch_type.to_string(),
                describe(job),
                if next.is_empty() {
                    "-".to_owned()
                } else {
                    next
                },
            ]
        })
        .collect();
    let header = ["JOB", "TYPE", "SCHEDULE", "NEXT (UTC)"].map(str::to_owned);
    let mut widths = [0usize; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        out += &format!(
            "{:w0$}  {:w1$}  {:w2$}  {}\n",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    out += &format!("{} jobs valid\n", jobs.len());
    out
}
