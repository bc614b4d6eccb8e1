//! The ContextManager: creates and updates each run's batch context, keeps it with its tenant,
//! and merges child contexts into their parent.

use std::sync::Arc;

use batch_domain::config::Job;
use batch_domain::context::{BatchContext, Items, Metadata, Progress};
use batch_domain::run::ItemCounts;
use batch_ports::Clock;
use batch_ports::contexts::ContextStore;
use batch_ports::runs::RunRecord;

use crate::Error;
use crate::strategy::Prepared;

/// Keeps batch contexts. Every context is stored with the run's tenant, and read back only for
/// it.
#[derive(Clone)]
pub struct ContextManager {
    contexts: Arc<dyn ContextStore>,
    clock: Arc<dyn Clock>,
}

impl ContextManager {
    /// A manager over `contexts`.
    pub fn new(contexts: Arc<dyn ContextStore>, clock: Arc<dyn Clock>) -> Self {
        ContextManager { contexts, clock }
    }

    /// The first context of a prepared run but for its metadata: the samples of its valid and
    /// invalid `items` and how many are `pending`, what preparation found, and progress at
    /// zero.
    pub fn draft(prepared: Prepared, items: Items, pending: u64) -> BatchContext {
        BatchContext {
            validation: prepared.validation,
            user_references: prepared.user_references,
            notes: prepared.notes,
            items,
            progress: Progress::new(0, 0, 0, pending),
            ..BatchContext::default()
        }
    }

    /// Saves the first context of `run`: `draft` ([`ContextManager::draft`]) with the run's
    /// metadata.
    ///
    /// # Errors
    /// [`Error::Store`] when it cannot be saved.
    pub async fn create(
        &self,
        job: &Job,
        run: &RunRecord,
        mut draft: BatchContext,
    ) -> Result<BatchContext, Error> {
        draft.metadata = metadata(job, run);
        self.contexts
            .save_context(&run.tenant, &run.id, &draft, self.clock.now())
            .await?;
        Ok(draft)
    }

    /// Updates progress and status from exact counts, and adds `notes`.
    ///
    /// # Errors
    /// [`Error::Store`] when the context cannot be read or saved.
    pub async fn update(
        &self,
        run: &RunRecord,
        counts: &ItemCounts,
        notes: &[String],
    ) -> Result<BatchContext, Error> {
        let mut context = self.contexts.context(&run.tenant, &run.id).await?;
        context.metadata.status = run.status.to_string();
        context.metadata.finished_at = run.finished_at;
        context.progress = progress(counts);
        for note in notes {
            if !context.notes.contains(note) {
                context.notes.push(note.clone());
            }
        }
        self.contexts
            .save_context(&run.tenant, &run.id, &context, self.clock.now())
            .await?;
        Ok(context)
    }

    /// The current context of `run` of `tenant`.
    ///
    /// # Errors
    /// [`Error::Store`] with `NotFound` when there is none for `tenant`.
    pub async fn current(
        &self,
        tenant: &batch_domain::TenantId,
        run: &batch_domain::run::RunId,
    ) -> Result<BatchContext, Error> {
        Ok(self.contexts.context(tenant, run).await?)
    }

    /// Merges the context of `child` into its parent's.
    ///
    /// # Errors
    /// [`Error::Store`] when either context is missing for the child's tenant.
    pub async fn merge_into_parent(
        &self,
        child: &RunRecord,
    ) -> Result<Option<BatchContext>, Error> {
        let Some(parent) = &child.parent else {
            return Ok(None);
        };
        Ok(Some(
            self.contexts
                .merge_into_parent(&child.tenant, parent, &child.id, self.clock.now())
                .await?,
        ))
    }
}

/// Progress from exact counts: cancelled items count as processed, invalid ones not at all.
pub fn progress(counts: &ItemCounts) -> Progress {
    let total = counts.total() - counts.invalid;
    let processed = counts.succeeded + counts.failed + counts.cancelled;
    Progress::new(counts.succeeded, counts.failed, processed, total)
}

fn metadata(job: &Job, run: &RunRecord) -> Metadata {
    Metadata {
        run_id: run.id.to_string(),
        job_id: job.id.to_string(),
        tenant: run.tenant.to_string(),
        batch_type: job.batch_type.to_string(),
        strategy: job.strategy().name().to_owned(),
        trigger: run.trigger.to_string(),
        status: run.status.to_string(),
        scheduled_for: run.scheduled_for,
        created_at: Some(run.created_at),
        finished_at: run.finished_at,
        parent_run_id: run.parent.as_ref().map(ToString::to_string),
    }
}
