//! Three schedulers on one PostgreSQL database, ticking the same schedules at once — static
//! schedules and the preference groups of a Dynamic job — create exactly one occurrence (and
//! one run) per (job, instant, group).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use batch_app::Ports;
use batch_app::processor::{BatchProcessor, ProcessorSettings};
use batch_app::scheduler::BatchScheduler;
use batch_app::strategy::Strategies;
use batch_clients::local::RenderingExecutor;
use batch_domain::config::{Job, parse_job};
use batch_domain::preference::{Frequency, Preference};
use batch_domain::{FeatureType, TenantId, TimeOfDay, UserId};
use batch_store::Store;
use batch_testkit::fakes::FakeTemplates;
use batch_testkit::{Backend, ManualClock, TestDatabase, Unavailable};
use chrono::{DateTime, Duration, Utc};
use sea_orm::ConnectionTrait;
use serde_json::json;

/// The Dynamic job: acme's users on their own schedules.
fn briefing() -> Job {
    parse_job(json!({
        "id": "briefing", "tenant": "acme", "type": "PREFERENCE_INDIVIDUAL_USERS",
        "template": "digest", "source": {"users": {"ids": ["u1", "u2", "u3", "u4"]}},
        "feature_type": "briefing", "overlap": "allow_all",
        "default_preferences": {"schedule": {"frequency": "daily", "at": "07:00"}},
    }))
    .unwrap()
}

/// u1 and u2 hourly at :05 (one group), u3 hourly at :20 in Berlin, u4 on the job's default
/// (daily 07:00 UTC).
fn preferences() -> Vec<Preference> {
    let preference = |user: &str, frequency, at: Option<&str>, zone: &str| Preference {
        tenant: TenantId::parse("acme").unwrap(),
        user: UserId::parse(user).unwrap(),
        feature_type: FeatureType::parse("briefing").unwrap(),
        frequency,
        time_of_day: at.map(|at| TimeOfDay::parse(at).unwrap()),
        time_zone: Some(zone.to_owned()),
        weekday: None,
        day_of_month: None,
        template_override: None,
        parameters: serde_json::Map::new(),
        enabled: true,
        version: 1,
    };
    vec![
        preference("u1", Some(Frequency::Hourly), Some("00:05"), "UTC"),
        preference("u2", Some(Frequency::Hourly), Some("00:05"), "UTC"),
        preference(
            "u3",
            Some(Frequency::Hourly),
            Some("00:20"),
            "Europe/Berlin",
        ),
        preference("u4", None, None, "UTC"),
    ]
}

fn jobs() -> Vec<Job> {
    (0..20)
        .map(|i| {
            let schedule = match i % 3 {
                0 => json!({"cron": "0 * * * * *"}),
                1 => json!({"cron": "0 */5 * * * *", "timezone": "Europe/Berlin"}),
                _ => json!({"frequency": "hourly", "minute": i, "jitter_seconds": 30}),
            };
            parse_job(json!({
                "id": format!("job-{i:02}"), "tenant": "acme", "type": "BATCH_USERS",
                "template": "digest", "source": {"users": {"ids": ["u1"]}},
                "schedule": schedule, "misfire": {"policy": "catch_up", "window_seconds": 600},
                "overlap": "allow_all"
            }))
            .unwrap()
        })
        .chain([briefing()])
        .collect()
}

