use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc, Weekday};
use proptest::prelude::*;

use super::*;

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn at(text: &str) -> TimeOfDay {
    TimeOfDay::parse(text).unwrap()
}

fn zone(name: &str) -> Zone {
    Zone::parse(name).unwrap()
}

fn cron(text: &str) -> Recurrence {
    Recurrence::Cron(CronSpec::parse(text).unwrap())
}

/// Checks the next `expected.len()` nominal fires after `from`.
fn check(recurrence: Recurrence, zone_name: &str, from: &str, expected: &[&str]) {
    let schedule = Schedule::new(recurrence, zone(zone_name));
    let got: Vec<String> = schedule
        .nominals_after(utc(from))
        .take(expected.len())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .collect();
    assert_eq!(got, expected, "{schedule} after {from}");
}

#[test]
fn a_missing_local_time_at_a_fixed_hour_fires_once_after_the_gap() {
    // 2027-03-14: New York skips 02:00–03:00 local.
    let daily = Recurrence::Daily { at: at("02:30") };
    check(
        daily,
        "America/New_York",
        "2027-03-13T12:00:00Z",
        &["2027-03-14T07:00:00Z", "2027-03-15T06:30:00Z"],
    );
    check(
        cron("0 30 2 * * *"),
        "America/New_York",
        "2027-03-13T12:00:00Z",
        &["2027-03-14T07:00:00Z", "2027-03-15T06:30:00Z"],
    );
}

#[test]
fn a_repeated_local_time_at_a_fixed_hour_fires_once_at_its_first_occurrence() {
    // 2027-11-07: New York repeats 01:00–02:00 local.
    check(
        Recurrence::Daily { at: at("01:30") },
        "America/New_York",
        "2027-11-06T12:00:00Z",
        &["2027-11-07T05:30:00Z", "2027-11-08T06:30:00Z"],
    );
    // Starting inside the repeated hour, after its first occurrence: no second fire.
    check(
        Recurrence::Daily { at: at("01:30") },
        "America/New_York",
        "2027-11-07T05:45:00Z",
        &["2027-11-08T06:30:00Z"],
    );
}

#[test]
fn wildcard_hours_follow_the_wall_clock() {
    // Spring forward: local 02:15 does not exist, so 01:15 EST is followed by 03:15 EDT.
    check(
        Recurrence::Hourly { minute: 15 },
        "America/New_York",
        "2027-03-14T06:00:00Z",
        &["2027-03-14T06:15:00Z", "2027-03-14T07:15:00Z"],
    );
    // Fall back: local 01:15 happens twice and fires twice.
    check(
        Recurrence::Hourly { minute: 15 },
        "America/New_York",
        "2027-11-07T04:30:00Z",
        &[
            "2027-11-07T05:15:00Z",
            "2027-11-07T06:15:00Z",
            "2027-11-07T07:15:00Z",
        ],
    );
    check(
        cron("0 15 * * * *"),
        "America/New_York",
        "2027-11-07T05:30:00Z",
        &["2027-11-07T06:15:00Z", "2027-11-07T07:15:00Z"],
    );
    // Every two hours: local 00:00, 02:00 (skipped), 04:00.
    check(
        cron("0 0 */2 * * *"),
        "America/New_York",
        "2027-03-14T04:30:00Z",
        &["2027-03-14T05:00:00Z", "2027-03-14T08:00:00Z"],
    );
}

#[test]
fn lord_howe_shifts_by_thirty_minutes() {
    // 2027-10-03 Lord Howe: 02:00 → 02:30 local (UTC+10:30 → +11).
    check(
        Recurrence::Daily { at: at("02:10") },
        "Australia/Lord_Howe",
        "2027-10-02T00:00:00Z",
        &["2027-10-02T15:30:00Z", "2027-10-03T15:10:00Z"],
    );
}

#[test]
fn monthly_day_31_fires_on_the_last_day_of_short_months() {
    check(
        Recurrence::Monthly {
            day: 31,
            at: at("09:00"),
        },
        "UTC",
        "2027-01-31T10:00:00Z",
        &[
            "2027-02-28T09:00:00Z",
            "2027-03-31T09:00:00Z",
            "2027-04-30T09:00:00Z",
        ],
    );
    check(
        Recurrence::Monthly {
            day: 30,
            at: at("09:00"),
        },
        "UTC",
        "2028-02-01T00:00:00Z",
        &["2028-02-29T09:00:00Z", "2028-03-30T09:00:00Z"],
    );
}

