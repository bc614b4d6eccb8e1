//! Job configuration: the jobs file (`config/jobs.json`), its validation and the validated
//! [`Job`] the rest of the service works with.
//!
//! [`parse_jobs_file`] reports **every** problem it finds, each naming the JSON path and, where
//! known, the job (`jobs[3].schedule.at: "25:00" is not a time of day (HH:MM) [job nightly]`).
//! A file that is not JSON at all is reported with its line and column.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::batch_type::{BatchType, Strategy};
use crate::ids::{FeatureType, JobId, TemplateId, TenantId, UserId};
use crate::preference::PreferenceDefaults;
use crate::priority::Priority;
use crate::retry::RetryPolicy;
use crate::schedule::Schedule;

pub mod spec;
mod validate;

pub use validate::{parse_job, parse_job_with_defaults, parse_jobs_file};

/// The validated jobs file.
#[derive(Debug, Clone, PartialEq)]
pub struct JobsFile {
    /// The jobs, in file order; ids are unique.
    pub jobs: Vec<Job>,
}

impl JobsFile {
    /// The job with the given id.
    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|job| job.id.as_str() == id)
    }
}

/// One validated job: every default merged in, every value parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Unique id.
    pub id: JobId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// The batch type.
    pub batch_type: BatchType,
    /// The execution template.
    pub template: TemplateId,
    /// Free text for people.
    pub description: Option<String>,
    /// A disabled job never fires.
    pub enabled: bool,
    /// Where items come from; its kind matches the batch type's data source.
    pub source: Source,
    /// When the job fires; `None` for manual-only and for Dynamic jobs.
    pub schedule: Option<Schedule>,
    /// Base priority.
    pub priority: Priority,
    /// Concurrency, rate, chunking and timeout.
    pub execution: ExecutionLimits,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Who receives references.
    pub distribution: Distribution,
    /// Overlap policy.
    pub overlap: Overlap,
    /// Misfire policy.
    pub misfire: Misfire,
    /// Present exactly for Dynamic (`PREFERENCE_…`) jobs.
    pub dynamic: Option<Dynamic>,
}

impl Job {
    /// The processing strategy of this job.
    pub fn strategy(&self) -> Strategy {
        let categories = match &self.source {
            Source::Categories(list) => list.len(),
            Source::Category(_) => 1,
            Source::Users(_) => 0,
        };
        self.batch_type.strategy(categories)
    }

    /// The schedule whose next fires describe this job: its own, or for a Dynamic job the
    /// default preferences' schedule.
    pub fn effective_schedule(&self) -> Option<&Schedule> {
        match &self.dynamic {
            Some(dynamic) => dynamic.defaults.schedule.as_ref(),
            None => self.schedule.as_ref(),
        }
    }
}

/// The settings only Dynamic jobs have.
#[derive(Debug, Clone, PartialEq)]
pub struct Dynamic {
    /// Selects the user preferences that apply.
    pub feature_type: FeatureType,
    /// What applies where a preference says nothing.
    pub defaults: PreferenceDefaults,
}

/// Where a job's items come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Users.
    Users(UserSelection),
    /// One category.
    Category(CategorySelection),
    /// Several categories (two or more), combined in one request.
    Categories(Vec<CategorySelection>),
}

/// Which users a job processes.
#[derive(Debug, Clone, PartialEq)]
pub enum UserSelection {
    /// Exactly these users (unique, at least one).
    Ids(Vec<UserId>),
    /// Users matching every condition, at most `limit`.
    Filter {
        /// The conditions.
        filters: Vec<Filter>,
        /// Upper bound on the number of users.
        limit: Option<u64>,
    },
}

/// Which items of one category a job processes.
#[derive(Debug, Clone, PartialEq)]
pub struct CategorySelection {
    /// The category.
    pub name: String,
    /// Conditions every item must meet.
    pub filters: Vec<Filter>,
    /// Upper bound on the number of items.
    pub limit: Option<u64>,
}

/// One condition on an attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The attribute (a column or a key of the item's JSON attributes).
    pub field: String,
    /// What the attribute must satisfy.
    pub condition: Condition,
}

/// A condition on one attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Equal to this scalar.
    Eq(Value),
    /// Equal to one of these scalars (non-empty).
    In(Vec<Value>),
    /// Within bounds; at least one bound is set, all bounds are numbers or all are strings.
    Range {
        /// Greater than.
        gt: Option<Value>,
        /// Greater than or equal.
        gte: Option<Value>,
        /// Less than.
        lt: Option<Value>,
        /// Less than or equal.
        lte: Option<Value>,
    },
}

/// Execution limits of one job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExecutionLimits {
    /// Requests in flight at once (1–10 000).
    pub concurrency: u32,
    /// Requests started per second; `None` for no limit.
    pub rate_limit_per_sec: Option<f64>,
    /// Items per chunk (1–100 000).
    pub chunk_size: u32,
    /// Timeout of one request.
    pub timeout: Duration,
}

impl Default for ExecutionLimits {
    fn default() -> Self {
        ExecutionLimits {
            concurrency: 16,
            rate_limit_per_sec: None,
            chunk_size: 500,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Who receives references to a run's results.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Distribution {
    /// Users who receive a reference to every run.
    pub users: Vec<UserId>,
    /// Template used to deliver the reference, if any.
    pub delivery_template: Option<TemplateId>,
}

/// What happens when a job is due while its previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Drop the new fire.
    #[default]
    Skip,
    /// Keep one fire waiting; later ones are dropped.
    BufferOne,
    /// Keep every fire waiting.
    BufferAll,
    /// Cancel the running run, start the new one.
    CancelOther,
    /// Run alongside.
    AllowAll,
}

/// What happens to fires missed while the service was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Misfire {
    /// Drop them.
    Skip,
    /// Run once for all of them.
    #[default]
    FireOnce,
    /// Run each missed fire within `window` of now, oldest first.
    CatchUp {
        /// How far back missed fires count.
        window: Duration,
    },
}

/// One problem in a jobs file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// JSON path of the offending value (`jobs[3].schedule.at`), or `line 4, column 7` for
    /// malformed JSON.
    pub path: String,
    /// The id of the job concerned, when it is known.
    pub job: Option<String>,
    /// What is wrong, lower case.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(job) = &self.job {
            write!(f, " [job {job}]")?;
        }
        Ok(())
    }
}

/// Every problem found in a jobs file (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        writeln!(
            f,
            "{count} problem{} in the jobs file:",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.0 {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

/// The JSON Schema of the jobs file, generated from [`spec::JobsFileSpec`].
pub fn json_schema() -> Value {
    let schema = schemars::schema_for!(spec::JobsFileSpec);
    serde_json::to_value(schema).unwrap_or(Value::Object(Map::new()))
}

#[cfg(test)]
mod tests;
