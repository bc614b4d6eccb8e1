//! The BatchProcessor against stateful in-memory fakes of every port, with a manual clock.

// Test steps are plain helper functions; a failed step should panic right there.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use batch_app::Ports;
use batch_app::processor::{BatchProcessor, ProcessorSettings, Step};
use batch_app::strategy::{ItemSink, PrepareSettings, Scope, Strategies};
use batch_domain::config::{Job, parse_job};
use batch_domain::preference::{Frequency, Preference};
use batch_domain::run::{ItemStatus, RunStatus, Trigger};
use batch_domain::{FeatureType, TemplateId, TenantId, UserId};
use batch_ports::contexts::ContextStore;
use batch_ports::runs::{ItemRecord, NewItem, RunStore};
use batch_ports::{CategoryItem, Clock};
use batch_testkit::ManualClock;
use batch_testkit::fakes::{
    Behaviour, FakeCategories, FakeExecutor, FakePreferences, FakeTemplates, FakeUsers, MemoryRuns,
};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

struct World {
    runs: Arc<MemoryRuns>,
    users: Arc<FakeUsers>,
    categories: Arc<FakeCategories>,
    preferences: Arc<FakePreferences>,
    executor: Arc<FakeExecutor>,
    clock: Arc<ManualClock>,
    ports: Ports,
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-03-14T07:00:00Z")
        .unwrap()
        .to_utc()
}

impl World {
    fn new(behaviour: Behaviour) -> World {
        let runs = Arc::new(MemoryRuns::default());
        let users = Arc::new(FakeUsers::default());
        let categories = Arc::new(FakeCategories::default());
        let preferences = Arc::new(FakePreferences::default());
        let templates = Arc::new(FakeTemplates::default());
        for id in ["digest", "report", "short", "deliver"] {
            templates.insert(id, "Hello {{ user_id }}");
        }
        let clock = Arc::new(ManualClock::new(t0()));
        let executor = Arc::new(FakeExecutor::new(behaviour, clock.clone()));
        let ports = Ports {
            runs: runs.clone(),
            contexts: runs.clone(),
            users: users.clone(),
            categories: categories.clone(),
            preferences: preferences.clone(),
            templates,
            executor: executor.clone(),
            clock: clock.clone(),
        };
        World {
            runs,
            users,
            categories,
            preferences,
            executor,
            clock,
            ports,
        }
    }

    fn processor(&self, owner: &str) -> BatchProcessor {
        BatchProcessor::new(
            self.ports.clone(),
            Strategies::default(),
            ProcessorSettings {
                owner: owner.to_owned(),
                seed: Some(7),
                ..ProcessorSettings::default()
            },
        )
    }

    /// Users u0000…u{n-1} of acme.
    fn with_users(&self, n: usize) {
        let ids: Vec<String> = (0..n).map(|i| format!("u{i:04}")).collect();
        self.users.insert("acme", ids.iter().map(String::as_str));
    }

    fn with_category(&self, name: &str, n: usize) {
        let items = (0..n)
            .map(|i| CategoryItem {
                category: name.to_owned(),
                key: format!("{name}-{i:03}"),
                attributes: json!({ "n": i }),
                user_refs: vec![
                    format!("u{i:04}"),
                    "ghost".to_owned(),
                    "not a user".to_owned(),
                ],
            })
            .collect();
        self.categories.insert("acme", name, items);
    }
}

fn job(extra: Value) -> Job {
    let mut job = json!({
        "id": "job-a", "tenant": "acme", "type": "INDIVIDUAL_USERS", "template": "digest",
        "source": {"users": {"ids": ["u0000", "u0001", "u0002", "ghost"]}},
        "execution": {"concurrency": 4, "chunk_size": 3},
        "retry": {"max_attempts": 5, "initial_backoff_ms": 100, "max_backoff_ms": 1000},
    });
    for (k, v) in extra.as_object().unwrap() {
        job[k] = v.clone();
    }
    parse_job(job).unwrap_or_else(|p| panic!("{p}"))
}

/// Prepares and creates a manual run of `job`.
async fn start_manual(processor: &BatchProcessor, job: &Job) -> batch_ports::runs::RunRecord {
    processor
        .start(job, Trigger::Manual, None, &Scope::default(), None)
        .await
        .unwrap()
}

async fn run_job(
    world: &World,
    job: &Job,
) -> (
    batch_ports::runs::RunRecord,
    batch_domain::context::BatchContext,
) {
    let processor = world.processor("p1");
    let run = start_manual(&processor, job).await;
    let mut execution = processor.open(job, &run.id).await.unwrap().unwrap();
    execution.run_to_completion().await.unwrap();
    let run = world.runs.run(&job.tenant, &run.id).await.unwrap();
    let context = world.runs.context(&job.tenant, &run.id).await.unwrap();
    (run, context)
}

#[tokio::test]
async fn individual_users_one_request_per_valid_user() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let job = job(json!({"distribution": {"users": ["boss"], "delivery_template": "deliver"}}));
    let (run, context) = run_job(&world, &job).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    let items = world.runs.items_of(&run.id);
    let invalid: Vec<&str> = items
        .iter()
        .filter(|i| i.status == ItemStatus::Invalid)
        .map(|i| i.key.as_str())
        .collect();
    assert_eq!(invalid, ["ghost"]);
    let done: Vec<&ItemRecord> = items
        .iter()
        .filter(|i| i.status == ItemStatus::Succeeded)
        .collect();
    assert_eq!(done.len(), 3);
    assert_eq!(done[0].result.as_ref().unwrap()["user"], "u0000");
    assert_eq!(
        done[0].request_context.as_ref().unwrap()["idempotency_key"],
        format!("{}:u0000", run.id)
    );
    assert_eq!(
        (
            context.validation.total,
            context.validation.valid,
            context.validation.invalid
        ),
        (4, 3, 1)
    );
    assert_eq!(
        (
            context.progress.total,
            context.progress.succeeded,
            context.progress.percentage
        ),
        (3, 3, 100.0)
    );
    assert_eq!(
        (
            context.items.valid.count,
            context.items.invalid.sample.clone()
        ),
        (3, vec!["ghost".to_owned()])
    );
    assert_eq!(context.metadata.strategy, "individual");
    assert_eq!(context.metadata.status, "succeeded");
    // References: the distribution user and every user whose item succeeded; one delivery.
    for user in ["boss", "u0000", "u0001", "u0002"] {
        let refs = world
            .runs
            .references(&job.tenant, &UserId::parse(user).unwrap(), None, 10)
            .await
            .unwrap();
        assert_eq!(refs.len(), 1, "{user}");
    }
    let deliveries: Vec<_> = world
        .executor
        .calls()
        .into_iter()
        .filter(|c| c.request.template.as_str() == "deliver")
        .collect();
    assert_eq!(deliveries.len(), 1);
    // Three items in chunks of three: one outcome write per chunk.
    assert_eq!(world.runs.outcome_writes(), 1);
}

