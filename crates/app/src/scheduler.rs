//! The BatchScheduler (static schedules): turns each enabled job's schedule into occurrences
//! at the right instants, exactly once across replicas and restarts.
//!
//! Every tick takes the schedules whose next fire has come from an ordered index (so idle ticks
//! cost nothing however many schedules there are), decides what to fire with the job's misfire
//! policy ([`batch_domain::misfire::due_fires`]), creates each occurrence under its unique key
//! (job, nominal instant, group) and the occurrence's run, then moves the durable schedule state
//! on with a compare-and-set. A replica that loses a race finds the occurrence (and its run)
//! existing and only moves on; a crash between the occurrence and its run is repaired by the next
//! tick, which sees the occurrence without a run and creates it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use batch_domain::JobId;
use batch_domain::config::{Job, Overlap};
use batch_domain::misfire::due_fires;
use batch_domain::run::{RunId, RunStatus};
use batch_ports::runs::{Occurrence, RunStore, StoreError};
use batch_ports::schedules::{ScheduleState, ScheduleStore};
use chrono::{DateTime, Duration, Utc};
use tokio::sync::Mutex;

use crate::Error;
use crate::processor::BatchProcessor;
use crate::strategy::Scope;

/// One occurrence a tick fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The job.
    pub job: JobId,
    /// The nominal instant.
    pub nominal: DateTime<Utc>,
    /// The run this tick created; `None` when another replica (or an earlier tick) had.
    pub run: Option<RunId>,
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Occurrences fired, in order.
    pub fired: Vec<Fired>,
    /// Due instants dropped by misfire policies.
    pub dropped: usize,
}

/// The next fire of one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextFire {
    /// The job.
    pub job: JobId,
    /// Its next nominal instant.
    pub nominal: DateTime<Utc>,
    /// When it actually fires (jitter applied).
    pub fire_at: DateTime<Utc>,
}

/// Where a schedule stands: its next unfired nominal instant and its last fired one.
type Position = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// In-memory view of the schedules: next nominal instant per job, and due order.
#[derive(Default)]
struct Index {
    next: HashMap<JobId, Position>,
    due: BTreeSet<(DateTime<Utc>, JobId)>,
}

/// Fires the static schedules of a set of jobs.
pub struct BatchScheduler {
    processor: Arc<BatchProcessor>,
    runs: Arc<dyn RunStore>,
    schedules: Arc<dyn ScheduleStore>,
    jobs: HashMap<JobId, Job>,
    index: Mutex<Option<Index>>,
}

impl BatchScheduler {
    /// A scheduler for the enabled jobs of `jobs` that have a schedule of their own. Dynamic
    /// (preference) jobs are fired by their preference groups, not here.
    pub fn new(
        processor: Arc<BatchProcessor>,
        runs: Arc<dyn RunStore>,
        schedules: Arc<dyn ScheduleStore>,
        jobs: &[Job],
    ) -> Self {
        let jobs = jobs
            .iter()
            .filter(|j| j.enabled && j.schedule.is_some() && j.dynamic.is_none())
            .map(|j| (j.id.clone(), j.clone()))
            .collect();
        BatchScheduler {
            processor,
            runs,
            schedules,
            jobs,
            index: Mutex::new(None),
        }
    }

    fn fire_at(&self, job: &Job, nominal: DateTime<Utc>) -> DateTime<Utc> {
        job.schedule
            .as_ref()
            .map_or(nominal, |s| s.fire_at(job.id.as_str(), nominal))
    }

    /// Reads the durable states, and starts the schedules that have none (or whose stored
    /// next instant no longer belongs to the job's schedule) at their first instant from `now`.
    async fn load(&self, now: DateTime<Utc>) -> Result<Index, Error> {
        let stored: HashMap<JobId, ScheduleState> = self
            .schedules
            .schedule_states()
            .await?
            .into_iter()
            .filter(|s| s.group.is_empty())
            .map(|s| (s.job.clone(), s))
            .collect();
        let mut index = Index::default();
        for job in self.jobs.values() {
            let Some(schedule) = &job.schedule else {
                continue;
            };
            let state = match stored.get(&job.id) {
                Some(state)
                    if state.next_nominal.is_none_or(|n| {
                        schedule.next_nominal(n - Duration::milliseconds(1)) == Some(n)
                    }) =>
                {
                    state.clone()
                }
                stale => {
                    let fresh = ScheduleState {
                        job: job.id.clone(),
                        group: String::new(),
                        tenant: job.tenant.clone(),
                        next_nominal: schedule.next_nominal(now - Duration::milliseconds(1)),
                        last_fired: stale.and_then(|s| s.last_fired),
                    };
                    let expected = stale.map(|s| s.next_nominal);
                    if self
                        .schedules
                        .advance_schedule(expected, &fresh, now)
                        .await?
                    {
                        fresh
                    } else {
                        // Another replica wrote it first: take theirs.
                        self.reload(&job.id).await?.unwrap_or(fresh)
                    }
                }
            };
            self.insert(&mut index, job, state.next_nominal, state.last_fired);
        }
        Ok(index)
    }

    async fn reload(&self, job: &JobId) -> Result<Option<ScheduleState>, Error> {
        Ok(self
            .schedules
            .schedule_states()
            .await?
            .into_iter()
            .find(|s| &s.job == job && s.group.is_empty()))
    }

    fn insert(
        &self,
        index: &mut Index,
        job: &Job,
        next: Option<DateTime<Utc>>,
        last: Option<DateTime<Utc>>,
    ) {
        if let Some(n) = next {
            index.due.insert((self.fire_at(job, n), job.id.clone()));
        }
        index.next.insert(job.id.clone(), (next, last));
    }

