//! The worker of one connection: takes publishes off the intake in receive order,
//! admits each through the [`Handler`] (it may wait there: backpressure) and
//! queues the returned [`Durable`](super::handler::Durable) for the acker.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::ack::{Epoch, Pending};
use super::handler::{Handler, Message};
use super::intake::{release_in_flight, Intake};
use super::unacked::Head;

pub(super) async fn worker<H: Handler>(
    intake: Arc<Intake>,
    pending: mpsc::Sender<Pending>,
    handler: Arc<H>,
    client_id: Arc<str>,
    epoch: Arc<Epoch>,
    head: Arc<Head>,
    shutdown: CancellationToken,
) {
    let mut closed = false;
    loop {
        let mut r = tokio::select! {
            biased;
            () = shutdown.cancelled(), if !closed => {
                // Stage 1 of shutdown: take no more publishes, but finish the
                // ones already queued. (The poll task may be idle inside
                // `poll`, so the worker closes the intake, not the poll task.)
                info!(client_id = %client_id, "Stopping intake; draining admitted messages.");
                intake.close();
                closed = true;
                continue;
            }
            r = intake.pop() => match r {
                Some(r) => r,
                None => break,
            },
        };
        if r.epoch != epoch.get() && !r.is_qos0() {
            // Received on a connection that is gone: the broker sends it again.
            // (QoS 0 is never sent again and needs no ack: it is admitted.)
            release_in_flight(1);
            continue;
        }
        let msg = Message {
            topic: std::mem::take(&mut r.publish.topic),
            payload: std::mem::take(&mut r.publish.payload),
            client_id: client_id.clone(),
            received_at: r.received_at,
            dup: r.publish.dup,
            properties: r.publish.properties.take(),
        };
        head.worker(Some(r.at));
        let durable = handler.admit(msg).await;
        // Keep only what the ack needs; the payload lives on in the sink.
        let p = Pending {
            epoch: r.epoch,
            qos: r.publish.qos,
            pkid: r.publish.pkid,
            at: r.at,
            durable,
        };
        let sent = pending.send(p).await;
        head.worker(None);
        if sent.is_err() {
            break;
        }
    }
}
