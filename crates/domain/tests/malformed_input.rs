//! F11 (issue 9), the parsers' half: malformed input gets a clear error, never a panic.
//!
//! * Every field of the repository's `config/jobs.json` (each job's and the defaults', down to
//!   the leaves) is made wrong in turn: another type, negative, empty, huge, an unknown enum
//!   variant, removed, or joined by an unknown field. `parse_jobs_file` must not panic; when it
//!   rejects the file, a problem names the field; when it accepts it, the change must be one a
//!   valid file may make (an optional field removed, a free-form value changed), which
//!   [`may_accept`] lists.
//! * Random bytes, random strings and random JSON values go into `parse_jobs_file`,
//!   `parse_job_with_defaults` and the schedule parsers (cron, time of day, zone, weekday, the
//!   `schedule` object), and every schedule that parses is asked for its next fires. The case
//!   counts are bounded so the suite stays fast.

#![allow(clippy::unwrap_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use batch_domain::config::{parse_job, parse_job_with_defaults, parse_jobs_file};
use batch_domain::schedule::{CronSpec, Recurrence, Schedule};
use batch_domain::time::{TimeOfDay, Zone, parse_weekday};
use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};

/// The repository's jobs file.
fn jobs_file() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/jobs.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// One way of making a field wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrong {
    /// Another JSON type (string ↔ number, bool → string, object or array → string).
    Type,
    /// A negative number.
    Negative,
    /// A number beyond any sensible bound (1e30).
    Huge,
    /// An empty string, list or object.
    Empty,
    /// A string no enum has as a variant.
    UnknownVariant,
    /// The field removed.
    Removed,
    /// An unknown field added to the object.
    UnknownField,
}

/// The replacement of `value` for a kind of wrong, if that kind applies to it.
fn wrong(value: &Value, kind: Wrong) -> Option<Value> {
    match (kind, value) {
        (Wrong::Type, Value::String(_)) => Some(json!(42)),
        (Wrong::Type, Value::Number(_)) => Some(json!("42")),
        (Wrong::Type, Value::Bool(b)) => Some(json!(b.to_string())),
        (Wrong::Type, Value::Object(_) | Value::Array(_)) => Some(json!("x")),
        (Wrong::Negative, Value::Number(_)) => Some(json!(-1)),
        (Wrong::Huge, Value::Number(_)) => Some(json!(1e30)),
        (Wrong::Empty, Value::String(_)) => Some(json!("")),
        (Wrong::Empty, Value::Array(_)) => Some(json!([])),
        (Wrong::Empty, Value::Object(_)) => Some(json!({})),
        (Wrong::UnknownVariant, Value::String(_)) => Some(json!("no_such_variant!")),
        _ => None,
    }
}

/// Every field path under `value` (`jobs[3].schedule.at`, `defaults.retry.jitter`), with the
/// value there.
fn fields(path: &str, value: &Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                out.push((child_path.clone(), child.clone()));
                fields(&child_path, child, out);
            }
        }
        Value::Array(items) => {
            for (n, child) in items.iter().enumerate() {
                let child_path = format!("{path}[{n}]");
                out.push((child_path.clone(), child.clone()));
                fields(&child_path, child, out);
            }
        }
        _ => {}
    }
}

/// The JSON pointer of a field path (`jobs[3].schedule.at` → `/jobs/3/schedule/at`).
fn pointer(path: &str) -> String {
    path.replace('[', ".")
        .replace(']', "")
        .split('.')
        .filter(|s| !s.is_empty())
        .fold(String::new(), |acc, s| format!("{acc}/{s}"))
}

/// The file with the field at `path` made wrong by `kind`; `None` when `kind` does not apply.
fn mutated(file: &Value, path: &str, kind: Wrong) -> Option<Value> {
    let mut file = file.clone();
    let target = pointer(path);
    let (parent, last) = target.rsplit_once('/')?;
    match kind {
        Wrong::Removed => match file.pointer_mut(parent)? {
            Value::Object(map) => {
                map.remove(last)?;
            }
            Value::Array(items) => {
                items.remove(last.parse().ok()?);
            }
            _ => return None,
        },
        Wrong::UnknownField => {
            file.pointer_mut(&target)?
                .as_object_mut()?
                .insert("unexpected_field".to_owned(), json!(1));
        }
        _ => {
            let slot = file.pointer_mut(&target)?;
            *slot = wrong(slot, kind)?;
        }
    }
    Some(file)
}

