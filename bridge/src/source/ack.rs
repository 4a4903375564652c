//! In-order, durable-only acknowledgements: the acker awaits each admitted
//! message's [`Durable`] in receive order and PUBACKs it, but only on the
//! connection attempt (the [`Epoch`]) that received it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::handler::Durable;
use super::protocol::{Client, EventLoop, Inbound};
use super::unacked::Head;
use crate::metrics;

/// Which connection attempt of a connection is current (see the module docs),
/// and the packet ids of its QoS 1 messages that are queued and not yet
/// acknowledged.
pub(super) struct Epoch {
    state: Mutex<EpochState>,
}

struct EpochState {
    current: u64,
    /// Packet ids received on the current epoch and not yet acknowledged. A DUP
    /// of one of them is the broker re-sending a message we already hold (EMQX
    /// `retry_interval`): queuing it again would acknowledge its packet id twice,
    /// and the second PUBACK could acknowledge a later message that reused it.
    outstanding: HashSet<u16>,
    /// PUBACKs handed to the request channel, over all epochs.
    acks_queued: u64,
}

impl Epoch {
    pub(super) fn new() -> Self {
        Epoch {
            state: Mutex::new(EpochState {
                current: 0,
                outstanding: HashSet::new(),
                acks_queued: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EpochState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(&self) -> u64 {
        self.lock().current
    }

    /// Records a QoS 1 publish of epoch `epoch` as outstanding. False when it is a
    /// DUP of a packet id still outstanding: the copy is not queued.
    pub(super) fn track(&self, epoch: u64, publish: &Inbound) -> bool {
        if publish.qos == QoS::AtMostOnce {
            return true;
        }
        let mut g = self.lock();
        if g.current != epoch {
            return true;
        }
        g.outstanding.insert(publish.pkid) || !publish.dup
    }

    /// True when epoch `epoch` holds more unacknowledged QoS 1 publishes than
    /// `window`: the broker sent past the Receive Maximum.
    pub(super) fn over_window(&self, epoch: u64, window: usize) -> bool {
        let g = self.lock();
        g.current == epoch && g.outstanding.len() > window
    }

    /// Forgets a packet id [`Epoch::track`] recorded whose publish was not queued.
    pub(super) fn untrack(&self, epoch: u64, pkid: u16) {
        let mut g = self.lock();
        if g.current == epoch {
            g.outstanding.remove(&pkid);
        }
    }

    /// True when no QoS 1 publish queued on epoch `epoch` awaits its PUBACK and
    /// every PUBACK queued so far has been written (`acks_written`, counted by
    /// the poll task from `Outgoing::PubAck` events).
    pub(super) fn drained(&self, epoch: u64, acks_written: u64) -> bool {
        let g = self.lock();
        g.current != epoch || (g.outstanding.is_empty() && g.acks_queued == acks_written)
    }

    /// PUBACKs queued so far (those dropped with an old connection included).
    pub(super) fn acks_queued(&self) -> u64 {
        self.lock().acks_queued
    }
}

/// Starts a new epoch after a lost connection and removes any ack still
/// queued for the old one.
pub(super) fn bump_epoch(epoch: &Epoch, eventloop: &mut EventLoop) -> u64 {
    let mut g = epoch.lock();
    g.current += 1;
    g.outstanding.clear();
    // `clean` drops the network (when it is not gone already) and the PubAcks
    // still queued in the request channel; other requests are kept and sent
    // after the next ConnAck. The acker only queues an ack while holding this
    // lock and after checking the epoch, so none for the old epoch can be
    // queued after this point. It also forgets the publishes the old
    // connection read but `poll` has not yielded yet: handing them out now
    // would tag them with the new epoch and acknowledge their packet ids on
    // the new connection, where they may name other messages. The broker
    // redelivers them.
    eventloop.clean();
    g.current
}

/// An admitted publish waiting, in order, for durability.
pub(super) struct Pending {
    pub(super) epoch: u64,
    pub(super) qos: QoS,
    pub(super) pkid: u16,
    pub(super) at: Instant,
    pub(super) durable: Durable,
}

pub(super) async fn acker(
    mut pending: mpsc::Receiver<Pending>,
    client: Client,
    epoch: Arc<Epoch>,
    client_id: Arc<str>,
    head: Arc<Head>,
    drained: CancellationToken,
) {
    while let Some(Pending {
        epoch: msg_epoch,
        qos,
        pkid,
        at,
        durable,
    }) = pending.recv().await
    {
        head.acker(Some(at));
        let result = durable.await;
        head.acker(None);
        metrics::in_flight(-1.0);
        match result {
            Ok(()) if qos == QoS::AtMostOnce => {}
            Ok(()) => {
                if ack_in_epoch(&client, &epoch, msg_epoch, qos, pkid).await {
                    metrics::acked(at.elapsed());
                } else {
                    metrics::stale_ack();
                }
            }
            Err(e) => {
                // Not durable: never acknowledge it. Acknowledging the later
                // messages would leave this one unacknowledged until the next
                // session anyway, so end this session: the broker redelivers.
                let mut g = epoch.lock();
                if g.current == msg_epoch {
                    warn!(client_id = %client_id, error = %e, "Message not durable; reconnecting so the broker redelivers it.");
                    // Fence off the rest of this epoch's acks.
                    g.current += 1;
                    g.outstanding.clear();
                    let _ = client.try_disconnect();
                }
            }
        }
    }
    // The intake is closed and everything admitted has been handled: ask for
    // a clean DISCONNECT, queued behind the last ack.
    drained.cancel();
    let _ = client.try_disconnect();
}

/// Queues the ack of packet `pkid` if its connection is still the current one. Returns
/// false when the ack is stale (the broker will redeliver the message).
async fn ack_in_epoch(client: &Client, epoch: &Epoch, msg_epoch: u64, qos: QoS, pkid: u16) -> bool {
    loop {
        {
            let mut g = epoch.lock();
            if g.current != msg_epoch {
                return false;
            }
            if client.try_ack(qos, pkid).is_ok() {
                // From now on the broker may reuse the packet id.
                g.outstanding.remove(&pkid);
                g.acks_queued += 1;
                return true;
            }
        }
        // The request channel holds more than this connection can have
        // unacknowledged, so it is only full (or closed) while the poll task is
        // between connections; wait without holding the lock. The connection
        // task aborts this task when it ends.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
