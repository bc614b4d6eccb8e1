//! The ports of agent-batch: the async traits the application needs from the outside world
//! (users, categories, preferences, templates, request execution, the clock), each with a typed
//! error that says whether trying again can help.
//!
//! Adapters (`batch-store`, `batch-clients`) implement these traits; `batch-app` depends only on
//! them.
#![forbid(unsafe_code)]

pub mod contexts;
pub mod jobs;
pub mod runs;
pub mod schedules;

use async_trait::async_trait;
use batch_domain::config::{CategorySelection, Filter};
use batch_domain::preference::Preference;
use batch_domain::retry::FailureKind;
use batch_domain::{FeatureType, TemplateId, TenantId, UserId};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// The source of the current time, and of waiting. Logic asks the clock instead of the
/// system, so tests can drive time step by step (a manual clock's `sleep` just moves it on).
#[async_trait]
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;

    /// Waits for `duration` of this clock's time.
    async fn sleep(&self, duration: std::time::Duration);
}

/// The real clock: the system's UTC time and tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    async fn sleep(&self, duration: std::time::Duration) {
        tokio::time::sleep(duration).await;
    }
}

/// A failure of a repository or remote source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The backing store or service cannot be reached now; trying again later may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The thing asked for does not exist (for this tenant).
    #[error("not found: {0}")]
    NotFound(String),
    /// Anything else; the message says what.
    #[error("unexpected: {0}")]
    Unexpected(String),
}

impl SourceError {
    /// Whether trying again may succeed.
    pub fn kind(&self) -> FailureKind {
        match self {
            SourceError::Unavailable(_) => FailureKind::Retryable,
            SourceError::NotFound(_) | SourceError::Unexpected(_) => FailureKind::Permanent,
        }
    }
}

/// A store failure seen through a data-source port: connection trouble stays retryable.
impl From<runs::StoreError> for SourceError {
    fn from(e: runs::StoreError) -> Self {
        match e {
            runs::StoreError::Unavailable(m) => SourceError::Unavailable(m),
            runs::StoreError::NotFound(m) => SourceError::NotFound(m),
            other => SourceError::Unexpected(other.to_string()),
        }
    }
}

/// Valid and invalid user ids, as found by [`UserRepository::validate_users`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserValidation {
    /// Ids that exist and are active for the tenant, in input order.
    pub valid: Vec<UserId>,
    /// Ids that do not, in input order.
    pub invalid: Vec<UserId>,
}

/// Users of `system_users`.
#[async_trait]
pub trait UserRepository: Send + Sync {
    /// Splits `ids` into valid and invalid users of `tenant`. Implementations query in chunks,
    /// never one round trip per id.
    ///
    /// # Errors
    /// [`SourceError::Unavailable`] when the store cannot be reached; nothing is partially
    /// returned.
    async fn validate_users(
        &self,
        tenant: &TenantId,
        ids: &[UserId],
    ) -> Result<UserValidation, SourceError>;

    /// Active users of `tenant` matching every filter (field `key` is the user id, other fields
    /// are attributes), after `after` in id order, at most `limit`.
    ///
    /// # Errors
    /// [`SourceError::Unavailable`] when the store cannot be reached.
    async fn find_users(
        &self,
        tenant: &TenantId,
        filters: &[Filter],
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<UserId>, SourceError>;
}

/// One item of a category.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryItem {
    /// The category it belongs to.
    pub category: String,
    /// Its key, unique within the category; items are returned in key order.
    pub key: String,
    /// Its attributes.
    pub attributes: Value,
    /// Users it refers to (for example the watchers of a product), as stored: validate them
    /// with [`UserRepository::validate_users`]; text that is not a user id counts as invalid.
    pub user_refs: Vec<String>,
}

/// A page of category items.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ItemPage {
    /// The items, in key order.
    pub items: Vec<CategoryItem>,
    /// Set when the source was unavailable and this page is the last good copy, fetched at
    /// this instant.
    pub stale_since: Option<DateTime<Utc>>,
}