impl World {
    /// How many references to runs `user` of acme holds.
    async fn references_of(&self, user: &str) -> usize {
        self.runs
            .references(
                &TenantId::parse("acme").unwrap(),
                &UserId::parse(user).unwrap(),
                None,
                10,
            )
            .await
            .unwrap()
            .len()
    }
}

#[tokio::test]
async fn a_user_receives_the_run_as_soon_as_their_item_succeeds() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let job = job(json!({"execution": {"concurrency": 1, "chunk_size": 1}}));
    let processor = world.processor("p1");
    let run = start_manual(&processor, &job).await;
    let mut execution = processor.open(&job, &run.id).await.unwrap().unwrap();
    assert_eq!(execution.run_next_chunk().await.unwrap(), Step::Worked(1));
    assert_eq!(
        (
            world.references_of("u0000").await,
            world.references_of("u0001").await
        ),
        (1, 0)
    );
    assert_eq!(
        execution.run_to_completion().await.unwrap(),
        RunStatus::Succeeded
    );
    for user in ["u0000", "u0001", "u0002"] {
        assert_eq!(world.references_of(user).await, 1, "{user}");
    }
    // Every chunk handed out its own: the end of the run read no item again.
    assert_eq!(world.runs.item_pages(), 0);
}

#[tokio::test]
async fn references_a_chunk_could_not_hand_out_are_handed_out_at_the_end() {
    // Whichever chunk's references fail, first, middle or last.
    for failing in 0..3 {
        let world = World::new(Behaviour::default());
        world.with_users(3);
        let job = job(json!({"execution": {"concurrency": 1, "chunk_size": 1}}));
        let processor = world.processor("p1");
        let run = start_manual(&processor, &job).await;
        let mut execution = processor.open(&job, &run.id).await.unwrap().unwrap();
        for _ in 0..failing {
            assert_eq!(execution.run_next_chunk().await.unwrap(), Step::Worked(1));
        }
        world.runs.fail_next_references(1);
        assert_eq!(
            execution.run_to_completion().await.unwrap(),
            RunStatus::Succeeded
        );
        for user in ["u0000", "u0001", "u0002"] {
            assert_eq!(
                world.references_of(user).await,
                1,
                "chunk {failing}: {user}"
            );
        }
    }
}

#[tokio::test]
async fn a_resumed_run_hands_out_the_references_its_first_execution_left() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let job = job(json!({"execution": {"concurrency": 1, "chunk_size": 1}}));
    let first = world.processor("p1");
    let run = start_manual(&first, &job).await;
    let mut execution = first.open(&job, &run.id).await.unwrap().unwrap();
    // The first chunk is recorded but its reference is not handed out, and the processor
    // stops for good.
    world.runs.fail_next_references(1);
    assert_eq!(execution.run_next_chunk().await.unwrap(), Step::Worked(1));
    drop(execution);
    world.runs.expire_leases();
    assert_eq!(world.references_of("u0000").await, 0);
    let second = world.processor("p2");
    let mut execution = second.open(&job, &run.id).await.unwrap().unwrap();
    assert_eq!(
        execution.run_to_completion().await.unwrap(),
        RunStatus::Succeeded
    );
    for user in ["u0000", "u0001", "u0002"] {
        assert_eq!(world.references_of(user).await, 1, "{user}");
    }
}

#[tokio::test]
async fn batch_users_one_request_for_the_whole_set() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let (run, context) = run_job(&world, &job(json!({"type": "BATCH_USERS"}))).await;
    let calls = world.executor.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].request.payload["users"],
        json!(["u0000", "u0001", "u0002"])
    );
    assert_eq!(context.metadata.strategy, "object");
    assert_eq!((context.progress.total, context.validation.invalid), (1, 1));
    assert_eq!(run.status, RunStatus::Succeeded);
}

#[tokio::test]
async fn individual_categories_validate_user_references() {
    let world = World::new(Behaviour::default());
    world.with_users(2);
    world.with_category("products", 5);
    let job =
        job(json!({"type": "INDIVIDUAL_CATEGORIES", "source": {"category": {"name": "products"}}}));
    let (run, context) = run_job(&world, &job).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(world.executor.calls().len(), 5);
    // Refs: u0000–u0004, ghost and "not a user": 7 distinct, 2 valid.
    let refs = context.user_references.unwrap();
    assert_eq!((refs.total, refs.valid, refs.invalid), (7, 2, 5));
    let first = world.runs.items_of(&run.id).into_iter().next().unwrap();
    assert_eq!(first.payload["users"], json!(["u0000"]));
    assert_eq!(first.payload["category"], "products");
}

#[tokio::test]
async fn batch_categories_object_and_combined() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    world.with_category("news", 2);
    world.with_category("prices", 3);
    let object = job(json!({"type": "BATCH_CATEGORIES", "source": {"category": {"name": "news"}}}));
    let (_, context) = run_job(&world, &object).await;
    assert_eq!(context.metadata.strategy, "object");
    let combined = job(json!({"id": "job-b", "type": "BATCH_CATEGORIES",
        "source": {"categories": [{"name": "news"}, {"name": "prices"}]}}));
    let (_, context) = run_job(&world, &combined).await;
    assert_eq!(context.metadata.strategy, "combined");
    let calls = world.executor.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].request.payload["items"].as_array().unwrap().len(),
        2
    );
    let by_category = calls[1].request.payload["categories"].as_object().unwrap();
    assert_eq!(by_category.keys().collect::<Vec<_>>(), ["news", "prices"]);
    assert_eq!(by_category["prices"].as_array().unwrap().len(), 3);
}

