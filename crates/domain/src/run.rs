//! Runs and items: the states a run and each of its items go through, and the lease that makes
//! one process the owner of a run at a time.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// The text is not a known state or trigger name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a {what}")]
pub struct UnknownName {
    /// What was expected (`run status`, `item status`, `trigger`).
    pub what: &'static str,
    /// The rejected text.
    pub value: String,
}

macro_rules! named_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal, { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored and printed name (`succeeded`).
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownName { what: $what, value: text.to_owned() }),
                }
            }
        }
    };
}

named_enum!(
    /// Where a run is in its life.
    RunStatus, "run status", {
        /// Created, waiting for a processor to claim it.
        Queued = "queued",
        /// Claimed by a processor that holds its lease.
        Running = "running",
        /// Every valid item succeeded.
        Succeeded = "succeeded",
        /// Finished; some items failed.
        CompletedWithFailures = "completed_with_failures",
        /// The run itself failed (its data could not be fetched, say).
        Failed = "failed",
        /// Cancelled before it finished.
        Cancelled = "cancelled",
    }
);

impl RunStatus {
    /// Whether the run has ended; an ended run is never claimed again.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

named_enum!(
    /// Where an item is in its life.
    ItemStatus, "item status", {
        /// Waiting for its first or next attempt.
        Pending = "pending",
        /// Done; its result is stored.
        Succeeded = "succeeded",
        /// Failed permanently or out of attempts.
        Failed = "failed",
        /// Rejected by validation (an unknown user, say); never executed.
        Invalid = "invalid",
        /// Not executed because the run was cancelled.
        Cancelled = "cancelled",
    }
);

impl ItemStatus {
    /// Whether the item will not be executed again.
    pub fn is_terminal(&self) -> bool {
        *self != ItemStatus::Pending
    }
}

named_enum!(
    /// Why a run exists.
    Trigger, "trigger", {
        /// A schedule fired.
        Scheduled = "scheduled",
        /// Someone asked for it (TriggerJob, `batch-server run`).
        Manual = "manual",
        /// A backfill over a past time range.
        Backfill = "backfill",
        /// A retry of a previous run's failed items.
        Retry = "retry",
    }
);

/// The identifier of a run: a UUID (version 7, so ids sort by creation time) as text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunId(String);

impl RunId {
    /// Parses a run id: identifier characters only, at most 64 of them.
    ///
    /// # Errors
    /// [`crate::ids::Error`] naming what is wrong.
    pub fn parse(text: impl Into<String>) -> Result<Self, crate::ids::Error> {
        let text = text.into();
        crate::ids::check(&text, 64)?;
        Ok(RunId(text))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Exact item counts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ItemCounts {
    /// Items waiting for an attempt.
    pub pending: u64,
    /// Items that succeeded.
    pub succeeded: u64,
    /// Items that failed.
    pub failed: u64,
    /// Items rejected by validation.
    pub invalid: u64,
    /// Items not executed because of cancellation.
    pub cancelled: u64,
}

impl ItemCounts {
    /// All items, whatever their state.
    pub fn total(&self) -> u64 {
        self.pending + self.succeeded + self.failed + self.invalid + self.cancelled
    }

    /// Items that will not be executed again.
    pub fn processed(&self) -> u64 {
        self.total() - self.pending
    }

    /// Adds `n` items of `status`.
    pub fn add(&mut self, status: ItemStatus, n: u64) {
        match status {
            ItemStatus::Pending => self.pending += n,
            ItemStatus::Succeeded => self.succeeded += n,
            ItemStatus::Failed => self.failed += n,
            ItemStatus::Invalid => self.invalid += n,
            ItemStatus::Cancelled => self.cancelled += n,
        }
    }

    /// The status a run ends with when no item is pending any more.
    pub fn final_status(&self) -> RunStatus {
        if self.failed > 0 {
            RunStatus::CompletedWithFailures
        } else {
            RunStatus::Succeeded
        }
    }
}

/// Who holds a run, and until when. A lease that is not renewed expires, and only then may
/// another process take the run over; elapsed time alone never does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The owning process (host, pid and a random part).
    pub owner: String,
    /// When the lease ends unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// Whether the lease still holds at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        now < self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>().unwrap(), *status);
        }
        for status in ItemStatus::ALL {
            assert_eq!(status.as_str().parse::<ItemStatus>().unwrap(), *status);
        }
        for trigger in Trigger::ALL {
            assert_eq!(trigger.as_str().parse::<Trigger>().unwrap(), *trigger);
        }
        let err = "done".parse::<RunStatus>().unwrap_err();
        assert_eq!(err.to_string(), "\"done\" is not a run status");
    }

    #[test]
    fn counts_add_up_and_decide_the_final_status() {
        let mut counts = ItemCounts::default();
        counts.add(ItemStatus::Succeeded, 7);
        counts.add(ItemStatus::Invalid, 2);
        counts.add(ItemStatus::Pending, 1);
        assert_eq!((counts.total(), counts.processed()), (10, 9));
        assert_eq!(counts.final_status(), RunStatus::Succeeded);
        counts.add(ItemStatus::Failed, 1);
        assert_eq!(counts.final_status(), RunStatus::CompletedWithFailures);
        assert!(RunStatus::Cancelled.is_terminal() && !RunStatus::Running.is_terminal());
        assert!(!ItemStatus::Pending.is_terminal() && ItemStatus::Invalid.is_terminal());
    }
}
