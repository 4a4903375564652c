//! Dead letters: rejected input goes to the `TELEMETRY_DLQ` stream on
//! `telemetry.dlq.<reason>`, so that one bad message never blocks a device or
//! the bridge, and nothing bad is silently dropped.
//!
//! Usage from a source (MQTT or HTTP):
//!
//! ```ignore
//! match reading::check(&topic, &payload, &limits) {
//!     Ok(checked) => { /* resolve tenant, build a Reading, enqueue it */ }
//!     Err(reject) => {
//!         let letter = DeadLetter::new(reject, Some(topic), client_id, received_at, payload);
//!         dlq.publish(letter).await?; // Err => do NOT acknowledge the message
//!         // Ok => acknowledge (PUBACK)
//!     }
//! }
//! ```
//!
//! The record (JSON, camelCase): `reason`, `detail`, `topic`, `clientId`,
//! `receivedAt` (RFC 3339, microseconds, `Z`), and `payload` (the original
//! bytes as a JSON string when they are UTF-8) or `payloadBase64` (standard
//! base64 with padding when they are not). `deviceId` and `messageId` are added
//! when known (e.g. `unknown_device`, `unstorable`), otherwise omitted, and so is
//! `properties`: an MQTT 5 message's publish properties
//! ([`crate::properties::Properties::to_json`]) when they were within their
//! bounds (an `invalid_properties` letter has none; its detail says why).
//!
//! Each record carries a `Nats-Msg-Id` derived from (reason, topic, payload), so a
//! redelivered bad message (a crash between the DLQ ack and the PUBACK) is not
//! recorded twice within the stream's duplicate window.
//!
//! **A record always fits.** JSON escaping (`\u0001` for each control byte) and
//! base64 make a record up to six times its payload, and NATS refuses a message over
//! the server's `max_payload` (1 MiB by default) every time, so such a letter could
//! never be written and its message never acknowledged. [`DlqPublisher`] therefore
//! sizes each record against the connected server's `max_payload` (and an optional
//! lower cap, [`DlqPublisher::with_max_record_bytes`]): past it, the record keeps the
//! longest prefix of the payload that fits and says so with `payloadTruncated: true`,
//! `payloadBytes` (the original length) and `payloadSha256` (hex SHA-256 of the
//! original bytes). The rest of the payload is not kept anywhere: the broker forgets
//! the message once it is acknowledged.
//!
//! Layout: this module holds [`DeadLetter`] and [`DlqPublisher`]; `record` writes
//! the record and reads it back ([`StoredLetter::decode`]).

use std::time::Duration;

use crate::digest;
use async_nats::jetstream;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::metrics;
pub use crate::reject::{DlqReason, Reject};

mod record;
pub use record::{DecodeError, StoredLetter, Truncation};

/// Subject prefix of dead letters; the reason is the last token (defined with the
/// topology in `argus-schema`).
pub use argus_schema::streams::DLQ_SUBJECT_PREFIX;

/// One rejected message, as it will be recorded.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: DlqReason,
    /// Human-readable; never contains the payload.
    pub detail: String,
    /// The MQTT topic (None for HTTP).
    pub topic: Option<String>,
    /// The MQTT client id of the receiving connection, or the HTTP caller's key prefix.
    pub client_id: Option<String>,
    pub received_at: DateTime<Utc>,
    /// The original bytes, unmodified.
    pub payload: Bytes,
    /// Set when the device is known from the topic (e.g. `unknown_device`).
    pub device_id: Option<Uuid>,
    /// Set when a message id was derived (e.g. `unstorable`).
    pub message_id: Option<Uuid>,
    /// The MQTT 5 publish properties, as JSON, when they were within bounds.
    pub properties: Option<serde_json::Value>,
}

impl DeadLetter {
    /// A letter from a [`Reject`] returned by [`crate::reading::check`] (or built
    /// by the source for `unknown_device` / `disabled_device`).
    pub fn new(
        reject: Reject,
        topic: Option<String>,
        client_id: Option<String>,
        received_at: DateTime<Utc>,
        payload: Bytes,
    ) -> Self {
        DeadLetter {
            reason: reject.reason,
            detail: reject.detail,
            topic,
            client_id,
            received_at,
            payload,
            device_id: reject.device_id,
            message_id: None,
            properties: None,
        }
    }

