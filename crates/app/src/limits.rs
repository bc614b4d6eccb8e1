//! The per-job rate limit: governor's GCRA, reading time from the [`Clock`] port so tests can
//! drive it.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use batch_ports::Clock;
use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// governor's view of the [`Clock`] port: time since the Unix epoch.
#[derive(Clone)]
struct PortClock(Arc<dyn Clock>);

impl GovernorClock for PortClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        let now = self.0.now();
        Duration::from_nanos(u64::try_from(now.timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0))
    }
}

/// At most `rate` starts per second, evenly spaced (no bursts), waiting on the clock port.
pub(crate) struct RateLimit {
    limiter: RateLimiter<NotKeyed, InMemoryState, PortClock, NoOpMiddleware<Duration>>,
    clock: PortClock,
}

impl RateLimit {
    /// A limit of `rate` per second (rates below one per hour are treated as one per hour).
    pub(crate) fn per_second(rate: f64, clock: Arc<dyn Clock>) -> Self {
        // A rate above 10^9 per second would round its period to zero, which governor
        // refuses; one nanosecond is as good as unlimited.
        let period =
            Duration::from_secs_f64((1.0 / rate).min(3_600.0)).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN);
        let clock = PortClock(clock);
        RateLimit {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
        }
    }

    /// Waits until one more start is allowed, and takes it.
    pub(crate) async fn until_ready(&self) {
        loop {
            match self.limiter.check() {
                Ok(()) => return,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    self.clock.0.sleep(wait.max(Duration::from_micros(1))).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by F11 (a huge `rate_limit_per_sec` in the jobs file): a rate whose period
    /// rounds to zero fell back to one start per second instead of no limit to speak of.
    #[test]
    fn a_huge_rate_is_not_one_per_second() {
        let clock = Arc::new(batch_testkit::ManualClock::new(chrono::Utc::now()));
        for rate in [1e10, 1e30, f64::MAX] {
            let limit = RateLimit::per_second(rate, clock.clone());
            assert!(limit.limiter.check().is_ok());
            let wait = limit
                .limiter
                .check()
                .expect_err("the clock stands still")
                .wait_time_from(limit.clock.now());
            assert!(wait <= Duration::from_micros(1), "{rate}: waits {wait:?}");
        }
    }
}
