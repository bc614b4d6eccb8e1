//! The durable state of runs: runs with their items, leases, per-chunk outcomes and occurrences.

use async_trait::async_trait;
use batch_domain::priority::Aging;
use batch_domain::run::{ItemCounts, ItemStatus, Lease, RunId, RunStatus, Trigger};
use batch_domain::{JobId, Priority, TenantId, UserId};
use chrono::{DateTime, Utc};
use serde_json::Value;

/// A failure of the run store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now (connection refused or lost); retry later. Nothing
    /// of the failed call was written.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// No such run (for this tenant).
    #[error("not found: {0}")]
    NotFound(String),
    /// The caller no longer holds the run's lease: another process took it over after it
    /// expired. The caller must stop working on the run; nothing was written.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// What was to be created exists already (a run for an occurrence, say).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The database is used in a way it does not support (a second process on one SQLite
    /// file, say).
    #[error("{0}")]
    Unsupported(String),
    /// Anything else; the message says what.
    #[error("unexpected database error: {0}")]
    Unexpected(String),
}

/// A run to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// Its id (see [`RunId`]).
    pub id: RunId,
    /// The job it runs.
    pub job: JobId,
    /// The job's tenant.
    pub tenant: TenantId,
    /// Why it exists.
    pub trigger: Trigger,
    /// Base priority at creation.
    pub priority: Priority,
    /// The nominal instant of a scheduled run.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// The occurrence it belongs to, if any.
    pub occurrence: Option<i64>,
    /// The schedule group it fired for (a preference group); empty for a job's own schedule
    /// and for manual runs. Serial runs wait only for runs of their own job and group.
    pub group: String,
    /// The run whose context this run's context merges into.
    pub parent: Option<RunId>,
    /// A serial run is not claimed while another run of its job is running, nor before the
    /// job's older queued serial runs (overlap policies other than `allow_all`).
    pub serial: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// An item to create with its run.
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    /// Unique within the run (a user id, a category item key, a group key).
    pub key: String,
    /// The user the result belongs to, if any.
    pub user: Option<UserId>,
    /// `Pending`, or `Invalid` for items rejected by validation.
    pub status: ItemStatus,
    /// The data the request is built from.
    pub payload: Value,
}

/// A stored run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Its id.
    pub id: RunId,
    /// The job it runs.
    pub job: JobId,
    /// The job's tenant.
    pub tenant: TenantId,
    /// Where it is in its life.
    pub status: RunStatus,
    /// Why it exists.
    pub trigger: Trigger,
    /// Base priority.
    pub priority: Priority,
    /// The nominal instant of a scheduled run.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// The run this one merges into.
    pub parent: Option<RunId>,
    /// The schedule group it fired for; empty for a job's own schedule and manual runs.
    pub group: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was first claimed.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// The current lease, if any.
    pub lease: Option<Lease>,
    /// Someone asked the run to stop.
    pub cancel_requested: bool,
}

/// A stored item.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRecord {
    /// Position in the run, for stable keyset paging.
    pub seq: i64,
    /// Unique within the run.
    pub key: String,
    /// The user the result belongs to.
    pub user: Option<UserId>,
    /// Where it is in its life.
    pub status: ItemStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not to be attempted before this instant.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// The result of a succeeded item.
    pub result: Option<Value>,
    /// The data the request is built from.
    pub payload: Value,
    /// What was sent for this item (template, version, parameters, idempotency key).
    pub request_context: Option<Value>,
}

/// The outcome of one item's attempt, recorded with the rest of its chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemOutcome {
    /// The item.
    pub key: String,
    /// Its new status (`Pending` again for a retry that is scheduled).
    pub status: ItemStatus,
    /// Attempts made so far, this one included.
    pub attempts: u32,
    /// For a scheduled retry: not before this instant.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The failure, for failed attempts.
    pub error: Option<String>,
    /// The result, for a success.
    pub result: Option<Value>,
    /// What was sent (template, version, parameters, idempotency key).
    pub request_context: Option<Value>,
}

/// Which runs [`RunStore::list_runs`] returns; every field narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only this tenant's runs.
    pub tenant: Option<TenantId>,
    /// Only runs of these jobs.
    pub jobs: Option<Vec<JobId>>,
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Only runs with an item for this user.
    pub user: Option<UserId>,
    /// Only runs created at or after this instant.
    pub created_from: Option<DateTime<Utc>>,
    /// Only runs created before this instant.
    pub created_until: Option<DateTime<Utc>>,
}

/// Where a page of runs ended: the last run's creation instant and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCursor {
    /// When the last run of the page was created.
    pub created_at: DateTime<Utc>,
    /// Its id.
    pub run: RunId,
}

