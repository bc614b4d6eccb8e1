use chrono::{DateTime, Utc, Weekday};
use proptest::prelude::*;

use super::*;

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn preference(
    user: &str,
    frequency: Option<Frequency>,
    time: Option<&str>,
    zone: Option<&str>,
) -> Preference {
    Preference {
        tenant: TenantId::parse("acme").unwrap(),
        user: UserId::parse(user).unwrap(),
        feature_type: FeatureType::parse("digest").unwrap(),
        frequency,
        time_of_day: time.map(|t| TimeOfDay::parse(t).unwrap()),
        time_zone: zone.map(str::to_owned),
        weekday: None,
        day_of_month: None,
        template_override: None,
        parameters: serde_json::Map::new(),
        enabled: true,
        version: 1,
    }
}

fn defaults(zone: &str, at: &str) -> PreferenceDefaults {
    PreferenceDefaults {
        schedule: Some(Schedule::new(
            Recurrence::Daily {
                at: TimeOfDay::parse(at).unwrap(),
            },
            Zone::parse(zone).unwrap(),
        )),
        ..PreferenceDefaults::default()
    }
}

fn users(group: &FireGroup) -> Vec<&str> {
    group.users.iter().map(UserId::as_str).collect()
}

#[test]
fn users_firing_at_the_same_instant_share_a_group_whatever_their_zone() {
    let daily = Some(Frequency::Daily);
    let prefs = vec![
        preference("berlin", daily, Some("09:00"), Some("Europe/Berlin")),
        preference("london", daily, Some("08:00"), Some("Europe/London")),
        preference("kolkata", daily, Some("13:30"), Some("Asia/Kolkata")),
        preference("ny", daily, Some("09:00"), Some("America/New_York")),
        preference("off", daily, Some("09:00"), Some("Europe/Berlin")),
    ];
    let mut prefs = prefs;
    prefs[4].enabled = false;
    let grouping = group_by_next_fire(
        &prefs,
        &PreferenceDefaults::default(),
        utc("2027-01-10T00:00:00Z"),
    );
    assert_eq!(grouping.groups.len(), 2);
    assert_eq!(grouping.groups[0].at, utc("2027-01-10T08:00:00Z"));
    assert_eq!(users(&grouping.groups[0]), ["berlin", "kolkata", "london"]);
    assert_eq!(grouping.groups[1].at, utc("2027-01-10T14:00:00Z"));
    assert_eq!(users(&grouping.groups[1]), ["ny"]);
    assert_eq!(grouping.disabled, vec![UserId::parse("off").unwrap()]);
    assert!(grouping.fallbacks.is_empty());
}

#[test]
fn a_bad_or_missing_zone_falls_back_to_the_job_default_then_utc() {
    let prefs = vec![
        preference(
            "bad",
            Some(Frequency::Daily),
            Some("09:00"),
            Some("Mars/Base"),
        ),
        preference("none", Some(Frequency::Daily), Some("09:00"), None),
    ];
    let after = utc("2027-01-10T00:00:00Z");
    let grouping = group_by_next_fire(&prefs, &defaults("Europe/Berlin", "07:00"), after);
    assert_eq!(grouping.groups.len(), 1, "{grouping:?}");
    assert_eq!(grouping.groups[0].at, utc("2027-01-10T08:00:00Z"));
    assert_eq!(grouping.fallbacks.len(), 1);
    assert_eq!(grouping.fallbacks[0].user.as_str(), "bad");
    assert!(
        grouping.fallbacks[0].reason.contains("Europe/Berlin"),
        "{:?}",
        grouping.fallbacks
    );

    let grouping = group_by_next_fire(&prefs, &PreferenceDefaults::default(), after);
    assert_eq!(grouping.groups[0].at, utc("2027-01-10T09:00:00Z"));
    assert!(grouping.fallbacks[0].reason.contains("UTC"));
}

