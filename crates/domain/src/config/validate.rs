//! From the JSON shape ([`super::spec`]) to validated [`Job`]s, collecting every problem.

use std::collections::HashMap;
use std::fmt::Display;
use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use serde_json::{Map, Value};

use super::spec::{
    BatchTypeSpec, CategorySpec, Checked, DefaultPreferencesSpec, DefaultsSpec, DistributionSpec,
    ExecutionSpec, FrequencySpec, JitterSpec, JobSpec, JobsFileSpec, MisfirePolicySpec,
    MisfireSpec, OverlapSpec, PrioritySpec, RetrySpec, ScheduleSpec, SourceSpec, UsersSpec,
};
use super::{
    CategorySelection, Condition, Distribution, Dynamic, ExecutionLimits, Filter, Job, JobsFile,
    Misfire, Overlap, Problem, Problems, Source, UserSelection,
};
use crate::batch_type::{BatchType, DataSource, ProcessingMethod};
use crate::ids::{self, FeatureType, JobId, TemplateId, TenantId, UserId};
use crate::preference::PreferenceDefaults;
use crate::priority::Priority;
use crate::retry::{Jitter, RetryPolicy};
use crate::schedule::{CronSpec, Recurrence, Schedule};
use crate::time::{TimeOfDay, Zone, parse_weekday, weekday_name};

/// The keys a job object may have; anything else is reported. A test keeps this list equal to
/// the properties of the generated schema.
pub(super) const JOB_FIELDS: [&str; 16] = [
    "id",
    "tenant",
    "type",
    "template",
    "description",
    "enabled",
    "source",
    "schedule",
    "priority",
    "execution",
    "retry",
    "distribution",
    "overlap",
    "misfire",
    "feature_type",
    "default_preferences",
];

/// Collects problems under a base path (`jobs[3]`), naming the job once its id is known.
struct Reporter<'a> {
    base: String,
    job: Option<String>,
    problems: &'a mut Vec<Problem>,
}

/// `base` joined with a relative path (`schedule.at`, `[2]`, or empty).
fn join(base: &str, rel: &str) -> String {
    match (base.is_empty(), rel.is_empty()) {
        (_, true) => base.to_owned(),
        (true, false) => rel.to_owned(),
        (false, false) if rel.starts_with('[') => format!("{base}{rel}"),
        (false, false) => format!("{base}.{rel}"),
    }
}

impl Reporter<'_> {
    fn report(&mut self, rel: &str, message: impl Display) {
        self.problems.push(Problem {
            path: join(&self.base, rel),
            job: self.job.clone(),
            message: message.to_string(),
        });
    }

    /// The value of a field that deserialized, or `None` after reporting why it did not.
    fn take<T>(&mut self, rel: &str, field: Option<Checked<T>>) -> Option<T> {
        match field?.0 {
            Ok(value) => Some(value),
            Err(error) => {
                self.report(&join(rel, &error.path), error.message);
                None
            }
        }
    }

    /// Reports `Err` at `rel` and turns the result into an option.
    fn check<T, E: Display>(&mut self, rel: &str, result: Result<T, E>) -> Option<T> {
        result.map_err(|e| self.report(rel, e)).ok()
    }
}

/// Values every job inherits, already validated.
#[derive(Debug, Clone, Default)]
struct Defaults {
    zone: Zone,
    priority: Priority,
    execution: ExecutionLimits,
    retry: RetryPolicy,
    overlap: Overlap,
    misfire: Misfire,
}