/// How busy one tenant is, for the global limit and fair sharing of run slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLoad {
    /// The tenant.
    pub tenant: TenantId,
    /// Runs holding a live lease.
    pub running: usize,
    /// Runs running or started recently: what fair sharing counts.
    pub load: usize,
}

/// Whether an occurrence was created by this call or existed already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    /// This call created it; the caller starts its run.
    Created(i64),
    /// Another caller (or replica) created it first.
    Existed(i64),
}

/// A run being created: its items are added page by page, in order, and the run appears with
/// all of them when [`RunDraft::commit`] succeeds. Dropping a draft abandons the run.
#[async_trait]
pub trait RunDraft: Send {
    /// Adds `items` after those added before (their positions follow on). A draft may write
    /// its pages behind the caller's back, so an error about one page (a key the run has
    /// already, say) can come from a later `append` or from `commit`; the draft is spoiled
    /// either way. Not cancel-safe: an `append` dropped before it answers may lose its page, so
    /// drop the draft with it.
    ///
    /// # Errors
    /// An error of the store for an item key the run has already (the draft is then spoiled:
    /// drop it); [`StoreError::Unavailable`] when the database cannot be reached.
    async fn append(&mut self, items: Vec<NewItem>) -> Result<(), StoreError>;

    /// Makes the run and every item appended visible, atomically.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when the occurrence got a run meanwhile;
    /// [`StoreError::Unexpected`] for a duplicate run id or item key; nothing is written.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// The store of runs, items and occurrences. Implementations write item state per chunk in
/// set-based statements, never one round trip per item.
#[async_trait]
pub trait RunStore: Send + Sync {
    /// Creates an occurrence of `job` at `nominal` for `group` (empty for static schedules)
    /// exactly once, however many callers race.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn create_occurrence(
        &self,
        job: &JobId,
        tenant: &TenantId,
        nominal: DateTime<Utc>,
        group: &str,
    ) -> Result<Occurrence, StoreError>;

    /// The run created for occurrence `occurrence`, if there is one.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn run_for_occurrence(&self, occurrence: i64) -> Result<Option<RunId>, StoreError>;

    /// The instants in `[from, until]` at which `job` has an occurrence for `group` but no run,
    /// oldest first: what a crash between creating an occurrence and creating its run left
    /// behind. The scheduler gives each its run even when the misfire policy would no longer
    /// fire that instant, since the occurrence records that it was fired.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn occurrences_without_run(
        &self,
        job: &JobId,
        group: &str,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>, StoreError>;

    /// Starts creating `run` (status `queued`): its items are added page by page through the
    /// returned draft, and the run exists for everyone else only once the draft is committed,
    /// all of it at once. A draft dropped without commit leaves nothing behind. Where the
    /// backend allows, the draft writes each page as it comes, in one transaction, so a run of
    /// any size is created in bounded memory; the embedded single-connection backend keeps the
    /// pages until commit.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when the occurrence has a run already (here or at
    /// commit); [`StoreError::Unavailable`] when the database cannot be reached.
    async fn begin_run(&self, run: NewRun) -> Result<Box<dyn RunDraft + '_>, StoreError>;

    /// Creates a run in status `queued` with its items at once: [`RunStore::begin_run`], one
    /// page, commit.
    ///
    /// # Errors
    /// As [`RunStore::begin_run`] and [`RunDraft::append`].
    async fn create_run(&self, run: NewRun, items: Vec<NewItem>) -> Result<(), StoreError> {
        let mut draft = self.begin_run(run).await?;
        draft.append(items).await?;
        draft.commit().await
    }

