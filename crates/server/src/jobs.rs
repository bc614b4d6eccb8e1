//! The job table and the in-memory catalog: the jobs file is written into the table at start
//! (file jobs replaced, API jobs kept), and every replica reloads its catalog when the table's
//! version moves.

use std::sync::Arc;

use anyhow::Context;
use batch_app::catalog::JobCatalog;
use batch_domain::config::{JobsFile, Problems, parse_job_with_defaults};
use batch_domain::{JobId, TenantId};
use batch_ports::jobs::{JobDefinition, JobOrigin, JobStore};
use batch_ports::runs::StoreError;
use serde_json::Value;

/// The file's raw job objects with their ids and tenants, and its `defaults`.
///
/// # Errors
/// When the text is not the JSON the validated `file` was read from.
pub(crate) fn file_definitions(
    text: &str,
    file: &JobsFile,
) -> anyhow::Result<(Vec<JobDefinition>, Value)> {
    let raw: Value = serde_json::from_str(text).context("re-reading the jobs file")?;
    let defaults = raw.get("defaults").cloned().unwrap_or(Value::Null);
    let objects = raw
        .get("jobs")
        .and_then(Value::as_array)
        .context("the jobs file has no jobs list")?;
    let definitions = file
        .jobs
        .iter()
        .zip(objects)
        .map(|(job, object)| JobDefinition {
            id: job.id.clone(),
            tenant: job.tenant.clone(),
            definition: object.clone(),
            origin: JobOrigin::File,
        })
        .collect();
    Ok((definitions, defaults))
}

/// Reads every definition and replaces the catalog with the jobs that parse; a stored
/// definition that no longer parses (the file's defaults changed, say) is left out and logged
/// with its problems.
///
/// # Errors
/// When the store fails.
pub(crate) async fn reload(
    store: &dyn JobStore,
    catalog: &JobCatalog,
    defaults: &Value,
) -> Result<(), StoreError> {
    let (definitions, version) = store.job_definitions().await?;
    let mut jobs = Vec::with_capacity(definitions.len());
    for definition in definitions {
        match parse_job_with_defaults(defaults, definition.definition) {
            Ok(job) => jobs.push(job),
            Err(problems) => {
                tracing::error!(job = %definition.id, %problems, "stored job left out");
            }
        }
    }
    catalog.replace(version, &jobs);
    tracing::info!(version, jobs = catalog.jobs().len(), "job catalog loaded");
    Ok(())
}

/// Checks an API definition of a job of `tenant`: the tenant comes from the caller, the id
/// must match `id` when one is given, and the job must validate with the file's `defaults`.
/// Returns the definition as stored.
///
/// # Errors
/// Every problem, with paths from the job (`schedule.at: …`).
pub(crate) fn checked(
    mut definition: serde_json::Map<String, Value>,
    tenant: Option<&TenantId>,
    id: Option<&JobId>,
    defaults: &Value,
) -> Result<JobDefinition, String> {
    if let Some(tenant) = tenant {
        match definition.get("tenant").and_then(Value::as_str) {
            Some(given) if given != tenant.as_str() => {
                return Err(format!(
                    "tenant: {given:?} is not yours; a job belongs to the caller's tenant"
                ));
            }
            _ => {
                definition.insert("tenant".to_owned(), Value::from(tenant.as_str()));
            }
        }
    }
    if let Some(id) = id {
        match definition.get("id").and_then(Value::as_str) {
            Some(given) if given != id.as_str() => {
                return Err(format!("id: {given:?} differs from job_id {id:?}"));
            }
            _ => {
                definition.insert("id".to_owned(), Value::from(id.as_str()));
            }
        }
    }
    let value = Value::Object(definition);
    let job = parse_job_with_defaults(defaults, value.clone()).map_err(|Problems(problems)| {
        problems
            .iter()
            .map(|p| {
                format!(
                    "{}: {}",
                    if p.path.is_empty() { "job" } else { &p.path },
                    p.message
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(JobDefinition {
        id: job.id,
        tenant: job.tenant,
        definition: value,
        origin: JobOrigin::Api,
    })
}

/// Keeps `catalog` in step with the job table until `stopped`: one version read per `every`.
pub(crate) async fn follow(
    store: Arc<dyn JobStore>,
    catalog: Arc<JobCatalog>,
    defaults: Arc<Value>,
    clock: Arc<dyn batch_ports::Clock>,
    every: std::time::Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    while !*stopped.borrow() {
        match store.catalog_version().await {
            Ok(version) if version != catalog.version() => {
                if let Err(e) = reload(store.as_ref(), &catalog, &defaults).await {
                    tracing::warn!(error = %e, "reloading the job catalog failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the job catalog version failed"),
        }
        tokio::select! {
            () = clock.sleep(every) => {}
            _ = stopped.changed() => {}
        }
    }
}
