//! Stateful in-memory fakes of the ports, for tests of everything that uses them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use batch_domain::config::CategorySelection;
use batch_domain::preference::Preference;
use batch_domain::{FeatureType, TenantId};
use batch_ports::{
    CategoryItem, CategoryRepository, ItemPage, PreferencePage, PreferenceSource, SourceError,
};

/// Categories held in memory. Filters are not interpreted (the store's contract suite covers
/// them); the limit and key paging are.
#[derive(Debug, Default)]
pub struct FakeCategories {
    items: Mutex<BTreeMap<(String, String), Vec<CategoryItem>>>,
    unavailable: AtomicBool,
    calls: AtomicUsize,
}

impl FakeCategories {
    /// Puts `items` (sorted by key) into category `name` of `tenant`.
    pub fn insert(&self, tenant: &str, name: &str, mut items: Vec<CategoryItem>) {
        items.sort_by(|a, b| a.key.cmp(&b.key));
        self.items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((tenant.to_owned(), name.to_owned()), items);
    }

    /// Makes every call fail as unavailable (or work again).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Calls received so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl CategoryRepository for FakeCategories {
    async fn items(
        &self,
        tenant: &TenantId,
        selection: &CategorySelection,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<ItemPage, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable(
                "fake categories are down".to_owned(),
            ));
        }
        let items = self
            .items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let all = items
            .get(&(tenant.to_string(), selection.name.clone()))
            .ok_or_else(|| SourceError::NotFound(format!("category {}", selection.name)))?;
        let limit = selection
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let skipped = after.map_or(0, |a| {
            all.iter().take_while(|i| i.key.as_str() <= a).count()
        });
        let take = page_size.min(limit.saturating_sub(skipped));
        Ok(ItemPage {
            items: all.iter().skip(skipped).take(take).cloned().collect(),
            stale_since: None,
        })
    }
}

/// The latest preference per (tenant, feature type, user), for paged listing.
type LatestPreferences = BTreeMap<(String, String, String), Preference>;

/// Preferences held in memory, with a change log for watermarks.
#[derive(Debug, Default)]
pub struct FakePreferences {
    log: Mutex<Vec<Preference>>,
    latest: Mutex<LatestPreferences>,
    unavailable: AtomicBool,
    calls: AtomicUsize,
}

