//! The fault suite (issue 9): each scenario `fN_…` runs the real `batch-server` against a
//! fake Request service that keeps a ledger of every call, injects its fault, and then checks
//! the ledger, the database and the API once the system is quiet, printing one
//! `FAULT-REPORT {json}` line (`missed / extra / redelivered / effective_duplicates /
//! lost_results / cross_tenant_rows / recovery_s`). `cargo xtask faults [--repeat N]
//! [--only F1,F3]` runs them (N times, each with a fresh seed for the random fault points,
//! printed; `FAULTS_SEED` replays one) and collects the reports; `FAULTS_ITEMS` sets the F1 run
//! size (default 2 000).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use batch_e2e::{Server, TOKENS, client};
use batch_proto::batch::v1 as pb;
use batch_testkit::siblings::{FakeRequestService, SiblingServer, Siblings};
use batch_testkit::{Backend, TestDatabase, Unavailable};
use sea_orm::{ConnectionTrait, Database};

#[path = "faults/db_loss.rs"]
mod db_loss;
#[path = "faults/downstream.rs"]
mod downstream;
#[path = "faults/input.rs"]
mod input;
#[path = "faults/schedules.rs"]
mod schedules;
#[path = "faults/tenants.rs"]
mod tenants;

const CHUNK: usize = 50;
const CONCURRENCY: usize = 16;

/// Scenarios run one at a time even when the test harness runs tests in parallel: each starts
/// servers and injects faults on this (two-core) machine. Every scenario holds this first.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

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
    prepare(&db.url, items).await;
    Some(db)
}

/// Migrates the database at `url` with the real binary and adds `items` active users of tenant
/// `fault` (attributes `{"team": "load"}`).
async fn prepare(url: &str, items: usize) {
    let migrated = std::process::Command::new(batch_e2e::binary())
        .args([
            "migrate",
            "--external-tables",
            "true",
            "--database-url",
            url,
        ])
        .env_remove("BATCH_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let conn = Database::connect(url).await.unwrap();
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
    // Longer for F1 at the size (`--items`), as before the kill.
    let items = u32::try_from(env_number("FAULTS_ITEMS", 2_000)).unwrap_or(u32::MAX);
    let deadline = Instant::now() + Duration::from_secs(180) + Duration::from_millis(5) * items;
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

/// The checker's figures for one scenario, printed as one `FAULT-REPORT {json}` line that
/// `cargo xtask faults` collects into `target/faults/summary.json`.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Report {
    /// The scenario (`F1` …).
    scenario: &'static str,
    /// The seed of its fault points, when it has any.
    seed: Option<u64>,
    /// Items (or schedule windows) that should have been executed (fired) and were not.
    missed: usize,
    /// Calls (or runs) for items (or windows) that do not exist, or beyond one per window.
    extra: usize,
    /// Calls of an item after a call that did not answer with an error (work redone, not a
    /// retry after a failure): allowed up to `redelivered_bound`.
    redelivered: usize,
    /// The most redeliveries the scenario allows (work in flight at the fault).
    redelivered_bound: usize,
    /// Calls that arrived after the item's success was recorded.
    effective_duplicates: usize,
    /// Items that ended without their result: succeeded without one, or not terminal when the
    /// system is quiet.
    lost_results: usize,
    /// Rows of another tenant in any response.
    cross_tenant_rows: usize,
    /// Seconds from the fault's end to the work's end, when that applies.
    recovery_s: Option<f64>,
}

impl Report {
    fn new(scenario: &'static str) -> Self {
        Report {
            scenario,
            ..Report::default()
        }
    }

    /// Prints the report and fails the test when any figure is above its bound.
    fn holds(&self) {
        println!("FAULT-REPORT {}", serde_json::to_string(self).unwrap());
        let zero = [
            ("missed", self.missed),
            ("extra", self.extra),
            ("effective_duplicates", self.effective_duplicates),
            ("lost_results", self.lost_results),
            ("cross_tenant_rows", self.cross_tenant_rows),
        ];
        for (name, value) in zero {
            assert_eq!(value, 0, "{}: {name} = {value}: {self:?}", self.scenario);
        }
        assert!(
            self.redelivered <= self.redelivered_bound,
            "{}: redelivered {} > bound {}: {self:?}",
            self.scenario,
            self.redelivered,
            self.redelivered_bound
        );
    }
}

/// The seed of a scenario's fault points: `FAULTS_SEED`, or the clock's nanoseconds.
fn seed() -> u64 {
    env_number(
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
    )
}

/// Reads the ledger and the database for `run`: items never called (missed), calls for keys
/// that are not items of the run (extra), calls beyond the first per key (redelivered), calls
/// that arrived after the item's success was recorded (effective duplicates), and items that
/// succeeded without a result or are not terminal (lost results).
async fn check(
    scenario: &'static str,
    db_url: &str,
    run: &str,
    requests: &FakeRequestService,
) -> Report {
    let conn = Database::connect(db_url).await.unwrap();
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            format!(
                "SELECT item_key, status, updated_ms, result IS NOT NULL AS has_result \
                 FROM run_items WHERE run_id = '{run}'"
            ),
        ))
        .await
        .unwrap();
    let mut items: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut report = Report::new(scenario);
    for row in rows {
        let status: String = row.try_get("", "status").unwrap();
        let has_result: bool = row.try_get("", "has_result").unwrap();
        if (status == "succeeded" && !has_result)
            || !matches!(
                status.as_str(),
                "succeeded" | "failed" | "invalid" | "cancelled" | "skipped"
            )
        {
            report.lost_results += 1;
        }
        items.insert(
            row.try_get("", "item_key").unwrap(),
            (status, row.try_get("", "updated_ms").unwrap()),
        );
    }
    conn.close().await.unwrap();
    // Per item, its calls in order: (arrival in ms, answered with an error).
    let mut calls: BTreeMap<String, Vec<(i64, bool)>> = BTreeMap::new();
    for call in requests.ledger() {
        if call.run != run {
            continue;
        }
        let at =
            i64::try_from(call.started.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap();
        calls
            .entry(call.item)
            .or_default()
            .push((at, call.code.is_some()));
    }
    for (key, (status, updated)) in &items {
        match calls.get_mut(key) {
            None if status != "invalid" => report.missed += 1,
            None => {}
            Some(times) => {
                times.sort_unstable();
                // A call after one that did not answer with an error is a redelivery (work
                // redone after a crash, say); one after an error is a retry, by design.
                report.redelivered += times.windows(2).filter(|w| !w[0].1).count();
                if status == "succeeded" {
                    // A millisecond of slack: both clocks are this machine's.
                    report.effective_duplicates +=
                        times.iter().filter(|(t, _)| *t > *updated + 1).count();
                }
            }
        }
    }
    report.extra = calls.keys().filter(|k| !items.contains_key(*k)).count();
    report
}

