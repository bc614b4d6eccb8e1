use serde_json::{Value, json};

use super::validate::JOB_FIELDS;
use super::*;

fn minimal() -> Value {
    json!({
        "id": "nightly-digest",
        "tenant": "acme",
        "type": "INDIVIDUAL_USERS",
        "template": "digest",
        "source": {"users": {"ids": ["u1", "u2"]}},
        "schedule": {"frequency": "daily", "at": "02:30", "timezone": "America/New_York"}
    })
}

fn file(jobs: Vec<Value>) -> String {
    json!({ "jobs": jobs }).to_string()
}

/// Sets `pointer` (a JSON pointer) in the minimal job to `value`, or removes it for `null`.
fn with(pointer: &str, value: Value) -> Value {
    let mut job = minimal();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = if parent.is_empty() {
        &mut job
    } else {
        if job.pointer(parent).is_none() {
            job.as_object_mut()
                .unwrap()
                .insert(parent[1..].to_owned(), json!({}));
        }
        job.pointer_mut(parent).unwrap()
    };
    let object = target.as_object_mut().unwrap();
    if value.is_null() {
        object.remove(key);
    } else {
        object.insert(key.to_owned(), value);
    }
    job
}

/// Asserts that `job` is rejected with a problem at `path` whose message contains `fragment`.
fn check(job: Value, path: &str, fragment: &str) {
    let problems = parse_jobs_file(&file(vec![job.clone()])).expect_err(&format!("accepted {job}"));
    assert!(
        problems
            .0
            .iter()
            .any(|p| p.path == path && p.message.contains(fragment)),
        "expected `{path}: …{fragment}…`, got:\n{problems}"
    );
}

#[test]
fn the_minimal_job_is_valid_with_everything_else_from_defaults() {
    let jobs = parse_jobs_file(&file(vec![minimal()])).unwrap();
    let job = &jobs.jobs[0];
    assert_eq!(job.id.as_str(), "nightly-digest");
    assert_eq!(job.strategy().name(), "individual");
    assert_eq!(job.execution, ExecutionLimits::default());
    assert_eq!(job.retry, RetryPolicy::default());
    assert_eq!(job.priority, Priority::NORMAL);
    assert_eq!(job.overlap, Overlap::Skip);
    assert_eq!(job.misfire, Misfire::FireOnce);
    assert!(job.enabled);
    assert_eq!(
        job.schedule.as_ref().unwrap().to_string(),
        "daily at 02:30 America/New_York"
    );
}

#[test]
fn defaults_merge_field_by_field() {
    let second = {
        let mut job = with("/execution", json!({"concurrency": 4}));
        job["id"] = json!("second");
        job
    };
    let text = json!({
        "defaults": {
            "timezone": "Europe/Berlin",
            "priority": "high",
            "execution": {"concurrency": 8, "chunk_size": 100},
            "retry": {"max_attempts": 3},
            "overlap": "buffer_one",
            "misfire": {"policy": "catch_up", "window_seconds": 600}
        },
        "jobs": [
            with("/schedule/timezone", Value::Null),
            second,
        ]
    })
    .to_string();
    let jobs = parse_jobs_file(&text).unwrap();
    let (first, second) = (&jobs.jobs[0], &jobs.jobs[1]);
    assert_eq!(
        first.schedule.as_ref().unwrap().zone.to_string(),
        "Europe/Berlin"
    );
    assert_eq!(first.priority, Priority::HIGH);
    assert_eq!(
        (first.execution.concurrency, first.execution.chunk_size),
        (8, 100)
    );
    assert_eq!(
        (second.execution.concurrency, second.execution.chunk_size),
        (4, 100)
    );
    assert_eq!(second.retry.max_attempts, 3);
    assert_eq!(second.overlap, Overlap::BufferOne);
    assert_eq!(
        second.misfire,
        Misfire::CatchUp {
            window: Duration::from_secs(600)
        }
    );
}