fn preference(user: &str, template: Option<&str>, enabled: bool) -> Preference {
    Preference {
        tenant: TenantId::parse("acme").unwrap(),
        user: UserId::parse(user).unwrap(),
        feature_type: FeatureType::parse("digest").unwrap(),
        frequency: Some(Frequency::Daily),
        time_of_day: None,
        time_zone: Some("Europe/Berlin".to_owned()),
        weekday: None,
        day_of_month: None,
        template_override: template.map(|t| TemplateId::parse(t).unwrap()),
        parameters: json!({"tone": user}).as_object().unwrap().clone(),
        enabled,
        version: 1,
    }
}

fn dynamic(kind: &str, source: Value) -> Job {
    job(json!({
        "id": format!("dyn-{}", kind.to_lowercase()), "type": kind, "source": source,
        "feature_type": "digest",
        "default_preferences": {"template": "report", "parameters": {"length": "short"}}
    }))
}

/// Records the pages a strategy hands on.
#[derive(Default)]
struct Pages(Vec<Vec<String>>);

#[async_trait::async_trait]
impl ItemSink for Pages {
    async fn add(&mut self, items: Vec<NewItem>) -> Result<(), batch_app::Error> {
        self.0.push(items.into_iter().map(|i| i.key).collect());
        Ok(())
    }
}

#[tokio::test]
async fn preparation_hands_the_items_on_a_page_at_a_time() {
    let world = World::new(Behaviour::default());
    world.with_users(10);
    world.preferences.upsert(preference("u0003", None, false));
    let settings = PrepareSettings {
        validation_chunk: 4,
        page_size: 4,
    };
    let ids: Vec<String> = (0..10)
        .map(|i| format!("u{i:04}"))
        .chain(["ghost".to_owned()])
        .collect();
    let cases = [
        (
            "filter",
            job(json!({"source": {"users": {"filter": {}}}})),
            10,
        ),
        ("ids", job(json!({"source": {"users": {"ids": ids}}})), 11),
        (
            "preferences",
            dynamic(
                "PREFERENCE_INDIVIDUAL_USERS",
                json!({"users": {"filter": {}}}),
            ),
            9,
        ),
    ];
    for (name, job, total) in cases {
        let mut pages = Pages::default();
        Strategies::default()
            .for_job(&job)
            .unwrap()
            .prepare(&job, &Scope::default(), &world.ports, &settings, &mut pages)
            .await
            .unwrap();
        let sizes: Vec<usize> = pages.0.iter().map(Vec::len).collect();
        assert!(
            sizes.len() >= 3 && sizes.iter().all(|&n| n <= 4),
            "{name}: pages of at most a page size, not the whole run at once: {sizes:?}"
        );
        let keys: HashSet<String> = pages.0.into_iter().flatten().collect();
        assert_eq!(keys.len(), total, "{name}: every item once");
    }
}

#[tokio::test]
async fn preferences_apply_per_user_overrides_and_skip_disabled_users() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    world
        .preferences
        .upsert(preference("u0000", Some("short"), true));
    world.preferences.upsert(preference("u0001", None, false));
    let (_, context) = run_job(
        &world,
        &dynamic(
            "PREFERENCE_INDIVIDUAL_USERS",
            json!({"users": {"ids": ["u0000", "u0001", "u0002"]}}),
        ),
    )
    .await;
    let calls: BTreeMap<String, _> = world
        .executor
        .calls()
        .into_iter()
        .map(|c| (c.request.user.clone().unwrap().to_string(), c.request))
        .collect();
    assert_eq!(calls.keys().collect::<Vec<_>>(), ["u0000", "u0002"]);
    assert_eq!(calls["u0000"].template.as_str(), "short");
    assert_eq!(calls["u0000"].parameters["tone"], "u0000");
    assert_eq!(calls["u0000"].parameters["length"], "short");
    // No preference of its own: the job's default preferences.
    assert_eq!(calls["u0002"].template.as_str(), "report");
    assert_eq!(context.metadata.strategy, "preference");
    assert!(
        context.notes.iter().any(|n| n.contains("1 users skipped")),
        "{:?}",
        context.notes
    );
}

#[tokio::test]
async fn preference_batches_and_an_unavailable_preference_source() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    world.with_category("news", 2);
    world.preferences.upsert(preference("u0001", None, false));
    let (_, _) = run_job(
        &world,
        &dynamic(
            "PREFERENCE_BATCH_USERS",
            json!({"users": {"ids": ["u0000", "u0001", "u0002"]}}),
        ),
    )
    .await;
    let call = world.executor.calls().pop().unwrap();
    assert_eq!(call.request.payload["users"], json!(["u0000", "u0002"]));
    assert_eq!(
        call.request.payload["preferences"]["u0000"]["template"],
        "report"
    );
    world.preferences.set_unavailable(true);
    let (run, context) = run_job(
        &world,
        &dynamic(
            "PREFERENCE_INDIVIDUAL_CATEGORIES",
            json!({"category": {"name": "news"}}),
        ),
    )
    .await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert!(
        context
            .notes
            .iter()
            .any(|n| n.contains("preferences unavailable")),
        "{:?}",
        context.notes
    );
    world.with_category("prices", 1);
    let (run, context) = run_job(
        &world,
        &dynamic(
            "PREFERENCE_BATCH_CATEGORIES",
            json!({"categories": [{"name": "news"}, {"name": "prices"}]}),
        ),
    )
    .await;
    assert_eq!(
        (run.status, context.metadata.strategy.as_str()),
        (RunStatus::Succeeded, "preference")
    );
    let call = world.executor.calls().pop().unwrap();
    assert!(call.request.payload["categories"]["prices"].is_array());
}

fn many(n: usize, extra: Value) -> Job {
    let ids: Vec<String> = (0..n).map(|i| format!("u{i:04}")).collect();
    let mut base = json!({"source": {"users": {"ids": ids}}});
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    job(base)
}