#[test]
fn weekly_and_biweekly() {
    check(
        Recurrence::Weekly {
            on: Weekday::Mon,
            at: at("09:00"),
        },
        "Europe/Berlin",
        "2027-01-01T00:00:00Z",
        &["2027-01-04T08:00:00Z", "2027-01-11T08:00:00Z"],
    );
    let anchor = NaiveDate::from_ymd_opt(2027, 1, 4).unwrap();
    // Before the anchor nothing fires; from it, every fourteen days.
    check(
        Recurrence::Biweekly {
            anchor,
            at: at("09:00"),
        },
        "UTC",
        "2026-12-01T00:00:00Z",
        &[
            "2027-01-04T09:00:00Z",
            "2027-01-18T09:00:00Z",
            "2027-02-01T09:00:00Z",
        ],
    );
}

#[test]
fn cron_accepts_five_six_and_seven_fields_and_knows_its_hour_kind() {
    assert!(CronSpec::parse("30 2 * * *").unwrap().has_fixed_hour());
    assert!(CronSpec::parse("0 30 2,14 * * *").unwrap().has_fixed_hour());
    assert!(
        CronSpec::parse("0 0 9-17 * * MON-FRI 2027")
            .unwrap()
            .has_fixed_hour()
    );
    assert!(!CronSpec::parse("0 0 */2 * * *").unwrap().has_fixed_hour());
    assert!(!CronSpec::parse("0 0 * * * *").unwrap().has_fixed_hour());
    for bad in ["", "* * *", "0 61 * * * *", "0 0 25 * * *", "a b c d e f"] {
        assert!(CronSpec::parse(bad).is_err(), "{bad:?}");
    }
    check(
        cron("30 2 * * *"),
        "UTC",
        "2027-01-01T00:00:00Z",
        &["2027-01-01T02:30:00Z"],
    );
}

#[test]
fn a_cron_for_an_impossible_date_never_fires() {
    let schedule = Schedule::new(cron("0 0 0 30 2 *"), Zone::UTC);
    assert_eq!(schedule.next_nominal(utc("2027-01-01T00:00:00Z")), None);
}

#[test]
fn jitter_is_deterministic_bounded_and_short_of_the_next_fire() {
    let mut schedule = Schedule::new(Recurrence::Hourly { minute: 0 }, Zone::UTC);
    schedule.jitter_seconds = 600;
    let nominal = utc("2027-01-01T10:00:00Z");
    let fire = schedule.fire_at("job-a", nominal);
    assert_eq!(fire, schedule.fire_at("job-a", nominal));
    assert!(fire >= nominal && fire <= nominal + Duration::seconds(600));
    let spread: std::collections::BTreeSet<_> = (0..50)
        .map(|i| schedule.fire_at(&format!("job-{i}"), nominal))
        .collect();
    assert!(spread.len() > 10, "jitter should spread jobs: {spread:?}");
    // Jitter larger than the interval stays before the next nominal fire.
    schedule.jitter_seconds = 10_000;
    for i in 0..50 {
        let fire = schedule.fire_at(&format!("job-{i}"), nominal);
        assert!(fire < nominal + Duration::hours(1));
    }
}

#[test]
fn upcoming_includes_a_jittered_fire_still_ahead() {
    let mut schedule = Schedule::new(Recurrence::Daily { at: at("00:00") }, Zone::UTC);
    schedule.jitter_seconds = 3600;
    let nominal = utc("2027-01-02T00:00:00Z");
    let fire = schedule.fire_at("k", nominal);
    if fire > nominal {
        let from = nominal + (fire - nominal) / 2;
        assert_eq!(schedule.upcoming("k", from, 1), vec![(nominal, fire)]);
    }
    let listed = schedule.upcoming("k", utc("2027-01-01T12:00:00Z"), 3);
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].0, nominal);
}

const ZONES: &[&str] = &[
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/Sao_Paulo",
    "Pacific/Chatham",
    "UTC",
];

fn any_zone() -> impl Strategy<Value = Zone> {
    proptest::sample::select(ZONES).prop_map(zone)
}

/// Instants between 2000 and 2036, where the zone database has exact rules.
fn any_instant() -> impl Strategy<Value = DateTime<Utc>> {
    (946_684_800_i64..2_082_758_400).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap())
}

fn any_time() -> impl Strategy<Value = TimeOfDay> {
    (0u32..24, 0u32..60).prop_map(|(h, m)| TimeOfDay::from_hm(h, m).unwrap())
}

