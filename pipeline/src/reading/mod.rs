//! Topic and payload checks, and the [`Reading`]: one accepted message, ready
//! for the sink.
//!
//! The MQTT source calls [`check`] (pure, no I/O), resolves the tenant through
//! the registry (unknown → [`Reject::unknown_device`], not active →
//! [`Reject::disabled_device`]) and builds the reading with
//! [`Reading::from_checked`]. The HTTP sidecar knows the device from its API
//! key: it calls [`check_payload`] and [`crate::message_id::derive`] (with the
//! `Idempotency-Key` as `supplied` if any) and fills a [`Reading`] with
//! [`Source::Http`] (see [`Reading::from_checked`] with a [`Checked`] it builds
//! via [`Checked::for_device`]).
//!
//! Checks, in order (the first failing one is the reason):
//! 1. topic is exactly `devices/<uuid>/telemetry` → else `bad_topic`. The UUID
//!    must be the 36-character hyphenated form; upper case is accepted (UUIDs
//!    are case-insensitive) and the device id is stored in canonical lower case.
//! 2. payload length ≤ [`Limits::max_payload_bytes`] → else `oversize`.
//! 3. payload is UTF-8 → else `not_utf8`.
//! 4. payload is one JSON value (surrounding whitespace allowed), with no key repeated
//!    in any object (parsers disagree on which copy wins) → else `invalid_json`.
//! 5. that value is an object → else `not_object`.
//! 6. known fields, when present and not `null`, have the right type → else
//!    `invalid_field` with the field's name first in the detail:
//!    - `timestamp`: an RFC 3339 string, or an integer of epoch milliseconds;
//!      years 1..=9999 (what every store can hold); truncated to microseconds.
//!    - `correlationId`: a non-empty string of at most 256 bytes (it is indexed).
//!    - `sequenceNumber`, `totalChunks`: an integer in `i32` range (no fractions,
//!      no strings).
//!    - `messageId`: a non-empty string of at most 256 bytes; it becomes the
//!      seed of the message id.
//!
//!    `null` means absent. Unknown fields are kept in the payload, unchecked.
//!
//! Details never contain payload content, only field names and JSON types.

mod fields;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

pub use fields::{storable_json, Fields, MAX_ID_FIELD_BYTES};

use crate::message_id;
pub use crate::reject::{DlqReason, Reject};

/// Default payload limit: 256 KiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

const TOPIC_PREFIX: &str = "devices/";
const TOPIC_SUFFIX: &str = "/telemetry";

/// `devices/<device_id>/telemetry`: the topic a device publishes to. The HTTP
/// sidecar passes it to [`message_id::derive`] so HTTP and MQTT agree on ids.
pub fn canonical_topic(device_id: Uuid) -> String {
    format!("{TOPIC_PREFIX}{device_id}{TOPIC_SUFFIX}")
}

/// Payload limits (configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Larger payloads are rejected as `oversize`. Default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// A message that passed every check that needs no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub device_id: Uuid,
    /// From [`message_id::derive`].
    pub message_id: Uuid,
    pub fields: Fields,
}

impl Checked {
    /// For sources that know the device without a topic (HTTP): checks the
    /// payload and derives the id from `idempotency_key`, else the payload's
    /// `messageId`, else the hash of the canonical topic and the payload.
    pub fn for_device(
        device_id: Uuid,
        payload: &[u8],
        idempotency_key: Option<&str>,
        limits: &Limits,
    ) -> Result<Checked, Reject> {
        let fields = check_payload(payload, limits).map_err(|r| r.with_device(device_id))?;
        let supplied = idempotency_key.or(fields.message_id.as_deref());
        let message_id =
            message_id::derive(device_id, &canonical_topic(device_id), payload, supplied);
        Ok(Checked {
            device_id,
            message_id,
            fields,
        })
    }
}

/// Where a reading came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Mqtt,
    Http,
}

impl Source {
    /// `telemetry_raw.ingestion_source` and the envelope's `source`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Http => "http",
        }
    }

    /// The inverse of [`Source::as_str`].
    pub fn parse(s: &str) -> Option<Source> {
        match s {
            "mqtt" => Some(Source::Mqtt),
            "http" => Some(Source::Http),
            _ => None,
        }
    }
}

