//! The one retry delay of every Argus loop that waits out an outage (the MQTT
//! reconnect, the sink's flush retries, the registry's invalidation listener, the
//! bridge's device look-up): exponential, capped, with jitter.
//!
//! The delay starts at `initial` and doubles up to `max`; each delay is drawn
//! uniformly from `[d/2, d]`, so replicas that failed together do not retry in
//! step. [`Backoff::reset`] after a success.

use std::time::Duration;

use rand::Rng as _;

/// Exponential backoff with jitter: `initial`, `2 × initial`, ... up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// The default first delay.
    pub const INITIAL: Duration = Duration::from_millis(100);

    /// From [`Backoff::INITIAL`] up to `max`.
    pub fn new(max: Duration) -> Self {
        Self::between(Self::INITIAL, max)
    }

    /// From `initial` up to `max` (a `max` below `initial` means `initial`).
    pub fn between(initial: Duration, max: Duration) -> Self {
        Backoff {
            next: initial,
            initial,
            max: max.max(initial),
        }
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The next delay: uniform in `[d/2, d]`, then `d` doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = d.saturating_mul(2).min(self.max);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::between(Duration::from_millis(100), Duration::from_millis(350));
        let bounds = [(50, 100), (100, 200), (175, 350), (175, 350)];
        for (lo, hi) in bounds {
            let d = b.next_delay();
            assert!(
                (Duration::from_millis(lo)..=Duration::from_millis(hi)).contains(&d),
                "{d:?} not in [{lo}ms, {hi}ms]"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn a_cap_below_the_start_is_the_start() {
        let mut b = Backoff::between(Duration::from_secs(1), Duration::from_millis(10));
        for _ in 0..5 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
    }
}
