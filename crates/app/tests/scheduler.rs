//! The BatchScheduler with a simulated clock over in-memory fakes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use batch_app::Ports;
use batch_app::processor::{BatchProcessor, ProcessorSettings};
use batch_app::scheduler::{BatchScheduler, FireFilter};
use batch_app::strategy::Strategies;
use batch_domain::config::{Job, parse_job};
use batch_domain::run::Trigger;
use batch_domain::{JobId, TenantId};
use batch_ports::runs::{Occurrence, RunStore};
use batch_testkit::ManualClock;
use batch_testkit::fakes::{
    Behaviour, FakeCategories, FakeExecutor, FakePreferences, FakeTemplates, FakeUsers, MemoryRuns,
};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

/// A job whose runs may overlap: these tests look at timing, and nothing executes the runs.
fn job(id: &str, schedule: Value, misfire: Value) -> Job {
    parse_job(json!({
        "id": id, "tenant": "acme", "type": "BATCH_USERS", "template": "digest",
        "source": {"users": {"ids": ["u1"]}},
        "schedule": schedule, "misfire": misfire, "overlap": "allow_all",
    }))
    .unwrap_or_else(|p| panic!("{p}"))
}

struct World {
    runs: Arc<MemoryRuns>,
    processor: Arc<BatchProcessor>,
}

fn world(start: DateTime<Utc>) -> World {
    let runs = Arc::new(MemoryRuns::default());
    let users = Arc::new(FakeUsers::default());
    users.insert("acme", ["u1"]);
    let clock = Arc::new(ManualClock::new(start));
    let templates = Arc::new(FakeTemplates::default());
    templates.insert("digest", "x");
    let ports = Ports {
        runs: runs.clone(),
        contexts: runs.clone(),
        users,
        categories: Arc::new(FakeCategories::default()),
        preferences: Arc::new(FakePreferences::default()),
        templates,
        executor: Arc::new(FakeExecutor::new(Behaviour::default(), clock.clone())),
        clock,
    };
    let processor = Arc::new(BatchProcessor::new(
        ports,
        Strategies::default(),
        ProcessorSettings::default(),
    ));
    World { runs, processor }
}

impl World {
    fn scheduler(&self, jobs: &[Job]) -> BatchScheduler {
        BatchScheduler::new(self.processor.clone(), self.runs.clone(), jobs)
    }
}

#[tokio::test]
async fn a_week_of_ticks_across_a_dst_change_fires_exactly_the_domain_instants() {
    // Berlin springs forward on 2027-03-28: 02:00 → 03:00.
    let start = utc("2027-03-25T00:00:00Z");
    let end = utc("2027-04-01T00:00:00Z");
    let jobs = vec![
        job(
            "hourly",
            json!({"frequency": "hourly", "minute": 30, "timezone": "Europe/Berlin"}),
            json!({"policy": "skip"}),
        ),
        job(
            "nightly",
            json!({"frequency": "daily", "at": "02:30", "timezone": "Europe/Berlin"}),
            json!({"policy": "skip"}),
        ),
        job(
            "weekly",
            json!({"frequency": "weekly", "on": "sunday", "at": "02:15", "timezone": "Europe/Berlin"}),
            json!({"policy": "skip"}),
        ),
        job(
            "quarter",
            json!({"cron": "0 */15 * * * *", "timezone": "America/New_York"}),
            json!({"policy": "skip"}),
        ),
    ];
    let world = world(start);
    let scheduler = world.scheduler(&jobs);
    let mut fired = Vec::new();
    let mut now = start;
    while now < end {
        let report = scheduler.tick(now).await.unwrap();
        assert_eq!(report.dropped, 0);
        fired.extend(
            report
                .fired
                .into_iter()
                .map(|f| (f.job.to_string(), f.nominal)),
        );
        now += Duration::minutes(1);
    }
    let mut expected = Vec::new();
    for job in &jobs {
        let schedule = job.schedule.as_ref().unwrap();
        for nominal in schedule
            .nominals_after(start - Duration::milliseconds(1))
            .take_while(|n| *n < end)
        {
            expected.push((job.id.to_string(), nominal));
        }
    }
    fired.sort();
    expected.sort();
    assert_eq!(fired, expected);
    // The nightly job fired at 03:00 local (01:00Z) on the day 02:30 did not exist.
    assert!(fired.contains(&("nightly".to_owned(), utc("2027-03-28T01:00:00Z"))));
    // Berlin's whole-hour shift skips local 02:30 once, yet every UTC hour keeps its fire.
    assert_eq!(fired.iter().filter(|(j, _)| j == "hourly").count(), 7 * 24);
    let berlin: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    let on_dst_day: Vec<String> = fired
        .iter()
        .filter(|(j, _)| j == "hourly")
        .map(|(_, t)| t.with_timezone(&berlin))
        .filter(|t| t.date_naive() == chrono::NaiveDate::from_ymd_opt(2027, 3, 28).unwrap())
        .map(|t| t.format("%H:%M").to_string())
        .collect();
    assert_eq!(
        on_dst_day.len(),
        23,
        "the local day has 23 hours: {on_dst_day:?}"
    );
    assert!(!on_dst_day.contains(&"02:30".to_owned()));
}

