//! The JSON shape of `config/jobs.json`, exactly as written by people. These types derive the
//! JSON Schema; [`super::validate`] turns them into the domain's [`super::Job`].
//!
//! Every field of a job is wrapped in [`Checked`], which records a type error in that field
//! instead of failing the whole document, so one pass reports every problem.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A value that either parsed as `T` or failed with a message and the path inside the value.
#[derive(Debug, Clone)]
pub struct Checked<T>(pub Result<T, FieldError>);

/// A type error found inside one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path relative to the field (`concurrency`, `[2].name`), empty for the field itself.
    pub path: String,
    /// What serde objected to.
    pub message: String,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Checked<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Ok(Checked(serde_path_to_error::deserialize(value).map_err(
            |e| {
                let path = e.path().to_string();
                FieldError {
                    path: if path == "." { String::new() } else { path },
                    message: e.into_inner().to_string(),
                }
            },
        )))
    }
}

impl<T: JsonSchema> JsonSchema for Checked<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}

/// The whole jobs file: shared defaults and the list of jobs.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "agent-batch jobs file")]
pub struct JobsFileSpec {
    /// Optional link to this schema, for editors.
    #[serde(rename = "$schema")]
    pub schema: Option<String>,
    /// Values every job inherits unless it sets its own.
    pub defaults: Option<Checked<DefaultsSpec>>,
    /// The jobs.
    pub jobs: Vec<Checked<JobSpec>>,
}

/// Values every job inherits. `execution`, `retry` and `misfire` merge field by field.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSpec {
    /// IANA time zone of schedules that name none (default `UTC`).
    pub timezone: Option<String>,
    /// Default priority.
    pub priority: Option<PrioritySpec>,
    /// Default execution limits.
    pub execution: Option<ExecutionSpec>,
    /// Default retry policy.
    pub retry: Option<RetrySpec>,
    /// Default overlap policy.
    pub overlap: Option<OverlapSpec>,
    /// Default misfire policy.
    pub misfire: Option<MisfireSpec>,
}

/// One job.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique job id: letters, digits and `. _ - : @`.
    #[schemars(required)]
    pub id: Option<Checked<String>>,
    /// The tenant that owns the job and its results.
    #[schemars(required)]
    pub tenant: Option<Checked<String>>,
    /// One of the eight batch types, e.g. `INDIVIDUAL_USERS` or `PREFERENCE_BATCH_CATEGORIES`.
    #[serde(rename = "type")]
    #[schemars(required)]
    pub batch_type: Option<Checked<BatchTypeSpec>>,
    /// The execution template.
    #[schemars(required)]
    pub template: Option<Checked<String>>,
    /// Free text for people.
    pub description: Option<Checked<String>>,
    /// A disabled job is loaded but never fires (default `true`).
    pub enabled: Option<Checked<bool>>,
    /// Where the items come from.
    #[schemars(required)]
    pub source: Option<Checked<SourceSpec>>,
    /// When the job fires; absent means manual triggers only. Dynamic jobs have none: their
    /// users' preferences and `default_preferences` decide.
    pub schedule: Option<Checked<ScheduleSpec>>,
    /// `critical`, `high`, `normal`, `low`, or 0–100.
    pub priority: Option<Checked<PrioritySpec>>,
    /// Concurrency, rate, chunking and timeout.
    pub execution: Option<Checked<ExecutionSpec>>,
    /// Retry policy for retryable failures.
    pub retry: Option<Checked<RetrySpec>>,
    /// Who receives references to the results.
    pub distribution: Option<Checked<DistributionSpec>>,
    /// What happens when the job is due while its previous run is still going.
    pub overlap: Option<Checked<OverlapSpec>>,
    /// What happens to fires missed while the service was down.
    pub misfire: Option<Checked<MisfireSpec>>,
    /// Dynamic jobs only: the feature type that selects user preferences.
    pub feature_type: Option<Checked<String>>,
    /// Dynamic jobs only: what applies where a user's preference says nothing.
    pub default_preferences: Option<Checked<DefaultPreferencesSpec>>,
    /// Any other key: each one is reported as unknown.
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, Value>,
}

/// The batch type name as written.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BatchTypeSpec {
    /// One request per user.
    IndividualUsers,
    /// One request per category item.
    IndividualCategories,
    /// One request for the whole user set.
    BatchUsers,
    /// One request for a category, or for several categories combined.
    BatchCategories,
    /// One request per user, with each user's preferences.
    PreferenceIndividualUsers,
    /// One request per category item, with preferences of the referenced users.
    PreferenceIndividualCategories,
    /// One request per preference group of users.
    PreferenceBatchUsers,
    /// One request per category set and preference group.
    PreferenceBatchCategories,
}

/// Exactly one of `users`, `category` or `categories`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Users, by ids or by filter.
    pub users: Option<UsersSpec>,
    /// One category.
    pub category: Option<CategorySpec>,
    /// Several categories, for combined (`BATCH_CATEGORIES`) jobs.
    pub categories: Option<Vec<CategorySpec>>,
}

/// Users by explicit ids, or by a filter with an optional limit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsersSpec {
    /// Explicit user ids.
    pub ids: Option<Vec<String>>,
    /// Conditions on user attributes (see `filters` of a category).
    pub filter: Option<Map<String, Value>>,
    /// At most this many users.
    pub limit: Option<u64>,
}

