//! The batch matrix: a batch type is the product of three independent choices, and the
//! processing strategy follows from it.

use std::fmt;
use std::str::FromStr;

/// How items become requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcessingMethod {
    /// One request per item (per user, or per category item).
    Individual,
    /// One request for a whole set (a user set, a category, or several categories).
    Batch,
}

/// Where the items of a run come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataSource {
    /// Users from `system_users`, by ids or by filter.
    Users,
    /// Items of one or more categories.
    Categories,
}

/// Whether per-user preferences drive the schedule and the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreferenceSource {
    /// The job's own schedule and template apply to everyone.
    Static,
    /// Each user's preferences (frequency, time, template override, parameters) apply.
    Dynamic,
}

/// A batch type: `ProcessingMethod × DataSource × PreferenceSource`, printed and parsed as one
/// of eight names such as `INDIVIDUAL_USERS` or `PREFERENCE_BATCH_CATEGORIES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchType {
    /// How items become requests.
    pub method: ProcessingMethod,
    /// Where the items come from.
    pub data: DataSource,
    /// Whether user preferences apply.
    pub preferences: PreferenceSource,
}

/// How a run executes its items, before preferences are considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Execution {
    /// One request per item.
    Individual,
    /// One request for a whole category or user set.
    Object,
    /// One request over several categories, data keyed by category.
    Combined,
}

/// The processing strategy of a job: its execution, optionally wrapped by preferences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strategy {
    /// How items are executed.
    pub execution: Execution,
    /// `Dynamic` wraps the execution in the Preference strategy (per-user schedules and overrides).
    pub preferences: PreferenceSource,
}

impl Strategy {
    /// The strategy's name as the processor registers it: `individual`, `object`, `combined`,
    /// or `preference` for every Dynamic job.
    pub fn name(&self) -> &'static str {
        match (self.preferences, self.execution) {
            (PreferenceSource::Dynamic, _) => "preference",
            (PreferenceSource::Static, Execution::Individual) => "individual",
            (PreferenceSource::Static, Execution::Object) => "object",
            (PreferenceSource::Static, Execution::Combined) => "combined",
        }
    }
}

/// The text is not one of the eight batch type names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a batch type (expected one of {names})", names = BatchType::NAMES.join(", "))]
pub struct UnknownBatchType(pub String);

impl BatchType {
    /// The eight names, in matrix order.
    pub const NAMES: [&'static str; 8] = [
        "INDIVIDUAL_USERS",
        "INDIVIDUAL_CATEGORIES",
        "BATCH_USERS",
        "BATCH_CATEGORIES",
        "PREFERENCE_INDIVIDUAL_USERS",
        "PREFERENCE_INDIVIDUAL_CATEGORIES",
        "PREFERENCE_BATCH_USERS",
        "PREFERENCE_BATCH_CATEGORIES",
    ];

    /// Every batch type, in the order of [`BatchType::NAMES`].
    pub fn all() -> impl Iterator<Item = BatchType> {
        [PreferenceSource::Static, PreferenceSource::Dynamic]
            .into_iter()
            .flat_map(|preferences| {
                [ProcessingMethod::Individual, ProcessingMethod::Batch]
                    .into_iter()
                    .flat_map(move |method| {
                        [DataSource::Users, DataSource::Categories]
                            .into_iter()
                            .map(move |data| BatchType {
                                method,
                                data,
                                preferences,
                            })
                    })
            })
    }

    /// The strategy this type runs with. `category_count` is the number of categories in the
    /// job's source: several categories under a Batch method make a Combined run.
    pub fn strategy(&self, category_count: usize) -> Strategy {
        let execution = match (self.method, self.data) {
            (ProcessingMethod::Individual, _) => Execution::Individual,
            (ProcessingMethod::Batch, DataSource::Categories) if category_count > 1 => {
                Execution::Combined
            }
            (ProcessingMethod::Batch, _) => Execution::Object,
        };
        Strategy {
            execution,
            preferences: self.preferences,
        }
    }

    /// Whether user preferences drive this type (the `PREFERENCE_…` names).
    pub fn is_dynamic(&self) -> bool {
        self.preferences == PreferenceSource::Dynamic
    }
}

impl fmt::Display for BatchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.preferences == PreferenceSource::Dynamic {
            f.write_str("PREFERENCE_")?;
        }
        f.write_str(match self.method {
            ProcessingMethod::Individual => "INDIVIDUAL_",
            ProcessingMethod::Batch => "BATCH_",
        })?;
        f.write_str(match self.data {
            DataSource::Users => "USERS",
            DataSource::Categories => "CATEGORIES",
        })
    }
}

impl FromStr for BatchType {
    type Err = UnknownBatchType;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (preferences, rest) = match text.strip_prefix("PREFERENCE_") {
            Some(rest) => (PreferenceSource::Dynamic, rest),
            None => (PreferenceSource::Static, text),
        };
        let (method, rest) = if let Some(rest) = rest.strip_prefix("INDIVIDUAL_") {
            (ProcessingMethod::Individual, rest)
        } else if let Some(rest) = rest.strip_prefix("BATCH_") {
            (ProcessingMethod::Batch, rest)
        } else {
            return Err(UnknownBatchType(text.to_owned()));
        };
        let data = match rest {
            "USERS" => DataSource::Users,
            "CATEGORIES" => DataSource::Categories,
            _ => return Err(UnknownBatchType(text.to_owned())),
        };
        Ok(BatchType {
            method,
            data,
            preferences,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eight_names_round_trip_in_matrix_order() {
        let printed: Vec<String> = BatchType::all().map(|t| t.to_string()).collect();
        assert_eq!(printed, BatchType::NAMES);
        for name in BatchType::NAMES {
            assert_eq!(name.parse::<BatchType>().unwrap().to_string(), name);
        }
    }

    #[test]
    fn unknown_names_are_rejected_with_the_list() {
        for bad in [
            "",
            "USERS",
            "INDIVIDUAL",
            "PREFERENCE_USERS",
            "batch_users",
            "BATCH_USERS_X",
        ] {
            let err = bad.parse::<BatchType>().unwrap_err();
            assert!(err.to_string().contains("INDIVIDUAL_USERS"), "{err}");
        }
    }

    fn check(name: &str, categories: usize, expected: &str) {
        let t: BatchType = name.parse().unwrap();
        assert_eq!(
            t.strategy(categories).name(),
            expected,
            "{name} with {categories}"
        );
    }

    #[test]
    fn strategy_follows_from_type_and_source() {
        check("INDIVIDUAL_USERS", 0, "individual");
        check("INDIVIDUAL_CATEGORIES", 1, "individual");
        check("BATCH_USERS", 0, "object");
        check("BATCH_CATEGORIES", 1, "object");
        check("BATCH_CATEGORIES", 3, "combined");
        check("PREFERENCE_INDIVIDUAL_USERS", 0, "preference");
        check("PREFERENCE_BATCH_CATEGORIES", 2, "preference");
        let t: BatchType = "PREFERENCE_BATCH_CATEGORIES".parse().unwrap();
        assert_eq!(t.strategy(2).execution, Execution::Combined);
    }
}
