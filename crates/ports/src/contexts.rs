//! Batch contexts and batch references.

use async_trait::async_trait;
use batch_domain::context::{BatchContext, Progress};
use batch_domain::run::RunId;
use batch_domain::{JobId, TenantId, UserId};
use chrono::{DateTime, Utc};

use crate::runs::StoreError;

/// A reference to a run's results, handed to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchReference {
    /// The run whose results the user may read.
    pub run: RunId,
    /// The job of the run.
    pub job: JobId,
    /// The user.
    pub user: UserId,
    /// When the reference was handed out.
    pub created_at: DateTime<Utc>,
}

/// Where a page of references ends; pass it back to get the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceCursor {
    /// The creation instant of the last reference of the page.
    pub created_at: DateTime<Utc>,
    /// Its run.
    pub run: RunId,
}

/// The store of batch contexts and references. Every call is scoped to a tenant: another
/// tenant's run answers exactly like a missing one.
#[async_trait]
pub trait ContextStore: Send + Sync {
    /// Saves (creates or replaces) the context of `run`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn save_context(
        &self,
        tenant: &TenantId,
        run: &RunId,
        context: &BatchContext,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Records the progress of `run` without rewriting the rest of its context, whose item
    /// lists grow with the run: [`ContextStore::context`] answers it from then on, until the
    /// next [`ContextStore::save_context`] replaces the whole context.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when `run` has no context for `tenant`;
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn save_progress(
        &self,
        tenant: &TenantId,
        run: &RunId,
        progress: &Progress,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The context of `run`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is none for `tenant`.
    async fn context(&self, tenant: &TenantId, run: &RunId) -> Result<BatchContext, StoreError>;

    /// Merges the context of `child` into the context of `parent` in one transaction (see
    /// [`BatchContext::merge_child`]); merging twice changes nothing.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when either context is missing for `tenant`.
    async fn merge_into_parent(
        &self,
        tenant: &TenantId,
        parent: &RunId,
        child: &RunId,
        now: DateTime<Utc>,
    ) -> Result<BatchContext, StoreError>;

    /// Hands references to `run` to `users`, set-based; users who have one already keep it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn add_references(
        &self,
        tenant: &TenantId,
        job: &JobId,
        run: &RunId,
        users: &[UserId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError>;

    /// The references of `user`, newest first, after `cursor`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn references(
        &self,
        tenant: &TenantId,
        user: &UserId,
        cursor: Option<&ReferenceCursor>,
        limit: usize,
    ) -> Result<Vec<BatchReference>, StoreError>;
}