impl FakePreferences {
    /// Records `preference` as the latest change of its user.
    pub fn upsert(&self, preference: Preference) {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                (
                    preference.tenant.to_string(),
                    preference.feature_type.to_string(),
                    preference.user.to_string(),
                ),
                preference.clone(),
            );
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(preference);
    }

    /// Makes every call fail as unavailable (or work again).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Calls received so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.unavailable.load(Ordering::SeqCst) {
            Err(SourceError::Unavailable(
                "fake preferences are down".to_owned(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl PreferenceSource for FakePreferences {
    async fn list(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<PreferencePage, SourceError> {
        self.check()?;
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tenant, feature) = (tenant.to_string(), feature.to_string());
        let from = (
            tenant.clone(),
            feature.clone(),
            page_token.unwrap_or_default().to_owned(),
        );
        let preferences: Vec<Preference> = latest
            .range(from..)
            .take_while(|((t, f, _), _)| t == &tenant && f == &feature)
            .filter(|((_, _, user), _)| page_token.is_none_or(|t| user.as_str() > t))
            .take(page_size)
            .map(|(_, p)| p.clone())
            .collect();
        let next_page = (preferences.len() == page_size)
            .then(|| preferences.last().map(|p| p.user.to_string()))
            .flatten();
        Ok(PreferencePage {
            preferences,
            next_page,
            stale_since: None,
        })
    }

    async fn changes_since(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        watermark: u64,
    ) -> Result<(Vec<Preference>, u64), SourceError> {
        self.check()?;
        let log = self
            .log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = usize::try_from(watermark)
            .unwrap_or(usize::MAX)
            .min(log.len());
        let changes = log[start..]
            .iter()
            .filter(|p| &p.tenant == tenant && &p.feature_type == feature)
            .cloned()
            .collect();
        Ok((changes, u64::try_from(log.len()).unwrap_or(u64::MAX)))
    }
}

use std::collections::{HashMap, HashSet};

use batch_domain::context::BatchContext;
use batch_domain::retry::FailureKind;
use batch_domain::run::{ItemCounts, ItemStatus, Lease, RunId, RunStatus};
use batch_domain::{JobId, TemplateId, UserId};
use batch_ports::contexts::{BatchReference, ContextStore, ReferenceCursor};
use batch_ports::runs::{
    ItemOutcome, ItemRecord, NewItem, NewRun, Occurrence, RunDraft, RunRecord, RunStore, StoreError,
};
use batch_ports::{
    ExecuteError, Request, RequestExecutor, Template, TemplateSource, UserRepository,
    UserValidation,
};
use chrono::{DateTime, Utc};
use serde_json::Value;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Runs {
    runs: BTreeMap<RunId, RunRecord>,
    serial: HashSet<RunId>,
    items: HashMap<RunId, Vec<ItemRecord>>,
    occurrences: HashMap<(String, i64, String), i64>,
    run_occurrences: HashMap<i64, RunId>,
    contexts: HashMap<RunId, (String, BatchContext)>,
    schedules: BTreeMap<(String, String), batch_ports::schedules::ScheduleState>,
    pauses: BTreeMap<String, batch_ports::schedules::Pause>,
    references: Vec<(String, BatchReference)>,
}

/// Runs, items, occurrences, contexts and references in memory, with the same lease rules as
/// the real store. `record_outcomes` calls are counted per run for chunking assertions.
#[derive(Debug, Default)]
pub struct MemoryRuns {
    state: Mutex<Runs>,
    outcome_writes: AtomicUsize,
    schedule_calls: AtomicUsize,
    failing_writes: AtomicUsize,
    failing_claims: AtomicUsize,
    failing_references: AtomicUsize,
    item_pages: AtomicUsize,
    writes_held: AtomicBool,
    writes_released: tokio::sync::Notify,
}

fn take_failure(counter: &AtomicUsize, what: &str) -> Result<(), StoreError> {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .map_or(Ok(()), |_| {
            Err(StoreError::Unavailable(format!(
                "{what}: the fake database is away"
            )))
        })
}

impl MemoryRuns {
    /// The next `n` outcome writes answer [`StoreError::Unavailable`] and write nothing, as a
    /// database restarting would.
    pub fn fail_next_writes(&self, n: usize) {
        self.failing_writes.store(n, Ordering::SeqCst);
    }

    /// Holds every outcome write (`true`) until released (`false`), as a slow database would;
    /// everything else goes on meanwhile.
    pub fn hold_writes(&self, held: bool) {
        self.writes_held.store(held, Ordering::SeqCst);
        if !held {
            self.writes_released.notify_waiters();
        }
    }

    async fn while_writes_held(&self) {
        loop {
            // Created before the flag is read, so a release in between is not missed.
            let released = self.writes_released.notified();
            if !self.writes_held.load(Ordering::SeqCst) {
                return;
            }
            released.await;
        }
    }

    /// The next `n` reads of due items answer [`StoreError::Unavailable`].
    pub fn fail_next_claims(&self, n: usize) {
        self.failing_claims.store(n, Ordering::SeqCst);
    }

    /// The next `n` calls to `add_references` fail (not as unavailable: at once) and add
    /// nothing.
    pub fn fail_next_references(&self, n: usize) {
        self.failing_references.store(n, Ordering::SeqCst);
    }

    /// How many pages of items `list_items` has answered.
    pub fn item_pages(&self) -> usize {
        self.item_pages.load(Ordering::SeqCst)
    }

    /// How many times outcomes were written (one per chunk when the processor behaves).
    pub fn outcome_writes(&self) -> usize {
        self.outcome_writes.load(Ordering::SeqCst)
    }

    /// Calls made so far to what a scheduler tick uses: schedule states, pauses, occurrences
    /// and active runs.
    pub fn schedule_calls(&self) -> usize {
        self.schedule_calls.load(Ordering::SeqCst)
    }

    fn count_schedule_call(&self) {
        self.schedule_calls.fetch_add(1, Ordering::SeqCst);
    }

    /// Every item of `run`, in order.
    pub fn items_of(&self, run: &RunId) -> Vec<ItemRecord> {
        lock(&self.state)
            .items
            .get(run)
            .cloned()
            .unwrap_or_default()
    }

    /// Simulates a crash of a lease holder: drops every run lease (as if they had expired)
    /// without recording anything.
    pub fn expire_leases(&self) {
        for run in lock(&self.state).runs.values_mut() {
            run.lease = None;
        }
    }
}

/// Whether `run` may be claimed at `now`: unfinished, no live lease, and for a serial run no
/// other run of its job running and no older serial run of its job queued.
fn claimable(state: &Runs, run: &RunRecord, now: DateTime<Utc>) -> bool {
    if run.status.is_terminal() || run.lease.as_ref().is_some_and(|l| l.is_live(now)) {
        return false;
    }
    if !state.serial.contains(&run.id) || run.status == RunStatus::Running {
        return true;
    }
    !state.runs.values().any(|other| {
        other.job == run.job
            && other.group == run.group
            && other.id != run.id
            && (other.status == RunStatus::Running
                || (other.status == RunStatus::Queued
                    && state.serial.contains(&other.id)
                    && (other.created_at, &other.id) < (run.created_at, &run.id)))
    })
}

/// Claims `run` for `owner`.
fn take(
    state: &mut Runs,
    run: &RunId,
    owner: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> RunRecord {
    let Some(r) = state.runs.get_mut(run) else {
        unreachable!("take is called with a run that exists")
    };
    r.status = RunStatus::Running;
    r.started_at = r.started_at.or(Some(now));
    r.lease = Some(Lease {
        owner: owner.to_owned(),
        expires_at: lease_until,
    });
    r.clone()
}

fn lost(owner: &str, run: &RunId) -> StoreError {
    StoreError::LeaseLost(format!("{owner} does not hold the lease on run {run}"))
}

/// A run being created in [`MemoryRuns`]: the items wait here until commit.
struct MemoryDraft<'r> {
    runs: &'r MemoryRuns,
    run: NewRun,
    items: Vec<NewItem>,
}

#[async_trait]
impl RunDraft for MemoryDraft<'_> {
    async fn append(&mut self, items: Vec<NewItem>) -> Result<(), StoreError> {
        self.items.extend(items);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let MemoryDraft { runs, run, items } = *self;
        let mut state = lock(&runs.state);
        // Checked before anything is written, like the real store's transaction, and in its
        // order: the run's row (and its occurrence) before its items.
        if let Some(occurrence) = run.occurrence
            && state.run_occurrences.contains_key(&occurrence)
        {
            return Err(StoreError::AlreadyExists(format!(
                "a run for occurrence {occurrence}"
            )));
        }
        let mut keys = HashSet::new();
        if let Some(twice) = items.iter().find(|item| !keys.insert(item.key.as_str())) {
            return Err(StoreError::Unexpected(format!(
                "a key appears twice among the items of run {}: {}",
                run.id, twice.key
            )));
        }
        if state.runs.contains_key(&run.id) {
            return Err(StoreError::Unexpected(format!("duplicate run {}", run.id)));
        }
        if let Some(occurrence) = run.occurrence {
            state.run_occurrences.insert(occurrence, run.id.clone());
        }
        let mut records = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            records.push(ItemRecord {
                seq: i64::try_from(i).unwrap_or(0) + 1,
                key: item.key,
                user: item.user,
                status: item.status,
                attempts: 0,
                next_attempt_at: None,
                last_error: None,
                result: None,
                payload: item.payload,
                request_context: None,
            });
        }
        state.items.insert(run.id.clone(), records);
        if run.serial {
            state.serial.insert(run.id.clone());
        }
        state.runs.insert(
            run.id.clone(),
            RunRecord {
                id: run.id,
                job: run.job,
                tenant: run.tenant,
                status: RunStatus::Queued,
                trigger: run.trigger,
                priority: run.priority,
                scheduled_for: run.scheduled_for,
                parent: run.parent,
                group: run.group,
                created_at: run.created_at,
                started_at: None,
                finished_at: None,
                lease: None,
                cancel_requested: false,
            },
        );
        Ok(())
    }
}

#[async_trait]
impl RunStore for MemoryRuns {
    async fn create_occurrence(
        &self,
        job: &JobId,
        _tenant: &TenantId,
        nominal: DateTime<Utc>,
        group: &str,
    ) -> Result<Occurrence, StoreError> {
        self.count_schedule_call();
        let mut state = lock(&self.state);
        let key = (
            job.to_string(),
            nominal.timestamp_millis(),
            group.to_owned(),
        );
        let next = i64::try_from(state.occurrences.len()).unwrap_or(0) + 1;
        match state.occurrences.get(&key) {
            Some(id) => Ok(Occurrence::Existed(*id)),
            None => {
                state.occurrences.insert(key, next);
                Ok(Occurrence::Created(next))
            }
        }
    }

    async fn run_for_occurrence(&self, occurrence: i64) -> Result<Option<RunId>, StoreError> {
        self.count_schedule_call();
        Ok(lock(&self.state).run_occurrences.get(&occurrence).cloned())
    }

    async fn occurrences_without_run(
        &self,
        job: &JobId,
        group: &str,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>, StoreError> {
        self.count_schedule_call();
        let state = lock(&self.state);
        let mut instants: Vec<_> = state
            .occurrences
            .iter()
            .filter(|((j, ms, g), id)| {
                j == job.as_str()
                    && g == group
                    && (from.timestamp_millis()..=until.timestamp_millis()).contains(ms)
                    && !state.run_occurrences.contains_key(id)
            })
            .filter_map(|((_, ms, _), _)| DateTime::from_timestamp_millis(*ms))
            .collect();
        instants.sort_unstable();
        Ok(instants)
    }

    async fn begin_run(&self, run: NewRun) -> Result<Box<dyn RunDraft + '_>, StoreError> {
        if let Some(occurrence) = run.occurrence
            && lock(&self.state).run_occurrences.contains_key(&occurrence)
        {
            return Err(StoreError::AlreadyExists(format!(
                "a run for occurrence {occurrence}"
            )));
        }
        Ok(Box::new(MemoryDraft {
            runs: self,
            run,
            items: Vec::new(),
        }))
    }

    async fn claim_runs(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let mut state = lock(&self.state);
        let mut free: Vec<RunId> = state
            .runs
            .values()
            .filter(|r| claimable(&state, r, now))
            .map(|r| r.id.clone())
            .collect();
        free.sort_by(|a, b| {
            let (a, b) = (&state.runs[a], &state.runs[b]);
            b.priority
                .cmp(&a.priority)
                .then(a.created_at.cmp(&b.created_at))
        });
        let mut claimed = Vec::new();
        for id in free.into_iter().take(limit) {
            // A serial run claimed in this batch blocks the next of its job.
            if !claimable(&state, &state.runs[&id], now) {
                continue;
            }
            claimed.push(take(&mut state, &id, owner, now, lease_until));
        }
        Ok(claimed)
    }

    async fn claim_run(
        &self,
        run: &RunId,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        max_running: Option<usize>,
    ) -> Result<Option<RunRecord>, StoreError> {
        let mut state = lock(&self.state);
        let busy = state
            .runs
            .values()
            .filter(|r| {
                &r.id != run
                    && r.status == RunStatus::Running
                    && r.lease.as_ref().is_some_and(|l| l.is_live(now))
            })
            .count();
        let ready = state
            .runs
            .get(run)
            .is_some_and(|r| claimable(&state, r, now))
            && max_running.is_none_or(|max| busy < max);
        Ok(ready.then(|| take(&mut state, run, owner, now, lease_until)))
    }

    async fn claimable_runs(
        &self,
        now: DateTime<Utc>,
        aging: batch_domain::priority::Aging,
        per_tenant: usize,
        jobs: &[JobId],
    ) -> Result<Vec<RunRecord>, StoreError> {
        let state = lock(&self.state);
        let mut by_tenant: BTreeMap<TenantId, Vec<RunRecord>> = BTreeMap::new();
        for run in state
            .runs
            .values()
            .filter(|r| jobs.contains(&r.job) && claimable(&state, r, now))
        {
            by_tenant
                .entry(run.tenant.clone())
                .or_default()
                .push(run.clone());
        }
        let mut out = Vec::new();
        for (_, mut runs) in by_tenant {
            runs.sort_by_key(|r| {
                (
                    std::cmp::Reverse(batch_domain::priority::effective_priority(
                        r.priority,
                        now - r.created_at,
                        aging,
                    )),
                    r.created_at,
                    r.id.clone(),
                )
            });
            out.extend(runs.into_iter().take(per_tenant));
        }
        Ok(out)
    }

    async fn tenant_loads(
        &self,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> Result<Vec<batch_ports::runs::TenantLoad>, StoreError> {
        let state = lock(&self.state);
        let mut loads: BTreeMap<TenantId, (usize, usize)> = BTreeMap::new();
        for run in state.runs.values() {
            let live = run.status == RunStatus::Running
                && run.lease.as_ref().is_some_and(|l| l.is_live(now));
            let recent = run.started_at.is_some_and(|at| at >= since);
            if live || recent {
                let entry = loads.entry(run.tenant.clone()).or_default();
                entry.0 += usize::from(live);
                entry.1 += 1;
            }
        }
        Ok(loads
            .into_iter()
            .map(|(tenant, (running, load))| batch_ports::runs::TenantLoad {
                tenant,
                running,
                load,
            })
            .collect())
    }

    async fn renew_lease(
        &self,
        run: &RunId,
        owner: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut state = lock(&self.state);
        match state.runs.get_mut(run) {
            Some(r)
                if !r.status.is_terminal()
                    && r.lease.as_ref().is_some_and(|l| l.owner == owner) =>
            {
                r.lease = Some(Lease {
                    owner: owner.to_owned(),
                    expires_at: until,
                });
                Ok(r.cancel_requested)
            }
            _ => Err(lost(owner, run)),
        }
    }

    async fn request_cancel(&self, run: &RunId) -> Result<(), StoreError> {
        if let Some(r) = lock(&self.state).runs.get_mut(run)
            && !r.status.is_terminal()
        {
            r.cancel_requested = true;
        }
        Ok(())
    }

    async fn active_runs(&self, job: &JobId) -> Result<Vec<RunRecord>, StoreError> {
        self.count_schedule_call();
        let state = lock(&self.state);
        let mut runs: Vec<RunRecord> = state
            .runs
            .values()
            .filter(|r| &r.job == job && !r.status.is_terminal())
            .cloned()
            .collect();
        runs.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(runs)
    }

    async fn release_lease(&self, run: &RunId, owner: &str) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        if let Some(r) = state.runs.get_mut(run)
            && r.lease.as_ref().is_some_and(|l| l.owner == owner)
        {
            r.lease = None;
        }
        Ok(())
    }

    async fn due_items(
        &self,
        run: &RunId,
        now: DateTime<Utc>,
        after_seq: i64,
        skip: &[i64],
        limit: usize,
    ) -> Result<Vec<ItemRecord>, StoreError> {
        take_failure(&self.failing_claims, "reading due items")?;
        Ok(self
            .items_of(run)
            .into_iter()
            .filter(|i| {
                i.status == ItemStatus::Pending
                    && i.seq > after_seq
                    && i.next_attempt_at.is_none_or(|t| t <= now)
                    && !skip.contains(&i.seq)
            })
            .take(limit)
            .collect())
    }

    async fn record_outcomes(
        &self,
        run: &RunId,
        owner: &str,
        outcomes: &[ItemOutcome],
        _now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.while_writes_held().await;
        self.outcome_writes.fetch_add(1, Ordering::SeqCst);
        take_failure(&self.failing_writes, "recording outcomes")?;
        let mut state = lock(&self.state);
        let held = state
            .runs
            .get(run)
            .is_some_and(|r| r.lease.as_ref().is_some_and(|l| l.owner == owner));
        if !held {
            return Err(lost(owner, run));
        }
        let items = state.items.get_mut(run).ok_or_else(|| lost(owner, run))?;
        let index: HashMap<String, usize> = items
            .iter()
            .enumerate()
            .map(|(n, i)| (i.key.clone(), n))
            .collect();
        // All or nothing, like the real store's transaction.
        if let Some(unknown) = outcomes.iter().find(|o| !index.contains_key(&o.key)) {
            return Err(StoreError::Unexpected(format!(
                "item {} is not an item of run {run}",
                unknown.key
            )));
        }
        for outcome in outcomes {
            let Some(n) = index.get(&outcome.key) else {
                continue;
            };
            let item = &mut items[*n];
            item.status = outcome.status;
            item.attempts = outcome.attempts;
            item.next_attempt_at = outcome.next_attempt_at;
            item.last_error = outcome.error.clone();
            item.result = outcome.result.clone();
            if outcome.request_context.is_some() {
                item.request_context = outcome.request_context.clone();
            }
        }
        Ok(())
    }

    async fn next_due(&self, run: &RunId) -> Result<Option<DateTime<Utc>>, StoreError> {
        let state = lock(&self.state);
        Ok(state.items.get(run).and_then(|items| {
            items
                .iter()
                .filter(|i| i.status == ItemStatus::Pending)
                .map(|i| i.next_attempt_at.unwrap_or(DateTime::<Utc>::MIN_UTC))
                .min()
        }))
    }

    async fn cancel_pending(&self, run: &RunId, _now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = lock(&self.state);
        let mut n = 0;
        for item in state.items.get_mut(run).into_iter().flatten() {
            if item.status == ItemStatus::Pending {
                item.status = ItemStatus::Cancelled;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn finish_run(
        &self,
        run: &RunId,
        owner: &str,
        status: RunStatus,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        match state.runs.get_mut(run) {
            Some(r) if r.lease.as_ref().is_some_and(|l| l.owner == owner) => {
                r.status = status;
                r.finished_at = Some(now);
                r.lease = None;
                Ok(())
            }
            _ => Err(lost(owner, run)),
        }
    }

    async fn run(&self, tenant: &TenantId, run: &RunId) -> Result<RunRecord, StoreError> {
        lock(&self.state)
            .runs
            .get(run)
            .filter(|r| &r.tenant == tenant)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("run {run}")))
    }

    async fn counts(&self, run: &RunId) -> Result<ItemCounts, StoreError> {
        let mut counts = ItemCounts::default();
        for item in lock(&self.state).items.get(run).into_iter().flatten() {
            counts.add(item.status, 1);
        }
        Ok(counts)
    }

    async fn list_items(
        &self,
        tenant: &TenantId,
        run: &RunId,
        status: Option<ItemStatus>,
        after_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<ItemRecord>, StoreError> {
        self.run(tenant, run).await?;
        self.item_pages.fetch_add(1, Ordering::SeqCst);
        let state = lock(&self.state);
        Ok(state
            .items
            .get(run)
            .into_iter()
            .flatten()
            .filter(|i| status.is_none_or(|s| s == i.status) && i.seq > after_seq.unwrap_or(0))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn list_runs(
        &self,
        filter: &batch_ports::runs::RunFilter,
        cursor: Option<&batch_ports::runs::RunCursor>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let state = lock(&self.state);
        let mut runs: Vec<RunRecord> = state
            .runs
            .values()
            .filter(|r| filter.tenant.as_ref().is_none_or(|t| &r.tenant == t))
            .filter(|r| {
                filter
                    .jobs
                    .as_ref()
                    .is_none_or(|jobs| jobs.contains(&r.job))
            })
            .filter(|r| filter.status.is_none_or(|s| r.status == s))
            .filter(|r| {
                filter.user.as_ref().is_none_or(|user| {
                    state
                        .items
                        .get(&r.id)
                        .is_some_and(|items| items.iter().any(|i| i.user.as_ref() == Some(user)))
                })
            })
            .filter(|r| filter.created_from.is_none_or(|t| r.created_at >= t))
            .filter(|r| filter.created_until.is_none_or(|t| r.created_at < t))
            .filter(|r| cursor.is_none_or(|c| (r.created_at, &r.id) < (c.created_at, &c.run)))
            .cloned()
            .collect();
        runs.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        runs.truncate(limit);
        Ok(runs)
    }

    async fn queued_runs(&self) -> Result<u64, StoreError> {
        let state = lock(&self.state);
        Ok(u64::try_from(
            state
                .runs
                .values()
                .filter(|r| r.status == RunStatus::Queued)
                .count(),
        )
        .unwrap_or(u64::MAX))
    }
}

#[async_trait]
impl ContextStore for MemoryRuns {
    async fn save_context(
        &self,
        tenant: &TenantId,
        run: &RunId,
        context: &BatchContext,
        _now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        lock(&self.state)
            .contexts
            .insert(run.clone(), (tenant.to_string(), context.clone()));
        Ok(())
    }

    async fn save_progress(
        &self,
        tenant: &TenantId,
        run: &RunId,
        progress: &batch_domain::context::Progress,
        _now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        let (_, context) = state
            .contexts
            .get_mut(run)
            .filter(|(t, _)| t == tenant.as_str())
            .ok_or_else(|| StoreError::NotFound(format!("context of run {run}")))?;
        context.progress = *progress;
        Ok(())
    }

    async fn context(&self, tenant: &TenantId, run: &RunId) -> Result<BatchContext, StoreError> {
        lock(&self.state)
            .contexts
            .get(run)
            .filter(|(t, _)| t == tenant.as_str())
            .map(|(_, c)| c.clone())
            .ok_or_else(|| StoreError::NotFound(format!("context of run {run}")))
    }

    async fn merge_into_parent(
        &self,
        tenant: &TenantId,
        parent: &RunId,
        child: &RunId,
        now: DateTime<Utc>,
    ) -> Result<BatchContext, StoreError> {
        let mut merged = self.context(tenant, parent).await?;
        merged.merge_child(&self.context(tenant, child).await?);
        self.save_context(tenant, parent, &merged, now).await?;
        Ok(merged)
    }

    async fn add_references(
        &self,
        tenant: &TenantId,
        job: &JobId,
        run: &RunId,
        users: &[UserId],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        if self
            .failing_references
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Unexpected(
                "adding references: failure injected by the test".to_owned(),
            ));
        }
        let mut state = lock(&self.state);
        let mut added = 0;
        for user in users {
            let exists = state
                .references
                .iter()
                .any(|(t, r)| t == tenant.as_str() && &r.run == run && &r.user == user);
            if !exists {
                state.references.push((
                    tenant.to_string(),
                    BatchReference {
                        run: run.clone(),
                        job: job.clone(),
                        user: user.clone(),
                        created_at: now,
                    },
                ));
                added += 1;
            }
        }
        Ok(added)
    }

    async fn references(
        &self,
        tenant: &TenantId,
        user: &UserId,
        cursor: Option<&ReferenceCursor>,
        limit: usize,
    ) -> Result<Vec<BatchReference>, StoreError> {
        let state = lock(&self.state);
        let mut refs: Vec<BatchReference> = state
            .references
            .iter()
            .filter(|(t, r)| t == tenant.as_str() && &r.user == user)
            .map(|(_, r)| r.clone())
            .filter(|r| cursor.is_none_or(|c| (r.created_at, &r.run) < (c.created_at, &c.run)))
            .collect();
        refs.sort_by(|a, b| (b.created_at, &b.run).cmp(&(a.created_at, &a.run)));
        refs.truncate(limit);
        Ok(refs)
    }
}

/// Users of `system_users` in memory: the valid ones are those inserted for the tenant.
#[derive(Debug, Default)]
pub struct FakeUsers {
    users: Mutex<HashSet<(String, String)>>,
    calls: AtomicUsize,
}

impl FakeUsers {
    /// Adds valid users of `tenant`.
    pub fn insert<'a>(&self, tenant: &str, users: impl IntoIterator<Item = &'a str>) {
        let mut set = lock(&self.users);
        set.extend(users.into_iter().map(|u| (tenant.to_owned(), u.to_owned())));
    }

    /// Calls received so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl UserRepository for FakeUsers {
    async fn validate_users(
        &self,
        tenant: &TenantId,
        ids: &[UserId],
    ) -> Result<UserValidation, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let set = lock(&self.users);
        let (valid, invalid) = ids
            .iter()
            .cloned()
            .partition(|u| set.contains(&(tenant.to_string(), u.to_string())));
        Ok(UserValidation { valid, invalid })
    }

    /// Filters are not interpreted here (the store's contract suite covers them): every valid
    /// user of the tenant matches.
    async fn find_users(
        &self,
        tenant: &TenantId,
        _filters: &[batch_domain::config::Filter],
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<UserId>, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let set = lock(&self.users);
        let mut users: Vec<UserId> = set
            .iter()
            .filter(|(t, _)| t == tenant.as_str())
            .filter_map(|(_, u)| UserId::parse(u.as_str()).ok())
            .filter(|u| after.is_none_or(|a| u > a))
            .collect();
        users.sort();
        users.truncate(limit);
        Ok(users)
    }
}

/// Templates in memory.
#[derive(Debug, Default)]
pub struct FakeTemplates {
    templates: Mutex<HashMap<String, Template>>,
}

impl FakeTemplates {
    /// Adds a template with `body` at version 1.
    pub fn insert(&self, id: &str, body: &str) {
        let template = Template {
            id: TemplateId::parse(id).unwrap_or_else(|e| panic!("template id {id:?}: {e}")),
            version: 1,
            body: body.to_owned(),
            parameter_defaults: serde_json::Map::new(),
        };
        lock(&self.templates).insert(id.to_owned(), template);
    }
}

#[async_trait]
impl TemplateSource for FakeTemplates {
    async fn template(
        &self,
        _tenant: &TenantId,
        id: &TemplateId,
        _version: Option<u32>,
    ) -> Result<Template, SourceError> {
        lock(&self.templates)
            .get(id.as_str())
            .cloned()
            .ok_or_else(|| SourceError::NotFound(format!("template {id}")))
    }
}

/// One call the fake executor received.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutedCall {
    /// The request.
    pub request: Request,
    /// The attempt number for its idempotency key (1 for the first call).
    pub attempt: u32,
    /// When it started, by the clock given to the executor.
    pub at: DateTime<Utc>,
}

