//! A circuit breaker, so a dead downstream is not hammered: it opens when most of the recent
//! calls failed transiently (`failure_threshold` of the last `window` answers), lets one probe
//! through after a cool-down (half-open), and closes again on the probe's success. Counting
//! over a window rather than a run of consecutive failures keeps a downstream that fails a
//! share of calls (30 %, say) from tripping it now and then by chance: five failures in a row
//! happen every few hundred calls at 30 %, twenty of twenty-five about once in three million.
//! Time comes from the `Clock` port.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batch_ports::Clock;
use chrono::{DateTime, Utc};

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Transient failures among the last `window` answers that open the breaker.
    pub failure_threshold: u32,
    /// How many of the most recent answers count (at least `failure_threshold` for the breaker
    /// to ever open; equal to it to open on a run of consecutive failures).
    pub window: u32,
    /// How long an open breaker rejects calls before it lets a probe through.
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    /// 20 transient failures among the last 25 answers, 30 s cool-down.
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 20,
            window: 25,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; this many transient failures among the recent answers.
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
    state: Mutex<Inner>,
}

/// The state and, while closed, the recent answers (`true` = transient failure).
#[derive(Debug)]
struct Inner {
    state: BreakerState,
    recent: VecDeque<bool>,
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
            state: Mutex::new(Inner {
                state: BreakerState::Closed(0),
                recent: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
        self.lock().state
    }

    /// Asks to make a call: allowed when closed, and for the one probe after the cool-down.
    ///
    /// # Errors
    /// [`Open`] when the call must not be made.
    pub fn admit(&self) -> Result<(), Open> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let state = &mut inner.state;
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
    /// the downstream is up) closes a half-open breaker; a transient failure counts towards
    /// opening a closed one (over the window of recent answers) and re-opens a half-open one.
    pub fn record(&self, transient_failure: bool) {
        let now = self.clock.now();
        let mut inner = self.lock();
        let opened = match inner.state {
            BreakerState::Open(_) => false,
            BreakerState::HalfOpen(_) if !transient_failure => {
                inner.recent.clear();
                inner.state = BreakerState::Closed(0);
                false
            }
            BreakerState::HalfOpen(_) => true,
            BreakerState::Closed(_) => {
                inner.recent.push_back(transient_failure);
                while inner.recent.len() > self.settings.window.max(1) as usize {
                    inner.recent.pop_front();
                }
                let failures = inner.recent.iter().filter(|f| **f).count();
                let failures = u32::try_from(failures).unwrap_or(u32::MAX);
                inner.state = BreakerState::Closed(failures);
                failures >= self.settings.failure_threshold
            }
        };
        if opened {
            tracing::warn!(cool_down = ?self.settings.cool_down, "circuit opened");
            tracing::debug!(target: "batch::metrics", metric = "breaker", state = "open");
            inner.recent.clear();
            inner.state = BreakerState::Open(now + self.cool_down());
        }
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
                window: 4,
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
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Closed(2), "2 of the last 4");
        breaker.record(false);
        assert_eq!(
            breaker.state(),
            BreakerState::Closed(1),
            "the oldest failure left the window"
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

    /// A downstream failing 30 % of calls at random never trips the default breaker in
    /// 100 000 answers (deterministic pseudo-random sequence); one failing every call trips it
    /// after exactly `failure_threshold` answers.
    #[test]
    fn a_partly_failing_downstream_does_not_trip_the_default_breaker() {
        let clock = Arc::new(Fixed(Mutex::new(DateTime::<Utc>::UNIX_EPOCH)));
        let breaker = CircuitBreaker::new(BreakerSettings::default(), clock.clone());
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            assert!(breaker.admit().is_ok(), "opened at 30 % failures");
            breaker.record(seed % 100 < 30);
        }
        let breaker = CircuitBreaker::new(BreakerSettings::default(), clock);
        for n in 1..=20 {
            assert!(breaker.admit().is_ok(), "rejected call {n}");
            breaker.record(true);
        }
        assert!(breaker.admit().is_err());
    }
}