#[test]
fn missing_fields_come_from_the_defaults() {
    let after = utc("2027-01-10T00:00:00Z");
    let d = defaults("Europe/Berlin", "07:00");
    // Nothing set: the default schedule.
    let (s, _) = preference("a", None, None, None).schedule(&d);
    assert_eq!(
        s.unwrap().next_nominal(after),
        Some(utc("2027-01-10T06:00:00Z"))
    );
    // Only a zone: still the default schedule but with the user's zone? No: the zone applies
    // to the default recurrence.
    let (s, _) = preference("b", None, None, Some("UTC")).schedule(&d);
    assert_eq!(
        s.unwrap().next_nominal(after),
        Some(utc("2027-01-10T07:00:00Z"))
    );
    // Weekly without a weekday fires on Mondays; 2027-01-11 is a Monday.
    let (s, _) = preference("c", Some(Frequency::Weekly), None, Some("UTC")).schedule(&d);
    assert_eq!(
        s.unwrap().next_nominal(after),
        Some(utc("2027-01-11T07:00:00Z"))
    );
    let mut monthly = preference("d", Some(Frequency::Monthly), Some("10:00"), Some("UTC"));
    monthly.day_of_month = Some(31);
    let (s, _) = monthly.schedule(&d);
    assert_eq!(
        s.unwrap().next_nominal(utc("2027-02-01T00:00:00Z")),
        Some(utc("2027-02-28T10:00:00Z"))
    );
    let mut weekly = preference("e", Some(Frequency::Biweekly), Some("10:00"), Some("UTC"));
    weekly.weekday = Some(Weekday::Fri);
    let (s, _) = weekly.schedule(&d);
    let fires: Vec<_> = s.unwrap().nominals_after(after).take(2).collect();
    assert_eq!(fires[1] - fires[0], chrono::Duration::days(14));
    // No frequency anywhere: unscheduled.
    let grouping = group_by_next_fire(
        &[preference("f", None, None, None)],
        &PreferenceDefaults::default(),
        after,
    );
    assert_eq!(grouping.unscheduled.len(), 1);
    assert!(grouping.groups.is_empty());
}

#[test]
fn a_changed_preference_moves_the_user_to_another_group() {
    let after = utc("2027-01-10T00:00:00Z");
    let mut prefs = vec![
        preference("a", Some(Frequency::Daily), Some("09:00"), Some("UTC")),
        preference("b", Some(Frequency::Daily), Some("09:00"), Some("UTC")),
    ];
    let before = group_by_next_fire(&prefs, &PreferenceDefaults::default(), after);
    assert_eq!(before.groups.len(), 1);
    prefs[1].time_of_day = Some(TimeOfDay::parse("18:00").unwrap());
    prefs[1].version += 1;
    let moved = group_by_next_fire(&prefs, &PreferenceDefaults::default(), after);
    assert_eq!(moved.groups.len(), 2);
    assert_eq!(users(&moved.groups[0]), ["a"]);
    assert_eq!(users(&moved.groups[1]), ["b"]);
    assert_eq!(moved.groups[1].at, utc("2027-01-10T18:00:00Z"));
}

fn any_preference() -> impl Strategy<Value = Preference> {
    let zones = prop::sample::select(
        &[
            "Europe/Berlin",
            "America/New_York",
            "Asia/Kolkata",
            "Pacific/Chatham",
            "Not/AZone",
            "",
        ][..],
    );
    let frequencies = prop::option::of(prop::sample::select(
        &[
            Frequency::Hourly,
            Frequency::Daily,
            Frequency::Weekly,
            Frequency::Biweekly,
            Frequency::Monthly,
        ][..],
    ));
    (
        "[a-z]{1,8}",
        frequencies,
        prop::option::of((0u32..24, 0u32..4)),
        zones,
        any::<bool>(),
        0u8..7,
        1u32..=31,
    )
        .prop_map(|(user, frequency, time, zone, enabled, weekday, day)| {
            let mut p = preference(&user, frequency, None, Some(zone));
            p.time_of_day = time.map(|(h, q)| TimeOfDay::from_hm(h, q * 15).unwrap());
            p.enabled = enabled;
            p.weekday = Some(Weekday::try_from(weekday).unwrap());
            p.day_of_month = Some(day);
            p
        })
}

proptest! {
    #[test]
    fn every_enabled_user_is_in_exactly_the_group_of_its_own_next_fire(
        prefs in prop::collection::vec(any_preference(), 0..60),
        from in 946_684_800_i64..2_000_000_000,
    ) {
        let after = DateTime::from_timestamp(from, 0).unwrap();
        let d = defaults("Europe/Berlin", "07:00");
        let grouping = group_by_next_fire(&prefs, &d, after);
        let mut placed = 0;
        for group in &grouping.groups {
            prop_assert!(group.at > after);
            prop_assert!(!group.users.is_empty());
            placed += group.users.len();
        }
        let enabled = prefs.iter().filter(|p| p.enabled).count();
        prop_assert_eq!(placed + grouping.unscheduled.len(), enabled);
        prop_assert_eq!(grouping.disabled.len(), prefs.len() - enabled);
        for pair in grouping.groups.windows(2) {
            prop_assert!(pair[0].at < pair[1].at);
        }
        for p in prefs.iter().filter(|p| p.enabled) {
            let own = p.schedule(&d).0.and_then(|s| s.next_nominal(after)).unwrap();
            let group = grouping.groups.iter().find(|g| g.at == own).unwrap();
            prop_assert!(group.users.contains(&p.user));
        }
    }
}