/// How the fake executor answers.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Percentage (0–100) of calls that fail retryably, chosen by a hash of key and attempt so a
    /// run is reproducible.
    pub retryable_percent: u8,
    /// Item keys (the part of the idempotency key after `:`) that always fail permanently.
    pub permanent: HashSet<String>,
    /// Item keys whose execution panics.
    pub panics: HashSet<String>,
    /// Item keys whose execution never answers.
    pub stalls: HashSet<String>,
    /// Item keys whose execution takes this long on the executor's clock.
    pub delays: HashMap<String, std::time::Duration>,
    /// Item keys answered "not attempted" (as with an open circuit breaker) for this many
    /// calls before they are executed.
    pub deferred: HashMap<String, u32>,
    /// Item keys whose execution answers only once the item named here has been called.
    pub waits_for: HashMap<String, String>,
}

/// A request executor that records every call, the highest number in flight at once, and
/// answers per its [`Behaviour`]. Successful results echo the request.
pub struct FakeExecutor {
    behaviour: Mutex<Behaviour>,
    calls: Mutex<Vec<ExecutedCall>>,
    attempts: Mutex<HashMap<String, u32>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    clock: std::sync::Arc<dyn batch_ports::Clock>,
    /// Woken on every call, for executions waiting for another item's call.
    called: tokio::sync::Notify,
}

