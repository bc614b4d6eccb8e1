//! The jobs the service runs, shared by the scheduler, the processors and the API, and
//! replaced as a whole when the job table changes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use batch_domain::JobId;
use batch_domain::config::Job;

/// An immutable set of jobs by id.
pub type Jobs = Arc<HashMap<JobId, Job>>;

/// The current set of jobs and the version of the job table it was read at.
#[derive(Debug, Default)]
pub struct JobCatalog {
    current: RwLock<(u64, Jobs)>,
}

impl JobCatalog {
    /// A catalog holding `jobs` at version 0.
    pub fn new(jobs: &[Job]) -> Self {
        JobCatalog {
            current: RwLock::new((0, Arc::new(by_id(jobs)))),
        }
    }

    /// The jobs now: a snapshot that does not change while it is used.
    pub fn jobs(&self) -> Jobs {
        self.read().1.clone()
    }

    /// The version of the job table the jobs were read at.
    pub fn version(&self) -> u64 {
        self.read().0
    }

    /// Replaces the jobs with `jobs` read at `version`.
    pub fn replace(&self, version: u64, jobs: &[Job]) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = (version, Arc::new(by_id(jobs)));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (u64, Jobs)> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn by_id(jobs: &[Job]) -> HashMap<JobId, Job> {
    jobs.iter().map(|j| (j.id.clone(), j.clone())).collect()
}
