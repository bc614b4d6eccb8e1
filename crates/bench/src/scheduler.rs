//! `scheduler` (P5): the BatchScheduler at scale, over the in-memory fakes of `batch-testkit`
//! (built as `crates/app/tests/scheduler.rs` builds them) and, for the burst, a real SQLite
//! store.
//!
//! * **Idle tick**: a Dynamic job whose users hold 100 000 distinct weekly preference
//!   schedules (10 zones × 7 weekdays × every minute of the day); after the tick that loads
//!   them, 599 ticks every 100 ms within one minute, where nothing is due, each timed with
//!   [`Instant`] around [`BatchScheduler::tick`]: p50, p99 and max.
//! * **Grouping**: the first tick of a scheduler whose preference source holds 1 000 000
//!   preferences spread over 4 608 schedules (96 quarter hours × 12 zones × daily, weekly
//!   Monday, weekly Thursday, monthly), at an instant where none is due: it reads the change
//!   feed and builds every group. For comparison, also the pure
//!   [`group_by_next_fire`] over the same preferences.
//! * **Burst**: 10 000 users who all want the same time of day; the tick at that instant,
//!   which creates the run and its 10 000 items — on SQLite (the headline figure) and on the
//!   in-memory run store.
//!
//! `--quick` scales the idle schedules to 20 000 and the preferences to 200 000; the JSON
//! line states the sizes used.

use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use anyhow::{Context, bail, ensure};
use batch_app::Ports;
use batch_app::processor::{BatchProcessor, ProcessorSettings};
use batch_app::scheduler::{BatchScheduler, FireFilter, TickReport};
use batch_app::strategy::Strategies;
use batch_domain::config::{Job, parse_job};
use batch_domain::preference::{Frequency, Preference, group_by_next_fire};
use batch_domain::time::parse_weekday;
use batch_domain::{FeatureType, TenantId, TimeOfDay, UserId};
use batch_ports::runs::RunStore;
use batch_ports::schedules::ScheduleStore;
use batch_store::Store;
use batch_testkit::ManualClock;
use batch_testkit::fakes::{
    Behaviour, FakeCategories, FakeExecutor, FakePreferences, FakeTemplates, FakeUsers, MemoryRuns,
};
use chrono::{DateTime, Duration, Utc};
use serde_json::json;

/// What `scheduler` measures, and at which sizes.
#[derive(Debug, clap::Args)]
pub(crate) struct SchedulerArgs {
    /// Scale down for a quick run: 20 000 idle schedules, 200 000 preferences to group (the
    /// burst stays at 10 000 users). Explicit sizes below win.
    #[arg(long)]
    quick: bool,
    /// Distinct preference schedules loaded for the idle ticks (default 100 000).
    #[arg(long)]
    idle_schedules: Option<usize>,
    /// Timed idle ticks, every 100 ms; at most 599 (one minute, nothing due).
    #[arg(long, default_value_t = 599)]
    idle_ticks: usize,
    /// Preferences the grouping tick loads (default 1 000 000).
    #[arg(long)]
    group_preferences: Option<usize>,
    /// Users of the burst.
    #[arg(long, default_value_t = 10_000)]
    burst_users: usize,
}

/// The tenant of every job and preference here.
const TENANT: &str = "acme";

