//! Realistic telemetry payloads that carry what the report needs to find them again.
//!
//! Every payload holds `runId`, `seq` (unique within the run, across devices) and
//! `sentAtNs` (Unix nanoseconds when it was handed to the client), plus a device-supplied
//! `messageId` = `<runId>-<seq>` so the bridge derives a deterministic message id from it.

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

/// Finds the markers in a JetStream envelope (`{"payload": {...}, ...}`) or in a dead
/// letter (`{"payload": "<text>"}`, the original bytes as text).
pub fn find_marker_in_record(record: &[u8], run_id: &str) -> Option<Marker> {
    // Cheap pre-filter: most messages on a shared stack belong to other runs.
    if !contains(record, run_id.as_bytes()) {
        return None;
    }
    // Fast path (envelopes): the payload is an object; read only the marker fields.
    #[derive(Deserialize)]
    struct Envelope {
        payload: Markers,
    }
    if let Ok(e) = serde_json::from_slice::<Envelope>(record) {
        return marker_of(&e.payload, run_id);
    }
    // Dead letters carry the original payload as text.
    let v: Value = serde_json::from_slice(record).ok()?;
    match v.get("payload")? {
        Value::String(text) => {
            let inner: Value = serde_json::from_str(text).ok()?;
            find_marker(&inner, run_id)
        }
        obj @ Value::Object(_) => find_marker(obj, run_id),
        _ => None,
    }
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