#[tokio::test]
async fn concurrency_never_exceeds_the_limit() {
    let world = World::new(Behaviour::default());
    world.with_users(200);
    let job = many(
        200,
        json!({"execution": {"concurrency": 4, "chunk_size": 50}}),
    );
    let (run, _) = run_job(&world, &job).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert!(
        world.executor.max_in_flight() <= 4,
        "{}",
        world.executor.max_in_flight()
    );
    assert!(
        world.executor.max_in_flight() > 1,
        "requests ran one at a time"
    );
    assert_eq!(world.runs.outcome_writes(), 4, "one write per chunk of 50");
}

#[tokio::test]
async fn no_second_of_the_clock_sees_more_starts_than_the_rate() {
    let world = World::new(Behaviour::default());
    world.with_users(60);
    let job = many(
        60,
        json!({"execution": {"concurrency": 8, "chunk_size": 25, "rate_limit_per_sec": 10}}),
    );
    let (run, _) = run_job(&world, &job).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    let times: Vec<DateTime<Utc>> = world.executor.calls().iter().map(|c| c.at).collect();
    assert_eq!(times.len(), 60);
    for start in &times {
        let in_window = times
            .iter()
            .filter(|t| *t >= start && **t < *start + Duration::seconds(1))
            .count();
        assert!(
            in_window <= 10,
            "{in_window} starts in the second from {start}"
        );
    }
    let span = *times.iter().max().unwrap() - *times.iter().min().unwrap();
    assert!(
        span >= Duration::milliseconds(5_800),
        "60 starts at 10/s take about 6 s, took {span}"
    );
}

#[tokio::test]
async fn the_next_chunk_starts_while_the_current_one_still_has_a_request_in_flight() {
    // u0000 answers only once u0004, the first item of the second chunk, has been called. With a
    // barrier between chunks (record a chunk, then claim the next) the run could never go on.
    let world = World::new(Behaviour {
        waits_for: [("u0000".to_owned(), "u0004".to_owned())].into(),
        ..Behaviour::default()
    });
    world.with_users(12);
    let job = many(
        12,
        json!({"execution": {"concurrency": 4, "chunk_size": 4}}),
    );
    let (run, context) =
        tokio::time::timeout(std::time::Duration::from_secs(60), run_job(&world, &job))
            .await
            .expect("the run waited for the slowest item of a chunk before claiming the next");
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(context.progress.succeeded, 12);
    assert!(world.executor.max_in_flight() <= 4);
    let calls = world.executor.calls();
    assert_eq!(calls.len(), 12, "every item called once");
}

#[tokio::test]
async fn claims_and_requests_go_on_while_a_chunk_is_being_recorded_up_to_a_bound() {
    // Every outcome write is held. With the record taking its turn between claims, only the
    // chunks claimed ahead of the first (6 items here) could be called before the first write
    // answered. Beside the claims, the step goes on until the chunks waiting to be recorded
    // reach the claim-ahead bound, and no further: it must not lease ever more items. The
    // bound: the chunk being recorded (2 items), a chunk and twice the concurrency waiting
    // (4) and as many in flight (4).
    let world = World::new(Behaviour::default());
    world.with_users(20);
    let job = many(
        20,
        json!({"execution": {"concurrency": 1, "chunk_size": 2}}),
    );
    let processor = world.processor("p1");
    let run = start_manual(&processor, &job).await;
    world.runs.hold_writes(true);
    let mut execution = processor.open(&job, &run.id).await.unwrap().unwrap();
    let held = async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while world.executor.calls().len() <= 6 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} items were called while the first chunk was being recorded",
                world.executor.calls().len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Everything that can run without the held write has run.
        for _ in 0..1_000 {
            tokio::task::yield_now().await;
        }
        let called = world.executor.calls().len();
        assert!(called <= 10, "{called} items called with no write answered");
        assert_eq!(world.runs.outcome_writes(), 0);
        world.runs.hold_writes(false);
    };
    let (status, ()) = tokio::join!(execution.run_to_completion(), held);
    assert_eq!(status.unwrap(), RunStatus::Succeeded);
    let items = world.runs.items_of(&run.id);
    assert!(items.iter().all(|i| i.status == ItemStatus::Succeeded));
    // One write per chunk, recorded in turn.
    assert_eq!(world.runs.outcome_writes(), 10);
}

#[tokio::test]
async fn items_an_interrupted_step_left_unrecorded_are_taken_again_first() {
    let world = World::new(Behaviour::default());
    world.with_users(10);
    let job = many(
        10,
        json!({"execution": {"concurrency": 2, "chunk_size": 5}}),
    );
    let processor = world.processor("p1");
    let run = start_manual(&processor, &job).await;
    let mut execution = processor.open(&job, &run.id).await.unwrap().unwrap();
    // A step is dropped while its chunk is being recorded: its five items were called, and
    // the store still has them pending, behind where the execution's claims have got to.
    world.runs.hold_writes(true);
    {
        let step = execution.run_next_chunk();
        tokio::pin!(step);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while world.executor.calls().len() < 5 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the chunk never ran"
            );
            tokio::select! {
                stepped = &mut step => panic!("the step ended with its write held: {stepped:?}"),
                () = tokio::time::sleep(std::time::Duration::from_millis(1)) => {}
            }
        }
    }
    world.runs.hold_writes(false);
    assert_eq!(world.runs.outcome_writes(), 0);
    let status = execution.run_to_completion().await.unwrap();
    assert_eq!(status, RunStatus::Succeeded);
    let keys: Vec<String> = world
        .executor
        .calls()
        .into_iter()
        .map(|c| c.request.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 15, "{keys:?}");
    // The next step starts from the beginning of the run: the interrupted chunk comes first.
    let mut first_five = keys[..5].to_vec();
    let mut again = keys[5..10].to_vec();
    first_five.sort();
    again.sort();
    assert_eq!(again, first_five, "{keys:?}");
    let items = world.runs.items_of(&run.id);
    assert!(items.iter().all(|i| i.status == ItemStatus::Succeeded));
}