#[test]
fn every_validation_error_names_its_path() {
    // Structure.
    check(
        with("/colour", json!("blue")),
        "jobs[0].colour",
        "unknown field",
    );
    check(with("/id", Value::Null), "jobs[0].id", "is required");
    check(
        with("/tenant", Value::Null),
        "jobs[0].tenant",
        "is required",
    );
    check(
        with("/template", Value::Null),
        "jobs[0].template",
        "is required",
    );
    check(
        with("/source", Value::Null),
        "jobs[0].source",
        "is required",
    );
    check(
        with("/id", json!("has space")),
        "jobs[0].id",
        "contains ' '",
    );
    check(with("/id", json!(42)), "jobs[0].id", "invalid type");
    check(
        with("/tenant", json!("")),
        "jobs[0].tenant",
        "must not be empty",
    );
    check(
        with("/type", json!("WEEKLY_USERS")),
        "jobs[0].type",
        "unknown variant",
    );
    check(
        with("/template", json!("a/b")),
        "jobs[0].template",
        "contains '/'",
    );
    check(
        with("/enabled", json!("yes")),
        "jobs[0].enabled",
        "invalid type",
    );
    // Schedules.
    check(
        with("/schedule/at", json!("25:00")),
        "jobs[0].schedule.at",
        "\"25:00\" is not a time of day (HH:MM)",
    );
    check(
        with("/schedule/timezone", json!("Mars/Base")),
        "jobs[0].schedule.timezone",
        "not an IANA time zone",
    );
    check(
        with("/schedule/frequency", json!("fortnightly")),
        "jobs[0].schedule.frequency",
        "unknown variant",
    );
    check(
        with("/schedule/cron", json!("0 0 * * * *")),
        "jobs[0].schedule",
        "either cron or frequency",
    );
    check(
        json!({"id": "j", "tenant": "t", "type": "BATCH_USERS", "template": "x", "source": {"users": {"ids": ["a"]}}, "schedule": {"timezone": "UTC"}}),
        "jobs[0].schedule",
        "needs cron or frequency",
    );
    check(
        with("/schedule", json!({"cron": "0 61 * * * *"})),
        "jobs[0].schedule.cron",
        "not a cron expression",
    );
    check(
        with("/schedule", json!({"cron": "* * *"})),
        "jobs[0].schedule.cron",
        "has 3 fields",
    );
    check(
        with("/schedule/at", Value::Null),
        "jobs[0].schedule.at",
        "is required for a daily schedule",
    );
    check(
        with("/schedule/on", json!("monday")),
        "jobs[0].schedule.on",
        "is not used by a daily schedule",
    );
    check(
        with(
            "/schedule",
            json!({"frequency": "weekly", "on": "someday", "at": "09:00"}),
        ),
        "jobs[0].schedule.on",
        "is not a weekday",
    );
    check(
        with("/schedule", json!({"frequency": "weekly", "at": "09:00"})),
        "jobs[0].schedule.on",
        "is required for a weekly schedule",
    );
    check(
        with(
            "/schedule",
            json!({"frequency": "monthly", "day": 32, "at": "09:00"}),
        ),
        "jobs[0].schedule.day",
        "out of range (1-31)",
    );
    check(
        with("/schedule", json!({"frequency": "hourly", "minute": 60})),
        "jobs[0].schedule.minute",
        "out of range (0-59)",
    );
    check(
        with(
            "/schedule",
            json!({"frequency": "biweekly", "on": "monday", "at": "09:00", "anchor": "2027-01-05"}),
        ),
        "jobs[0].schedule.anchor",
        "is a tuesday, but on is monday",
    );
    check(
        with(
            "/schedule",
            json!({"frequency": "biweekly", "on": "monday", "at": "09:00", "anchor": "next week"}),
        ),
        "jobs[0].schedule.anchor",
        "is not a date",
    );
    check(
        with(
            "/schedule",
            json!({"frequency": "biweekly", "on": "monday", "at": "09:00"}),
        ),
        "jobs[0].schedule.anchor",
        "is required",
    );
    check(
        with("/schedule/jitter_seconds", json!(10_000_000)),
        "jobs[0].schedule.jitter_seconds",
        "out of range",
    );
    check(
        with("/schedule/every", json!(5)),
        "jobs[0].schedule.every",
        "unknown field `every`",
    );
    // Priority, execution, retry, misfire.
    check(
        with("/priority", json!("urgent")),
        "jobs[0].priority",
        "is not a priority",
    );
    check(
        with("/priority", json!(101)),
        "jobs[0].priority",
        "is not a priority",
    );
    check(
        with("/execution/concurrency", json!(0)),
        "jobs[0].execution.concurrency",
        "out of range (1-10000)",
    );
    check(
        with("/execution/concurrency", json!(10_001)),
        "jobs[0].execution.concurrency",
        "out of range",
    );
    check(
        with("/execution/concurrency", json!("ten")),
        "jobs[0].execution.concurrency",
        "invalid type",
    );
    check(
        with("/execution/chunk_size", json!(100_001)),
        "jobs[0].execution.chunk_size",
        "out of range (1-100000)",
    );
    check(
        with("/execution/rate_limit_per_sec", json!(0)),
        "jobs[0].execution.rate_limit_per_sec",
        "not a rate above 0",
    );
    check(
        with("/execution/timeout_ms", json!(0)),
        "jobs[0].execution.timeout_ms",
        "out of range",
    );
    check(
        with("/retry/max_attempts", json!(0)),
        "jobs[0].retry.max_attempts",
        "out of range (1-100)",
    );
    check(
        with("/retry/max_attempts", json!(101)),
        "jobs[0].retry.max_attempts",
        "out of range (1-100)",
    );
    check(
        with("/retry/multiplier", json!(0.5)),
        "jobs[0].retry.multiplier",
        "out of range",
    );
    check(
        with("/retry/initial_backoff_ms", json!(120_000)),
        "jobs[0].retry.max_backoff_ms",
        "is less than initial_backoff_ms",
    );
    check(
        with("/retry/jitter", json!("some")),
        "jobs[0].retry.jitter",
        "unknown variant",
    );
    check(
        with("/overlap", json!("sometimes")),
        "jobs[0].overlap",
        "unknown variant",
    );
    check(
        with("/misfire", json!({"policy": "skip", "window_seconds": 60})),
        "jobs[0].misfire.window_seconds",
        "only applies to the catch_up policy",
    );
    check(
        with(
            "/misfire",
            json!({"policy": "catch_up", "window_seconds": 0}),
        ),
        "jobs[0].misfire.window_seconds",
        "out of range",
    );
    // Sources and their combination with the type.
    check(
        with("/source", json!({})),
        "jobs[0].source",
        "exactly one of users, category or categories",
    );
    check(
        with(
            "/source",
            json!({"users": {"ids": ["a"]}, "category": {"name": "c"}}),
        ),
        "jobs[0].source",
        "exactly one of",
    );
    check(
        with("/source", json!({"users": {}})),
        "jobs[0].source.users",
        "needs ids or filter",
    );
    check(
        with("/source", json!({"users": {"ids": ["a"], "filter": {}}})),
        "jobs[0].source.users",
        "either ids or filter",
    );
    check(
        with("/source", json!({"users": {"ids": []}})),
        "jobs[0].source.users.ids",
        "at least one user",
    );
    check(
        with("/source", json!({"users": {"ids": ["a", "b", "a"]}})),
        "jobs[0].source.users.ids[2]",
        "duplicate of source.users.ids[0]",
    );
    check(
        with("/source", json!({"users": {"ids": ["ok", "not ok"]}})),
        "jobs[0].source.users.ids[1]",
        "contains ' '",
    );
    check(
        with("/source", json!({"users": {"ids": ["a"], "limit": 5}})),
        "jobs[0].source.users.limit",
        "only applies to filter",
    );
    check(
        with(
            "/source",
            json!({"users": {"filter": {"active": true}, "limit": 0}}),
        ),
        "jobs[0].source.users.limit",
        "out of range",
    );
    check(
        with("/source", json!({"category": {"name": "news"}})),
        "jobs[0].source",
        "INDIVIDUAL_USERS takes users, not categories",
    );
    check(
        with("/type", json!("INDIVIDUAL_CATEGORIES")),
        "jobs[0].source",
        "takes category or categories, not users",
    );
    let combined = |categories: Value, kind: &str| {
        let mut job = with("/source", json!({ "categories": categories }));
        job["type"] = json!(kind);
        job
    };
    check(
        combined(
            json!([{"name": "a"}, {"name": "b"}]),
            "INDIVIDUAL_CATEGORIES",
        ),
        "jobs[0].source.categories",
        "needs a BATCH_ type",
    );
    check(
        combined(json!([{"name": "a"}]), "BATCH_CATEGORIES"),
        "jobs[0].source.categories",
        "two or more categories",
    );
    check(
        combined(json!([{"name": "a"}, {"name": "a"}]), "BATCH_CATEGORIES"),
        "jobs[0].source.categories[1].name",
        "duplicate",
    );
    check(
        combined(
            json!([{"name": "a"}, {"name": "b", "colour": 1}]),
            "BATCH_CATEGORIES",
        ),
        "jobs[0].source.categories[1].colour",
        "unknown field `colour`",
    );
    let category = |filters: Value| {
        let mut job = with(
            "/source",
            json!({"category": {"name": "products", "filters": filters}}),
        );
        job["type"] = json!("INDIVIDUAL_CATEGORIES");
        job
    };
    check(
        category(json!({"price": {"between": [1, 2]}})),
        "jobs[0].source.category.filters.price.between",
        "is not an operator",
    );
    check(
        category(json!({"region": {"in": []}})),
        "jobs[0].source.category.filters.region.in",
        "non-empty list",
    );
    check(
        category(json!({"region": {"in": ["eu"], "gt": 1}})),
        "jobs[0].source.category.filters.region",
        "cannot be combined",
    );
    check(
        category(json!({"price": {"gt": 1, "lt": "z"}})),
        "jobs[0].source.category.filters.price",
        "all be numbers or all be strings",
    );
    check(
        category(json!({"price": {"gt": true}})),
        "jobs[0].source.category.filters.price.gt",
        "number or a string",
    );
    check(
        category(json!({"tags": ["a"]})),
        "jobs[0].source.category.filters.tags",
        "must be a string, number or boolean",
    );
    check(
        category(json!({"drop table": 1})),
        "jobs[0].source.category.filters.drop table",
        "is not a field name",
    );
    check(
        category(json!({"price": {}})),
        "jobs[0].source.category.filters.price",
        "needs in, gt",
    );
    // Static and Dynamic.
    check(
        with("/feature_type", json!("digest")),
        "jobs[0].feature_type",
        "only PREFERENCE_ jobs",
    );
    check(
        with("/default_preferences", json!({})),
        "jobs[0].default_preferences",
        "only PREFERENCE_ jobs",
    );
    let mut dynamic = with("/type", json!("PREFERENCE_INDIVIDUAL_USERS"));
    check(
        dynamic.clone(),
        "jobs[0].feature_type",
        "is required for PREFERENCE_ jobs",
    );
    check(
        dynamic.clone(),
        "jobs[0].schedule",
        "fires from its users' preferences",
    );
    dynamic["feature_type"] = json!("digest");
    dynamic.as_object_mut().unwrap().remove("schedule");
    dynamic["default_preferences"] = json!({"schedule": {"frequency": "daily", "at": "7:00"}});
    check(
        dynamic,
        "jobs[0].default_preferences.schedule.at",
        "is not a time of day",
    );
    // Distribution.
    check(
        with("/distribution", json!({"users": ["boss", "no way"]})),
        "jobs[0].distribution.users[1]",
        "contains ' '",
    );
    check(
        with("/distribution", json!({"delivery_template": ""})),
        "jobs[0].distribution.delivery_template",
        "must not be empty",
    );
}

