//! Durable schedule state: where each schedule stands, shared by every replica.

use async_trait::async_trait;
use batch_domain::{JobId, TenantId};
use chrono::{DateTime, Utc};

use crate::runs::StoreError;

/// Where one schedule (a job, or one preference group of a job) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleState {
    /// The job.
    pub job: JobId,
    /// The preference group; empty for a job's own schedule.
    pub group: String,
    /// The job's tenant.
    pub tenant: TenantId,
    /// The next nominal instant not fired yet; `None` when the schedule never fires again.
    pub next_nominal: Option<DateTime<Utc>>,
    /// The last nominal instant fired.
    pub last_fired: Option<DateTime<Utc>>,
}

/// A paused job: its schedules do not fire until it is resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// The job.
    pub job: JobId,
    /// The job's tenant.
    pub tenant: TenantId,
    /// Why it was paused, as the caller said.
    pub note: String,
    /// Since when.
    pub since: DateTime<Utc>,
}

/// The store of schedule states and pauses.
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    /// Every stored schedule state.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn schedule_states(&self) -> Result<Vec<ScheduleState>, StoreError>;

    /// The stored state of one schedule (`group` empty for a job's own schedule).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn schedule_state(
        &self,
        job: &JobId,
        group: &str,
    ) -> Result<Option<ScheduleState>, StoreError>;

    /// Moves a schedule to `state` if it still stands where the caller saw it: at `expected`
    /// (its `next_nominal`), or absent for `expected = None`. Returns whether it moved; `false`
    /// means another replica moved it first.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn advance_schedule(
        &self,
        expected: Option<Option<DateTime<Utc>>>,
        state: &ScheduleState,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Pauses `job`: its schedules stop firing on every replica. Pausing a paused job replaces
    /// its note and keeps its start.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn pause_job(&self, pause: &Pause) -> Result<(), StoreError>;

    /// Resumes `job`; returns whether it was paused.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn resume_job(&self, job: &JobId) -> Result<bool, StoreError>;

    /// Every paused job.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn paused_jobs(&self) -> Result<Vec<Pause>, StoreError>;
}
