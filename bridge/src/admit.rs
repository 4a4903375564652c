//! The admit stage: what happens to one MQTT message between the source and the
//! sink, in receive order per connection.
//!
//! ```text
//! Message ──> properties ──> reading::check ──> chunk fields ──> Registry (device -> tenant) ──> SinkHandle::enqueue ──> Durable
//!                '── reject ──────'── reject ────────'── reject ───────'── unknown / not active ──> DlqPublisher ──> Durable
//! ```
//!
//! An MQTT 5 message's publish properties are checked first (bounds, what
//! `jsonb` can store: `invalid_properties`), then the payload; chunk fields sent
//! as user properties fill in the payload's (a disagreement is `chunk_conflict`),
//! and the properties are stored with the reading (`argus_pipeline::properties`).
//!
//! [`Admit::admit`] returns once the message has a place in the sink (it waits
//! while the sink is full: backpressure) or its dead letter is on its way; the
//! returned [`Durable`] completes when it is stored and published, or
//! dead-lettered. The source acknowledges it then.

use std::time::Duration;

use argus_pipeline::backoff::Backoff;
use argus_pipeline::dlq::{DeadLetter, DlqPublisher};
use argus_pipeline::properties::PropertyLimits;
use argus_pipeline::reading::{self, DlqReason, Limits, Reading, Reject, Source};
use argus_pipeline::registry::{DeviceInfo, Registry};
use argus_pipeline::sink::SinkHandle;
use futures::FutureExt as _;
use tracing::warn;
use uuid::Uuid;

use crate::metrics;
use crate::source::{Durable, Handler, Message, NotDurable};

/// The admit stage between the source and the sink: checks, registry, DLQ.
pub struct Admit {
    pub sink: SinkHandle,
    pub registry: Registry,
    pub dlq: DlqPublisher,
    pub limits: Limits,
    /// Bounds of an MQTT 5 message's properties.
    pub property_limits: PropertyLimits,
}

impl Admit {
    /// Writes a dead letter in the background, retrying transient failures
    /// (decided by [`argus_pipeline::dlq::DlqError::is_retriable`]) until it is
    /// acknowledged; the returned future completes then, and the message may be
    /// acknowledged. A permanent failure (even an empty letter exceeds the
    /// server's `max_payload`, which the start-up check rules out) also completes
    /// it: the publisher has logged and counted it, and retrying could only
    /// stall the connection forever.
    fn dead_letter(&self, reject: Reject, msg: Message) -> Durable {
        metrics::rejected(reject.reason);
        // Properties within their bounds go with the letter; past them the
        // detail says why, and the letter stays small.
        let properties = msg
            .properties
            .as_deref()
            .filter(|_| reject.reason != DlqReason::InvalidProperties)
            .map(|p| p.to_value());
        let mut letter = DeadLetter::new(
            reject,
            Some(msg.topic),
            Some(msg.client_id.to_string()),
            msg.received_at,
            msg.payload,
        );
        letter.properties = properties;
        let dlq = self.dlq.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_secs(5));
            loop {
                // DlqPublisher logs and counts every failure.
                match dlq.publish(letter.clone()).await {
                    Ok(()) => return,
                    Err(e) if !e.is_retriable() => return,
                    Err(_) => tokio::time::sleep(backoff.next_delay()).await,
                }
            }
        });
        Box::pin(task.map(|r| r.map_err(|e| NotDurable(format!("dead letter task: {e}")))))
    }
}

impl Admit {
    /// Checks `msg` and looks its device up: the reading to store, or why it
    /// is refused (dead-letter it). The live path ([`Handler::admit`]) and the
    /// replay tool (`crate::replay`) both go through here, so a replayed letter
    /// meets the checks live traffic meets.
    pub async fn check(&self, msg: Message) -> Result<Reading, Box<(Reject, Message)>> {
        if let Some(p) = msg.properties.as_deref() {
            if let Err(reject) = p.check(&self.property_limits) {
                return Err(Box::new((reject, msg)));
            }
        }
        let mut checked = match reading::check(&msg.topic, &msg.payload, &self.limits) {
            Ok(c) => c,
            Err(reject) => return Err(Box::new((reject, msg))),
        };
        if let Some(p) = msg.properties.as_deref() {
            if let Err(reject) = p.merge_chunk_fields(&mut checked.fields) {
                return Err(Box::new((reject.with_device(checked.device_id), msg)));
            }
        }
        let device = self.device(checked.device_id).await;
        match route(checked, device.as_ref(), msg) {
            Routed::Store(reading) => Ok(reading),
            Routed::DeadLetter(reject, msg) => Err(Box::new((reject, msg))),
        }
    }

    /// The device's registry entry. The registry retries nothing itself: while
    /// Postgres is unreachable (and the device is in no cache) wait here, which
    /// backs up this connection and, through the broker's inflight window, the
    /// broker.
    pub async fn device(&self, device_id: Uuid) -> Option<DeviceInfo> {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        loop {
            match self.registry.device(device_id).await {
                Ok(d) => return d,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(%device_id, error = %e, retry_in_ms = delay.as_millis() as u64, "Device look-up failed; retrying.");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

impl Handler for Admit {
    async fn admit(&self, msg: Message) -> Durable {
        let reading = match self.check(msg).await {
            Ok(reading) => reading,
            Err(refused) => {
                let (reject, msg) = *refused;
                return self.dead_letter(reject, msg);
            }
        };
        // Waits while the sink is full: backpressure (see `source`).
        match self.sink.enqueue(vec![reading]).await {
            Ok(ticket) => Box::pin(
                ticket.map(|r| r.map(|_| ()).map_err(|e| NotDurable(format!("sink: {e}")))),
            ),
            Err(e) => Box::pin(futures::future::ready(Err(NotDurable(format!(
                "sink: {e}"
            ))))),
        }
    }
}

/// Where a checked message goes once its device is looked up.
#[derive(Debug)]
pub enum Routed {
    /// From an active device: the reading to store.
    Store(Reading),
    /// Anything else: dead-letter the message with this reason.
    DeadLetter(Reject, Message),
}

/// The rest of the admit decision once the device is looked up, without I/O. With
/// [`reading::check`] before it, every message ends in exactly one of store or
/// dead letter (the fuzz target `fuzz/fuzz_targets/admit.rs` drives both, with
/// the intake's shedding before them).
pub fn route(checked: reading::Checked, device: Option<&DeviceInfo>, msg: Message) -> Routed {
    let tenant_id = match tenant(checked.device_id, device) {
        Ok(t) => t,
        Err(reject) => return Routed::DeadLetter(reject, msg),
    };
    let properties = msg.properties.as_deref().map(|p| p.to_json());
    let mut reading = Reading::from_checked(
        checked,
        tenant_id,
        msg.payload,
        msg.received_at,
        Source::Mqtt,
        Some(msg.topic),
        Some(msg.client_id.to_string()),
    );
    reading.properties = properties;
    Routed::Store(reading)
}

/// The tenant of an active device; `unknown_device` or `disabled_device` otherwise.
pub fn tenant(device_id: Uuid, device: Option<&DeviceInfo>) -> Result<Uuid, Reject> {
    match device {
        None => Err(Reject::unknown_device(device_id)),
        Some(d) if !d.is_active() => Err(Reject::disabled_device(device_id, d.status.as_str())),
        Some(d) => Ok(d.tenant_id),
    }
}