#[tokio::test]
async fn a_resumed_run_never_executes_a_succeeded_item_again() {
    let world = World::new(Behaviour::default());
    world.with_users(40);
    let job = many(
        40,
        json!({"execution": {"concurrency": 4, "chunk_size": 5}}),
    );
    let first = world.processor("first");
    let run = start_manual(&first, &job).await;
    {
        let mut execution = first.open(&job, &run.id).await.unwrap().unwrap();
        for _ in 0..3 {
            assert!(matches!(
                execution.run_next_chunk().await.unwrap(),
                Step::Worked(5)
            ));
        }
        // The process dies here, holding the run's lease.
    }
    // Another processor cannot take the run over while the lease lives...
    let second = world.processor("second");
    assert!(second.open(&job, &run.id).await.unwrap().is_none());
    // ...and does once it has expired, then finishes the run.
    world.clock.advance(Duration::minutes(10));
    let mut execution = second.open(&job, &run.id).await.unwrap().unwrap();
    assert_eq!(
        execution.run_to_completion().await.unwrap(),
        RunStatus::Succeeded
    );
    let items = world.runs.items_of(&run.id);
    assert!(items.iter().all(|i| i.status == ItemStatus::Succeeded));
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for call in world.executor.calls() {
        *per_key.entry(call.request.idempotency_key).or_default() += 1;
    }
    assert_eq!(per_key.len(), 40);
    assert!(
        per_key.values().all(|n| *n == 1),
        "an item ran twice: {per_key:?}"
    );
}

#[tokio::test]
async fn ten_thousand_items_with_thirty_percent_retryable_failures_all_succeed() {
    let world = World::new(Behaviour {
        retryable_percent: 30,
        ..Behaviour::default()
    });
    world.with_users(10_000);
    let job = many(
        10_000,
        json!({
            "execution": {"concurrency": 64, "chunk_size": 500},
            "retry": {"max_attempts": 12, "initial_backoff_ms": 100, "max_backoff_ms": 2000}
        }),
    );
    let (run, context) = run_job(&world, &job).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(
        (
            context.progress.succeeded,
            context.progress.failed,
            context.progress.total
        ),
        (10_000, 0, 10_000)
    );
    let calls = world.executor.calls();
    let retried = calls.iter().filter(|c| c.attempt > 1).count();
    // About 0.3 / 0.7 ≈ 43 % extra calls.
    assert!((3_500..5_200).contains(&retried), "{retried} retries");
    let items = world.runs.items_of(&run.id);
    assert!(
        items
            .iter()
            .all(|i| i.attempts <= 12 && i.status == ItemStatus::Succeeded)
    );
    // Every attempt of an item carried the same idempotency key.
    let keys: HashSet<&str> = calls
        .iter()
        .map(|c| c.request.idempotency_key.as_str())
        .collect();
    assert_eq!(keys.len(), 10_000);
}

#[tokio::test]
async fn permanent_failures_fail_at_once_and_a_panic_fails_only_its_item() {
    let poison: HashSet<String> = ["u0003", "u0007"].into_iter().map(str::to_owned).collect();
    let panics: HashSet<String> = ["u0005".to_owned()].into_iter().collect();
    let world = World::new(Behaviour {
        permanent: poison,
        panics,
        ..Behaviour::default()
    });
    world.with_users(10);
    let (run, context) = run_job(&world, &many(10, json!({}))).await;
    assert_eq!(run.status, RunStatus::CompletedWithFailures);
    assert_eq!(
        (
            context.progress.succeeded,
            context.progress.failed,
            context.progress.processed
        ),
        (7, 3, 10)
    );
    let items = world.runs.items_of(&run.id);
    let failed: Vec<(&str, u32)> = items
        .iter()
        .filter(|i| i.status == ItemStatus::Failed)
        .map(|i| (i.key.as_str(), i.attempts))
        .collect();
    assert_eq!(failed, [("u0003", 1), ("u0005", 1), ("u0007", 1)]);
    let panicked = items.iter().find(|i| i.key == "u0005").unwrap();
    assert!(panicked.last_error.as_deref().unwrap().contains("panicked"));
}

#[tokio::test]
async fn a_cancelled_run_stops_claiming_and_ends_with_exact_counts() {
    let world = World::new(Behaviour::default());
    world.with_users(20);
    let job = many(
        20,
        json!({"execution": {"concurrency": 2, "chunk_size": 5}}),
    );
    let processor = world.processor("p1");
    let run = start_manual(&processor, &job).await;
    let mut progress = processor.subscribe(&run.id);
    let mut execution = processor.open(&job, &run.id).await.unwrap().unwrap();
    assert_eq!(execution.run_next_chunk().await.unwrap(), Step::Worked(5));
    assert_eq!(
        progress
            .borrow_and_update()
            .as_ref()
            .unwrap()
            .progress
            .processed,
        5
    );
    processor.cancel(&run.id);
    assert_eq!(
        execution.run_next_chunk().await.unwrap(),
        Step::Finished(RunStatus::Cancelled)
    );
    let counts = world.runs.counts(&run.id).await.unwrap();
    assert_eq!(
        (counts.succeeded, counts.cancelled, counts.pending),
        (5, 15, 0)
    );
    assert_eq!(world.executor.calls().len(), 5);
    let last = progress.borrow_and_update().clone().unwrap();
    assert_eq!(
        (last.status, last.progress.processed, last.progress.total),
        (RunStatus::Cancelled, 20, 20)
    );
}

