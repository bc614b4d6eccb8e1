//! Retry policy: exponential backoff with jitter, and the outcome of a failed attempt.

use std::time::Duration;

use rand::{Rng, RngExt};

/// How a failure should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// Trying again may succeed (unavailable, timed out, overloaded).
    Retryable,
    /// Trying again cannot succeed (bad input, not found, forbidden).
    Permanent,
    /// The request was not made (a circuit breaker is open): try again after this long,
    /// without counting an attempt.
    NotAttempted {
        /// How long until it may be tried.
        retry_in: std::time::Duration,
    },
}

/// How the backoff delay is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Jitter {
    /// The exact exponential delay.
    None,
    /// A uniform delay in `[0, delay]` ("full jitter"): spreads retries the most.
    #[default]
    Full,
    /// A uniform delay in `[delay/2, delay]` ("equal jitter"): never retries immediately.
    Equal,
}

/// Backoff and attempt limits for one job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total, including the first (1 = never retry).
    pub max_attempts: u32,
    /// Delay before the second attempt, before jitter.
    pub initial_backoff: Duration,
    /// Factor applied to the delay after each further attempt (at least 1).
    pub multiplier: f64,
    /// Upper bound of any delay, before jitter.
    pub max_backoff: Duration,
    /// How the delay is randomised.
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(60),
            jitter: Jitter::Full,
        }
    }
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Stop: the item has failed.
    GiveUp,
}

impl RetryPolicy {
    /// The capped exponential delay after attempt number `attempt` (1-based) failed, before
    /// jitter: `min(max_backoff, initial_backoff × multiplier^(attempt-1))`.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.multiplier.max(1.0).powi(exponent);
        let millis = self.initial_backoff.as_secs_f64() * 1000.0 * factor;
        let cap = self.max_backoff.as_secs_f64() * 1000.0;
        // `min` also maps an infinite product to the cap.
        Duration::from_secs_f64(millis.min(cap).max(0.0) / 1000.0)
    }

    /// The delay after attempt `attempt` failed, with jitter drawn from `rng` (seed it for
    /// reproducible tests).
    pub fn backoff(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.backoff_ceiling(attempt);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Full => ceiling.mul_f64(rng.random::<f64>()),
            Jitter::Equal => ceiling / 2 + (ceiling / 2).mul_f64(rng.random::<f64>()),
        }
    }

    /// Decides what follows the failure of attempt number `attempt` (1-based).
    pub fn decide(&self, attempt: u32, kind: FailureKind, rng: &mut impl Rng) -> Decision {
        match kind {
            FailureKind::NotAttempted { retry_in } => Decision::RetryAfter(retry_in),
            FailureKind::Permanent => Decision::GiveUp,
            FailureKind::Retryable if attempt >= self.max_attempts => Decision::GiveUp,
            FailureKind::Retryable => Decision::RetryAfter(self.backoff(attempt, rng)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(500),
            jitter,
        }
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let p = policy(Jitter::None);
        let mut rng = SmallRng::seed_from_u64(1);
        let delays: Vec<u128> = (1..=5)
            .map(|a| p.backoff(a, &mut rng).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn decisions_follow_kind_and_attempts() {
        let p = policy(Jitter::None);
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(
            p.decide(1, FailureKind::Permanent, &mut rng),
            Decision::GiveUp
        );
        assert_eq!(
            p.decide(1, FailureKind::Retryable, &mut rng),
            Decision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(4, FailureKind::Retryable, &mut rng),
            Decision::GiveUp
        );
    }

    #[test]
    fn a_seeded_source_reproduces_the_same_delays() {
        let p = policy(Jitter::Full);
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (1..10).map(|a| p.backoff(a, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn huge_attempt_numbers_stay_at_the_cap() {
        let p = RetryPolicy {
            multiplier: 10.0,
            ..policy(Jitter::None)
        };
        assert_eq!(p.backoff_ceiling(u32::MAX), Duration::from_millis(500));
    }

    proptest! {
        #[test]
        fn jittered_delays_stay_within_their_bounds(seed: u64, attempt in 1u32..60, equal: bool) {
            let p = policy(if equal { Jitter::Equal } else { Jitter::Full });
            let mut rng = SmallRng::seed_from_u64(seed);
            let ceiling = p.backoff_ceiling(attempt);
            let delay = p.backoff(attempt, &mut rng);
            prop_assert!(delay <= ceiling);
            if equal {
                prop_assert!(delay >= ceiling / 2);
            }
        }
    }
}