/// Parses and validates a whole jobs file, reporting every problem.
///
/// # Errors
/// [`Problems`] listing each problem with its JSON path (and job id where known), or the line
/// and column where the text stops being JSON.
pub fn parse_jobs_file(text: &str) -> Result<JobsFile, Problems> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        let message = message
            .find(" at line ")
            .map_or(message.as_str(), |at| &message[..at])
            .to_owned();
        Problems(vec![Problem {
            path: format!("line {}, column {}", e.line(), e.column()),
            job: None,
            message: format!("not valid JSON: {message}"),
        }])
    })?;
    if !value.is_object() {
        return Err(Problems(vec![Problem {
            path: "(top level)".to_owned(),
            job: None,
            message: "must be an object with a \"jobs\" list".to_owned(),
        }]));
    }
    let spec: JobsFileSpec = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        Problems(vec![Problem {
            path: if path == "." {
                "(top level)".to_owned()
            } else {
                path
            },
            job: None,
            message: e.into_inner().to_string(),
        }])
    })?;

    let mut problems = Vec::new();
    let defaults = {
        let mut r = Reporter {
            base: "defaults".to_owned(),
            job: None,
            problems: &mut problems,
        };
        let spec = r.take("", spec.defaults).unwrap_or_default();
        defaults(&spec, &mut r)
    };
    let mut jobs = Vec::with_capacity(spec.jobs.len());
    let mut first_use: HashMap<String, usize> = HashMap::new();
    for (index, job) in spec.jobs.into_iter().enumerate() {
        let mut r = Reporter {
            base: format!("jobs[{index}]"),
            job: None,
            problems: &mut problems,
        };
        let Some(job) = r.take("", Some(job)) else {
            continue;
        };
        let Some(job) = self::job(job, &defaults, &mut r) else {
            continue;
        };
        match first_use.get(job.id.as_str()) {
            Some(first) => r.report(
                "id",
                format!(
                    "duplicate id {:?}, first used by jobs[{first}]",
                    job.id.as_str()
                ),
            ),
            None => {
                first_use.insert(job.id.as_str().to_owned(), index);
                jobs.push(job);
            }
        }
    }
    if problems.is_empty() {
        Ok(JobsFile { jobs })
    } else {
        Err(Problems(problems))
    }
}

/// Parses and validates one job definition (as the API receives it), with built-in defaults.
/// Paths in problems start at the job (`schedule.at`).
///
/// # Errors
/// [`Problems`] listing every problem.
pub fn parse_job(value: Value) -> Result<Job, Problems> {
    parse_job_with_defaults(&Value::Null, value)
}

/// Parses and validates one job definition with the `defaults` of a jobs file (the object
/// under its `defaults` key; `null` for none) — how the server reads jobs stored in its
/// database. Paths in problems start at the job (`schedule.at`), or at `defaults`.
///
/// # Errors
/// [`Problems`] listing every problem.
pub fn parse_job_with_defaults(defaults_value: &Value, value: Value) -> Result<Job, Problems> {
    let mut problems = Vec::new();
    let defaults = if defaults_value.is_null() {
        Defaults::default()
    } else {
        let mut r = Reporter {
            base: "defaults".to_owned(),
            job: None,
            problems: &mut problems,
        };
        match serde_json::from_value::<Checked<DefaultsSpec>>(defaults_value.clone()) {
            Ok(spec) => {
                let spec = r.take("", Some(spec)).unwrap_or_default();
                self::defaults(&spec, &mut r)
            }
            Err(e) => {
                r.report("", e);
                Defaults::default()
            }
        }
    };
    let job = {
        let mut r = Reporter {
            base: String::new(),
            job: None,
            problems: &mut problems,
        };
        match serde_json::from_value::<Checked<JobSpec>>(value) {
            Ok(spec) => r
                .take("", Some(spec))
                .and_then(|spec| job(spec, &defaults, &mut r)),
            Err(e) => {
                r.report("", e);
                None
            }
        }
    };
    match job {
        Some(job) if problems.is_empty() => Ok(job),
        _ => Err(Problems(problems)),
    }
}

