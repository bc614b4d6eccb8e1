//! The fault suite (issue 9), first scenarios: F1 (kill -9 mid-run and restart), F7 (poison
//! items and a panicking downstream handler) and F10 (a second server on one SQLite file),
//! against the real `batch-server`, with the fake Request service's call ledger checked against
//! the database afterwards. `FAULTS_REPEAT` repeats each scenario with a fresh seed (printed;
//! `FAULTS_SEED` replays one); `FAULTS_ITEMS` sets the run size (default 2 000).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use batch_e2e::{Server, TOKENS, client};
use batch_proto::batch::v1 as pb;
use batch_testkit::siblings::{FakeRequestService, SiblingServer, Siblings};
use batch_testkit::{Backend, TestDatabase, Unavailable};
use sea_orm::{ConnectionTrait, Database};

const CHUNK: usize = 50;
const CONCURRENCY: usize = 16;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator for fault points.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// A database with `items` active users of tenant `fault`, migrated by the real binary.
async fn database(backend: Backend, items: usize) -> Option<TestDatabase> {
    let db = match TestDatabase::create(backend).await {
        Ok(db) => db,
        Err(Unavailable::Skip(why)) => {
            eprintln!("skipped: {why}");
            return None;
        }
    };
    let migrated = std::process::Command::new(batch_e2e::binary())
        .args([
            "migrate",
            "--external-tables",
            "true",
            "--database-url",
            &db.url,
        ])
        .env_remove("BATCH_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let conn = Database::connect(db.url.as_str()).await.unwrap();
    for start in (0..items).step_by(500) {
        let rows: Vec<String> = (start..(start + 500).min(items))
            .map(|n| format!("('fault', 'user{n:06}', TRUE, '{{\"team\": \"load\"}}')"))
            .collect();
        conn.execute_unprepared(&format!(
            "INSERT INTO system_users (tenant, user_id, active, attributes) VALUES {}",
            rows.join(", ")
        ))
        .await
        .unwrap();
    }
    conn.close().await.unwrap();
    Some(db)
}

fn jobs_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("batch-faults-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = serde_json::json!({"jobs": [{
        "id": "load", "tenant": "fault", "type": "INDIVIDUAL_USERS", "template": "digest",
        "source": {"users": {"filter": {"team": "load"}}},
        "execution": {"concurrency": CONCURRENCY, "chunk_size": CHUNK, "timeout_ms": 10000},
        "retry": {"max_attempts": 3, "initial_backoff_ms": 10, "max_backoff_ms": 50},
        "overlap": "allow_all",
    }]});
    let path = dir.join("jobs.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&jobs).unwrap()).unwrap();
    path
}

fn tokens() -> String {
    format!("{TOKENS},fault-token-1=fault")
}