fn any_recurrence() -> impl Strategy<Value = Recurrence> {
    prop_oneof![
        (0u32..60).prop_map(|minute| Recurrence::Hourly { minute }),
        any_time().prop_map(|at| Recurrence::Daily { at }),
        (0u8..7, any_time()).prop_map(|(d, at)| Recurrence::Weekly {
            on: Weekday::try_from(d).unwrap(),
            at
        }),
        (1u32..=31, any_time()).prop_map(|(day, at)| Recurrence::Monthly { day, at }),
        (0u32..60, 0u32..24).prop_map(|(m, h)| cron(&format!("0 {m} {h} * * *"))),
        (0u32..60).prop_map(|m| cron(&format!("0 {m} */3 * * *"))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn fire_times_strictly_increase(recurrence in any_recurrence(), zone in any_zone(), from in any_instant()) {
        let schedule = Schedule::new(recurrence, zone);
        let fires: Vec<_> = schedule.nominals_after(from).take(30).collect();
        prop_assert_eq!(fires.len(), 30);
        prop_assert!(fires[0] > from);
        for pair in fires.windows(2) {
            prop_assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn next_fire_is_the_first_fire_after_any_instant(recurrence in any_recurrence(), zone in any_zone(), from in any_instant(), step in 1i64..7200) {
        // Asking again from a point between two fires finds the later one, never skipping.
        let schedule = Schedule::new(recurrence, zone);
        let first = schedule.next_nominal(from).unwrap();
        let second = schedule.next_nominal(first).unwrap();
        let between = first + Duration::seconds(step).min((second - first) - Duration::seconds(1));
        prop_assert_eq!(schedule.next_nominal(between), Some(second));
        prop_assert_eq!(schedule.next_nominal(first - Duration::seconds(1)), Some(first));
    }

    #[test]
    fn a_daily_schedule_fires_once_per_local_day(at in any_time(), zone in any_zone(), from in any_instant()) {
        let schedule = Schedule::new(Recurrence::Daily { at }, zone);
        let tz = zone.tz();
        let days: Vec<NaiveDate> = schedule
            .nominals_after(from)
            .take(60)
            .map(|t| t.with_timezone(&tz).date_naive())
            .collect();
        for pair in days.windows(2) {
            prop_assert_eq!(pair[1], pair[0].succ_opt().unwrap(), "{:?}", days);
        }
    }

    #[test]
    fn a_daily_schedule_fires_once_on_both_transition_days(at in any_time(), zone in proptest::sample::select(&["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Pacific/Chatham"][..]).prop_map(zone), year in 2001i32..2036) {
        // Start a day before each DST transition of the year and check the following week.
        let tz = zone.tz();
        let schedule = Schedule::new(Recurrence::Daily { at }, zone);
        let mut transitions = Vec::new();
        let mut t = Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap();
        let mut offset = tz.offset_from_utc_datetime(&t.naive_utc());
        while t.year() == year {
            let next = t + Duration::hours(1);
            let next_offset = tz.offset_from_utc_datetime(&next.naive_utc());
            if next_offset != offset {
                transitions.push(next);
            }
            offset = next_offset;
            t = next;
        }
        prop_assert_eq!(transitions.len(), 2);
        for transition in transitions {
            let from = transition - Duration::days(2);
            let days: Vec<NaiveDate> = schedule
                .nominals_after(from)
                .take(5)
                .map(|t| t.with_timezone(&tz).date_naive())
                .collect();
            for pair in days.windows(2) {
                prop_assert_eq!(pair[1], pair[0].succ_opt().unwrap(), "{:?}", days);
            }
        }
    }

    #[test]
    fn cron_and_presets_agree(zone in any_zone(), from in any_instant(), at in any_time(), day in 0u8..7) {
        let (h, m) = (chrono::Timelike::hour(&at.naive()), chrono::Timelike::minute(&at.naive()));
        let pairs = [
            (Recurrence::Daily { at }, cron(&format!("0 {m} {h} * * *"))),
            (Recurrence::Hourly { minute: m }, cron(&format!("0 {m} * * * *"))),
            (
                Recurrence::Weekly { on: Weekday::try_from(day).unwrap(), at },
                // cron counts weekdays 1–7 from Sunday.
                cron(&format!("0 {m} {h} * * {}", Weekday::try_from(day).unwrap().num_days_from_sunday() + 1)),
            ),
            (Recurrence::Monthly { day: 1, at }, cron(&format!("0 {m} {h} 1 * *"))),
        ];
        for (preset, expression) in pairs {
            let a: Vec<_> = Schedule::new(preset.clone(), zone).nominals_after(from).take(10).collect();
            let b: Vec<_> = Schedule::new(expression.clone(), zone).nominals_after(from).take(10).collect();
            prop_assert_eq!(a, b, "{} vs {}", preset, expression);
        }
    }

    #[test]
    fn jitter_stays_inside_its_bound(recurrence in any_recurrence(), zone in any_zone(), from in any_instant(), jitter in 0u32..100_000, key in "[a-z]{1,12}") {
        let mut schedule = Schedule::new(recurrence, zone);
        schedule.jitter_seconds = jitter;
        let nominals: Vec<_> = schedule.nominals_after(from).take(5).collect();
        for pair in nominals.windows(2) {
            let fire = schedule.fire_at(&key, pair[0]);
            prop_assert!(fire >= pair[0]);
            prop_assert!(fire <= pair[0] + Duration::seconds(i64::from(jitter)));
            prop_assert!(fire < pair[1]);
        }
    }
}