fn defaults(spec: &DefaultsSpec, r: &mut Reporter<'_>) -> Defaults {
    let builtin = Defaults::default();
    Defaults {
        zone: spec
            .timezone
            .as_deref()
            .and_then(|name| r.check("timezone", Zone::parse(name)))
            .unwrap_or(builtin.zone),
        priority: spec
            .priority
            .as_ref()
            .and_then(|p| priority(p, r, "priority"))
            .unwrap_or(builtin.priority),
        execution: spec.execution.as_ref().map_or(builtin.execution, |e| {
            execution(e, builtin.execution, r, "execution")
        }),
        retry: spec
            .retry
            .as_ref()
            .map_or(builtin.retry, |e| retry(e, builtin.retry, r, "retry")),
        overlap: spec.overlap.map_or(builtin.overlap, overlap),
        misfire: spec.misfire.as_ref().map_or(builtin.misfire, |m| {
            misfire(m, builtin.misfire, r, "misfire")
        }),
    }
}

/// Validates one job; `None` when a problem was reported.
fn job(spec: JobSpec, defaults: &Defaults, r: &mut Reporter<'_>) -> Option<Job> {
    let before = r.problems.len();
    for key in spec.unknown.keys() {
        r.report(
            key,
            format!("unknown field, expected one of {}", JOB_FIELDS.join(", ")),
        );
    }
    let id = required(r, "id", spec.id).and_then(|id| r.check("id", JobId::parse(id)));
    if let Some(id) = &id {
        r.job = Some(id.to_string());
        // Problems reported before the id was known belong to this job too.
        for problem in &mut r.problems[before..] {
            problem.job = Some(id.to_string());
        }
    }
    let tenant =
        required(r, "tenant", spec.tenant).and_then(|t| r.check("tenant", TenantId::parse(t)));
    let batch_type = required(r, "type", spec.batch_type).map(batch_type);
    let template = required(r, "template", spec.template)
        .and_then(|t| r.check("template", TemplateId::parse(t)));
    let description = r.take("description", spec.description);
    let enabled = r.take("enabled", spec.enabled).unwrap_or(true);
    let source = required(r, "source", spec.source).and_then(|s| source(&s, batch_type, r));
    let schedule_spec = r.take("schedule", spec.schedule);
    let priority = r
        .take("priority", spec.priority)
        .map_or(Some(defaults.priority), |p| priority(&p, r, "priority"));
    let execution = r
        .take("execution", spec.execution)
        .map_or(defaults.execution, |e| {
            execution(&e, defaults.execution, r, "execution")
        });
    let retry = r
        .take("retry", spec.retry)
        .map_or(defaults.retry, |e| retry(&e, defaults.retry, r, "retry"));
    let distribution = r
        .take("distribution", spec.distribution)
        .map(|d| distribution(&d, r))
        .unwrap_or_default();
    let overlap = r
        .take("overlap", spec.overlap)
        .map_or(defaults.overlap, overlap);
    let misfire = r
        .take("misfire", spec.misfire)
        .map_or(defaults.misfire, |m| {
            misfire(&m, defaults.misfire, r, "misfire")
        });
    let feature_type = r.take("feature_type", spec.feature_type);
    let default_preferences = r.take("default_preferences", spec.default_preferences);

    let is_dynamic = batch_type.is_some_and(|t| t.is_dynamic());
    let schedule = match (&schedule_spec, is_dynamic) {
        (Some(_), true) => {
            r.report(
                "schedule",
                "a PREFERENCE_ job fires from its users' preferences; put the default schedule in default_preferences.schedule",
            );
            None
        }
        (Some(s), false) => schedule(s, defaults.zone, r, "schedule"),
        (None, _) => None,
    };
    let dynamic = if is_dynamic {
        let feature_type = match feature_type {
            Some(f) => r.check("feature_type", FeatureType::parse(f)),
            None => {
                r.report("feature_type", "is required for PREFERENCE_ jobs");
                None
            }
        };
        let defaults = default_preferences
            .map(|d| preference_defaults(&d, defaults.zone, r))
            .unwrap_or_default();
        feature_type.map(|feature_type| Dynamic {
            feature_type,
            defaults,
        })
    } else {
        if feature_type.is_some() {
            r.report("feature_type", "only PREFERENCE_ jobs take a feature_type");
        }
        if default_preferences.is_some() {
            r.report(
                "default_preferences",
                "only PREFERENCE_ jobs take default_preferences",
            );
        }
        None
    };

    if r.problems.len() > before {
        return None;
    }
    Some(Job {
        id: id?,
        tenant: tenant?,
        batch_type: batch_type?,
        template: template?,
        description,
        enabled,
        source: source?,
        schedule,
        priority: priority?,
        execution,
        retry,
        distribution,
        overlap,
        misfire,
        dynamic,
    })
}

