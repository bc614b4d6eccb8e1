//! The BatchProcessor: one run from preparation to a terminal state.
//!
//! A run is prepared by its strategy and created with all its items (valid ones pending,
//! invalid ones recorded as such). Executing it claims chunks of due items under the run's
//! lease and executes them with the job's concurrency limit (a semaphore) and rate limit
//! (governor), pipelined: the next chunk is claimed while the current one's last requests are in
//! flight, and each chunk's outcomes are recorded in one store call as soon as its last request
//! answered, while later chunks execute, so the concurrency limit stays full across chunk
//! boundaries. Progress is published after every recorded chunk. [`Execution::run_next_chunk`]
//! is one chunk at a time, without the pipeline, for callers that step a run. Retryable
//! failures are rescheduled with the job's backoff (attempt count and next attempt time are
//! stored, so a restart continues the schedule); permanent failures and panics fail the item.
//! When nothing is pending, references are handed out and the run finishes with exact counts. A
//! processor that opens an interrupted run only ever sees items that have not succeeded:
//! succeeded items are never executed again.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batch_domain::config::Job;
use batch_domain::context::{Items, Progress};
use batch_domain::priority::{Aging, Waiting, fair_order};
use batch_domain::retry::{Decision, FailureKind};
use batch_domain::run::{ItemStatus, RunId, RunStatus, Trigger};
use batch_domain::{TemplateId, UserId};
use batch_ports::runs::{
    ItemOutcome, ItemRecord, NewItem, NewRun, RunDraft, RunRecord, StoreError,
};
use batch_ports::{ExecuteError, Request, SourceError, Template};
use chrono::{DateTime, Utc};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::catalog::JobCatalog;
use crate::context::{ContextManager, progress};
use crate::limits::RateLimit;
use crate::strategy::{ItemSink, PrepareSettings, Prepared, Scope, Strategies};
use crate::{Error, Ports};

/// How a processor behaves, whatever the job.
#[derive(Debug, Clone)]
pub struct ProcessorSettings {
    /// This process's name in leases (host, pid and a random part, typically).
    pub owner: String,
    /// How long a run lease lasts without renewal; renewed at every chunk, and every third of
    /// it while a chunk is executing (the heartbeat).
    pub run_lease: Duration,
    /// Pages and validation chunks of preparation.
    pub prepare: PrepareSettings,
    /// Seed of the backoff jitter, for reproducible tests; `None` seeds from the clock.
    pub seed: Option<u64>,
    /// After a cancel, how long requests in flight may still finish before they are
    /// abandoned (their items end `cancelled`).
    pub cancel_grace: Duration,
    /// How waiting raises a run's priority when more runs are due than slots.
    pub aging: Aging,
    /// The most runs that may run at once across every replica sharing the database; `None`
    /// for no limit.
    pub max_running_runs: Option<usize>,
    /// Tenants share run slots by their load: runs running now or started within this window.
    pub fairness_window: Duration,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        ProcessorSettings {
            owner: format!(
                "batch-{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
            run_lease: Duration::from_secs(60),
            prepare: PrepareSettings::default(),
            seed: None,
            cancel_grace: Duration::from_secs(10),
            aging: Aging::default(),
            max_running_runs: None,
            fairness_window: Duration::from_secs(300),
        }
    }
}

/// Where a run stands, published after every chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressEvent {
    /// The run.
    pub run: RunId,
    /// Its status.
    pub status: RunStatus,
    /// Exact progress.
    pub progress: Progress,
}

/// What one step of an execution did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Chunks of this many items in all were executed and recorded.
    Worked(usize),
    /// Nothing is due before this instant (retries waiting for their backoff).
    Idle(DateTime<Utc>),
    /// The run ended with this status.
    Finished(RunStatus),
}