#[test]
fn problems_name_the_job_once_its_id_is_known() {
    let problems = parse_jobs_file(&file(vec![with("/colour", json!(1))])).unwrap_err();
    assert_eq!(problems.0[0].job.as_deref(), Some("nightly-digest"));
    assert!(
        problems.to_string().contains("[job nightly-digest]"),
        "{problems}"
    );
}

#[test]
fn three_errors_in_one_file_are_all_reported() {
    let second = {
        let mut job = with("/execution/concurrency", json!(0));
        job["id"] = json!("second");
        job
    };
    let third = {
        let mut job = minimal();
        job["id"] = json!("third");
        job
    };
    let text = file(vec![
        with("/schedule/at", json!("25:00")),
        second,
        third.clone(),
        third,
    ]);
    let problems = parse_jobs_file(&text).unwrap_err();
    let paths: Vec<&str> = problems.0.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "jobs[0].schedule.at",
            "jobs[1].execution.concurrency",
            "jobs[3].id"
        ]
    );
    assert!(problems.0[2].message.contains("first used by jobs[2]"));
}

#[test]
fn several_structural_errors_in_one_job_are_all_reported() {
    let mut job = with("/execution/concurrency", json!("many"));
    job["retry"] = json!({"max_attempts": "x"});
    job["colour"] = json!(1);
    let problems = parse_jobs_file(&file(vec![job])).unwrap_err();
    let paths: Vec<&str> = problems.0.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "jobs[0].colour",
            "jobs[0].execution.concurrency",
            "jobs[0].retry.max_attempts"
        ]
    );
}

