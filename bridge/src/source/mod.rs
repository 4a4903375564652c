//! The MQTT source: `--connections` shared-subscription connections per process,
//! each with in-order, durable-only PUBACKs.
//!
//! Files: [`handler`] (what a message is handed to), [`tls`] and [`options`]
//! (how a connection is set up), [`protocol`] (MQTT 5 and 3.1.1 behind one face), [`connection`] (the poll loop),
//! [`reconnect`] (when to connect again), [`intake`] (poll task to worker),
//! [`worker`] (admits in order), [`ack`] (in-order PUBACKs), [`unacked`] (the
//! age of the oldest unacknowledged message, for `/ready`).
//!
//! ## One connection, three tasks
//!
//! ```text
//!  broker ──> poll task ──(intake)──> worker ──(pending, cap = max_inflight)──> acker ──> client.try_ack
//!              ^  never awaits anything but EventLoop::poll   admit(): checks, registry,    awaits durability
//!              '──────── request channel (cap = 2 * max_inflight + 16) <──────────────────'  in receive order
//! ```
//!
//! - The **poll task** only drives [`rumqttc::EventLoop::poll`]. It stamps each
//!   publish with its receive time and pushes it onto the intake, which never
//!   blocks (see [`intake`]). The intake is bounded in count and bytes
//!   (`--intake-max-messages`, `--intake-max-bytes`), because the broker's
//!   inflight window does not bound it (QoS 0 has none, Mosquitto 2.0 exceeds
//!   it, EMQX re-sends unacknowledged messages). Past the bound a QoS 0 message
//!   is shed and counted; a QoS 1 message drops the connection, so the broker
//!   keeps it and redelivers it on the resumed session. A DUP of a packet id
//!   still outstanding on the connection is not queued twice. Entries of a
//!   lost connection are purged when it reconnects. A length above
//!   `--max-inflight` means the broker's window is larger than configured and
//!   is reported (metric and warning).
//! - The **worker** awaits [`Handler::admit`] for one publish at a time, in
//!   receive order: topic and payload checks, the registry look-up, and a place
//!   in the sink (it waits there when the sink is full: backpressure). `admit`
//!   returns a [`Durable`] future that completes when the message is stored and
//!   published, or dead-lettered.
//! - The **acker** awaits those futures in receive order and acknowledges each
//!   with `try_ack`. The request channel holds more than the connection can
//!   ever have unacknowledged, so `try_ack` does not find it full.
//!
//! Backpressure: when the sink is full the worker waits, the intake queue
//! fills up to the broker's window, the broker stops sending (its inflight
//! window is full of unacknowledged messages) and keeps the rest queued. The
//! poll task keeps reading and writing (pings, acks) all the while. A broker
//! that sends past its window meets the intake's bound instead (above).
//!
//! ## Sessions and reconnects
//!
//! Client ids are stable (`bridge-<replica>-<connection>`) and sessions
//! persistent (`clean_session = false`), so a restarted replica resumes its
//! sessions and the messages the broker queued for them (Mosquitto and EMQX keep serving a
//! shared-subscription member's session while it is away: `docs/bridge.md`).
//! After a disconnect the poll task waits with exponential backoff and jitter
//! and polls again, which reconnects; it subscribes again after every ConnAck.
//!
//! Each connection attempt is an *epoch*. An acknowledgement is only sent on
//! the connection that received the message: the broker redelivers everything
//! unacknowledged when the session resumes, and the message id makes the copy
//! harmless, whereas a stale packet id sent on a new connection could
//! acknowledge a different message.

mod ack;
pub mod connection;
pub mod handler;
mod intake;
pub mod options;
pub mod protocol;
mod reconnect;
pub mod tls;
pub mod unacked;
mod worker;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::error;

pub use connection::run_connection;
pub use handler::{Durable, Handler, Message, NotDurable};
pub use intake::fits as intake_fits;
pub use options::mqtt_options;
pub use tls::{tls_config, tls_configs, TlsError};
pub use unacked::Unacked;

use crate::config::MqttConfig;
use crate::server::Status;

/// Runs all `--connections` connections until `shutdown` is cancelled, then
/// drains them: no new messages are admitted, admitted ones are acknowledged
/// once durable, and each connection disconnects cleanly.
pub async fn run<H: Handler>(
    cfg: MqttConfig,
    tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    handler: Arc<H>,
    status: Status,
    unacked: Unacked,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..cfg.connections {
        let opts = mqtt_options(&cfg, conn, tls.get(usize::from(conn)).cloned().flatten());
        tasks.spawn(run_connection(
            cfg.clone(),
            conn,
            opts,
            handler.clone(),
            status.clone(),
            unacked.clone(),
            shutdown.clone(),
        ));
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            error!(error = %e, "An MQTT connection task failed.");
        }
    }
}