fn required<T>(r: &mut Reporter<'_>, key: &str, field: Option<Checked<T>>) -> Option<T> {
    if field.is_none() {
        r.report(key, "is required");
    }
    r.take(key, field)
}

fn batch_type(spec: BatchTypeSpec) -> BatchType {
    use BatchTypeSpec as S;
    use DataSource::{Categories, Users};
    use ProcessingMethod::{Batch, Individual};
    let (method, data, dynamic) = match spec {
        S::IndividualUsers => (Individual, Users, false),
        S::IndividualCategories => (Individual, Categories, false),
        S::BatchUsers => (Batch, Users, false),
        S::BatchCategories => (Batch, Categories, false),
        S::PreferenceIndividualUsers => (Individual, Users, true),
        S::PreferenceIndividualCategories => (Individual, Categories, true),
        S::PreferenceBatchUsers => (Batch, Users, true),
        S::PreferenceBatchCategories => (Batch, Categories, true),
    };
    BatchType {
        method,
        data,
        preferences: if dynamic {
            crate::batch_type::PreferenceSource::Dynamic
        } else {
            crate::batch_type::PreferenceSource::Static
        },
    }
}

fn priority(spec: &PrioritySpec, r: &mut Reporter<'_>, rel: &str) -> Option<Priority> {
    match spec {
        PrioritySpec::Name(name) => r.check(rel, Priority::from_name(name)),
        PrioritySpec::Level(level) => r.check(rel, Priority::new(*level)),
    }
}

/// Checks `value` lies in `min..=max` and converts it.
fn bounded<T: TryFrom<u64>>(
    r: &mut Reporter<'_>,
    rel: &str,
    value: Option<u64>,
    min: u64,
    max: u64,
) -> Option<T> {
    let value = value?;
    if (min..=max).contains(&value) {
        T::try_from(value).ok()
    } else {
        r.report(rel, format!("{value} is out of range ({min}-{max})"));
        None
    }
}

fn execution(
    spec: &ExecutionSpec,
    base: ExecutionLimits,
    r: &mut Reporter<'_>,
    rel: &str,
) -> ExecutionLimits {
    let at = |key: &str| join(rel, key);
    let rate_limit_per_sec = match spec.rate_limit_per_sec {
        Some(rate) if rate.is_finite() && rate > 0.0 => Some(rate),
        Some(rate) => {
            r.report(
                &at("rate_limit_per_sec"),
                format!("{rate} is not a rate above 0"),
            );
            base.rate_limit_per_sec
        }
        None => base.rate_limit_per_sec,
    };
    ExecutionLimits {
        concurrency: bounded(r, &at("concurrency"), spec.concurrency, 1, 10_000)
            .unwrap_or(base.concurrency),
        rate_limit_per_sec,
        chunk_size: bounded(r, &at("chunk_size"), spec.chunk_size, 1, 100_000)
            .unwrap_or(base.chunk_size),
        timeout: bounded::<u64>(r, &at("timeout_ms"), spec.timeout_ms, 1, 3_600_000)
            .map_or(base.timeout, Duration::from_millis),
    }
}