#[test]
fn malformed_json_is_reported_with_line_and_column() {
    let problems = parse_jobs_file("{\n  \"jobs\": [\n    {\"id\": \"a\",}\n  ]\n}").unwrap_err();
    assert_eq!(problems.0.len(), 1);
    assert_eq!(problems.0[0].path, "line 3, column 16");
    assert!(
        problems.0[0].message.starts_with("not valid JSON"),
        "{problems}"
    );
    let problems = parse_jobs_file("").unwrap_err();
    assert!(problems.0[0].path.starts_with("line 1"));
}

#[test]
fn top_level_mistakes_are_reported() {
    let check_top = |text: &str, path: &str, fragment: &str| {
        let problems = parse_jobs_file(text).unwrap_err();
        assert!(
            problems
                .0
                .iter()
                .any(|p| p.path == path && p.message.contains(fragment)),
            "{problems}"
        );
    };
    check_top("[]", "(top level)", "must be an object");
    check_top("{}", "(top level)", "missing field `jobs`");
    check_top(
        r#"{"jobs": [], "extra": 1}"#,
        "extra",
        "unknown field `extra`",
    );
    check_top(r#"{"jobs": {}}"#, "jobs", "invalid type");
    check_top(r#"{"jobs": [42]}"#, "jobs[0]", "invalid type");
    check_top(
        r#"{"defaults": {"timezone": "Nowhere"}, "jobs": []}"#,
        "defaults.timezone",
        "IANA",
    );
    check_top(
        r#"{"defaults": {"execution": {"chunk_size": 0}}, "jobs": []}"#,
        "defaults.execution.chunk_size",
        "out of range",
    );
    check_top(
        r#"{"defaults": {"colour": 1}, "jobs": []}"#,
        "defaults.colour",
        "unknown field `colour`",
    );
}

#[test]
fn an_empty_file_of_jobs_and_a_schema_link_are_fine() {
    assert!(
        parse_jobs_file(r#"{"$schema": "./jobs.schema.json", "jobs": []}"#)
            .unwrap()
            .jobs
            .is_empty()
    );
}

#[test]
fn parse_job_uses_paths_relative_to_the_job() {
    let problems = parse_job(with("/schedule/at", json!("25:00"))).unwrap_err();
    assert_eq!(problems.0[0].path, "schedule.at");
    assert!(parse_job(minimal()).is_ok());
    assert!(parse_job(json!("a job")).is_err());
}

#[test]
fn the_schema_knows_exactly_the_fields_the_validator_accepts() {
    let schema = json_schema();
    let job = &schema["$defs"]["JobSpec"];
    let mut properties: Vec<&str> = job["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    properties.sort_unstable();
    let mut known = JOB_FIELDS.to_vec();
    known.sort_unstable();
    assert_eq!(properties, known);
    assert_eq!(job["additionalProperties"], json!(false));
    let required: Vec<&str> = job["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["id", "tenant", "type", "template", "source"]);
}

#[test]
fn the_shipped_example_is_valid_and_covers_every_type_and_schedule_form() {
    let jobs = parse_jobs_file(include_str!("../../../../config/jobs.json"))
        .unwrap_or_else(|p| panic!("{p}"));
    let types: std::collections::BTreeSet<String> =
        jobs.jobs.iter().map(|j| j.batch_type.to_string()).collect();
    assert_eq!(types.len(), 8, "{types:?}");
    let forms: std::collections::BTreeSet<&str> = jobs
        .jobs
        .iter()
        .filter_map(Job::effective_schedule)
        .map(|s| match s.recurrence {
            crate::schedule::Recurrence::Cron(_) => "cron",
            crate::schedule::Recurrence::Hourly { .. } => "hourly",
            crate::schedule::Recurrence::Daily { .. } => "daily",
            crate::schedule::Recurrence::Weekly { .. } => "weekly",
            crate::schedule::Recurrence::Biweekly { .. } => "biweekly",
            crate::schedule::Recurrence::Monthly { .. } => "monthly",
        })
        .collect();
    assert_eq!(forms.len(), 6, "{forms:?}");
    let strategies: std::collections::BTreeSet<&str> =
        jobs.jobs.iter().map(|j| j.strategy().name()).collect();
    assert_eq!(strategies.len(), 4, "{strategies:?}");
}

#[test]
fn one_job_parses_with_the_defaults_of_a_file_and_paths_start_at_the_job() {
    let defaults = json!({"timezone": "Europe/Berlin", "priority": "high"});
    let job = parse_job_with_defaults(&defaults, with("/schedule/timezone", Value::Null)).unwrap();
    assert_eq!(
        job.schedule.as_ref().unwrap().zone.to_string(),
        "Europe/Berlin"
    );
    assert_eq!(job.priority, Priority::HIGH);
    let problems = parse_job_with_defaults(&defaults, with("/schedule/at", json!("25:00")))
        .unwrap_err()
        .0;
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].path, "schedule.at");
    let broken =
        parse_job_with_defaults(&json!({"timezone": "Mars/Base"}), with("/id", json!("x")))
            .unwrap_err()
            .0;
    assert!(
        broken.iter().any(|p| p.path == "defaults.timezone"),
        "{broken:?}"
    );
}
