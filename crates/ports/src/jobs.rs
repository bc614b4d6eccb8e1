//! The job table: job definitions shared by every replica.

use async_trait::async_trait;
use batch_domain::{JobId, TenantId};
use serde_json::Value;

use crate::runs::StoreError;

/// Where a job definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobOrigin {
    /// The jobs file: replaced at every start, read-only through the API.
    File,
    /// Created through the API.
    Api,
}

impl JobOrigin {
    /// Its stored name.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobOrigin::File => "file",
            JobOrigin::Api => "api",
        }
    }
}

/// One stored job definition.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDefinition {
    /// The job.
    pub id: JobId,
    /// Its tenant.
    pub tenant: TenantId,
    /// The job's JSON, as in a jobs file (defaults not applied).
    pub definition: Value,
    /// Where it comes from.
    pub origin: JobOrigin,
}

/// The store of job definitions. Every change bumps one catalog version.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// The catalog version: it changes whenever a definition is created, replaced or deleted.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn catalog_version(&self) -> Result<u64, StoreError>;

    /// Every definition, by id, and the catalog version they belong to.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn job_definitions(&self) -> Result<(Vec<JobDefinition>, u64), StoreError>;

    /// Replaces the file's jobs with `definitions` in one transaction: file jobs not among them
    /// are removed; a job created through the API with the id of a file job is replaced by it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn sync_file_jobs(&self, definitions: &[JobDefinition]) -> Result<(), StoreError>;

    /// Creates a job (origin API).
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when a job with its id exists (for any tenant).
    async fn create_job(&self, definition: &JobDefinition) -> Result<(), StoreError>;

    /// Replaces the definition of an API job of `definition.tenant`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when the tenant has no API job with that id.
    async fn update_job(&self, definition: &JobDefinition) -> Result<(), StoreError>;

    /// Deletes the API job `id` of `tenant`; returns whether it existed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn delete_job(&self, tenant: &TenantId, id: &JobId) -> Result<bool, StoreError>;
}