#[tokio::test]
async fn a_request_stalled_past_the_cancel_grace_is_abandoned() {
    let stalls: HashSet<String> = ["u0001".to_owned()].into_iter().collect();
    let world = World::new(Behaviour {
        stalls,
        ..Behaviour::default()
    });
    world.with_users(3);
    let job = many(3, json!({"execution": {"concurrency": 3, "chunk_size": 3}}));
    let processor = world.processor("p1");
    let run = start_manual(&processor, &job).await;
    let mut execution = processor.open(&job, &run.id).await.unwrap().unwrap();
    let cancel = async {
        // Wait (without sleeping) until every request of the chunk has started.
        for _ in 0..10_000 {
            if world.executor.calls().len() == 3 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(world.executor.calls().len(), 3);
        processor.cancel(&run.id);
    };
    let (step, ()) = tokio::join!(execution.run_next_chunk(), cancel);
    assert_eq!(step.unwrap(), Step::Worked(3));
    assert_eq!(
        execution.run_next_chunk().await.unwrap(),
        Step::Finished(RunStatus::Cancelled)
    );
    let items = world.runs.items_of(&run.id);
    let statuses: Vec<(&str, ItemStatus)> =
        items.iter().map(|i| (i.key.as_str(), i.status)).collect();
    assert_eq!(
        statuses,
        [
            ("u0000", ItemStatus::Succeeded),
            ("u0001", ItemStatus::Cancelled),
            ("u0002", ItemStatus::Succeeded)
        ]
    );
    assert!(
        items[1]
            .last_error
            .as_deref()
            .unwrap()
            .contains("abandoned")
    );
}

#[tokio::test]
async fn progress_is_published_after_every_chunk_and_only_grows() {
    let world = World::new(Behaviour {
        retryable_percent: 20,
        ..Behaviour::default()
    });
    world.with_users(30);
    let job = many(
        30,
        json!({"execution": {"concurrency": 3, "chunk_size": 4}}),
    );
    let processor = world.processor("p1");
    let run = start_manual(&processor, &job).await;
    let mut progress = processor.subscribe(&run.id);
    let mut execution = processor.open(&job, &run.id).await.unwrap().unwrap();
    let mut seen = Vec::new();
    loop {
        let step = execution.run_next_chunk().await.unwrap();
        if let Some(event) = progress.borrow_and_update().clone() {
            seen.push(event.progress.processed);
        }
        match step {
            Step::Finished(status) => {
                assert_eq!(status, RunStatus::Succeeded);
                break;
            }
            Step::Idle(until) => world.clock.advance(until - world.clock_now()),
            Step::Worked(_) => {}
        }
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&30));
}

impl World {
    fn clock_now(&self) -> DateTime<Utc> {
        batch_ports::Clock::now(&*self.clock)
    }
}

#[tokio::test]
async fn a_scope_restricts_the_run_to_its_users() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let job = job(json!({}));
    let scope = Scope {
        users: Some([UserId::parse("u0001").unwrap()].into_iter().collect()),
        ..Scope::default()
    };
    let processor = world.processor("p1");
    let run = processor
        .start(&job, Trigger::Scheduled, Some(t0()), &scope, None)
        .await
        .unwrap();
    let keys: Vec<String> = world
        .runs
        .items_of(&run.id)
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(keys, ["u0001"]);
}

fn settings(owner: &str) -> ProcessorSettings {
    ProcessorSettings {
        owner: owner.to_owned(),
        seed: Some(7),
        ..ProcessorSettings::default()
    }
}

impl World {
    fn processor_with(&self, settings: ProcessorSettings) -> Arc<BatchProcessor> {
        Arc::new(BatchProcessor::new(
            self.ports.clone(),
            Strategies::default(),
            settings,
        ))
    }
}

/// A one-item job of `tenant` whose runs may overlap.
fn small(id: &str, tenant: &str, priority: &str) -> Job {
    job(json!({
        "id": id, "tenant": tenant, "priority": priority, "overlap": "allow_all",
        "source": {"users": {"ids": ["u0000"]}},
    }))
}

fn jobs_map(jobs: &[&Job]) -> std::collections::HashMap<batch_domain::JobId, Job> {
    jobs.iter().map(|j| (j.id.clone(), (*j).clone())).collect()
}

/// Under constant overload by high-priority runs (two new a minute, one slot), a low-priority
/// run waits until aging lifts it to the oldest waiting high run: about twice the priority gap
/// in minutes. Without aging it would wait forever.
async fn minutes_until_low_runs(aging: batch_domain::priority::Aging, horizon: i64) -> Option<i64> {
    let world = World::new(Behaviour::default());
    world.with_users(1);
    let high = small("high", "acme", "high");
    let low = small("low", "acme", "low");
    let jobs = jobs_map(&[&high, &low]);
    let processor = world.processor_with(ProcessorSettings {
        aging,
        max_running_runs: Some(1),
        ..settings("p1")
    });
    let low_run = start_manual(&processor, &low).await;
    for minute in 0..horizon {
        start_manual(&processor, &high).await;
        start_manual(&processor, &high).await;
        let mut execution = processor.claim_next(&jobs).await.unwrap().unwrap();
        let claimed = execution.run().id.clone();
        execution.run_to_completion().await.unwrap();
        if claimed == low_run.id {
            return Some(minute);
        }
        world.clock.advance(Duration::minutes(1));
    }
    None
}

#[tokio::test]
async fn aging_lets_a_low_run_through_constant_high_priority_load_within_a_bound() {
    let gap = i64::from(batch_domain::Priority::HIGH.value() - batch_domain::Priority::LOW.value());
    let waited = minutes_until_low_runs(batch_domain::priority::Aging::default(), 300)
        .await
        .expect("the low run ran");
    assert!(
        waited <= 2 * gap + 10,
        "the low run waited {waited} minutes; the bound is about {}",
        2 * gap
    );
    let no_aging = batch_domain::priority::Aging {
        cap: 0,
        ..batch_domain::priority::Aging::default()
    };
    assert_eq!(
        minutes_until_low_runs(no_aging, 300).await,
        None,
        "without aging the low run starves"
    );
}

#[tokio::test]
async fn two_tenants_with_ten_to_one_due_work_both_progress() {
    let world = World::new(Behaviour::default());
    world.with_users(1);
    world.users.insert("globex", ["u0000"]);
    let big = small("big", "acme", "normal");
    let little = small("little", "globex", "normal");
    let jobs = jobs_map(&[&big, &little]);
    let processor = world.processor_with(ProcessorSettings {
        max_running_runs: Some(1),
        ..settings("p1")
    });
    // acme's hundred runs are all older than globex's ten.
    for _ in 0..100 {
        start_manual(&processor, &big).await;
    }
    world.clock.advance(Duration::seconds(1));
    for _ in 0..10 {
        start_manual(&processor, &little).await;
    }
    let mut order = String::new();
    while let Some(mut execution) = processor.claim_next(&jobs).await.unwrap() {
        order.push(if execution.run().tenant.as_str() == "acme" {
            'a'
        } else {
            'g'
        });
        execution.run_to_completion().await.unwrap();
        world.clock.advance(Duration::seconds(1));
    }
    assert_eq!(order.len(), 110);
    assert_eq!(
        &order[..20],
        "agagagagagagagagagag",
        "the tenants take turns"
    );
    assert!(order[20..].chars().all(|t| t == 'a'));
}