/// Categories and their items.
#[async_trait]
pub trait CategoryRepository: Send + Sync {
    /// Items of `selection` for `tenant` whose key is after `after`, at most `page_size`, in a
    /// stable key order. The selection's filters and its `limit` hold across pages: a page never
    /// goes past the limit counted from the first item.
    ///
    /// # Errors
    /// [`SourceError::NotFound`] for a category the tenant does not have;
    /// [`SourceError::Unavailable`] when the store cannot be reached.
    async fn items(
        &self,
        tenant: &TenantId,
        selection: &CategorySelection,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<ItemPage, SourceError>;
}

/// A page of preferences and where the next one starts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PreferencePage {
    /// The preferences of this page.
    pub preferences: Vec<Preference>,
    /// Token of the next page; `None` on the last page.
    pub next_page: Option<String>,
    /// Set when the source was unavailable and this page is the last good copy, fetched at
    /// this instant.
    pub stale_since: Option<DateTime<Utc>>,
}

/// User preferences (the Config service, or the database in the embedded default).
#[async_trait]
pub trait PreferenceSource: Send + Sync {
    /// One page of the preferences of `tenant` for `feature`.
    ///
    /// # Errors
    /// [`SourceError::Unavailable`] when the source cannot be reached; callers fall back to
    /// the job's default preferences and say so.
    async fn list(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<PreferencePage, SourceError>;

    /// Preferences changed after `watermark`, and the new watermark.
    ///
    /// # Errors
    /// [`SourceError::Unavailable`] when the source cannot be reached.
    async fn changes_since(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        watermark: u64,
    ) -> Result<(Vec<Preference>, u64), SourceError>;
}

/// An execution template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// Its id.
    pub id: TemplateId,
    /// Its version.
    pub version: u32,
    /// The body rendered with each item's data.
    pub body: String,
    /// Parameters used where a request gives none.
    pub parameter_defaults: Map<String, Value>,
}

/// Execution templates (the Template service, or files in the embedded default).
#[async_trait]
pub trait TemplateSource: Send + Sync {
    /// The template `id` of `tenant`, at `version` or the latest.
    ///
    /// # Errors
    /// [`SourceError::NotFound`] for an unknown template; [`SourceError::Unavailable`] when the
    /// source cannot be reached.
    async fn template(
        &self,
        tenant: &TenantId,
        id: &TemplateId,
        version: Option<u32>,
    ) -> Result<Template, SourceError>;
}

/// One request to the Request service.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Stable across retries and restarts (run id + item key): the service executes a key once.
    pub idempotency_key: String,
    /// The tenant the request is for.
    pub tenant: TenantId,
    /// The user the result belongs to, if any.
    pub user: Option<UserId>,
    /// The template to execute.
    pub template: TemplateId,
    /// Its version, if pinned.
    pub template_version: Option<u32>,
    /// The item data.
    pub payload: Value,
    /// Template parameters.
    pub parameters: Map<String, Value>,
    /// How long the caller waits for the answer (the job's item timeout); adapters pass it on
    /// as the call's deadline, so the callee stops working when nobody waits any more.
    pub timeout: Option<std::time::Duration>,
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExecuteError {
    /// Whether trying again may succeed.
    pub kind: FailureKind,
    /// What went wrong.
    pub message: String,
}

/// Executes requests (the Request service, or a local rendering executor).
#[async_trait]
pub trait RequestExecutor: Send + Sync {
    /// Executes one request and returns its result.
    ///
    /// # Errors
    /// [`ExecuteError`] whose `kind` says whether the request may be retried.
    async fn execute(&self, request: Request) -> Result<Value, ExecuteError>;
}

/// A shared repository is a repository: decorators and services can hold `Arc`s.
#[async_trait]
impl<T: CategoryRepository + ?Sized> CategoryRepository for std::sync::Arc<T> {
    async fn items(
        &self,
        tenant: &TenantId,
        selection: &CategorySelection,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<ItemPage, SourceError> {
        (**self).items(tenant, selection, after, page_size).await
    }
}

/// A shared preference source is a preference source.
#[async_trait]
impl<T: PreferenceSource + ?Sized> PreferenceSource for std::sync::Arc<T> {
    async fn list(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<PreferencePage, SourceError> {
        (**self).list(tenant, feature, page_token, page_size).await
    }

    async fn changes_since(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        watermark: u64,
    ) -> Result<(Vec<Preference>, u64), SourceError> {
        (**self).changes_since(tenant, feature, watermark).await
    }
}
