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

use std::time::Duration;

use async_nats::jetstream;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::metrics;
pub use crate::reject::{DlqReason, Reject};

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

    /// The JSON record (see the module docs for its shape), whole.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_prefix(self.payload.len())
    }

    /// The JSON record in at most `limit` bytes: whole when it fits, otherwise with
    /// the longest payload prefix that fits, marked truncated (see the module docs).
    /// Only a `limit` below the record's fixed fields (a few hundred bytes plus the
    /// detail and topic) yields more than `limit` bytes: the record with no payload.
    pub fn encode_within(&self, limit: usize) -> Vec<u8> {
        let whole = self.encode();
        if whole.len() <= limit || self.payload.is_empty() {
            return whole;
        }
        // What the record costs with no payload (the truncation fields included), then
        // as much payload as the rest of the budget holds once escaped or encoded.
        let budget = limit.saturating_sub(self.encode_prefix(0).len());
        let estimate = match std::str::from_utf8(&self.payload) {
            Ok(text) => escaped_prefix_len(text, budget),
            Err(_) => budget / 4 * 3,
        }
        .min(self.payload.len() - 1);
        let record = self.encode_prefix(estimate);
        if record.len() <= limit {
            return record;
        }
        // The estimate follows serde_json's escaping; should it ever be off, binary
        // search the longest prefix below it that fits.
        let (mut fits, mut too_long) = (0, estimate);
        while too_long - fits > 1 {
            let mid = fits + (too_long - fits) / 2;
            if self.encode_prefix(mid).len() <= limit {
                fits = mid;
            } else {
                too_long = mid;
            }
        }
        self.encode_prefix(fits)
    }

    /// The record with the first `len` payload bytes (cut back to a character
    /// boundary for text); truncated fields when `len` is short of the payload.
    fn encode_prefix(&self, len: usize) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Record<'a> {
            reason: &'static str,
            detail: &'a str,
            topic: Option<&'a str>,
            client_id: Option<&'a str>,
            received_at: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            device_id: Option<Uuid>,
            #[serde(skip_serializing_if = "Option::is_none")]
            message_id: Option<Uuid>,
            #[serde(skip_serializing_if = "Option::is_none")]
            properties: Option<&'a serde_json::Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload_base64: Option<String>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            payload_truncated: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload_bytes: Option<usize>,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload_sha256: Option<String>,
        }
        let truncated = len < self.payload.len();
        let (text, b64) = match std::str::from_utf8(&self.payload) {
            Ok(text) => {
                let mut end = len.min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                (Some(&text[..end]), None)
            }
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&self.payload[..len])),
            ),
        };
        let record = Record {
            reason: self.reason.as_str(),
            detail: &self.detail,
            topic: self.topic.as_deref(),
            client_id: self.client_id.as_deref(),
            received_at: self
                .received_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
            device_id: self.device_id,
            message_id: self.message_id,
            properties: self.properties.as_ref(),
            payload: text,
            payload_base64: b64,
            payload_truncated: truncated,
            payload_bytes: truncated.then_some(self.payload.len()),
            payload_sha256: truncated.then(|| hex::encode(Sha256::digest(&self.payload))),
        };
        // Serializing a struct of strings and UUIDs into a Vec cannot fail.
        serde_json::to_vec(&record).unwrap_or_default()
    }

    /// The `Nats-Msg-Id` of this letter: hex SHA-256 of (reason, topic, payload),
    /// so a redelivered copy is deduplicated by JetStream.
    pub fn dedup_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"argus-dlq\0");
        h.update(self.reason.as_str().as_bytes());
        h.update([0]);
        let topic = self.topic.as_deref().unwrap_or("");
        h.update((topic.len() as u64).to_be_bytes());
        h.update(topic.as_bytes());
        h.update(&self.payload);
        hex::encode(h.finalize())
    }
}