#[tokio::test]
async fn the_global_limit_caps_concurrent_runs_and_unknown_jobs_are_left_alone() {
    let world = World::new(Behaviour::default());
    world.with_users(1);
    let a = small("a", "acme", "normal");
    let gone = small("gone", "acme", "critical");
    let processor = world.processor_with(ProcessorSettings {
        max_running_runs: Some(2),
        ..settings("p1")
    });
    // More runs of a removed job than the claim window holds per tenant: they must not keep
    // the tenant's other runs from being claimed.
    for _ in 0..20 {
        start_manual(&processor, &gone).await;
    }
    for _ in 0..3 {
        start_manual(&processor, &a).await;
    }
    let jobs = jobs_map(&[&a]);
    let first = processor.claim_next(&jobs).await.unwrap().unwrap();
    let second = processor.claim_next(&jobs).await.unwrap().unwrap();
    assert_eq!(
        first.run().job.as_str(),
        "a",
        "the critical run of an unknown job is skipped"
    );
    assert!(
        processor.claim_next(&jobs).await.unwrap().is_none(),
        "two runs are running: the limit"
    );
    let other = world.processor_with(ProcessorSettings {
        max_running_runs: Some(2),
        ..settings("p2")
    });
    assert!(
        other.claim_next(&jobs).await.unwrap().is_none(),
        "the limit holds for every processor on the store"
    );
    let mut first = first;
    first.run_to_completion().await.unwrap();
    assert!(other.claim_next(&jobs).await.unwrap().is_some());
    drop(second);
}

#[tokio::test]
async fn a_run_whose_owner_keeps_renewing_is_never_rescued_however_long_it_runs() {
    let delays = [("u0000".to_owned(), std::time::Duration::from_secs(3_600))]
        .into_iter()
        .collect();
    let world = World::new(Behaviour {
        delays,
        ..Behaviour::default()
    });
    world.with_users(1);
    let job = small("slow", "acme", "normal");
    let jobs = jobs_map(&[&job]);
    let owner = world.processor_with(settings("p1"));
    let rescuer = world.processor_with(settings("p2"));
    let run = start_manual(&owner, &job).await;
    let mut execution = owner.claim_next(&jobs).await.unwrap().unwrap();
    let started = world.clock.now();
    let rescue_attempts = async {
        let mut attempts = 0;
        // Try to take the run over every 45 s of the hour the request takes (the lease is 60 s).
        while world.clock.now() < started + Duration::minutes(59) {
            world.clock.sleep(std::time::Duration::from_secs(45)).await;
            assert!(
                rescuer.claim_next(&jobs).await.unwrap().is_none(),
                "a healthy run was rescued after {}",
                world.clock.now() - started
            );
            attempts += 1;
        }
        attempts
    };
    let (status, attempts) = tokio::join!(execution.run_to_completion(), rescue_attempts);
    assert_eq!(status.unwrap(), RunStatus::Succeeded);
    assert!(attempts >= 70, "{attempts} rescue attempts");
    assert!(world.clock.now() - started >= Duration::hours(1));
    assert_eq!(world.executor.calls().len(), 1, "the item ran once");
    assert_eq!(
        world.runs.run(&job.tenant, &run.id).await.unwrap().status,
        RunStatus::Succeeded
    );
}

#[tokio::test]
async fn a_run_whose_owner_stops_renewing_is_rescued_after_its_lease_expires() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let job = job(json!({"overlap": "allow_all"}));
    let jobs = jobs_map(&[&job]);
    let owner = world.processor_with(settings("p1"));
    let rescuer = world.processor_with(settings("p2"));
    start_manual(&owner, &job).await;
    // The owner claims the run and then goes silent (a crash, a partition).
    let silent = owner.claim_next(&jobs).await.unwrap().unwrap();
    world.clock.advance(Duration::seconds(59));
    assert!(rescuer.claim_next(&jobs).await.unwrap().is_none());
    world.clock.advance(Duration::seconds(2));
    let mut rescued = rescuer.claim_next(&jobs).await.unwrap().unwrap();
    assert_eq!(rescued.run().id, silent.run().id);
    assert_eq!(
        rescued.run_to_completion().await.unwrap(),
        RunStatus::Succeeded
    );
}

