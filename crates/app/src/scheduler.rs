//! The BatchScheduler: turns schedules into occurrences at the right instants, exactly once
//! across replicas and restarts.
//!
//! A *schedule* is a job's own schedule (group `""`), or one *preference group* of a Dynamic
//! job: the job's users whose preferences resolve to the same schedule, keyed by that
//! schedule's text (`daily at 09:00 Europe/Berlin`). Users are regrouped as their preferences
//! change, which the scheduler watches at every tick (the source's change watermark), so a
//! change applies at the next tick — before the next fire of either group.
//!
//! Every tick applies preference changes, refreshes the paused jobs, then takes the schedules
//! whose next fire has come from an ordered index (so an idle tick costs the same however many
//! schedules there are), decides what to fire with the job's misfire policy
//! ([`batch_domain::misfire::due_fires`]) and overlap policy, creates each occurrence under its
//! unique key (job, nominal instant, group) and the occurrence's run, then moves the durable
//! schedule state on with a compare-and-set. A replica that loses a race finds the occurrence
//! (and its run) existing and only moves on; a crash between the occurrence and its run is
//! repaired by the next tick, which sees the occurrence without a run and creates it, even
//! when the tick comes so late that the misfire policy would pass over that instant: the
//! occurrence records that the instant was fired.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use batch_domain::config::{Job, Misfire, Overlap};
use batch_domain::misfire::{ON_TIME, due_fires};
use batch_domain::preference::{Preference, PreferenceDefaults};
use batch_domain::run::{RunId, RunStatus, Trigger};
use batch_domain::{FeatureType, JobId, Schedule, TenantId, UserId};
use batch_ports::runs::{Occurrence, StoreError};
use batch_ports::schedules::{Pause, ScheduleState, ScheduleStore};
use chrono::{DateTime, Duration, Utc};
use tokio::sync::Mutex;

use crate::Error;
use crate::catalog::JobCatalog;
use crate::processor::BatchProcessor;
use crate::strategy::Scope;

/// The most instants one backfill may create runs for.
pub const MAX_BACKFILL: usize = 1_000;

/// One occurrence a tick fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The job.
    pub job: JobId,
    /// The preference group; empty for the job's own schedule.
    pub group: String,
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
    /// Due instants dropped by misfire and overlap policies.
    pub dropped: usize,
    /// Due instants not fired because their job is paused.
    pub paused: usize,
    /// Preference changes applied.
    pub preference_changes: usize,
    /// Schedules whose fire failed (job, group and error); they stay due and are tried again
    /// at the next tick, after the others.
    pub failed: Vec<String>,
}

/// The next fire of one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextFire {
    /// The job.
    pub job: JobId,
    /// The job's tenant.
    pub tenant: TenantId,
    /// The feature type of a Dynamic job.
    pub feature_type: Option<FeatureType>,
    /// The preference group; empty for the job's own schedule.
    pub group: String,
    /// The schedule, in words.
    pub schedule: String,
    /// Users of a preference group (0 for a job's own schedule).
    pub users: usize,
    /// Its next nominal instant.
    pub nominal: DateTime<Utc>,
    /// When it actually fires (jitter applied).
    pub fire_at: DateTime<Utc>,
    /// The note of the pause, when the job is paused (the fire will not happen).
    pub paused: Option<String>,
}

/// Which schedules [`BatchScheduler::next_fires`] reports; every field narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FireFilter {
    /// Only this job.
    pub job: Option<JobId>,
    /// Only jobs of this tenant.
    pub tenant: Option<TenantId>,
    /// Only Dynamic jobs of this feature type.
    pub feature_type: Option<FeatureType>,
    /// Only the preference groups this user belongs to.
    pub user: Option<UserId>,
}

/// What a backfill did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backfill {
    /// Runs created, oldest instant first.
    pub created: Vec<RunId>,
    /// Instants whose occurrence had a run already (fired, or backfilled before).
    pub existed: usize,
}

/// A schedule the scheduler fires. The group's text is shared, not copied, with every user
/// of the group in [`Members::group_of`]: a job may have a million users.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    job: JobId,
    group: Arc<str>,
}

impl Key {
    /// The key of `job`'s own schedule (group `""`).
    fn own(job: &JobId) -> Self {
        Key {
            job: job.clone(),
            group: Arc::from(""),
        }
    }
}

/// One schedule in memory: where it stands, and for a preference group its users.
struct Unit {
    schedule: Schedule,
    next: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
    users: BTreeSet<UserId>,
}

impl Unit {
    /// Whom a fire of this schedule (under `key`) runs for: a preference group's own users,
    /// or the job's whole source for its own schedule.
    fn scope(&self, key: &Key) -> Scope {
        Scope {
            users: (!key.group.is_empty())
                .then(|| self.users.iter().cloned().collect::<HashSet<_>>()),
            ..Scope::default()
        }
    }
}

/// The users of one Dynamic job, by group, and how far its change feed has been read.
///
/// Users are ordered: changes are applied in user order, and a first read of a million users
/// builds the map in one sequential pass.
#[derive(Default)]
struct Members {
    loaded: bool,
    watermark: u64,
    group_of: BTreeMap<UserId, Arc<str>>,
}

/// In-memory view of every schedule, with the due order.
#[derive(Default)]
struct Index {
    /// The catalog version the index was built from.
    version: u64,
    units: HashMap<Key, Unit>,
    due: BTreeSet<(DateTime<Utc>, Key)>,
    members: HashMap<JobId, Members>,
    paused: HashMap<JobId, Pause>,
}

/// Fires the static schedules and preference groups of a set of jobs.
pub struct BatchScheduler {
    processor: Arc<BatchProcessor>,
    schedules: Arc<dyn ScheduleStore>,
    catalog: Arc<JobCatalog>,
    index: Mutex<Option<Index>>,
}