/// The longest prefix of `text`, in bytes, whose JSON string escaping (as serde_json
/// writes it: `\"`, `\\`, `\b \f \n \r \t`, `\u00XX` for other control characters,
/// everything else as is) takes at most `budget` bytes.
fn escaped_prefix_len(text: &str, budget: usize) -> usize {
    let mut used = 0;
    for (at, c) in text.char_indices() {
        let cost = match c {
            '"' | '\\' | '\u{08}' | '\u{0c}' | '\n' | '\r' | '\t' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used + cost > budget {
            return at;
        }
        used += cost;
    }
    text.len()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(payload: &'static [u8]) -> DeadLetter {
        DeadLetter::new(
            Reject::new(DlqReason::InvalidJson, "expected value at line 1"),
            Some("devices/x/telemetry".into()),
            Some("bridge-0-0".into()),
            DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
            Bytes::from_static(payload),
        )
    }

    #[test]
    fn text_payload_is_kept_as_text() {
        let v: serde_json::Value = serde_json::from_slice(&letter(b"{oops").encode()).unwrap();
        assert_eq!(v["reason"], "invalid_json");
        assert_eq!(v["payload"], "{oops");
        assert!(v.get("payloadBase64").is_none());
        assert_eq!(v["receivedAt"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["topic"], "devices/x/telemetry");
        assert_eq!(v["clientId"], "bridge-0-0");
    }

    #[test]
    fn a_record_past_the_limit_keeps_a_prefix_its_length_and_hash() {
        const LIMIT: usize = 1024 * 1024 - 256;
        // Valid UTF-8, not JSON, and six times as long once escaped (`\u0001`).
        let payload = vec![0x01u8; 180_000];
        let mut l = letter(b"");
        l.payload = Bytes::from(payload.clone());
        assert!(l.encode().len() > LIMIT, "the whole record would not fit");
        let record = l.encode_within(LIMIT);
        assert!(record.len() <= LIMIT);
        let v: serde_json::Value = serde_json::from_slice(&record).unwrap();
        assert_eq!(v["payloadTruncated"], true);
        assert_eq!(v["payloadBytes"], 180_000);
        assert_eq!(v["payloadSha256"], hex::encode(Sha256::digest(&payload)));
        let kept = v["payload"].as_str().unwrap().as_bytes();
        assert!(
            kept.len() > 100_000,
            "as much as fits is kept: {}",
            kept.len()
        );
        assert!(payload.starts_with(kept));
        // One byte more would not have fitted.
        assert!(l.encode_prefix(kept.len() + 1).len() > LIMIT);

        // Binary payloads keep a base64 prefix; text is cut at a character boundary.
        l.payload = Bytes::from(vec![0xffu8; 900_000]);
        let v: serde_json::Value = serde_json::from_slice(&l.encode_within(LIMIT)).unwrap();
        let kept = base64::engine::general_purpose::STANDARD
            .decode(v["payloadBase64"].as_str().unwrap())
            .unwrap();
        assert!(!kept.is_empty() && kept.iter().all(|b| *b == 0xff));
        assert_eq!(v["payloadBytes"], 900_000);
        l.payload = Bytes::from("é".repeat(1000));
        let v: serde_json::Value = serde_json::from_slice(&l.encode_within(600)).unwrap();
        assert!(v["payload"].as_str().unwrap().chars().all(|c| c == 'é'));
    }

    #[test]
    fn the_kept_prefix_is_the_longest_that_fits_whatever_the_escaping() {
        let text = "a\"b\\c\nd\u{1}e\u{7f}é€😀\t".repeat(200);
        let mut l = letter(b"");
        l.payload = Bytes::from(text.clone());
        let base = l.encode_prefix(0).len();
        for limit in [
            base,
            base + 1,
            base + 7,
            base + 100,
            base + 1001,
            base + 4000,
        ] {
            let record = l.encode_within(limit);
            assert!(record.len() <= limit, "{} > {limit}", record.len());
            let v: serde_json::Value = serde_json::from_slice(&record).unwrap();
            let kept = v["payload"].as_str().unwrap();
            assert!(text.starts_with(kept));
            let next = text[kept.len()..].chars().next().map_or(0, char::len_utf8);
            assert!(
                l.encode_prefix(kept.len() + next).len() > limit,
                "one more character would have fitted at limit {limit}"
            );
        }
    }

    #[test]
    fn a_record_that_fits_is_whole_and_unmarked() {
        let l = letter(b"{oops");
        assert_eq!(l.encode_within(l.encode().len()), l.encode());
        let v: serde_json::Value = serde_json::from_slice(&l.encode_within(10_000)).unwrap();
        assert!(v.get("payloadTruncated").is_none() && v.get("payloadBytes").is_none());
    }

    #[test]
    fn binary_payload_is_base64() {
        let v: serde_json::Value =
            serde_json::from_slice(&letter(b"\xff\xfe\x00").encode()).unwrap();
        assert_eq!(v["payloadBase64"], "//4A");
        assert!(v.get("payload").is_none());
    }
}
