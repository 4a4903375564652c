//! The queue from a connection's poll task to its worker. Pushing never blocks:
//! the poll task must never wait on anything but `EventLoop::poll`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use rumqttc::QoS;

use super::protocol::Inbound;
use crate::config::IntakeLimits;
use crate::metrics;

/// The queue from the poll task to the worker, bounded in count and bytes.
///
/// The poll task must never wait (the rumqttc manual-ack deadlock: `client.ack()` goes
/// through the request channel that `poll` drains), so pushing never blocks: past
/// the bound, [`Intake::push`] refuses the publish and the poll task decides.
/// The broker's inflight window does not bound this queue: QoS 0 has no window,
/// Mosquitto 2.0 lets more out than its window, and EMQX re-sends unacknowledged
/// messages every `retry_interval` on the same connection. Entries of a lost
/// connection are purged on reconnect (the broker redelivers them).
pub(super) struct Intake {
    state: Mutex<State>,
    limits: IntakeLimits,
    closed: AtomicBool,
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Received>,
    bytes: usize,
}

pub(super) enum Pushed {
    Queued(usize),
    /// Past the bound; the publish was not queued.
    Full(Received),
    /// Draining; the publish was not queued.
    Closed,
}

impl Intake {
    pub(super) fn new(limits: IntakeLimits) -> Self {
        Intake {
            state: Mutex::default(),
            limits,
            closed: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn push(&self, r: Received) -> Pushed {
        let len = {
            let mut s = self.lock();
            if self.closed.load(Ordering::SeqCst) {
                return Pushed::Closed;
            }
            let size = r.size();
            if !fits(s.queue.len(), s.bytes, size, &self.limits) {
                return Pushed::Full(r);
            }
            s.bytes += size;
            s.queue.push_back(r);
            s.queue.len()
        };
        self.notify.notify_one();
        Pushed::Queued(len)
    }

    /// Stops accepting; what is queued can still be popped.
    pub(super) fn close(&self) {
        {
            let _s = self.lock();
            self.closed.store(true, Ordering::SeqCst);
        }
        self.notify.notify_one();
    }

    /// Removes the QoS 1 entries received before `epoch` (the broker redelivers
    /// them on the resumed session); returns how many. QoS 0 entries stay: they
    /// need no acknowledgement and are never sent again.
    pub(super) fn purge_before(&self, epoch: u64) -> usize {
        let mut s = self.lock();
        let before = s.queue.len();
        s.queue.retain(|r| r.epoch >= epoch || r.is_qos0());
        s.bytes = s.queue.iter().map(Received::size).sum();
        // Give a flood's memory back rather than keep the high-water mark.
        s.queue.shrink_to(64);
        before - s.queue.len()
    }

    /// Empties the queue when the connection task ends: QoS 1 entries are left
    /// to the broker, QoS 0 entries are counted as shed. Returns how many.
    pub(super) fn discard_all(&self) -> usize {
        let mut s = self.lock();
        let n = s.queue.len();
        for r in s.queue.drain(..) {
            if r.is_qos0() {
                metrics::shed_qos0();
            }
        }
        s.bytes = 0;
        n
    }

    /// The next entry; `None` once closed and empty.
    pub(super) async fn pop(&self) -> Option<Received> {
        loop {
            {
                let mut s = self.lock();
                if let Some(r) = s.queue.pop_front() {
                    s.bytes -= r.size();
                    if s.queue.is_empty() {
                        s.queue.shrink_to(64);
                    }
                    return Some(r);
                }
                if self.closed.load(Ordering::SeqCst) {
                    return None;
                }
            }
            // `notify_one` stores a permit when nobody waits, so a push
            // between the check above and this await is not missed.
            self.notify.notified().await;
        }
    }
}

/// Whether a publish of `size` bytes may join an intake holding `queued`
/// publishes of `queued_bytes`. An empty intake takes any one publish (the
/// payload limit bounds it), so a bound below one publish never stops a
/// connection. Past the bound the poll task sheds a QoS 0 publish and drops
/// the connection for a QoS 1 one (see [`super::connection`]).
pub fn fits(queued: usize, queued_bytes: usize, size: usize, limits: &IntakeLimits) -> bool {
    queued == 0 || (queued < limits.max_messages && queued_bytes + size <= limits.max_bytes)
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
    pub(super) publish: Inbound,
    pub(super) at: Instant,
    pub(super) received_at: DateTime<Utc>,
}

impl Received {
    /// What it costs the intake: topic plus payload bytes.
    pub(super) fn size(&self) -> usize {
        self.publish.topic.len() + self.publish.payload.len()
    }

    pub(super) fn is_qos0(&self) -> bool {
        self.publish.qos == QoS::AtMostOnce
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(qos: QoS, payload: usize) -> Received {
        Received {
            epoch: 0,
            publish: Inbound {
                topic: "t".into(),
                qos,
                pkid: 0,
                dup: false,
                payload: vec![b'x'; payload].into(),
                properties: None,
            },
            at: Instant::now(),
            received_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn bounded_by_count_and_bytes_and_freed_by_pop() {
        let intake = Intake::new(IntakeLimits {
            max_messages: 3,
            max_bytes: 250,
        });
        // One publish over the byte bound still enters an empty queue.
        assert!(matches!(
            intake.push(received(QoS::AtLeastOnce, 400)),
            Pushed::Queued(1)
        ));
        assert!(matches!(
            intake.push(received(QoS::AtMostOnce, 1)),
            Pushed::Full(_)
        ));
        assert!(intake.pop().await.is_some());
        for n in 1..=3 {
            assert!(
                matches!(intake.push(received(QoS::AtMostOnce, 10)), Pushed::Queued(l) if l == n)
            );
        }
        // Count bound.
        assert!(matches!(
            intake.push(received(QoS::AtMostOnce, 10)),
            Pushed::Full(_)
        ));
        intake.pop().await;
        // Byte bound: 2 × 11 queued, 11 + 240 > 250.
        assert!(matches!(
            intake.push(received(QoS::AtMostOnce, 240)),
            Pushed::Full(_)
        ));
        assert!(matches!(
            intake.push(received(QoS::AtMostOnce, 200)),
            Pushed::Queued(3)
        ));
        // A new epoch purges QoS 1 only: QoS 0 is never redelivered.
        assert!(matches!(intake.pop().await, Some(r) if r.is_qos0()));
        assert!(matches!(
            intake.push(received(QoS::AtLeastOnce, 10)),
            Pushed::Queued(3)
        ));
        assert_eq!(intake.purge_before(1), 1);
        assert_eq!(intake.discard_all(), 2);
        assert!(matches!(
            intake.push(received(QoS::AtMostOnce, 240)),
            Pushed::Queued(1)
        ));
    }
}
