//! Which nominal instants of a schedule to fire at a tick, given when it last fired and the
//! job's misfire policy — the pure heart of the scheduler.
//!
//! A fire is *on time* when the tick comes at most [`ON_TIME`] after its (jittered) fire
//! instant; older due fires were *missed* (the service was down or overloaded). Missed fires
//! follow the policy: `skip` drops them, `fire_once` fires the most recent due fire once in
//! place of all of them, `catch_up` fires each one whose fire instant lies inside the window,
//! oldest first. A tick that finds only fires on time due (it comes a little late, after a
//! slow tick or a short restart) fires each of them under every policy.

use chrono::{DateTime, Duration, Utc};

use crate::config::Misfire;
use crate::schedule::Schedule;

/// How late a tick may come and still count a fire as on time.
pub const ON_TIME: Duration = Duration::seconds(60);

/// At most this many due instants are examined in one tick (a schedule firing every second
/// after a week of downtime has 604 800); past that only the latest ones count.
pub const MAX_DUE: usize = 100_000;

/// What a tick does for one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// Nominal instants to create occurrences for, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Due instants that were dropped by the policy.
    pub dropped: usize,
    /// The schedule's next nominal instant after this tick.
    pub next: Option<DateTime<Utc>>,
}

/// Decides the fires of `schedule` (jitter keyed by `key`) at `now`, for a schedule whose next
/// unfired nominal instant is `next`.
pub fn due_fires(
    schedule: &Schedule,
    key: &str,
    next: DateTime<Utc>,
    now: DateTime<Utc>,
    misfire: Misfire,
) -> Due {
    let mut due = std::collections::VecDeque::new();
    let mut cursor = Some(next);
    while let Some(nominal) = cursor {
        if schedule.fire_at(key, nominal) > now {
            break;
        }
        due.push_back(nominal);
        if due.len() > MAX_DUE {
            due.pop_front();
        }
        cursor = schedule.next_nominal(nominal);
    }
    let total = due.len();
    let on_time = |n: &DateTime<Utc>| now - schedule.fire_at(key, *n) <= ON_TIME;
    let fire: Vec<DateTime<Utc>> = match misfire {
        Misfire::Skip => due.into_iter().filter(on_time).collect(),
        // Nothing missed: nothing to fire once in place of.
        Misfire::FireOnce if due.iter().all(on_time) => due.into_iter().collect(),
        Misfire::FireOnce => due.back().copied().into_iter().collect(),
        Misfire::CatchUp { window } => {
            let window = Duration::from_std(window).unwrap_or(Duration::MAX);
            due.into_iter()
                .filter(|n| on_time(n) || now - schedule.fire_at(key, *n) <= window)
                .collect()
        }
    };
    Due {
        dropped: total - fire.len(),
        fire,
        next: cursor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Recurrence;
    use crate::time::Zone;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn hourly() -> Schedule {
        Schedule::new(Recurrence::Hourly { minute: 0 }, Zone::UTC)
    }

    fn check(misfire: Misfire, now: &str, fire: &[&str], dropped: usize) {
        let due = due_fires(
            &hourly(),
            "job",
            utc("2027-01-01T10:00:00Z"),
            utc(now),
            misfire,
        );
        let got: Vec<String> = due
            .fire
            .iter()
            .map(|t| t.format("%H:%M").to_string())
            .collect();
        assert_eq!(
            (got, due.dropped),
            (fire.iter().map(|s| s.to_string()).collect(), dropped),
            "{misfire:?} at {now}"
        );
    }

    #[test]
    fn nothing_is_due_before_its_time() {
        let due = due_fires(
            &hourly(),
            "job",
            utc("2027-01-01T10:00:00Z"),
            utc("2027-01-01T09:59:59Z"),
            Misfire::Skip,
        );
        assert_eq!(
            due,
            Due {
                fire: vec![],
                dropped: 0,
                next: Some(utc("2027-01-01T10:00:00Z"))
            }
        );
    }

    #[test]
    fn an_on_time_tick_fires_under_every_policy() {
        for policy in [
            Misfire::Skip,
            Misfire::FireOnce,
            Misfire::CatchUp {
                window: std::time::Duration::from_secs(1),
            },
        ] {
            check(policy, "2027-01-01T10:00:30Z", &["10:00"], 0);
        }
    }

    #[test]
    fn a_late_tick_fires_every_fire_still_on_time_under_every_policy() {
        // A schedule every 2 s and a tick 3 s late (the previous tick was slow): 10:00:00 and
        // 10:00:02 are both on time, and fire_once used to drop the first.
        let every_2s = Schedule::new(
            Recurrence::Cron(crate::schedule::CronSpec::parse("*/2 * * * * *").unwrap()),
            Zone::UTC,
        );
        for policy in [
            Misfire::Skip,
            Misfire::FireOnce,
            Misfire::CatchUp {
                window: std::time::Duration::from_secs(1),
            },
        ] {
            let due = due_fires(
                &every_2s,
                "job",
                utc("2027-01-01T10:00:00Z"),
                utc("2027-01-01T10:00:03Z"),
                policy,
            );
            assert_eq!(
                (due.fire, due.dropped),
                (
                    vec![utc("2027-01-01T10:00:00Z"), utc("2027-01-01T10:00:02Z")],
                    0
                ),
                "{policy:?}"
            );
        }
        // Missed fires next to one on time: the most recent fire takes the place of them all.
        check(Misfire::FireOnce, "2027-01-01T13:00:10Z", &["13:00"], 3);
    }

    #[test]
    fn after_downtime_each_policy_does_what_it_says() {
        // Down from before 10:00 until 13:30: 10:00, 11:00, 12:00 and 13:00 were missed.
        check(Misfire::Skip, "2027-01-01T13:30:00Z", &[], 4);
        check(Misfire::FireOnce, "2027-01-01T13:30:00Z", &["13:00"], 3);
        check(
            Misfire::CatchUp {
                window: std::time::Duration::from_secs(2 * 3600),
            },
            "2027-01-01T13:30:00Z",
            &["12:00", "13:00"],
            2,
        );
        // Back just in time for 13:00: it is on time, the rest follow the policy.
        check(Misfire::Skip, "2027-01-01T13:00:10Z", &["13:00"], 3);
        let due = due_fires(
            &hourly(),
            "job",
            utc("2027-01-01T10:00:00Z"),
            utc("2027-01-01T13:30:00Z"),
            Misfire::Skip,
        );
        assert_eq!(due.next, Some(utc("2027-01-01T14:00:00Z")));
    }
}
