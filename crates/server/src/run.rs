//! `batch-server run`: one occurrence of a job, now, in this process, to completion.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use batch_app::Ports;
use batch_app::processor::{BatchProcessor, ProcessorSettings};
use batch_app::strategy::{Scope, Strategies};
use batch_clients::local::{FileTemplates, RenderingExecutor};
use batch_domain::config::parse_jobs_file;
use batch_domain::context::BatchContext;
use batch_domain::run::{RunStatus, Trigger};
use batch_ports::{SystemClock, TemplateSource};
use batch_store::Store;

/// What `run` needs to know.
#[derive(Debug, Clone)]
pub(crate) struct RunArgs {
    pub(crate) job: String,
    pub(crate) jobs: PathBuf,
    pub(crate) database_url: String,
    pub(crate) templates: PathBuf,
    pub(crate) sample_data: PathBuf,
    pub(crate) external_tables: Option<bool>,
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
    // The embedded default manages the stand-ins of external tables itself; elsewhere they
    // belong to other systems unless asked for.
    let embedded = args.database_url.starts_with("sqlite:");
    let external = args.external_tables.unwrap_or(embedded);
    let store = Arc::new(
        Store::open(&args.database_url, external)
            .await
            .with_context(|| {
                format!(
                    "opening the database {}",
                    batch_store::redact(&args.database_url)
                )
            })?,
    );
    if external
        && args.sample_data.is_dir()
        && let Some(loaded) = store
            .seed_sample_data(&args.sample_data)
            .await
            .context("loading sample data")?
    {
        tracing::info!(?loaded, "sample data loaded into an empty database");
    }
    let templates: Arc<dyn TemplateSource> = Arc::new(
        FileTemplates::load(&args.templates)
            .with_context(|| format!("loading templates from {}", args.templates.display()))?,
    );
    let ports = Ports {
        runs: store.clone(),
        contexts: store.clone(),
        users: store.clone(),
        categories: store.clone(),
        preferences: store.clone(),
        executor: Arc::new(RenderingExecutor::new(templates.clone())),
        templates,
        clock: Arc::new(SystemClock),
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
