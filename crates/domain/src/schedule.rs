//! Schedules and their next-fire rule.
//!
//! A [`Schedule`] is a [`Recurrence`] (a cron expression or a frequency preset) read in an IANA
//! [`Zone`], with optional deterministic jitter. The recurrence yields *local* wall-clock
//! candidates; each candidate is then resolved to instants with the rule Vixie cron uses for
//! daylight saving time:
//!
//! * schedules at a **fixed hour** (daily, weekly, biweekly, monthly, and cron expressions whose
//!   hour field is a value, list or range) fire once per local occurrence: a local time that does
//!   not exist fires at the first valid instant after the gap, and a local time that occurs twice
//!   fires at its first occurrence;
//! * schedules with a **wildcard or stepped hour** (hourly, `0 15 * * * *`, `0 0 */2 * * *`)
//!   follow the wall clock: a skipped local time does not fire, and a repeated local time fires in
//!   both of its occurrences.

use std::fmt;
use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc, Weekday,
};

use crate::time::{TimeOfDay, Zone, weekday_name};

/// A cron expression with a seconds field (`sec min hour day-of-month month day-of-week [year]`).
///
/// Five-field expressions (`min hour dom month dow`) are accepted and fire at second 0. Day of
/// week counts 1–7 from Sunday (as in Quartz); names (`MON-FRI`) are clearer and accepted.
/// When both day fields are restricted, both must match.
#[derive(Debug, Clone)]
pub struct CronSpec {
    text: String,
    /// Shared: the parsed expression is large and schedules are cloned freely.
    schedule: std::sync::Arc<cron::Schedule>,
    fixed_hour: bool,
}

/// The text is not a cron expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a cron expression: {reason}")]
pub struct BadCron {
    /// The rejected expression.
    pub text: String,
    /// What the parser objected to.
    pub reason: String,
}

