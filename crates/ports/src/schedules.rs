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

/// The store of schedule states.
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    /// Every stored schedule state.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    async fn schedule_states(&self) -> Result<Vec<ScheduleState>, StoreError>;

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
}