impl std::fmt::Debug for FakeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeExecutor").finish_non_exhaustive()
    }
}

impl FakeExecutor {
    /// An executor that reads call times from `clock`.
    pub fn new(behaviour: Behaviour, clock: std::sync::Arc<dyn batch_ports::Clock>) -> Self {
        FakeExecutor {
            behaviour: Mutex::new(behaviour),
            calls: Mutex::new(Vec::new()),
            attempts: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            clock,
            called: tokio::sync::Notify::new(),
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<ExecutedCall> {
        lock(&self.calls).clone()
    }

    /// The highest number of calls in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Replaces the behaviour.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.behaviour) = behaviour;
    }
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl RequestExecutor for FakeExecutor {
    async fn execute(&self, request: Request) -> Result<Value, ExecuteError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = InFlight(&self.in_flight);
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let attempt = {
            let mut attempts = lock(&self.attempts);
            let attempt = attempts.entry(request.idempotency_key.clone()).or_insert(0);
            *attempt += 1;
            *attempt
        };
        lock(&self.calls).push(ExecutedCall {
            request: request.clone(),
            attempt,
            at: self.clock.now(),
        });
        self.called.notify_waiters();
        // Let other requests start, so concurrency is observable.
        tokio::task::yield_now().await;
        let behaviour = lock(&self.behaviour).clone();
        let item = request
            .idempotency_key
            .split_once(':')
            .map_or(request.idempotency_key.as_str(), |(_, k)| k);
        if behaviour.deferred.get(item).is_some_and(|n| attempt <= *n) {
            return Err(ExecuteError {
                kind: FailureKind::NotAttempted {
                    retry_in: std::time::Duration::from_secs(30),
                },
                message: "circuit open (injected)".to_owned(),
            });
        }
        if behaviour.stalls.contains(item) {
            std::future::pending::<()>().await;
        }
        if let Some(other) = behaviour.waits_for.get(item) {
            let called = |key: &str| key.split_once(':').is_some_and(|(_, k)| k == other);
            loop {
                let notified = self.called.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if lock(&self.calls)
                    .iter()
                    .any(|c| called(&c.request.idempotency_key))
                {
                    break;
                }
                notified.await;
            }
        }
        if let Some(delay) = behaviour.delays.get(item) {
            self.clock.sleep(*delay).await;
        }
        if behaviour.panics.contains(item) {
            panic!("the fake executor was told to panic on {item}");
        }
        if behaviour.permanent.contains(item) {
            return Err(ExecuteError {
                kind: FailureKind::Permanent,
                message: format!("{item} is poison"),
            });
        }
        if fnv(&format!("{}#{attempt}", request.idempotency_key)) % 100
            < u64::from(behaviour.retryable_percent)
        {
            return Err(ExecuteError {
                kind: FailureKind::Retryable,
                message: "unavailable (injected)".to_owned(),
            });
        }
        Ok(serde_json::json!({
            "template": request.template.as_str(),
            "user": request.user.as_ref().map(UserId::as_str),
            "payload": request.payload,
            "parameters": request.parameters,
        }))
    }
}

#[async_trait]
impl batch_ports::schedules::ScheduleStore for MemoryRuns {
    async fn schedule_states(
        &self,
    ) -> Result<Vec<batch_ports::schedules::ScheduleState>, StoreError> {
        self.count_schedule_call();
        Ok(lock(&self.state).schedules.values().cloned().collect())
    }

