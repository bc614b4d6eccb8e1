//! `batch-server run`: one occurrence of a job, now, in this process, to completion.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use batch_app::Ports;
use batch_app::processor::{BatchProcessor, ProcessorSettings};
use batch_app::strategy::{Scope, Strategies};
use batch_domain::config::parse_jobs_file;
use batch_domain::context::BatchContext;
use batch_domain::run::{RunStatus, Trigger};
use batch_ports::{Clock, SystemClock};

use crate::wiring::{self, SiblingArgs};

/// What `run` needs to know.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RunArgs {
    /// The job to run.
    pub(crate) job: String,
    /// The jobs file.
    #[arg(long, env = "BATCH_JOBS_FILE", default_value = "config/jobs.json")]
    pub(crate) jobs: PathBuf,
    /// The database (created and migrated if needed).
    #[arg(
        long,
        env = "BATCH_DATABASE_URL",
        default_value = "sqlite://data/batch.db?mode=rwc"
    )]
    pub(crate) database_url: String,
    /// The directory of execution templates (when no template endpoint is given).
    #[arg(long, env = "BATCH_TEMPLATES_DIR", default_value = "config/templates")]
    pub(crate) templates: PathBuf,
    /// Sample data loaded into an empty embedded database.
    #[arg(
        long,
        env = "BATCH_SAMPLE_DATA_DIR",
        default_value = "config/sample-data"
    )]
    pub(crate) sample_data: PathBuf,
    /// Create and use the stand-in tables of users, categories and preferences (default:
    /// yes for SQLite, no for PostgreSQL).
    #[arg(long, env = "BATCH_EXTERNAL_TABLES")]
    pub(crate) external_tables: Option<bool>,
    /// Where the sibling services are.
    #[command(flatten)]
    pub(crate) siblings: SiblingArgs,
    /// Print the context JSON alone on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Runs the job and prints its context; the exit status is 0 when every item succeeded.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.jobs)
        .with_context(|| format!("reading jobs file {}", args.jobs.display()))?;
    let jobs =
        parse_jobs_file(&text).map_err(|p| anyhow::anyhow!("{}: {p}", args.jobs.display()))?;
    let Some(job) = jobs.job(&args.job) else {
        let known: Vec<&str> = jobs.jobs.iter().map(|j| j.id.as_str()).collect();
        bail!(
            "no job {:?} in {}; its jobs are: {}",
            args.job,
            args.jobs.display(),
            known.join(", ")
        );
    };
    let store =
        wiring::open_store(&args.database_url, args.external_tables, &args.sample_data).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let templates = wiring::templates(&args.siblings, &args.templates, clock.clone())?;
    let ports = Ports {
        runs: store.clone(),
        contexts: store.clone(),
        users: store.clone(),
        categories: store.clone(),
        preferences: wiring::preferences(&args.siblings, store.clone(), clock.clone())?,
        executor: wiring::executor(&args.siblings, templates.clone(), clock.clone())?,
        templates,
        clock,
    };
    let processor = BatchProcessor::new(ports, Strategies::default(), ProcessorSettings::default());
    let run = processor
        .start(job, Trigger::Manual, None, &Scope::default(), None)
        .await
        .with_context(|| format!("preparing a run of {}", job.id))?;
    let Some(mut execution) = processor.open(job, &run.id).await? else {
        bail!("run {} was taken over by another process", run.id);
    };
    let status = execution
        .run_to_completion()
        .await
        .with_context(|| format!("executing run {}", run.id))?;
    let context = processor
        .contexts()
        .current(&job.tenant, &run.id)
        .await
        .context("reading the run's context")?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&context).context("encoding the context")?
        );
    } else {
        print!("{}", summary(&context));
    }
    Ok(if status == RunStatus::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The context in a few lines for people.
fn summary(context: &BatchContext) -> String {
    let m = &context.metadata;
    let p = &context.progress;
    let v = &context.validation;
    let mut out = format!(
        "run {} of {} ({}, {}): {}\n  progress: {}/{} processed, {} succeeded, {} failed ({}%)\n  validation: {} checked, {} valid, {} invalid\n  items: {} valid, {} invalid{}\n",
        m.run_id,
        m.job_id,
        m.batch_type,
        m.strategy,
        m.status,
        p.processed,
        p.total,
        p.succeeded,
        p.failed,
        p.percentage,
        v.total,
        v.valid,
        v.invalid,
        context.items.valid.count,
        context.items.invalid.count,
        if context.items.invalid.sample.is_empty() {
            String::new()
        } else {
            format!(" ({})", context.items.invalid.sample.join(", "))
        }
    );
    if let Some(refs) = &context.user_references {
        out += &format!(
            "  user references: {} checked, {} valid, {} invalid\n",
            refs.total, refs.valid, refs.invalid
        );
    }
    for note in &context.notes {
        out += &format!("  note: {note}\n");
    }
    out
}

/// Whether `path` is given relative to the working directory and missing: a hint for people
/// who run the binary outside the repository.
pub(crate) fn missing_hint(path: &Path) -> Option<String> {
    (!path.exists() && path.is_relative()).then(|| {
        format!(
            "{} does not exist here; run from the repository root or pass the path",
            path.display()
        )
    })
}
