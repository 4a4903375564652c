//! Keyed rate limits: `rate` requests per second on average, `burst` at once, per key.
//! The ingest endpoint keys one by device id (after authentication) and one by client
//! address (before the API-key look-up, see [`crate::auth`]).
//!
//! One request costs one cell, whatever the number of readings it carries (the body
//! limit and `--max-batch-readings` bound a request's weight). A refused request
//! answers 429 with `Retry-After`: the whole seconds until the device may send again.
//!
//! The limiter is `governor`'s keyed GCRA limiter (the same decisions as a token
//! bucket of `burst` tokens refilled at `rate` per second), one state per device id
//! in a sharded concurrent map. A rate below 1/s works: 0.1/s is one request per
//! 10 s. Rate 0 disables the limit (no map at all).
//!
//! Memory is bounded: when the map holds [`SWEEP_AT`] keys or more, the check that
//! notices drops every device whose state is back to a fresh one (idle long enough
//! to have a full burst again: it carries nothing worth keeping) and shrinks the map.
//! The next sweep waits until the map is twice what is left, at least [`SWEEP_AT`],
//! so many active devices do not make every request sweep.
//!
//! Time comes from `governor`'s clock, not tokio's: [`RateLimiter::new`] uses its
//! default clock (`quanta`, monotonic); tests pass a `governor::clock::FakeRelativeClock` to
//! [`RateLimiter::with_clock`] and advance it by hand.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::Quota;
use uuid::Uuid;

/// Tracked keys at which idle ones are swept (the smallest sweep threshold).
pub const SWEEP_AT: usize = 100_000;

type Keyed<K, C> =
    governor::RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A rate limiter per key (a device id, a client address). `rate == 0` disables it.
pub struct RateLimiter<K: Hash + Eq + Clone = Uuid, C: Clock = DefaultClock> {
    /// `None` when disabled.
    keyed: Option<Keyed<K, C>>,
    /// Map size that triggers the next sweep; `usize::MAX` while one runs.
    sweep_at: AtomicUsize,
}

/// The quota of `rate_per_second` with `burst`; `None` for rate 0 (or not a number).
fn quota(rate_per_second: f64, burst: u32) -> Option<Quota> {
    if !rate_per_second.is_finite() || rate_per_second <= 0.0 {
        return None;
    }
    // One cell every 1/rate seconds, in whole nanoseconds (so 0.1/s is exactly 10 s;
    // absurdly slow rates saturate at ~584 years, absurdly fast ones at 1 ns).
    let period_ns = (1e9 / rate_per_second).round() as u64;
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(Duration::from_nanos(period_ns.max(1))).map(|q| q.allow_burst(burst))
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter on the default clock.
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        Self::from_keyed(quota(rate_per_second, burst).map(governor::RateLimiter::keyed))
    }
}

impl<K: Hash + Eq + Clone, C: Clock> RateLimiter<K, C> {
    /// A limiter on `clock` (tests: `governor::clock::FakeRelativeClock`).
    pub fn with_clock(rate_per_second: f64, burst: u32, clock: C) -> Self {
        Self::from_keyed(
            quota(rate_per_second, burst)
                .map(|q| governor::RateLimiter::new(q, DefaultKeyedStateStore::default(), clock)),
        )
    }