/// The items of `run` that ended failed, as `key: attempts, error` lines: what a scenario
/// whose run should have succeeded prints to say why it did not.
async fn failed_items(db_url: &str, run: &str) -> String {
    let conn = Database::connect(db_url).await.unwrap();
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            format!(
                "SELECT item_key, attempts, error FROM run_items \
                 WHERE run_id = '{run}' AND status = 'failed' ORDER BY item_key"
            ),
        ))
        .await
        .unwrap();
    conn.close().await.unwrap();
    rows.iter()
        .map(|row| {
            let key: String = row.try_get("", "item_key").unwrap();
            let attempts: i32 = row.try_get("", "attempts").unwrap();
            let error: Option<String> = row.try_get("", "error").unwrap();
            format!(
                "{key}: {attempts} attempts, {}\n",
                error.unwrap_or_default()
            )
        })
        .collect()
}

/// The items of `run` the database holds as ended.
async fn terminal_items(db_url: &str, run: &str) -> std::collections::BTreeSet<String> {
    let conn = Database::connect(db_url).await.unwrap();
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            format!(
                "SELECT item_key FROM run_items WHERE run_id = '{run}' AND status <> 'pending'"
            ),
        ))
        .await
        .unwrap();
    conn.close().await.unwrap();
    rows.iter()
        .map(|row| row.try_get("", "item_key").unwrap())
        .collect()
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
    let _serial = one_at_a_time().await;
    let items = usize::try_from(env_number("FAULTS_ITEMS", 2_000)).unwrap();
    let mut seed = seed();
    let Some(db) = database(Backend::Postgres, items).await else {
        return;
    };
    let initial = seed;
    eprintln!("F1 seed {seed}");
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
    let kill_at = items / 10 + usize::try_from(next(&mut seed) % (items as u64 * 8 / 10)).unwrap();
    // Two minutes, and 5 ms more per item: the 100 000 items (`--items 100000`) take
    // minutes to prepare and reach the kill point on a busy machine with a debug build.
    let deadline = Instant::now()
        + Duration::from_secs(120)
        + Duration::from_millis(5) * u32::try_from(items).unwrap_or(u32::MAX);
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
    let at_kill = requests.calls().len();
    // In flight at the kill: items called whose outcome was not recorded (the chunk being
    // executed); only these may be delivered again.
    let in_flight = {
        let called: std::collections::BTreeSet<String> =
            requests.ledger().into_iter().map(|c| c.item).collect();
        let recorded = terminal_items(&db.url, &run).await;
        called.difference(&recorded).count()
    };
    let server = Server::start(&db.url, Some(&jobs), &args);
    // Recovery: from the kill to the first call of the restarted server.
    while requests.calls().len() == at_kill {
        assert!(
            Instant::now() < deadline,
            "the restarted server never resumed"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let recovery = killed.elapsed();
    let last = finish(&server, &run).await;
    assert_eq!(last.status, "succeeded", "{last:?}");
    assert_eq!(last.progress.unwrap().succeeded, items as u64);
    let mut report = check("F1", &db.url, &run, &requests).await;
    report.seed = Some(initial);
    eprintln!("F1 killed at {at_kill} calls with {in_flight} items in flight");
    report.redelivered_bound = in_flight;
    report.recovery_s = Some(recovery.as_secs_f64());
    report.holds();
    assert!(server.terminate().success());
    drop(fake);
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}

/// F7: 0.1 % poison items and one item whose downstream handler panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_poison_items_fail_once_and_a_panic_is_contained() {
    let _serial = one_at_a_time().await;
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
    let mut report = check("F7", &db.url, &run, &requests).await;
    // The panicking item is tried up to its three attempts.
    report.redelivered_bound = 2;
    report.holds();
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
    let _serial = one_at_a_time().await;
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
    check("F10", &db.url, &another, &requests).await.holds();
    assert!(first.terminate().success());
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}

/// F6: SIGTERM mid-run with a second replica running: the first stops claiming, releases its
/// lease and exits 0; the second resumes the run. The lease lasts ten minutes here, so only the
/// release lets the second replica finish within the test's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f6_sigterm_hands_the_run_to_the_other_replica() {
    let _serial = one_at_a_time().await;
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
    // A graceful stop finishes its chunk: nothing is redone.
    check("F6", &db.url, &run, &requests).await.holds();
    assert!(second.terminate().success());
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}
