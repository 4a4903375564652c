//! When to connect again after an error: at once and often right after a
//! connection that had lasted is lost, otherwise with backoff.
//!
//! A broker that restarts accepts devices and bridges alike the moment it
//! listens. Wherever it routes nothing to a shared-subscription member until
//! that member subscribes again (Mosquitto after a restart,
//! docs/reliability.md), a bridge that comes back after the devices misses what
//! they publish in between, so for [`FAST_WINDOW`] after the loss attempts
//! follow each other every [`FAST_DELAY`]. Only a connection that had lasted at
//! least that window retries fast: one the broker closes right after its
//! ConnAck (a refused subscription, a second client with the same id) backs off
//! as before instead of flapping.

use std::time::{Duration, Instant};

use argus_pipeline::backoff::Backoff;

/// How long after losing an established connection attempts stay fast.
pub const FAST_WINDOW: Duration = Duration::from_secs(3);
/// The delay between attempts inside [`FAST_WINDOW`].
pub const FAST_DELAY: Duration = Duration::from_millis(25);

/// The next attempt after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// How long to wait before it.
    pub delay: Duration,
    /// Whether it is reported (metric and warning): the first attempt after a
    /// loss and every backed-off one, not each attempt of the fast window.
    pub reported: bool,
}

/// One connection's reconnect state.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Backoff,
    connected_at: Option<Instant>,
    lost_at: Option<Instant>,
}

impl Reconnect {
    /// Backing off up to `max` outside the fast window.
    pub fn new(max: Duration) -> Self {
        Reconnect {
            backoff: Backoff::new(max),
            connected_at: None,
            lost_at: None,
        }
    }

    /// The broker sent ConnAck.
    pub fn connected(&mut self, now: Instant) {
        self.backoff.reset();
        self.connected_at = Some(now);
        self.lost_at = None;
    }

    /// The connection failed (lost, or an attempt refused): when to try again.
    pub fn failed(&mut self, now: Instant) -> Retry {
        let just_lost = self.connected_at.take();
        if just_lost.is_some_and(|at| now.duration_since(at) >= FAST_WINDOW) {
            self.lost_at = Some(now);
        }
        let fast = self
            .lost_at
            .is_some_and(|at| now.duration_since(at) < FAST_WINDOW);
        Retry {
            delay: if fast {
                FAST_DELAY
            } else {
                self.backoff.next_delay()
            },
            reported: just_lost.is_some() || !fast,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn a_lasting_connection_lost_retries_fast_for_the_window_then_backs_off() {
        let t0 = Instant::now();
        let mut r = Reconnect::new(MAX);
        r.connected(t0);
        let lost = t0 + Duration::from_secs(60);
        let first = r.failed(lost);
        assert_eq!(
            first,
            Retry {
                delay: FAST_DELAY,
                reported: true
            }
        );
        let again = r.failed(lost + Duration::from_secs(2));
        assert_eq!(
            again,
            Retry {
                delay: FAST_DELAY,
                reported: false
            }
        );
        let past = r.failed(lost + FAST_WINDOW);
        assert!(past.reported);
        assert!(
            past.delay >= Backoff::INITIAL / 2 && past.delay <= Backoff::INITIAL,
            "{past:?}"
        );
    }

    #[test]
    fn a_connection_closed_soon_after_its_connack_backs_off() {
        let t0 = Instant::now();
        let mut r = Reconnect::new(MAX);
        r.connected(t0);
        let retry = r.failed(t0 + Duration::from_millis(200));
        assert!(retry.reported);
        assert!(retry.delay >= Backoff::INITIAL / 2, "{retry:?}");
    }

    #[test]
    fn attempts_before_any_connack_back_off_and_are_each_reported() {
        let t0 = Instant::now();
        let mut r = Reconnect::new(MAX);
        let a = r.failed(t0);
        let b = r.failed(t0 + Duration::from_millis(100));
        assert!(a.reported && b.reported);
        assert!(
            a.delay >= Backoff::INITIAL / 2 && a.delay <= Backoff::INITIAL,
            "{a:?}"
        );
        assert!(
            b.delay >= Backoff::INITIAL && b.delay <= 2 * Backoff::INITIAL,
            "{b:?}"
        );
    }

    #[test]
    fn a_connack_ends_the_window_and_the_next_loss_starts_a_new_one() {
        let t0 = Instant::now();
        let mut r = Reconnect::new(MAX);
        r.connected(t0);
        let lost = t0 + Duration::from_secs(10);
        r.failed(lost);
        r.connected(lost + Duration::from_millis(50));
        // Lost again before the new connection lasted: no fast retries.
        let early = r.failed(lost + Duration::from_secs(1));
        assert!(early.delay >= Backoff::INITIAL / 2, "{early:?}");
        r.connected(lost + Duration::from_secs(2));
        let later = r.failed(lost + Duration::from_secs(20));
        assert_eq!(
            later,
            Retry {
                delay: FAST_DELAY,
                reported: true
            }
        );
    }
}
