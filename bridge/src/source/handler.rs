//! What the source hands each message to, and what it gets back: a [`Message`],
//! the [`Handler`] that admits it (the bridge's admit stage, `crate::admit`), and
//! the [`Durable`] future the acker awaits before the PUBACK.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use argus_pipeline::properties::Properties;
use bytes::Bytes;
use chrono::{DateTime, Utc};

/// One message as received from the broker.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The payload bytes, unchecked.
    pub payload: Bytes,
    /// The MQTT client id of the bridge connection that received it.
    pub client_id: Arc<str>,
    /// When the bridge received it.
    pub received_at: DateTime<Utc>,
    /// True when the broker marked it as a redelivery.
    pub dup: bool,
    /// MQTT 5 publish properties, unchecked; `None` with 3.1.1 or when it had none.
    pub properties: Option<Box<Properties>>,
}

/// Why a message could not be made durable; it is then not acknowledged and
/// the broker redelivers it when the session resumes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotDurable(pub String);

/// Completes when a message is durable (stored and published, or dead-lettered).
pub type Durable = Pin<Box<dyn Future<Output = Result<(), NotDurable>> + Send>>;

/// What the source hands each message to (the admit stage, `crate::admit`).
pub trait Handler: Send + Sync + 'static {
    /// Admits one message. Called in receive order, one message at a time per
    /// connection; it may wait (registry look-up, a full sink). The returned
    /// future completes once the message is durable; the source acknowledges it
    /// then, in receive order.
    fn admit(&self, msg: Message) -> impl Future<Output = Durable> + Send;
}