#[tokio::test]
async fn a_run_created_while_the_slots_are_idle_starts_at_once_not_at_their_next_look() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let job = job(json!({"overlap": "allow_all"}));
    let jobs = Arc::new(batch_app::catalog::JobCatalog::new(std::slice::from_ref(
        &job,
    )));
    let processor = world.processor_with(settings("p1"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // The slot finds nothing and waits an hour on the clock before it looks again.
    let worker = tokio::spawn(processor.clone().work_until_stopped(
        jobs,
        1,
        std::time::Duration::from_secs(3_600),
        stopped,
    ));
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let run = start_manual(&processor, &job).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let record = loop {
        let record = world.runs.run(&job.tenant, &run.id).await.unwrap();
        if record.status.is_terminal() {
            break record;
        }
        assert!(std::time::Instant::now() < deadline, "the run never ended");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert_eq!(record.status, RunStatus::Succeeded);
    // Claimed at the clock's time of its creation: the slot did not sleep its hour out.
    assert_eq!(record.started_at, Some(run.created_at));
    stop.send(true).unwrap();
    worker.await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_chunk_and_releases_the_lease_at_once() {
    let world = World::new(Behaviour::default());
    world.with_users(6);
    let job = many(
        6,
        json!({"overlap": "allow_all", "execution": {"concurrency": 1, "chunk_size": 2}}),
    );
    let jobs = Arc::new(batch_app::catalog::JobCatalog::new(std::slice::from_ref(
        &job,
    )));
    let owner = world.processor_with(settings("p1"));
    let run = start_manual(&owner, &job).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut progress = owner.subscribe(&run.id);
    let worker = tokio::spawn(owner.clone().work_until_stopped(
        jobs.clone(),
        2,
        std::time::Duration::from_secs(1),
        stopped,
    ));
    // Stop as soon as the first chunk is recorded.
    progress.changed().await.unwrap();
    stop.send(true).unwrap();
    worker.await.unwrap();
    let done = world
        .runs
        .items_of(&run.id)
        .iter()
        .filter(|i| i.status == ItemStatus::Succeeded)
        .count();
    assert!(done >= 2 && done % 2 == 0, "whole chunks only: {done}");
    let record = world.runs.run(&job.tenant, &run.id).await.unwrap();
    assert_eq!(record.status, RunStatus::Running);
    assert!(record.lease.is_none(), "the lease was released");
    // Another replica resumes at once, without waiting for a lease to expire.
    let rescuer = world.processor_with(settings("p2"));
    let mut resumed = rescuer.claim_next(&jobs.jobs()).await.unwrap().unwrap();
    assert_eq!(
        resumed.run_to_completion().await.unwrap(),
        RunStatus::Succeeded
    );
    assert_eq!(world.executor.calls().len(), 6, "no item ran twice");
}

#[tokio::test]
async fn failed_items_are_retried_in_a_child_run_that_merges_into_the_original() {
    let permanent: HashSet<String> = ["u0001".to_owned(), "u0002".to_owned()]
        .into_iter()
        .collect();
    let world = World::new(Behaviour {
        permanent,
        ..Behaviour::default()
    });
    world.with_users(3);
    // Runs of this job may overlap: the queued run below must not hold the retry back.
    let job = job(json!({"overlap": "allow_all"}));
    let processor = world.processor("p1");
    let (first, _) = run_job(&world, &job).await;
    assert_eq!(first.status, RunStatus::CompletedWithFailures);
    let unfinished = start_manual(&processor, &job).await;
    assert!(matches!(
        processor.retry_failed(&job, &unfinished).await,
        Err(batch_app::Error::Job(_))
    ));
    // The downstream is fixed; the failed items run again, alone.
    world.executor.set_behaviour(Behaviour::default());
    let retry = processor.retry_failed(&job, &first).await.unwrap();
    assert_eq!(retry.trigger, Trigger::Retry);
    assert_eq!(retry.parent.as_ref(), Some(&first.id));
    let keys: Vec<String> = world
        .runs
        .items_of(&retry.id)
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(keys, ["u0001", "u0002"]);
    let mut execution = processor.open(&job, &retry.id).await.unwrap().unwrap();
    assert_eq!(
        execution.run_to_completion().await.unwrap(),
        RunStatus::Succeeded
    );
    let parent = world.runs.context(&job.tenant, &first.id).await.unwrap();
    assert_eq!(
        parent.children.len(),
        1,
        "the retry merged into the original"
    );
    let succeeded = processor
        .retry_failed(&job, &world.runs.run(&job.tenant, &retry.id).await.unwrap())
        .await;
    assert!(matches!(succeeded, Err(batch_app::Error::Job(m)) if m.contains("no failed items")));
}

#[tokio::test]
async fn a_request_not_made_because_the_breaker_is_open_costs_no_attempt() {
    // Far more "not attempted" answers than the job's five attempts.
    let deferred = [("u0001".to_owned(), 12)].into_iter().collect();
    let world = World::new(Behaviour {
        deferred,
        ..Behaviour::default()
    });
    world.with_users(3);
    let job = job(json!({}));
    let (run, _) = run_job(&world, &job).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    let item = world
        .runs
        .items_of(&run.id)
        .into_iter()
        .find(|i| i.key == "u0001")
        .unwrap();
    assert_eq!(item.status, ItemStatus::Succeeded);
    assert_eq!(item.attempts, 1, "only the call that was made counts");
}

/// F2's regression: a chunk executed while the database went away is recorded once it is back
/// (nothing executed twice), and a run whose claim of items failed goes on with the same
/// processor instead of waiting for its lease to expire and be rescued.
#[tokio::test]
async fn a_database_that_goes_away_mid_chunk_loses_no_result_and_no_run() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let job = job(json!({}));
    let processor = world.processor("p1");
    let run = start_manual(&processor, &job).await;
    let mut execution = processor.open(&job, &run.id).await.unwrap().unwrap();
    world.runs.fail_next_writes(3);
    world.runs.fail_next_claims(2);
    let (_, stop) = tokio::sync::watch::channel(false);
    let status = execution.run_until_stopped(stop).await.unwrap();
    assert_eq!(status, Some(RunStatus::Succeeded));
    let calls = world.executor.calls();
    assert_eq!(calls.len(), 3, "each item executed once: {calls:?}");
    assert!(
        world.runs.outcome_writes() > 3,
        "the failed writes were retried"
    );
    let items = world.runs.items_of(&run.id);
    assert!(
        items
            .iter()
            .filter(|i| i.status != ItemStatus::Invalid)
            .all(|i| i.status == ItemStatus::Succeeded && i.result.is_some()),
        "{items:?}"
    );
}

#[tokio::test]
async fn a_lapsed_lease_under_a_live_execution_is_not_claimed_again_by_its_own_processor() {
    let world = World::new(Behaviour::default());
    world.with_users(3);
    let job = job(json!({}));
    let jobs = jobs_map(&[&job]);
    let processor = world.processor("p1");
    let run = start_manual(&processor, &job).await;
    let execution = processor.claim_next(&jobs).await.unwrap().unwrap();
    // Its heartbeat was late: the run's lease lapsed while the execution goes on.
    world.runs.expire_leases();
    assert!(
        processor.claim_next(&jobs).await.unwrap().is_none(),
        "a second slot of the same processor took the run over"
    );
    assert!(processor.open(&job, &run.id).await.unwrap().is_none());
    // Once the execution is gone, its processor resumes the run like any other.
    drop(execution);
    let resumed = processor.claim_next(&jobs).await.unwrap().unwrap();
    assert_eq!(resumed.run().id, run.id);
    // And another processor rescues a lapsed run as before.
    world.runs.expire_leases();
    let other = world.processor("p2");
    assert!(other.claim_next(&jobs).await.unwrap().is_some());
}
