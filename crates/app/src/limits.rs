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
        let period = Duration::from_secs_f64((1.0 / rate).min(3_600.0));
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