#[tokio::test]
async fn after_downtime_each_misfire_policy_holds() {
    let start = utc("2027-01-01T09:30:00Z");
    let hourly = json!({"frequency": "hourly", "minute": 0});
    let jobs = vec![
        job("skip", hourly.clone(), json!({"policy": "skip"})),
        job("once", hourly.clone(), json!({"policy": "fire_once"})),
        job(
            "catch",
            hourly,
            json!({"policy": "catch_up", "window_seconds": 7200}),
        ),
    ];
    let world = world(start);
    let scheduler = world.scheduler(&jobs);
    assert!(scheduler.tick(start).await.unwrap().fired.is_empty());
    // Down from 09:30 to 14:30: 10:00–14:00 were missed.
    let report = scheduler.tick(utc("2027-01-01T14:30:00Z")).await.unwrap();
    let of = |job: &str| -> Vec<String> {
        report
            .fired
            .iter()
            .filter(|f| f.job.as_str() == job)
            .map(|f| f.nominal.format("%H:%M").to_string())
            .collect()
    };
    assert_eq!(of("skip"), Vec::<String>::new());
    assert_eq!(of("once"), ["14:00"]);
    assert_eq!(of("catch"), ["13:00", "14:00"]);
    // Nothing is repeated afterwards, and the next fire is 15:00 for all.
    assert!(
        scheduler
            .tick(utc("2027-01-01T14:59:00Z"))
            .await
            .unwrap()
            .fired
            .is_empty()
    );
    let next = scheduler.tick(utc("2027-01-01T15:00:00Z")).await.unwrap();
    assert_eq!(next.fired.len(), 3);
}

#[tokio::test]
async fn a_restart_neither_loses_nor_repeats_a_tick() {
    let start = utc("2027-01-01T00:00:00Z");
    let jobs = vec![job(
        "every5",
        json!({"cron": "0 */5 * * * *"}),
        json!({"policy": "catch_up", "window_seconds": 3600}),
    )];
    let world = world(start);
    let mut fired = Vec::new();
    let mut now = start;
    // Three lives of the process, with downtime in between.
    for (life, until) in [(0, 37), (1, 80), (2, 121)] {
        let scheduler = world.scheduler(&jobs);
        while now <= start + Duration::minutes(until) {
            fired.extend(
                scheduler
                    .tick(now)
                    .await
                    .unwrap()
                    .fired
                    .into_iter()
                    .map(|f| f.nominal),
            );
            now += Duration::minutes(if life == 1 { 7 } else { 1 });
        }
        now += Duration::minutes(9);
    }
    let unique: BTreeSet<_> = fired.iter().collect();
    assert_eq!(unique.len(), fired.len(), "a fire was repeated");
    let expected: Vec<_> = (0..=24).map(|k| start + Duration::minutes(5 * k)).collect();
    assert_eq!(
        fired, expected,
        "every 5 minutes from 00:00 to 02:00, none lost"
    );
}

#[tokio::test]
async fn an_occurrence_left_without_its_run_by_a_crash_gets_one_run() {
    let start = utc("2027-01-01T10:00:00Z");
    let jobs = vec![job(
        "daily",
        json!({"frequency": "daily", "at": "10:00"}),
        json!({"policy": "fire_once"}),
    )];
    let world = world(start - Duration::hours(1));
    let scheduler = world.scheduler(&jobs);
    scheduler.tick(start - Duration::hours(1)).await.unwrap();
    // Another replica created the occurrence, then died before creating its run.
    let id = JobId::parse("daily").unwrap();
    let acme = TenantId::parse("acme").unwrap();
    let Occurrence::Created(occurrence) = world
        .runs
        .create_occurrence(&id, &acme, start, "")
        .await
        .unwrap()
    else {
        panic!("the occurrence was new")
    };
    let report = scheduler.tick(start).await.unwrap();
    assert_eq!(report.fired.len(), 1);
    assert!(report.fired[0].run.is_some());
    assert!(
        world
            .runs
            .run_for_occurrence(occurrence)
            .await
            .unwrap()
            .is_some()
    );
    // A second scheduler (another replica) ticking the same instant creates nothing more.
    let other = world.scheduler(&jobs);
    let again = other.tick(start).await.unwrap();
    assert!(again.fired.iter().all(|f| f.run.is_none()));
}