fn retry(spec: &RetrySpec, base: RetryPolicy, r: &mut Reporter<'_>, rel: &str) -> RetryPolicy {
    let at = |key: &str| join(rel, key);
    let multiplier = match spec.multiplier {
        Some(m) if m.is_finite() && (1.0..=100.0).contains(&m) => m,
        Some(m) => {
            r.report(&at("multiplier"), format!("{m} is out of range (1-100)"));
            base.multiplier
        }
        None => base.multiplier,
    };
    let policy = RetryPolicy {
        max_attempts: bounded(r, &at("max_attempts"), spec.max_attempts, 1, 100)
            .unwrap_or(base.max_attempts),
        initial_backoff: bounded::<u64>(
            r,
            &at("initial_backoff_ms"),
            spec.initial_backoff_ms,
            0,
            86_400_000,
        )
        .map_or(base.initial_backoff, Duration::from_millis),
        multiplier,
        max_backoff: bounded::<u64>(r, &at("max_backoff_ms"), spec.max_backoff_ms, 0, 86_400_000)
            .map_or(base.max_backoff, Duration::from_millis),
        jitter: match spec.jitter {
            Some(JitterSpec::None) => Jitter::None,
            Some(JitterSpec::Full) => Jitter::Full,
            Some(JitterSpec::Equal) => Jitter::Equal,
            None => base.jitter,
        },
    };
    if (spec.max_backoff_ms.is_some() || spec.initial_backoff_ms.is_some())
        && policy.max_backoff < policy.initial_backoff
    {
        r.report(
            &at("max_backoff_ms"),
            format!(
                "{} is less than initial_backoff_ms {}",
                policy.max_backoff.as_millis(),
                policy.initial_backoff.as_millis()
            ),
        );
    }
    policy
}

fn overlap(spec: OverlapSpec) -> Overlap {
    match spec {
        OverlapSpec::Skip => Overlap::Skip,
        OverlapSpec::BufferOne => Overlap::BufferOne,
        OverlapSpec::BufferAll => Overlap::BufferAll,
        OverlapSpec::CancelOther => Overlap::CancelOther,
        OverlapSpec::AllowAll => Overlap::AllowAll,
    }
}

fn misfire(spec: &MisfireSpec, base: Misfire, r: &mut Reporter<'_>, rel: &str) -> Misfire {
    let window = bounded::<u64>(
        r,
        &join(rel, "window_seconds"),
        spec.window_seconds,
        1,
        366 * 86_400,
    )
    .map(Duration::from_secs);
    let policy = spec.policy.unwrap_or(match base {
        Misfire::Skip => MisfirePolicySpec::Skip,
        Misfire::FireOnce => MisfirePolicySpec::FireOnce,
        Misfire::CatchUp { .. } => MisfirePolicySpec::CatchUp,
    });
    match policy {
        MisfirePolicySpec::CatchUp => Misfire::CatchUp {
            window: window.unwrap_or(match base {
                Misfire::CatchUp { window } => window,
                _ => Duration::from_secs(3_600),
            }),
        },
        other => {
            if spec.window_seconds.is_some() {
                r.report(
                    &join(rel, "window_seconds"),
                    "only applies to the catch_up policy",
                );
            }
            if other == MisfirePolicySpec::Skip {
                Misfire::Skip
            } else {
                Misfire::FireOnce
            }
        }
    }
}

