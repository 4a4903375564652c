//! The HTTP ingest body (`argus_ingest_http::request::parse_body`), followed by
//! exactly what the handler does with an accepted body: take each reading's text as
//! sent and run the bridge's `Checked::for_device` on it.
//!
//! Properties: an accepted body is a JSON object or a non-empty array of at most
//! `max_batch` objects; every reading's text is a piece of the body, in order (what is
//! stored is what was sent), and it has only known fields, a UUID `deviceId` equal to
//! the parsed one and a `metrics` object of scalars; the bridge's check then accepts it or names a field
//! (`invalid_field`), never "invalid JSON" or "not an object"; a rejection's
//! message never echoes a string value of the body.
#![no_main]

use argus_pipeline::dlq::DlqReason;
use argus_pipeline::reading::{Checked, Limits};
use argus_ingest_http::request::{parse_body, Shape};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const MAX_BATCH: usize = 8;
const KNOWN: [&str; 5] = ["deviceId", "metrics", "timestamp", "metadata", "messageId"];

fuzz_target!(|data: &[u8]| {
    match parse_body(data, MAX_BATCH) {
        Err(e) => {
            // The message is for the caller: it must not carry body content. No
            // string value of the body may appear in it. (Only values with a
            // character no message template has are checked, so that a value that
            // happens to spell a template, e.g. "must be a", is not a finding.)
            if let Ok(v) = serde_json::from_slice::<Value>(data) {
                let msg = e.to_string();
                for s in strings(&v) {
                    // Keys are quoted in paths on purpose (`metrics["a b"]`); a value
                    // that is part of a key shows up through the key.
                    if distinctive(s) && !keys(&v).iter().any(|k| k.contains(s.as_str())) {
                        assert!(!msg.contains(s.as_str()), "error echoes a value: {msg}");
                    }
                }
            }
        }
        Ok((shape, readings)) => {
            let v: Value = serde_json::from_slice(data).expect("accepted body is JSON");
            match (&v, shape) {
                (Value::Object(_), Shape::Single) => assert_eq!(readings.len(), 1),
                (Value::Array(a), Shape::Batch) => {
                    assert!(!a.is_empty() && a.len() <= MAX_BATCH);
                    assert_eq!(a.len(), readings.len());
                }
                _ => panic!("shape does not match the body"),
            }
            let mut rest = data;
            for r in readings {
                // Each reading's text comes from the body, after the previous one.
                let at = rest
                    .windows(r.text.len())
                    .position(|w| w == r.text.as_bytes())
                    .expect("a reading's text is a piece of the body");
                rest = &rest[at + r.text.len()..];
                let object: Value = serde_json::from_str(&r.text).expect("a reading's text is JSON");
                let object = object.as_object().expect("a reading is an object");
                assert!(object.keys().all(|k| KNOWN.contains(&k.as_str())));
                let id = object["deviceId"].as_str().expect("deviceId string");
                assert_eq!(uuid::Uuid::parse_str(id).ok(), Some(r.device_id));
                let metrics = object["metrics"].as_object().expect("metrics object");
                assert!(metrics
                    .values()
                    .all(|m| matches!(m, Value::Number(_) | Value::String(_) | Value::Bool(_))));
                let payload = r.text.as_bytes();

                let limits = Limits {
                    max_payload_bytes: usize::MAX,
                };
                if let Err(reject) = Checked::for_device(r.device_id, payload, None, &limits) {
                    assert_eq!(
                        reject.reason,
                        DlqReason::InvalidField,
                        "bridge check refused a validated reading: {}",
                        reject.detail
                    );
                }
            }
        }
    }
});

fn strings(v: &Value) -> Vec<&String> {
    let mut out = Vec::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => stack.extend(o.values()),
            _ => {}
        }
    }
    out
}

fn keys(v: &Value) -> Vec<&String> {
    let mut out = Vec::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => {
                out.extend(o.keys());
                stack.extend(o.values());
            }
            _ => {}
        }
    }
    out
}

/// At least 8 bytes and a character that no error template contains.
fn distinctive(s: &str) -> bool {
    s.len() >= 8
        && s.contains([
            '#', '%', '~', '@', '!', '&', '*', '^', '|', '<', '>', '$', '=', '?', '+', ';',
        ])
}
