//! `batch-server run`, as the real binary, against SQLite and PostgreSQL.

use std::path::PathBuf;
use std::process::{Command, Output};

use batch_testkit::{Backend, TestDatabase, Unavailable};
use serde_json::Value;

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

fn run(job: &str, database_url: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_batch-server"))
        .args(["run", job, "--json", "--database-url", database_url])
        .args(["--jobs", &repo("config/jobs.json")])
        .args(["--templates", &repo("config/templates")])
        .args(["--sample-data", &repo("config/sample-data")])
        .args(extra)
        .env_remove("BATCH_JOBS_FILE")
        .env_remove("BATCH_DATABASE_URL")
        .output()
        .expect("batch-server runs")
}

fn context(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "exit {:?}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is the context JSON alone")
}

/// The context without what differs between two runs of the same job.
fn comparable(mut context: Value) -> Value {
    for key in ["run_id", "created_at", "finished_at"] {
        context["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove(key);
    }
    context
}

async fn database(backend: Backend) -> Option<TestDatabase> {
    match TestDatabase::create(backend).await {
        Ok(db) => Some(db),
        Err(Unavailable::Skip(why)) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

#[tokio::test]
async fn a_sample_job_runs_on_a_fresh_embedded_database_with_counts_from_the_sample_data() {
    let db = database(Backend::Sqlite)
        .await
        .expect("SQLite is always there");
    let context = context(&run("nightly-digest", &db.url, &[]));
    // config/jobs.json names u001–u005 and ghost-1; the sample data has no ghost-1.
    assert_eq!(context["metadata"]["status"], "succeeded");
    assert_eq!(
        context["validation"],
        serde_json::json!({"total": 6, "valid": 5, "invalid": 1})
    );
    assert_eq!(
        context["items"]["invalid"]["sample"],
        serde_json::json!(["ghost-1"])
    );
    assert_eq!(context["items"]["valid"]["count"], 5);
    assert_eq!(context["progress"]["total"], 5);
    assert_eq!(context["progress"]["succeeded"], 5);
    assert_eq!(context["progress"]["percentage"], 100.0);
    // A second run reuses the database and its sample data.
    let again = comparable(context_of(run("nightly-digest", &db.url, &[])));
    assert_eq!(again, comparable(context));
}

fn context_of(output: Output) -> Value {
    context(&output)
}

#[tokio::test]
async fn the_same_run_on_sqlite_and_postgresql_gives_the_same_context() {
    let Some(pg) = database(Backend::Postgres).await else {
        return;
    };
    let sqlite = database(Backend::Sqlite)
        .await
        .expect("SQLite is always there");
    for job in [
        "product-descriptions",
        "personal-briefing",
        "market-overview",
        "group-newsletter",
    ] {
        let on_sqlite = comparable(context(&run(job, &sqlite.url, &[])));
        let on_postgres = comparable(context(&run(job, &pg.url, &["--external-tables", "true"])));
        assert_eq!(on_sqlite, on_postgres, "{job}");
        assert!(
            on_sqlite["progress"]["total"].as_u64().unwrap_or(0) > 0,
            "{job}: {on_sqlite}"
        );
    }
}

#[tokio::test]
async fn an_unknown_job_names_the_jobs_there_are() {
    let db = database(Backend::Sqlite)
        .await
        .expect("SQLite is always there");
    let output = run("no-such-job", &db.url, &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no job \"no-such-job\""), "{stderr}");
    assert!(stderr.contains("nightly-digest"), "{stderr}");
}

#[tokio::test]
async fn a_database_that_cannot_be_reached_is_named_without_its_password() {
    let output = run(
        "nightly-digest",
        "postgres://batch:secret@127.0.0.1:1/none",
        &[],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("postgres://batch:***@127.0.0.1:1/none"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
}