impl CronSpec {
    /// Parses a cron expression of 5, 6 or 7 fields.
    ///
    /// # Errors
    /// [`BadCron`] with the parser's reason.
    pub fn parse(text: &str) -> Result<Self, BadCron> {
        let bad = |reason: String| BadCron {
            text: text.to_owned(),
            reason,
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        let normalised = match fields.len() {
            5 => format!("0 {}", fields.join(" ")),
            6 | 7 => fields.join(" "),
            n => {
                return Err(bad(format!(
                    "has {n} fields, expected 6 (sec min hour day month weekday), 5 or 7 (with year)"
                )));
            }
        };
        let schedule = cron::Schedule::from_str(&normalised).map_err(|e| bad(e.to_string()))?;
        let hour_field = normalised.split_whitespace().nth(2).unwrap_or("*");
        let fixed_hour = !(hour_field.contains('*') || hour_field.contains('/'));
        Ok(CronSpec {
            text: text.to_owned(),
            schedule: std::sync::Arc::new(schedule),
            fixed_hour,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the hour field names fixed hours (value, list or range) rather than a wildcard or
    /// step; this selects the DST rule.
    pub fn has_fixed_hour(&self) -> bool {
        self.fixed_hour
    }
}

impl PartialEq for CronSpec {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for CronSpec {}

impl std::hash::Hash for CronSpec {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

/// What repeats, in local wall-clock terms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recurrence {
    /// A cron expression.
    Cron(CronSpec),
    /// Every hour at the given minute (0–59; larger values are read as 59).
    Hourly {
        /// Minute past the hour.
        minute: u32,
    },
    /// Every day at a time.
    Daily {
        /// Local time of day.
        at: TimeOfDay,
    },
    /// Every week on a weekday at a time.
    Weekly {
        /// The weekday.
        on: Weekday,
        /// Local time of day.
        at: TimeOfDay,
    },
    /// Every second week at a time, on the weekday of the anchor date, starting at the anchor.
    Biweekly {
        /// The first date that fires; its weekday is the weekday of every fire.
        anchor: NaiveDate,
        /// Local time of day.
        at: TimeOfDay,
    },
    /// Every month on a day at a time; a day past the end of a month fires on its last day.
    Monthly {
        /// Day of month, 1–31 (values outside are clamped).
        day: u32,
        /// Local time of day.
        at: TimeOfDay,
    },
}

impl Recurrence {
    /// Whether the DST rule for fixed hours applies (see the module documentation).
    pub fn has_fixed_hour(&self) -> bool {
        match self {
            Recurrence::Cron(spec) => spec.has_fixed_hour(),
            Recurrence::Hourly { .. } => false,
            _ => true,
        }
    }

    /// Local candidates strictly after `start`, in increasing order.
    fn candidates_after(
        &self,
        start: NaiveDateTime,
    ) -> Box<dyn Iterator<Item = NaiveDateTime> + '_> {
        let days_from = |at: TimeOfDay| {
            let first = if start.date().and_time(at.naive()) > start {
                start.date()
            } else {
                start.date() + Duration::days(1)
            };
            first.iter_days().map(move |date| date.and_time(at.naive()))
        };
        match self {
            Recurrence::Cron(spec) => Box::new(
                spec.schedule
                    .after(&start.and_utc())
                    .map(|instant| instant.naive_utc()),
            ),
            Recurrence::Hourly { minute } => {
                let minute = i64::from((*minute).min(59));
                let hour_start = start
                    .date()
                    .and_hms_opt(chrono::Timelike::hour(&start), 0, 0)
                    .unwrap_or(start);
                let mut first = hour_start + Duration::minutes(minute);
                if first <= start {
                    first += Duration::hours(1);
                }
                Box::new(std::iter::successors(Some(first), |t| {
                    t.checked_add_signed(Duration::hours(1))
                }))
            }
            Recurrence::Daily { at } => Box::new(days_from(*at)),
            Recurrence::Weekly { on, at } => {
                let on = *on;
                Box::new(days_from(*at).filter(move |t| t.weekday() == on))
            }
            Recurrence::Biweekly { anchor, at } => {
                let anchor = *anchor;
                Box::new(days_from(*at).filter(move |t| {
                    let days = (t.date() - anchor).num_days();
                    days >= 0 && days % 14 == 0
                }))
            }
            Recurrence::Monthly { day, at } => {
                let day = (*day).clamp(1, 31);
                Box::new(
                    days_from(*at).filter(move |t| t.day() == day.min(days_in_month(t.date()))),
                )
            }
        }
    }
}

/// The number of days in the month of `date`.
pub fn days_in_month(date: NaiveDate) -> u32 {
    let (year, month) = (date.year(), date.month());
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    };
    next.and_then(|n| n.pred_opt())
        .map_or(31, |last| last.day())
}

/// A recurrence in a time zone, with optional jitter: the complete description of when
/// something fires.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Schedule {
    /// What repeats.
    pub recurrence: Recurrence,
    /// The zone the recurrence is read in.
    pub zone: Zone,
    /// Upper bound of the deterministic delay added to each nominal instant, in seconds.
    pub jitter_seconds: u32,
}

/// The largest change of UTC offset around one instant that the search below allows for. Real
/// transitions move the clock by at most two hours; three leaves room.
const MAX_SHIFT: Duration = Duration::hours(3);

/// Bounds the search for one next fire (a cron expression firing every second walks at most
/// `MAX_SHIFT` worth of candidates before it reaches `after`).
const MAX_CANDIDATES: usize = 100_000;

impl Schedule {
    /// A schedule without jitter.
    pub fn new(recurrence: Recurrence, zone: Zone) -> Self {
        Schedule {
            recurrence,
            zone,
            jitter_seconds: 0,
        }
    }

    /// The first nominal fire instant strictly after `after`, or `None` when the recurrence
    /// never fires again (a cron expression for an impossible date, or past its last year).
    pub fn next_nominal(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let tz = self.zone.tz();
        let fixed = self.recurrence.has_fixed_hour();
        let local_after = after.with_timezone(&tz).naive_local();
        // Where a fall-back transition lies ahead, local times earlier than `local_after` can
        // still map to instants after `after` (the second occurrence of a repeated hour).
        let start = (after + MAX_SHIFT).with_timezone(&tz).naive_local() - MAX_SHIFT;
        let start = start.min(local_after) - Duration::seconds(1);
        let mut best: Option<DateTime<Utc>> = None;
        for candidate in self.recurrence.candidates_after(start).take(MAX_CANDIDATES) {
            let (first, second) = resolve(tz, candidate, fixed);
            // The first instant of a candidate never decreases from one candidate to the next,
            // so once it reaches the best instant found, nothing later can beat it.
            if let (Some(best), Some(first)) = (best, first)
                && first >= best
            {
                break;
            }
            for instant in [first, second].into_iter().flatten() {
                if instant > after && best.is_none_or(|b| instant < b) {
                    best = Some(instant);
                }
            }
        }
        best
    }

    /// Successive nominal fire instants strictly after `after`.
    pub fn nominals_after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        std::iter::successors(self.next_nominal(after), |last| self.next_nominal(*last))
    }

    /// The instant an occurrence at `nominal` actually fires for `key` (usually the job id):
    /// `nominal` plus a delay in `0..=jitter_seconds` derived from a hash of `key` and
    /// `nominal`, so every replica computes the same instant. The delay never reaches the next
    /// nominal instant.
    pub fn fire_at(&self, key: &str, nominal: DateTime<Utc>) -> DateTime<Utc> {
        if self.jitter_seconds == 0 {
            return nominal;
        }
        let mut hasher = Fnv1a::default();
        hasher.write(key.as_bytes());
        hasher.write(&nominal.timestamp().to_le_bytes());
        let mut delay = i64::try_from(hasher.0 % (u64::from(self.jitter_seconds) + 1)).unwrap_or(0);
        if let Some(next) = self.next_nominal(nominal) {
            delay = delay.min((next - nominal).num_seconds() - 1).max(0);
        }
        nominal + Duration::seconds(delay)
    }

    /// The next `count` fire instants (jitter applied) after `from`, with their nominal
    /// instants: `(nominal, fire)`. A nominal instant at or before `from` whose jittered fire is
    /// still after `from` is included.
    pub fn upcoming(
        &self,
        key: &str,
        from: DateTime<Utc>,
        count: usize,
    ) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let lookback = from - Duration::seconds(i64::from(self.jitter_seconds));
        self.nominals_after(lookback)
            .map(|nominal| (nominal, self.fire_at(key, nominal)))
            .filter(|(_, fire)| *fire > from)
            .take(count)
            .collect()
    }
}