async fn replica(url: &str, owner: &str, start: DateTime<Utc>, jobs: &[Job]) -> BatchScheduler {
    let store = Arc::new(Store::open(url, true).await.unwrap());
    let templates = Arc::new(FakeTemplates::default());
    templates.insert("digest", "x");
    let ports = Ports {
        runs: store.clone(),
        contexts: store.clone(),
        users: store.clone(),
        categories: store.clone(),
        preferences: store.clone(),
        executor: Arc::new(RenderingExecutor::new(templates.clone())),
        templates,
        clock: Arc::new(ManualClock::new(start)),
    };
    let settings = ProcessorSettings {
        owner: owner.to_owned(),
        ..ProcessorSettings::default()
    };
    let processor = Arc::new(BatchProcessor::new(ports, Strategies::default(), settings));
    BatchScheduler::new(processor, store, jobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_replicas_create_each_occurrence_once() {
    let db = match TestDatabase::create(Backend::Postgres).await {
        Ok(db) => db,
        Err(Unavailable::Skip(why)) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let start = DateTime::parse_from_rfc3339("2027-03-14T06:30:00Z")
        .unwrap()
        .to_utc();
    let end = start + Duration::minutes(90);
    let jobs = jobs();
    let setup = Store::open(&db.url, true).await.unwrap();
    setup
        .connection()
        .execute_unprepared(
            "INSERT INTO system_users (tenant, user_id, active) VALUES \
             ('acme', 'u1', TRUE), ('acme', 'u2', TRUE), ('acme', 'u3', TRUE), ('acme', 'u4', TRUE)",
        )
        .await
        .unwrap();
    setup.upsert_preferences(&preferences()).await.unwrap();
    let mut tasks = Vec::new();
    for owner in ["a", "b", "c"] {
        let scheduler = replica(&db.url, owner, start, &jobs).await;
        tasks.push(tokio::spawn(async move {
            let mut now = start;
            let mut fired = 0;
            while now <= end {
                fired += scheduler.tick(now).await.unwrap().fired.len();
                now += Duration::seconds(20);
            }
            fired
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let conn = setup.connection();
    let duplicates = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            "SELECT job_id, nominal_ms FROM occurrences GROUP BY job_id, nominal_ms, group_key HAVING COUNT(*) > 1",
        ))
        .await
        .unwrap();
    assert!(
        duplicates.is_empty(),
        "{} occurrences were created twice",
        duplicates.len()
    );
    let count = |sql: &'static str| async move {
        let row = conn
            .query_one_raw(sea_orm::Statement::from_string(
                conn.get_database_backend(),
                sql,
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "n").unwrap()
    };
    // Every instant whose fire time fell in [start, end], from the domain's own function.
    let static_fires: usize = jobs
        .iter()
        .filter_map(|job| job.schedule.as_ref().map(|s| (job, s)))
        .map(|(job, schedule)| {
            schedule
                .nominals_after(start - Duration::milliseconds(1))
                .take_while(|n| schedule.fire_at(job.id.as_str(), *n) <= end)
                .count()
        })
        .sum();
    // The preference groups: 07:05 (u1, u2), 06:20 is past, so 07:20 (u3), 07:00 (u4).
    let groups = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            "SELECT o.group_key, o.nominal_ms, COUNT(i.seq) AS users FROM occurrences o \
             JOIN runs r ON r.occurrence_id = o.id JOIN run_items i ON i.run_id = r.id \
             WHERE o.job_id = 'briefing' GROUP BY o.group_key, o.nominal_ms ORDER BY o.nominal_ms",
        ))
        .await
        .unwrap();
    let groups: Vec<(String, i64)> = groups
        .iter()
        .map(|row| {
            (
                row.try_get::<String>("", "group_key").unwrap(),
                row.try_get::<i64>("", "users").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("daily at 07:00 UTC".to_owned(), 1),
            ("hourly at :05 UTC".to_owned(), 2),
            ("hourly at :20 Europe/Berlin".to_owned(), 1),
        ]
    );
    let expected = static_fires + groups.len();
    assert!(
        expected > 500,
        "the schedules fire often enough to race: {expected}"
    );
    assert_eq!(
        count("SELECT COUNT(*) AS n FROM occurrences").await,
        i64::try_from(expected).unwrap(),
        "none missing, none extra"
    );
    assert_eq!(
        count("SELECT COUNT(*) AS n FROM runs").await,
        i64::try_from(expected).unwrap(),
        "one run per occurrence"
    );
    assert_eq!(
        count("SELECT COUNT(*) AS n FROM runs WHERE occurrence_id IS NULL").await,
        0
    );
}