/// Changes a valid file may make: removing an optional field, changing a free-form value
/// (descriptions, filter conditions, preference parameters, user lists and ids, template
/// names), or values whose wrong variants are still valid (a negative filter bound, a 0 that
/// stays 0…). Everything else must be rejected.
fn may_accept(path: &str, kind: Wrong) -> bool {
    let last = path.rsplit(['.', '[']).next().unwrap_or_default();
    // Free-form values: any JSON is a valid filter condition or parameter.
    let free = [".filter", ".filters", ".parameters"]
        .iter()
        .any(|p| path.contains(p));
    if free {
        return true;
    }
    // Optional fields (with a default, or meaningful when absent).
    let optional = [
        "$schema",
        "description",
        "schedule",
        "priority",
        "execution",
        "retry",
        "distribution",
        "overlap",
        "misfire",
        "concurrency",
        "chunk_size",
        "timeout_ms",
        "rate_limit_per_sec",
        "max_attempts",
        "initial_backoff_ms",
        "multiplier",
        "max_backoff_ms",
        "jitter",
        "jitter_seconds",
        "timezone",
        "limit",
        "delivery_template",
        "window_seconds",
        "template",
        "defaults",
        "filters",
        "policy",
        // `hourly` without a minute fires at minute 0.
        "minute",
    ];
    let in_list = path.ends_with(']');
    // A distribution to nobody, and a Dynamic job without default preferences (its users
    // without a preference of their own do not fire), are valid.
    if path.contains(".distribution") && matches!(kind, Wrong::Removed | Wrong::Empty) {
        return true;
    }
    if last == "default_preferences" && matches!(kind, Wrong::Removed | Wrong::Empty) {
        return true;
    }
    match kind {
        // A priority is a name or a number from 0 to 100: a name replaced by 42 is valid.
        Wrong::Type => last == "priority",
        // Any finite rate above zero is a rate.
        Wrong::Huge => last == "rate_limit_per_sec",
        Wrong::Removed => {
            optional.contains(&last)
                // One element of a list of several is still a list.
                || (in_list && !path.contains("categories["))
                // A category-list job with two left becomes a one-category list of one...
                || path.ends_with("categories[0]")
                || path.ends_with("categories[1]")
        }
        // Identifiers, names and free text: any non-empty text is one.
        Wrong::UnknownVariant => {
            matches!(
                last,
                "description" | "template" | "id" | "tenant" | "name" | "delivery_template"
            ) || in_list
                || path.ends_with("default_preferences.template")
                || path.ends_with("feature_type")
        }
        Wrong::Empty => {
            matches!(
                last,
                "description" | "execution" | "retry" | "misfire" | "schedule"
            ) || path.ends_with("defaults")
        }
        _ => false,
    }
}

/// Every field of the repository's jobs file, made wrong in every applicable way: no panic, a
/// rejection names the field, and only changes a valid file may make are accepted.
#[test]
fn every_field_of_the_jobs_file_made_wrong_in_turn() {
    let file = jobs_file();
    assert!(parse_jobs_file(&file.to_string()).is_ok());
    let mut paths = Vec::new();
    for key in ["defaults", "jobs"] {
        fields(key, &file[key], &mut paths);
    }
    paths.insert(0, ("defaults".to_owned(), file["defaults"].clone()));
    let kinds = [
        Wrong::Type,
        Wrong::Negative,
        Wrong::Huge,
        Wrong::Empty,
        Wrong::UnknownVariant,
        Wrong::Removed,
        Wrong::UnknownField,
    ];
    let (mut tried, mut rejected) = (0, 0);
    let mut failures = Vec::new();
    for (path, _) in &paths {
        for kind in kinds {
            let Some(bad) = mutated(&file, path, kind) else {
                continue;
            };
            tried += 1;
            let text = bad.to_string();
            let parsed = match catch_unwind(AssertUnwindSafe(|| parse_jobs_file(&text))) {
                Ok(parsed) => parsed,
                Err(_) => {
                    failures.push(format!("{path} {kind:?}: panicked"));
                    continue;
                }
            };
            match parsed {
                Ok(_) if may_accept(path, kind) => {}
                Ok(_) => failures.push(format!("{path} {kind:?}: accepted")),
                Err(problems) => {
                    rejected += 1;
                    let message = problems.to_string();
                    // The field, or the object that lost or gained it, is named.
                    // The field is named, or the object holding it (a field removed or
                    // added, a rule over several fields such as range bounds).
                    let parent = path.rsplit_once(['.', '[']).map_or("", |(p, _)| p);
                    let named = message.contains(path.as_str()) || message.contains(parent);
                    if !named || problems.0.iter().any(|p| p.message.trim().is_empty()) {
                        failures.push(format!("{path} {kind:?}: not named in {message}"));
                    }
                }
            }
        }
    }
    println!("{tried} wrong files, {rejected} rejected");
    assert!(tried > 500, "only {tried} mutations");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A moment to compute next fires after.
fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-03-14T07:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for a schedule field: the right kind or near it, with edge cases.
fn schedule_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[0-9*/,LW#?-]{1,4}( [0-9*/,LW#?A-Z-]{1,6}){4,6}".prop_map(Value::String),
        "[0-9]{1,2}:[0-9]{1,2}".prop_map(Value::String),
        "(monday|sunday|Mon|funday|)".prop_map(Value::String),
        "(hourly|daily|weekly|biweekly|monthly|yearly)".prop_map(Value::String),
        "(UTC|Europe/Berlin|Pacific/Chatham|America/Sao_Paulo|Mars/Olympus|)"
            .prop_map(Value::String),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}".prop_map(Value::String),
        any::<u64>().prop_map(|n| json!(n)),
        (0u64..100).prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        Just(Value::Null),
    ]
}

