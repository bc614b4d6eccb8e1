//! Priorities and aging: the order in which due work gets the limited run slots.

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, Duration, Utc};

use crate::ids::JobId;

/// A base priority from 0 (lowest) to 100 (highest). The names map to fixed points:
/// `low` = 25, `normal` = 50, `high` = 75, `critical` = 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(u8);

/// The value is not a priority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a priority (critical, high, normal, low, or a number 0-100)")]
pub struct BadPriority(pub String);

impl Priority {
    /// The lowest named priority.
    pub const LOW: Priority = Priority(25);
    /// The default priority.
    pub const NORMAL: Priority = Priority(50);
    /// Above normal.
    pub const HIGH: Priority = Priority(75);
    /// The highest priority.
    pub const CRITICAL: Priority = Priority(100);

    /// A numeric priority.
    ///
    /// # Errors
    /// [`BadPriority`] above 100.
    pub fn new(value: u64) -> Result<Self, BadPriority> {
        u8::try_from(value)
            .ok()
            .filter(|v| *v <= 100)
            .map(Priority)
            .ok_or_else(|| BadPriority(value.to_string()))
    }

    /// A named priority (`critical`, `high`, `normal`, `low`, any case).
    ///
    /// # Errors
    /// [`BadPriority`] for any other name.
    pub fn from_name(name: &str) -> Result<Self, BadPriority> {
        match name.to_ascii_lowercase().as_str() {
            "critical" => Ok(Priority::CRITICAL),
            "high" => Ok(Priority::HIGH),
            "normal" => Ok(Priority::NORMAL),
            "low" => Ok(Priority::LOW),
            _ => Err(BadPriority(format!("{name:?}"))),
        }
    }

    /// The numeric value, 0–100.
    pub fn value(&self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::NORMAL
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Priority::CRITICAL => f.write_str("critical"),
            Priority::HIGH => f.write_str("high"),
            Priority::NORMAL => f.write_str("normal"),
            Priority::LOW => f.write_str("low"),
            Priority(n) => write!(f, "{n}"),
        }
    }
}

/// How waiting raises priority: one point per `interval` waited, at most `cap` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aging {
    /// Waiting time worth one priority point (at least one second).
    pub interval: Duration,
    /// The most points waiting can add.
    pub cap: u32,
}

impl Default for Aging {
    /// One point a minute, up to 100: a `low` job that has waited 75 minutes ties a fresh
    /// `critical` one, and overtakes it by its earlier due time.
    fn default() -> Self {
        Aging {
            interval: Duration::minutes(1),
            cap: 100,
        }
    }
}

/// The effective priority of work with base priority `base` that has been due for `waited`:
/// `base + min(waited / interval, cap)`. Monotone (never decreasing) in `waited`; a negative
/// wait counts as zero.
pub fn effective_priority(base: Priority, waited: Duration, aging: Aging) -> u32 {
    let interval = aging.interval.num_seconds().max(1);
    let points = (waited.num_seconds().max(0) / interval).min(i64::from(aging.cap));
    u32::from(base.0) + u32::try_from(points).unwrap_or(aging.cap)
}

/// The ordering key of one piece of due work at a given moment. Sorting keys in ascending
/// order yields the order to start work in: higher effective priority first, then earlier
/// due time, then job id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKey {
    /// The effective priority at the moment of ordering.
    pub effective: u32,
    /// When the work became due.
    pub due: DateTime<Utc>,
    /// The job, for a total order.
    pub job: JobId,
}

impl QueueKey {
    /// The key of work with base priority `base` due at `due`, ordered at `now`.
    pub fn at(
        base: Priority,
        due: DateTime<Utc>,
        job: JobId,
        now: DateTime<Utc>,
        aging: Aging,
    ) -> Self {
        QueueKey {
            effective: effective_priority(base, now - due, aging),
            due,
            job,
        }
    }
}

impl Ord for QueueKey {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .effective
            .cmp(&self.effective)
            .then_with(|| self.due.cmp(&other.due))
            .then_with(|| self.job.cmp(&other.job))
    }
}

impl PartialOrd for QueueKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(base: Priority, waited_minutes: i64, expected: u32) {
        assert_eq!(
            effective_priority(base, Duration::minutes(waited_minutes), Aging::default()),
            expected,
            "{base} after {waited_minutes} min"
        );
    }

    #[test]
    fn aging_adds_a_point_per_interval_up_to_the_cap() {
        check(Priority::LOW, 0, 25);
        check(Priority::LOW, -5, 25);
        check(Priority::LOW, 10, 35);
        check(Priority::LOW, 1_000, 125);
        check(Priority::CRITICAL, 1_000, 200);
    }

    #[test]
    fn names_and_numbers_parse() {
        assert_eq!(Priority::from_name("Critical").unwrap(), Priority::CRITICAL);
        assert_eq!(Priority::new(42).unwrap().value(), 42);
        assert!(Priority::new(101).is_err());
        assert!(Priority::from_name("urgent").is_err());
    }

    #[test]
    fn a_low_job_that_waited_long_enough_overtakes_a_fresh_critical_one() {
        let now = DateTime::parse_from_rfc3339("2027-01-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let aging = Aging::default();
        let old_low = QueueKey::at(
            Priority::LOW,
            now - Duration::minutes(76),
            JobId::parse("b").unwrap(),
            now,
            aging,
        );
        let fresh_critical = QueueKey::at(
            Priority::CRITICAL,
            now,
            JobId::parse("a").unwrap(),
            now,
            aging,
        );
        let mut queue = vec![fresh_critical.clone(), old_low.clone()];
        queue.sort();
        assert_eq!(queue, vec![old_low, fresh_critical]);
    }

    #[test]
    fn ties_break_by_due_time_then_job_id() {
        let now = DateTime::parse_from_rfc3339("2027-01-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let due = now - Duration::seconds(30);
        let key = |job: &str, due| {
            QueueKey::at(
                Priority::NORMAL,
                due,
                JobId::parse(job).unwrap(),
                now,
                Aging::default(),
            )
        };
        let mut queue = [
            key("b", due),
            key("a", due),
            key("c", due - Duration::seconds(10)),
        ];
        queue.sort();
        let order: Vec<&str> = queue.iter().map(|k| k.job.as_str()).collect();
        assert_eq!(order, ["c", "a", "b"]);
    }

    proptest! {
        #[test]
        fn effective_priority_is_monotone_and_capped(base in 0u64..=100, a in -10_000i64..1_000_000, b in -10_000i64..1_000_000, interval in 1i64..10_000, cap in 0u32..1_000) {
            let aging = Aging { interval: Duration::seconds(interval), cap };
            let base = Priority::new(base).unwrap();
            let (short, long) = if a <= b { (a, b) } else { (b, a) };
            let p_short = effective_priority(base, Duration::seconds(short), aging);
            let p_long = effective_priority(base, Duration::seconds(long), aging);
            prop_assert!(p_short <= p_long);
            prop_assert!(p_long <= u32::from(base.value()) + cap);
        }
    }
}
