//! Realistic telemetry payloads that carry what the report needs to find them again.
//!
//! Every payload holds `runId`, `seq` (unique within the run, across devices) and
//! `sentAtNs` (Unix nanoseconds when it was handed to the client), plus a device-supplied
//! `messageId` = `<runId>-<seq>` so the bridge derives a deterministic message id from it.

use argus_pipeline::properties::Properties;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

/// What the load tester writes into each payload and reads back from every store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    pub seq: u64,
    pub sent_at_ns: u64,
}

/// The device-supplied message id for one message of a run.
pub fn message_id(run_id: &str, seq: u64) -> String {
    format!("{run_id}-{seq}")
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A plausible environmental sensor reading. Values drift smoothly with `seq` so that
/// payloads differ (no accidental content-hash collisions) without costing randomness.
pub fn mqtt_payload(run_id: &str, device_id: Uuid, seq: u64, sent_at_ns: u64) -> Vec<u8> {
    let phase = (seq % 3600) as f64 / 3600.0 * std::f64::consts::TAU;
    let body = json!({
        "messageId": message_id(run_id, seq),
        "runId": run_id,
        "seq": seq,
        "sentAtNs": sent_at_ns,
        "deviceId": device_id,
        "timestamp": chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(sent_at_ns as i64).to_rfc3339(),
        "temperature": round2(21.5 + 3.0 * phase.sin()),
        "humidity": round2(45.0 + 10.0 * phase.cos()),
        "pressure": round2(1013.25 + 2.5 * (phase * 0.5).sin()),
        "battery": round2(100.0 - (seq % 10_000) as f64 / 200.0),
        "rssi": -60 - (seq % 25) as i64,
        "firmware": "1.4.2",
        "status": "ok",
    });
    // Serialising a `Value` built from plain JSON literals cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// What `--properties` sends with each MQTT 5 publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertiesMode {
    /// No publish properties.
    #[default]
    None,
    /// Content type, payload format indicator 1 (UTF-8), correlation data and two
    /// user properties (`site`, `runId`), as a v5 device sends them.
    User,
    /// `user`, plus the chunked gateway's `correlationId`, `sequenceNumber` and
    /// `totalChunks` as user properties (the payload has none of these fields):
    /// groups of [`CHUNKS`] messages per device.
    Chunked,
}

/// Messages per chunk group with `--properties chunked`.
pub const CHUNKS: u64 = 4;

/// The publish properties of one message under `mode`; `None` for
/// [`PropertiesMode::None`]. Deterministic, as the payload is, so a message
/// published again after a reconnect is the same message.
pub fn mqtt_properties(
    mode: PropertiesMode,
    run_id: &str,
    device_id: Uuid,
    seq: u64,
) -> Option<Properties> {
    if mode == PropertiesMode::None {
        return None;
    }
    let mut user = vec![
        ("site".to_string(), "loadtest".to_string()),
        ("runId".to_string(), run_id.to_string()),
    ];
    if mode == PropertiesMode::Chunked {
        user.extend([
            (
                "correlationId".to_string(),
                format!("{run_id}-{device_id}-{}", seq / CHUNKS),
            ),
            ("sequenceNumber".to_string(), (seq % CHUNKS).to_string()),
            ("totalChunks".to_string(), CHUNKS.to_string()),
        ]);
    }
    Some(Properties {
        content_type: Some("application/json".into()),
        payload_format_indicator: Some(1),
        response_topic: None,
        correlation_data: Some(seq.to_be_bytes().to_vec().into()),
        user_properties: user,
    })
}

/// One HTTP reading in the sidecar's shape (`deviceId`, `metrics`, `timestamp`, `metadata`),
/// with the run markers both as metrics-free metadata and as the supplied `messageId`.
pub fn http_reading(run_id: &str, device_id: Uuid, seq: u64, sent_at_ns: u64) -> Value {
    let phase = (seq % 3600) as f64 / 3600.0 * std::f64::consts::TAU;
    json!({
        "deviceId": device_id,
        "messageId": message_id(run_id, seq),
        "timestamp": chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(sent_at_ns as i64).to_rfc3339(),
        "metrics": {
            "temperature": round2(21.5 + 3.0 * phase.sin()),
            "humidity": round2(45.0 + 10.0 * phase.cos()),
            "pressure": round2(1013.25 + 2.5 * (phase * 0.5).sin()),
            "battery": round2(100.0 - (seq % 10_000) as f64 / 200.0),
        },
        "metadata": { "runId": run_id, "seq": seq, "sentAtNs": sent_at_ns },
    })
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[derive(Deserialize)]
struct Markers {
    #[serde(rename = "runId")]
    run_id: Option<String>,
    seq: Option<u64>,
    #[serde(rename = "sentAtNs")]
    sent_at_ns: Option<u64>,
    metadata: Option<Box<Markers>>,
}

/// Finds this run's markers in a device payload (top level, or under `metadata` for HTTP).
/// Returns `None` for payloads of other runs or without markers.
pub fn find_marker(payload: &Value, run_id: &str) -> Option<Marker> {
    let m: Markers = serde_json::from_value(payload.clone()).ok()?;
    marker_of(&m, run_id)
}

fn marker_of(m: &Markers, run_id: &str) -> Option<Marker> {
    if m.run_id.as_deref() == Some(run_id) {
        if let (Some(seq), Some(sent_at_ns)) = (m.seq, m.sent_at_ns) {
            return Some(Marker { seq, sent_at_ns });
        }
    }
    m.metadata
        .as_deref()
        .and_then(|inner| marker_of(inner, run_id))
}

/// This run's message in a stream record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub marker: Marker,
    /// The record has a `properties` member (the MQTT 5 publish properties).
    pub has_properties: bool,
}

/// Finds the markers in a JetStream envelope (`{"payload": {...}, ...}`) or in a dead
/// letter (`{"payload": "<text>"}`, the original bytes as text).
pub fn find_marker_in_record(record: &[u8], run_id: &str) -> Option<Marker> {
    find_in_record(record, run_id).map(|f| f.marker)
}

/// [`find_marker_in_record`], and whether the record carries properties.
pub fn find_in_record(record: &[u8], run_id: &str) -> Option<Found> {
    // Cheap pre-filter: most messages on a shared stack belong to other runs.
    if !contains(record, run_id.as_bytes()) {
        return None;
    }
    // Fast path (envelopes): the payload is an object; read only the marker fields.
    #[derive(Deserialize)]
    struct Envelope {
        payload: Markers,
        properties: Option<serde::de::IgnoredAny>,
    }
    if let Ok(e) = serde_json::from_slice::<Envelope>(record) {
        return marker_of(&e.payload, run_id).map(|marker| Found {
            marker,
            has_properties: e.properties.is_some(),
        });
    }
    // Dead letters carry the original payload as text.
    let v: Value = serde_json::from_slice(record).ok()?;
    let has_properties = v.get("properties").is_some_and(|p| !p.is_null());
    let marker = match v.get("payload")? {
        Value::String(text) => {
            let inner: Value = serde_json::from_str(text).ok()?;
            find_marker(&inner, run_id)
        }
        obj @ Value::Object(_) => find_marker(obj, run_id),
        _ => None,
    }?;
    Some(Found {
        marker,
        has_properties,
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_payload_round_trips_through_envelope_and_dead_letter() {
        let dev = Uuid::new_v4();
        let p = mqtt_payload("r1", dev, 42, 1_700_000_000_000_000_000);
        let payload: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(payload["messageId"], "r1-42");
        let want = Marker {
            seq: 42,
            sent_at_ns: 1_700_000_000_000_000_000,
        };
        let envelope = json!({"messageId": "x", "payload": payload});
        assert_eq!(
            find_marker_in_record(envelope.to_string().as_bytes(), "r1"),
            Some(want)
        );
        let dead = json!({"reason": "unknown_device", "payload": String::from_utf8(p).unwrap()});
        assert_eq!(
            find_marker_in_record(dead.to_string().as_bytes(), "r1"),
            Some(want)
        );
        assert_eq!(
            find_marker_in_record(envelope.to_string().as_bytes(), "r2"),
            None
        );
    }

    #[test]
    fn properties_are_deterministic_and_chunks_number_within_their_group() {
        let dev = Uuid::new_v4();
        assert_eq!(mqtt_properties(PropertiesMode::None, "r", dev, 5), None);
        let user = mqtt_properties(PropertiesMode::User, "r", dev, 5).unwrap();
        assert_eq!(
            user,
            mqtt_properties(PropertiesMode::User, "r", dev, 5).unwrap()
        );
        assert_eq!(user.user_properties.len(), 2);
        assert_eq!(user.payload_format_indicator, Some(1));
        let chunk = |seq| {
            let p = mqtt_properties(PropertiesMode::Chunked, "r", dev, seq).unwrap();
            let get = |k: &str| {
                p.user_properties
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .unwrap()
            };
            (
                get("correlationId"),
                get("sequenceNumber"),
                get("totalChunks"),
            )
        };
        assert_eq!(chunk(4).0, chunk(7).0);
        assert_ne!(chunk(3).0, chunk(4).0);
        assert_eq!((chunk(6).1, chunk(6).2), ("2".to_string(), "4".to_string()));
    }

    #[test]
    fn an_envelope_with_properties_is_told_apart() {
        let p: Value = serde_json::from_slice(&mqtt_payload("r1", Uuid::new_v4(), 1, 2)).unwrap();
        let with = json!({"payload": p, "properties": {"contentType": "application/json"}});
        let without = json!({"payload": p});
        let found = |v: &Value| find_in_record(v.to_string().as_bytes(), "r1").unwrap();
        assert!(found(&with).has_properties);
        assert!(!found(&without).has_properties);
    }

    #[test]
    fn http_reading_markers_are_found_under_metadata() {
        let r = http_reading("run-x", Uuid::new_v4(), 7, 99);
        assert_eq!(
            find_marker(&r, "run-x"),
            Some(Marker {
                seq: 7,
                sent_at_ns: 99
            })
        );
    }
}