/// A `schedule` object of the jobs file, with its real field names and edgy values.
fn schedule_object() -> impl Strategy<Value = Value> {
    let keys = prop_oneof![
        Just("cron"),
        Just("frequency"),
        Just("minute"),
        Just("at"),
        Just("on"),
        Just("day"),
        Just("anchor"),
        Just("timezone"),
        Just("jitter_seconds"),
        Just("unknown"),
    ];
    proptest::collection::btree_map(keys, schedule_value(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// Asks a schedule for its next fires (the part that could loop or overflow).
fn exercise(schedule: &Schedule) {
    let _ = schedule.next_nominal(now());
    for (nominal, fire) in schedule.upcoming("job", now(), 3) {
        assert!(
            fire >= nominal,
            "{schedule}: fires at {fire} before {nominal}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Random bytes are never a jobs file, and say why.
    #[test]
    fn random_bytes_into_the_jobs_file_parser(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let text = String::from_utf8_lossy(&bytes);
        let problems = parse_jobs_file(&text).unwrap_err();
        prop_assert!(!problems.0.is_empty());
        prop_assert!(problems.0.iter().all(|p| !p.message.trim().is_empty()));
    }

    /// Random strings, and random JSON documents under a `jobs` key: an error with a message,
    /// or a valid file.
    #[test]
    fn random_text_and_json_into_the_jobs_file_parser(text in ".{0,80}", jobs in any_json(), defaults in any_json()) {
        if let Err(problems) = parse_jobs_file(&text) {
            prop_assert!(problems.0.iter().all(|p| !p.message.trim().is_empty()));
        }
        let document = json!({"defaults": defaults, "jobs": jobs});
        if let Err(problems) = parse_jobs_file(&document.to_string()) {
            prop_assert!(!problems.to_string().trim().is_empty());
        }
    }

    /// Random JSON values as a job and as the file's defaults.
    #[test]
    fn random_json_into_parse_job_with_defaults(job in any_json(), defaults in any_json()) {
        if let Err(problems) = parse_job_with_defaults(&defaults, job) {
            prop_assert!(!problems.0.is_empty());
            prop_assert!(problems.0.iter().all(|p| !p.message.trim().is_empty()));
        }
    }

    /// Random text into every schedule field parser; a cron expression that parses yields
    /// next fires without a panic.
    #[test]
    fn random_text_into_the_schedule_parsers(text in ".{0,40}", cronish in "[0-9*/,LW#?A-Z -]{0,40}") {
        for input in [text.as_str(), cronish.as_str()] {
            match CronSpec::parse(input) {
                Ok(spec) => exercise(&Schedule::new(Recurrence::Cron(spec), Zone::UTC)),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            if let Err(e) = TimeOfDay::parse(input) {
                prop_assert!(!e.to_string().is_empty());
            }
            if let Err(e) = Zone::parse(input) {
                prop_assert!(!e.to_string().is_empty());
            }
            if let Err(e) = parse_weekday(input) {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    /// Random `schedule` objects in an otherwise valid job: an error naming `schedule`, or a
    /// schedule whose next fires can be computed.
    #[test]
    fn random_schedule_objects_in_a_job(schedule in schedule_object()) {
        let job = json!({
            "id": "fuzzed", "tenant": "acme", "type": "INDIVIDUAL_USERS", "template": "digest",
            "source": {"users": {"ids": ["u001"]}},
            "schedule": schedule,
        });
        match parse_job(job) {
            Ok(job) => {
                if let Some(schedule) = job.effective_schedule() {
                    exercise(schedule);
                }
            }
            Err(problems) => {
                prop_assert!(
                    problems.0.iter().all(|p| p.path.starts_with("schedule") && !p.message.is_empty()),
                    "{}", problems
                );
            }
        }
    }
}