/// One accepted message, ready for [`crate::sink::SinkHandle::enqueue`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// `telemetry_raw.id` = `Nats-Msg-Id`.
    pub message_id: Uuid,
    pub tenant_id: Uuid,
    pub device_id: Uuid,
    /// The payload bytes as received: a validated JSON object. Stored as
    /// `jsonb` and spliced verbatim into the envelope.
    pub payload: Bytes,
    pub payload_size_bytes: i32,
    pub device_timestamp: Option<DateTime<Utc>>,
    pub correlation_id: Option<String>,
    pub sequence_number: Option<i32>,
    pub total_chunks: Option<i32>,
    /// When the bridge (or sidecar) received it; microsecond precision so the
    /// row and the envelope agree exactly.
    pub received_at: DateTime<Utc>,
    pub source: Source,
    pub mqtt_topic: Option<String>,
    pub client_id: Option<String>,
    /// MQTT 5 publish properties as a JSON object
    /// ([`crate::properties::Properties::to_json`]); `None` when there were none.
    /// Stored as `mqtt_properties` and spliced into the envelope as `properties`.
    pub properties: Option<Bytes>,
}

impl Reading {
    /// Builds the reading from a [`Checked`] message, the tenant from the
    /// registry and the receive context. `payload` must be the same bytes that
    /// were checked. `received_at` is truncated to microseconds.
    pub fn from_checked(
        checked: Checked,
        tenant_id: Uuid,
        payload: Bytes,
        received_at: DateTime<Utc>,
        source: Source,
        mqtt_topic: Option<String>,
        client_id: Option<String>,
    ) -> Reading {
        Reading {
            message_id: checked.message_id,
            tenant_id,
            device_id: checked.device_id,
            // Limits are far below 2 GiB; saturate rather than wrap if misconfigured.
            payload_size_bytes: i32::try_from(payload.len()).unwrap_or(i32::MAX),
            payload,
            device_timestamp: checked.fields.device_timestamp,
            correlation_id: checked.fields.correlation_id,
            sequence_number: checked.fields.sequence_number,
            total_chunks: checked.fields.total_chunks,
            received_at: received_at.trunc_subsecs(6),
            source,
            mqtt_topic,
            client_id,
            properties: None,
        }
    }

    /// SHA-256 of the payload bytes: `telemetry_raw.content_sha256`. One id with one
    /// digest is one reading delivered again; one id with two digests is an id
    /// conflict (the sink dead-letters the newcomer as `id_conflict`).
    pub fn content_sha256(&self) -> [u8; 32] {
        crate::digest::sha256(&self.payload)
    }
}

/// Parses `devices/<uuid>/telemetry` into the device id.
pub fn parse_topic(topic: &str) -> Result<Uuid, Reject> {
    let bad = |why: &str| Reject::new(DlqReason::BadTopic, format!("topic {why}"));
    let id = topic
        .strip_prefix(TOPIC_PREFIX)
        .and_then(|rest| rest.strip_suffix(TOPIC_SUFFIX))
        .ok_or_else(|| bad("is not devices/<uuid>/telemetry"))?;
    // Only the hyphenated form: `Uuid::parse_str` would also take braces, URNs
    // and the 32-digit simple form, which would make one device many topics.
    if id.len() != 36 {
        return Err(bad("device id is not a hyphenated UUID"));
    }
    Uuid::try_parse(id).map_err(|_| bad("device id is not a hyphenated UUID"))
}

/// Checks topic and payload and derives the message id. Pure: no I/O.
pub fn check(topic: &str, payload: &[u8], limits: &Limits) -> Result<Checked, Reject> {
    let device_id = parse_topic(topic)?;
    let fields = check_payload(payload, limits).map_err(|r| r.with_device(device_id))?;
    let message_id = message_id::derive(device_id, topic, payload, fields.message_id.as_deref());
    Ok(Checked {
        device_id,
        message_id,
        fields,
    })
}