/// One category with optional filters and limit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CategorySpec {
    /// The category's name.
    pub name: String,
    /// Conditions on item attributes: `"field": value` for equality, or an object with `in`
    /// (a list), or range bounds `gt`, `gte`, `lt`, `lte`.
    pub filters: Option<Map<String, Value>>,
    /// At most this many items.
    pub limit: Option<u64>,
}

/// A cron expression or a frequency preset, with an optional zone and jitter.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Cron expression with a seconds field (`0 30 2 * * *`); excludes `frequency`.
    pub cron: Option<String>,
    /// A preset; excludes `cron`.
    pub frequency: Option<FrequencySpec>,
    /// `hourly`: minute past the hour, 0–59.
    pub minute: Option<u64>,
    /// `daily`, `weekly`, `biweekly`, `monthly`: local time `HH:MM`.
    pub at: Option<String>,
    /// `weekly`, `biweekly`: the weekday (`monday` … `sunday`).
    pub on: Option<String>,
    /// `monthly`: day of month 1–31; past a month's end, its last day.
    pub day: Option<u64>,
    /// `biweekly`: the first date that fires (`YYYY-MM-DD`), on the weekday `on`.
    pub anchor: Option<String>,
    /// IANA time zone (default: `defaults.timezone`, else `UTC`).
    pub timezone: Option<String>,
    /// Up to this many seconds of deterministic delay per fire.
    pub jitter_seconds: Option<u64>,
}

/// Frequency presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FrequencySpec {
    /// Every hour at `minute`.
    Hourly,
    /// Every day `at`.
    Daily,
    /// Every week `on` a weekday `at`.
    Weekly,
    /// Every second week `on` a weekday `at`, from `anchor`.
    Biweekly,
    /// Every month on `day` `at`.
    Monthly,
}

/// A priority name or number.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum PrioritySpec {
    /// `critical`, `high`, `normal` or `low`.
    Name(String),
    /// 0 (lowest) to 100 (highest).
    Level(u64),
}

/// Execution limits; each field falls back to `defaults.execution`, then to the built-in default.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutionSpec {
    /// Requests in flight at once, 1–10 000 (default 16).
    pub concurrency: Option<u64>,
    /// Requests started per second, > 0 (default unlimited).
    pub rate_limit_per_sec: Option<f64>,
    /// Items per chunk, 1–100 000 (default 500); progress is saved once per chunk.
    pub chunk_size: Option<u64>,
    /// Timeout of one request in milliseconds, 1–3 600 000 (default 30 000).
    pub timeout_ms: Option<u64>,
}

/// Retry policy; each field falls back to `defaults.retry`, then to the built-in default.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in total including the first, 1–100 (default 5).
    pub max_attempts: Option<u64>,
    /// Delay before the first retry in ms (default 500).
    pub initial_backoff_ms: Option<u64>,
    /// Growth of the delay per attempt, ≥ 1 (default 2).
    pub multiplier: Option<f64>,
    /// Largest delay in ms (default 60 000).
    pub max_backoff_ms: Option<u64>,
    /// `full` (default), `equal` or `none`.
    pub jitter: Option<JitterSpec>,
}

/// Backoff jitter.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JitterSpec {
    /// The exact exponential delay.
    None,
    /// Uniform in `[0, delay]`.
    Full,
    /// Uniform in `[delay/2, delay]`.
    Equal,
}

/// Who receives references to a run's results.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DistributionSpec {
    /// Users who receive a reference to every run's results.
    #[serde(default)]
    pub users: Vec<String>,
    /// A template used to deliver the reference to each of them.
    pub delivery_template: Option<String>,
}

/// Overlap policy: what to do when a fire comes while the job's previous run is still going.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OverlapSpec {
    /// Drop the new fire.
    Skip,
    /// Keep one fire waiting; later ones are dropped.
    #[serde(alias = "queue")]
    BufferOne,
    /// Keep every fire waiting, run them in order.
    BufferAll,
    /// Cancel the running run and start the new one.
    CancelOther,
    /// Start the new run alongside.
    #[serde(alias = "allow")]
    AllowAll,
}

/// Misfire policy: what to do with fires missed while the service was down.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MisfireSpec {
    /// `skip`, `fire_once` (default) or `catch_up`.
    pub policy: Option<MisfirePolicySpec>,
    /// `catch_up`: how far back missed fires are run, in seconds (default 3 600).
    pub window_seconds: Option<u64>,
}

/// The misfire policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MisfirePolicySpec {
    /// Drop missed fires; wait for the next one.
    Skip,
    /// Run once for all missed fires.
    FireOnce,
    /// Run each missed fire inside the window, oldest first.
    CatchUp,
}

/// Defaults of a Dynamic job where a user's preference says nothing.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultPreferencesSpec {
    /// The default schedule; its time zone is the tenant default for users without a valid one.
    pub schedule: Option<ScheduleSpec>,
    /// A default template override.
    pub template: Option<String>,
    /// Default request parameters.
    #[serde(default)]
    pub parameters: Map<String, Value>,
}
