//! The application services of agent-batch, written against the ports only:
//!
//! * [`processor::BatchProcessor`] turns one occurrence of a job into a run, executes its items
//!   with bounded concurrency and rate, records outcomes per chunk, retries, resumes after a
//!   crash, cancels, distributes references and finishes with exact counts;
//! * [`strategy`] prepares a run's items for each processing strategy (individual, object,
//!   combined, preference) and lets an embedding service register its own;
//! * [`context::ContextManager`] keeps each run's batch context.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod context;
mod limits;
pub mod processor;
pub mod scheduler;
pub mod strategy;

use std::sync::Arc;

use batch_ports::contexts::ContextStore;
use batch_ports::runs::{RunStore, StoreError};
use batch_ports::{
    CategoryRepository, Clock, PreferenceSource, RequestExecutor, SourceError, TemplateSource,
    UserRepository,
};

/// Every port the application services use, built once by the server (or a test).
#[derive(Clone)]
pub struct Ports {
    /// Runs, items, leases, occurrences.
    pub runs: Arc<dyn RunStore>,
    /// Batch contexts and references.
    pub contexts: Arc<dyn ContextStore>,
    /// `system_users`.
    pub users: Arc<dyn UserRepository>,
    /// Categories and their items.
    pub categories: Arc<dyn CategoryRepository>,
    /// User preferences.
    pub preferences: Arc<dyn PreferenceSource>,
    /// Execution templates.
    pub templates: Arc<dyn TemplateSource>,
    /// The Request service (or its local stand-in).
    pub executor: Arc<dyn RequestExecutor>,
    /// Time.
    pub clock: Arc<dyn Clock>,
}

/// Why an application operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A data source (users, categories, preferences, templates) failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The job cannot be run as configured (no strategy for it, say).
    #[error("{0}")]
    Job(String),
}