/// Checks the payload (steps 2–6 of the module docs) and extracts the fields.
/// One pass over the bytes; unknown fields are validated but not materialized.
pub fn check_payload(payload: &[u8], limits: &Limits) -> Result<Fields, Reject> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Reject::new(
            DlqReason::Oversize,
            format!(
                "payload is {} bytes, limit {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    if let Err(e) = std::str::from_utf8(payload) {
        return Err(Reject::new(
            DlqReason::NotUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        ));
    }
    fields::parse(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = "0d000000-0000-4000-8000-000000000001";

    fn topic() -> String {
        format!("devices/{DEV}/telemetry")
    }

    fn reason(topic: &str, payload: &[u8]) -> DlqReason {
        check(topic, payload, &Limits::default())
            .unwrap_err()
            .reason
    }

    #[test]
    fn what_jsonb_cannot_store_is_refused_up_front() {
        // Each would otherwise reach Postgres and be dead-lettered as `unstorable`
        // only after the sink split its batch to find it.
        for payload in [
            r#"{"x":"a\u0000b"}"#,
            r#"{"x":{"deep":["ok","\u0000"]}}"#,
            r#"{"k\u0000":1}"#,
            r#"{"x":{"k\u0000":1}}"#,
            r#"{"x":1e999999}"#,
            r#"{"x":"\ud800"}"#,
        ] {
            assert_eq!(
                reason(&topic(), payload.as_bytes()),
                DlqReason::InvalidJson,
                "{payload}"
            );
        }
        let deep = format!(r#"{{"x":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(reason(&topic(), deep.as_bytes()), DlqReason::InvalidJson);
        assert!(field_err(r#"{"correlationId":"a\u0000"}"#).starts_with("correlationId"));
        assert!(field_err(r#"{"messageId":"a\u0000"}"#).starts_with("messageId"));
        // What jsonb stores is still accepted, escapes and all.
        let ok =
            r#"{"x":"\u00e9\ud83d\ude00","y":[1.5e300,-0,null,true],"z":{"a\\u0000":"\\u0000"}}"#;
        assert!(check(&topic(), ok.as_bytes(), &Limits::default()).is_ok());
    }

    fn field_err(payload: &str) -> String {
        let r = check(&topic(), payload.as_bytes(), &Limits::default()).unwrap_err();
        assert_eq!(r.reason, DlqReason::InvalidField, "{payload}");
        r.detail
    }

    #[test]
    fn good_topic() {
        assert_eq!(parse_topic(&topic()).unwrap().to_string(), DEV);
        let upper = format!("devices/{}/telemetry", DEV.to_uppercase());
        assert_eq!(parse_topic(&upper).unwrap().to_string(), DEV);
    }

    #[test]
    fn bad_topics() {
        for t in [
            "",
            "devices",
            "devices//telemetry",
            "devices/not-a-uuid/telemetry",
            &format!("/devices/{DEV}/telemetry"),
            &format!("devices/{DEV}/telemetry/extra"),
            &format!("devices/{DEV}/x/telemetry"),
            &format!("devices/{DEV}/status"),
            &format!("devices/{DEV}/telemetry/"),
            "devices/+/telemetry",
            "devices/#",
            &format!("devices/{{{DEV}}}/telemetry"),
            "devices/0d000000000040008000000000000001/telemetry",
            &format!("devices/urn:uuid:{DEV}/telemetry"),
            &format!("$share/bridge/devices/{DEV}/telemetry"),
        ] {
            assert_eq!(reason(t, b"{}"), DlqReason::BadTopic, "{t:?}");
        }
    }

    #[test]
    fn payload_reasons() {
        let t = topic();
        assert_eq!(reason(&t, b""), DlqReason::InvalidJson);
        assert_eq!(reason(&t, b"{oops"), DlqReason::InvalidJson);
        assert_eq!(reason(&t, b"{} {}"), DlqReason::InvalidJson);
        assert_eq!(reason(&t, b"\xff{}"), DlqReason::NotUtf8);
        assert_eq!(reason(&t, b"[1,2]"), DlqReason::NotObject);
        assert_eq!(reason(&t, b"\"s\""), DlqReason::NotObject);
        assert_eq!(reason(&t, b"42"), DlqReason::NotObject);
        assert_eq!(reason(&t, b"null"), DlqReason::NotObject);
        let limits = Limits {
            max_payload_bytes: 4,
        };
        assert_eq!(
            check(&t, b"{\"a\":1}", &limits).unwrap_err().reason,
            DlqReason::Oversize
        );
        assert!(check(&t, b"{ }", &limits).is_ok());
        // Whitespace around the object is fine.
        assert!(check(&t, b" \n{\"a\":[1,{\"b\":null}]}\n", &Limits::default()).is_ok());
    }

    #[test]
    fn reject_carries_device() {
        let r = check(&topic(), b"[]", &Limits::default()).unwrap_err();
        assert_eq!(r.device_id.unwrap().to_string(), DEV);
    }

    #[test]
    fn extracts_fields() {
        let p = br#"{"timestamp":"2024-05-01T12:00:00.1234567+02:00","correlationId":"c-1",
            "sequenceNumber":2,"totalChunks":3,"messageId":"m-1","x":{"timestamp":"nested"}}"#;
        let c = check(&topic(), p, &Limits::default()).unwrap();
        assert_eq!(
            c.fields.device_timestamp.unwrap().to_rfc3339(),
            "2024-05-01T10:00:00.123456+00:00"
        );
        assert_eq!(c.fields.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(c.fields.sequence_number, Some(2));
        assert_eq!(c.fields.total_chunks, Some(3));
        assert_eq!(c.fields.message_id.as_deref(), Some("m-1"));
        assert_eq!(
            c.message_id,
            message_id::derive(c.device_id, "ignored", b"ignored", Some("m-1"))
        );
    }

    #[test]
    fn epoch_millis_and_nulls() {
        let c = check(
            &topic(),
            br#"{"timestamp":1700000000123,"correlationId":null,"sequenceNumber":null}"#,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(
            c.fields.device_timestamp.unwrap().timestamp_millis(),
            1_700_000_000_123
        );
        assert_eq!(c.fields.correlation_id, None);
        let c = check(&topic(), b"{}", &Limits::default()).unwrap();
        assert_eq!(c.fields, Fields::default());
        assert_eq!(
            c.message_id,
            message_id::derive(c.device_id, &topic(), b"{}", None)
        );
    }

    #[test]
    fn invalid_fields_name_the_field() {
        assert!(field_err(r#"{"sequenceNumber":"x"}"#).starts_with("sequenceNumber:"));
        assert!(field_err(r#"{"sequenceNumber":2147483648}"#).starts_with("sequenceNumber:"));
        assert!(field_err(r#"{"sequenceNumber":1.5}"#).starts_with("sequenceNumber:"));
        assert!(field_err(r#"{"totalChunks":-2147483649}"#).starts_with("totalChunks:"));
        assert!(field_err(r#"{"timestamp":"yesterday"}"#).starts_with("timestamp:"));
        assert!(field_err(r#"{"timestamp":true}"#).starts_with("timestamp:"));
        assert!(field_err(r#"{"timestamp":1.5}"#).starts_with("timestamp:"));
        assert!(field_err(r#"{"timestamp":-99999999999999999}"#).starts_with("timestamp:"));
        assert!(field_err(r#"{"correlationId":7}"#).starts_with("correlationId:"));
        assert!(field_err(r#"{"correlationId":""}"#).starts_with("correlationId:"));
        let long = "x".repeat(MAX_ID_FIELD_BYTES + 1);
        assert!(field_err(&format!(r#"{{"messageId":"{long}"}}"#)).starts_with("messageId:"));
        assert!(field_err(r#"{"messageId":{}}"#).starts_with("messageId:"));
        // Edges that pass.
        assert!(check(
            &topic(),
            br#"{"sequenceNumber":2147483647,"totalChunks":-2147483648}"#,
            &Limits::default()
        )
        .is_ok());
    }

    #[test]
    fn duplicate_keys_are_invalid_json() {
        // The first copy would skip the U+0000 check and the store keep the last
        // (or the other way round): a repeated key is refused at every level.
        for payload in [
            &br#"{"sequenceNumber":"\u0000","sequenceNumber":1}"#[..],
            br#"{"a":1,"a":1}"#,
            br#"{"v":{"x":1,"\u0078":2}}"#,
            br#"{"v":[{"k":1,"k":2}]}"#,
        ] {
            let r = check(&topic(), payload, &Limits::default()).unwrap_err();
            assert_eq!(r.reason, DlqReason::InvalidJson, "{payload:?}");
            assert!(r.detail.contains("duplicate object key"), "{}", r.detail);
        }
        // In an object of many keys (past the short list, in the hash set), a
        // repeat of an early and of a late key; and the same keys without one.
        let many = |repeat: Option<usize>| {
            let mut keys: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
            keys.extend(repeat.map(|i| format!(r#""k{i}":0"#)));
            format!("{{{}}}", keys.join(","))
        };
        for repeat in [3, 30] {
            let r = check(&topic(), many(Some(repeat)).as_bytes(), &Limits::default());
            assert!(r.unwrap_err().detail.contains("duplicate object key"));
        }
        assert!(check(&topic(), many(None).as_bytes(), &Limits::default()).is_ok());
        // The same key in sibling objects is not a repeat.
        assert!(check(
            &topic(),
            br#"{"a":{"k":1},"b":{"k":2}}"#,
            &Limits::default()
        )
        .is_ok());
    }

    #[test]
    fn http_checked_prefers_idempotency_key() {
        let dev = Uuid::parse_str(DEV).unwrap();
        let c = Checked::for_device(dev, br#"{"messageId":"m"}"#, Some("k"), &Limits::default())
            .unwrap();
        assert_eq!(c.message_id, message_id::derive(dev, "", b"", Some("k")));
        let c = Checked::for_device(dev, b"{}", None, &Limits::default()).unwrap();
        assert_eq!(
            c.message_id,
            check(&topic(), b"{}", &Limits::default())
                .unwrap()
                .message_id
        );
    }
}