/// Parses a schedule; `None` after reporting its problems.
fn schedule(
    spec: &ScheduleSpec,
    default_zone: Zone,
    r: &mut Reporter<'_>,
    rel: &str,
) -> Option<Schedule> {
    let before = r.problems.len();
    let at_key = |key: &str| join(rel, key);
    let zone = match &spec.timezone {
        Some(name) => r.check(&at_key("timezone"), Zone::parse(name)),
        None => Some(default_zone),
    };
    let jitter_seconds: Option<u32> = bounded(
        r,
        &at_key("jitter_seconds"),
        spec.jitter_seconds,
        0,
        604_800,
    );
    let present: [(&str, bool); 5] = [
        ("minute", spec.minute.is_some()),
        ("at", spec.at.is_some()),
        ("on", spec.on.is_some()),
        ("day", spec.day.is_some()),
        ("anchor", spec.anchor.is_some()),
    ];
    let allowed: &[&str] = match spec.frequency {
        None => &[],
        Some(FrequencySpec::Hourly) => &["minute"],
        Some(FrequencySpec::Daily) => &["at"],
        Some(FrequencySpec::Weekly) => &["on", "at"],
        Some(FrequencySpec::Biweekly) => &["on", "at", "anchor"],
        Some(FrequencySpec::Monthly) => &["day", "at"],
    };
    let kind = match spec.frequency {
        None => "cron",
        Some(FrequencySpec::Hourly) => "hourly",
        Some(FrequencySpec::Daily) => "daily",
        Some(FrequencySpec::Weekly) => "weekly",
        Some(FrequencySpec::Biweekly) => "biweekly",
        Some(FrequencySpec::Monthly) => "monthly",
    };
    for (key, is_present) in present {
        if is_present && !allowed.contains(&key) {
            r.report(&at_key(key), format!("is not used by a {kind} schedule"));
        }
    }
    for key in allowed {
        let is_present = present.iter().any(|(k, p)| k == key && *p);
        if !is_present && *key != "minute" {
            r.report(&at_key(key), format!("is required for a {kind} schedule"));
        }
    }
    let at = spec
        .at
        .as_deref()
        .and_then(|t| r.check(&at_key("at"), TimeOfDay::parse(t)));
    let on = spec
        .on
        .as_deref()
        .and_then(|d| r.check(&at_key("on"), parse_weekday(d)));
    let recurrence = match (&spec.cron, spec.frequency) {
        (Some(_), Some(_)) => {
            r.report(rel, "give either cron or frequency, not both");
            None
        }
        (None, None) => {
            r.report(rel, "needs cron or frequency");
            None
        }
        (Some(text), None) => r
            .check(&at_key("cron"), CronSpec::parse(text))
            .map(Recurrence::Cron),
        (None, Some(FrequencySpec::Hourly)) => {
            bounded(r, &at_key("minute"), Some(spec.minute.unwrap_or(0)), 0, 59)
                .map(|minute| Recurrence::Hourly { minute })
        }
        (None, Some(FrequencySpec::Daily)) => at.map(|at| Recurrence::Daily { at }),
        (None, Some(FrequencySpec::Weekly)) => Some(Recurrence::Weekly { on: on?, at: at? }),
        (None, Some(FrequencySpec::Biweekly)) => {
            let anchor = spec.anchor.as_deref().and_then(|text| {
                r.check(
                    &at_key("anchor"),
                    NaiveDate::parse_from_str(text, "%Y-%m-%d")
                        .map_err(|_| format!("{text:?} is not a date (YYYY-MM-DD)")),
                )
            });
            match (anchor, on) {
                (Some(anchor), Some(on)) if anchor.weekday() != on => {
                    r.report(
                        &at_key("anchor"),
                        format!(
                            "{anchor} is a {}, but on is {}",
                            weekday_name(anchor.weekday()),
                            weekday_name(on)
                        ),
                    );
                    None
                }
                (Some(anchor), Some(_)) => Some(Recurrence::Biweekly { anchor, at: at? }),
                _ => None,
            }
        }
        (None, Some(FrequencySpec::Monthly)) => bounded(r, &at_key("day"), spec.day, 1, 31)
            .and_then(|day| Some(Recurrence::Monthly { day, at: at? })),
    };
    if r.problems.len() > before {
        return None;
    }
    Some(Schedule {
        recurrence: recurrence?,
        zone: zone?,
        jitter_seconds: jitter_seconds.unwrap_or(0),
    })
}