    /// Claims up to `limit` runs that are not ended and have no live lease at `now` (queued
    /// runs, and running runs whose owner stopped renewing), oldest first, for `owner` until
    /// `lease_until`. Two concurrent callers never claim the same run.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached;
    /// [`StoreError::Unsupported`] when another process owns an embedded database.
    async fn claim_runs(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError>;

    /// Claims the run `run` for `owner` until `lease_until` if it has not ended, has no live
    /// lease at `now`, may start (the serial rule of [`NewRun::serial`]) and, with
    /// `max_running`, fewer than that many other runs hold a live lease (the global limit on
    /// concurrent runs, exact across replicas); `None` otherwise.
    ///
    /// # Errors
    /// As [`RunStore::claim_runs`].
    async fn claim_run(
        &self,
        run: &RunId,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        max_running: Option<usize>,
    ) -> Result<Option<RunRecord>, StoreError>;

    /// The runs of `jobs` that could be claimed at `now` (as [`RunStore::claim_runs`] would take
    /// them), at most `per_tenant` of each tenant: the best of each tenant by effective priority
    /// (base priority aged by `aging` since creation), then age. Runs of other jobs (removed
    /// from the configuration) never take a place. Claims nothing; the caller orders them
    /// fairly and claims with [`RunStore::claim_run`].
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn claimable_runs(
        &self,
        now: DateTime<Utc>,
        aging: Aging,
        per_tenant: usize,
        jobs: &[JobId],
    ) -> Result<Vec<RunRecord>, StoreError>;

    /// Per tenant with any: how many runs hold a live lease at `now`, and the tenant's load
    /// for fair sharing — runs that are running or started at or after `since`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn tenant_loads(
        &self,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> Result<Vec<TenantLoad>, StoreError>;

    /// Extends `owner`'s lease on `run` to `until`; returns whether a cancel was requested
    /// meanwhile (see [`RunStore::request_cancel`]). The run's lease covers its items: whoever
    /// holds it is the only one executing and recording them.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `owner` no longer holds the lease.
    async fn renew_lease(
        &self,
        run: &RunId,
        owner: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Asks `run` to stop; its owner sees the request at its next lease renewal. Any replica
    /// may ask.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn request_cancel(&self, run: &RunId) -> Result<(), StoreError>;

    /// The unfinished (queued or running) runs of `job`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn active_runs(&self, job: &JobId) -> Result<Vec<RunRecord>, StoreError>;

    /// Tells every process sharing the store that `run` is queued and ready to claim (its
    /// items and first context written), so their idle workers take it at once instead of at
    /// their next look. A hint, not a guarantee: the default announces nothing, and workers
    /// still look on their own schedule.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn announce_queued(&self, run: &RunId) -> Result<(), StoreError> {
        let _ = run;
        Ok(())
    }

    /// Gives the lease on `run` up at once, so another process can resume it (graceful
    /// shutdown). Releasing a lease one does not hold is a no-op. A store that announces
    /// queued runs ([`RunStore::announce_queued`]) announces a released one too.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn release_lease(&self, run: &RunId, owner: &str) -> Result<(), StoreError>;

    /// Up to `limit` pending items of `run` whose next attempt is due at `now`, in item order,
    /// after position `after_seq` (0 for the start), leaving out the positions in `skip` (the
    /// items the caller is executing already). Writes nothing: the holder of the run's lease
    /// is the only one executing its items, so reading them is claiming them. A caller working
    /// through a large run passes where its last read ended, so each read steps only over the
    /// items it takes instead of over every item done before them; it starts from 0 now and
    /// then to pick up retries that fell due behind it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn due_items(
        &self,
        run: &RunId,
        now: DateTime<Utc>,
        after_seq: i64,
        skip: &[i64],
        limit: usize,
    ) -> Result<Vec<ItemRecord>, StoreError>;

    /// Records the outcomes of one chunk, in one transaction with a bounded number of
    /// statements (one per thousand outcomes), provided `owner` still holds the run's lease.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `owner` no longer holds the run's lease (another process
    /// took the run over after the lease expired, or it was released);
    /// [`StoreError::Unexpected`] when an outcome names no item of the run. Nothing is written
    /// either way.
    async fn record_outcomes(
        &self,
        run: &RunId,
        owner: &str,
        outcomes: &[ItemOutcome],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The earliest instant at which a pending item of `run` is due (`None` when no item is
    /// pending).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn next_due(&self, run: &RunId) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Marks every pending item of `run` cancelled, set-based, and returns how many.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn cancel_pending(&self, run: &RunId, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Ends `run` with `status` and clears its lease, provided `owner` holds it.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`] when `owner` no longer holds the lease.
    async fn finish_run(
        &self,
        run: &RunId,
        owner: &str,
        status: RunStatus,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The run `run` of `tenant`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when it does not exist or belongs to another tenant.
    async fn run(&self, tenant: &TenantId, run: &RunId) -> Result<RunRecord, StoreError>;

    /// Exact counts of the items of `run` by status.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn counts(&self, run: &RunId) -> Result<ItemCounts, StoreError>;

    /// One page of the items of `run` of `tenant`, optionally of one status, after position
    /// `after_seq`, in item order.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when the run does not exist for `tenant`.
    async fn list_items(
        &self,
        tenant: &TenantId,
        run: &RunId,
        status: Option<ItemStatus>,
        after_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<ItemRecord>, StoreError>;

    /// One page of the runs `filter` selects, newest first, after `cursor`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn list_runs(
        &self,
        filter: &RunFilter,
        cursor: Option<&RunCursor>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError>;

    /// How many runs are queued (waiting to be claimed), across tenants: the queue depth.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn queued_runs(&self) -> Result<u64, StoreError>;
}
