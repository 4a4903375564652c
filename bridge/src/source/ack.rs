//! In-order, durable-only acknowledgements: the acker awaits each admitted
//! message's [`Durable`] in receive order and PUBACKs it, but only on the
//! connection attempt (the [`Epoch`]) that received it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, EventLoop, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::handler::Durable;
use crate::metrics;

/// Which connection attempt of a connection is current (see the module docs).
pub(super) struct Epoch {
    current: Mutex<u64>,
}

impl Epoch {
    pub(super) fn new() -> Self {
        Epoch {
            current: Mutex::new(0),
        }
    }

    pub(super) fn get(&self) -> u64 {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts a new epoch after a lost connection and removes any ack still
/// queued for the old one.
pub(super) fn bump_epoch(epoch: &Epoch, eventloop: &mut EventLoop) -> u64 {
    let mut g = epoch.current.lock().unwrap_or_else(|p| p.into_inner());
    *g += 1;
    // `clean` drops queued PubAcks from the request channel (the network is
    // already gone, so it touches nothing else). The acker only queues an ack
    // while holding this lock and after checking the epoch, so none for the
    // old epoch can be queued after this point.
    eventloop.clean();
    *g
}

/// An admitted publish waiting, in order, for durability.
pub(super) struct Pending {
    pub(super) epoch: u64,
    pub(super) publish: Publish,
    pub(super) at: Instant,
    pub(super) durable: Durable,
}

pub(super) async fn acker(
    mut pending: mpsc::Receiver<Pending>,
    client: AsyncClient,
    epoch: Arc<Epoch>,
    client_id: Arc<str>,
    drained: CancellationToken,
) {
    while let Some(Pending {
        epoch: msg_epoch,
        publish,
        at,
        durable,
    }) = pending.recv().await
    {
        let result = durable.await;
        metrics::in_flight(-1.0);
        match result {
            Ok(()) if publish.qos == QoS::AtMostOnce => {}
            Ok(()) => {
                if ack_in_epoch(&client, &epoch, msg_epoch, &publish).await {
                    metrics::acked(at.elapsed());
                } else {
                    metrics::stale_ack();
                }
            }
            Err(e) => {
                // Not durable: never acknowledge it. Acknowledging the later
                // messages would leave this one unacknowledged until the next
                // session anyway, so end this session: the broker redelivers.
                let mut g = epoch.current.lock().unwrap_or_else(|p| p.into_inner());
                if *g == msg_epoch {
                    warn!(client_id = %client_id, error = %e, "Message not durable; reconnecting so the broker redelivers it.");
                    // Fence off the rest of this epoch's acks.
                    *g += 1;
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

/// Queues the ack of `publish` if its connection is still the current one. Returns
/// false when the ack is stale (the broker will redeliver the message).
async fn ack_in_epoch(
    client: &AsyncClient,
    epoch: &Epoch,
    msg_epoch: u64,
    publish: &Publish,
) -> bool {
    loop {
        {
            let g = epoch.current.lock().unwrap_or_else(|p| p.into_inner());
            if *g != msg_epoch {
                return false;
            }
            if client.try_ack(publish).is_ok() {
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