    async fn schedule_state(
        &self,
        job: &JobId,
        group: &str,
    ) -> Result<Option<batch_ports::schedules::ScheduleState>, StoreError> {
        self.count_schedule_call();
        Ok(lock(&self.state)
            .schedules
            .get(&(job.to_string(), group.to_owned()))
            .cloned())
    }

    async fn advance_schedule(
        &self,
        expected: Option<Option<DateTime<Utc>>>,
        state: &batch_ports::schedules::ScheduleState,
        _now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.count_schedule_call();
        let mut all = lock(&self.state);
        let key = (state.job.to_string(), state.group.clone());
        let current = all.schedules.get(&key).map(|s| s.next_nominal);
        let matches = match (expected, current) {
            (None, None) => true,
            (Some(seen), Some(now)) => seen == now,
            _ => false,
        };
        if matches {
            all.schedules.insert(key, state.clone());
        }
        Ok(matches)
    }

    async fn pause_job(&self, pause: &batch_ports::schedules::Pause) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        let since = state
            .pauses
            .get(pause.job.as_str())
            .map_or(pause.since, |p| p.since);
        state.pauses.insert(
            pause.job.to_string(),
            batch_ports::schedules::Pause {
                since,
                ..pause.clone()
            },
        );
        Ok(())
    }

    async fn resume_job(&self, job: &JobId) -> Result<bool, StoreError> {
        Ok(lock(&self.state).pauses.remove(job.as_str()).is_some())
    }

    async fn paused_jobs(&self) -> Result<Vec<batch_ports::schedules::Pause>, StoreError> {
        self.count_schedule_call();
        Ok(lock(&self.state).pauses.values().cloned().collect())
    }
}