/// Runs batch runs.
pub struct BatchProcessor {
    ports: Ports,
    strategies: Strategies,
    contexts: ContextManager,
    settings: ProcessorSettings,
    cancelled: Mutex<HashSet<RunId>>,
    /// The runs an [`Execution`] of this processor holds. Another slot of the same processor
    /// (the same lease owner) must not open a second one when the run's lease lapses under a
    /// live execution (a heartbeat late on a loaded machine): the run's lease, which covers its
    /// items, would let the second read the first's items in flight as due, make their requests
    /// again and record them.
    executing: Mutex<HashSet<RunId>>,
    /// Bumped on every cancel, so executions waiting on requests notice at once.
    cancel_signal: watch::Sender<u64>,
    /// Wakes the idle slots of [`BatchProcessor::work_until_stopped`] when a run is queued,
    /// so it starts at once instead of at the slot's next look.
    queued: tokio::sync::Notify,
    watchers: Mutex<HashMap<RunId, watch::Sender<Option<ProgressEvent>>>>,
    rng: Mutex<SmallRng>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl BatchProcessor {
    /// A processor over `ports` with the given strategies.
    pub fn new(ports: Ports, strategies: Strategies, settings: ProcessorSettings) -> Self {
        let seed = settings.seed.unwrap_or_else(|| {
            u64::try_from(ports.clock.now().timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0)
        });
        BatchProcessor {
            contexts: ContextManager::new(ports.contexts.clone(), ports.clock.clone()),
            ports,
            strategies,
            settings,
            cancelled: Mutex::new(HashSet::new()),
            executing: Mutex::new(HashSet::new()),
            cancel_signal: watch::channel(0).0,
            queued: tokio::sync::Notify::new(),
            watchers: Mutex::new(HashMap::new()),
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
        }
    }

    /// The ports this processor works with.
    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    /// The context manager this processor keeps contexts with.
    pub fn contexts(&self) -> &ContextManager {
        &self.contexts
    }

    /// Prepares and creates a run of `job`: items from its strategy within `scope`, users
    /// validated, the first context saved. The run is queued; [`BatchProcessor::open`] executes it.
    ///
    /// # Errors
    /// [`Error::Source`] when preparation cannot read its sources; [`Error::Store`] when the run
    /// cannot be stored.
    pub async fn start(
        &self,
        job: &Job,
        trigger: Trigger,
        scheduled_for: Option<DateTime<Utc>>,
        scope: &Scope,
        parent: Option<RunId>,
    ) -> Result<RunRecord, Error> {
        let origin = Origin {
            trigger,
            scheduled_for,
            occurrence: None,
            group: "",
            parent,
        };
        self.create_run(job, origin, scope).await
    }

    /// Prepares and creates the run of a schedule's occurrence (see [`BatchProcessor::start`]):
    /// `group` is the schedule group it fired for (empty for the job's own schedule). At most
    /// one run exists per occurrence.
    ///
    /// # Errors
    /// [`Error::Store`] with `AlreadyExists` when the occurrence has its run already; otherwise
    /// as [`BatchProcessor::start`].
    pub async fn start_occurrence(
        &self,
        job: &Job,
        trigger: Trigger,
        occurrence: i64,
        nominal: DateTime<Utc>,
        group: &str,
        scope: &Scope,
    ) -> Result<RunRecord, Error> {
        let origin = Origin {
            trigger,
            scheduled_for: Some(nominal),
            occurrence: Some(occurrence),
            group,
            parent: None,
        };
        self.create_run(job, origin, scope).await
    }

    async fn create_run(
        &self,
        job: &Job,
        origin: Origin<'_>,
        scope: &Scope,
    ) -> Result<RunRecord, Error> {
        let strategy = self.strategies.for_job(job)?;
        let run = self.new_run(job, origin, scope)?;
        let id = run.id.clone();
        let mut sink = RunSink::new(self.ports.runs.begin_run(run).await?, scope);
        let prepared = strategy
            .prepare(job, scope, &self.ports, &self.settings.prepare, &mut sink)
            .await?;
        self.commit_run(job, &id, sink, prepared).await
    }

    /// Starts a run of the failed items of `run` (trigger `retry`, its parent `run`, whose
    /// context it merges into when it ends): same keys, users and payloads, attempts from zero.
    ///
    /// # Errors
    /// [`Error::Job`] when `run` has not ended or has no failed items; [`Error::Store`] when the
    /// store fails.
    pub async fn retry_failed(&self, job: &Job, run: &RunRecord) -> Result<RunRecord, Error> {
        if !run.status.is_terminal() {
            return Err(Error::Job(format!(
                "run {} has not ended ({}); retry its failed items once it has",
                run.id, run.status
            )));
        }
        let origin = Origin {
            trigger: Trigger::Retry,
            scheduled_for: run.scheduled_for,
            occurrence: None,
            group: &run.group,
            parent: Some(run.id.clone()),
        };
        let scope = Scope::default();
        let retry = self.new_run(job, origin, &scope)?;
        let id = retry.id.clone();
        let mut sink = RunSink::new(self.ports.runs.begin_run(retry).await?, &scope);
        let mut after = None;
        loop {
            let page = self
                .ports
                .runs
                .list_items(&run.tenant, &run.id, Some(ItemStatus::Failed), after, 1_000)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            sink.add(
                page.into_iter()
                    .map(|item| NewItem {
                        key: item.key,
                        user: item.user,
                        status: ItemStatus::Pending,
                        payload: item.payload,
                    })
                    .collect(),
            )
            .await?;
        }
        // Dropping the draft abandons the run.
        if sink.added == 0 {
            return Err(Error::Job(format!("run {} has no failed items", run.id)));
        }
        let prepared = Prepared {
            notes: vec![format!(
                "retry of the {} failed items of run {}",
                sink.added, run.id
            )],
            ..Prepared::default()
        };
        self.commit_run(job, &id, sink, prepared).await
    }

    /// The run to create for `job` from `origin` within `scope`, with a fresh id.
    fn new_run(&self, job: &Job, origin: Origin<'_>, scope: &Scope) -> Result<NewRun, Error> {
        let id = RunId::parse(uuid::Uuid::now_v7().to_string())
            .map_err(|e| Error::Job(format!("generated run id: {e}")))?;
        Ok(NewRun {
            id,
            job: job.id.clone(),
            tenant: job.tenant.clone(),
            trigger: origin.trigger,
            priority: scope.priority.unwrap_or(job.priority),
            scheduled_for: origin.scheduled_for,
            occurrence: origin.occurrence,
            group: origin.group.to_owned(),
            parent: origin.parent,
            serial: job.overlap != batch_domain::config::Overlap::AllowAll,
            created_at: self.ports.clock.now(),
        })
    }

    /// Commits the drafted run `id` with its items and saves its first context.
    async fn commit_run(
        &self,
        job: &Job,
        id: &RunId,
        sink: RunSink<'_>,
        prepared: Prepared,
    ) -> Result<RunRecord, Error> {
        let RunSink {
            draft,
            samples,
            pending,
            added,
            ..
        } = sink;
        draft.commit().await?;
        let record = self.ports.runs.run(&job.tenant, id).await?;
        let context = ContextManager::draft(prepared, samples, pending);
        self.contexts.create(job, &record, context).await?;
        tracing::info!(run = %id, job = %job.id, items = added, "run created");
        // Only now is the run ready to execute (an execution updates its context): idle slots
        // here and in other processes may take it at once. The announcement is a hint; a run
        // not announced waits for the slots' next look.
        if let Err(e) = self.ports.runs.announce_queued(id).await {
            tracing::debug!(run = %id, error = %e, "the run could not be announced");
        }
        self.wake_idle_slots();
        Ok(record)
    }

    /// Wakes the slots of [`BatchProcessor::work_until_stopped`] that are waiting for work, so
    /// that they look for a queued run now instead of at their next look. The processor calls
    /// it for the runs it creates; a server calls it when another replica says it queued one.
    pub fn wake_idle_slots(&self) {
        self.queued.notify_waiters();
    }

    /// Takes `run` of `job` over for execution: `None` when it has ended or another processor
    /// holds its lease.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails.
    pub async fn open(&self, job: &Job, run: &RunId) -> Result<Option<Execution<'_>>, Error> {
        if lock(&self.executing).contains(run) {
            return Ok(None);
        }
        let now = self.ports.clock.now();
        let Some(record) = self
            .ports
            .runs
            .claim_run(
                run,
                &self.settings.owner,
                now,
                now + chrono_duration(self.settings.run_lease),
                None,
            )
            .await?
        else {
            return Ok(None);
        };
        self.execution(job, record).await.map(Some)
    }