/// Zones of the idle schedules, as in the scheduler test.
const IDLE_ZONES: [&str; 10] = [
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

/// Zones of the grouping preferences: whole, half and quarter hour offsets, both hemispheres.
const GROUP_ZONES: [&str; 12] = [
    "UTC",
    "Europe/Berlin",
    "Europe/London",
    "America/New_York",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Pacific/Auckland",
    "Africa/Cairo",
];

/// Runs `scheduler` and prints its JSON line.
pub(crate) async fn scheduler(args: &SchedulerArgs) -> anyhow::Result<()> {
    let idle_schedules = args
        .idle_schedules
        .unwrap_or(if args.quick { 20_000 } else { 100_000 });
    let group_preferences =
        args.group_preferences
            .unwrap_or(if args.quick { 200_000 } else { 1_000_000 });
    ensure!(
        (1..=599).contains(&args.idle_ticks),
        "--idle-ticks must be 1 to 599 (one minute every 100 ms)"
    );
    ensure!(
        idle_schedules <= IDLE_ZONES.len() * 7 * 24 * 60,
        "at most {} idle schedules",
        IDLE_ZONES.len() * 7 * 24 * 60
    );
    ensure!(args.burst_users > 0, "--burst-users must be positive");

    let idle = idle(idle_schedules, args.idle_ticks).await?;
    eprintln!(
        "idle: {idle_schedules} schedules loaded in {:.0} ms; {} ticks p50 {:.3} ms, p99 {:.3} ms",
        idle.load_ms, idle.ticks, idle.p50_ms, idle.p99_ms
    );
    let group = grouping(group_preferences).await?;
    eprintln!(
        "group: {group_preferences} preferences into {} schedules: first tick {:.0} ms, group_by_next_fire {:.0} ms",
        group.schedules, group.tick_ms, group.pure_ms
    );
    let burst_sqlite = burst_sqlite(args.burst_users).await?;
    let burst_memory = burst(&memory_world(burst_start()?), args.burst_users).await?;
    eprintln!(
        "burst: {} users: SQLite {burst_sqlite:.0} ms, in memory {burst_memory:.0} ms",
        args.burst_users
    );
    let line = json!({
        "quick": args.quick,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "idle_schedules": idle_schedules,
        "idle_ticks": idle.ticks,
        "idle_load_ms": idle.load_ms,
        "idle_tick_p50_ms": idle.p50_ms,
        "idle_tick_p99_ms": idle.p99_ms,
        "idle_tick_max_ms": idle.max_ms,
        "group_preferences": group_preferences,
        "group_schedules": group.schedules,
        "group_1m_ms": group.tick_ms,
        "group_pure_ms": group.pure_ms,
        "group_detail": format!(
            "first scheduler tick loading {group_preferences} preferences from FakePreferences \
             (MemoryRuns schedule store) into {} schedules (96 quarter hours x 12 zones x daily, \
             weekly Mon, weekly Thu, monthly); group_pure_ms: group_by_next_fire over the same \
             preferences",
            group.schedules
        ),
        "burst_users": args.burst_users,
        "burst_10k_ms": burst_sqlite,
        "burst_memory_ms": burst_memory,
        "burst_detail": format!(
            "the tick firing {} users of one daily 09:00 UTC preference: occurrence, run and \
             its items created. burst_10k_ms on a SQLite file (batch_store::Store, users in \
             system_users, preferences in user_preferences); burst_memory_ms on MemoryRuns \
             and the testkit fakes",
            args.burst_users
        ),
    });
    println!("{line}");
    Ok(())
}

/// The in-memory world of the scheduler test: run and schedule store, users, preferences.
struct World {
    runs: Arc<MemoryRuns>,
    users: Arc<FakeUsers>,
    preferences: Arc<FakePreferences>,
    processor: Arc<BatchProcessor>,
    schedules: Arc<dyn ScheduleStore>,
}

/// Ports over the testkit fakes, with a manual clock at `start`.
fn memory_world(start: DateTime<Utc>) -> World {
    let runs = Arc::new(MemoryRuns::default());
    let users = Arc::new(FakeUsers::default());
    let preferences = Arc::new(FakePreferences::default());
    let clock = Arc::new(ManualClock::new(start));
    let ports = Ports {
        runs: runs.clone(),
        contexts: runs.clone(),
        users: users.clone(),
        categories: Arc::new(FakeCategories::default()),
        preferences: preferences.clone(),
        templates: templates(),
        executor: Arc::new(FakeExecutor::new(Behaviour::default(), clock.clone())),
        clock,
    };
    World {
        runs: runs.clone(),
        users,
        preferences,
        processor: Arc::new(BatchProcessor::new(
            ports,
            Strategies::default(),
            ProcessorSettings::default(),
        )),
        schedules: runs,
    }
}

impl World {
    /// A scheduler of `job` over this world.
    fn scheduler(&self, job: &Job) -> BatchScheduler {
        BatchScheduler::new(
            self.processor.clone(),
            self.schedules.clone(),
            std::slice::from_ref(job),
        )
    }
}

/// The templates every world serves: `digest`.
fn templates() -> Arc<FakeTemplates> {
    let templates = Arc::new(FakeTemplates::default());
    templates.insert("digest", "x");
    templates
}

/// A Dynamic job of the tenant over `users`: each user's briefing on their own schedule.
fn briefing(users: &[String]) -> anyhow::Result<Job> {
    parse_job(json!({
        "id": "briefing", "tenant": TENANT, "type": "PREFERENCE_INDIVIDUAL_USERS",
        "template": "digest", "source": {"users": {"ids": users}},
        "feature_type": "briefing", "overlap": "buffer_all",
        "default_preferences": {"schedule": {"frequency": "daily", "at": "07:00"}},
    }))
    .map_err(|p| anyhow::anyhow!("the bench job: {p}"))
}

/// An enabled preference of `user` for the briefing.
fn preference(
    user: &str,
    frequency: Frequency,
    at: &str,
    zone: &str,
) -> anyhow::Result<Preference> {
    Ok(Preference {
        tenant: TenantId::parse(TENANT)?,
        user: UserId::parse(user)?,
        feature_type: FeatureType::parse("briefing")?,
        frequency: Some(frequency),
        time_of_day: Some(TimeOfDay::parse(at)?),
        time_zone: Some(zone.to_owned()),
        weekday: None,
        day_of_month: None,
        template_override: None,
        parameters: serde_json::Map::new(),
        enabled: true,
        version: 1,
    })
}

/// The instant (UTC) of an RFC 3339 text.
fn utc(text: &str) -> anyhow::Result<DateTime<Utc>> {
    Ok(DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("instant {text}"))?
        .to_utc())
}

