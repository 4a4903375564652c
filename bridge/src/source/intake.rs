//! The queue from a connection's poll task to its worker. Pushing never blocks:
//! the poll task must never wait on anything but `EventLoop::poll`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use rumqttc::Publish;

use crate::metrics;

/// The queue from the poll task to the worker.
///
/// The poll task must never wait (the rumqttc manual-ack deadlock: `client.ack()` goes
/// through the request channel that `poll` drains), so pushing never blocks. The queue
/// is bounded by the protocol instead of by a capacity: it only holds messages
/// of the current connection that are not yet acknowledged, and the broker
/// never has more than its inflight window of those outstanding. Entries of a
/// lost connection are purged on reconnect (the broker redelivers them).
/// A length above `--max-inflight` is reported as a configuration mismatch.
#[derive(Default)]
pub(super) struct Intake {
    queue: Mutex<VecDeque<Received>>,
    closed: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

pub(super) enum Pushed {
    Queued(usize),
    Closed,
}

impl Intake {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Received>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn push(&self, r: Received) -> Pushed {
        let len = {
            let mut q = self.lock();
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Pushed::Closed;
            }
            q.push_back(r);
            q.len()
        };
        self.notify.notify_one();
        Pushed::Queued(len)
    }

    /// Stops accepting; what is queued can still be popped.
    pub(super) fn close(&self) {
        {
            let _q = self.lock();
            self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.notify.notify_one();
    }

    /// Removes entries received before `epoch`; returns how many.
    pub(super) fn purge_before(&self, epoch: u64) -> usize {
        let mut q = self.lock();
        let before = q.len();
        q.retain(|r| r.epoch >= epoch);
        before - q.len()
    }

    /// The next entry; `None` once closed and empty.
    pub(super) async fn pop(&self) -> Option<Received> {
        loop {
            {
                let mut q = self.lock();
                if let Some(r) = q.pop_front() {
                    return Some(r);
                }
                if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                    return None;
                }
            }
            // `notify_one` stores a permit when nobody waits, so a push
            // between the check above and this await is not missed.
            self.notify.notified().await;
        }
    }
}

/// `n` messages left the in-flight set without an ack (their connection is gone).
pub(super) fn release_in_flight(n: usize) {
    if n > 0 {
        metrics::in_flight(-(n as f64));
    }
}

/// A publish handed from the poll task to the worker.
pub(super) struct Received {
    pub(super) epoch: u64,
    pub(super) publish: Publish,
    pub(super) at: Instant,
    pub(super) received_at: DateTime<Utc>,
}
