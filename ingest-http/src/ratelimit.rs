//! Per-device token bucket: `rate` requests per second on average, `burst` at once.
//!
//! One request costs one token, whatever the number of readings it carries (the body
//! limit and `--max-batch-readings` bound a request's weight). An empty bucket answers
//! 429 with `Retry-After`: the whole seconds until a token is back.
//!
//! Buckets live in one map behind a short-lived `std` mutex (no await while held).
//! The map is bounded: when it grows past `max_devices`, buckets that have refilled
//! completely (idle devices) are dropped; they carry no state worth keeping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A per-device rate limiter. `rate == 0` disables it.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_devices: usize,
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        Self {
            rate: rate_per_second.max(0.0),
            burst: f64::from(burst.max(1)),
            max_devices: 100_000,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes one token for `device`; `Err(wait)` when none is left.
    pub fn check(&self, device: Uuid) -> Result<(), Duration> {
        if !self.is_enabled() {
            return Ok(());
        }
        let now = Instant::now();
        // A poisoned lock only means another request panicked mid-update; the map is
        // still a valid map of buckets, so keep using it.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= self.max_devices && !buckets.contains_key(&device) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        let bucket = buckets.entry(device).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

/// Whole seconds for `Retry-After` (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill() {
        let limiter = RateLimiter::new(2.0, 3);
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
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limiter.check(dev).is_ok());
        assert!(limiter.check(dev).is_err());
        // Idle long enough, the bucket is full again but never more than the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert!(limiter.check(dev).is_ok());
        }
        assert!(limiter.check(dev).is_err());
    }

    #[test]
    fn zero_rate_disables() {
        let limiter = RateLimiter::new(0.0, 1);
        let dev = Uuid::new_v4();
        for _ in 0..100 {
            assert!(limiter.check(dev).is_ok());
        }
    }

    #[test]
    fn slow_rates_give_long_retry_after() {
        let limiter = RateLimiter::new(0.1, 1);
        let dev = Uuid::new_v4();
        assert!(limiter.check(dev).is_ok());
        let wait = limiter.check(dev).unwrap_err();
        assert_eq!(retry_after_secs(wait), 10);
    }
}
