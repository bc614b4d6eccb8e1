//! `batchctl` against the real server.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use batch_e2e::{Server, batchctl};
use batch_testkit::{Backend, TestDatabase};
use serde_json::Value;

fn ctl(server: &Server, args: &[&str]) -> Output {
    Command::new(batchctl())
        .args(["--server", &server.url, "--token", "acme-token-1"])
        .args(args)
        .env_remove("BATCH_SERVER")
        .env_remove("BATCH_TOKEN")
        .output()
        .expect("batchctl runs")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_watch_and_list_runs_as_json() {
    let db = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let server = Server::start(&db.url, None, &[]);
    let watched = ok(&ctl(&server, &["trigger", "nightly-digest", "--watch"]));
    assert!(watched.contains("succeeded"), "{watched}");
    let backfilled = ok(&ctl(
        &server,
        &[
            "backfill",
            "nightly-digest",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-01-02T23:00:00Z",
        ],
    ));
    assert!(backfilled.starts_with("2 runs created"), "{backfilled}");
    let runs: Value = serde_json::from_str(&ok(&ctl(
        &server,
        &["runs", "list", "--json", "--limit", "5"],
    )))
    .unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 3, "{runs:?}");
    for run in runs {
        for field in [
            "id",
            "job_id",
            "tenant",
            "status",
            "trigger",
            "scheduled_for",
            "progress",
        ] {
            assert!(run.get(field).is_some(), "{field} missing in {run}");
        }
        assert_eq!(run["tenant"], "acme");
    }
    let scheduled: Vec<&str> = runs
        .iter()
        .filter(|r| r["trigger"] == "backfill")
        .map(|r| r["scheduled_for"].as_str().unwrap())
        .collect();
    // New York's 02:30 in January is 07:30Z.
    assert_eq!(scheduled.len(), 2);
    assert!(scheduled.contains(&"2026-01-01T07:30:00Z"), "{scheduled:?}");
    let manual = runs.iter().find(|r| r["trigger"] == "manual").unwrap();
    assert_eq!(manual["progress"]["succeeded"], 5);
    let table = ok(&ctl(&server, &["jobs", "list"]));
    assert!(table.starts_with("JOB"), "{table}");
    assert!(table.contains("nightly-digest"));
    let denied = Command::new(batchctl())
        .args(["--server", &server.url, "jobs", "list"])
        .env_remove("BATCH_TOKEN")
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Unauthenticated"));
    assert!(server.terminate().success());
}
