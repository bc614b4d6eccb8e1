//! `batch-server run` against fake sibling services: the real binary, real tonic servers.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use batch_testkit::siblings::{FakeRequestService, FakeTemplateService, SiblingServer, Siblings};
use batch_testkit::{Backend, TestDatabase};
use serde_json::{Value, json};
use tonic::Code;

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

/// A jobs file with one job over forty sample users that retries quickly.
fn jobs_file(dir: &std::path::Path) -> PathBuf {
    let ids: Vec<String> = (1..=40).map(|n| format!("u{n:03}")).collect();
    let jobs = json!({"jobs": [{
        "id": "digest-40", "tenant": "acme", "type": "INDIVIDUAL_USERS", "template": "digest",
        "source": {"users": {"ids": ids}},
        "execution": {"concurrency": 8, "chunk_size": 10, "timeout_ms": 5000},
        "retry": {"max_attempts": 10, "initial_backoff_ms": 5, "max_backoff_ms": 50},
    }]});
    let path = dir.join("jobs.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&jobs).unwrap()).unwrap();
    path
}

fn run_with(db: &TestDatabase, jobs: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_batch-server"))
        .args(["run", "digest-40", "--json", "--database-url", &db.url])
        .args(["--jobs", &jobs.to_string_lossy()])
        .args(["--templates", &repo("config/templates")])
        .args(["--sample-data", &repo("config/sample-data")])
        .args(extra)
        .env_remove("BATCH_JOBS_FILE")
        .env_remove("BATCH_DATABASE_URL")
        .env_remove("BATCH_REQUEST_ENDPOINT")
        .env_remove("BATCH_TEMPLATE_ENDPOINT")
        .env_remove("BATCH_PREFERENCE_ENDPOINT")
        .output()
        .expect("batch-server runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_request_service_is_retried_until_every_item_succeeds_with_the_same_key() {
    let requests = Arc::new(FakeRequestService::default());
    requests.expect_templates(["digest"]);
    requests.faults.fail(30, Code::Unavailable);
    let templates = Arc::new(FakeTemplateService::default());
    templates.insert("acme", "digest", 7, "Hello {{ user_id }}");
    let server = SiblingServer::start(
        &Siblings {
            requests: Some(requests.clone()),
            templates: Some(templates.clone()),
            ..Siblings::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let db = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let dir = std::env::temp_dir().join(format!("batch-siblings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = jobs_file(&dir);
    let url = server.url();
    let output = tokio::task::spawn_blocking(move || {
        run_with(
            &db,
            &jobs,
            &["--request-endpoint", &url, "--template-endpoint", &url],
        )
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "exit {:?}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    let context: Value = serde_json::from_slice(&output.stdout).unwrap();
    // u025 is an inactive user in the sample data: 39 valid items.
    assert_eq!(context["items"]["valid"]["count"], 39, "{context}");
    assert_eq!(context["progress"]["succeeded"], 39, "{context}");
    assert_eq!(context["progress"]["failed"], 0);
    assert_eq!(context["metadata"]["status"], "succeeded");
    let calls = requests.calls();
    let mut attempts: BTreeMap<String, usize> = BTreeMap::new();
    for call in &calls {
        *attempts.entry(call.idempotency_key.clone()).or_default() += 1;
        assert_eq!(call.tenant_id, "acme");
        assert_eq!(call.template_id, "digest");
        let item = call.idempotency_key.split_once(':').unwrap().1;
        assert_eq!(call.user_id, item, "the key names the item it was sent for");
    }
    assert_eq!(
        attempts.len(),
        39,
        "one idempotency key per item, on every attempt"
    );
    let retried = attempts.values().filter(|n| **n > 1).count();
    assert!(
        retried >= 5,
        "30 % failures made some items retry: {attempts:?}"
    );
    assert!(calls.len() > 39);
    let runs: BTreeSet<&str> = calls
        .iter()
        .map(|c| c.idempotency_key.split_once(':').unwrap().0)
        .collect();
    assert_eq!(runs.len(), 1, "every key belongs to the one run");
    assert!(
        !templates.calls().is_empty(),
        "the template came from the template service"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_endpoint_is_named() {
    let db = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let dir = std::env::temp_dir().join(format!("batch-siblings-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = jobs_file(&dir);
    let output = tokio::task::spawn_blocking(move || {
        run_with(&db, &jobs, &["--request-endpoint", "localhost:50051"])
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--request-endpoint"), "{stderr}");
    assert!(stderr.contains("localhost:50051"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_config_service_falls_back_to_default_preferences_and_says_so() {
    // A port that refuses connections: bind one, note it, close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let db = TestDatabase::create(Backend::Sqlite).await.unwrap();
    let endpoint = format!("http://{addr}");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_batch-server"))
            .args([
                "run",
                "personal-briefing",
                "--json",
                "--database-url",
                &db.url,
            ])
            .args(["--jobs", &repo("config/jobs.json")])
            .args(["--templates", &repo("config/templates")])
            .args(["--sample-data", &repo("config/sample-data")])
            .args(["--preference-endpoint", &endpoint])
            .args(["--sibling-timeout-ms", "2000"])
            .env_remove("BATCH_REQUEST_ENDPOINT")
            .env_remove("BATCH_TEMPLATE_ENDPOINT")
            .output()
            .expect("batch-server runs")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "exit {:?}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    let context: Value = serde_json::from_slice(&output.stdout).unwrap();
    let notes = context["notes"].to_string();
    assert!(
        notes.contains("default preferences were applied"),
        "the fallback is in the context: {context}"
    );
    assert!(
        context["progress"]["succeeded"].as_u64().unwrap() > 0,
        "{context}"
    );
}
