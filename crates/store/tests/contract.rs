//! The repository contract suite: every test runs against SQLite (`sqlite::…`) and PostgreSQL
//! (`postgres::…`) on a fresh database of its own.

// The suite's steps are plain functions called by the generated tests; a failed step should
// panic right there.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use batch_domain::config::{CategorySelection, Source};
use batch_domain::context::{BatchContext, Progress};
use batch_domain::preference::{Frequency, Preference, PreferenceDefaults, group_by_next_fire};
use batch_domain::priority::Aging;
use batch_domain::run::{ItemStatus, RunId, RunStatus, Trigger};
use batch_domain::{FeatureType, TemplateId, TimeOfDay};
use batch_domain::{JobId, Priority, TenantId, UserId};
use batch_migration::{ExternalMigrator, Migrator, MigratorTrait};
use batch_ports::contexts::{ContextStore, ReferenceCursor};
use batch_ports::jobs::{JobDefinition, JobOrigin, JobStore};
use batch_ports::runs::{
    ItemOutcome, NewItem, NewRun, Occurrence, RunCursor, RunFilter, RunStore, StoreError,
};
use batch_ports::schedules::{Pause, ScheduleState, ScheduleStore};
use batch_ports::{CategoryRepository, PreferenceSource, UserRepository};
use batch_store::Store;
use batch_testkit::{Backend, TestDatabase, Unavailable};
use chrono::{DateTime, Duration, Utc};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::json;

/// A migrated store on a fresh database, or `None` when the backend is unavailable outside CI.
async fn fresh(backend: Backend) -> Option<(TestDatabase, Store)> {
    let db = match TestDatabase::create(backend).await {
        Ok(db) => db,
        Err(Unavailable::Skip(why)) => {
            eprintln!("skipped: {why}");
            return None;
        }
    };
    let store = Store::connect(&db.url).await.expect("store connects");
    store.migrate().await.expect("migrations apply");
    store
        .migrate_external()
        .await
        .expect("external migrations apply");
    Some((db, store))
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-03-14T07:00:00Z")
        .unwrap()
        .to_utc()
}

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

fn new_run(id: &str, tenant_name: &str, created: DateTime<Utc>) -> NewRun {
    NewRun {
        id: RunId::parse(id).unwrap(),
        job: JobId::parse("job-a").unwrap(),
        tenant: tenant(tenant_name),
        trigger: Trigger::Scheduled,
        priority: Priority::NORMAL,
        scheduled_for: Some(created),
        occurrence: None,
        parent: None,
        serial: false,
        group: String::new(),
        created_at: created,
    }
}

/// Creates run `r1` of acme at t0 with `n` items.
async fn seed_run(store: &Store, n: usize) {
    store
        .create_run(new_run("r1", "acme", t0()), items(n))
        .await
        .unwrap();
}

fn items(n: usize) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            key: format!("item-{i:06}"),
            user: Some(UserId::parse(format!("u{i}")).unwrap()),
            status: if i % 10 == 9 {
                ItemStatus::Invalid
            } else {
                ItemStatus::Pending
            },
            payload: json!({ "n": i }),
        })
        .collect()
}

async fn migrations_apply_from_empty_and_roll_back(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let conn = store.connection();
    ExternalMigrator::down(conn, None)
        .await
        .expect("external down");
    Migrator::down(conn, None).await.expect("down");
    let gone = conn.execute_unprepared("SELECT COUNT(*) FROM runs").await;
    assert!(gone.is_err(), "runs table still exists after down");
    Migrator::up(conn, None).await.expect("up again");
    ExternalMigrator::up(conn, None)
        .await
        .expect("external up again");
    store
        .create_run(new_run("r1", "acme", t0()), items(3))
        .await
        .expect("schema usable after re-applying");
}

async fn runs_and_items_round_trip_with_exact_counts(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    seed_run(&store, 2_500).await;
    let run = store
        .run(&tenant("acme"), &RunId::parse("r1").unwrap())
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.scheduled_for, Some(t0()));
    assert_eq!(run.lease, None);
    let counts = store.counts(&run.id).await.unwrap();
    assert_eq!(
        (counts.pending, counts.invalid, counts.total()),
        (2_250, 250, 2_500)
    );

    // Keyset pages cover every item once, in order.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_items(&tenant("acme"), &run.id, None, after, 700)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|i| i.seq);
        seen.extend(page.into_iter().map(|i| i.key));
    }
    assert_eq!(seen.len(), 2_500);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    let invalid = store
        .list_items(
            &tenant("acme"),
            &run.id,
            Some(ItemStatus::Invalid),
            None,
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(invalid.len(), 250);
    assert_eq!(invalid[0].payload, json!({ "n": 9 }));

    // Another tenant's run answers like a missing one.
    for result in [
        store.run(&tenant("globex"), &run.id).await.map(|_| ()),
        store
            .list_items(&tenant("globex"), &run.id, None, None, 10)
            .await
            .map(|_| ()),
    ] {
        assert!(matches!(result, Err(StoreError::NotFound(_))), "{result:?}");
    }
}

async fn claim_is_exclusive(backend: Backend) {
    let Some((db, store)) = fresh(backend).await else {
        return;
    };
    for i in 0..30 {
        store
            .create_run(
                new_run(&format!("r{i:02}"), "acme", t0() + Duration::seconds(i)),
                items(1),
            )
            .await
            .unwrap();
    }
    // Separate stores are separate connection pools, as replicas would have on PostgreSQL;
    // SQLite is single-process, so its claimers share one store.
    let second = match backend {
        Backend::Postgres => Arc::new(Store::connect(&db.url).await.unwrap()),
        Backend::Sqlite => Arc::new(store),
    };
    let first = match backend {
        Backend::Postgres => Arc::new(Store::connect(&db.url).await.unwrap()),
        Backend::Sqlite => second.clone(),
    };
    let claim = |store: Arc<Store>, owner: &'static str| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store
                    .claim_runs(owner, t0(), t0() + Duration::seconds(60), 3)
                    .await
                    .unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.into_iter().map(|r| {
                    assert_eq!(r.lease.as_ref().map(|l| l.owner.as_str()), Some(owner));
                    assert_eq!(r.status, RunStatus::Running);
                    r.id
                }));
            }
        })
    };
    let (a, b) = (claim(first, "a"), claim(second, "b"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let a_set: HashSet<_> = a.iter().collect();
    assert!(
        b.iter().all(|id| !a_set.contains(id)),
        "a run was claimed twice"
    );
    assert_eq!(a.len() + b.len(), 30);
}

async fn claims_go_by_priority_then_age(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let mut low = new_run("old-low", "acme", t0());
    low.priority = Priority::LOW;
    let mut high = new_run("new-high", "acme", t0() + Duration::seconds(5));
    high.priority = Priority::HIGH;
    store.create_run(low, items(1)).await.unwrap();
    store.create_run(high, items(1)).await.unwrap();
    store
        .create_run(new_run("mid", "acme", t0()), items(1))
        .await
        .unwrap();
    let claimed = store
        .claim_runs("a", t0(), t0() + Duration::seconds(30), 2)
        .await
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["new-high", "mid"]);
}

