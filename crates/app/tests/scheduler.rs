//! The BatchScheduler with a simulated clock over in-memory fakes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use batch_app::Ports;
use batch_app::processor::{BatchProcessor, ProcessorSettings};
use batch_app::scheduler::{BatchScheduler, FireFilter};
use batch_app::strategy::{Scope, Strategies};
use batch_domain::config::{Job, parse_job};
use batch_domain::preference::{Frequency, Preference};
use batch_domain::run::Trigger;
use batch_domain::{FeatureType, JobId, TenantId, TimeOfDay, UserId};
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
    users: Arc<FakeUsers>,
    preferences: Arc<FakePreferences>,
    processor: Arc<BatchProcessor>,
}

fn world(start: DateTime<Utc>) -> World {
    let runs = Arc::new(MemoryRuns::default());
    let users = Arc::new(FakeUsers::default());
    users.insert("acme", ["u1"]);
    let clock = Arc::new(ManualClock::new(start));
    let templates = Arc::new(FakeTemplates::default());
    templates.insert("digest", "x");
    let preferences = Arc::new(FakePreferences::default());
    let ports = Ports {
        runs: runs.clone(),
        contexts: runs.clone(),
        users: users.clone(),
        categories: Arc::new(FakeCategories::default()),
        preferences: preferences.clone(),
        templates,
        executor: Arc::new(FakeExecutor::new(Behaviour::default(), clock.clone())),
        clock,
    };
    let processor = Arc::new(BatchProcessor::new(
        ports,
        Strategies::default(),
        ProcessorSettings::default(),
    ));
    World {
        runs,
        users,
        preferences,
        processor,
    }
}

impl World {
    fn scheduler(&self, jobs: &[Job]) -> BatchScheduler {
        BatchScheduler::new(self.processor.clone(), self.runs.clone(), jobs)
    }