#[tokio::test]
async fn next_fires_are_listed_soonest_first() {
    let start = utc("2027-01-01T10:00:00Z");
    let jobs = vec![
        job(
            "late",
            json!({"frequency": "daily", "at": "18:00"}),
            json!({}),
        ),
        job(
            "soon",
            json!({"frequency": "daily", "at": "11:00"}),
            json!({}),
        ),
    ];
    let world = world(start);
    let next = world
        .scheduler(&jobs)
        .next_fires(start, &FireFilter::default())
        .await
        .unwrap();
    let order: Vec<&str> = next.iter().map(|n| n.job.as_str()).collect();
    assert_eq!(order, ["soon", "late"]);
    assert_eq!(next[0].nominal, utc("2027-01-01T11:00:00Z"));
}

#[tokio::test]
async fn scheduled_runs_are_claimed_and_run_by_priority() {
    let start = utc("2027-01-01T10:00:00Z");
    let mut low = job(
        "low",
        json!({"frequency": "daily", "at": "10:00"}),
        json!({}),
    );
    low.priority = batch_domain::Priority::LOW;
    let mut high = job(
        "high",
        json!({"frequency": "daily", "at": "10:00"}),
        json!({}),
    );
    high.priority = batch_domain::Priority::HIGH;
    let jobs = vec![low, high];
    let world = world(start);
    let report = world.scheduler(&jobs).tick(start).await.unwrap();
    assert_eq!(report.fired.len(), 2);
    let by_id: std::collections::HashMap<_, _> =
        jobs.iter().map(|j| (j.id.clone(), j.clone())).collect();
    let first = world.processor.claim_next(&by_id).await.unwrap().unwrap();
    assert_eq!(first.run().job.as_str(), "high");
    drop(first);
    // The claimed run is resumed after its lease expires; the rest run now.
    assert_eq!(world.processor.drain(&by_id).await.unwrap(), 1);
    let acme = TenantId::parse("acme").unwrap();
    for fired in &report.fired {
        let run = world
            .runs
            .run(&acme, fired.run.as_ref().unwrap())
            .await
            .unwrap();
        let expected = if fired.job.as_str() == "low" {
            batch_domain::run::RunStatus::Succeeded
        } else {
            batch_domain::run::RunStatus::Running
        };
        assert_eq!(run.status, expected, "{}", fired.job);
        assert_eq!(run.scheduled_for, Some(start));
    }
}

/// Ticks `job` at 10:00 and 11:00 (one run each time it may), returning the scheduler.
async fn two_fires(
    world: &World,
    job: &Job,
) -> (BatchScheduler, Vec<Option<batch_domain::run::RunId>>) {
    let scheduler = world.scheduler(std::slice::from_ref(job));
    let mut runs = Vec::new();
    for at in ["2027-01-01T10:00:00Z", "2027-01-01T11:00:00Z"] {
        let report = scheduler.tick(utc(at)).await.unwrap();
        runs.extend(report.fired.into_iter().map(|f| f.run));
    }
    (scheduler, runs)
}

fn overlap_job(policy: &str) -> Job {
    parse_job(json!({
        "id": format!("overlap-{policy}"), "tenant": "acme", "type": "BATCH_USERS", "template": "digest",
        "source": {"users": {"ids": ["u1"]}},
        "schedule": {"frequency": "hourly", "minute": 0}, "overlap": policy,
    }))
    .unwrap()
}

fn by_id(job: &Job) -> std::collections::HashMap<JobId, Job> {
    [(job.id.clone(), job.clone())].into_iter().collect()
}

#[tokio::test]
async fn overlap_skip_and_allow_all() {
    let start = utc("2027-01-01T09:59:00Z");
    let world = world(start);
    // The 10:00 run is still unfinished (no processor has run it) at 11:00.
    let skip = overlap_job("skip");
    let (_, runs) = two_fires(&world, &skip).await;
    assert_eq!(runs.len(), 1, "skip drops the 11:00 fire");
    let world = self::world(start);
    let allow = overlap_job("allow_all");
    let (_, runs) = two_fires(&world, &allow).await;
    assert_eq!(runs.len(), 2);
    // Both may run at once.
    let first = world.processor.claim_next(&by_id(&allow)).await.unwrap();
    let second = world.processor.claim_next(&by_id(&allow)).await.unwrap();
    assert!(first.is_some() && second.is_some());
}

