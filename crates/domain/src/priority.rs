//! Priorities and aging: the order in which due work gets the limited run slots.

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, Duration, Utc};

use std::collections::HashMap;

use crate::ids::{JobId, TenantId};

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

/// Width of a priority band, in effective priority points. Work in a higher band always goes
/// first; within one band, slots are shared across tenants (see [`fair_order`]).
pub const BAND_WIDTH: u32 = 10;

/// One piece of work waiting for a run slot, as [`fair_order`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Its base priority.
    pub base: Priority,
    /// Since when it has been due.
    pub due: DateTime<Utc>,
    /// Its job.
    pub job: JobId,
    /// Its tenant.
    pub tenant: TenantId,
}

/// One tenant's waiting work in [`fair_order`]: the tenant, its load so far, and its queue
/// sorted worst first (with indices into the input).
type TenantQueue<'a> = (&'a TenantId, usize, Vec<(QueueKey, usize)>);

/// The order in which to give slots to `waiting` at `now`, as indices into it. The next slot
/// goes to the work with the highest effective priority band ([`BAND_WIDTH`] points of
/// base + aging); within that band, to the tenant with the least load — its count in `load`
/// (runs running or started recently) plus the work ordered before — and within that tenant,
/// by [`QueueKey`]. So a tenant with ten
/// times the due work of another gets no more slots than it while both have work, and aging
/// lifts starved low-priority work into higher bands.
pub fn fair_order(
    waiting: &[Waiting],
    load: &HashMap<TenantId, usize>,
    now: DateTime<Utc>,
    aging: Aging,
) -> Vec<usize> {
    let mut queues: HashMap<&TenantId, Vec<(QueueKey, usize)>> = HashMap::new();
    for (index, work) in waiting.iter().enumerate() {
        queues.entry(&work.tenant).or_default().push((
            QueueKey::at(work.base, work.due, work.job.clone(), now, aging),
            index,
        ));
    }
    // Each tenant's queue is sorted worst first, so its best is popped from the end.
    let mut queues: Vec<TenantQueue<'_>> = queues
        .into_iter()
        .map(|(tenant, mut queue)| {
            queue.sort_by(|a, b| b.cmp(a));
            (tenant, load.get(tenant).copied().unwrap_or(0), queue)
        })
        .collect();
    queues.sort_by(|a, b| a.0.cmp(b.0));
    let mut order = Vec::with_capacity(waiting.len());
    loop {
        let best = queues
            .iter()
            .enumerate()
            .filter_map(|(at, (tenant, busy, queue))| {
                queue.last().map(|(key, _)| (at, *tenant, *busy, key))
            })
            .min_by(|a, b| {
                (b.3.effective / BAND_WIDTH)
                    .cmp(&(a.3.effective / BAND_WIDTH))
                    .then(a.2.cmp(&b.2))
                    .then_with(|| a.3.cmp(b.3))
                    .then_with(|| a.1.cmp(b.1))
            })
            .map(|(at, ..)| at);
        let Some(at) = best else { break };
        let (_, busy, queue) = &mut queues[at];
        if let Some((_, index)) = queue.pop() {
            order.push(index);
            *busy += 1;
        }
    }
    order
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

    fn waiting(tenant: &str, job: &str, base: Priority, due: DateTime<Utc>) -> Waiting {
        Waiting {
            base,
            due,
            job: JobId::parse(job).unwrap(),
            tenant: TenantId::parse(tenant).unwrap(),
        }
    }

    fn tenants_in_order(work: &[Waiting], order: &[usize]) -> String {
        order
            .iter()
            .map(|i| &work[*i].tenant.as_str()[..1])
            .collect()
    }

    #[test]
    fn two_tenants_with_ten_to_one_due_work_take_turns() {
        let now = DateTime::parse_from_rfc3339("2027-01-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let mut work: Vec<Waiting> = (0..100)
            .map(|i| {
                waiting(
                    "alpha",
                    &format!("a{i:03}"),
                    Priority::NORMAL,
                    now - Duration::seconds(30),
                )
            })
            .collect();
        work.extend((0..10).map(|i| waiting("beta", &format!("b{i:03}"), Priority::NORMAL, now)));
        let order = fair_order(&work, &HashMap::new(), now, Aging::default());
        assert_eq!(order.len(), 110);
        let tenants = tenants_in_order(&work, &order);
        assert_eq!(&tenants[..20], "abababababababababab");
        assert!(tenants[20..].chars().all(|t| t == 'a'));
        // Within a tenant, queue order holds.
        let alpha: Vec<&str> = order
            .iter()
            .map(|i| work[*i].job.as_str())
            .filter(|j| j.starts_with('a'))
            .collect();
        let mut sorted = alpha.clone();
        sorted.sort_unstable();
        assert_eq!(alpha, sorted);
    }

    #[test]
    fn a_tenant_already_running_more_waits_for_the_other() {
        let now = DateTime::parse_from_rfc3339("2027-01-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let work = vec![
            waiting("alpha", "a1", Priority::NORMAL, now - Duration::seconds(50)),
            waiting("alpha", "a2", Priority::NORMAL, now - Duration::seconds(50)),
            waiting("beta", "b1", Priority::NORMAL, now),
            waiting("beta", "b2", Priority::NORMAL, now),
        ];
        let running = HashMap::from([(TenantId::parse("alpha").unwrap(), 3)]);
        let order = fair_order(&work, &running, now, Aging::default());
        assert_eq!(tenants_in_order(&work, &order), "bbaa");
    }

    #[test]
    fn a_higher_band_goes_before_fairness_and_aging_lifts_low_work_into_it() {
        let now = DateTime::parse_from_rfc3339("2027-01-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let fresh_low = waiting("beta", "low", Priority::LOW, now);
        let high = waiting("alpha", "high", Priority::HIGH, now);
        let high2 = waiting("alpha", "high2", Priority::HIGH, now);
        let order = fair_order(
            &[fresh_low.clone(), high.clone(), high2.clone()],
            &HashMap::new(),
            now,
            Aging::default(),
        );
        assert_eq!(order, [1, 2, 0], "band beats tenant fairness");
        let old_low = Waiting {
            due: now - Duration::minutes(52),
            ..fresh_low
        };
        let order = fair_order(
            &[old_low, high, high2],
            &HashMap::new(),
            now,
            Aging::default(),
        );
        assert_eq!(
            order,
            [0, 1, 2],
            "aged into the same band, the other tenant goes first"
        );
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

        #[test]
        fn fair_order_is_a_permutation(spec in proptest::collection::vec((0usize..4, 0u64..=100, 0i64..600), 0..60)) {
            let now = DateTime::parse_from_rfc3339("2027-01-01T12:00:00Z").unwrap().to_utc();
            let work: Vec<Waiting> = spec.iter().enumerate().map(|(i, (tenant, base, ago))| waiting(
                &format!("t{tenant}"), &format!("j{i}"), Priority::new(*base).unwrap(), now - Duration::minutes(*ago),
            )).collect();
            let mut order = fair_order(&work, &HashMap::new(), now, Aging::default());
            order.sort_unstable();
            prop_assert_eq!(order, (0..work.len()).collect::<Vec<_>>());
        }
    }
}
