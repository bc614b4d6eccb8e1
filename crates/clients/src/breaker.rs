//! A circuit breaker, so a dead downstream is not hammered: it opens after a run of
//! consecutive transient failures, lets one probe through after a cool-down (half-open), and
//! closes again on the probe's success. Time comes from the `Clock` port.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use batch_ports::Clock;
use chrono::{DateTime, Utc};

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive transient failures that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker rejects calls before it lets a probe through.
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; this many transient failures in a row so far.
    Closed(u32),
    /// Calls are rejected until this instant.
    Open(DateTime<Utc>),
    /// One probe call is in flight since this instant; the others are rejected until it
    /// answers — or until a cool-down has passed without an answer (a probe that was cancelled
    /// never answers), when another probe may go.
    HalfOpen(DateTime<Utc>),
}

/// A circuit breaker shared by every call to one downstream.
pub struct CircuitBreaker {
    settings: BreakerSettings,
    clock: Arc<dyn Clock>,
    state: Mutex<BreakerState>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("settings", &self.settings)
            .field("state", &self.state())
            .finish()
    }
}

/// The breaker is open: the call was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit open after repeated failures; next attempt after {until}")]
pub struct Open {
    /// When the breaker lets a probe through.
    pub until: DateTime<Utc>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings, clock: Arc<dyn Clock>) -> Self {
        CircuitBreaker {
            settings,
            clock,
            state: Mutex::new(BreakerState::Closed(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Now, by the breaker's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Where the breaker stands now.
    pub fn state(&self) -> BreakerState {
        *self.lock()
    }

    /// Asks to make a call: allowed when closed, and for the one probe after the cool-down.
    ///
    /// # Errors
    /// [`Open`] when the call must not be made.
    pub fn admit(&self) -> Result<(), Open> {
        let now = self.clock.now();
        let mut state = self.lock();
        match *state {
            BreakerState::Closed(_) => Ok(()),
            BreakerState::Open(until) if now >= until => {
                *state = BreakerState::HalfOpen(now);
                Ok(())
            }
            BreakerState::Open(until) => Err(Open { until }),
            BreakerState::HalfOpen(since) if now >= since + self.cool_down() => {
                *state = BreakerState::HalfOpen(now);
                Ok(())
            }
            BreakerState::HalfOpen(since) => Err(Open {
                until: since + self.cool_down(),
            }),
        }
    }

    fn cool_down(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.settings.cool_down).unwrap_or(chrono::Duration::MAX)
    }

    /// Records the answer of an admitted call: a success (or a permanent error, which shows
    /// the downstream is up) closes the breaker; a transient failure counts towards opening it,
    /// and re-opens a half-open one.
    pub fn record(&self, transient_failure: bool) {
        let now = self.clock.now();
        let mut state = self.lock();
        *state = match (*state, transient_failure) {
            (_, false) => BreakerState::Closed(0),
            (BreakerState::Closed(failures), true)
                if failures + 1 < self.settings.failure_threshold =>
            {
                BreakerState::Closed(failures + 1)
            }
            (BreakerState::Open(until), true) => BreakerState::Open(until),
            (_, true) => {
                tracing::warn!(cool_down = ?self.settings.cool_down, "circuit opened");
                tracing::debug!(target: "batch::metrics", metric = "breaker", state = "open");
                BreakerState::Open(now + self.cool_down())
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Mutex<DateTime<Utc>>);

    #[async_trait::async_trait]
    impl Clock for Fixed {
        fn now(&self) -> DateTime<Utc> {
            *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
        async fn sleep(&self, _: Duration) {}
    }

    #[test]
    fn opens_after_the_threshold_probes_after_the_cool_down_and_closes_on_success() {
        let start = DateTime::<Utc>::UNIX_EPOCH;
        let clock = Arc::new(Fixed(Mutex::new(start)));
        let breaker = CircuitBreaker::new(
            BreakerSettings {
                failure_threshold: 3,
                cool_down: Duration::from_secs(10),
            },
            clock.clone(),
        );
        for _ in 0..2 {
            assert!(breaker.admit().is_ok());
            breaker.record(true);
        }
        assert_eq!(breaker.state(), BreakerState::Closed(2));
        breaker.record(false);
        assert_eq!(
            breaker.state(),
            BreakerState::Closed(0),
            "a success resets the count"
        );
        for _ in 0..3 {
            breaker.record(true);
        }
        assert!(breaker.admit().is_err());
        *clock.0.lock().unwrap() = start + chrono::Duration::seconds(10);
        assert!(breaker.admit().is_ok(), "the probe");
        assert!(breaker.admit().is_err(), "one probe at a time");
        // The probe never answers (its call was cancelled): after a cool-down another may go.
        *clock.0.lock().unwrap() = start + chrono::Duration::seconds(20);
        assert!(breaker.admit().is_ok(), "a second probe after a lost one");
        breaker.record(true);
        assert!(
            matches!(breaker.state(), BreakerState::Open(_)),
            "a failed probe re-opens"
        );
        *clock.0.lock().unwrap() = start + chrono::Duration::seconds(30);
        assert!(breaker.admit().is_ok());
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Closed(0));
    }
}