    fn from_keyed(keyed: Option<Keyed<K, C>>) -> Self {
        Self {
            keyed,
            sweep_at: AtomicUsize::new(SWEEP_AT),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.keyed.is_some()
    }

    /// Devices currently tracked (0 when disabled).
    pub fn len(&self) -> usize {
        self.keyed.as_ref().map_or(0, |k| k.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lets one request of `key` through; `Err(wait)` when it must wait that long.
    pub fn check(&self, key: K) -> Result<(), Duration> {
        let Some(keyed) = &self.keyed else {
            return Ok(());
        };
        let result = keyed
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(keyed.clock().now()));
        self.bound_memory(keyed);
        result
    }

    /// Sweeps idle devices once the map reaches the threshold (one sweeper at a time).
    fn bound_memory(&self, keyed: &Keyed<K, C>) {
        let threshold = self.sweep_at.load(Ordering::Relaxed);
        if keyed.len() < threshold
            || self
                .sweep_at
                .compare_exchange(threshold, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        keyed.retain_recent();
        keyed.shrink_to_fit();
        let left = keyed.len();
        tracing::debug!(left, "Rate limiter: dropped idle devices.");
        self.sweep_at
            .store(left.saturating_mul(2).max(SWEEP_AT), Ordering::Release);
    }
}

impl<K: Hash + Eq + Clone, C: Clock> std::fmt::Debug for RateLimiter<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("enabled", &self.is_enabled())
            .field("keys", &self.len())
            .finish()
    }
}

/// Whole seconds for `Retry-After` (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limiter(rate: f64, burst: u32) -> (RateLimiter<Uuid, FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimiter::with_clock(rate, burst, clock.clone()), clock)
    }

    #[test]
    fn burst_then_refill() {
        let (limiter, clock) = limiter(2.0, 3);
        let dev = Uuid::new_v4();
        let other = Uuid::new_v4();
        for _ in 0..3 {
            assert!(limiter.check(dev).is_ok());
        }
        let wait = limiter.check(dev).unwrap_err();
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO);
        assert_eq!(retry_after_secs(wait), 1);
        // Another device has its own bucket.
        assert!(limiter.check(other).is_ok());
        clock.advance(Duration::from_millis(500));
        assert!(limiter.check(dev).is_ok());
        assert!(limiter.check(dev).is_err());
        // Idle long enough, the bucket is full again but never more than the burst.
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(limiter.check(dev).is_ok());
        }
        assert!(limiter.check(dev).is_err());
    }

    #[test]
    fn zero_rate_disables() {
        let limiter = RateLimiter::<Uuid>::new(0.0, 1);
        assert!(!limiter.is_enabled());
        let dev = Uuid::new_v4();
        for _ in 0..100 {
            assert!(limiter.check(dev).is_ok());
        }
        assert!(limiter.is_empty());
    }

    #[test]
    fn slow_rates_give_long_retry_after() {
        let (limiter, _clock) = limiter(0.1, 1);
        let dev = Uuid::new_v4();
        assert!(limiter.check(dev).is_ok());
        let wait = limiter.check(dev).unwrap_err();
        assert_eq!(retry_after_secs(wait), 10);
    }

    #[test]
    fn the_default_clock_limits_too() {
        let limiter = RateLimiter::<Uuid>::new(0.1, 2);
        let dev = Uuid::new_v4();
        assert!(limiter.check(dev).is_ok());
        assert!(limiter.check(dev).is_ok());
        let wait = limiter.check(dev).unwrap_err();
        assert_eq!(retry_after_secs(wait), 10);
    }

    #[test]
    fn idle_devices_are_swept() {
        let (limiter, clock) = limiter(2.0, 3);
        limiter.sweep_at.store(10, Ordering::Relaxed);
        let busy = Uuid::new_v4();
        for _ in 0..9 {
            assert!(limiter.check(Uuid::new_v4()).is_ok());
        }
        assert_eq!(limiter.len(), 9);
        // All idle for a minute (buckets full again), then a tenth device: sweep.
        clock.advance(Duration::from_secs(60));
        assert!(limiter.check(busy).is_ok());
        assert_eq!(
            limiter.len(),
            1,
            "only the device that just spent a token stays"
        );
        assert_eq!(limiter.sweep_at.load(Ordering::Relaxed), SWEEP_AT);
        // The busy device kept its state: two tokens left, then refused.
        assert!(limiter.check(busy).is_ok());
        assert!(limiter.check(busy).is_ok());
        assert!(limiter.check(busy).is_err());
    }
}