    /// Whether occurrence `occurrence` has its run.
    async fn has_run(&self, occurrence: i64) -> bool {
        self.runs
            .run_for_occurrence(occurrence)
            .await
            .unwrap()
            .is_some()
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

/// A tick that comes a few seconds late (the one before was slow: a restart's catch-up, a slow
/// database) finds several fires of a fast schedule due, all of them on time: every policy
/// fires each once. `fire_once` used to fire only the last (fault scenario F8).
#[tokio::test]
async fn a_late_tick_loses_no_fire_that_is_still_on_time() {
    let start = utc("2027-01-01T10:00:00Z");
    let every_2s = json!({"cron": "*/2 * * * * *"});
    let jobs = vec![
        job("skip", every_2s.clone(), json!({"policy": "skip"})),
        job("once", every_2s.clone(), json!({"policy": "fire_once"})),
        job(
            "catch",
            every_2s,
            json!({"policy": "catch_up", "window_seconds": 60}),
        ),
    ];
    let world = world(start);
    let scheduler = world.scheduler(&jobs);
    assert_eq!(scheduler.tick(start).await.unwrap().fired.len(), 3);
    let late = scheduler.tick(start + Duration::seconds(5)).await.unwrap();
    assert_eq!(late.dropped, 0);
    for id in ["skip", "once", "catch"] {
        let fired: Vec<String> = late
            .fired
            .iter()
            .filter(|f| f.job.as_str() == id)
            .map(|f| f.nominal.format("%H:%M:%S").to_string())
            .collect();
        assert_eq!(fired, ["10:00:02", "10:00:04"], "{id}");
    }
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
    assert!(world.has_run(occurrence).await);
    // A second scheduler (another replica) ticking the same instant creates nothing more.
    let other = world.scheduler(&jobs);
    let again = other.tick(start).await.unwrap();
    assert!(again.fired.iter().all(|f| f.run.is_none()));
}

/// A replica crashed between creating an occurrence and its run, and the next tick comes so
/// late that the misfire policy passes over that instant: the instant was fired all the same,
/// so it gets its run, once, and the policy still decides every other instant.
#[tokio::test]
async fn an_orphaned_occurrence_gets_its_run_even_when_the_policy_passes_over_its_instant() {
    let start = utc("2027-01-01T10:00:00Z");
    let every_minute = json!({"cron": "0 * * * * *"});
    let jobs = vec![
        job("skip", every_minute.clone(), json!({"policy": "skip"})),
        job("once", every_minute, json!({"policy": "fire_once"})),
    ];
    let world = world(start - Duration::minutes(1));
    let scheduler = world.scheduler(&jobs);
    let first = scheduler.tick(start - Duration::minutes(1)).await.unwrap();
    assert_eq!(first.fired.len(), 2, "09:59 fires for both");
    let acme = TenantId::parse("acme").unwrap();
    let mut orphans = Vec::new();
    for id in ["skip", "once"] {
        let Occurrence::Created(occurrence) = world
            .runs
            .create_occurrence(&JobId::parse(id).unwrap(), &acme, start, "")
            .await
            .unwrap()
        else {
            panic!("the occurrence was new")
        };
        orphans.push(occurrence);
    }
    // Down from 10:00 to 10:10:30.
    let late = start + Duration::seconds(630);
    let restarted = world.scheduler(&jobs);
    let report = restarted.tick(late).await.unwrap();
    let of = |job: &str| -> Vec<(String, bool)> {
        report
            .fired
            .iter()
            .filter(|f| f.job.as_str() == job)
            .map(|f| (f.nominal.format("%H:%M").to_string(), f.run.is_some()))
            .collect()
    };
    // 10:01–10:09 are more than a minute late: passed over; 10:10 is on time.
    for id in ["skip", "once"] {
        assert_eq!(
            of(id),
            [("10:00".to_owned(), true), ("10:10".to_owned(), true)],
            "{id}"
        );
    }
    assert_eq!(report.dropped, 18);
    for occurrence in orphans {
        assert!(world.has_run(occurrence).await);
    }
    // Nothing is repeated: the next tick fires only 10:11.
    let next = restarted.tick(start + Duration::minutes(11)).await.unwrap();
    let nominals: BTreeSet<_> = next
        .fired
        .iter()
        .map(|f| f.nominal.format("%H:%M").to_string())
        .collect();
    assert_eq!(nominals, BTreeSet::from(["10:11".to_owned()]));
    assert_eq!(next.fired.len(), 2);
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
async fn an_orphaned_occurrence_gets_its_run_whatever_the_overlap_policy() {
    let start = utc("2027-01-01T09:59:00Z");
    let world = world(start);
    let skip = overlap_job("skip");
    let scheduler = world.scheduler(std::slice::from_ref(&skip));
    scheduler.tick(start).await.unwrap();
    let ten = scheduler.tick(utc("2027-01-01T10:00:00Z")).await.unwrap();
    assert_eq!(ten.fired.len(), 1, "10:00 fires; its run stays unfinished");
    // A tick fired 11:00 and crashed before creating its run.
    let eleven = utc("2027-01-01T11:00:00Z");
    let Occurrence::Created(occurrence) = world
        .runs
        .create_occurrence(&skip.id, &skip.tenant, eleven, "")
        .await
        .unwrap()
    else {
        panic!("the occurrence was new")
    };
    let report = world
        .scheduler(std::slice::from_ref(&skip))
        .tick(eleven + Duration::seconds(20))
        .await
        .unwrap();
    assert_eq!(
        report
            .fired
            .iter()
            .map(|f| (f.nominal, f.run.is_some()))
            .collect::<Vec<_>>(),
        [(eleven, true)],
        "the decided instant is not skipped for the unfinished 10:00 run"
    );
    assert_eq!(report.dropped, 0);
    assert!(world.has_run(occurrence).await);
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

/// A Dynamic job of acme: each user's briefing on their own schedule, daily 07:00 UTC by
/// default.
fn briefing(users: &[&str]) -> Job {
    parse_job(json!({
        "id": "briefing", "tenant": "acme", "type": "PREFERENCE_INDIVIDUAL_USERS",
        "template": "digest", "source": {"users": {"ids": users}},
        "feature_type": "briefing", "overlap": "buffer_all",
        "default_preferences": {"schedule": {"frequency": "daily", "at": "07:00"}},
    }))
    .unwrap_or_else(|p| panic!("{p}"))
}

fn preference(user: &str, at: &str, zone: &str, enabled: bool) -> Preference {
    Preference {
        tenant: TenantId::parse("acme").unwrap(),
        user: UserId::parse(user).unwrap(),
        feature_type: FeatureType::parse("briefing").unwrap(),
        frequency: Some(Frequency::Daily),
        time_of_day: Some(TimeOfDay::parse(at).unwrap()),
        time_zone: Some(zone.to_owned()),
        weekday: None,
        day_of_month: None,
        template_override: None,
        parameters: serde_json::Map::new(),
        enabled,
        version: 1,
    }
}

/// Ticks every minute over `[from, to)`; returns (UTC time, sorted users) per fired run.
async fn fires(
    world: &World,
    scheduler: &BatchScheduler,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut now = from;
    while now < to {
        for fired in scheduler.tick(now).await.unwrap().fired {
            let run = fired.run.expect("this scheduler created the run");
            let mut users: Vec<String> = world
                .runs
                .items_of(&run)
                .into_iter()
                .filter_map(|i| i.user.map(|u| u.to_string()))
                .collect();
            users.sort();
            out.push((fired.nominal.format("%H:%M").to_string(), users));
        }
        now += Duration::minutes(1);
    }
    out
}

fn expect(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    list.iter()
        .map(|(at, users)| {
            (
                (*at).to_owned(),
                users.iter().map(|u| (*u).to_owned()).collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn moved_disabled_and_new_users_fire_at_their_new_times_only() {
    let start = utc("2027-01-04T00:00:00Z");
    let world = world(start);
    world
        .users
        .insert("acme", ["alice", "bob", "carol", "dave"]);
    let job = briefing(&["alice", "bob", "carol", "dave"]);
    // Berlin is UTC+1 in January: 09:00 there is 08:00Z.
    world
        .preferences
        .upsert(preference("alice", "09:00", "Europe/Berlin", true));
    world
        .preferences
        .upsert(preference("bob", "09:00", "Europe/Berlin", true));
    world
        .preferences
        .upsert(preference("carol", "10:00", "UTC", true));
    let scheduler = world.scheduler(std::slice::from_ref(&job));
    let day1 = fires(&world, &scheduler, start, start + Duration::days(1)).await;
    assert_eq!(
        day1,
        expect(&[("08:00", &["alice", "bob"]), ("10:00", &["carol"])])
    );
    // Overnight: alice moves to 18:00 UTC, bob disables his, dave arrives at 09:00 Berlin.
    world
        .preferences
        .upsert(preference("alice", "18:00", "UTC", true));
    world
        .preferences
        .upsert(preference("bob", "09:00", "Europe/Berlin", false));
    world
        .preferences
        .upsert(preference("dave", "09:00", "Europe/Berlin", true));
    let day2 = fires(
        &world,
        &scheduler,
        start + Duration::days(1),
        start + Duration::days(2),
    )
    .await;
    assert_eq!(
        day2,
        expect(&[
            ("08:00", &["dave"]),
            ("10:00", &["carol"]),
            ("18:00", &["alice"])
        ])
    );
    // A replica started now sees the same groups, and fires nothing twice.
    let other = world.scheduler(std::slice::from_ref(&job));
    let again = other
        .tick(start + Duration::days(1) + Duration::hours(18))
        .await
        .unwrap();
    assert!(again.fired.iter().all(|f| f.run.is_none()));
}

#[tokio::test]
async fn a_group_emptied_by_its_last_user_stops_firing_and_status_follows_users() {
    let start = utc("2027-01-04T00:00:00Z");
    let world = world(start);
    world.users.insert("acme", ["alice", "bob"]);
    let job = briefing(&["alice", "bob"]);
    world
        .preferences
        .upsert(preference("alice", "09:00", "UTC", true));
    world
        .preferences
        .upsert(preference("bob", "12:00", "UTC", true));
    let scheduler = world.scheduler(std::slice::from_ref(&job));
    let all = scheduler
        .next_fires(start, &FireFilter::default())
        .await
        .unwrap();
    let groups: Vec<(&str, usize, &str)> = all
        .iter()
        .map(|n| {
            (
                n.group.as_str(),
                n.users,
                n.feature_type.as_ref().unwrap().as_str(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("daily at 09:00 UTC", 1, "briefing"),
            ("daily at 12:00 UTC", 1, "briefing")
        ]
    );
    let of_bob = scheduler
        .next_fires(
            start,
            &FireFilter {
                user: Some(UserId::parse("bob").unwrap()),
                ..FireFilter::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(of_bob.len(), 1);
    assert_eq!(of_bob[0].nominal, utc("2027-01-04T12:00:00Z"));
    for (filter, expected) in [
        (
            FireFilter {
                tenant: Some(TenantId::parse("globex").unwrap()),
                ..FireFilter::default()
            },
            0,
        ),
        (
            FireFilter {
                feature_type: Some(FeatureType::parse("briefing").unwrap()),
                ..FireFilter::default()
            },
            2,
        ),
        (
            FireFilter {
                job: Some(JobId::parse("briefing").unwrap()),
                ..FireFilter::default()
            },
            2,
        ),
        (
            FireFilter {
                user: Some(UserId::parse("nobody").unwrap()),
                ..FireFilter::default()
            },
            0,
        ),
    ] {
        assert_eq!(
            scheduler.next_fires(start, &filter).await.unwrap().len(),
            expected,
            "{filter:?}"
        );
    }
    // Bob joins alice's time: his old group is gone.
    world
        .preferences
        .upsert(preference("bob", "09:00", "UTC", true));
    let report = scheduler.tick(start + Duration::hours(1)).await.unwrap();
    assert_eq!(report.preference_changes, 1);
    let all = scheduler
        .next_fires(start, &FireFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].users, 2);
    let day = fires(
        &world,
        &scheduler,
        start + Duration::hours(1),
        start + Duration::days(1),
    )
    .await;
    assert_eq!(day, expect(&[("09:00", &["alice", "bob"])]));
}

#[tokio::test]
async fn a_hundred_thousand_idle_groups_cost_a_constant_number_of_store_calls_per_tick() {
    let start = utc("2027-01-04T00:00:00Z");
    let world = world(start);
    let zones = [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Asia/Kolkata",
        "Australia/Sydney",
        "America/Sao_Paulo",
        "Asia/Tokyo",
        "Europe/London",
        "Africa/Cairo",
        "Pacific/Auckland",
    ];
    let mut count = 0;
    'fill: for zone in zones {
        for day in ["mon", "tue", "wed", "thu", "fri", "sat", "sun"] {
            for minute in 0..24 * 60 {
                if count == 100_000 {
                    break 'fill;
                }
                world.preferences.upsert(Preference {
                    frequency: Some(Frequency::Weekly),
                    weekday: Some(batch_domain::time::parse_weekday(day).unwrap()),
                    ..preference(
                        &format!("user{count:06}"),
                        &format!("{:02}:{:02}", minute / 60, minute % 60),
                        zone,
                        true,
                    )
                });
                count += 1;
            }
        }
    }
    let job = briefing(&["user000000"]);
    let scheduler = world.scheduler(std::slice::from_ref(&job));
    // The first tick loads every group (and may fire those due this very minute).
    scheduler.tick(start).await.unwrap();
    let groups = scheduler
        .next_fires(start, &FireFilter::default())
        .await
        .unwrap();
    assert_eq!(groups.len(), 100_000, "one group per distinct schedule");
    // Between two fires nothing is due: each tick reads the pauses and the change feed, and
    // touches no schedule.
    let quiet = groups[0].fire_at - Duration::seconds(1);
    let quiet = if quiet > start { quiet } else { start };
    let before = (world.runs.schedule_calls(), world.preferences.calls());
    for _ in 0..10 {
        let report = scheduler.tick(quiet).await.unwrap();
        assert!(report.fired.is_empty());
    }
    let after = (world.runs.schedule_calls(), world.preferences.calls());
    assert_eq!(after.0 - before.0, 10, "one pause read per tick");
    assert_eq!(after.1 - before.1, 10, "one change-feed read per tick");
}

#[tokio::test]
async fn a_paused_job_does_not_fire_until_resumed_and_does_not_catch_up() {
    let start = utc("2027-01-01T09:30:00Z");
    let jobs = vec![job(
        "hourly",
        json!({"frequency": "hourly", "minute": 0}),
        json!({"policy": "catch_up", "window_seconds": 86400}),
    )];
    let world = world(start);
    let scheduler = world.scheduler(&jobs);
    let id = JobId::parse("hourly").unwrap();
    scheduler.tick(start).await.unwrap();
    scheduler
        .pause(&id, "template migration", start)
        .await
        .unwrap();
    let mut paused = 0;
    let mut now = start;
    while now < utc("2027-01-01T12:30:00Z") {
        let report = scheduler.tick(now).await.unwrap();
        assert!(report.fired.is_empty(), "fired while paused at {now}");
        paused += report.paused;
        now += Duration::minutes(1);
    }
    assert_eq!(paused, 3, "10:00, 11:00 and 12:00 were paused");
    let status = scheduler
        .next_fires(now, &FireFilter::default())
        .await
        .unwrap();
    assert_eq!(status[0].paused.as_deref(), Some("template migration"));
    assert!(scheduler.resume(&id).await.unwrap());
    assert!(
        !scheduler.resume(&id).await.unwrap(),
        "resuming twice is harmless"
    );
    let report = scheduler.tick(utc("2027-01-01T13:00:00Z")).await.unwrap();
    let fired: Vec<DateTime<Utc>> = report.fired.iter().map(|f| f.nominal).collect();
    assert_eq!(
        fired,
        [utc("2027-01-01T13:00:00Z")],
        "no catch-up of paused instants"
    );
    assert!(matches!(
        scheduler
            .pause(&JobId::parse("nope").unwrap(), "", now)
            .await,
        Err(batch_app::Error::Job(_))
    ));
}

#[tokio::test]
async fn trigger_now_applies_its_overrides() {
    let start = utc("2027-01-01T09:30:00Z");
    let jobs = vec![job(
        "hourly",
        json!({"frequency": "hourly", "minute": 0}),
        json!({}),
    )];
    let world = world(start);
    world.users.insert("acme", ["u2"]);
    let scheduler = world.scheduler(&jobs);
    let scope = Scope {
        template: Some(batch_domain::TemplateId::parse("special").unwrap()),
        parameters: json!({"tone": "formal"}).as_object().unwrap().clone(),
        priority: Some(batch_domain::Priority::CRITICAL),
        ..Scope::default()
    };
    let run = scheduler
        .trigger(&JobId::parse("hourly").unwrap(), &scope)
        .await
        .unwrap();
    assert_eq!(run.trigger, Trigger::Manual);
    assert_eq!(run.priority, batch_domain::Priority::CRITICAL);
    let items = world.runs.items_of(&run.id);
    assert!(!items.is_empty());
    for item in items {
        assert_eq!(item.payload["template"], "special");
        assert_eq!(item.payload["parameters"]["tone"], "formal");
    }
    assert!(matches!(
        scheduler
            .trigger(&JobId::parse("nope").unwrap(), &Scope::default())
            .await,
        Err(batch_app::Error::Job(_))
    ));
}

#[tokio::test]
async fn backfill_runs_each_past_instant_once() {
    let start = utc("2027-01-01T12:30:00Z");
    let jobs = vec![
        job(
            "hourly",
            json!({"frequency": "hourly", "minute": 0}),
            json!({}),
        ),
        job("every-second", json!({"cron": "* * * * * *"}), json!({})),
    ];
    let world = world(start);
    let scheduler = world.scheduler(&jobs);
    let id = JobId::parse("hourly").unwrap();
    let first = scheduler
        .backfill(
            &id,
            utc("2027-01-01T08:00:00Z"),
            utc("2027-01-01T10:00:00Z"),
            start,
        )
        .await
        .unwrap();
    assert_eq!(first.created.len(), 3, "08:00, 09:00 and 10:00");
    assert_eq!(first.existed, 0);
    let overlapping = scheduler
        .backfill(
            &id,
            utc("2027-01-01T09:30:00Z"),
            utc("2027-01-01T12:00:00Z"),
            start,
        )
        .await
        .unwrap();
    assert_eq!(overlapping.created.len(), 2, "11:00 and 12:00");
    assert_eq!(overlapping.existed, 1, "10:00 ran already");
    for run in first.created.iter().chain(&overlapping.created) {
        let record = world
            .runs
            .run(&TenantId::parse("acme").unwrap(), run)
            .await
            .unwrap();
        assert_eq!(record.trigger, Trigger::Backfill);
    }
    for (from, to) in [
        (utc("2027-01-01T10:00:00Z"), utc("2027-01-01T09:00:00Z")),
        (utc("2027-01-01T10:00:00Z"), utc("2027-01-01T13:00:00Z")),
    ] {
        assert!(matches!(
            scheduler.backfill(&id, from, to, start).await,
            Err(batch_app::Error::Job(_))
        ));
    }
    let too_many = scheduler
        .backfill(
            &JobId::parse("every-second").unwrap(),
            utc("2027-01-01T11:00:00Z"),
            utc("2027-01-01T12:00:00Z"),
            start,
        )
        .await;
    assert!(
        matches!(&too_many, Err(batch_app::Error::Job(m)) if m.contains("split the range")),
        "{too_many:?}"
    );
}

#[tokio::test]
async fn a_schedule_that_fails_to_fire_blocks_no_other() {
    let start = utc("2027-01-01T09:30:00Z");
    let broken = parse_job(json!({
        "id": "broken", "tenant": "acme", "type": "INDIVIDUAL_CATEGORIES", "template": "digest",
        "source": {"category": {"name": "missing"}},
        "schedule": {"frequency": "hourly", "minute": 0}, "overlap": "allow_all",
    }))
    .unwrap_or_else(|p| panic!("{p}"));
    // The healthy job fires later in the hour than the broken one, so it sits behind it.
    let healthy = job(
        "healthy",
        json!({"frequency": "hourly", "minute": 5}),
        json!({}),
    );
    let world = world(start);
    let scheduler = world.scheduler(&[broken, healthy]);
    scheduler.tick(start).await.unwrap();
    for minute in [0, 1, 5] {
        let now = utc("2027-01-01T10:00:00Z") + Duration::minutes(minute);
        let report = scheduler.tick(now).await.unwrap();
        assert!(
            report.failed.iter().all(|f| f.starts_with("broken")),
            "{:?}",
            report.failed
        );
        if minute == 5 {
            assert_eq!(report.fired.len(), 1, "{report:?}");
            assert_eq!(report.fired[0].job.as_str(), "healthy");
            assert_eq!(report.failed.len(), 1, "the broken one is still retried");
        }
    }
}
