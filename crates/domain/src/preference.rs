//! User preferences of Dynamic jobs and their grouping into fire groups.
//!
//! A preference says when and how one user wants the output of one feature type. Users of one
//! Dynamic job are grouped by the instant their next occurrence fires: every user in a group
//! fires together, as one occurrence of the job. When a user's time zone is missing or not a
//! valid IANA name, the job's default (the tenant default in its `default_preferences`) applies,
//! and failing that UTC; every such fallback is reported.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc, Weekday};

use crate::ids::{FeatureType, TemplateId, TenantId, UserId};
use crate::schedule::{Recurrence, Schedule};
use crate::time::{TimeOfDay, Zone};

/// How often a preference fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frequency {
    /// Every hour, at the minute of the time of day.
    Hourly,
    /// Every day.
    Daily,
    /// Every week on the weekday.
    Weekly,
    /// Every second week on the weekday.
    Biweekly,
    /// Every month on the day of month.
    Monthly,
}

/// One user's preference for one feature type, as the Config service or the database holds it.
/// The time zone stays text because it comes from users and may be wrong; grouping resolves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Preference {
    /// The tenant the user belongs to.
    pub tenant: TenantId,
    /// The user.
    pub user: UserId,
    /// The feature this preference is for.
    pub feature_type: FeatureType,
    /// How often; `None` keeps the job's default schedule.
    pub frequency: Option<Frequency>,
    /// Local time of day; `None` keeps the default's.
    pub time_of_day: Option<TimeOfDay>,
    /// IANA time zone name as the user gave it.
    pub time_zone: Option<String>,
    /// Weekday for weekly and biweekly frequencies.
    pub weekday: Option<Weekday>,
    /// Day of month for the monthly frequency.
    pub day_of_month: Option<u32>,
    /// A template to use instead of the job's.
    pub template_override: Option<TemplateId>,
    /// Parameters merged over the job's for this user's requests.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// A disabled preference never fires.
    pub enabled: bool,
    /// Increases with every change; used to detect changes.
    pub version: u64,
}

/// What a Dynamic job uses where a user's preference says nothing: its `default_preferences`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PreferenceDefaults {
    /// The default schedule, whose zone is the tenant default; `None` means users without a
    /// frequency of their own do not fire.
    pub schedule: Option<Schedule>,
    /// The default template override, if any.
    pub template: Option<TemplateId>,
    /// Default parameters.
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

/// Why a user's preference did not apply as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The user concerned.
    pub user: UserId,
    /// What was used instead, and why.
    pub reason: String,
}

/// Users who fire at the same instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FireGroup {
    /// The nominal instant of the group's next occurrence.
    pub at: DateTime<Utc>,
    /// The users of the group, sorted.
    pub users: Vec<UserId>,
}

/// The result of grouping the preferences of one Dynamic job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grouping {
    /// Groups ordered by instant.
    pub groups: Vec<FireGroup>,
    /// Users whose preference is disabled.
    pub disabled: Vec<UserId>,
    /// Users with no schedule at all (no frequency and no default schedule).
    pub unscheduled: Vec<UserId>,
    /// Every fallback that was applied.
    pub fallbacks: Vec<Fallback>,
}

/// The first date on or after 1970-01-05 (a Monday) with the given weekday: the anchor of
/// biweekly preferences, so every replica agrees on which weeks fire.
fn epoch_anchor(weekday: Weekday) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 5).unwrap_or_default()
        + Duration::days(i64::from(weekday.num_days_from_monday()))
}

