//! Pure types and rules of agent-batch: the batch matrix, job configuration and its validation,
//! schedules with their time-zone and DST rules, priorities with aging, retry policies and the
//! grouping of user preferences into fire groups.
//!
//! Everything here is deterministic and free of I/O: no async runtime, no database, no network.
//! Time is always passed in, never read from the system clock, so every rule can be tested with
//! any instant.
#![forbid(unsafe_code)]

pub mod batch_type;
pub mod config;
pub mod context;
pub mod ids;
pub mod misfire;
pub mod preference;
pub mod priority;
pub mod retry;
pub mod run;
pub mod schedule;
pub mod time;

pub use batch_type::{BatchType, DataSource, PreferenceSource, ProcessingMethod, Strategy};
pub use ids::{FeatureType, JobId, TemplateId, TenantId, UserId};
pub use priority::Priority;
pub use schedule::Schedule;
pub use time::{TimeOfDay, Zone};
