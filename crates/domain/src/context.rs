//! The batch context: the JSON document that describes one run to its users and operators —
//! what ran, which items were valid, how far it got. Large lists (items, references) live in
//! tables and are paged through the API; the context holds their counts and capped samples.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How many entries a sample list in a context keeps.
pub const SAMPLE_CAP: usize = 20;

/// The batch context of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BatchContext {
    /// What ran, for whom, when.
    pub metadata: Metadata,
    /// Valid and invalid items: counts and samples.
    pub items: Items,
    /// Progress of execution.
    pub progress: Progress,
    /// User validation statistics.
    pub validation: Tally,
    /// For category batches: validation of the users the items refer to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_references: Option<Tally>,
    /// Runs whose contexts were merged into this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    /// Notes about how the run was prepared (fallbacks taken, stale data served).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// What ran, for whom, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Metadata {
    /// The run.
    pub run_id: String,
    /// The job.
    pub job_id: String,
    /// The tenant that owns the run.
    pub tenant: String,
    /// The batch type name (`INDIVIDUAL_USERS`).
    pub batch_type: String,
    /// The strategy name (`individual`, `object`, `combined`, `preference`).
    pub strategy: String,
    /// Why the run exists (`scheduled`, `manual`, …).
    pub trigger: String,
    /// The run's status.
    pub status: String,
    /// The nominal instant of a scheduled run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<DateTime<Utc>>,
    /// When the run was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The run this one's context merges into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
}

/// Valid and invalid items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Items {
    /// Items that will be executed.
    pub valid: Sample,
    /// Items rejected by validation.
    pub invalid: Sample,
}

/// A count with a capped sample of keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Sample {
    /// How many there are.
    pub count: u64,
    /// Up to [`SAMPLE_CAP`] of them.
    pub sample: Vec<String>,
}

impl Sample {
    /// Counts `key`, keeping it in the sample while there is room.
    pub fn push(&mut self, key: impl Into<String>) {
        self.count += 1;
        if self.sample.len() < SAMPLE_CAP {
            self.sample.push(key.into());
        }
    }

    fn merge(&mut self, other: &Sample) {
        self.count += other.count;
        let room = SAMPLE_CAP.saturating_sub(self.sample.len());
        self.sample.extend(other.sample.iter().take(room).cloned());
    }
}

/// Execution progress.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// Items that reached a final state.
    pub processed: u64,
    /// Items that succeeded.
    pub succeeded: u64,
    /// Items that failed.
    pub failed: u64,
    /// Items to execute.
    pub total: u64,
    /// `processed / total` in percent, 100 for an empty run.
    pub percentage: f64,
}

impl Progress {
    /// Progress from counts; the percentage follows from them.
    pub fn new(succeeded: u64, failed: u64, processed: u64, total: u64) -> Self {
        let percentage = if total == 0 {
            100.0
        } else {
            // Rounded to two decimals so the JSON stays readable.
            ((processed as f64 / total as f64) * 10_000.0).round() / 100.0
        };
        Progress {
            processed,
            succeeded,
            failed,
            total,
            percentage,
        }
    }
}

/// Totals of a validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Tally {
    /// Everything checked.
    pub total: u64,
    /// What passed.
    pub valid: u64,
    /// What did not.
    pub invalid: u64,
}

impl Tally {
    fn merge(&mut self, other: &Tally) {
        self.total += other.total;
        self.valid += other.valid;
        self.invalid += other.invalid;
    }
}

impl BatchContext {
    /// Merges a child run's context into this (parent) context: counts add up, samples fill
    /// up to their cap, the child is listed once. Merging the same child twice changes nothing.
    pub fn merge_child(&mut self, child: &BatchContext) {
        if self.children.contains(&child.metadata.run_id) {
            return;
        }
        self.children.push(child.metadata.run_id.clone());
        self.items.valid.merge(&child.items.valid);
        self.items.invalid.merge(&child.items.invalid);
        let p = &self.progress;
        let c = &child.progress;
        self.progress = Progress::new(
            p.succeeded + c.succeeded,
            p.failed + c.failed,
            p.processed + c.processed,
            p.total + c.total,
        );
        self.validation.merge(&child.validation);
        if let Some(child_refs) = &child.user_references {
            self.user_references
                .get_or_insert_with(Tally::default)
                .merge(child_refs);
        }
        for note in &child.notes {
            if !self.notes.contains(note) {
                self.notes.push(note.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(run: &str, valid: u64, succeeded: u64, failed: u64) -> BatchContext {
        let mut c = BatchContext::default();
        c.metadata.run_id = run.to_owned();
        for i in 0..valid {
            c.items.valid.push(format!("{run}-{i}"));
        }
        c.progress = Progress::new(succeeded, failed, succeeded + failed, valid);
        c.validation = Tally {
            total: valid + 1,
            valid,
            invalid: 1,
        };
        c
    }

    #[test]
    fn percentage_follows_from_counts() {
        assert_eq!(Progress::new(1, 0, 1, 3).percentage, 33.33);
        assert_eq!(Progress::new(0, 0, 0, 0).percentage, 100.0);
        assert_eq!(Progress::new(2, 2, 4, 4).percentage, 100.0);
    }

    #[test]
    fn samples_are_capped_but_counts_are_exact() {
        let c = context("r", 50, 0, 0);
        assert_eq!(c.items.valid.count, 50);
        assert_eq!(c.items.valid.sample.len(), SAMPLE_CAP);
    }

    #[test]
    fn merging_children_adds_counts_once() {
        let mut parent = context("p", 2, 2, 0);
        let child = context("c", 15, 10, 5);
        parent.merge_child(&child);
        parent.merge_child(&child);
        assert_eq!(parent.children, ["c"]);
        assert_eq!(parent.items.valid.count, 17);
        assert_eq!(parent.items.valid.sample.len(), 17);
        assert_eq!(parent.progress, Progress::new(12, 5, 17, 17));
        assert_eq!(
            parent.validation,
            Tally {
                total: 19,
                valid: 17,
                invalid: 2
            }
        );
        parent.merge_child(&context("d", 30, 0, 0));
        assert_eq!(parent.items.valid.sample.len(), SAMPLE_CAP);
        assert_eq!(parent.items.valid.count, 47);
    }

    #[test]
    fn the_json_has_the_seed_shape() {
        let mut c = context("r", 1, 1, 0);
        c.user_references = Some(Tally {
            total: 3,
            valid: 2,
            invalid: 1,
        });
        let json = serde_json::to_value(&c).unwrap();
        for key in [
            "metadata",
            "items",
            "progress",
            "validation",
            "user_references",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        for key in ["processed", "succeeded", "failed", "total", "percentage"] {
            assert!(json["progress"].get(key).is_some(), "{key}");
        }
        assert_eq!(json["items"]["invalid"]["count"], 0);
        let back: BatchContext = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }
}