impl Preference {
    /// The schedule this preference fires on, with `defaults` filling what it leaves out, plus
    /// the fallbacks applied. `None` when neither the preference nor the defaults give a
    /// frequency.
    pub fn schedule(&self, defaults: &PreferenceDefaults) -> (Option<Schedule>, Option<Fallback>) {
        let default_zone = defaults.schedule.as_ref().map(|s| s.zone);
        let (zone, fallback) = match self.time_zone.as_deref().map(str::trim) {
            None | Some("") => (default_zone.unwrap_or(Zone::UTC), None),
            Some(name) => match Zone::parse(name) {
                Ok(zone) => (zone, None),
                Err(_) => {
                    let used = default_zone.unwrap_or(Zone::UTC);
                    let source = if default_zone.is_some() {
                        "the job's default time zone"
                    } else {
                        "UTC"
                    };
                    (
                        used,
                        Some(Fallback {
                            user: self.user.clone(),
                            reason: format!(
                                "time zone {name:?} is not an IANA zone; using {source} {used}"
                            ),
                        }),
                    )
                }
            },
        };
        let default_recurrence = defaults.schedule.as_ref().map(|s| &s.recurrence);
        let recurrence = match (self.frequency, self.time_of_day, default_recurrence) {
            (None, None, Some(default)) => default.clone(),
            (None, None, None) => return (None, fallback),
            (frequency, time, default) => {
                let default_at = match default {
                    Some(
                        Recurrence::Daily { at }
                        | Recurrence::Weekly { at, .. }
                        | Recurrence::Biweekly { at, .. }
                        | Recurrence::Monthly { at, .. },
                    ) => Some(*at),
                    _ => None,
                };
                let default_frequency = match default {
                    Some(Recurrence::Hourly { .. }) => Some(Frequency::Hourly),
                    Some(Recurrence::Weekly { .. }) => Some(Frequency::Weekly),
                    Some(Recurrence::Biweekly { .. }) => Some(Frequency::Biweekly),
                    Some(Recurrence::Monthly { .. }) => Some(Frequency::Monthly),
                    _ => None,
                };
                let at = time.or(default_at).unwrap_or_default();
                let weekday = self.weekday.or(match default {
                    Some(Recurrence::Weekly { on, .. }) => Some(*on),
                    Some(Recurrence::Biweekly { anchor, .. }) => Some(anchor.weekday()),
                    _ => None,
                });
                match frequency.or(default_frequency).unwrap_or(Frequency::Daily) {
                    Frequency::Hourly => Recurrence::Hourly {
                        minute: chrono::Timelike::minute(&at.naive()),
                    },
                    Frequency::Daily => Recurrence::Daily { at },
                    Frequency::Weekly => Recurrence::Weekly {
                        on: weekday.unwrap_or(Weekday::Mon),
                        at,
                    },
                    Frequency::Biweekly => {
                        let on = weekday.unwrap_or(Weekday::Mon);
                        let anchor = match default {
                            Some(Recurrence::Biweekly { anchor, .. }) if anchor.weekday() == on => {
                                *anchor
                            }
                            _ => epoch_anchor(on),
                        };
                        Recurrence::Biweekly { anchor, at }
                    }
                    Frequency::Monthly => Recurrence::Monthly {
                        day: self
                            .day_of_month
                            .or(match default {
                                Some(Recurrence::Monthly { day, .. }) => Some(*day),
                                _ => None,
                            })
                            .unwrap_or(1),
                        at,
                    },
                }
            }
        };
        (Some(Schedule::new(recurrence, zone)), fallback)
    }
}

/// Groups the preferences of one Dynamic job by the instant of their next fire strictly after
/// `after`. Users who fire at the same instant form one group, whatever their frequency or zone.
/// Identical schedules are computed once, so a million preferences sharing a few thousand
/// schedules group quickly.
pub fn group_by_next_fire(
    preferences: &[Preference],
    defaults: &PreferenceDefaults,
    after: DateTime<Utc>,
) -> Grouping {
    let mut grouping = Grouping::default();
    let mut by_instant: BTreeMap<DateTime<Utc>, Vec<UserId>> = BTreeMap::new();
    let mut next_of: HashMap<Schedule, Option<DateTime<Utc>>> = HashMap::new();
    for preference in preferences {
        if !preference.enabled {
            grouping.disabled.push(preference.user.clone());
            continue;
        }
        let (schedule, fallback) = preference.schedule(defaults);
        grouping.fallbacks.extend(fallback);
        let next = schedule.and_then(|schedule| {
            *next_of
                .entry(schedule)
                .or_insert_with_key(|schedule| schedule.next_nominal(after))
        });
        match next {
            Some(at) => by_instant
                .entry(at)
                .or_default()
                .push(preference.user.clone()),
            None => grouping.unscheduled.push(preference.user.clone()),
        }
    }
    grouping.groups = by_instant
        .into_iter()
        .map(|(at, mut users)| {
            users.sort();
            FireGroup { at, users }
        })
        .collect();
    grouping
}

#[cfg(test)]
mod tests;