/// The jitter key of a schedule: the job id, with the group for preference groups.
fn jitter_key(key: &Key) -> String {
    if key.group.is_empty() {
        key.job.to_string()
    } else {
        format!("{}#{}", key.job, key.group)
    }
}

fn fire_at(key: &Key, schedule: &Schedule, nominal: DateTime<Utc>) -> DateTime<Utc> {
    schedule.fire_at(&jitter_key(key), nominal)
}

/// Whether `nominal` is an instant of `schedule` (a stored state may belong to an older
/// version of the schedule).
fn belongs(schedule: &Schedule, nominal: DateTime<Utc>) -> bool {
    schedule.next_nominal(nominal - Duration::milliseconds(1)) == Some(nominal)
}

/// The schedule `preference` fires on with the job's `defaults`; `None` for a disabled
/// preference or one without any schedule.
fn schedule_of(preference: &Preference, defaults: &PreferenceDefaults) -> Option<Schedule> {
    preference
        .enabled
        .then(|| preference.schedule(defaults).0)
        .flatten()
}

/// The preference groups met in one read of a Dynamic job's preferences: each distinct
/// schedule once, with its key. Users sharing a schedule share its group, so the schedule's
/// text (the group's durable name) is formatted once per schedule, not once per user.
struct Groups {
    job: JobId,
    slots: HashMap<Schedule, usize>,
    groups: Vec<(Key, Schedule)>,
}

impl Groups {
    /// No groups yet, of `job`.
    fn new(job: &JobId) -> Self {
        Groups {
            job: job.clone(),
            slots: HashMap::new(),
            groups: Vec::new(),
        }
    }

    /// The slot of `schedule`'s group, numbered in the order groups are first met.
    fn slot(&mut self, schedule: Schedule) -> usize {
        let next = self.groups.len();
        *self.slots.entry(schedule).or_insert_with_key(|schedule| {
            self.groups.push((
                Key {
                    job: self.job.clone(),
                    group: Arc::from(schedule.to_string()),
                },
                schedule.clone(),
            ));
            next
        })
    }

    /// The user of each of `preferences` (latest per user, ordered by user) with the slot of
    /// their group, in the same order; users without a schedule are left out.
    fn assign(
        &mut self,
        preferences: Vec<Preference>,
        defaults: &PreferenceDefaults,
    ) -> Vec<(UserId, usize)> {
        preferences
            .into_iter()
            .filter_map(|preference| {
                let schedule = schedule_of(&preference, defaults)?;
                Some((preference.user, self.slot(schedule)))
            })
            .collect()
    }

    /// How many groups there are.
    fn len(&self) -> usize {
        self.groups.len()
    }

    /// The key and schedule of the group in `slot`.
    fn get(&self, slot: usize) -> (&Key, &Schedule) {
        let (key, schedule) = &self.groups[slot];
        (key, schedule)
    }
}

/// The last change of each user in `changes` (later changes of a user win), ordered by user.
fn latest_per_user(changes: Vec<Preference>) -> Vec<Preference> {
    // A full read usually lists every user once, in order: nothing to do.
    if changes.is_sorted_by(|a, b| a.user < b.user) {
        return changes;
    }
    // Sort positions rather than the (large) preferences; the sort is stable, so each user's
    // changes stay in feed order and the last of them is kept.
    let mut order: Vec<usize> = (0..changes.len()).collect();
    order.sort_by(|&a, &b| changes[a].user.cmp(&changes[b].user));
    order.dedup_by(|later, kept| {
        let same = changes[*later].user == changes[*kept].user;
        if same {
            *kept = *later;
        }
        same
    });
    let mut slots: Vec<Option<Preference>> = changes.into_iter().map(Some).collect();
    order.iter().filter_map(|&i| slots[i].take()).collect()
}

impl Index {
    fn insert(&mut self, key: Key, unit: Unit) {
        if let Some(old) = self.units.remove(&key)
            && let Some(next) = old.next
        {
            self.due
                .remove(&(fire_at(&key, &old.schedule, next), key.clone()));
        }
        if let Some(next) = unit.next {
            self.due
                .insert((fire_at(&key, &unit.schedule, next), key.clone()));
        }
        self.units.insert(key, unit);
    }

    fn remove(&mut self, key: &Key) -> Option<Unit> {
        let unit = self.units.remove(key)?;
        if let Some(next) = unit.next {
            self.due
                .remove(&(fire_at(key, &unit.schedule, next), key.clone()));
        }
        Some(unit)
    }
}

impl BatchScheduler {
    /// A scheduler for the enabled jobs of `jobs`: static schedules of jobs that have one, and
    /// preference groups of Dynamic jobs. The processor's ports give the run store, the
    /// preference source and the clock; `schedules` keeps the durable schedule states.
    pub fn new(
        processor: Arc<BatchProcessor>,
        schedules: Arc<dyn ScheduleStore>,
        jobs: &[Job],
    ) -> Self {
        Self::with_catalog(processor, schedules, Arc::new(JobCatalog::new(jobs)))
    }

    /// A scheduler for the enabled jobs of `catalog`, following its changes: when its version
    /// moves, the next tick rebuilds the schedules from the new jobs (durable states carry
    /// over, so nothing fires twice).
    pub fn with_catalog(
        processor: Arc<BatchProcessor>,
        schedules: Arc<dyn ScheduleStore>,
        catalog: Arc<JobCatalog>,
    ) -> Self {
        BatchScheduler {
            processor,
            schedules,
            catalog,
            index: Mutex::new(None),
        }
    }

