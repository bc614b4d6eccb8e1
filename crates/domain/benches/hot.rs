//! Criterion micro-benchmarks of the hot pure functions of `batch-domain`: the next fire of a
//! schedule (cron, and daily in a zone with DST), the effective priority, grouping 10 000
//! preferences by their next fire, and parsing `config/jobs.json`.
//!
//! Run with `cargo bench -p batch-domain --bench hot` (add `-- --quick` for a short run).
//! Every benchmark has a flat name, so its estimates land in
//! `target/criterion/<name>/new/estimates.json`, where `cargo xtask bench` reads them.
#![forbid(unsafe_code)]

use std::hint::black_box;

use batch_domain::config::parse_jobs_file;
use batch_domain::preference::{Frequency, Preference, PreferenceDefaults, group_by_next_fire};
use batch_domain::priority::{Aging, effective_priority};
use batch_domain::schedule::{CronSpec, Recurrence};
use batch_domain::{FeatureType, Priority, Schedule, TenantId, TimeOfDay, UserId, Zone};
use chrono::{DateTime, Duration, Utc, Weekday};
use criterion::Criterion;

/// The jobs file the server ships with.
const JOBS_JSON: &str = include_str!("../../../config/jobs.json");

/// Zones of the grouping benchmark: whole, half and quarter hour offsets, both hemispheres.
const ZONES: [&str; 8] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Sydney",
    "Asia/Kathmandu",
    "America/Sao_Paulo",
    "Pacific/Auckland",
];

/// A fixed instant (a Monday morning in January) the benchmarks compute from.
fn instant() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-01-04T06:07:08Z")
        .expect("a valid constant")
        .to_utc()
}

/// 10 000 enabled preferences spread over quarter hours × zones × daily/weekly/monthly
/// (a few hundred distinct schedules, as real users pick round times).
fn preferences(count: usize) -> Vec<Preference> {
    (0..count)
        .map(|n| {
            let quarter = n % 96;
            let zone = ZONES[(n / 96) % ZONES.len()];
            let frequency = match (n / (96 * ZONES.len())) % 3 {
                0 => Frequency::Daily,
                1 => Frequency::Weekly,
                _ => Frequency::Monthly,
            };
            Preference {
                tenant: TenantId::parse("acme").expect("a valid constant"),
                user: UserId::parse(format!("user{n:07}")).expect("a valid constant"),
                feature_type: FeatureType::parse("briefing").expect("a valid constant"),
                frequency: Some(frequency),
                time_of_day: Some(
                    TimeOfDay::parse(&format!("{:02}:{:02}", quarter / 4, (quarter % 4) * 15))
                        .expect("a valid constant"),
                ),
                time_zone: Some(zone.to_owned()),
                weekday: Some(Weekday::Wed),
                day_of_month: Some(15),
                template_override: None,
                parameters: serde_json::Map::new(),
                enabled: true,
                version: 1,
            }
        })
        .collect()
}

/// `Schedule::next_nominal` of a cron expression and of a daily schedule in Berlin.
fn next_fire(c: &mut Criterion) {
    let after = instant();
    let cron = Schedule::new(
        Recurrence::Cron(CronSpec::parse("0 */15 9-17 * * MON-FRI").expect("a valid constant")),
        Zone::parse("America/New_York").expect("a valid constant"),
    );
    c.bench_function("next_nominal_cron", |b| {
        b.iter(|| black_box(&cron).next_nominal(black_box(after)));
    });
    let daily = Schedule::new(
        Recurrence::Daily {
            at: TimeOfDay::parse("02:30").expect("a valid constant"),
        },
        Zone::parse("Europe/Berlin").expect("a valid constant"),
    );
    c.bench_function("next_nominal_daily_zone", |b| {
        b.iter(|| black_box(&daily).next_nominal(black_box(after)));
    });
}

/// `effective_priority` of low-priority work that has waited 42 minutes.
fn priority(c: &mut Criterion) {
    let aging = Aging::default();
    c.bench_function("effective_priority", |b| {
        b.iter(|| {
            effective_priority(
                black_box(Priority::LOW),
                black_box(Duration::minutes(42)),
                black_box(aging),
            )
        });
    });
}

/// `group_by_next_fire` over 10 000 preferences.
fn grouping(c: &mut Criterion) {
    let preferences = preferences(10_000);
    let defaults = PreferenceDefaults::default();
    let after = instant();
    c.bench_function("group_by_next_fire_10k", |b| {
        b.iter(|| group_by_next_fire(black_box(&preferences), &defaults, black_box(after)));
    });
}

/// `parse_jobs_file` of `config/jobs.json`.
fn config(c: &mut Criterion) {
    assert!(
        parse_jobs_file(JOBS_JSON).is_ok(),
        "config/jobs.json parses"
    );
    c.bench_function("parse_jobs_file", |b| {
        b.iter(|| parse_jobs_file(black_box(JOBS_JSON)));
    });
}

/// What `criterion_main!` would generate, written out so every item has its documentation:
/// the command line (`--quick`, a filter, `--bench`) configures the run.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    next_fire(&mut c);
    priority(&mut c);
    grouping(&mut c);
    config(&mut c);
    c.final_summary();
}