async fn an_expired_lease_is_reclaimed_and_a_live_one_is_not(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    seed_run(&store, 5).await;
    let lease = Duration::seconds(30);
    let claimed = store.claim_runs("a", t0(), t0() + lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let id = claimed[0].id.clone();
    // Live: nobody else gets it.
    assert!(
        store
            .claim_runs(
                "b",
                t0() + Duration::seconds(29),
                t0() + Duration::seconds(59),
                10
            )
            .await
            .unwrap()
            .is_empty()
    );
    // Expired: b takes it over, and a can no longer renew or finish it.
    let rescued = store
        .claim_runs("b", t0() + lease, t0() + Duration::seconds(90), 10)
        .await
        .unwrap();
    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].started_at, Some(t0()), "first start is kept");
    assert!(matches!(
        store
            .renew_lease(&id, "a", t0() + Duration::seconds(120))
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    assert!(matches!(
        store.finish_run(&id, "a", RunStatus::Succeeded, t0()).await,
        Err(StoreError::LeaseLost(_))
    ));
}

async fn a_run_taken_over_fences_off_its_old_holders_outcomes(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    seed_run(&store, 5).await;
    let id = RunId::parse("r1").unwrap();
    let lease = Duration::seconds(30);
    store
        .claim_run(&id, "a", t0(), t0() + lease, None)
        .await
        .unwrap()
        .unwrap();
    // Reading due items claims them under the run's lease: it writes nothing, so reading
    // again gives the same items.
    let keys = |items: &[batch_ports::runs::ItemRecord]| {
        items.iter().map(|i| i.key.clone()).collect::<Vec<_>>()
    };
    let mine = store.due_items(&id, t0(), 0, &[], 2).await.unwrap();
    assert_eq!(keys(&mine), ["item-000000", "item-000001"]);
    assert_eq!(
        keys(&store.due_items(&id, t0(), 0, &[], 2).await.unwrap()),
        keys(&mine)
    );
    let outcome = |key: &str| ItemOutcome {
        key: key.to_owned(),
        status: ItemStatus::Succeeded,
        attempts: 1,
        next_attempt_at: None,
        error: None,
        result: Some(json!("done")),
        request_context: Some(json!({"idempotency_key": format!("r1:{key}")})),
    };
    // Somebody else's outcomes are refused while a holds the run.
    let first = [outcome("item-000000")];
    assert!(matches!(
        store.record_outcomes(&id, "b", &first, t0()).await,
        Err(StoreError::LeaseLost(_))
    ));
    store.record_outcomes(&id, "a", &first, t0()).await.unwrap();
    // An outcome for an item the run does not have spoils its whole chunk.
    let stray = [outcome("item-000001"), outcome("no-such-item")];
    assert!(matches!(
        store.record_outcomes(&id, "a", &stray, t0()).await,
        Err(StoreError::Unexpected(_))
    ));
    assert_eq!(store.counts(&id).await.unwrap().succeeded, 1);
    // After a's lease expires, b takes the run over; a's late outcomes are refused whole.
    store
        .claim_run(&id, "b", t0() + lease, t0() + lease * 2, None)
        .await
        .unwrap()
        .unwrap();
    let late = [outcome("item-000001"), outcome("item-000002")];
    let lost = store.record_outcomes(&id, "a", &late, t0() + lease).await;
    assert!(matches!(lost, Err(StoreError::LeaseLost(_))), "{lost:?}");
    assert_eq!(
        store.counts(&id).await.unwrap().succeeded,
        1,
        "a fenced write changed nothing"
    );
    store
        .record_outcomes(&id, "b", &late, t0() + lease)
        .await
        .unwrap();
    assert_eq!(store.counts(&id).await.unwrap().succeeded, 3);
    // Recorded items are no longer due; a released run fences off its last holder too.
    assert_eq!(
        keys(
            &store
                .due_items(&id, t0() + lease, 0, &[], 10)
                .await
                .unwrap()
        ),
        ["item-000003", "item-000004"]
    );
    store.release_lease(&id, "b").await.unwrap();
    assert!(matches!(
        store
            .record_outcomes(&id, "b", &[outcome("item-000003")], t0() + lease)
            .await,
        Err(StoreError::LeaseLost(_))
    ));
}

async fn due_items_leave_out_the_positions_the_caller_holds(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    // 2 500 items, every tenth invalid: 2 250 pending.
    seed_run(&store, 2_500).await;
    let id = RunId::parse("r1").unwrap();
    let seqs = |items: Vec<batch_ports::runs::ItemRecord>| {
        items.into_iter().map(|i| i.seq).collect::<Vec<_>>()
    };
    // Held: the first 1 200 positions, as a step with chunks in flight would pass them.
    let held: Vec<i64> = (1..=1_200).collect();
    let due = seqs(store.due_items(&id, t0(), 0, &held, 5).await.unwrap());
    assert_eq!(due, [1_201, 1_202, 1_203, 1_204, 1_205]);
    // Scattered positions too; invalid items (every tenth) are never due.
    let due = seqs(store.due_items(&id, t0(), 0, &[1, 3, 4], 5).await.unwrap());
    assert_eq!(due, [2, 5, 6, 7, 8]);
    let all = store.due_items(&id, t0(), 0, &[], 10_000).await.unwrap();
    assert_eq!(all.len(), 2_250);
    // Holding every pending item leaves nothing due.
    let every: Vec<i64> = all.iter().map(|i| i.seq).collect();
    assert!(
        store
            .due_items(&id, t0(), 0, &every, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_renewed_lease_is_never_rescued(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    seed_run(&store, 1).await;
    let lease = Duration::seconds(30);
    let id = store.claim_runs("a", t0(), t0() + lease, 1).await.unwrap()[0]
        .id
        .clone();
    // A long run: a renews every 10 s for a simulated day; b keeps trying.
    for step in 1..=8_640 / 10 {
        let now = t0() + Duration::seconds(step * 10);
        store.renew_lease(&id, "a", now + lease).await.unwrap();
        let stolen = store
            .claim_runs("b", now + Duration::seconds(5), now + lease, 1)
            .await
            .unwrap();
        assert!(stolen.is_empty(), "rescued a healthy run at step {step}");
    }
}

async fn a_released_lease_is_resumed_at_once(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    seed_run(&store, 1).await;
    let id = store
        .claim_runs("a", t0(), t0() + Duration::seconds(300), 1)
        .await
        .unwrap()[0]
        .id
        .clone();
    store.release_lease(&id, "a").await.unwrap();
    let resumed = store
        .claim_runs(
            "b",
            t0() + Duration::seconds(1),
            t0() + Duration::seconds(60),
            1,
        )
        .await
        .unwrap();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].lease.as_ref().unwrap().owner, "b");
}

async fn a_chunk_of_outcomes_is_written_with_bounded_statements(backend: Backend) {
    let Some((db, store)) = fresh(backend).await else {
        return;
    };
    drop(store);
    let statements = Arc::new(AtomicUsize::new(0));
    let mut conn = Database::connect(db.url.as_str()).await.unwrap();
    let counter = statements.clone();
    conn.set_metric_callback(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let store = Store::from_connection(conn, None);
    // 1 111 items, every tenth invalid: 1 000 to execute.
    seed_run(&store, 1_111).await;
    let id = RunId::parse("r1").unwrap();
    store
        .claim_runs("a", t0(), t0() + Duration::seconds(60), 1)
        .await
        .unwrap();
    let due = store.due_items(&id, t0(), 0, &[], 2_000).await.unwrap();
    assert_eq!(due.len(), 1_000, "invalid items are never due");
    let outcomes: Vec<ItemOutcome> = due
        .iter()
        .enumerate()
        .map(|(i, item)| match i % 3 {
            0 => ItemOutcome {
                key: item.key.clone(),
                status: ItemStatus::Succeeded,
                attempts: 1,
                next_attempt_at: None,
                error: None,
                result: Some(json!({ "text": format!("result {i}") })),
                request_context: Some(json!({ "key": item.key })),
            },
            1 => ItemOutcome {
                key: item.key.clone(),
                status: ItemStatus::Pending,
                attempts: 1,
                next_attempt_at: Some(t0() + Duration::seconds(10)),
                error: Some("unavailable".to_owned()),
                result: None,
                request_context: None,
            },
            _ => ItemOutcome {
                key: item.key.clone(),
                status: ItemStatus::Failed,
                attempts: 1,
                next_attempt_at: None,
                error: Some("bad input".to_owned()),
                result: None,
                request_context: None,
            },
        })
        .collect();
    let before = statements.load(Ordering::SeqCst);
    store
        .record_outcomes(&id, "a", &outcomes, t0())
        .await
        .unwrap();
    let used = statements.load(Ordering::SeqCst) - before;
    // One UPDATE … FROM (VALUES …) on PostgreSQL; on SQLite, statements of at most 512
    // parameters (7 per outcome), since binding costs grow with the square of their number
    // there; the test of the run's lease rides in each (transaction control is not counted).
    let bound = match backend {
        Backend::Postgres => 1,
        Backend::Sqlite => 1_000_usize.div_ceil(512 / 7),
    };
    assert!(used <= bound + 1, "1 000 outcomes took {used} statements");

    let counts = store.counts(&id).await.unwrap();
    assert_eq!(
        (
            counts.succeeded,
            counts.pending,
            counts.failed,
            counts.invalid
        ),
        (334, 333, 333, 111)
    );
    // Retries are due only once their time has come.
    assert!(
        store
            .due_items(&id, t0() + Duration::seconds(9), 0, &[], 2_000)
            .await
            .unwrap()
            .is_empty()
    );
    let retry = store
        .due_items(&id, t0() + Duration::seconds(10), 0, &[], 2_000)
        .await
        .unwrap();
    assert_eq!(retry.len(), 333);
    assert_eq!(retry[0].attempts, 1);
    assert_eq!(retry[0].last_error.as_deref(), Some("unavailable"));
    let done = store
        .list_items(&tenant("acme"), &id, Some(ItemStatus::Succeeded), None, 1)
        .await
        .unwrap();
    assert_eq!(done[0].result, Some(json!({ "text": "result 0" })));
    assert_eq!(done[0].request_context, Some(json!({ "key": done[0].key })));

    store
        .finish_run(&id, "a", RunStatus::CompletedWithFailures, t0())
        .await
        .unwrap();
    let run = store.run(&tenant("acme"), &id).await.unwrap();
    assert_eq!(
        (run.status, run.lease, run.finished_at),
        (RunStatus::CompletedWithFailures, None, Some(t0()))
    );
    assert!(
        store
            .claim_runs("b", t0() + Duration::days(1), t0() + Duration::days(2), 10)
            .await
            .unwrap()
            .is_empty(),
        "an ended run is never claimed"
    );
}

async fn an_occurrence_is_created_once(backend: Backend) {
    let Some((db, store)) = fresh(backend).await else {
        return;
    };
    let job = JobId::parse("job-a").unwrap();
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        // On PostgreSQL each racer has its own pool, like a replica.
        let store = match backend {
            Backend::Postgres => Arc::new(Store::connect(&db.url).await.unwrap()),
            Backend::Sqlite => store.clone(),
        };
        let job = job.clone();
        tasks.push(tokio::spawn(async move {
            store
                .create_occurrence(&job, &tenant("acme"), t0(), "")
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    let mut ids = BTreeSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Occurrence::Created(id) => {
                created += 1;
                ids.insert(id);
            }
            Occurrence::Existed(id) => {
                ids.insert(id);
            }
        }
    }
    assert_eq!((created, ids.len()), (1, 1));
    let other_group = store
        .create_occurrence(&job, &tenant("acme"), t0(), "09:00@Europe/Berlin")
        .await
        .unwrap();
    let later = store
        .create_occurrence(&job, &tenant("acme"), t0() + Duration::hours(1), "")
        .await
        .unwrap();
    assert!(matches!(other_group, Occurrence::Created(_)));
    assert!(matches!(later, Occurrence::Created(_)));
    // None has a run yet: all are orphans, in their range and group only, oldest first.
    let orphans = |from: DateTime<Utc>, until: DateTime<Utc>| {
        let store = store.clone();
        let job = job.clone();
        async move {
            store
                .occurrences_without_run(&job, "", from, until)
                .await
                .unwrap()
        }
    };
    let two_hours = t0() + Duration::hours(2);
    assert_eq!(
        orphans(t0(), two_hours).await,
        [t0(), t0() + Duration::hours(1)]
    );
    assert_eq!(
        orphans(t0() + Duration::minutes(1), two_hours).await,
        [t0() + Duration::hours(1)]
    );
    let first = *ids.first().unwrap();
    store
        .create_run(
            NewRun {
                occurrence: Some(first),
                ..new_run("r1", "acme", t0())
            },
            items(1),
        )
        .await
        .unwrap();
    assert_eq!(
        orphans(t0(), two_hours).await,
        [t0() + Duration::hours(1)],
        "an occurrence with its run is no orphan"
    );
}

async fn users_are_validated_in_chunks(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    // 2 500 users of acme, every fifth inactive, plus globex users with the same ids.
    let conn = store.connection();
    for tenant_name in ["acme", "globex"] {
        for chunk in (0..2_500).collect::<Vec<_>>().chunks(500) {
            let rows = chunk
                .iter()
                .map(|i| {
                    let active = if tenant_name == "acme" && i % 5 != 4 {
                        "TRUE"
                    } else {
                        "FALSE"
                    };
                    format!("('{tenant_name}', 'u{i}', {active})")
                })
                .collect::<Vec<_>>()
                .join(", ");
            conn.execute_unprepared(&format!(
                "INSERT INTO system_users (tenant, user_id, active) VALUES {rows}"
            ))
            .await
            .unwrap();
        }
    }
    let ids: Vec<UserId> = (0..3_000)
        .map(|i| UserId::parse(format!("u{i}")).unwrap())
        .collect();
    let result = store.validate_users(&tenant("acme"), &ids).await.unwrap();
    assert_eq!((result.valid.len(), result.invalid.len()), (2_000, 1_000));
    assert_eq!(result.valid[0].as_str(), "u0");
    assert_eq!(result.invalid[0].as_str(), "u4");
    let none = store
        .validate_users(&tenant("globex"), &ids[..10])
        .await
        .unwrap();
    assert_eq!(none.invalid.len(), 10, "inactive users are invalid");
}

async fn a_database_that_went_away_is_unavailable(backend: Backend) {
    let url = match backend {
        Backend::Sqlite => "sqlite:///proc/self/status/batch.db?mode=rwc".to_owned(),
        Backend::Postgres => "postgres://postgres@127.0.0.1:1/none".to_owned(),
    };
    match Store::connect(&url).await {
        Err(StoreError::Unavailable(message)) => assert!(!message.is_empty()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

async fn contexts_are_saved_merged_and_scoped_to_their_tenant(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let (parent, child) = (
        RunId::parse("parent").unwrap(),
        RunId::parse("child").unwrap(),
    );
    let mut context = BatchContext::default();
    context.metadata.run_id = "parent".to_owned();
    context.items.valid.push("u1");
    context.progress = Progress::new(1, 0, 1, 1);
    store
        .save_context(&tenant("acme"), &parent, &context, t0())
        .await
        .unwrap();
    assert_eq!(
        store.context(&tenant("acme"), &parent).await.unwrap(),
        context
    );
    assert!(matches!(
        store.context(&tenant("globex"), &parent).await,
        Err(StoreError::NotFound(_))
    ));
    // Progress alone: the rest of the context stays; another tenant cannot write it; a whole
    // context saved afterwards wins.
    store
        .save_progress(&tenant("acme"), &parent, &Progress::new(0, 1, 1, 1), t0())
        .await
        .unwrap();
    let read = store.context(&tenant("acme"), &parent).await.unwrap();
    assert_eq!(read.progress, Progress::new(0, 1, 1, 1));
    assert_eq!(
        (read.items, read.metadata),
        (context.items.clone(), context.metadata.clone())
    );
    assert!(matches!(
        store
            .save_progress(&tenant("globex"), &parent, &Progress::default(), t0())
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store
            .context(&tenant("acme"), &parent)
            .await
            .unwrap()
            .progress,
        Progress::new(0, 1, 1, 1)
    );
    store
        .save_context(&tenant("acme"), &parent, &context, t0())
        .await
        .unwrap();
    assert_eq!(
        store.context(&tenant("acme"), &parent).await.unwrap(),
        context
    );
    // The child's progress, saved alone, is what the merge adds.
    let mut other = context.clone();
    other.metadata.run_id = "child".to_owned();
    store
        .save_context(&tenant("acme"), &child, &other, t0())
        .await
        .unwrap();
    store
        .save_progress(&tenant("acme"), &child, &Progress::new(2, 1, 3, 4), t0())
        .await
        .unwrap();
    let merged = store
        .merge_into_parent(&tenant("acme"), &parent, &child, t0())
        .await
        .unwrap();
    let again = store
        .merge_into_parent(&tenant("acme"), &parent, &child, t0())
        .await
        .unwrap();
    assert_eq!(merged, again, "merging twice changes nothing");
    assert_eq!(merged.progress, Progress::new(3, 1, 4, 5));
    assert_eq!(merged.children, ["child"]);
    assert_eq!(
        store.context(&tenant("acme"), &parent).await.unwrap(),
        merged
    );
    assert!(
        store
            .merge_into_parent(&tenant("globex"), &parent, &child, t0())
            .await
            .is_err()
    );
}

async fn references_are_handed_out_once_and_paged_newest_first(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let job = JobId::parse("job-a").unwrap();
    let users: Vec<UserId> = (0..1_500)
        .map(|i| UserId::parse(format!("u{i}")).unwrap())
        .collect();
    for i in 0..5 {
        let run = RunId::parse(format!("run-{i}")).unwrap();
        let added = store
            .add_references(
                &tenant("acme"),
                &job,
                &run,
                &users,
                t0() + Duration::minutes(i),
            )
            .await
            .unwrap();
        assert_eq!(added, 1_500);
    }
    let again = store
        .add_references(
            &tenant("acme"),
            &job,
            &RunId::parse("run-0").unwrap(),
            &users[..10],
            t0(),
        )
        .await
        .unwrap();
    assert_eq!(again, 0, "a user keeps one reference per run");
    let user = UserId::parse("u7").unwrap();
    let mut runs = Vec::new();
    let mut cursor: Option<ReferenceCursor> = None;
    loop {
        let page = store
            .references(&tenant("acme"), &user, cursor.as_ref(), 2)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some(ReferenceCursor {
            created_at: last.created_at,
            run: last.run.clone(),
        });
        runs.extend(page.iter().map(|r| r.run.to_string()));
    }
    assert_eq!(runs, ["run-4", "run-3", "run-2", "run-1", "run-0"]);
    assert!(
        store
            .references(&tenant("globex"), &user, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Loads categories `products` (acme) and `news` (globex) with the given items.
async fn load_categories(store: &Store) {
    let conn = store.connection();
    let backend = conn.get_database_backend();
    for (tenant_name, name) in [("acme", "products"), ("globex", "news")] {
        conn.execute_raw(Statement::from_sql_and_values(
            backend,
            "INSERT INTO categories (tenant, name) VALUES ($1, $2)",
            [tenant_name.into(), name.into()],
        ))
        .await
        .unwrap();
    }
    let regions = ["eu", "us", "apac"];
    for i in 0..60 {
        let attributes = json!({
            "status": if i % 4 == 0 { "archived" } else { "active" },
            "price": if i == 7 { json!("call us") } else { json!(i * 10) },
            "region": regions[i % 3],
            "featured": i % 5 == 0,
            "name": format!("product {i:02}"),
        });
        let refs = json!([format!("u{i}"), "not a user id"]);
        conn.execute_raw(Statement::from_sql_and_values(
            backend,
            "INSERT INTO category_items (tenant, category, item_key, attributes, user_refs) \
             VALUES ($1, $2, $3, $4, $5)",
            [
                "acme".into(),
                "products".into(),
                format!("p{i:03}").into(),
                sea_orm::Value::Json(Some(Box::new(attributes))),
                sea_orm::Value::Json(Some(Box::new(refs))),
            ],
        ))
        .await
        .unwrap();
    }
}

fn selection(filters: serde_json::Value, limit: Option<u64>) -> CategorySelection {
    let mut job = json!({
        "id": "j", "tenant": "acme", "type": "INDIVIDUAL_CATEGORIES", "template": "t",
        "source": {"category": {"name": "products", "filters": filters}}
    });
    if let Some(limit) = limit {
        job["source"]["category"]["limit"] = json!(limit);
    }
    match batch_domain::config::parse_job(job).unwrap().source {
        Source::Category(selection) => selection,
        other => panic!("{other:?}"),
    }
}

async fn keys(
    store: &Store,
    filters: serde_json::Value,
    limit: Option<u64>,
    page: usize,
) -> Vec<String> {
    let selection = selection(filters, limit);
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .items(&tenant("acme"), &selection, after.as_deref(), page)
            .await
            .unwrap();
        assert_eq!(page.stale_since, None);
        let Some(last) = page.items.last() else { break };
        after = Some(last.key.clone());
        keys.extend(page.items.into_iter().map(|i| i.key));
    }
    keys
}

async fn category_items_are_filtered_limited_and_paged(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    load_categories(&store).await;
    let all = keys(&store, json!({}), None, 7).await;
    assert_eq!(all.len(), 60);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "stable key order");
    let count = |filters: serde_json::Value| {
        let store = &store;
        async move { keys(store, filters, None, 1_000).await.len() }
    };
    assert_eq!(count(json!({"status": "active"})).await, 45);
    assert_eq!(count(json!({"featured": true})).await, 12);
    assert_eq!(count(json!({"price": 100})).await, 1);
    assert_eq!(count(json!({"region": {"in": ["eu", "us"]}})).await, 40);
    // "call us" is not a number: numeric ranges skip it instead of failing.
    assert_eq!(count(json!({"price": {"gte": 0, "lt": 100}})).await, 9);
    assert_eq!(count(json!({"name": {"gte": "product 50"}})).await, 10);
    assert_eq!(
        count(json!({"key": {"in": ["p001", "p002", "zzz"]}})).await,
        2
    );
    assert_eq!(count(json!({"key": {"gt": "p049"}})).await, 10);
    assert_eq!(
        count(json!({"status": "active", "region": "eu", "price": {"gt": 300}})).await,
        7
    );
    // The limit holds across pages.
    let limited = keys(&store, json!({"status": "active"}), Some(10), 3).await;
    assert_eq!(limited.len(), 10);
    assert_eq!(
        limited,
        keys(&store, json!({"status": "active"}), None, 1_000).await[..10]
    );
    // Items carry their user references as stored.
    let page = store
        .items(
            &tenant("acme"),
            &selection(json!({"key": "p003"}), None),
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(page.items[0].user_refs, ["u3", "not a user id"]);
    assert_eq!(page.items[0].attributes["region"], "eu");
    // Missing and foreign categories are not found.
    for tenant_name in ["globex", "nobody"] {
        let result = store
            .items(&tenant(tenant_name), &selection(json!({}), None), None, 10)
            .await;
        assert!(
            matches!(result, Err(batch_ports::SourceError::NotFound(_))),
            "{result:?}"
        );
    }
}

fn preference(user: &str, time: Option<&str>, zone: Option<&str>) -> Preference {
    Preference {
        tenant: tenant("acme"),
        user: UserId::parse(user).unwrap(),
        feature_type: FeatureType::parse("digest").unwrap(),
        frequency: Some(Frequency::Daily),
        time_of_day: time.map(|t| TimeOfDay::parse(t).unwrap()),
        time_zone: zone.map(str::to_owned),
        weekday: Some(chrono::Weekday::Fri),
        day_of_month: Some(31),
        template_override: Some(TemplateId::parse("short").unwrap()),
        parameters: json!({"length": 3}).as_object().unwrap().clone(),
        enabled: true,
        version: 1,
    }
}

async fn preferences_are_paged_and_changes_follow_a_watermark(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let zones = ["Europe/Berlin", "America/New_York", "Mars/Base"];
    let prefs: Vec<Preference> = (0..250)
        .map(|i| {
            preference(
                &format!("u{i:03}"),
                Some(["08:00", "09:30"][i % 2]),
                Some(zones[i % 3]),
            )
        })
        .collect();
    store.upsert_preferences(&prefs).await.unwrap();
    let feature = FeatureType::parse("digest").unwrap();
    let mut listed = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = store
            .list(&tenant("acme"), &feature, token.as_deref(), 100)
            .await
            .unwrap();
        listed.extend(page.preferences);
        match page.next_page {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(
        listed, prefs,
        "every preference comes back as written, in user order"
    );
    let (all, watermark) = store
        .changes_since(&tenant("acme"), &feature, 0)
        .await
        .unwrap();
    assert_eq!(all.len(), 250);
    assert!(
        store
            .changes_since(&tenant("acme"), &feature, watermark)
            .await
            .unwrap()
            .0
            .is_empty()
    );

    let mut changed = vec![prefs[3].clone(), prefs[4].clone()];
    changed[0].time_of_day = Some(TimeOfDay::parse("18:00").unwrap());
    changed[1].enabled = false;
    store.upsert_preferences(&changed).await.unwrap();
    let (changes, next_mark) = store
        .changes_since(&tenant("acme"), &feature, watermark)
        .await
        .unwrap();
    assert!(next_mark > watermark);
    assert_eq!(changes.len(), 2);
    assert_eq!(
        changes[0].time_of_day,
        Some(TimeOfDay::parse("18:00").unwrap())
    );
    assert!(!changes[1].enabled);
    assert_eq!(changes[1].version, 2);
    // The stored preferences group like any others; the bad zone falls back and says so.
    let grouping = group_by_next_fire(&listed, &PreferenceDefaults::default(), t0());
    assert_eq!(grouping.fallbacks.len(), 83);
    assert!(
        store
            .list(&tenant("globex"), &feature, None, 10)
            .await
            .unwrap()
            .preferences
            .is_empty()
    );
    assert!(
        store
            .list(&tenant("acme"), &feature, Some("not-hex"), 10)
            .await
            .is_err()
    );
}

async fn serial_runs_wait_their_turn_and_cancels_reach_the_owner(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let mut runs = Vec::new();
    for (id, job, serial, offset) in [
        ("a", "job-a", true, 0),
        ("b", "job-a", true, 1),
        ("c", "job-a", false, 2),
        ("d", "job-b", true, 3),
    ] {
        let mut run = new_run(id, "acme", t0() + Duration::seconds(offset));
        run.job = JobId::parse(job).unwrap();
        run.serial = serial;
        runs.push(run.id.clone());
        store.create_run(run, items(1)).await.unwrap();
    }
    let lease = |s: i64| t0() + Duration::seconds(s);
    let claimed: BTreeSet<String> = store
        .claim_runs("w", lease(10), lease(100), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(
        claimed,
        ["a", "c", "d"].into_iter().map(str::to_owned).collect(),
        "b waits behind a"
    );
    assert!(
        store
            .claim_runs("w", lease(11), lease(100), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .claim_run(&runs[1], "w", lease(11), lease(100), None)
            .await
            .unwrap()
            .is_none()
    );
    store
        .finish_run(&runs[0], "w", RunStatus::Succeeded, lease(12))
        .await
        .unwrap();
    // c (not serial) still runs, and a serial run waits for any running run of its job.
    assert!(
        store
            .claim_runs("w", lease(13), lease(100), 10)
            .await
            .unwrap()
            .is_empty()
    );
    store
        .finish_run(&runs[2], "w", RunStatus::Succeeded, lease(13))
        .await
        .unwrap();
    let next = store
        .claim_runs("w", lease(13), lease(100), 10)
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    let active: Vec<String> = store
        .active_runs(&JobId::parse("job-a").unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(active, ["b"]);
    assert!(!store.renew_lease(&runs[1], "w", lease(200)).await.unwrap());
    store.request_cancel(&runs[1]).await.unwrap();
    assert!(
        store.renew_lease(&runs[1], "w", lease(200)).await.unwrap(),
        "the owner sees the request"
    );
}

async fn claimable_runs_age_and_are_capped_per_tenant(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    // acme: a fresh high run and a low one waiting 60 minutes; globex: five normal runs.
    let mut high = new_run("acme-high", "acme", t0() + Duration::minutes(60));
    high.priority = Priority::HIGH;
    let mut low = new_run("acme-low", "acme", t0());
    low.priority = Priority::LOW;
    for run in [high, low] {
        store.create_run(run, items(1)).await.unwrap();
    }
    for i in 0..5 {
        store
            .create_run(
                new_run(
                    &format!("globex-{i}"),
                    "globex",
                    t0() + Duration::minutes(i),
                ),
                items(1),
            )
            .await
            .unwrap();
    }
    let now = t0() + Duration::minutes(60);
    let order = |runs: Vec<batch_ports::runs::RunRecord>| -> Vec<String> {
        runs.into_iter().map(|r| r.id.to_string()).collect()
    };
    let aging = Aging::default();
    let jobs = [JobId::parse("job-a").unwrap()];
    assert!(
        store
            .claimable_runs(now, aging, 2, &[JobId::parse("gone").unwrap()])
            .await
            .unwrap()
            .is_empty(),
        "runs of jobs not asked for take no place"
    );
    // Unaged, high (75) beats low (25).
    let no_aging = Aging { cap: 0, ..aging };
    assert_eq!(
        order(store.claimable_runs(now, no_aging, 2, &jobs).await.unwrap()),
        ["acme-high", "acme-low", "globex-0", "globex-1"]
    );
    // Aged one point a minute, low (25 + 60) overtakes high (75 + 0); each tenant capped at 2.
    assert_eq!(
        order(store.claimable_runs(now, aging, 2, &jobs).await.unwrap()),
        ["acme-low", "acme-high", "globex-0", "globex-1"]
    );
    // A claimed run is no longer claimable, and counts as running for its tenant.
    let lease_until = now + Duration::minutes(1);
    assert!(
        store
            .claim_run(
                &RunId::parse("globex-0").unwrap(),
                "w",
                now,
                lease_until,
                None
            )
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        order(store.claimable_runs(now, aging, 1, &jobs).await.unwrap()),
        ["acme-low", "globex-1"]
    );
    let load = |running, load| {
        vec![batch_ports::runs::TenantLoad {
            tenant: tenant("globex"),
            running,
            load,
        }]
    };
    assert_eq!(store.tenant_loads(now, now).await.unwrap(), load(1, 1));
    assert_eq!(
        store.tenant_loads(lease_until, now).await.unwrap(),
        load(0, 1),
        "an expired lease is not running, but its run started recently"
    );
    assert!(
        store
            .tenant_loads(lease_until, lease_until)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn the_global_limit_holds_across_concurrent_claimers(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..12 {
        let run = new_run(&format!("r{i:02}"), "acme", t0() + Duration::seconds(i));
        ids.push(run.id.clone());
        store.create_run(run, items(1)).await.unwrap();
    }
    let now = t0() + Duration::minutes(1);
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let store = store.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            store
                .claim_run(
                    &id,
                    &format!("w{n}"),
                    now,
                    now + Duration::minutes(5),
                    Some(3),
                )
                .await
                .unwrap()
                .is_some()
        }));
    }
    let mut claimed = 0;
    for task in tasks {
        claimed += usize::from(task.await.unwrap());
    }
    assert_eq!(claimed, 3, "twelve claimers, a limit of three");
    // Once their leases expire, the slots are free again.
    let later = now + Duration::minutes(6);
    assert!(
        store
            .claim_run(
                &ids[11],
                "late",
                later,
                later + Duration::minutes(1),
                Some(3)
            )
            .await
            .unwrap()
            .is_some()
    );
}

async fn serial_runs_of_different_groups_run_side_by_side(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    for (id, group, offset) in [
        ("a", "daily at 09:00 UTC", 0),
        ("b", "daily at 10:00 UTC", 1),
        ("c", "daily at 09:00 UTC", 2),
    ] {
        let mut run = new_run(id, "acme", t0() + Duration::seconds(offset));
        run.serial = true;
        run.group = group.to_owned();
        store.create_run(run, items(1)).await.unwrap();
    }
    let now = t0() + Duration::seconds(10);
    let claimed: Vec<String> = store
        .claim_runs("w", now, now + Duration::seconds(60), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| format!("{}:{}", r.id, r.group))
        .collect();
    assert_eq!(
        claimed,
        ["a:daily at 09:00 UTC", "b:daily at 10:00 UTC"],
        "c waits behind a of its own group only"
    );
}

async fn pauses_are_shared_and_schedule_states_are_read_one_by_one(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let job = JobId::parse("digest").unwrap();
    let pause = Pause {
        job: job.clone(),
        tenant: tenant("acme"),
        note: "migrating templates".to_owned(),
        since: t0(),
    };
    store.pause_job(&pause).await.unwrap();
    store
        .pause_job(&Pause {
            note: "still migrating".to_owned(),
            since: t0() + Duration::hours(1),
            ..pause.clone()
        })
        .await
        .unwrap();
    let paused = store.paused_jobs().await.unwrap();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0].note, "still migrating");
    assert_eq!(
        paused[0].since,
        t0(),
        "a second pause keeps the first start"
    );
    assert!(store.resume_job(&job).await.unwrap());
    assert!(!store.resume_job(&job).await.unwrap());
    assert!(store.paused_jobs().await.unwrap().is_empty());

    let state = ScheduleState {
        job: job.clone(),
        group: "daily at 09:00 Europe/Berlin".to_owned(),
        tenant: tenant("acme"),
        next_nominal: Some(t0()),
        last_fired: None,
    };
    assert!(store.advance_schedule(None, &state, t0()).await.unwrap());
    assert_eq!(
        store.schedule_state(&job, &state.group).await.unwrap(),
        Some(state.clone())
    );
    assert_eq!(store.schedule_state(&job, "").await.unwrap(), None);
}

async fn runs_are_listed_newest_first_filtered_and_paged(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    for (id, tenant_name, job, minute) in [
        ("r1", "acme", "job-a", 0),
        ("r2", "acme", "job-b", 1),
        ("r3", "globex", "job-a", 2),
        ("r4", "acme", "job-a", 3),
        ("r5", "acme", "job-a", 3),
    ] {
        let mut run = new_run(id, tenant_name, t0() + Duration::minutes(minute));
        run.job = JobId::parse(job).unwrap();
        let mut run_items = items(2);
        if id == "r2" {
            run_items[0].user = Some(UserId::parse("zed").unwrap());
        }
        store.create_run(run, run_items).await.unwrap();
    }
    let ids = |runs: Vec<batch_ports::runs::RunRecord>| -> Vec<String> {
        runs.into_iter().map(|r| r.id.to_string()).collect()
    };
    assert_eq!(store.queued_runs().await.unwrap(), 5, "the queue depth");
    let acme = RunFilter {
        tenant: Some(tenant("acme")),
        ..RunFilter::default()
    };
    assert_eq!(
        ids(store.list_runs(&acme, None, 10).await.unwrap()),
        ["r5", "r4", "r2", "r1"]
    );
    let first = store.list_runs(&acme, None, 2).await.unwrap();
    let cursor = RunCursor {
        created_at: first[1].created_at,
        run: first[1].id.clone(),
    };
    assert_eq!(ids(first), ["r5", "r4"]);
    assert_eq!(
        ids(store.list_runs(&acme, Some(&cursor), 2).await.unwrap()),
        ["r2", "r1"]
    );
    let narrow = RunFilter {
        jobs: Some(vec![JobId::parse("job-a").unwrap()]),
        created_from: Some(t0() + Duration::minutes(1)),
        created_until: Some(t0() + Duration::minutes(3)),
        ..RunFilter::default()
    };
    assert_eq!(
        ids(store.list_runs(&narrow, None, 10).await.unwrap()),
        ["r3"]
    );
    let of_zed = RunFilter {
        user: Some(UserId::parse("zed").unwrap()),
        status: Some(RunStatus::Queued),
        ..acme.clone()
    };
    assert_eq!(
        ids(store.list_runs(&of_zed, None, 10).await.unwrap()),
        ["r2"]
    );
    let nothing = RunFilter {
        jobs: Some(Vec::new()),
        ..RunFilter::default()
    };
    assert!(
        store
            .list_runs(&nothing, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn job_definitions_sync_from_the_file_and_change_through_the_api(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let definition = |id: &str, origin| JobDefinition {
        id: JobId::parse(id).unwrap(),
        tenant: tenant("acme"),
        definition: json!({"id": id, "marker": 1}),
        origin,
    };
    let v0 = store.catalog_version().await.unwrap();
    store
        .sync_file_jobs(&[
            definition("a", JobOrigin::File),
            definition("b", JobOrigin::File),
        ])
        .await
        .unwrap();
    store
        .create_job(&definition("c", JobOrigin::Api))
        .await
        .unwrap();
    assert!(matches!(
        store.create_job(&definition("a", JobOrigin::Api)).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let (all, v1) = store.job_definitions().await.unwrap();
    assert!(v1 > v0);
    let ids: Vec<(String, JobOrigin)> = all.iter().map(|d| (d.id.to_string(), d.origin)).collect();
    assert_eq!(
        ids,
        [
            ("a".to_owned(), JobOrigin::File),
            ("b".to_owned(), JobOrigin::File),
            ("c".to_owned(), JobOrigin::Api)
        ]
    );
    // A new file drops b, keeps the API's c.
    store
        .sync_file_jobs(&[definition("a", JobOrigin::File)])
        .await
        .unwrap();
    let (all, v2) = store.job_definitions().await.unwrap();
    assert!(v2 > v1);
    assert_eq!(all.len(), 2);
    // File jobs are not the API's to change.
    assert!(matches!(
        store.update_job(&definition("a", JobOrigin::Api)).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(
        !store
            .delete_job(&tenant("acme"), &JobId::parse("a").unwrap())
            .await
            .unwrap()
    );
    let mut changed = definition("c", JobOrigin::Api);
    changed.definition = json!({"id": "c", "marker": 2});
    store.update_job(&changed).await.unwrap();
    assert!(
        !store
            .delete_job(&tenant("globex"), &JobId::parse("c").unwrap())
            .await
            .unwrap(),
        "another tenant's job is not found"
    );
    let (all, _) = store.job_definitions().await.unwrap();
    assert_eq!(all[1].definition["marker"], 2);
    assert!(
        store
            .delete_job(&tenant("acme"), &JobId::parse("c").unwrap())
            .await
            .unwrap()
    );
    assert_eq!(store.job_definitions().await.unwrap().0.len(), 1);
    assert!(store.catalog_version().await.unwrap() > v2);
}

async fn a_run_drafted_in_pages_appears_whole_at_commit(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let acme = tenant("acme");
    let id = RunId::parse("r1").unwrap();
    let mut pages = items(5);
    let second = pages.split_off(3);
    let mut draft = store.begin_run(new_run("r1", "acme", t0())).await.unwrap();
    draft.append(pages).await.unwrap();
    draft.append(second).await.unwrap();
    assert!(
        matches!(store.run(&acme, &id).await, Err(StoreError::NotFound(_))),
        "a drafted run is invisible before commit"
    );
    draft.commit().await.unwrap();
    let listed = store.list_items(&acme, &id, None, None, 10).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|i| (i.seq, i.key.as_str()))
            .collect::<Vec<_>>(),
        [
            (1, "item-000000"),
            (2, "item-000001"),
            (3, "item-000002"),
            (4, "item-000003"),
            (5, "item-000004"),
        ],
        "positions follow on from page to page"
    );
    assert_eq!(
        store.run(&acme, &id).await.unwrap().status,
        RunStatus::Queued
    );

    // A draft dropped without commit leaves nothing, and its id can be used again.
    let dropped = RunId::parse("r2").unwrap();
    let mut draft = store.begin_run(new_run("r2", "acme", t0())).await.unwrap();
    draft.append(items(2)).await.unwrap();
    drop(draft);
    assert!(matches!(
        store.run(&acme, &dropped).await,
        Err(StoreError::NotFound(_))
    ));
    // The dropped draft's transaction is rolled back, not left holding its row's lock.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        store.create_run(new_run("r2", "acme", t0()), items(1)),
    )
    .await
    .expect("the dropped draft still holds its run's row")
    .unwrap();
    assert_eq!(store.counts(&dropped).await.unwrap().pending, 1);

    // A key twice across pages spoils the draft: nothing is written.
    let spoiled = RunId::parse("r3").unwrap();
    let mut draft = store.begin_run(new_run("r3", "acme", t0())).await.unwrap();
    draft.append(items(2)).await.unwrap();
    let failed = match draft.append(items(1)).await {
        Err(e) => Err(e),
        Ok(()) => draft.commit().await,
    };
    // Not `AlreadyExists`, which a scheduler takes for a run another replica created.
    assert!(
        matches!(&failed, Err(StoreError::Unexpected(m)) if m.contains("appears twice")),
        "{failed:?}"
    );
    assert!(matches!(
        store.run(&acme, &spoiled).await,
        Err(StoreError::NotFound(_))
    ));

    // A second run for one occurrence is refused, at begin or at commit.
    let occurrence = match store
        .create_occurrence(&JobId::parse("job-a").unwrap(), &acme, t0(), "")
        .await
        .unwrap()
    {
        Occurrence::Created(id) | Occurrence::Existed(id) => id,
    };
    let for_occurrence = |id: &str| NewRun {
        occurrence: Some(occurrence),
        ..new_run(id, "acme", t0())
    };
    store
        .create_run(for_occurrence("r4"), items(1))
        .await
        .unwrap();
    let second = match store.begin_run(for_occurrence("r5")).await {
        Err(e) => Err(e),
        Ok(mut draft) => match draft.append(items(1)).await {
            Err(e) => Err(e),
            Ok(()) => draft.commit().await,
        },
    };
    assert!(
        matches!(second, Err(StoreError::AlreadyExists(_))),
        "{second:?}"
    );
}

async fn due_items_start_after_a_position(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    seed_run(&store, 10).await;
    let id = RunId::parse("r1").unwrap();
    let seqs = |items: Vec<batch_ports::runs::ItemRecord>| {
        items.into_iter().map(|i| i.seq).collect::<Vec<_>>()
    };
    // Item 10 is invalid: only pending items are due.
    let later = store.due_items(&id, t0(), 5, &[], 10).await.unwrap();
    assert_eq!(seqs(later), [6, 7, 8, 9]);
    let earlier = store.due_items(&id, t0(), 0, &[], 5).await.unwrap();
    assert_eq!(seqs(earlier), [1, 2, 3, 4, 5]);
}

async fn renewals_racing_records_lose_no_outcome(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    let store = Arc::new(store);
    let run = RunId::parse("r1").unwrap();
    let all = 2_000;
    store
        .create_run(
            new_run("r1", "acme", t0()),
            (0..all)
                .map(|i| NewItem {
                    key: format!("item-{i:06}"),
                    user: None,
                    status: ItemStatus::Pending,
                    payload: json!({}),
                })
                .collect(),
        )
        .await
        .unwrap();
    store
        .claim_run(&run, "a", t0(), t0() + Duration::hours(1), None)
        .await
        .unwrap()
        .unwrap();
    // A heartbeat renews the run's lease, whose row fences the chunk's record, while the
    // record writes: the record must still write each outcome, never report its lease lost.
    let mut after = 0;
    for round in 0..20 {
        let now = t0() + Duration::seconds(round);
        let chunk = store.due_items(&run, now, after, &[], 100).await.unwrap();
        after = chunk.last().unwrap().seq;
        let outcomes: Vec<ItemOutcome> = chunk
            .iter()
            .map(|item| ItemOutcome {
                key: item.key.clone(),
                status: ItemStatus::Succeeded,
                attempts: 1,
                next_attempt_at: None,
                error: None,
                result: Some(json!({ "round": round })),
                request_context: None,
            })
            .collect();
        let renewing = {
            let (store, run) = (store.clone(), run.clone());
            tokio::spawn(async move {
                for extra in 2..6 {
                    store
                        .renew_lease(&run, "a", now + Duration::minutes(extra))
                        .await
                        .unwrap();
                }
            })
        };
        store
            .record_outcomes(&run, "a", &outcomes, now)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        renewing.await.unwrap();
    }
    assert_eq!(store.counts(&run).await.unwrap().succeeded, 2_000);
}

async fn many_runs_drafted_at_once_leave_connections_to_read_with(backend: Backend) {
    let Some((_db, store)) = fresh(backend).await else {
        return;
    };
    store
        .create_run(new_run("existing", "acme", t0()), items(1))
        .await
        .unwrap();
    // More drafts open at once than the pool has connections (16): each still gets its
    // pages in, and the sources can still be read meanwhile.
    let mut drafts = Vec::new();
    for n in 0..20 {
        let mut draft = store
            .begin_run(new_run(&format!("draft-{n}"), "acme", t0()))
            .await
            .unwrap();
        draft.append(items(3)).await.unwrap();
        drafts.push(draft);
    }
    let read = store
        .run(&tenant("acme"), &RunId::parse("existing").unwrap())
        .await
        .unwrap();
    assert_eq!(read.status, RunStatus::Queued);
    for draft in drafts {
        draft.commit().await.unwrap();
    }
    for n in 0..20 {
        let run = RunId::parse(format!("draft-{n}")).unwrap();
        assert_eq!(store.counts(&run).await.unwrap().pending, 3);
    }
}

macro_rules! contract_suite {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(batch_testkit::Backend::Sqlite).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(batch_testkit::Backend::Postgres).await;
                }
            )+
        }
    };
}

contract_suite!(
    migrations_apply_from_empty_and_roll_back,
    runs_and_items_round_trip_with_exact_counts,
    claim_is_exclusive,
    claims_go_by_priority_then_age,
    an_expired_lease_is_reclaimed_and_a_live_one_is_not,
    a_run_taken_over_fences_off_its_old_holders_outcomes,
    due_items_leave_out_the_positions_the_caller_holds,
    a_renewed_lease_is_never_rescued,
    a_released_lease_is_resumed_at_once,
    a_chunk_of_outcomes_is_written_with_bounded_statements,
    an_occurrence_is_created_once,
    users_are_validated_in_chunks,
    a_database_that_went_away_is_unavailable,
    contexts_are_saved_merged_and_scoped_to_their_tenant,
    references_are_handed_out_once_and_paged_newest_first,
    category_items_are_filtered_limited_and_paged,
    preferences_are_paged_and_changes_follow_a_watermark,
    serial_runs_wait_their_turn_and_cancels_reach_the_owner,
    claimable_runs_age_and_are_capped_per_tenant,
    the_global_limit_holds_across_concurrent_claimers,
    serial_runs_of_different_groups_run_side_by_side,
    pauses_are_shared_and_schedule_states_are_read_one_by_one,
    runs_are_listed_newest_first_filtered_and_paged,
    job_definitions_sync_from_the_file_and_change_through_the_api,
    a_run_drafted_in_pages_appears_whole_at_commit,
    due_items_start_after_a_position,
    renewals_racing_records_lose_no_outcome,
    many_runs_drafted_at_once_leave_connections_to_read_with,
);

#[tokio::test]
async fn the_embedded_database_is_created_and_migrated_on_first_use() {
    let dir = std::env::temp_dir().join(format!("batch-embedded-{}", uuid_like()));
    let url = format!("sqlite://{}/nested/data/batch.db?mode=rwc", dir.display());
    let store = Store::open(&url, true).await.unwrap();
    seed_run(&store, 3).await;
    drop(store);
    // Opening again applies nothing new and keeps the data.
    let store = Store::open(&url, true).await.unwrap();
    assert_eq!(
        store
            .counts(&RunId::parse("r1").unwrap())
            .await
            .unwrap()
            .total(),
        3
    );
    assert!(dir.join("nested/data/batch.db").exists());
    drop(store);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The embedded database commits to a write-ahead log, synced at every commit: one file
/// appended and synced once per commit, where the rollback journal wrote and synced two and
/// deleted one; a commit stays durable across a power loss.
#[tokio::test]
async fn the_embedded_database_commits_to_a_write_ahead_log_synced_at_every_commit() {
    let dir = std::env::temp_dir().join(format!("batch-wal-{}", uuid_like()));
    let url = format!("sqlite://{}/batch.db?mode=rwc", dir.display());
    let store = Store::open(&url, true).await.unwrap();
    seed_run(&store, 3).await;
    let pragma =
        |name: &str| Statement::from_string(sea_orm::DbBackend::Sqlite, format!("PRAGMA {name}"));
    let conn = store.connection();
    let journal = conn
        .query_one_raw(pragma("journal_mode"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(journal.try_get_by_index::<String>(0).unwrap(), "wal");
    let synchronous = conn
        .query_one_raw(pragma("synchronous"))
        .await
        .unwrap()
        .unwrap();
    // 2 is FULL.
    assert_eq!(synchronous.try_get_by_index::<i64>(0).unwrap(), 2);
    // The commits went to the log, next to the database.
    assert!(dir.join("batch.db-wal").exists());
    drop(store);
    std::fs::remove_dir_all(dir).unwrap();
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or_default()
    )
}

/// On PostgreSQL every process hears of a run another one announced as queued, or released
/// as it stopped; creating a run announces nothing by itself (its context comes after).
#[tokio::test]
async fn another_process_hears_of_an_announced_or_released_run() {
    let Some((db, first)) = fresh(Backend::Postgres).await else {
        return;
    };
    let second = Store::connect(&db.url).await.unwrap();
    let mut queued = second
        .listen_for_queued_runs()
        .await
        .unwrap()
        .expect("PostgreSQL listens");
    async fn next(queued: &mut batch_store::QueuedRuns) -> String {
        tokio::time::timeout(std::time::Duration::from_secs(30), queued.next())
            .await
            .expect("announced in time")
            .unwrap()
    }
    let r1 = RunId::parse("r1").unwrap();
    first
        .create_run(new_run("r0", "acme", t0()), items(1))
        .await
        .unwrap();
    first
        .create_run(new_run("r1", "acme", t0()), items(2))
        .await
        .unwrap();
    first.announce_queued(&r1).await.unwrap();
    assert_eq!(next(&mut queued).await, "r1", "r0 was never announced");
    let claimed = first
        .claim_runs("a", t0(), t0() + Duration::seconds(30), 2)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    // Released by a process that does not hold it: nothing to say (the next announcement
    // heard is r0's). By its owner (a server stopping): queued again, and announced.
    first.release_lease(&r1, "b").await.unwrap();
    first
        .announce_queued(&RunId::parse("r0").unwrap())
        .await
        .unwrap();
    assert_eq!(next(&mut queued).await, "r0");
    first.release_lease(&r1, "a").await.unwrap();
    assert_eq!(next(&mut queued).await, "r1");
    // SQLite has no other process to tell.
    let Some((_sqlite, embedded)) = fresh(Backend::Sqlite).await else {
        return;
    };
    embedded.announce_queued(&r1).await.unwrap();
    assert!(embedded.listen_for_queued_runs().await.unwrap().is_none());
}

#[tokio::test]
async fn a_second_process_on_one_sqlite_file_cannot_claim_work() {
    let Some((db, first)) = fresh(Backend::Sqlite).await else {
        return;
    };
    first
        .create_run(new_run("r1", "acme", t0()), items(1))
        .await
        .unwrap();
    assert_eq!(
        first
            .claim_runs("a", t0(), t0() + Duration::seconds(30), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    let second = Store::connect(&db.url).await.unwrap();
    match second
        .claim_runs("b", t0() + Duration::hours(1), t0() + Duration::hours(2), 1)
        .await
    {
        Err(StoreError::Unsupported(message)) => {
            assert!(message.contains("single-process"), "{message}");
            assert!(message.contains("PostgreSQL"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(first);
    // Once the first process is gone, the second may work.
    assert_eq!(
        second
            .claim_runs("b", t0() + Duration::hours(1), t0() + Duration::hours(2), 1)
            .await
            .unwrap()
            .len(),
        1
    );
}