    /// The `Nats-Msg-Id` of this letter: hex SHA-256 of (reason, topic, payload),
    /// so a redelivered copy is deduplicated by JetStream.
    pub fn dedup_id(&self) -> String {
        let mut h = digest::sha256_context();
        h.update(b"argus-dlq\0");
        h.update(self.reason.as_str().as_bytes());
        h.update(&[0]);
        let topic = self.topic.as_deref().unwrap_or("");
        h.update(&(topic.len() as u64).to_be_bytes());
        h.update(topic.as_bytes());
        h.update(&self.payload);
        hex::encode(digest::finish(h))
    }
}

/// Writing a dead letter failed. The caller must not acknowledge the message.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The publish could not be sent (e.g. not connected, payload too large).
    #[error("dead letter publish failed: {0}")]
    Publish(#[source] jetstream::context::PublishError),
    /// JetStream did not acknowledge the letter (timeout, no stream).
    #[error("dead letter not acknowledged: {0}")]
    Ack(#[source] jetstream::context::PublishError),
    /// No acknowledgement within the publisher's timeout.
    #[error("dead letter not acknowledged within {0:?}")]
    Timeout(Duration),
}

impl DlqError {
    /// Decided from the error's kind: a letter over the server's `max_payload` can
    /// never be written (the publisher sizes records so that this does not happen);
    /// everything else (NATS down, no ack in time, the stream missing until the
    /// topology is applied) may pass: retry later, and meanwhile do not acknowledge.
    pub fn is_retriable(&self) -> bool {
        use jetstream::context::PublishErrorKind;
        match self {
            DlqError::Publish(e) | DlqError::Ack(e) => {
                e.kind() != PublishErrorKind::MaxPayloadExceeded
            }
            DlqError::Timeout(_) => true,
        }
    }
}

/// Publishes dead letters to JetStream and waits for the ack. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DlqPublisher {
    js: jetstream::Context,
    timeout: Duration,
    max_record_bytes: Option<usize>,
}

impl DlqPublisher {
    /// Default time to wait for a JetStream ack.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// NATS's default `max_payload`, assumed while the server has not said its own
    /// (before the first connect).
    pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
    /// Room kept for the message's headers (`Nats-Msg-Id` and the header line), which
    /// count against `max_payload` too.
    pub const HEADER_ALLOWANCE: usize = 256;

    pub fn new(js: jetstream::Context) -> Self {
        DlqPublisher {
            js,
            timeout: Self::DEFAULT_TIMEOUT,
            max_record_bytes: None,
        }
    }

    /// Overrides the ack timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Caps records below what the server accepts (they are truncated past it).
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = Some(bytes);
        self
    }

    /// The largest record this publisher writes now: the connected server's
    /// `max_payload` less [`Self::HEADER_ALLOWANCE`], or the configured cap if lower.
    pub fn record_limit(&self) -> usize {
        let server = match self.js.client().server_info().max_payload {
            0 => Self::DEFAULT_MAX_PAYLOAD,
            n => n,
        };
        let fits = server.saturating_sub(Self::HEADER_ALLOWANCE);
        self.max_record_bytes.map_or(fits, |cap| cap.min(fits))
    }

    /// Publishes `letter` to `telemetry.dlq.<reason>` and awaits the JetStream
    /// ack. Counts `argus_dlq_dead_lettered_total{reason}` on success and
    /// `argus_dlq_publish_failures_total` on failure. On `Err`, do not
    /// acknowledge the original message: the broker will redeliver it.
    pub async fn publish(&self, letter: DeadLetter) -> Result<(), DlqError> {
        let result = self.publish_inner(&letter).await;
        match &result {
            Ok(()) => metrics::dead_lettered(letter.reason),
            Err(e) if !e.is_retriable() => {
                metrics::dlq_publish_failed();
                metrics::dlq_unwritable(letter.reason);
                tracing::error!(reason = %letter.reason, error = %e, record_limit = self.record_limit(),
                    "Dead letter cannot be written: even with no payload it exceeds the server's max_payload; raise max_payload.");
            }
            Err(e) => {
                metrics::dlq_publish_failed();
                tracing::warn!(reason = %letter.reason, error = %e, "Dead letter not written.");
            }
        }
        result
    }

    async fn publish_inner(&self, letter: &DeadLetter) -> Result<(), DlqError> {
        let record = letter.encode_within(self.record_limit());
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(record))
            .message_id(letter.dedup_id());
        let ack = self
            .js
            .send_publish(letter.reason.subject(), publish)
            .await
            .map_err(DlqError::Publish)?;
        match tokio::time::timeout(self.timeout, std::future::IntoFuture::into_future(ack)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(DlqError::Ack(e)),
            Err(_) => Err(DlqError::Timeout(self.timeout)),
        }
    }
}
