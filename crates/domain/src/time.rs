//! Local time values: time of day, IANA time zone, weekday.

use std::fmt;
use std::str::FromStr;

use chrono::{NaiveTime, Weekday};

/// A local time of day with minute precision (`09:00`, `23:59`); seconds are accepted
/// (`09:00:30`).
/// The default is midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimeOfDay(NaiveTime);

/// The text is not a time of day.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a time of day (HH:MM)")]
pub struct BadTimeOfDay(pub String);

impl TimeOfDay {
    /// Parses `HH:MM` or `HH:MM:SS` on a 24-hour clock.
    ///
    /// # Errors
    /// [`BadTimeOfDay`] when the text is not such a time (`25:00`, `9am`, `09:60`).
    pub fn parse(text: &str) -> Result<Self, BadTimeOfDay> {
        let bad = || BadTimeOfDay(text.to_owned());
        let parts: Vec<&str> = text.split(':').collect();
        if !(2..=3).contains(&parts.len())
            || parts
                .iter()
                .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(bad());
        }
        let number = |p: &str| p.parse::<u32>().map_err(|_| bad());
        let hour = number(parts[0])?;
        let minute = number(parts[1])?;
        let second = match parts.get(2) {
            Some(p) => number(p)?,
            None => 0,
        };
        NaiveTime::from_hms_opt(hour, minute, second)
            .map(TimeOfDay)
            .ok_or_else(bad)
    }

    /// Builds a time of day from hour and minute.
    ///
    /// # Errors
    /// [`BadTimeOfDay`] when hour ≥ 24 or minute ≥ 60.
    pub fn from_hm(hour: u32, minute: u32) -> Result<Self, BadTimeOfDay> {
        NaiveTime::from_hms_opt(hour, minute, 0)
            .map(TimeOfDay)
            .ok_or_else(|| BadTimeOfDay(format!("{hour:02}:{minute:02}")))
    }

    /// The time as a chrono value.
    pub fn naive(&self) -> NaiveTime {
        self.0
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use chrono::Timelike;
        write!(f, "{:02}:{:02}", self.0.hour(), self.0.minute())?;
        if self.0.second() != 0 {
            write!(f, ":{:02}", self.0.second())?;
        }
        Ok(())
    }
}

/// An IANA time zone (`Europe/Berlin`, `UTC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Zone(chrono_tz::Tz);

/// The text is not an IANA time zone name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IANA time zone (for example \"Europe/Berlin\" or \"UTC\")")]
pub struct UnknownZone(pub String);

impl Zone {
    /// Coordinated Universal Time.
    pub const UTC: Zone = Zone(chrono_tz::UTC);

    /// Parses an IANA zone name, case-sensitively as the database spells it.
    ///
    /// # Errors
    /// [`UnknownZone`] when the name is not in the time zone database.
    pub fn parse(name: &str) -> Result<Self, UnknownZone> {
        chrono_tz::Tz::from_str(name)
            .map(Zone)
            .map_err(|_| UnknownZone(name.to_owned()))
    }

    /// The zone as a chrono-tz value.
    pub fn tz(&self) -> chrono_tz::Tz {
        self.0
    }
}

impl Default for Zone {
    fn default() -> Self {
        Zone::UTC
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

/// The text is not a weekday name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a weekday (monday … sunday)")]
pub struct BadWeekday(pub String);

/// Parses a weekday name in English, full or three letters, any case (`monday`, `Mon`).
///
/// # Errors
/// [`BadWeekday`] for anything else.
pub fn parse_weekday(text: &str) -> Result<Weekday, BadWeekday> {
    let bad = || BadWeekday(text.to_owned());
    let lower = text.to_ascii_lowercase();
    let full = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let index = full
        .iter()
        .position(|day| *day == lower || (lower.len() == 3 && day.starts_with(&lower)))
        .ok_or_else(bad)?;
    Weekday::try_from(u8::try_from(index).map_err(|_| bad())?).map_err(|_| bad())
}

/// The English name of a weekday in lower case (`monday`).
pub fn weekday_name(day: Weekday) -> &'static str {
    match day {
        Weekday::Mon => "monday",
        Weekday::Tue => "tuesday",
        Weekday::Wed => "wednesday",
        Weekday::Thu => "thursday",
        Weekday::Fri => "friday",
        Weekday::Sat => "saturday",
        Weekday::Sun => "sunday",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Option<&str>) {
        assert_eq!(
            TimeOfDay::parse(text).ok().map(|t| t.to_string()),
            expected.map(str::to_owned),
            "{text:?}"
        );
    }

    #[test]
    fn times_of_day() {
        check("09:00", Some("09:00"));
        check("00:00", Some("00:00"));
        check("23:59", Some("23:59"));
        check("02:30:15", Some("02:30:15"));
        check("25:00", None);
        check("24:00", None);
        check("09:60", None);
        check("9:00", None);
        check("9am", None);
        check("", None);
        check("09:00:00:00", None);
        check("+9:00", None);
    }

    #[test]
    fn zones_and_weekdays() {
        assert_eq!(
            Zone::parse("America/New_York").unwrap().to_string(),
            "America/New_York"
        );
        assert!(Zone::parse("Mars/Olympus").is_err());
        assert_eq!(parse_weekday("Monday").unwrap(), Weekday::Mon);
        assert_eq!(parse_weekday("sun").unwrap(), Weekday::Sun);
        assert!(parse_weekday("mo").is_err());
        assert!(parse_weekday("funday").is_err());
        for day in [
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
            "sunday",
        ] {
            assert_eq!(weekday_name(parse_weekday(day).unwrap()), day);
        }
    }
}