/// Milliseconds of a duration.
fn ms(duration: StdDuration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

/// The nearest-rank percentile `p` (0–1) of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Whether a tick did nothing but look.
fn quiet(report: &TickReport) -> bool {
    report.fired.is_empty()
        && report.dropped == 0
        && report.paused == 0
        && report.preference_changes == 0
        && report.failed.is_empty()
}

/// What the idle ticks measured.
struct Idle {
    load_ms: f64,
    ticks: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Loads `schedules` distinct weekly preference schedules, then times `ticks` ticks every
/// 100 ms within the minute after the load, where nothing is due.
async fn idle(schedules: usize, ticks: usize) -> anyhow::Result<Idle> {
    let start = utc("2027-01-04T00:00:00Z")?;
    let world = memory_world(start);
    let mut count = 0;
    'fill: for zone in IDLE_ZONES {
        for day in ["mon", "tue", "wed", "thu", "fri", "sat", "sun"] {
            for minute in 0..24 * 60 {
                if count == schedules {
                    break 'fill;
                }
                world.preferences.upsert(Preference {
                    weekday: Some(parse_weekday(day)?),
                    ..preference(
                        &format!("user{count:07}"),
                        Frequency::Weekly,
                        &format!("{:02}:{:02}", minute / 60, minute % 60),
                        zone,
                    )?
                });
                count += 1;
            }
        }
    }
    let job = briefing(&["user0000000".to_owned()])?;
    let scheduler = world.scheduler(&job);
    // Loaded just after the minute starts, so the schedules of this very minute are next
    // week's and nothing comes due before the next minute.
    let loaded_at = start + Duration::milliseconds(50);
    let began = Instant::now();
    scheduler.tick(loaded_at).await?;
    let load_ms = ms(began.elapsed());
    let groups = scheduler
        .next_fires(loaded_at, &FireFilter::default())
        .await?;
    ensure!(
        groups.len() == schedules,
        "{} groups for {schedules} schedules",
        groups.len()
    );
    let mut samples = Vec::with_capacity(ticks);
    for k in 1..=ticks {
        let now = start + Duration::milliseconds(100 * i64::try_from(k)?);
        let began = Instant::now();
        let report = scheduler.tick(now).await?;
        let took = began.elapsed();
        if !quiet(&report) {
            bail!("the idle tick at {now} did something: {report:?}");
        }
        samples.push(ms(took));
    }
    samples.sort_by(f64::total_cmp);
    Ok(Idle {
        load_ms,
        ticks: samples.len(),
        p50_ms: percentile(&samples, 0.50),
        p99_ms: percentile(&samples, 0.99),
        max_ms: samples.last().copied().unwrap_or_default(),
    })
}

/// What grouping measured.
struct Grouping {
    schedules: usize,
    tick_ms: f64,
    pure_ms: f64,
}

/// Times the first tick over `count` preferences spread over a few thousand schedules, and
/// the pure grouping of the same preferences.
async fn grouping(count: usize) -> anyhow::Result<Grouping> {
    // A quarter past or to no hour in any zone: nothing is due at the loading tick.
    let start = utc("2027-01-04T00:07:00Z")?;
    let world = memory_world(start);
    let kinds = [
        (Frequency::Daily, None, None),
        (Frequency::Weekly, Some("mon"), None),
        (Frequency::Weekly, Some("thu"), None),
        (Frequency::Monthly, None, Some(1)),
    ];
    let distinct = 96 * GROUP_ZONES.len() * kinds.len();
    let mut preferences = Vec::with_capacity(count);
    for n in 0..count {
        let schedule = n % distinct;
        let quarter = schedule % 96;
        let zone = GROUP_ZONES[(schedule / 96) % GROUP_ZONES.len()];
        let (frequency, weekday, day) = kinds[schedule / (96 * GROUP_ZONES.len())];
        preferences.push(Preference {
            weekday: weekday.map(parse_weekday).transpose()?,
            day_of_month: day,
            ..preference(
                &format!("user{n:07}"),
                frequency,
                &format!("{:02}:{:02}", quarter / 4, (quarter % 4) * 15),
                zone,
            )?
        });
    }
    let job = briefing(&["user0000000".to_owned()])?;
    let defaults = job
        .dynamic
        .as_ref()
        .map(|d| d.defaults.clone())
        .unwrap_or_default();
    let began = Instant::now();
    let grouped = group_by_next_fire(&preferences, &defaults, start);
    let pure_ms = ms(began.elapsed());
    ensure!(
        grouped.groups.iter().map(|g| g.users.len()).sum::<usize>() == count,
        "group_by_next_fire lost users"
    );
    drop(grouped);
    for preference in preferences {
        world.preferences.upsert(preference);
    }
    let scheduler = world.scheduler(&job);
    let began = Instant::now();
    let report = scheduler.tick(start).await?;
    let tick_ms = ms(began.elapsed());
    ensure!(
        report.fired.is_empty() && report.failed.is_empty(),
        "the grouping tick fired: {report:?}"
    );
    let schedules = scheduler
        .next_fires(start, &FireFilter::default())
        .await?
        .len();
    ensure!(
        schedules == distinct.min(count),
        "{schedules} groups for {} schedules",
        distinct.min(count)
    );
    Ok(Grouping {
        schedules,
        tick_ms,
        pure_ms,
    })
}

/// A minute before the burst fires.
fn burst_start() -> anyhow::Result<DateTime<Utc>> {
    utc("2027-01-04T08:59:00Z")
}

/// The burst's user names.
fn burst_users(count: usize) -> Vec<String> {
    (0..count).map(|n| format!("burst{n:07}")).collect()
}

/// The burst's preferences: every user daily at 09:00 UTC.
fn burst_preferences(users: &[String]) -> anyhow::Result<Vec<Preference>> {
    users
        .iter()
        .map(|u| preference(u, Frequency::Daily, "09:00", "UTC"))
        .collect()
}

/// Loads a burst of `count` users into an in-memory world, then times the tick that fires it.
async fn burst(world: &World, count: usize) -> anyhow::Result<f64> {
    let users = burst_users(count);
    world.users.insert(TENANT, users.iter().map(String::as_str));
    for preference in burst_preferences(&users)? {
        world.preferences.upsert(preference);
    }
    let scheduler = world.scheduler(&briefing(&users)?);
    let (took, run) = fire_burst(&scheduler).await?;
    let items = world.runs.counts(&run).await?.total();
    ensure!(
        items == u64::try_from(count)?,
        "the burst run has {items} items, not {count}"
    );
    Ok(took)
}

/// Loads the schedules a minute before the burst and times the tick at its instant; returns
/// the time and the run it created.
async fn fire_burst(scheduler: &BatchScheduler) -> anyhow::Result<(f64, batch_domain::run::RunId)> {
    let start = burst_start()?;
    let report = scheduler.tick(start).await?;
    ensure!(
        report.fired.is_empty(),
        "fired before the burst: {report:?}"
    );
    let at = start + Duration::minutes(1);
    let began = Instant::now();
    let mut report = scheduler.tick(at).await?;
    let took = ms(began.elapsed());
    ensure!(
        report.fired.len() == 1 && report.failed.is_empty(),
        "the burst tick: {report:?}"
    );
    let run = report
        .fired
        .pop()
        .and_then(|f| f.run)
        .context("the burst tick created no run")?;
    Ok((took, run))
}

/// The burst on a SQLite file: users in `system_users`, preferences in `user_preferences`,
/// runs, items and schedule states in the store's tables.
async fn burst_sqlite(count: usize) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("batch-bench-burst-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = burst_sqlite_in(&dir, count).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// [`burst_sqlite`] in the directory `dir`.
async fn burst_sqlite_in(dir: &std::path::Path, count: usize) -> anyhow::Result<f64> {
    let url = format!("sqlite://{}/burst.db?mode=rwc", dir.display());
    let store = Arc::new(
        Store::open(&url, true)
            .await
            .with_context(|| format!("opening {url}"))?,
    );
    let users = burst_users(count);
    crate::insert_users(
        &url,
        users
            .iter()
            .map(|u| format!("('{TENANT}', '{u}', TRUE, NULL)")),
    )
    .await?;
    store
        .upsert_preferences(&burst_preferences(&users)?)
        .await?;
    let clock = Arc::new(ManualClock::new(burst_start()?));
    let ports = Ports {
        runs: store.clone(),
        contexts: store.clone(),
        users: store.clone(),
        categories: store.clone(),
        preferences: store.clone(),
        templates: templates(),
        executor: Arc::new(FakeExecutor::new(Behaviour::default(), clock.clone())),
        clock,
    };
    let processor = Arc::new(BatchProcessor::new(
        ports,
        Strategies::default(),
        ProcessorSettings::default(),
    ));
    let scheduler = BatchScheduler::new(
        processor,
        store.clone(),
        std::slice::from_ref(&briefing(&users)?),
    );
    let (took, run) = fire_burst(&scheduler).await?;
    let items = store.counts(&run).await?.total();
    ensure!(
        items == u64::try_from(count)?,
        "the burst run has {items} items, not {count}"
    );
    Ok(took)
}