#[tokio::test]
async fn overlap_buffers_wait_for_the_running_run() {
    let world = world(utc("2027-01-01T09:59:00Z"));
    let job = overlap_job("buffer_all");
    let (scheduler, runs) = two_fires(&world, &job).await;
    assert_eq!(runs.len(), 2);
    let jobs = by_id(&job);
    let mut first = world.processor.claim_next(&jobs).await.unwrap().unwrap();
    assert_eq!(Some(first.run().id.clone()), runs[0]);
    assert!(
        world.processor.claim_next(&jobs).await.unwrap().is_none(),
        "the second waits its turn"
    );
    first.run_to_completion().await.unwrap();
    let second = world.processor.claim_next(&jobs).await.unwrap().unwrap();
    assert_eq!(Some(second.run().id.clone()), runs[1]);
    drop(second);
    drop(scheduler);

    // buffer_one keeps one waiting run: with one running and one queued, a third fire drops.
    let job = overlap_job("buffer_one");
    let jobs = by_id(&job);
    let scheduler = world.scheduler(std::slice::from_ref(&job));
    let fired = |report: batch_app::scheduler::TickReport| report.fired.len();
    assert_eq!(
        fired(scheduler.tick(utc("2027-01-01T10:00:00Z")).await.unwrap()),
        1
    );
    assert_eq!(
        fired(scheduler.tick(utc("2027-01-01T11:00:00Z")).await.unwrap()),
        0,
        "10:00 still waits"
    );
    let _running = world.processor.claim_next(&jobs).await.unwrap().unwrap();
    assert_eq!(
        fired(scheduler.tick(utc("2027-01-01T12:00:00Z")).await.unwrap()),
        1,
        "12:00 waits behind it"
    );
    let report = scheduler.tick(utc("2027-01-01T13:00:00Z")).await.unwrap();
    assert_eq!((report.fired.len(), report.dropped), (0, 1));
}

#[tokio::test]
async fn overlap_cancel_other_stops_the_running_run() {
    let world = world(utc("2027-01-01T09:59:00Z"));
    let job = overlap_job("cancel_other");
    let jobs = by_id(&job);
    let scheduler = world.scheduler(std::slice::from_ref(&job));
    scheduler.tick(utc("2027-01-01T10:00:00Z")).await.unwrap();
    let mut running = world.processor.claim_next(&jobs).await.unwrap().unwrap();
    let report = scheduler.tick(utc("2027-01-01T11:00:00Z")).await.unwrap();
    let newer = report.fired[0].run.clone().unwrap();
    assert!(
        world.processor.claim_next(&jobs).await.unwrap().is_none(),
        "the new run waits for the old to stop"
    );
    // The old run's owner sees the request at its next step and stops.
    assert_eq!(
        running.run_next_chunk().await.unwrap(),
        batch_app::processor::Step::Finished(batch_domain::run::RunStatus::Cancelled)
    );
    let next = world.processor.claim_next(&jobs).await.unwrap().unwrap();
    assert_eq!(next.run().id, newer);
}

#[tokio::test]
async fn cancel_other_never_cancels_the_run_of_its_own_fire() {
    let world = world(utc("2027-01-01T09:59:00Z"));
    let job = overlap_job("cancel_other");
    let scheduler = world.scheduler(std::slice::from_ref(&job));
    scheduler.tick(utc("2027-01-01T09:59:00Z")).await.unwrap();
    // Another replica created the 10:00 occurrence and its run, then died before moving the
    // schedule on.
    let nominal = utc("2027-01-01T10:00:00Z");
    let acme = TenantId::parse("acme").unwrap();
    let Occurrence::Created(occurrence) = world
        .runs
        .create_occurrence(&job.id, &acme, nominal, "")
        .await
        .unwrap()
    else {
        panic!("the occurrence was new")
    };
    let run = world
        .processor
        .start_occurrence(
            &job,
            Trigger::Scheduled,
            occurrence,
            nominal,
            "",
            &batch_app::strategy::Scope::default(),
        )
        .await
        .unwrap();
    let report = scheduler.tick(nominal).await.unwrap();
    assert_eq!(report.fired.len(), 1);
    assert_eq!(report.fired[0].run, None, "the run exists already");
    assert!(
        !world
            .runs
            .run(&acme, &run.id)
            .await
            .unwrap()
            .cancel_requested
    );
}
