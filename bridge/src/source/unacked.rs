//! How long the oldest unacknowledged message has waited, per connection and over
//! the process: the metric `argus_bridge_oldest_unacked_seconds` and the
//! `delivery` check of `/ready` (`--ready-max-unacked-age`).
//!
//! Each connection handles its messages in receive order, so its oldest
//! unacknowledged message is the one its acker awaits, or, while the acker is
//! idle, the one its worker is admitting (the intake only holds newer ones, and
//! the worker takes them at once). The two tasks publish those receive times
//! here.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics;

/// The receive times one connection's tasks are working on.
#[derive(Default)]
pub(super) struct Head {
    acker: Mutex<Option<Instant>>,
    worker: Mutex<Option<Instant>>,
}

impl Head {
    fn slot(m: &Mutex<Option<Instant>>) -> std::sync::MutexGuard<'_, Option<Instant>> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The acker awaits the message received at `at` (`None`: it awaits nothing).
    pub(super) fn acker(&self, at: Option<Instant>) {
        *Self::slot(&self.acker) = at;
    }

    /// The worker admits the message received at `at` (`None`: it admits nothing).
    pub(super) fn worker(&self, at: Option<Instant>) {
        *Self::slot(&self.worker) = at;
    }

    fn oldest(&self) -> Option<Instant> {
        let a = *Self::slot(&self.acker);
        let w = *Self::slot(&self.worker);
        match (a, w) {
            (Some(a), Some(w)) => Some(a.min(w)),
            (a, w) => a.or(w),
        }
    }
}

/// Every connection's [`Head`]. Cheap to clone.
#[derive(Clone)]
pub struct Unacked {
    heads: Arc<[Arc<Head>]>,
}

impl Unacked {
    pub fn new(connections: u16) -> Self {
        Unacked {
            heads: (0..connections)
                .map(|_| Arc::new(Head::default()))
                .collect(),
        }
    }

    pub(super) fn head(&self, conn: u16) -> Arc<Head> {
        self.heads[usize::from(conn)].clone()
    }

    /// How long the oldest unacknowledged message of any connection has waited.
    pub fn oldest_age(&self) -> Option<Duration> {
        self.heads
            .iter()
            .filter_map(|h| h.oldest())
            .min()
            .map(|t| t.elapsed())
    }

    /// The `/ready` check: an error naming the reason once the oldest message has
    /// waited longer than `bound`.
    pub fn check(&self, bound: Duration) -> Result<(), String> {
        match self.oldest_age() {
            Some(age) if age > bound => Err(format!(
                "the oldest unacknowledged message has waited {}s, over --ready-max-unacked-age {}s",
                age.as_secs(),
                bound.as_secs()
            )),
            _ => Ok(()),
        }
    }

    /// Updates the gauge every second and logs when the bound is crossed, either
    /// way, until `stop`.
    pub async fn watch(self, bound: Duration, stop: CancellationToken) {
        let mut over = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let age = self.oldest_age().unwrap_or_default();
            metrics::oldest_unacked(age);
            if age > bound && !over {
                over = true;
                warn!(oldest_unacked_s = age.as_secs(), bound_s = bound.as_secs(), "A message has waited longer than --ready-max-unacked-age without being acknowledged: delivery is stuck (a store down or a message that cannot complete); /ready answers 503.");
            } else if age <= bound && over {
                over = false;
                info!(
                    oldest_unacked_s = age.as_secs(),
                    "Unacknowledged messages are within --ready-max-unacked-age again."
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_over_acker_and_worker_of_every_connection() {
        let u = Unacked::new(2);
        assert_eq!(u.oldest_age(), None);
        assert!(u.check(Duration::ZERO).is_ok());
        let old = Instant::now() - Duration::from_secs(30);
        u.head(1).worker(Some(Instant::now()));
        u.head(1).acker(Some(old));
        u.head(0).worker(Some(Instant::now()));
        assert!(u.oldest_age().expect("some") >= Duration::from_secs(30));
        let e = u.check(Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("--ready-max-unacked-age"), "{e}");
        u.head(1).acker(None);
        assert!(u.check(Duration::from_secs(10)).is_ok());
    }
}
