//! The JSON envelope published to `TELEMETRY_RAW_V1` on
//! `telemetry.raw.v1.<deviceId>`:
//!
//! ```json
//! {"messageId":"…","deviceId":"…","tenantId":"…","topic":"devices/…/telemetry"|null,
//!  "clientId":"…"|null,"receivedAt":"2024-05-01T10:00:00.123456Z",
//!  "deviceTimestamp":"…Z"|null,"payload":{…},"source":"mqtt"|"http",
//!  "properties":{…}}
//! ```
//!
//! `properties` is there only for an MQTT 5 message that carried publish
//! properties ([`crate::properties`]); it is the JSON stored in
//! `telemetry_raw.mqtt_properties`, spliced in verbatim like the payload.
//!
//! UUIDs are lower-case hyphenated; times are RFC 3339 UTC with exactly six
//! fractional digits (the precision of `timestamptz`, so the envelope and the
//! row agree). `payload` is the device's bytes spliced in verbatim: they were
//! validated as one JSON object by [`crate::reading::check_payload`], so the
//! envelope is written without parsing them again.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::reading::Reading;

/// Subject prefix of the raw stream; the device id is the last token (defined with
/// the topology in `argus-schema`).
pub use argus_schema::streams::RAW_SUBJECT_PREFIX;

/// `telemetry.raw.v1.<deviceId>`.
pub fn subject(device_id: Uuid) -> String {
    let mut s = String::with_capacity(RAW_SUBJECT_PREFIX.len() + 37);
    s.push_str(RAW_SUBJECT_PREFIX);
    s.push('.');
    s.push_str(
        device_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer()),
    );
    s
}

/// Encodes the envelope of `reading`.
pub fn encode(reading: &Reading) -> Vec<u8> {
    let mut out = Vec::with_capacity(reading.payload.len() + 384);
    encode_into(reading, &mut out);
    out
}

/// Appends the envelope of `reading` to `out`.
pub fn encode_into(reading: &Reading, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"messageId\":");
    uuid(out, reading.message_id);
    out.extend_from_slice(b",\"deviceId\":");
    uuid(out, reading.device_id);
    out.extend_from_slice(b",\"tenantId\":");
    uuid(out, reading.tenant_id);
    out.extend_from_slice(b",\"topic\":");
    opt_str(out, reading.mqtt_topic.as_deref());
    out.extend_from_slice(b",\"clientId\":");
    opt_str(out, reading.client_id.as_deref());
    out.extend_from_slice(b",\"receivedAt\":");
    time(out, reading.received_at);
    out.extend_from_slice(b",\"deviceTimestamp\":");
    match reading.device_timestamp {
        Some(t) => time(out, t),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(&reading.payload);
    out.extend_from_slice(b",\"source\":\"");
    out.extend_from_slice(reading.source.as_str().as_bytes());
    out.push(b'"');
    if let Some(p) = &reading.properties {
        out.extend_from_slice(PROPERTIES_MEMBER);
        out.extend_from_slice(p);
    }
    out.push(b'}');
}

/// What precedes the properties object in an envelope.
pub const PROPERTIES_MEMBER: &[u8] = b",\"properties\":";

fn uuid(out: &mut Vec<u8>, id: Uuid) {
    out.push(b'"');
    out.extend_from_slice(
        id.hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.push(b'"');
}

fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        // Writing a &str into a Vec cannot fail; the error type is only for I/O writers.
        Some(s) => {
            let _ = serde_json::to_writer(&mut *out, s);
        }
        None => out.extend_from_slice(b"null"),
    }
}

fn time(out: &mut Vec<u8>, t: DateTime<Utc>) {
    out.push(b'"');
    out.extend_from_slice(t.to_rfc3339_opts(SecondsFormat::Micros, true).as_bytes());
    out.push(b'"');
}

/// The envelope as a consumer reads it (tests, the load tester).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub message_id: Uuid,
    pub device_id: Uuid,
    pub tenant_id: Uuid,
    pub topic: Option<String>,
    pub client_id: Option<String>,
    pub received_at: DateTime<Utc>,
    pub device_timestamp: Option<DateTime<Utc>>,
    pub payload: serde_json::Value,
    pub source: String,
    /// MQTT 5 publish properties, when the message had any.
    #[serde(default)]
    pub properties: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{check, Limits, Source};
    use bytes::Bytes;

    fn reading(payload: &'static [u8], topic: Option<&str>) -> Reading {
        let t = "devices/0d000000-0000-4000-8000-000000000001/telemetry";
        let checked = check(t, payload, &Limits::default()).unwrap();
        Reading::from_checked(
            checked,
            Uuid::from_u128(0x0a000000_0000_4000_8000_000000000001),
            Bytes::from_static(payload),
            DateTime::from_timestamp(1_700_000_000, 5_000).unwrap(),
            Source::Mqtt,
            topic.map(str::to_string),
            Some("bridge-\"0\"-0".into()),
        )
    }

    #[test]
    fn round_trips() {
        let r = reading(
            br#" {"timestamp":1700000000123,"v":[1,2,{"a":"\u00e9"}]} "#,
            Some("devices/0d000000-0000-4000-8000-000000000001/telemetry"),
        );
        let bytes = encode(&r);
        let e: Envelope = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(e.message_id, r.message_id);
        assert_eq!(e.device_id, r.device_id);
        assert_eq!(e.tenant_id, r.tenant_id);
        assert_eq!(e.topic, r.mqtt_topic);
        assert_eq!(e.client_id.as_deref(), Some("bridge-\"0\"-0"));
        assert_eq!(e.received_at, r.received_at);
        assert_eq!(e.device_timestamp, r.device_timestamp);
        assert_eq!(e.payload["v"][2]["a"], "é");
        assert_eq!(e.source, "mqtt");
        assert_eq!(e.properties, None);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains("\"receivedAt\":\"2023-11-14T22:13:20.000005Z\""));
        assert!(text.contains("\"deviceTimestamp\":\"2023-11-14T22:13:20.123000Z\""));
    }

    #[test]
    fn properties_are_spliced_in_when_present() {
        let mut r = reading(b"{}", None);
        r.properties = Some(bytes::Bytes::from_static(br#"{"contentType":"a/b"}"#));
        let e: Envelope = serde_json::from_slice(&encode(&r)).unwrap();
        assert_eq!(
            e.properties,
            Some(serde_json::json!({"contentType": "a/b"}))
        );
    }

    #[test]
    fn nulls() {
        let r = reading(b"{}", None);
        let v: serde_json::Value = serde_json::from_slice(&encode(&r)).unwrap();
        assert!(v["topic"].is_null());
        assert!(v["deviceTimestamp"].is_null());
        assert_eq!(
            subject(r.device_id),
            "telemetry.raw.v1.0d000000-0000-4000-8000-000000000001"
        );
    }
}