    /// Fires everything due at `now`.
    ///
    /// # Errors
    /// [`Error::Store`] when the store fails; the schedule being fired stays due and the next
    /// tick tries it again (occurrences already created are not created twice).
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<TickReport, Error> {
        let mut guard = self.index.lock().await;
        if guard.is_none() {
            *guard = Some(self.load(now).await?);
        }
        let Some(index) = guard.as_mut() else {
            return Ok(TickReport::default());
        };
        let mut report = TickReport::default();
        while let Some((fire_at, job_id)) = index.due.first().cloned() {
            if fire_at > now {
                break;
            }
            index.due.pop_first();
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            let (next, last) = index.next.get(&job_id).copied().unwrap_or((None, None));
            match self.fire(job, next, last, now, &mut report).await {
                Ok((next, last)) => self.insert(index, job, next, last),
                Err(e) => {
                    // Keep it due; the next tick tries again.
                    self.insert(index, job, next, last);
                    return Err(e);
                }
            }
        }
        Ok(report)
    }

    /// Fires one due schedule and moves its state on; returns its new (next, last fired).
    async fn fire(
        &self,
        job: &Job,
        next: Option<DateTime<Utc>>,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<Position, Error> {
        let (Some(schedule), Some(next_nominal)) = (&job.schedule, next) else {
            return Ok((next, last));
        };
        let due = due_fires(schedule, job.id.as_str(), next_nominal, now, job.misfire);
        report.dropped += due.dropped;
        let mut fired = Vec::with_capacity(due.fire.len());
        for nominal in &due.fire {
            if !self.overlap_allows(job, *nominal).await? {
                report.dropped += 1;
                continue;
            }
            fired.push(*nominal);
            let occurrence = match self
                .runs
                .create_occurrence(&job.id, &job.tenant, *nominal, "")
                .await?
            {
                Occurrence::Created(id) | Occurrence::Existed(id) => id,
            };
            let run = if self.runs.run_for_occurrence(occurrence).await?.is_some() {
                None
            } else {
                match self
                    .processor
                    .start_occurrence(job, occurrence, *nominal, &Scope::default())
                    .await
                {
                    Ok(run) => Some(run.id),
                    Err(Error::Store(StoreError::AlreadyExists(_))) => None,
                    Err(e) => return Err(e),
                }
            };
            report.fired.push(Fired {
                job: job.id.clone(),
                nominal: *nominal,
                run,
            });
        }
        let state = ScheduleState {
            job: job.id.clone(),
            group: String::new(),
            tenant: job.tenant.clone(),
            next_nominal: due.next,
            last_fired: fired.last().copied().or(last),
        };
        if self
            .schedules
            .advance_schedule(Some(next), &state, now)
            .await?
        {
            Ok((state.next_nominal, state.last_fired))
        } else {
            // Another replica moved it on first; follow it.
            Ok(self
                .reload(&job.id)
                .await?
                .map_or((state.next_nominal, state.last_fired), |s| {
                    (s.next_nominal, s.last_fired)
                }))
        }
    }

    /// Applies the job's overlap policy to a fire about to happen: whether it may create its
    /// run. `cancel_other` asks the job's unfinished runs to stop; `buffer_one` keeps one run
    /// waiting; `skip` fires only when nothing else of the job is unfinished. The runs themselves
    /// wait their turn at claim time (serial runs), except under `allow_all`.
    async fn overlap_allows(&self, job: &Job, nominal: DateTime<Utc>) -> Result<bool, Error> {
        if job.overlap == Overlap::AllowAll || job.overlap == Overlap::BufferAll {
            return Ok(true);
        }
        // The run of this very fire (created before a crash, or by another replica) is not an
        // other run: it must neither block nor be cancelled by its own fire.
        let active: Vec<_> = self
            .runs
            .active_runs(&job.id)
            .await?
            .into_iter()
            .filter(|r| r.scheduled_for != Some(nominal))
            .collect();
        Ok(match job.overlap {
            Overlap::Skip => active.is_empty(),
            Overlap::BufferOne => !active.iter().any(|r| r.status == RunStatus::Queued),
            Overlap::CancelOther => {
                for run in &active {
                    self.runs.request_cancel(&run.id).await?;
                }
                true
            }
            Overlap::AllowAll | Overlap::BufferAll => true,
        })
    }

    /// The next fire of every schedule, soonest first.
    ///
    /// # Errors
    /// [`Error::Store`] when the states cannot be loaded.
    pub async fn next_fires(&self, now: DateTime<Utc>) -> Result<Vec<NextFire>, Error> {
        let mut guard = self.index.lock().await;
        if guard.is_none() {
            *guard = Some(self.load(now).await?);
        }
        Ok(guard
            .as_ref()
            .map(|index| {
                index
                    .due
                    .iter()
                    .filter_map(|(fire_at, job)| {
                        index
                            .next
                            .get(job)
                            .and_then(|(next, _)| *next)
                            .map(|nominal| NextFire {
                                job: job.clone(),
                                nominal,
                                fire_at: *fire_at,
                            })
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Ticks until `stop` turns true, sleeping on the clock until the next fire (at most
    /// `max_wait` at a time).
    ///
    /// # Errors
    /// The first error of a tick; the caller decides whether to start again.
    pub async fn run_until_stopped(
        &self,
        clock: Arc<dyn batch_ports::Clock>,
        max_wait: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Error> {
        while !*stop.borrow() {
            let now = clock.now();
            self.tick(now).await?;
            let wait = self
                .next_fires(now)
                .await?
                .first()
                .and_then(|n| (n.fire_at - clock.now()).to_std().ok())
                .unwrap_or(max_wait)
                .min(max_wait);
            tokio::select! {
                () = clock.sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
        Ok(())
    }
}