/// Resolves one local candidate to its instants with the DST rule: `(first, second)`, where
/// `second` is the later occurrence of a repeated local time under the wall-clock rule.
fn resolve(
    tz: chrono_tz::Tz,
    local: NaiveDateTime,
    fixed_hour: bool,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => (Some(t.with_timezone(&Utc)), None),
        LocalResult::Ambiguous(a, b) => {
            let (a, b) = (a.with_timezone(&Utc), b.with_timezone(&Utc));
            let (early, late) = if a <= b { (a, b) } else { (b, a) };
            (Some(early), (!fixed_hour).then_some(late))
        }
        LocalResult::None if fixed_hour => (first_instant_after_gap(tz, local), None),
        LocalResult::None => (None, None),
    }
}

/// The first instant whose local time is after the gap that contains `local`: the instant the
/// clocks jumped. Found by walking minutes, then narrowing to the second (historic zones moved
/// their clocks by odd seconds).
fn first_instant_after_gap(tz: chrono_tz::Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let exists = |t: NaiveDateTime| tz.from_local_datetime(&t).earliest();
    let mut minute = local;
    for _ in 0..(48 * 60) {
        minute += Duration::minutes(1);
        if exists(minute).is_some() {
            // Narrow between the last missing minute and the first existing one.
            let (mut lo, mut hi) = (minute - Duration::minutes(1), minute);
            while (hi - lo).num_seconds() > 1 {
                let mid = lo + Duration::seconds((hi - lo).num_seconds() / 2);
                if exists(mid).is_some() {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            return exists(hi).map(|t| t.with_timezone(&Utc));
        }
    }
    None
}

/// 64-bit FNV-1a: a tiny hash that, unlike `std`'s, is specified and so stable across Rust
/// releases and machines. Jitter must be identical on every replica.
#[derive(Debug)]
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl fmt::Display for Recurrence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recurrence::Cron(spec) => write!(f, "cron \"{}\"", spec.as_str()),
            Recurrence::Hourly { minute } => write!(f, "hourly at :{minute:02}"),
            Recurrence::Daily { at } => write!(f, "daily at {at}"),
            Recurrence::Weekly { on, at } => write!(f, "weekly on {} at {at}", weekday_name(*on)),
            Recurrence::Biweekly { anchor, at } => write!(
                f,
                "every second {} at {at} from {anchor}",
                weekday_name(anchor.weekday())
            ),
            Recurrence::Monthly { day, at } if *day >= 29 => {
                write!(f, "monthly on day {day} (or the month's last day) at {at}")
            }
            Recurrence::Monthly { day, at } => write!(f, "monthly on day {day} at {at}"),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.recurrence, self.zone)?;
        if self.jitter_seconds > 0 {
            write!(f, " (jitter up to {}s)", self.jitter_seconds)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