    /// Claims the next runnable run of any of `jobs` (queued runs, and runs whose owner's lease
    /// expired: a crashed processor's runs are resumed here). `None` when there is none, or
    /// when [`ProcessorSettings::max_running_runs`] runs are running already. When more runs
    /// wait than can run, the highest effective priority (base + aging) goes first and, within
    /// one priority band, the tenant with the least load (runs running or started within
    /// [`ProcessorSettings::fairness_window`]) goes first ([`fair_order`]). Runs of jobs not in `jobs`
    /// (removed from the configuration) are left alone.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails.
    pub async fn claim_next(
        &self,
        jobs: &HashMap<batch_domain::JobId, Job>,
    ) -> Result<Option<Execution<'_>>, Error> {
        let now = self.ports.clock.now();
        let aging = self.settings.aging;
        let loads = self
            .ports
            .runs
            .tenant_loads(now, now - chrono_duration(self.settings.fairness_window))
            .await?;
        if let Some(max) = self.settings.max_running_runs
            && loads.iter().map(|l| l.running).sum::<usize>() >= max
        {
            return Ok(None);
        }
        let load: HashMap<_, _> = loads.into_iter().map(|l| (l.tenant, l.load)).collect();
        let known: Vec<batch_domain::JobId> = jobs.keys().cloned().collect();
        let candidates: Vec<RunRecord> = self
            .ports
            .runs
            .claimable_runs(now, aging, CLAIM_WINDOW, &known)
            .await?;
        let waiting: Vec<Waiting> = candidates
            .iter()
            .map(|r| Waiting {
                base: r.priority,
                due: r.created_at,
                job: r.job.clone(),
                tenant: r.tenant.clone(),
            })
            .collect();
        let lease_until = now + chrono_duration(self.settings.run_lease);
        for index in fair_order(&waiting, &load, now, aging) {
            let candidate = &candidates[index];
            if lock(&self.executing).contains(&candidate.id) {
                continue;
            }
            // Another replica may have taken it meanwhile: then try the next.
            if let Some(record) = self
                .ports
                .runs
                .claim_run(
                    &candidate.id,
                    &self.settings.owner,
                    now,
                    lease_until,
                    self.settings.max_running_runs,
                )
                .await?
                && let Some(job) = jobs.get(&record.job)
            {
                return self.execution(job, record).await.map(Some);
            }
        }
        Ok(None)
    }

    /// Claims and runs runs of the jobs of `jobs` (as it is at each claim) in `slots`
    /// concurrent slots until `stop` turns true; a slot with nothing to claim waits
    /// `idle_wait` on the clock, or until a run is queued
    /// ([`BatchProcessor::wake_idle_slots`]), whichever comes first. On stop, each slot
    /// finishes the chunk it is executing, records it and releases its run's lease, so another
    /// replica resumes the run at once. A store failure is logged and the slot tries again
    /// after `idle_wait` (a database that went away loses no work: leases expire and are
    /// rescued).
    pub async fn work_until_stopped(
        self: Arc<Self>,
        jobs: Arc<JobCatalog>,
        slots: usize,
        idle_wait: Duration,
        stop: watch::Receiver<bool>,
    ) {
        let mut set = JoinSet::new();
        for _ in 0..slots.max(1) {
            let processor = self.clone();
            let jobs = jobs.clone();
            let mut stop = stop.clone();
            set.spawn(async move {
                while !*stop.borrow() {
                    // Listening before looking: a run queued while the slot looks wakes it.
                    let woken = processor.queued.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    let idle = match processor.claim_next(&jobs.jobs()).await {
                        Ok(Some(mut execution)) => {
                            let span = tracing::info_span!(
                                "run",
                                run = %execution.run().id,
                                job = %execution.run().job,
                                tenant = %execution.run().tenant,
                            );
                            let ran = tracing::Instrument::instrument(
                                execution.run_until_stopped(stop.clone()),
                                span,
                            )
                            .await;
                            if let Err(e) = ran {
                                tracing::warn!(run = %execution.run().id, error = %e, "run interrupted");
                            }
                            false
                        }
                        Ok(None) => true,
                        Err(e) => {
                            tracing::warn!(error = %e, "claiming a run failed");
                            true
                        }
                    };
                    if idle {
                        tokio::select! {
                            () = processor.ports.clock.sleep(idle_wait) => {}
                            () = &mut woken => {}
                            _ = stop.changed() => {}
                        }
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
    }

    /// Claims and runs runs one after another until none is left; returns how many ran.
    ///
    /// # Errors
    /// The first error of a run.
    pub async fn drain(&self, jobs: &HashMap<batch_domain::JobId, Job>) -> Result<usize, Error> {
        let mut ran = 0;
        while let Some(mut execution) = self.claim_next(jobs).await? {
            execution.run_to_completion().await?;
            ran += 1;
        }
        Ok(ran)
    }

    /// An execution of a run this processor has claimed.
    async fn execution(&self, job: &Job, record: RunRecord) -> Result<Execution<'_>, Error> {
        let mut notes = Vec::new();
        let template = match self
            .ports
            .templates
            .template(&job.tenant, &job.template, None)
            .await
        {
            Ok(template) => Some(template),
            Err(SourceError::NotFound(why)) => {
                notes.push(format!("template {} not found: {why}", job.template));
                None
            }
            Err(other) => {
                notes.push(format!(
                    "template {} unavailable ({other}); requests carry no template defaults",
                    job.template
                ));
                None
            }
        };
        let limits = job.execution;
        if !lock(&self.executing).insert(record.id.clone()) {
            // Two slots claimed the run at once and both got it (the lease lapsed between):
            // the one already executing keeps it.
            return Err(Error::Store(StoreError::LeaseLost(format!(
                "run {} is executing in this processor already",
                record.id
            ))));
        }
        Ok(Execution {
            processor: self,
            job: job.clone(),
            template_missing: template.is_none() && notes.iter().any(|n| n.contains("not found")),
            parameter_defaults: template
                .map(|t: Template| t.parameter_defaults)
                .unwrap_or_default(),
            limiter: limits
                .rate_limit_per_sec
                .map(|rate| Arc::new(RateLimit::per_second(rate, self.ports.clock.clone()))),
            semaphore: Arc::new(Semaphore::new(
                usize::try_from(limits.concurrency).unwrap_or(1).max(1),
            )),
            run: record,
            notes,
            counts: None,
            cursor: ClaimCursor::default(),
            referenced: None,
        })
    }

    /// Asks `run` to stop: its execution claims nothing more, lets requests in flight finish
    /// for up to the cancel grace period and abandons the rest, marks what is left cancelled
    /// and ends the run `cancelled` with exact counts.
    pub fn cancel(&self, run: &RunId) {
        lock(&self.cancelled).insert(run.clone());
        self.cancel_signal
            .send_modify(|generation| *generation += 1);
    }

    fn is_cancelled(&self, run: &RunId) -> bool {
        lock(&self.cancelled).contains(run)
    }

    /// Progress of `run` as it happens: the latest event, then every new one.
    pub fn subscribe(&self, run: &RunId) -> watch::Receiver<Option<ProgressEvent>> {
        lock(&self.watchers)
            .entry(run.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    fn publish(&self, event: ProgressEvent) {
        let sender = lock(&self.watchers)
            .entry(event.run.clone())
            .or_insert_with(|| watch::channel(None).0)
            .clone();
        sender.send_replace(Some(event));
    }

    /// Renews the lease of `run` every third of its length until the lease is lost (the
    /// returned error). A cancel requested meanwhile is passed on to the processor.
    async fn heartbeat(&self, run: &RunId) -> Error {
        let settings = &self.settings;
        loop {
            self.ports.clock.sleep(settings.run_lease / 3).await;
            let until = self.ports.clock.now() + chrono_duration(settings.run_lease);
            match self
                .ports
                .runs
                .renew_lease(run, &settings.owner, until)
                .await
            {
                Ok(true) => self.cancel(run),
                Ok(false) => {}
                Err(lost @ StoreError::LeaseLost(_)) => return lost.into(),
                // The database may come back before the lease runs out: keep trying.
                Err(other) => {
                    tracing::warn!(run = %run, error = %other, "lease renewal failed");
                }
            }
        }
    }

    fn decide(&self, job: &Job, attempt: u32, kind: FailureKind) -> Decision {
        job.retry.decide(attempt, kind, &mut *lock(&self.rng))
    }
}

/// Why a run is created: what [`NewRun`] records besides the job and its items.
struct Origin<'a> {
    trigger: Trigger,
    scheduled_for: Option<DateTime<Utc>>,
    occurrence: Option<i64>,
    group: &'a str,
    parent: Option<RunId>,
}

/// Within one step, the run lease is renewed with a claim at most this often: the first claim
/// of a step always renews it (and sees a cancel requested through the store), and the
/// heartbeat renews it every third of the lease whatever happens.
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// How often claims start from the beginning of the run again (see [`ClaimCursor`]).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Claimable runs read per tenant when choosing the next run to claim.
const CLAIM_WINDOW: usize = 16;

/// Runs `op` again while the store answers [`StoreError::Unavailable`], waiting 50 ms,
/// doubling up to 2 s, for at most `patience`; returns its last answer.
async fn while_unavailable<T, F, Fut>(
    clock: &Arc<dyn batch_ports::Clock>,
    run: &RunId,
    what: &str,
    patience: Duration,
    mut op: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let give_up = clock.now() + chrono_duration(patience);
    let mut wait = Duration::from_millis(50);
    loop {
        match op().await {
            Err(StoreError::Unavailable(why)) if clock.now() < give_up => {
                tracing::warn!(run = %run, error = %why, "{what}: database unavailable, retrying");
                clock.sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The items of a run being created, on their way to the store's draft: the scope's overrides
/// are applied as they pass, and the context's samples and pending count are kept, so nothing
/// holds the whole run.
struct RunSink<'s> {
    draft: Box<dyn RunDraft + 's>,
    scope: &'s Scope,
    /// Samples of the valid and invalid item keys, for the first context.
    samples: Items,
    /// Items to execute.
    pending: u64,
    /// Items added.
    added: u64,
}

impl<'s> RunSink<'s> {
    fn new(draft: Box<dyn RunDraft + 's>, scope: &'s Scope) -> Self {
        RunSink {
            draft,
            scope,
            samples: Items::default(),
            pending: 0,
            added: 0,
        }
    }
}

#[async_trait::async_trait]
impl ItemSink for RunSink<'_> {
    async fn add(&mut self, mut items: Vec<NewItem>) -> Result<(), Error> {
        if items.is_empty() {
            return Ok(());
        }
        self.scope.apply_overrides(&mut items);
        for item in &items {
            if item.status == ItemStatus::Invalid {
                self.samples.invalid.push(item.key.as_str());
            } else {
                self.samples.valid.push(item.key.as_str());
                self.pending += 1;
            }
        }
        self.added += u64::try_from(items.len()).unwrap_or(u64::MAX);
        self.draft.append(items).await?;
        Ok(())
    }
}

/// One run being executed by one processor.
pub struct Execution<'p> {
    processor: &'p BatchProcessor,
    job: Job,
    run: RunRecord,
    parameter_defaults: Map<String, Value>,
    template_missing: bool,
    limiter: Option<Arc<RateLimit>>,
    semaphore: Arc<Semaphore>,
    notes: Vec<String>,
    /// The run's item counts as of the last chunk this execution recorded, kept up to date
    /// from its outcomes instead of counted again after every chunk (a count reads every item
    /// of the run: quadratic over a large run). `None` until first counted; the end of the
    /// run counts afresh.
    counts: Option<batch_domain::run::ItemCounts>,
    /// Where the last claim ended.
    cursor: ClaimCursor,
    /// Whether every user whose item of the run succeeded has had the run's reference handed
    /// out by this execution, chunk by chunk: `Some(true)` while so; `Some(false)` once a
    /// chunk's references failed or items succeeded before this execution began (a resumed
    /// run); `None` before the first chunk is recorded. The end of the run pages through the
    /// succeeded items again unless it is `Some(true)`.
    referenced: Option<bool>,
}

/// Where an execution's claims have got to in its run. Claiming from there reads only the
/// items taken; claiming from the start steps over every item done before (their old index
/// entries stay until vacuumed), which made each claim cost in proportion to the run's
/// progress. Retries that fell due behind the cursor, and items another processor left, are
/// found by a sweep from the start: when the claims reach the end, and every [`SWEEP_EVERY`].
#[derive(Debug, Clone, Copy, Default)]
struct ClaimCursor {
    /// The position of the last item claimed.
    after: i64,
    /// When the claims last started from the beginning.
    swept_at: Option<DateTime<Utc>>,
}

/// What became of one item's request.
enum Attempted {
    /// The request answered (or failed, timed out or panicked).
    Answered(Result<Value, ExecuteError>),
    /// The run was cancelled and the request abandoned after the grace period.
    Abandoned,
}

/// The outcome of executing one item, before the retry decision.
type Executed = (ItemRecord, Attempted, Value);

/// A chunk's recording under way; it borrows the processor, not the execution, so a step goes
/// on claiming and executing while it runs.
type Recording<'p> = Pin<Box<dyn Future<Output = Result<Recorded, Error>> + Send + 'p>>;

/// One executed chunk on its way to the store: its outcomes, worked out when its recording
/// starts, and what writing them needs.
struct ChunkRecord<'p> {
    processor: &'p BatchProcessor,
    run: RunRecord,
    job: batch_domain::JobId,
    outcomes: Vec<ItemOutcome>,
    /// The users whose items succeeded in this chunk, sorted, each once.
    users: Vec<UserId>,
    /// The run's counts before this chunk; `None` for an execution's first chunk.
    counts: Option<batch_domain::run::ItemCounts>,
    /// [`Execution::referenced`] before this chunk.
    referenced: Option<bool>,
    /// The execution's notes, for the first chunk's context (empty for later chunks).
    notes: Vec<String>,
    now: DateTime<Utc>,
}

/// What recording one chunk changed in its execution.
struct Recorded {
    /// The run's counts after the chunk.
    counts: batch_domain::run::ItemCounts,
    /// [`Execution::referenced`] after the chunk.
    referenced: Option<bool>,
}

impl ChunkRecord<'_> {
    /// Records the outcomes in one store call, hands the run's reference to the users whose
    /// items succeeded, keeps the counts, updates the context and publishes progress.
    ///
    /// # Errors
    /// As [`Execution::run_next_chunk`].
    async fn write(self) -> Result<Recorded, Error> {
        let ports = &self.processor.ports;
        let (run_id, owner) = (&self.run.id, &self.processor.settings.owner);
        let (now, outcomes) = (self.now, &self.outcomes);
        // The chunk was executed: its results must not be lost to a database that is briefly
        // away (restarting, say). Recording is retried while it is unavailable, up to a run
        // lease; the owner check keeps a run another processor took over from being written.
        let patience = self.processor.settings.run_lease;
        while_unavailable(&ports.clock, run_id, "recording a chunk", patience, || {
            ports.runs.record_outcomes(run_id, owner, outcomes, now)
        })
        .await?;
        let referenced = self.reference().await;
        let count = |status: ItemStatus| outcomes.iter().filter(|o| o.status == status).count();
        tracing::debug!(
            target: "batch::metrics",
            metric = "chunk",
            succeeded = count(ItemStatus::Succeeded),
            failed = count(ItemStatus::Failed),
            retried = count(ItemStatus::Pending),
        );
        // Every item of the chunk was pending when claimed; each now has its outcome's status.
        // The first chunk of an execution writes the whole context (status, notes); later ones
        // only its progress, since the context's item lists grow with the run.
        let (counts, referenced) = match self.counts {
            Some(mut counts) => {
                for outcome in outcomes {
                    counts.pending = counts.pending.saturating_sub(1);
                    counts.add(outcome.status, 1);
                }
                let progress = progress(&counts);
                let tenant = &self.run.tenant;
                // The outcomes are recorded: a progress that could not be saved is only late
                // (the next chunk saves it again, the end of the run writes exact counts), and
                // the counts must go on from this chunk's.
                let saved =
                    while_unavailable(&ports.clock, run_id, "saving progress", patience, || {
                        ports.contexts.save_progress(tenant, run_id, &progress, now)
                    })
                    .await;
                if let Err(e) = saved {
                    tracing::warn!(run = %run_id, error = %e, "the progress of a chunk was not saved");
                }
                (counts, self.referenced.map(|all| all && referenced))
            }
            None => {
                let counts = ports.runs.counts(run_id).await?;
                self.processor
                    .contexts
                    .update(&self.run, &counts, &self.notes)
                    .await?;
                // Items that succeeded before this execution began may have been recorded
                // by one that stopped before handing out their references.
                let here = u64::try_from(count(ItemStatus::Succeeded)).unwrap_or(u64::MAX);
                (counts, Some(counts.succeeded == here && referenced))
            }
        };
        self.processor.publish(ProgressEvent {
            run: run_id.clone(),
            status: RunStatus::Running,
            progress: progress(&counts),
        });
        Ok(Recorded { counts, referenced })
    }

    /// Hands the run's reference to the users whose items have just succeeded, so that a user
    /// sees the run as soon as their result exists and the end of the run need not read every
    /// succeeded item again. Returns whether it did: a failure (after waiting out a database
    /// that is briefly away) leaves the end of the run to page through the succeeded items.
    async fn reference(&self) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let (ports, run, users) = (&self.processor.ports, &self.run, &self.users);
        let patience = self.processor.settings.run_lease;
        let what = "handing out references";
        let added = while_unavailable(&ports.clock, &run.id, what, patience, || {
            ports
                .contexts
                .add_references(&run.tenant, &self.job, &run.id, users, self.now)
        })
        .await;
        if let Err(e) = &added {
            tracing::warn!(run = %run.id, error = %e, "the references of a chunk failed; the end of the run hands them out");
        }
        added.is_ok()
    }
}

/// The items one step has claimed and not yet recorded: their tasks, and what is left of each
/// chunk.
#[derive(Default)]
struct Flight {
    tasks: JoinSet<Result<Value, ExecuteError>>,
    /// Per task: its chunk, its item and the request's context.
    by_task: HashMap<tokio::task::Id, (usize, ItemRecord, Value)>,
    /// Per chunk: how many of its items are still executing.
    remaining: HashMap<usize, usize>,
    /// Per chunk: the items that have answered.
    done: HashMap<usize, Vec<Executed>>,
}

impl Flight {
    /// Items claimed and not yet answered.
    fn len(&self) -> usize {
        self.by_task.len()
    }

    fn is_empty(&self) -> bool {
        self.by_task.is_empty()
    }

    /// Takes the answer of task `id`; returns its chunk's items once the last one answered.
    fn finished(&mut self, id: tokio::task::Id, result: Attempted) -> Option<Vec<Executed>> {
        let (chunk, item, request_context) = self.by_task.remove(&id)?;
        self.done
            .entry(chunk)
            .or_default()
            .push((item, result, request_context));
        let left = self.remaining.get_mut(&chunk)?;
        *left -= 1;
        if *left > 0 {
            return None;
        }
        self.remaining.remove(&chunk);
        self.done.remove(&chunk)
    }
}

impl Drop for Execution<'_> {
    fn drop(&mut self) {
        lock(&self.processor.executing).remove(&self.run.id);
    }
}

impl<'p> Execution<'p> {
    /// The run as it was when opened.
    pub fn run(&self) -> &RunRecord {
        &self.run
    }

    fn ports(&self) -> &Ports {
        &self.processor.ports
    }

    /// Runs steps until the run ends, waiting on the clock while nothing is due.
    ///
    /// # Errors
    /// As [`Execution::run_next_chunk`].
    pub async fn run_to_completion(&mut self) -> Result<RunStatus, Error> {
        loop {
            match self.step(usize::MAX, None).await? {
                Step::Worked(_) => {}
                Step::Idle(until) => {
                    let wait = self.idle_wait(until);
                    self.ports().clock.sleep(wait).await;
                }
                Step::Finished(status) => return Ok(status),
            }
        }
    }

    /// Runs steps until the run ends (`Some(status)`) or `stop` turns true (`None`): then the
    /// chunks in flight are finished and recorded first, and the run's lease is released so
    /// another process resumes the run at once instead of waiting for the lease to expire.
    /// While the database is unavailable the run waits (backing off up to 1.6 s) and goes on
    /// when it answers again; a lease lost meanwhile ends it with `LeaseLost`.
    ///
    /// # Errors
    /// As [`Execution::run_next_chunk`].
    pub async fn run_until_stopped(
        &mut self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Option<RunStatus>, Error> {
        let mut unavailable = 0u32;
        loop {
            if *stop.borrow() {
                self.ports()
                    .runs
                    .release_lease(&self.run.id, &self.processor.settings.owner)
                    .await?;
                tracing::info!(run = %self.run.id, "lease released on shutdown");
                return Ok(None);
            }
            let step = match self.step(usize::MAX, Some(stop.clone())).await {
                Ok(step) => step,
                // A database that went away: the run is still this processor's (its lease
                // outlives a short outage), so wait and go on with it rather than leave it
                // to be rescued after the lease expires.
                Err(Error::Store(StoreError::Unavailable(why))) => {
                    tracing::warn!(run = %self.run.id, error = %why, "database unavailable; the run waits");
                    unavailable = unavailable.saturating_add(1);
                    let wait = Duration::from_millis(100 << unavailable.min(4));
                    tokio::select! {
                        () = self.ports().clock.sleep(wait) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
                Err(other) => return Err(other),
            };
            unavailable = 0;
            match step {
                Step::Worked(_) => {}
                Step::Idle(until) => {
                    let wait = self.idle_wait(until);
                    tokio::select! {
                        () = self.ports().clock.sleep(wait) => {}
                        _ = stop.changed() => {}
                    }
                }
                Step::Finished(status) => return Ok(Some(status)),
            }
        }
    }

    /// How long to wait for `until`, short enough to keep the run lease alive.
    fn idle_wait(&self, until: DateTime<Utc>) -> Duration {
        let now = self.ports().clock.now();
        (until - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(self.processor.settings.run_lease / 2)
            .max(Duration::from_millis(1))
    }

    /// One step: claim a chunk of due items, execute it, record its outcomes in one store call,
    /// publish progress. Finishes the run when nothing is pending.
    ///
    /// # Errors
    /// [`Error::Store`] with [`StoreError::LeaseLost`] when another processor took the run over
    /// (stop working on it), or when the store fails.
    pub async fn run_next_chunk(&mut self) -> Result<Step, Error> {
        self.step(1, None).await
    }

    /// One step of at most `max_chunks` chunks, pipelined: the next chunk is claimed while the
    /// current one's last requests are in flight, and a chunk is recorded once its last request
    /// answered (after the chunks that ended before it), while later chunks are claimed and
    /// execute, so the concurrency limit stays full across chunk boundaries. Claiming stops when `stop` turns true or the run is cancelled; the
    /// chunks in flight are finished and recorded before the step returns.
    async fn step(
        &mut self,
        max_chunks: usize,
        stop: Option<watch::Receiver<bool>>,
    ) -> Result<Step, Error> {
        let span = tracing::info_span!("step", run = %self.run.id, job = %self.job.id);
        tracing::Instrument::instrument(self.step_inner(max_chunks, stop), span).await
    }

    async fn step_inner(
        &mut self,
        max_chunks: usize,
        stop: Option<watch::Receiver<bool>>,
    ) -> Result<Step, Error> {
        let run_id = self.run.id.clone();
        if self.processor.is_cancelled(&run_id) || self.template_missing {
            return self.end_without_pending().await.map(Step::Finished);
        }
        // The heartbeat keeps the run (and so its items) leased however long the chunks take;
        // if the lease is lost anyway, their results are not ours to record.
        let processor = self.processor;
        let worked = tokio::select! {
            worked = self.fly(max_chunks, stop) => worked?,
            lost = processor.heartbeat(&run_id) => return Err(lost),
        };
        if worked > 0 {
            return Ok(Step::Worked(worked));
        }
        if self.processor.is_cancelled(&run_id) {
            return self.end_without_pending().await.map(Step::Finished);
        }
        let now = self.ports().clock.now();
        match self.ports().runs.next_due(&run_id).await? {
            Some(due) => Ok(Step::Idle(due.max(now))),
            None => self.finish(None).await.map(Step::Finished),
        }
    }

    /// Ends a cancelled run (or one whose template is gone, `failed`): what is still pending is
    /// cancelled.
    async fn end_without_pending(&mut self) -> Result<RunStatus, Error> {
        let status = if self.template_missing && !self.processor.is_cancelled(&self.run.id) {
            RunStatus::Failed
        } else {
            RunStatus::Cancelled
        };
        self.ports()
            .runs
            .cancel_pending(&self.run.id, self.ports().clock.now())
            .await?;
        self.finish(Some(status)).await
    }

    /// Claims and executes up to `max_chunks` chunks, keeping a chunk and twice the concurrency
    /// limit of items claimed ahead (so a slow claim or record does not starve the requests),
    /// and records each chunk when its last item answered. Recording runs beside the claims
    /// (one chunk at a time, in the order the chunks ended, so progress only grows): the two
    /// round trips to the store overlap instead of taking turns. Chunks waiting to be recorded
    /// are bounded like the items claimed ahead. Returns how many items were
    /// executed and recorded: 0 when nothing was due (or the run is cancelled or stopping).
    async fn fly(
        &mut self,
        max_chunks: usize,
        mut stop: Option<watch::Receiver<bool>>,
    ) -> Result<usize, Error> {
        let run_id = self.run.id.clone();
        let owner = self.processor.settings.owner.clone();
        let concurrency = usize::try_from(self.job.execution.concurrency)
            .unwrap_or(1)
            .max(1);
        let chunk_size = usize::try_from(self.job.execution.chunk_size).unwrap_or(1);
        let mut flight = Flight::default();
        let mut claimed = 0;
        let mut renewed_at = None;
        let mut claiming = true;
        let mut worked = 0;
        let mut cancel = self.processor.cancel_signal.subscribe();
        let grace = self.processor.settings.cancel_grace;
        let clock = self.ports().clock.clone();
        let mut deadline: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
        // Chunks whose items have all answered, waiting to be recorded, and the one being
        // recorded.
        let mut unrecorded: VecDeque<Vec<Executed>> = VecDeque::new();
        let mut recording: Option<Recording<'p>> = None;
        // The positions of the items claimed and not yet recorded, and of those the recording
        // under way writes: the store still has them pending, so claims leave them out.
        let mut held: BTreeSet<i64> = BTreeSet::new();
        let mut being_recorded: Vec<i64> = Vec::new();
        loop {
            if recording.is_none()
                && let Some(done) = unrecorded.pop_front()
            {
                being_recorded = done.iter().map(|(item, _, _)| item.seq).collect();
                let record = self.chunk_record(done);
                // Until the recording says otherwise, this chunk's users may lack the run's
                // reference: a recording that fails half-way leaves the end of the run to
                // page through the succeeded items.
                if !record.users.is_empty() {
                    self.referenced = Some(false);
                }
                recording = Some(Box::pin(record.write()));
            }
            let cancelled = self.processor.is_cancelled(&run_id);
            let stopping = stop.as_ref().is_some_and(|s| *s.borrow());
            if cancelled && deadline.is_none() && !flight.is_empty() {
                let clock = clock.clone();
                deadline = Some(Box::pin(async move { clock.sleep(grace).await }));
            }
            // Chunks waiting to be recorded count against claiming too: when the store records
            // more slowly than the requests answer, claims wait for it rather than hold ever
            // more items in memory.
            let ahead = chunk_size + 2 * concurrency;
            let backlog: usize = unrecorded.iter().map(Vec::len).sum();
            if claiming
                && !cancelled
                && !stopping
                && claimed < max_chunks
                && flight.len() < ahead
                && backlog < ahead
            {
                let claim = self.claim(&run_id, &owner, chunk_size, &mut renewed_at, &held);
                // The chunk being recorded goes on meanwhile; its answer is taken in once the
                // claim has answered too.
                let mut recorded = None;
                let claim = match recording.as_mut() {
                    None => claim.await,
                    Some(writing) => {
                        tokio::pin!(claim);
                        tokio::select! {
                            claim = &mut claim => claim,
                            written = writing => {
                                recorded = Some(written);
                                claim.await
                            }
                        }
                    }
                };
                if let Some(written) = recorded {
                    recording = None;
                    self.apply(written?, &mut being_recorded, &mut held);
                }
                match claim {
                    Ok(Some(chunk)) => {
                        claimed += 1;
                        flight.remaining.insert(claimed, chunk.len());
                        held.extend(chunk.iter().map(|item| item.seq));
                        for item in chunk {
                            self.spawn_item(&mut flight, claimed, item);
                        }
                    }
                    Ok(None) => claiming = false,
                    // With items in flight or unrecorded, a failed claim waits for the next
                    // step: the items' results are recorded first.
                    Err(e)
                        if !flight.is_empty() || recording.is_some() || !unrecorded.is_empty() =>
                    {
                        tracing::warn!(run = %run_id, error = %e, "claiming ahead failed");
                        claiming = false;
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            if flight.is_empty() && recording.is_none() {
                return Ok(worked);
            }
            let joined = tokio::select! {
                joined = flight.tasks.join_next_with_id(), if !flight.is_empty() => joined,
                written = async { if let Some(w) = recording.as_mut() { w.await } else { std::future::pending().await } }, if recording.is_some() => {
                    recording = None;
                    self.apply(written?, &mut being_recorded, &mut held);
                    continue;
                }
                changed = cancel.changed(), if deadline.is_none() => {
                    if changed.is_err() {
                        // The processor is gone; nothing will cancel any more.
                        cancel = watch::channel(0).1;
                    }
                    continue;
                }
                () = async { if let Some(d) = deadline.as_mut() { d.await } }, if deadline.is_some() => {
                    flight.tasks.abort_all();
                    deadline = Some(Box::pin(std::future::pending()));
                    continue;
                }
                changed = async { match stop.as_mut() { Some(s) => s.changed().await, None => std::future::pending().await } }, if !stopping && stop.is_some() => {
                    if changed.is_err() {
                        stop = None;
                    }
                    continue;
                }
            };
            let Some(joined) = joined else { continue };
            let (id, result) = match joined {
                Ok((id, result)) => (id, Attempted::Answered(result)),
                Err(e) if e.is_panic() => (
                    e.id(),
                    Attempted::Answered(Err(ExecuteError {
                        kind: FailureKind::Permanent,
                        message: "the item's execution panicked".to_owned(),
                    })),
                ),
                Err(e) => (e.id(), Attempted::Abandoned),
            };
            if let Some(done) = flight.finished(id, result) {
                worked += done.len();
                unrecorded.push_back(done);
            }
        }
    }

    /// Renews the run lease (unless `renewed_at` is less than [`RENEW_EVERY`] ago) and claims the
    /// next chunk of due items; `None` when nothing is due. The run's lease covers its items, so
    /// claiming is reading: `held` (what this step is executing or has still to record) is
    /// left out of the reads that start behind the cursor. With nothing held the claim sweeps
    /// from the start, which also takes the items a step that failed with requests in flight
    /// left pending. A cancel requested through the store (by another replica, say) is passed
    /// on to the processor, and nothing is claimed.
    async fn claim(
        &mut self,
        run_id: &RunId,
        owner: &str,
        chunk_size: usize,
        renewed_at: &mut Option<DateTime<Utc>>,
        held: &BTreeSet<i64>,
    ) -> Result<Option<Vec<ItemRecord>>, Error> {
        let now = self.ports().clock.now();
        let renew_every = chrono_duration(RENEW_EVERY);
        if renewed_at.is_none_or(|at| now - at >= renew_every) {
            let cancel_requested = self
                .ports()
                .runs
                .renew_lease(
                    run_id,
                    owner,
                    now + chrono_duration(self.processor.settings.run_lease),
                )
                .await?;
            *renewed_at = Some(now);
            if cancel_requested {
                self.processor.cancel(run_id);
                return Ok(None);
            }
        }
        let sweep = held.is_empty()
            || self
                .cursor
                .swept_at
                .is_none_or(|at| now - at >= chrono_duration(SWEEP_EVERY));
        let mut after = if sweep { 0 } else { self.cursor.after };
        loop {
            // Everything held lies at or before the cursor: only a read from the start needs
            // to leave it out.
            let skip: Vec<i64> = if after == 0 {
                held.iter().copied().collect()
            } else {
                Vec::new()
            };
            let chunk = self
                .ports()
                .runs
                .due_items(run_id, now, after, &skip, chunk_size)
                .await?;
            if after == 0 {
                self.cursor.swept_at = Some(now);
            }
            if let Some(last) = chunk.last() {
                self.cursor.after = self.cursor.after.max(last.seq);
                return Ok(Some(chunk));
            }
            if after == 0 {
                return Ok(None);
            }
            // The end of the run: what is left is behind the cursor.
            after = 0;
        }
    }

    /// Works out the outcomes of one executed chunk and what writing them needs
    /// ([`ChunkRecord::write`]); [`Execution::apply`] takes the answer back.
    fn chunk_record(&self, executed: Vec<Executed>) -> ChunkRecord<'p> {
        let now = self.ports().clock.now();
        let mut users = Vec::new();
        let outcomes: Vec<ItemOutcome> = executed
            .into_iter()
            .map(|(item, result, request_context)| {
                let user = item.user.clone();
                let outcome = self.outcome(item, result, request_context, now);
                if outcome.status == ItemStatus::Succeeded {
                    users.extend(user);
                }
                outcome
            })
            .collect();
        users.sort();
        users.dedup();
        ChunkRecord {
            processor: self.processor,
            run: self.run.clone(),
            job: self.job.id.clone(),
            outcomes,
            users,
            counts: self.counts,
            referenced: self.referenced,
            notes: if self.counts.is_none() {
                self.notes.clone()
            } else {
                Vec::new()
            },
            now,
        }
    }

    /// Takes in what recording a chunk changed: the counts, and whether the references are
    /// still all handed out. The chunk's items (`chunk`) are no longer held: the store has
    /// their outcomes.
    fn apply(&mut self, recorded: Recorded, chunk: &mut Vec<i64>, held: &mut BTreeSet<i64>) {
        for seq in chunk.drain(..) {
            held.remove(&seq);
        }
        self.counts = Some(recorded.counts);
        self.referenced = recorded.referenced;
    }

    /// Builds the request of one item: the template is the item's preference override or the
    /// job's; parameters are the template's defaults overlaid with the item's.
    fn request(&self, item: &ItemRecord) -> Request {
        let template = item
            .payload
            .get("template")
            .and_then(Value::as_str)
            .and_then(|t| TemplateId::parse(t).ok())
            .unwrap_or_else(|| self.job.template.clone());
        let mut parameters = self.parameter_defaults.clone();
        if let Some(Value::Object(own)) = item.payload.get("parameters") {
            parameters.extend(own.clone());
        }
        Request {
            idempotency_key: format!("{}:{}", self.run.id, item.key),
            tenant: self.job.tenant.clone(),
            user: item.user.clone(),
            template,
            template_version: None,
            payload: item.payload.clone(),
            parameters,
            timeout: Some(self.job.execution.timeout),
        }
    }

    /// Starts one item of chunk `chunk` under the concurrency and rate limits. A panicking item
    /// is contained (its task fails) and reported as a permanent failure of that item alone.
    fn spawn_item(&self, flight: &mut Flight, chunk: usize, item: ItemRecord) {
        let timeout = self.job.execution.timeout;
        let request = self.request(&item);
        let request_context = json!({
            "idempotency_key": request.idempotency_key,
            "template": request.template.as_str(),
            "parameters": request.parameters,
            "attempt": item.attempts + 1,
        });
        let executor = self.ports().executor.clone();
        let semaphore = self.semaphore.clone();
        let limiter = self.limiter.clone();
        let span = tracing::debug_span!("item", key = %item.key, attempt = item.attempts + 1);
        let handle = flight.tasks.spawn(tracing::Instrument::instrument(
            async move {
                match semaphore.acquire_owned().await {
                    Ok(_permit) => {
                        if let Some(limiter) = &limiter {
                            limiter.until_ready().await;
                        }
                        match tokio::time::timeout(timeout, executor.execute(request)).await {
                            Ok(result) => result,
                            Err(_) => Err(ExecuteError {
                                kind: FailureKind::Retryable,
                                message: format!("timed out after {} ms", timeout.as_millis()),
                            }),
                        }
                    }
                    Err(_) => Err(ExecuteError {
                        kind: FailureKind::Retryable,
                        message: "the processor is shutting down".to_owned(),
                    }),
                }
            },
            span,
        ));
        flight
            .by_task
            .insert(handle.id(), (chunk, item, request_context));
    }

    fn outcome(
        &self,
        item: ItemRecord,
        result: Attempted,
        request_context: Value,
        now: DateTime<Utc>,
    ) -> ItemOutcome {
        // A request that was not made (the breaker is open) costs no attempt.
        let not_attempted = matches!(
            &result,
            Attempted::Answered(Err(ExecuteError {
                kind: FailureKind::NotAttempted { .. },
                ..
            }))
        );
        let attempts = if not_attempted {
            item.attempts
        } else {
            item.attempts + 1
        };
        let (status, next_attempt_at, error, result) = match result {
            Attempted::Answered(Ok(value)) => (ItemStatus::Succeeded, None, None, Some(value)),
            Attempted::Abandoned => (
                ItemStatus::Cancelled,
                None,
                Some("abandoned: the run was cancelled while the request was in flight".to_owned()),
                None,
            ),
            Attempted::Answered(Err(e)) => match self.processor.decide(&self.job, attempts, e.kind)
            {
                Decision::RetryAfter(delay) => (
                    ItemStatus::Pending,
                    Some(now + chrono_duration(delay)),
                    Some(e.message),
                    None,
                ),
                Decision::GiveUp => (ItemStatus::Failed, None, Some(e.message), None),
            },
        };
        ItemOutcome {
            key: item.key,
            status,
            attempts,
            next_attempt_at,
            error,
            result,
            request_context: Some(request_context),
        }
    }

    /// Distributes, ends the run and publishes its last progress. `status` overrides the status
    /// that follows from the counts (cancelled, failed).
    async fn finish(&mut self, status: Option<RunStatus>) -> Result<RunStatus, Error> {
        let run_id = self.run.id.clone();
        let counts = self.ports().runs.counts(&run_id).await?;
        let status = status.unwrap_or_else(|| counts.final_status());
        if matches!(
            status,
            RunStatus::Succeeded | RunStatus::CompletedWithFailures
        ) {
            // Deliveries can take a while: the heartbeat keeps the run leased meanwhile, so no
            // other processor finishes (and distributes) it a second time.
            let note = tokio::select! {
                note = self.distribute() => note?,
                lost = self.processor.heartbeat(&self.run.id) => return Err(lost),
            };
            self.notes.extend(note);
        }
        let now = self.ports().clock.now();
        match self
            .ports()
            .runs
            .finish_run(&run_id, &self.processor.settings.owner, status, now)
            .await
        {
            Ok(()) => {}
            // Another processor finished it first: its record wins.
            Err(StoreError::LeaseLost(_)) => {}
            Err(other) => return Err(other.into()),
        }
        self.run = self.ports().runs.run(&self.job.tenant, &run_id).await?;
        self.processor
            .contexts
            .update(&self.run, &counts, &self.notes)
            .await?;
        self.processor.contexts.merge_into_parent(&self.run).await?;
        self.processor.publish(ProgressEvent {
            run: run_id,
            status: self.run.status,
            progress: progress(&counts),
        });
        tracing::info!(run = %self.run.id, status = %self.run.status, "run finished");
        if let Some(finished) = self.run.finished_at {
            tracing::debug!(
                target: "batch::metrics",
                metric = "run",
                seconds = (finished - self.run.created_at).as_seconds_f64(),
                status = %self.run.status,
            );
        }
        Ok(self.run.status)
    }

    /// References for the job's distribution users and, unless every chunk has handed out its
    /// own already ([`ChunkRecord::reference`]), for every user whose own item succeeded; then
    /// the optional delivery to the distribution users.
    async fn distribute(&self) -> Result<Option<String>, Error> {
        let ports = self.ports().clone();
        let now = ports.clock.now();
        // Page by page, so a large run's users are never all in memory; a user keeps one
        // reference per run however often it is added.
        let mut users: Vec<UserId> = self.job.distribution.users.clone();
        let mut after = None;
        let page_through = self.referenced != Some(true);
        loop {
            users.sort();
            users.dedup();
            if !users.is_empty() {
                ports
                    .contexts
                    .add_references(&self.job.tenant, &self.job.id, &self.run.id, &users, now)
                    .await?;
            }
            if !page_through {
                break;
            }
            let page = ports
                .runs
                .list_items(
                    &self.job.tenant,
                    &self.run.id,
                    Some(ItemStatus::Succeeded),
                    after,
                    1_000,
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            users = page.into_iter().filter_map(|i| i.user).collect();
        }
        let Some(template) = self.job.distribution.delivery_template.clone() else {
            return Ok(None);
        };
        let counts = ports.runs.counts(&self.run.id).await?;
        let mut failed = 0;
        for user in &self.job.distribution.users {
            let request = Request {
                idempotency_key: format!("{}:deliver:{user}", self.run.id),
                tenant: self.job.tenant.clone(),
                user: Some(user.clone()),
                template: template.clone(),
                template_version: None,
                payload: json!({
                    "run_id": self.run.id.as_str(),
                    "job_id": self.job.id.as_str(),
                    "succeeded": counts.succeeded,
                    "failed": counts.failed,
                }),
                parameters: Map::new(),
                timeout: Some(self.job.execution.timeout),
            };
            if ports.executor.execute(request).await.is_err() {
                failed += 1;
            }
        }
        Ok((failed > 0).then(|| format!("delivery of the reference failed for {failed} users")))
    }
}