fn source(
    spec: &SourceSpec,
    batch_type: Option<BatchType>,
    r: &mut Reporter<'_>,
) -> Option<Source> {
    let given = [
        spec.users.is_some(),
        spec.category.is_some(),
        spec.categories.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given != 1 {
        r.report(
            "source",
            "needs exactly one of users, category or categories",
        );
        return None;
    }
    let source = if let Some(users) = &spec.users {
        users_selection(users, r).map(Source::Users)
    } else if let Some(category) = &spec.category {
        category_selection(category, r, "source.category").map(Source::Category)
    } else {
        let list = spec.categories.as_deref().unwrap_or_default();
        if list.len() < 2 {
            r.report(
                "source.categories",
                "a combined job needs two or more categories; use category for one",
            );
        }
        let mut first: HashMap<&str, usize> = HashMap::new();
        for (i, c) in list.iter().enumerate() {
            if let Some(j) = first.insert(c.name.as_str(), i) {
                r.report(
                    &format!("source.categories[{i}].name"),
                    format!("duplicate of source.categories[{j}]"),
                );
            }
        }
        let selections: Vec<_> = list
            .iter()
            .enumerate()
            .filter_map(|(i, c)| category_selection(c, r, &format!("source.categories[{i}]")))
            .collect();
        (selections.len() == list.len() && list.len() >= 2)
            .then_some(Source::Categories(selections))
    }?;
    let batch_type = batch_type?;
    match (&source, batch_type.data) {
        (Source::Users(_), DataSource::Categories) => {
            r.report(
                "source",
                format!("{batch_type} takes category or categories, not users"),
            );
            None
        }
        (Source::Category(_) | Source::Categories(_), DataSource::Users) => {
            r.report(
                "source",
                format!("{batch_type} takes users, not categories"),
            );
            None
        }
        (Source::Categories(_), _) if batch_type.method == ProcessingMethod::Individual => {
            r.report(
                "source.categories",
                format!(
                    "several categories make a combined job, which needs a BATCH_ type, not {batch_type}"
                ),
            );
            None
        }
        _ => Some(source),
    }
}

fn users_selection(spec: &UsersSpec, r: &mut Reporter<'_>) -> Option<UserSelection> {
    match (&spec.ids, &spec.filter) {
        (Some(_), Some(_)) => {
            r.report("source.users", "give either ids or filter, not both");
            None
        }
        (None, None) => {
            r.report("source.users", "needs ids or filter");
            None
        }
        (Some(ids), None) => {
            if spec.limit.is_some() {
                r.report("source.users.limit", "only applies to filter");
            }
            if ids.is_empty() {
                r.report("source.users.ids", "must name at least one user");
            }
            let mut first: HashMap<&str, usize> = HashMap::new();
            let mut parsed = Vec::with_capacity(ids.len());
            for (i, id) in ids.iter().enumerate() {
                let rel = format!("source.users.ids[{i}]");
                if let Some(j) = first.insert(id.as_str(), i) {
                    r.report(&rel, format!("duplicate of source.users.ids[{j}]"));
                }
                parsed.extend(r.check(&rel, UserId::parse(id.as_str())));
            }
            (parsed.len() == ids.len() && !ids.is_empty()).then_some(UserSelection::Ids(parsed))
        }
        (None, Some(filter)) => {
            let filters = filters(filter, r, "source.users.filter");
            let limit = limit(spec.limit, r, "source.users.limit");
            Some(UserSelection::Filter {
                filters: filters?,
                limit,
            })
        }
    }
}

fn limit(value: Option<u64>, r: &mut Reporter<'_>, rel: &str) -> Option<u64> {
    bounded(r, rel, value, 1, 100_000_000)
}

fn category_selection(
    spec: &CategorySpec,
    r: &mut Reporter<'_>,
    rel: &str,
) -> Option<CategorySelection> {
    let name = r
        .check(&join(rel, "name"), ids::check(&spec.name, 128))
        .map(|()| spec.name.clone());
    let filters = match &spec.filters {
        Some(map) => filters(map, r, &join(rel, "filters")),
        None => Some(Vec::new()),
    };
    let limit = limit(spec.limit, r, &join(rel, "limit"));
    Some(CategorySelection {
        name: name?,
        filters: filters?,
        limit,
    })
}

fn is_scalar(value: &Value) -> bool {
    matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

/// Parses filter conditions; field names are restricted so that adapters can compile them to
/// SQL column or JSON paths safely.
fn filters(map: &Map<String, Value>, r: &mut Reporter<'_>, rel: &str) -> Option<Vec<Filter>> {
    let before = r.problems.len();
    let mut out = Vec::with_capacity(map.len());
    for (field, value) in map {
        let at = join(rel, field);
        let valid_name = field
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && field.len() <= 64;
        if !valid_name {
            r.report(
                &at,
                "is not a field name (a letter or _ followed by letters, digits or _)",
            );
            continue;
        }
        let condition = match value {
            v if is_scalar(v) => Some(Condition::Eq(v.clone())),
            Value::Object(ops) => condition(ops, r, &at),
            _ => {
                r.report(
                    &at,
                    "must be a string, number or boolean, or an object with in, gt, gte, lt or lte",
                );
                None
            }
        };
        if let Some(condition) = condition {
            out.push(Filter {
                field: field.clone(),
                condition,
            });
        }
    }
    (r.problems.len() == before).then_some(out)
}

fn condition(ops: &Map<String, Value>, r: &mut Reporter<'_>, rel: &str) -> Option<Condition> {
    if ops.is_empty() {
        r.report(rel, "needs in, gt, gte, lt or lte");
        return None;
    }
    if let Some(list) = ops.get("in") {
        if ops.len() > 1 {
            r.report(rel, "in cannot be combined with other operators");
            return None;
        }
        return match list {
            Value::Array(items) if !items.is_empty() && items.iter().all(is_scalar) => {
                Some(Condition::In(items.clone()))
            }
            _ => {
                r.report(
                    &join(rel, "in"),
                    "must be a non-empty list of strings, numbers or booleans",
                );
                None
            }
        };
    }
    let mut bounds: [Option<Value>; 4] = Default::default();
    let mut kinds = Vec::new();
    for (op, value) in ops {
        let slot = match op.as_str() {
            "gt" => 0,
            "gte" => 1,
            "lt" => 2,
            "lte" => 3,
            _ => {
                r.report(&join(rel, op), "is not an operator (in, gt, gte, lt, lte)");
                return None;
            }
        };
        match value {
            Value::Number(_) => kinds.push("number"),
            Value::String(_) => kinds.push("string"),
            _ => {
                r.report(&join(rel, op), "a range bound must be a number or a string");
                return None;
            }
        }
        bounds[slot] = Some(value.clone());
    }
    if kinds.windows(2).any(|w| w[0] != w[1]) {
        r.report(rel, "range bounds must all be numbers or all be strings");
        return None;
    }
    let [gt, gte, lt, lte] = bounds;
    Some(Condition::Range { gt, gte, lt, lte })
}

fn distribution(spec: &DistributionSpec, r: &mut Reporter<'_>) -> Distribution {
    let users = spec
        .users
        .iter()
        .enumerate()
        .filter_map(|(i, u)| {
            r.check(
                &format!("distribution.users[{i}]"),
                UserId::parse(u.as_str()),
            )
        })
        .collect();
    let delivery_template = spec
        .delivery_template
        .as_deref()
        .and_then(|t| r.check("distribution.delivery_template", TemplateId::parse(t)));
    Distribution {
        users,
        delivery_template,
    }
}

fn preference_defaults(
    spec: &DefaultPreferencesSpec,
    zone: Zone,
    r: &mut Reporter<'_>,
) -> PreferenceDefaults {
    PreferenceDefaults {
        schedule: spec
            .schedule
            .as_ref()
            .and_then(|s| schedule(s, zone, r, "default_preferences.schedule")),
        template: spec
            .template
            .as_deref()
            .and_then(|t| r.check("default_preferences.template", TemplateId::parse(t))),
        parameters: spec.parameters.clone(),
    }
}