    /// The enabled job `id` of the current catalog.
    fn job(&self, id: &JobId) -> Result<Job, Error> {
        self.catalog
            .jobs()
            .get(id)
            .filter(|j| j.enabled)
            .cloned()
            .ok_or_else(|| Error::Job(format!("unknown or disabled job {id}")))
    }

    /// The index, rebuilt when missing or built from an older catalog.
    async fn ensure_index<'a>(
        &self,
        guard: &'a mut Option<Index>,
        now: DateTime<Utc>,
    ) -> Result<&'a mut Index, Error> {
        let version = self.catalog.version();
        if guard.as_ref().is_none_or(|index| index.version != version) {
            let mut index = self.load(now).await?;
            index.version = version;
            self.watch_preferences(&mut index, now).await?;
            *guard = Some(index);
        }
        guard
            .as_mut()
            .ok_or_else(|| Error::Job("the schedule index is missing".to_owned()))
    }

    /// Where a schedule starts: its stored state when that still belongs to the schedule;
    /// otherwise its first instant from `now` (written with a compare-and-set, so replicas
    /// agree). `joined` says the schedule just gained its first users: then instants missed
    /// before `now` are not theirs to catch up on.
    async fn start(
        &self,
        key: &Key,
        tenant: &TenantId,
        schedule: &Schedule,
        stored: Option<ScheduleState>,
        now: DateTime<Utc>,
        joined: bool,
    ) -> Result<(Option<DateTime<Utc>>, Option<DateTime<Utc>>), Error> {
        let from = if joined { now - ON_TIME } else { now };
        let usable = stored.as_ref().is_some_and(|s| {
            s.next_nominal
                .is_none_or(|n| belongs(schedule, n) && (!joined || n >= from))
        });
        if let (true, Some(state)) = (usable, &stored) {
            return Ok((state.next_nominal, state.last_fired));
        }
        let fresh = ScheduleState {
            job: key.job.clone(),
            group: key.group.to_string(),
            tenant: tenant.clone(),
            next_nominal: schedule.next_nominal(from - Duration::milliseconds(1)),
            last_fired: stored.as_ref().and_then(|s| s.last_fired),
        };
        let expected = stored.map(|s| s.next_nominal);
        if self
            .schedules
            .advance_schedule(expected, &fresh, now)
            .await?
        {
            return Ok((fresh.next_nominal, fresh.last_fired));
        }
        // Another replica wrote it first: take theirs.
        Ok(self
            .schedules
            .schedule_state(&key.job, &key.group)
            .await?
            .map_or((fresh.next_nominal, fresh.last_fired), |s| {
                (s.next_nominal, s.last_fired)
            }))
    }

    /// Reads the durable states and builds the index of the static schedules; preference
    /// groups join as their job's preferences load.
    async fn load(&self, now: DateTime<Utc>) -> Result<Index, Error> {
        let mut stored: HashMap<Key, ScheduleState> = self
            .schedules
            .schedule_states()
            .await?
            .into_iter()
            .filter(|s| s.group.is_empty())
            .map(|s| (Key::own(&s.job), s))
            .collect();
        let mut index = Index::default();
        let jobs = self.catalog.jobs();
        for job in jobs.values().filter(|j| j.enabled) {
            if job.dynamic.is_some() {
                index.members.insert(job.id.clone(), Members::default());
                continue;
            }
            let Some(schedule) = &job.schedule else {
                continue;
            };
            let key = Key::own(&job.id);
            let stored = stored.remove(&key);
            let (next, last) = self
                .start(&key, &job.tenant, schedule, stored, now, false)
                .await?;
            index.insert(
                key,
                Unit {
                    schedule: schedule.clone(),
                    next,
                    last,
                    users: BTreeSet::new(),
                },
            );
        }
        Ok(index)
    }

    /// Reads every Dynamic job's preference changes since its watermark (all preferences the
    /// first time) and moves users between groups. A source that is down is logged and read
    /// again next tick; its groups keep their users meanwhile (or, before the first read, do
    /// not fire: their missed instants follow the misfire policy once it answers).
    async fn watch_preferences(
        &self,
        index: &mut Index,
        now: DateTime<Utc>,
    ) -> Result<usize, Error> {
        let mut applied = 0;
        let jobs = self.catalog.jobs();
        let dynamic: Vec<JobId> = index.members.keys().cloned().collect();
        for job_id in dynamic {
            let Some(job) = jobs.get(&job_id) else {
                continue;
            };
            let Some(dynamic) = &job.dynamic else {
                continue;
            };
            let (loaded, watermark) = index
                .members
                .get(&job_id)
                .map_or((false, 0), |m| (m.loaded, m.watermark));
            let read = self
                .processor
                .ports()
                .preferences
                .changes_since(&job.tenant, &dynamic.feature_type, watermark)
                .await;
            let (changes, watermark) = match read {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!(job = %job_id, error = %e, "preferences unavailable; groups unchanged");
                    continue;
                }
            };
            let changes = latest_per_user(changes);
            let mut stored = HashMap::new();
            if !loaded {
                stored = self
                    .schedules
                    .schedule_states()
                    .await?
                    .into_iter()
                    .filter(|s| s.job == job_id && !s.group.is_empty())
                    .map(|s| (s.group.clone(), s))
                    .collect();
            }
            applied += self
                .apply(
                    index,
                    job,
                    &dynamic.defaults,
                    changes,
                    &mut stored,
                    loaded,
                    now,
                )
                .await?;
            if let Some(members) = index.members.get_mut(&job_id) {
                members.loaded = true;
                members.watermark = watermark;
            }
        }
        Ok(applied)
    }

    /// Applies `changes` (the latest per user, ordered by user) of the Dynamic `job`, whose
    /// users without a preference of their own follow `defaults`, to its groups. Returns how
    /// many users changed group.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        index: &mut Index,
        job: &Job,
        defaults: &PreferenceDefaults,
        changes: Vec<Preference>,
        stored: &mut HashMap<String, ScheduleState>,
        running: bool,
        now: DateTime<Utc>,
    ) -> Result<usize, Error> {
        let mut groups = Groups::new(&job.id);
        let grouped = index
            .members
            .get(&job.id)
            .is_some_and(|m| !m.group_of.is_empty());
        if grouped {
            self.regroup_each(
                index,
                job,
                &mut groups,
                defaults,
                changes,
                stored,
                running,
                now,
            )
            .await
        } else {
            // Nobody to move out of a group (the first read): every user joins one, which
            // is done group by group.
            let users = groups.assign(changes, defaults);
            self.join(index, job, &groups, users, stored, running, now)
                .await
        }
    }

    /// [`Self::regroup`] for the user of each of `changes`, in order; returns how many
    /// changed group.
    #[allow(clippy::too_many_arguments)]
    async fn regroup_each(
        &self,
        index: &mut Index,
        job: &Job,
        groups: &mut Groups,
        defaults: &PreferenceDefaults,
        changes: Vec<Preference>,
        stored: &mut HashMap<String, ScheduleState>,
        running: bool,
        now: DateTime<Utc>,
    ) -> Result<usize, Error> {
        let mut moved = 0;
        for preference in changes {
            let slot = schedule_of(&preference, defaults).map(|schedule| groups.slot(schedule));
            let group = slot.map(|slot| groups.get(slot));
            if self
                .regroup(index, job, preference.user, group, stored, running, now)
                .await?
            {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Puts `users` (ordered, each with the slot of their group in `groups`) into their
    /// groups when `job` has no grouped users yet (its first read): the same as
    /// [`Self::regroup`] for each user in turn, done group by group. Returns how many users
    /// joined a group.
    #[allow(clippy::too_many_arguments)]
    async fn join(
        &self,
        index: &mut Index,
        job: &Job,
        groups: &Groups,
        users: Vec<(UserId, usize)>,
        stored: &mut HashMap<String, ScheduleState>,
        running: bool,
        now: DateTime<Utc>,
    ) -> Result<usize, Error> {
        let mut by_slot: Vec<Vec<UserId>> = vec![Vec::new(); groups.len()];
        for (user, slot) in &users {
            if let Some(members) = by_slot.get_mut(*slot) {
                members.push(user.clone());
            }
        }
        // Groups are created in the order of their first user, as one by one would.
        for (slot, members) in by_slot.into_iter().enumerate() {
            let (key, schedule) = groups.get(slot);
            self.add_to_group(index, job, (key, schedule), members, stored, running, now)
                .await?;
        }
        // Recorded once every group exists, so a failure above leaves all users to the next
        // read (which finds the groups made so far and adds to them).
        let joined = users.len();
        let entries = users
            .into_iter()
            .map(|(user, slot)| (user, groups.get(slot).0.group.clone()));
        let group_of = &mut index.members.entry(job.id.clone()).or_default().group_of;
        if group_of.is_empty() {
            // In order, so built in one pass.
            *group_of = entries.collect();
        } else {
            group_of.extend(entries);
        }
        Ok(joined)
    }

    /// Adds `users` to the group `key` of `job` firing on `schedule`, creating the group (its
    /// durable state from `stored`, or read when `running`) when it does not exist yet.
    #[allow(clippy::too_many_arguments)]
    async fn add_to_group(
        &self,
        index: &mut Index,
        job: &Job,
        (key, schedule): (&Key, &Schedule),
        users: impl IntoIterator<Item = UserId>,
        stored: &mut HashMap<String, ScheduleState>,
        running: bool,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        if let Some(unit) = index.units.get_mut(key) {
            unit.users.extend(users);
            return Ok(());
        }
        let stored = match stored.remove(&*key.group) {
            Some(state) => Some(state),
            None if running => self.schedules.schedule_state(&job.id, &key.group).await?,
            None => None,
        };
        let (next, last) = self
            .start(key, &job.tenant, schedule, stored, now, running)
            .await?;
        index.insert(
            key.clone(),
            Unit {
                schedule: schedule.clone(),
                next,
                last,
                users: users.into_iter().collect(),
            },
        );
        Ok(())
    }

    /// Moves `user` of `job` into `group` (its key and schedule; out of every group for
    /// `None`). Returns whether anything changed.
    #[allow(clippy::too_many_arguments)]
    async fn regroup(
        &self,
        index: &mut Index,
        job: &Job,
        user: UserId,
        group: Option<(&Key, &Schedule)>,
        stored: &mut HashMap<String, ScheduleState>,
        running: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, Error> {
        let old_group = index
            .members
            .get(&job.id)
            .and_then(|m| m.group_of.get(&user));
        if old_group.map(|g| &**g) == group.map(|(key, _)| &*key.group) {
            return Ok(false);
        }
        if let Some(old) = old_group {
            let key = Key {
                job: job.id.clone(),
                group: old.clone(),
            };
            let empty = index.units.get_mut(&key).is_some_and(|unit| {
                unit.users.remove(&user);
                unit.users.is_empty()
            });
            if empty {
                index.remove(&key);
            }
        }
        let Some((key, schedule)) = group else {
            if let Some(members) = index.members.get_mut(&job.id) {
                members.group_of.remove(&user);
            }
            return Ok(true);
        };
        self.add_to_group(
            index,
            job,
            (key, schedule),
            [user.clone()],
            stored,
            running,
            now,
        )
        .await?;
        // Recorded once the group exists: if creating it failed, the next read of the change
        // finds the user ungrouped and tries again.
        index
            .members
            .entry(job.id.clone())
            .or_default()
            .group_of
            .insert(user, key.group.clone());
        Ok(true)
    }

    /// Fires everything due at `now`. A schedule whose fire fails is reported in
    /// [`TickReport::failed`], stays due and is tried again at the next tick; the others fire
    /// regardless (occurrences already created are not created twice).
    ///
    /// # Errors
    /// [`Error::Store`] when the schedule states, pauses or preferences cannot be read at all.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<TickReport, Error> {
        let mut guard = self.index.lock().await;
        let index = self.ensure_index(&mut guard, now).await?;
        let mut report = TickReport {
            preference_changes: self.watch_preferences(index, now).await?,
            ..TickReport::default()
        };
        let jobs = self.catalog.jobs();
        index.paused = self
            .schedules
            .paused_jobs()
            .await?
            .into_iter()
            .map(|p| (p.job.clone(), p))
            .collect();
        let mut failed = Vec::new();
        while let Some((fire_at, key)) = index.due.first().cloned() {
            if fire_at > now {
                break;
            }
            let Some(unit) = index.remove(&key) else {
                continue;
            };
            let Some(job) = jobs.get(&key.job).filter(|j| j.enabled) else {
                continue;
            };
            let paused = index.paused.contains_key(&key.job);
            match self.fire(&key, &unit, job, now, paused, &mut report).await {
                Ok((next, last)) => index.insert(key, Unit { next, last, ..unit }),
                Err(e) => {
                    // Keep it due for the next tick, but let every other due schedule fire
                    // first: one failing job (its source is down, say) blocks no other.
                    tracing::warn!(job = %key.job, group = %key.group, error = %e, "firing a schedule failed; retried next tick");
                    report
                        .failed
                        .push(format!("{} {}: {e}", key.job, key.group));
                    failed.push((key, unit));
                }
            }
        }
        for (key, unit) in failed {
            index.insert(key, unit);
        }
        if !report.fired.is_empty() || report.dropped > 0 || report.paused > 0 {
            tracing::debug!(
                target: "batch::metrics",
                metric = "tick",
                fired = report.fired.len(),
                dropped = report.dropped,
                paused = report.paused,
            );
        }
        Ok(report)
    }

    /// Fires one due schedule and moves its state on; returns its new (next, last fired).
    async fn fire(
        &self,
        key: &Key,
        unit: &Unit,
        job: &Job,
        now: DateTime<Utc>,
        paused: bool,
        report: &mut TickReport,
    ) -> Result<(Option<DateTime<Utc>>, Option<DateTime<Utc>>), Error> {
        let Some(next_nominal) = unit.next else {
            return Ok((unit.next, unit.last));
        };
        let due = due_fires(
            &unit.schedule,
            &jitter_key(key),
            next_nominal,
            now,
            if paused { Misfire::Skip } else { job.misfire },
        );
        let mut fired = Vec::with_capacity(due.fire.len());
        if paused {
            report.paused += due.fire.len() + due.dropped;
        } else {
            report.dropped += due.dropped;
            // An instant that was due may have been fired already by a tick that crashed
            // after creating its occurrence and before its run: that instant was decided,
            // and gets its run however late it is now and whatever the overlap policy says.
            // Only instants this tick found due are looked at (before `due.next`), so a
            // jittered instant is never repaired before its fire time.
            let decided = if due.fire.is_empty() && due.dropped == 0 {
                Vec::new()
            } else {
                let until = due
                    .next
                    .map_or(now, |next| next - chrono::Duration::milliseconds(1));
                self.processor
                    .ports()
                    .runs
                    .occurrences_without_run(&job.id, &key.group, next_nominal, until)
                    .await?
            };
            // Passed over by the policy: these were counted as dropped.
            for nominal in decided.iter().filter(|n| !due.fire.contains(n)) {
                self.fire_one(job, key, unit, *nominal, report).await?;
                fired.push(*nominal);
                report.dropped = report.dropped.saturating_sub(1);
            }
            for nominal in &due.fire {
                if !decided.contains(nominal)
                    && !self.overlap_allows(job, &key.group, *nominal).await?
                {
                    report.dropped += 1;
                    continue;
                }
                self.fire_one(job, key, unit, *nominal, report).await?;
                fired.push(*nominal);
            }
        }
        let state = ScheduleState {
            job: job.id.clone(),
            group: key.group.to_string(),
            tenant: job.tenant.clone(),
            next_nominal: due.next,
            last_fired: fired.iter().max().copied().or(unit.last),
        };
        if self
            .schedules
            .advance_schedule(Some(unit.next), &state, now)
            .await?
        {
            return Ok((state.next_nominal, state.last_fired));
        }
        // Another replica moved it on first; follow it.
        Ok(self
            .schedules
            .schedule_state(&job.id, &key.group)
            .await?
            .map_or((state.next_nominal, state.last_fired), |s| {
                (s.next_nominal, s.last_fired)
            }))
    }

    /// Fires `nominal` of the schedule `key` (its occurrence and run) and reports it.
    async fn fire_one(
        &self,
        job: &Job,
        key: &Key,
        unit: &Unit,
        nominal: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<(), Error> {
        let run = self
            .occur(
                job,
                &key.group,
                nominal,
                Trigger::Scheduled,
                &unit.scope(key),
            )
            .await?;
        report.fired.push(Fired {
            job: job.id.clone(),
            group: key.group.to_string(),
            nominal,
            run,
        });
        Ok(())
    }

    /// Creates the occurrence of `job` at `nominal` for `group` and its run, exactly once:
    /// returns the run when this call created it, `None` when it existed.
    async fn occur(
        &self,
        job: &Job,
        group: &str,
        nominal: DateTime<Utc>,
        trigger: Trigger,
        scope: &Scope,
    ) -> Result<Option<RunId>, Error> {
        let runs = &self.processor.ports().runs;
        let occurrence = match runs
            .create_occurrence(&job.id, &job.tenant, nominal, group)
            .await?
        {
            Occurrence::Created(id) | Occurrence::Existed(id) => id,
        };
        if runs.run_for_occurrence(occurrence).await?.is_some() {
            return Ok(None);
        }
        match self
            .processor
            .start_occurrence(job, trigger, occurrence, nominal, group, scope)
            .await
        {
            Ok(run) => Ok(Some(run.id)),
            Err(Error::Store(StoreError::AlreadyExists(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Applies the job's overlap policy to a fire of `group` about to happen: whether it may
    /// create its run. Only runs of the same job and group count. `cancel_other` asks them to
    /// stop; `buffer_one` keeps one run waiting; `skip` fires only when nothing else of the
    /// schedule is unfinished. The runs themselves wait their turn at claim time (serial runs),
    /// except under `allow_all`.
    async fn overlap_allows(
        &self,
        job: &Job,
        group: &str,
        nominal: DateTime<Utc>,
    ) -> Result<bool, Error> {
        if job.overlap == Overlap::AllowAll || job.overlap == Overlap::BufferAll {
            return Ok(true);
        }
        let runs = &self.processor.ports().runs;
        // The run of this very fire (created before a crash, or by another replica) is not an
        // other run: it must neither block nor be cancelled by its own fire.
        let active: Vec<_> = runs
            .active_runs(&job.id)
            .await?
            .into_iter()
            .filter(|r| r.group == group && r.scheduled_for != Some(nominal))
            .collect();
        Ok(match job.overlap {
            Overlap::Skip => active.is_empty(),
            Overlap::BufferOne => !active.iter().any(|r| r.status == RunStatus::Queued),
            Overlap::CancelOther => {
                for run in &active {
                    runs.request_cancel(&run.id).await?;
                }
                true
            }
            Overlap::AllowAll | Overlap::BufferAll => true,
        })
    }

    /// Starts a run of `job` now, outside its schedule (also for jobs without one, and for
    /// paused jobs), with the overrides and user restriction of `scope`.
    ///
    /// # Errors
    /// [`Error::Job`] for an unknown or disabled job; otherwise as [`BatchProcessor::start`].
    pub async fn trigger(
        &self,
        job: &JobId,
        scope: &Scope,
    ) -> Result<batch_ports::runs::RunRecord, Error> {
        let job = self.job(job)?;
        self.processor
            .start(&job, Trigger::Manual, None, scope, None)
            .await
    }

    /// Creates the runs of every instant of `job`'s schedules (its own, or each current
    /// preference group's) in `from..=to`, oldest first, each at most once: instants that
    /// already fired or were backfilled before are counted, not run again.
    ///
    /// # Errors
    /// [`Error::Job`] for an unknown job, a job without a schedule, a range that is empty,
    /// ends after `now` or holds more than [`MAX_BACKFILL`] instants; otherwise store and
    /// preparation errors.
    pub async fn backfill(
        &self,
        job: &JobId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Backfill, Error> {
        let job = self.job(job)?.clone();
        if from > to {
            return Err(Error::Job(format!(
                "backfill range is empty: {from} is after {to}"
            )));
        }
        if to > now {
            return Err(Error::Job(format!(
                "backfill must end by now ({now}), not {to}"
            )));
        }
        let mut instants: Vec<(DateTime<Utc>, String, Scope)> = Vec::new();
        {
            let mut guard = self.index.lock().await;
            let index = self.ensure_index(&mut guard, now).await?;
            let mut units: Vec<(&Key, &Unit)> = index
                .units
                .iter()
                .filter(|(key, _)| key.job == job.id)
                .collect();
            units.sort_by(|a, b| a.0.cmp(b.0));
            if units.is_empty() && job.dynamic.is_none() {
                return Err(Error::Job(format!("job {} has no schedule", job.id)));
            }
            for (key, unit) in units {
                let scope = Scope {
                    users: (!key.group.is_empty())
                        .then(|| unit.users.iter().cloned().collect::<HashSet<_>>()),
                    ..Scope::default()
                };
                for nominal in unit
                    .schedule
                    .nominals_after(from - Duration::milliseconds(1))
                    .take_while(|n| *n <= to)
                {
                    if instants.len() == MAX_BACKFILL {
                        return Err(Error::Job(format!(
                            "backfill of {} from {from} to {to} holds more than {MAX_BACKFILL} instants; split the range",
                            job.id
                        )));
                    }
                    instants.push((nominal, key.group.to_string(), scope.clone()));
                }
            }
        }
        instants.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut report = Backfill::default();
        for (nominal, group, scope) in instants {
            match self
                .occur(&job, &group, nominal, Trigger::Backfill, &scope)
                .await?
            {
                Some(run) => report.created.push(run),
                None => report.existed += 1,
            }
        }
        Ok(report)
    }

    /// Pauses `job`'s schedules on every replica, with a note saying why: instants that come
    /// due while it is paused are not fired (runs already created carry on; cancel them
    /// separately). Takes effect at each replica's next tick.
    ///
    /// # Errors
    /// [`Error::Job`] for an unknown job; [`Error::Store`] when the store fails.
    pub async fn pause(&self, job: &JobId, note: &str, now: DateTime<Utc>) -> Result<(), Error> {
        let job = self.job(job)?;
        self.schedules
            .pause_job(&Pause {
                job: job.id.clone(),
                tenant: job.tenant.clone(),
                note: note.to_owned(),
                since: now,
            })
            .await?;
        Ok(())
    }

    /// Resumes a paused job: its schedules fire again from their next instant after `now`.
    /// Returns whether it was paused.
    ///
    /// # Errors
    /// [`Error::Job`] for an unknown job; [`Error::Store`] when the store fails.
    pub async fn resume(&self, job: &JobId) -> Result<bool, Error> {
        let job = self.job(job)?;
        Ok(self.schedules.resume_job(&job.id).await?)
    }

    /// The next fire of every schedule `filter` selects, soonest first.
    ///
    /// # Errors
    /// [`Error::Store`] when the states cannot be loaded.
    pub async fn next_fires(
        &self,
        now: DateTime<Utc>,
        filter: &FireFilter,
    ) -> Result<Vec<NextFire>, Error> {
        let mut guard = self.index.lock().await;
        let index = self.ensure_index(&mut guard, now).await?;
        // Pauses are read fresh: another replica (or an API call) may have just paused a job.
        index.paused = self
            .schedules
            .paused_jobs()
            .await?
            .into_iter()
            .map(|p| (p.job.clone(), p))
            .collect();
        let user_groups: Option<HashSet<Key>> = filter.user.as_ref().map(|user| {
            index
                .members
                .iter()
                .filter_map(|(job, members)| {
                    members.group_of.get(user).map(|group| Key {
                        job: job.clone(),
                        group: group.clone(),
                    })
                })
                .collect()
        });
        let jobs = self.catalog.jobs();
        let mut out = Vec::new();
        for (fire_at, key) in &index.due {
            let (Some(job), Some(unit)) = (jobs.get(&key.job), index.units.get(key)) else {
                continue;
            };
            let feature_type = job.dynamic.as_ref().map(|d| d.feature_type.clone());
            let selected = filter.job.as_ref().is_none_or(|j| j == &job.id)
                && filter.tenant.as_ref().is_none_or(|t| t == &job.tenant)
                && filter
                    .feature_type
                    .as_ref()
                    .is_none_or(|f| Some(f) == feature_type.as_ref())
                && user_groups.as_ref().is_none_or(|keys| keys.contains(key));
            let Some(nominal) = unit.next.filter(|_| selected) else {
                continue;
            };
            out.push(NextFire {
                job: job.id.clone(),
                tenant: job.tenant.clone(),
                feature_type,
                group: key.group.to_string(),
                schedule: unit.schedule.to_string(),
                users: unit.users.len(),
                nominal,
                fire_at: *fire_at,
                paused: index.paused.get(&job.id).map(|p| p.note.clone()),
            });
        }
        Ok(out)
    }

    /// When the next schedule fires, if any.
    async fn next_due(&self) -> Option<DateTime<Utc>> {
        let guard = self.index.lock().await;
        guard
            .as_ref()
            .and_then(|index| index.due.first().map(|(at, _)| *at))
    }

    /// Ticks until `stop` turns true, sleeping on the clock until the next fire but at most
    /// `max_wait` at a time — which also bounds how long a preference change or a pause takes
    /// to apply. A failing tick is logged and retried after `max_wait`: a database that went
    /// away delays fires (the misfire policy then applies), it does not stop the scheduler.
    pub async fn run_until_stopped(
        &self,
        max_wait: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let clock = self.processor.ports().clock.clone();
        while !*stop.borrow() {
            let now = clock.now();
            if let Err(e) = self.tick(now).await {
                tracing::warn!(error = %e, "scheduler tick failed");
            }
            let wait = self
                .next_due()
                .await
                .and_then(|at| (at - clock.now()).to_std().ok())
                .unwrap_or(max_wait)
                .min(max_wait);
            tokio::select! {
                () = clock.sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use batch_domain::TimeOfDay;
    use batch_domain::config::parse_job;
    use batch_domain::preference::Frequency;
    use batch_testkit::ManualClock;
    use batch_testkit::fakes::{
        Behaviour, FakeCategories, FakeExecutor, FakePreferences, FakeTemplates, FakeUsers,
        MemoryRuns,
    };
    use serde_json::json;

    use super::*;
    use crate::Ports;
    use crate::processor::ProcessorSettings;
    use crate::strategy::Strategies;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    /// A scheduler of `job` over fresh in-memory fakes.
    fn scheduler(job: &Job, now: DateTime<Utc>) -> BatchScheduler {
        let runs = Arc::new(MemoryRuns::default());
        let clock = Arc::new(ManualClock::new(now));
        let ports = Ports {
            runs: runs.clone(),
            contexts: runs.clone(),
            users: Arc::new(FakeUsers::default()),
            categories: Arc::new(FakeCategories::default()),
            preferences: Arc::new(FakePreferences::default()),
            templates: Arc::new(FakeTemplates::default()),
            executor: Arc::new(FakeExecutor::new(Behaviour::default(), clock.clone())),
            clock,
        };
        let processor = Arc::new(BatchProcessor::new(
            ports,
            Strategies::default(),
            ProcessorSettings::default(),
        ));
        BatchScheduler::new(processor, runs, std::slice::from_ref(job))
    }

    /// The briefing job, with or without a default schedule.
    fn briefing(default_schedule: bool) -> Job {
        let mut spec = json!({
            "id": "briefing", "tenant": "acme", "type": "PREFERENCE_INDIVIDUAL_USERS",
            "template": "digest", "source": {"users": {"ids": ["u000"]}},
            "feature_type": "briefing", "overlap": "buffer_all",
        });
        if default_schedule {
            spec["default_preferences"] =
                json!({"schedule": {"frequency": "weekly", "on": "tue", "at": "07:00"}});
        }
        parse_job(spec).unwrap_or_else(|p| panic!("{p}"))
    }

    /// The `n`th of a spread of preferences: users out of order and some more than once,
    /// every frequency, times and zones given or not (one zone invalid), some disabled.
    fn preference(n: usize) -> Preference {
        let frequencies = [
            None,
            Some(Frequency::Hourly),
            Some(Frequency::Daily),
            Some(Frequency::Weekly),
            Some(Frequency::Biweekly),
            Some(Frequency::Monthly),
        ];
        let times = [None, Some("09:00"), Some("09:15"), Some("18:30")];
        let zones = [None, Some("UTC"), Some("Europe/Berlin"), Some("Mars/Base")];
        Preference {
            tenant: TenantId::parse("acme").unwrap(),
            user: UserId::parse(format!("u{:03}", (n * 37) % 250)).unwrap(),
            feature_type: FeatureType::parse("briefing").unwrap(),
            frequency: frequencies[n % frequencies.len()],
            time_of_day: times[(n / 2) % times.len()].map(|t| TimeOfDay::parse(t).unwrap()),
            time_zone: zones[(n / 3) % zones.len()].map(str::to_owned),
            weekday: n.is_multiple_of(5).then_some(chrono::Weekday::Fri),
            day_of_month: n.is_multiple_of(7).then_some(31),
            template_override: None,
            parameters: serde_json::Map::new(),
            enabled: !n.is_multiple_of(11),
            version: u64::try_from(n).unwrap(),
        }
    }

    /// One group of a snapshot: its name, schedule, next and last instants and its users.
    type Group = (
        String,
        String,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
        Vec<String>,
    );

    /// Everything an index holds, comparable: its groups, each user's group, the due order.
    fn snapshot(index: &Index) -> (Vec<Group>, Vec<(String, String)>, Vec<String>) {
        let mut groups: Vec<Group> = index
            .units
            .iter()
            .map(|(key, unit)| {
                (
                    format!("{}#{}", key.job, key.group),
                    unit.schedule.to_string(),
                    unit.next,
                    unit.last,
                    unit.users.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        groups.sort();
        let mut members: Vec<(String, String)> = index
            .members
            .iter()
            .flat_map(|(job, m)| {
                m.group_of
                    .iter()
                    .map(move |(user, group)| (format!("{job}/{user}"), group.to_string()))
            })
            .collect();
        members.sort();
        let due = index
            .due
            .iter()
            .map(|(at, key)| format!("{at} {}#{}", key.job, key.group))
            .collect();
        (groups, members, due)
    }

    #[tokio::test]
    async fn a_first_read_grouped_group_by_group_equals_user_by_user() {
        let now = utc("2027-01-04T00:07:00Z");
        let changes = latest_per_user((0..400).map(preference).collect());
        for (default_schedule, running) in [(true, false), (false, false), (true, true)] {
            let job = briefing(default_schedule);
            let defaults = &job.dynamic.as_ref().unwrap().defaults;
            let case = format!("default schedule {default_schedule}, running {running}");

            let by_group = scheduler(&job, now);
            let mut grouped = by_group.load(now).await.unwrap();
            let mut groups = Groups::new(&job.id);
            let users = groups.assign(changes.clone(), defaults);
            let joined = by_group
                .join(
                    &mut grouped,
                    &job,
                    &groups,
                    users,
                    &mut HashMap::new(),
                    running,
                    now,
                )
                .await
                .unwrap();

            let by_user = scheduler(&job, now);
            let mut one_by_one = by_user.load(now).await.unwrap();
            let moved = by_user
                .regroup_each(
                    &mut one_by_one,
                    &job,
                    &mut Groups::new(&job.id),
                    defaults,
                    changes.clone(),
                    &mut HashMap::new(),
                    running,
                    now,
                )
                .await
                .unwrap();

            assert_eq!(joined, moved, "{case}");
            assert!(joined > 100 && joined < changes.len(), "{case}: {joined}");
            let snapshot = snapshot(&grouped);
            assert!(snapshot.0.len() > 10, "{case}: {} groups", snapshot.0.len());
            assert_eq!(snapshot, self::snapshot(&one_by_one), "{case}");
            // Each group is named by its schedule's text, as stored.
            for (name, schedule, ..) in &snapshot.0 {
                assert_eq!(name, &format!("briefing#{schedule}"), "{case}");
            }
            assert_eq!(
                by_group.schedules.schedule_states().await.unwrap().len(),
                snapshot.0.len(),
                "{case}"
            );
        }
    }

    /// Checks that of `feed` (user, version) only the last change of each user is kept, in
    /// user order.
    fn check(feed: &[(&str, u64)], expected: &[(&str, u64)]) {
        let changes = feed
            .iter()
            .map(|&(user, version)| Preference {
                version,
                user: UserId::parse(user).unwrap(),
                ..preference(1)
            })
            .collect();
        let latest: Vec<(String, u64)> = latest_per_user(changes)
            .into_iter()
            .map(|p| (p.user.to_string(), p.version))
            .collect();
        let expected: Vec<(String, u64)> = expected
            .iter()
            .map(|&(user, version)| (user.to_owned(), version))
            .collect();
        assert_eq!(latest, expected, "{feed:?}");
    }

    #[test]
    fn only_the_latest_change_of_each_user_counts() {
        check(&[], &[]);
        check(
            &[("a", 1), ("b", 2), ("c", 3)],
            &[("a", 1), ("b", 2), ("c", 3)],
        );
        check(
            &[("c", 1), ("a", 2), ("b", 3)],
            &[("a", 2), ("b", 3), ("c", 1)],
        );
        check(&[("a", 1), ("a", 2)], &[("a", 2)]);
        check(
            &[("b", 1), ("a", 2), ("b", 3), ("a", 4), ("c", 5), ("b", 6)],
            &[("a", 4), ("b", 6), ("c", 5)],
        );
        // The feed order decides, not the version.
        check(&[("a", 9), ("b", 1), ("a", 3)], &[("a", 3), ("b", 1)]);
    }
}
