//! The `check-config` command, run as the real binary.

use std::path::PathBuf;
use std::process::{Command, Output};

fn batch_server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_batch-server"))
        .args(args)
        .env_remove("BATCH_JOBS_FILE")
        .output()
        .expect("batch-server runs")
}

fn example() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.json");
    path.to_string_lossy().into_owned()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("batch-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("temp file is writable");
    path
}

#[test]
fn json_lists_the_next_fires_of_every_job_in_utc() {
    let out = batch_server(&[
        "check-config",
        &example(),
        "--json",
        "--next",
        "3",
        "--from",
        "2027-03-13T12:00:00Z",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = report["jobs"].as_array().unwrap();
    assert_eq!(report.as_object().unwrap().len(), 1);
    let digest = &jobs[0];
    assert_eq!(
        digest,
        &serde_json::json!({
            "id": "nightly-digest",
            "type": "INDIVIDUAL_USERS",
            "next": ["2027-03-14T07:00:00Z", "2027-03-15T06:30:00Z", "2027-03-16T06:30:00Z"]
        })
    );
    for job in jobs {
        assert_eq!(job.as_object().unwrap().len(), 3, "{job}");
        let next = job["next"].as_array().unwrap();
        if job["id"] == "backfill-embeddings" {
            assert!(next.is_empty(), "manual jobs have no fires");
        } else {
            assert_eq!(next.len(), 3, "{job}");
        }
    }
    // Dynamic jobs show the fires of their default preferences: 07:00 Berlin (CET) = 06:00Z.
    let briefing = jobs
        .iter()
        .find(|j| j["id"] == "personal-briefing")
        .unwrap();
    assert_eq!(briefing["next"][0], "2027-03-14T06:00:00Z");
}

#[test]
fn the_table_names_every_job_and_its_schedule_in_words() {
    let out = batch_server(&["check-config", &example(), "--from", "2027-03-13T12:00:00Z"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("daily at 02:30 America/New_York"), "{text}");
    assert!(text.contains("2027-03-14T07:00:00Z"), "{text}");
    assert!(text.contains("manual only"), "{text}");
    assert!(text.contains("11 jobs valid"), "{text}");
}

#[test]
fn a_file_with_three_errors_exits_2_and_names_all_three_paths() {
    let file = temp_file(
        "three.json",
        r#"{"jobs": [
            {"id": "a", "tenant": "t", "type": "INDIVIDUAL_USERS", "template": "x",
             "source": {"users": {"ids": ["u"]}}, "schedule": {"frequency": "daily", "at": "25:00"}},
            {"id": "b", "tenant": "t", "type": "BATCH_USERS", "template": "x",
             "source": {"users": {"ids": ["u"]}}, "execution": {"concurrency": 0}},
            {"id": "c", "tenant": "t", "type": "SOMETIMES", "template": "x",
             "source": {"users": {"ids": ["u"]}}}
        ]}"#,
    );
    let out = batch_server(&["check-config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for path in [
        "jobs[0].schedule.at: \"25:00\" is not a time of day (HH:MM)",
        "jobs[1].execution.concurrency",
        "jobs[2].type",
    ] {
        assert!(stderr.contains(path), "missing {path} in:\n{stderr}");
    }
    assert!(out.stdout.is_empty());
}

#[test]
fn the_minimal_job_alone_is_a_valid_file() {
    let file = temp_file(
        "minimal.json",
        r#"{"jobs": [{"id": "nightly-digest", "tenant": "acme", "type": "INDIVIDUAL_USERS", "template": "digest", "source": {"users": {"ids": ["u1", "u2"]}}, "schedule": {"frequency": "daily", "at": "02:30", "timezone": "America/New_York"}}]}"#,
    );
    let out = batch_server(&[
        "check-config",
        file.to_str().unwrap(),
        "--json",
        "--from",
        "2027-11-06T12:00:00Z",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"jobs\":[{\"id\":\"nightly-digest\",\"type\":\"INDIVIDUAL_USERS\",\"next\":[\"2027-11-07T07:30:00Z\"]}]}\n"
    );
}

#[test]
fn unreadable_and_malformed_files_are_named() {
    let out = batch_server(&["check-config", "/nonexistent/jobs.json"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("reading jobs file /nonexistent/jobs.json"),
        "{stderr}"
    );

    let file = temp_file("broken.json", "{\"jobs\": [\n  {\"id\": }\n]}");
    let out = batch_server(&["check-config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("line 2, column 10"), "{stderr}");
}

#[test]
fn a_bad_from_instant_is_a_usage_error() {
    let out = batch_server(&["check-config", &example(), "--from", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("is not an RFC 3339 instant")
    );
}
