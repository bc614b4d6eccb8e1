//! F11 (the fault suite's malformed input), at the parsers: every field of the repository's
//! jobs file made wrong in turn, and arbitrary bytes, strings and JSON values fed to the jobs
//! file parser, the job parser and the cron parser. Each answer is a result — an error that
//! names where the problem is, never a panic. Case counts are bounded so CI stays fast
//! (`PROPTEST_CASES` raises them).
#![allow(clippy::unwrap_used)]

use batch_domain::config::{parse_job, parse_job_with_defaults, parse_jobs_file};
use batch_domain::schedule::CronSpec;
use proptest::prelude::*;
use serde_json::{Value, json};

const JOBS: &str = include_str!("../../../config/jobs.json");

/// Every leaf of `value` with its path (object keys and array indexes).
fn leaves(value: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                path.push(k.clone());
                out.push(path.clone());
                leaves(v, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(i.to_string());
                leaves(v, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The value at `path` in `root`, mutably; `None` when gone.
fn at<'a>(root: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(root, |v, k| match v {
        Value::Object(map) => map.get_mut(k),
        Value::Array(items) => items.get_mut(k.parse::<usize>().ok()?),
        _ => None,
    })
}

/// The wrong values tried in place of each field.
fn wrong_values(original: &Value) -> Vec<Value> {
    let mut values = vec![
        json!(null),
        json!(-1),
        json!(""),
        json!("not-a-valid-choice-%%"),
        json!([]),
        json!({"unexpected": true}),
        json!(1e300),
        json!(true),
    ];
    if original.is_string() {
        values.push(json!(12));
        values.push(json!("x".repeat(10_000)));
    } else {
        values.push(json!("12"));
    }
    values
}

/// Every field of every job replaced by each wrong value, removed, and given an unknown
/// sibling: the parser answers, and its errors say where.
#[test]
fn every_jobs_file_field_wrong_in_turn_is_an_error_naming_it_never_a_panic() {
    let file: Value = serde_json::from_str(JOBS).unwrap();
    let mut paths = Vec::new();
    leaves(&file, &mut Vec::new(), &mut paths);
    let (mut tried, mut rejected) = (0, 0);
    for path in &paths {
        let original = at(&mut file.clone(), path).unwrap().clone();
        let mut variants: Vec<Value> = wrong_values(&original)
            .into_iter()
            .map(|wrong| {
                let mut changed = file.clone();
                *at(&mut changed, path).unwrap() = wrong;
                changed
            })
            .collect();
        let (parent, key) = path.split_at(path.len() - 1);
        let mut removed = file.clone();
        if let Some(Value::Object(map)) = at(&mut removed, parent) {
            map.remove(&key[0]);
            map.insert("surprise_field".to_owned(), json!(1));
        }
        variants.push(removed);
        for variant in variants {
            tried += 1;
            let text = serde_json::to_string(&variant).unwrap();
            let Err(problems) = parse_jobs_file(&text) else {
                continue;
            };
            rejected += 1;
            let said = problems.to_string();
            // Where: the field itself, its job's place in the list, or its job's id.
            let job = path.get(1).map(|i| format!("jobs[{i}]"));
            let named = said.contains(key[0].as_str())
                || job.as_ref().is_some_and(|j| said.contains(j.as_str()))
                || said.contains("surprise_field");
            assert!(named, "{path:?}: the error does not say where: {said}");
        }
    }
    eprintln!("{tried} broken files, {rejected} rejected, the rest still valid");
    assert!(rejected * 2 > tried, "most broken files must be rejected");
}

/// A nested JSON value of any shape.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("id".to_owned()),
                    Just("type".to_owned()),
                    Just("schedule".to_owned()),
                    Just("cron".to_owned()),
                    Just("frequency".to_owned()),
                    Just("at".to_owned()),
                    Just("timezone".to_owned()),
                    Just("source".to_owned()),
                    Just("execution".to_owned()),
                    ".{0,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random bytes into the jobs file parser.
    #[test]
    fn random_bytes_into_the_jobs_file_parser_are_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(problems) = parse_jobs_file(&text) {
            prop_assert!(!problems.0.is_empty());
            prop_assert!(!problems.to_string().is_empty());
        }
    }

    /// Random JSON documents into the jobs file parser.
    #[test]
    fn random_json_into_the_jobs_file_parser_never_panics(jobs in proptest::collection::vec(any_json(), 0..4)) {
        let text = json!({"jobs": jobs}).to_string();
        if let Err(problems) = parse_jobs_file(&text) {
            prop_assert!(!problems.0.is_empty());
        }
    }

    /// A valid job with a random schedule, source and limits.
    #[test]
    fn random_schedules_into_the_job_parser_are_errors_naming_them(schedule in any_json(), execution in any_json()) {
        let job = json!({
            "id": "fuzzed", "tenant": "acme", "type": "INDIVIDUAL_USERS", "template": "digest",
            "source": {"users": {"ids": ["u1"]}},
            "schedule": schedule, "execution": execution,
        });
        if let Err(problems) = parse_job(job.clone()) {
            let said = problems.to_string();
            prop_assert!(said.contains("schedule") || said.contains("execution"), "{}", said);
        }
        let _ = parse_job_with_defaults(&json!({"timezone": "Europe/Berlin"}), job);
    }

    /// Random cron expressions: parsed or refused with a reason, and a parsed one answers
    /// its next fire.
    #[test]
    fn random_cron_expressions_are_parsed_or_refused(text in "[0-9*/,LW#?A-Za-z -]{0,40}") {
        match CronSpec::parse(&text) {
            Ok(_) => {}
            Err(bad) => prop_assert!(!bad.reason.is_empty()),
        }
    }

    /// Arbitrary strings as cron expressions.
    #[test]
    fn arbitrary_strings_as_cron_never_panic(text in ".{0,64}") {
        let _ = CronSpec::parse(&text);
    }
}
