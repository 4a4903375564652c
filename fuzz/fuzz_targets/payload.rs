//! Payload check and field extraction (`reading::check_payload`, `reading::check`).
//!
//! Input: the first byte picks the size limit (default or a small one, so the
//! `oversize` edge is reached), the rest is the payload. Properties:
//! - the reason follows the documented order: oversize, then not UTF-8, then
//!   invalid JSON, then not an object, then an invalid field;
//! - an accepted payload is a JSON object (checked with an independent parse),
//!   and the extracted fields equal what that parse says;
//! - a payload that repeats a key in any object is refused as invalid JSON;
//! - the device timestamp is within years 1..=9999 and has no sub-microsecond part;
//! - `check` on a good topic derives the id with `message_id::derive` from the
//!   supplied `messageId`, else from topic and payload;
//! - a rejection's detail is short (at most 200 bytes, whatever the payload) and
//!   an invalid field's detail repeats none of the payload's string values.
#![no_main]

use argus_pipeline::dlq::DlqReason;
use argus_pipeline::message_id;
use argus_pipeline::reading::{check, check_payload, Limits, MAX_ID_FIELD_BYTES};
use chrono::{Datelike, Timelike};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const TOPIC: &str = "devices/0d000000-0000-4000-8000-000000000001/telemetry";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    let limits = if mode & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_payload_bytes: usize::from(mode >> 1),
        }
    };
    let result = check_payload(payload, &limits);
    let as_text = std::str::from_utf8(payload);
    // serde_json's `Value` parser is stricter than JSON itself: it stops at 128
    // levels and refuses numbers beyond f64 and lone UTF-16 surrogate escapes. The bridge skips unknown fields (and
    // the elements of a non-object) with serde's IgnoredAny, which checks neither,
    // so such a payload can be accepted here and left to Postgres (which
    // dead-letters it as `unstorable`). Where the independent parse fails only for
    // those reasons, it cannot judge.
    let independent = as_text.map(serde_json::from_str::<Value>);
    let too_deep = matches!(&independent, Ok(Err(e))
        if ["recursion limit", "number out of range", "surrogate"].iter().any(|m| e.to_string().contains(m)));
    let parsed: Option<Value> = independent.ok().and_then(Result::ok);
    match &result {
        Err(r) if payload.len() > limits.max_payload_bytes => {
            assert_eq!(r.reason, DlqReason::Oversize)
        }
        _ if payload.len() > limits.max_payload_bytes => panic!("oversize payload accepted"),
        Err(r) if as_text.is_err() => assert_eq!(r.reason, DlqReason::NotUtf8),
        _ if as_text.is_err() => panic!("invalid UTF-8 accepted"),
        Err(r) => {
            // The independent parse may fail where ours does too (e.g. recursion limit);
            // where it succeeds, ours must not call it invalid JSON unless it is deeper
            // than serde_json's limit, which both share.
            match &parsed {
                None if too_deep => {}
                None => assert!(
                    r.reason == DlqReason::InvalidJson,
                    "unparsable JSON rejected as {:?}",
                    r.reason
                ),
                // A key repeated in any object: refused as invalid JSON (parsers
                // disagree on which copy wins).
                Some(Value::Object(_)) if repeats_a_key(payload) => {
                    assert_eq!(r.reason, DlqReason::InvalidJson, "repeated key")
                }
                // U+0000 parses but cannot be stored: refused up front (invalid_json in
                // an unknown field or key, invalid_field in correlationId/messageId).
                Some(v @ Value::Object(_)) if has_nul(v) => assert!(
                    matches!(r.reason, DlqReason::InvalidJson | DlqReason::InvalidField),
                    "U+0000 rejected as {:?}",
                    r.reason
                ),
                Some(Value::Object(_)) => assert_eq!(r.reason, DlqReason::InvalidField),
                Some(_) => assert_eq!(r.reason, DlqReason::NotObject),
            }
            // Details name fields and types, never content: they stay short
            // whatever the payload's size, and an invalid field's detail repeats
            // none of the payload's string values.
            assert!(r.detail.len() <= 200, "detail of {} bytes", r.detail.len());
            if let (DlqReason::InvalidField, Some(v)) = (r.reason, &parsed) {
                for s in strings(v) {
                    if s.len() >= 8
                        && s.contains([
                            '#', '%', '~', '@', '!', '&', '*', '^', '|', '<', '>', '$', '=', '?',
                            '+', ';',
                        ])
                    {
                        assert!(!r.detail.contains(s.as_str()), "detail leaks a value");
                    }
                }
            }
        }
        Ok(_) if too_deep => {}
        Ok(fields) => {
            let Some(Value::Object(obj)) = &parsed else {
                panic!("accepted a payload that is not a JSON object: {parsed:?}");
            };
            assert!(!repeats_a_key(payload), "accepted a payload that repeats a key");
            let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
            assert_eq!(
                fields.sequence_number.map(i64::from),
                present("sequenceNumber").map(|v| v.as_i64().expect("integer"))
            );
            assert_eq!(
                fields.total_chunks.map(i64::from),
                present("totalChunks").map(|v| v.as_i64().expect("integer"))
            );
            assert_eq!(
                fields.correlation_id.as_deref(),
                present("correlationId").and_then(Value::as_str)
            );
            assert_eq!(
                fields.message_id.as_deref(),
                present("messageId").and_then(Value::as_str)
            );
            for s in [&fields.correlation_id, &fields.message_id]
                .into_iter()
                .flatten()
            {
                assert!(!s.is_empty() && s.len() <= MAX_ID_FIELD_BYTES);
            }
            assert_eq!(
                fields.device_timestamp.is_some(),
                present("timestamp").is_some()
            );
            if let Some(ts) = fields.device_timestamp {
                assert!((1..=9999).contains(&ts.year()));
                assert_eq!(ts.nanosecond() % 1000, 0, "not truncated to microseconds");
            }
            // The full check on a good topic agrees and derives the documented id.
            let checked = check(TOPIC, payload, &limits).expect("check agrees with check_payload");
            assert_eq!(&checked.fields, fields);
            let expected = message_id::derive(
                checked.device_id,
                TOPIC,
                payload,
                fields.message_id.as_deref(),
            );
            assert_eq!(checked.message_id, expected);
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

/// True when a string or key anywhere in `v` holds U+0000 (which `jsonb` cannot store).
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// True when some object in the JSON text repeats a key (an independent walk:
/// every object's keys collected, sorted and compared).
fn repeats_a_key(payload: &[u8]) -> bool {
    use serde::de::{Deserializer as _, MapAccess, SeqAccess, Visitor};
    struct Walk;
    impl<'de> Visitor<'de> for Walk {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut keys = Vec::new();
            let mut inner = false;
            while let Some(k) = map.next_key::<String>()? {
                keys.push(k);
                inner |= map.next_value::<Repeats>()?.0;
            }
            keys.sort();
            Ok(inner || keys.windows(2).any(|w| w[0] == w[1]))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            let mut inner = false;
            while let Some(r) = seq.next_element::<Repeats>()? {
                inner |= r.0;
            }
            Ok(inner)
        }
        fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_str<E>(self, _: &str) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_unit<E>(self) -> Result<bool, E> {
            Ok(false)
        }
    }
    struct Repeats(bool);
    impl<'de> serde::Deserialize<'de> for Repeats {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Walk).map(Repeats)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    (&mut de).deserialize_any(Walk).unwrap_or(false)
}