async fn trigger(server: &Server) -> String {
    client(server, Some("fault-token-1"))
        .await
        .trigger_job(pb::TriggerJobRequest {
            job_id: "load".to_owned(),
            ..pb::TriggerJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id
}

/// Follows `run` on `server` to its end; returns the last run message.
async fn finish(server: &Server, run: &str) -> pb::Run {
    let mut api = client(server, Some("fault-token-1")).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        assert!(
            Instant::now() < deadline,
            "run {run} never ended:\n{}",
            server.log()
        );
        let current = api
            .get_run(pb::GetRunRequest {
                run_id: run.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        if !matches!(current.status.as_str(), "queued" | "running") {
            return current;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The checker's figures for one run.
#[derive(Debug, Default)]
struct Figures {
    missed: usize,
    extra: usize,
    redelivered: usize,
    effective_duplicates: usize,
}

/// Reads the ledger and the database: items never called (missed), calls for keys that are not
/// items of the run (extra), calls beyond the first per key (redelivered), and calls that
/// arrived after the item's success was recorded (effective duplicates).
async fn check(db: &TestDatabase, run: &str, requests: &FakeRequestService) -> Figures {
    let conn = Database::connect(db.url.as_str()).await.unwrap();
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            format!("SELECT item_key, status, updated_ms FROM run_items WHERE run_id = '{run}'"),
        ))
        .await
        .unwrap();
    let mut items: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for row in rows {
        items.insert(
            row.try_get("", "item_key").unwrap(),
            (
                row.try_get("", "status").unwrap(),
                row.try_get("", "updated_ms").unwrap(),
            ),
        );
    }
    conn.close().await.unwrap();
    let mut calls: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (call, at) in requests.ledger() {
        let Some((of_run, item)) = call.idempotency_key.split_once(':') else {
            continue;
        };
        if of_run != run {
            continue;
        }
        let at = i64::try_from(at.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap();
        calls.entry(item.to_owned()).or_default().push(at);
    }
    let mut figures = Figures::default();
    for (key, (status, updated)) in &items {
        match calls.get(key) {
            None if status != "invalid" => figures.missed += 1,
            None => {}
            Some(times) => {
                figures.redelivered += times.len() - 1;
                if status == "succeeded" {
                    // A millisecond of slack: both clocks are this machine's.
                    figures.effective_duplicates +=
                        times.iter().filter(|t| **t > *updated + 1).count();
                }
            }
        }
    }
    figures.extra = calls.keys().filter(|k| !items.contains_key(*k)).count();
    figures
}

async fn request_service(latency: Duration) -> (Arc<FakeRequestService>, SiblingServer) {
    let requests = Arc::new(FakeRequestService::default());
    requests.faults.set_latency(latency);
    let server = SiblingServer::start(
        &Siblings {
            requests: Some(requests.clone()),
            ..Siblings::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    (requests, server)
}

/// F1: kill -9 at a random point of a run, restart at once or after the lease expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_a_killed_server_loses_no_item_and_repeats_no_success() {
    let items = usize::try_from(env_number("FAULTS_ITEMS", 2_000)).unwrap();
    let repeat = env_number("FAULTS_REPEAT", 1);
    let mut seed = env_number(
        "FAULTS_SEED",
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % u128::from(u64::MAX),
        )
        .unwrap()
            | 1,
    );
    for round in 0..repeat {
        let Some(db) = database(Backend::Postgres, items).await else {
            return;
        };
        eprintln!("F1 round {round} seed {seed}");
        let (requests, fake) = request_service(Duration::from_millis(2)).await;
        let jobs = jobs_file("f1");
        let endpoint = fake.url();
        let tokens = tokens();
        let args = [
            "--external-tables",
            "true",
            "--request-endpoint",
            endpoint.as_str(),
            "--run-lease-secs",
            "2",
            "--tokens",
            tokens.as_str(),
        ];
        let server = Server::start(&db.url, Some(&jobs), &args);
        let run = trigger(&server).await;
        let kill_at =
            items / 10 + usize::try_from(next(&mut seed) % (items as u64 * 8 / 10)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while requests.calls().len() < kill_at {
            assert!(
                Instant::now() < deadline,
                "the run stalled before the kill point"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        server.kill();
        let killed = Instant::now();
        if next(&mut seed).is_multiple_of(2) {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let server = Server::start(&db.url, Some(&jobs), &args);
        let last = finish(&server, &run).await;
        let recovery = killed.elapsed();
        assert_eq!(last.status, "succeeded", "{last:?}");
        assert_eq!(last.progress.unwrap().succeeded, items as u64);
        let figures = check(&db, &run, &requests).await;
        eprintln!(
            "F1 missed={} extra={} redelivered={} effective_duplicates={} lost_results=0 recovery_s={:.1}",
            figures.missed,
            figures.extra,
            figures.redelivered,
            figures.effective_duplicates,
            recovery.as_secs_f64()
        );
        assert_eq!(figures.missed, 0);
        assert_eq!(figures.extra, 0);
        assert_eq!(
            figures.effective_duplicates, 0,
            "an item ran again after its success was recorded"
        );
        assert!(
            figures.redelivered <= CHUNK,
            "redelivered {} > one chunk in flight",
            figures.redelivered
        );
        assert!(server.terminate().success());
        drop(fake);
        let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
    }
}

/// F7: 0.1 % poison items and one item whose downstream handler panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_poison_items_fail_once_and_a_panic_is_contained() {
    let items = 2_000;
    let Some(db) = database(Backend::Postgres, items).await else {
        return;
    };
    let (requests, fake) = request_service(Duration::ZERO).await;
    requests.poison(["user000100", "user001500"]);
    requests.panic_on(["user000777"]);
    let jobs = jobs_file("f7");
    let endpoint = fake.url();
    let tokens = tokens();
    let server = Server::start(
        &db.url,
        Some(&jobs),
        &[
            "--external-tables",
            "true",
            "--request-endpoint",
            endpoint.as_str(),
            "--tokens",
            tokens.as_str(),
        ],
    );
    let run = trigger(&server).await;
    let last = finish(&server, &run).await;
    let progress = last.progress.unwrap();
    assert_eq!(last.status, "completed_with_failures", "{last:?}");
    assert_eq!(
        (progress.succeeded, progress.failed, progress.total),
        (1_997, 3, 2_000)
    );
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for call in requests.calls() {
        *per_key
            .entry(call.idempotency_key.split_once(':').unwrap().1.to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_key["user000100"], 1, "poison fails after one attempt");
    assert_eq!(per_key["user001500"], 1);
    assert!(
        (1..=3).contains(&per_key["user000777"]),
        "{}",
        per_key["user000777"]
    );
    let figures = check(&db, &run, &requests).await;
    assert_eq!(
        (figures.missed, figures.extra, figures.effective_duplicates),
        (0, 0, 0)
    );
    // The server is still fine.
    let jobs_now = client(&server, Some("fault-token-1"))
        .await
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs_now.len(), 1);
    assert!(server.terminate().success());
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}

/// F10: a second server on the same SQLite file refuses to claim work, clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f10_a_second_server_on_one_sqlite_file_refuses_to_start() {
    let db = database(Backend::Sqlite, 200).await.unwrap();
    let (requests, fake) = request_service(Duration::ZERO).await;
    let jobs = jobs_file("f10");
    let endpoint = fake.url();
    let tokens = tokens();
    let args = [
        "--request-endpoint",
        endpoint.as_str(),
        "--tokens",
        tokens.as_str(),
    ];
    let first = Server::start(&db.url, Some(&jobs), &args);
    let run = trigger(&first).await;
    let last = finish(&first, &run).await;
    assert_eq!(last.status, "succeeded");
    // A second server on the file refuses to start, and says why.
    let second = std::process::Command::new(batch_e2e::binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &db.url,
        ])
        .arg("--jobs")
        .arg(&jobs)
        .args(["--request-endpoint", endpoint.as_str()])
        .env("BATCH_TOKENS", &tokens)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("SQLite mode is single-process"), "{stderr}");
    // Nothing was broken: the first server still runs work to the end.
    let another = trigger(&first).await;
    let last = finish(&first, &another).await;
    assert_eq!(last.status, "succeeded");
    let figures = check(&db, &another, &requests).await;
    assert_eq!(
        (
            figures.missed,
            figures.extra,
            figures.redelivered,
            figures.effective_duplicates
        ),
        (0, 0, 0, 0)
    );
    assert!(first.terminate().success());
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}

/// F6: SIGTERM mid-run with a second replica running: the first stops claiming, releases its
/// lease and exits 0; the second resumes the run. The lease lasts ten minutes here, so only the
/// release lets the second replica finish within the test's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f6_sigterm_hands_the_run_to_the_other_replica() {
    let items = 800;
    let Some(db) = database(Backend::Postgres, items).await else {
        return;
    };
    let (requests, fake) = request_service(Duration::from_millis(50)).await;
    let jobs = jobs_file("f6");
    let endpoint = fake.url();
    let tokens = tokens();
    let args = [
        "--external-tables",
        "true",
        "--request-endpoint",
        endpoint.as_str(),
        "--run-lease-secs",
        "600",
        "--tokens",
        tokens.as_str(),
    ];
    let first = Server::start(&db.url, Some(&jobs), &args);
    let run = trigger(&first).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while requests.calls().len() < 60 {
        assert!(Instant::now() < deadline, "the run never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = Server::start(&db.url, Some(&jobs), &args);
    let status = first.terminate();
    assert!(status.success(), "exit {status:?}");
    let at_exit = requests.calls().len();
    assert!(
        at_exit < items,
        "the run was handed over mid-way: {at_exit} of {items} called"
    );
    let last = finish(&second, &run).await;
    assert_eq!(last.status, "succeeded", "{last:?}");
    let figures = check(&db, &run, &requests).await;
    eprintln!(
        "F6 missed={} extra={} redelivered={} effective_duplicates={}",
        figures.missed, figures.extra, figures.redelivered, figures.effective_duplicates
    );
    assert_eq!(
        (figures.missed, figures.extra, figures.effective_duplicates),
        (0, 0, 0)
    );
    assert_eq!(
        figures.redelivered, 0,
        "a graceful stop finishes its chunk: nothing is redone"
    );
    assert!(second.terminate().success());
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}
