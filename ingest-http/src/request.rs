//! The ingest request body: one reading object, or a JSON array of them (a batch).
//!
//! Validation is hand-written over `serde_json::Value` so that every error names the
//! exact field path a client got wrong (`metrics.temp`, `[2].deviceId`). A batch is
//! validated completely before anything is stored, so one bad reading rejects the lot.
//!
//! A reading (plan §7.1):
//! ```json
//! {"deviceId": "<uuid>", "metrics": {"name": 1.5 | "text" | true},
//!  "timestamp": "RFC 3339 (optional)", "metadata": {} (optional), "messageId": "(optional)"}
//! ```
//! Unknown fields are refused (a typo such as `metric` should fail loudly, not be
//! stored silently).
//!
//! What is stored is each reading's own text ([`IngestReading::text`]), not the
//! `Value` it was validated as: `serde_json` reads numbers as `f64`, `u64` or `i64`,
//! so `12345678901234567890123` or `0.1000000000000000055511151231257827` would
//! come back as other digits. Like an MQTT payload, a reading is kept as sent.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

/// Longest accepted device-supplied `messageId` / `Idempotency-Key`.
pub const MAX_SUPPLIED_ID_LEN: usize = 200;

const KNOWN_FIELDS: [&str; 5] = ["deviceId", "metrics", "timestamp", "metadata", "messageId"];

/// One validated reading, with its text exactly as received (what gets stored).
#[derive(Debug, Clone, PartialEq)]
pub struct IngestReading {
    pub device_id: Uuid,
    pub device_timestamp: Option<DateTime<Utc>>,
    pub message_id: Option<String>,
    /// The reading object's JSON text as the client sent it (its digits, key order
    /// and spacing), without the whitespace around it.
    pub text: Box<str>,
}

/// Whether the body was a single object or an array; decides the response shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Single,
    Batch,
}

/// A validation failure: the field path (empty for the whole body) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub problem: String,
}

impl FieldError {
    fn new(path: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "request body: {}", self.problem)
        } else {
            write!(f, "{}: {}", self.path, self.problem)
        }
    }
}

/// Parses and validates a whole body. `max_batch` bounds the array length. A key
/// repeated in one object, at any depth, is refused: serde_json would keep the last
/// copy silently, so a reading would be stored other than sent. The fields are
/// checked first, so a refusal names the field where it can.
pub fn parse_body(
    body: &[u8],
    max_batch: usize,
) -> Result<(Shape, Vec<IngestReading>), FieldError> {
    let parsed = parse_fields(body, max_batch)?;
    argus_pipeline::reading::storable_json(body).map_err(|e| FieldError::new("", e))?;
    Ok(parsed)
}

fn parse_fields(body: &[u8], max_batch: usize) -> Result<(Shape, Vec<IngestReading>), FieldError> {
    // serde_json's message carries line/column only, never body content.
    let malformed = |e: serde_json::Error| FieldError::new("", format!("malformed JSON ({e})"));
    let value: Value = serde_json::from_slice(body).map_err(malformed)?;
    match value {
        Value::Object(map) => {
            let text: &RawValue = serde_json::from_slice(body).map_err(malformed)?;
            Ok((Shape::Single, vec![parse_reading(map, "", text)?]))
        }
        Value::Array(items) => {
            if items.is_empty() {
                return Err(FieldError::new(
                    "",
                    "a batch must hold at least one reading",
                ));
            }
            if items.len() > max_batch {
                return Err(FieldError::new(
                    "",
                    format!("a batch holds at most {max_batch} readings"),
                ));
            }
            let texts: Vec<&RawValue> = serde_json::from_slice(body).map_err(malformed)?;
            let mut readings = Vec::with_capacity(items.len());
            for (i, (item, text)) in items.into_iter().zip(texts).enumerate() {
                let at = format!("[{i}]");
                match item {
                    Value::Object(map) => readings.push(parse_reading(map, &at, text)?),
                    other => {
                        return Err(FieldError::new(
                            at,
                            format!("expected an object, found {}", kind(&other)),
                        ))
                    }
                }
            }
            Ok((Shape::Batch, readings))
        }
        other => Err(FieldError::new(
            "",
            format!("expected an object or an array, found {}", kind(&other)),
        )),
    }
}

fn join(base: &str, field: &str) -> String {
    if base.is_empty() {
        field.to_string()
    } else {
        format!("{base}.{field}")
    }
}

/// `a.b` for plain names, `a["x y"]` for names that would make the path ambiguous.
fn join_key(base: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        join(base, key)
    } else {
        let quoted = serde_json::to_string(key).unwrap_or_else(|_| "\"?\"".to_string());
        format!("{base}[{quoted}]")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_reading(
    map: Map<String, Value>,
    at: &str,
    text: &RawValue,
) -> Result<IngestReading, FieldError> {
    if let Some(unknown) = map.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(FieldError::new(join_key(at, unknown), "unknown field"));
    }

    // Postgres' jsonb cannot hold U+0000: refuse it here, naming the field, so a batch
    // stays all-or-nothing instead of the sink dead-lettering one reading of it.
    for (key, value) in &map {
        if let Some(path) = find_nul(value, &join_key(at, key)) {
            return Err(FieldError::new(
                path,
                "must not contain the character U+0000 (it cannot be stored)",
            ));
        }
    }

    let device_id = match map.get("deviceId") {
        None => return Err(FieldError::new(join(at, "deviceId"), "is required")),
        Some(Value::String(s)) => Uuid::parse_str(s)
            .map_err(|_| FieldError::new(join(at, "deviceId"), "must be a UUID"))?,
        Some(other) => {
            return Err(FieldError::new(
                join(at, "deviceId"),
                format!("must be a UUID string, found {}", kind(other)),
            ))
        }
    };

    let metrics_path = join(at, "metrics");
    match map.get("metrics") {
        None => return Err(FieldError::new(metrics_path, "is required")),
        Some(Value::Object(metrics)) => {
            for (name, value) in metrics {
                if name.is_empty() {
                    return Err(FieldError::new(
                        join_key(&metrics_path, name),
                        "metric names must not be empty",
                    ));
                }
                if !matches!(value, Value::Number(_) | Value::String(_) | Value::Bool(_)) {
                    return Err(FieldError::new(
                        join_key(&metrics_path, name),
                        format!("must be a number, string or boolean, found {}", kind(value)),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(FieldError::new(
                metrics_path,
                format!("must be an object, found {}", kind(other)),
            ))
        }
    }

    let device_timestamp = match map.get("timestamp") {
        None => None,
        Some(Value::String(s)) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| {
                    FieldError::new(join(at, "timestamp"), "must be an RFC 3339 date-time")
                })?
                .with_timezone(&Utc),
        ),
        Some(other) => {
            return Err(FieldError::new(
                join(at, "timestamp"),
                format!("must be an RFC 3339 string, found {}", kind(other)),
            ))
        }
    };

    match map.get("metadata") {
        None | Some(Value::Object(_)) => {}
        Some(other) => {
            return Err(FieldError::new(
                join(at, "metadata"),
                format!("must be an object, found {}", kind(other)),
            ))
        }
    }

    let message_id = match map.get("messageId") {
        None => None,
        Some(Value::String(s)) => {
            check_supplied_id(s).map_err(|p| FieldError::new(join(at, "messageId"), p))?;
            Some(s.clone())
        }
        Some(other) => {
            return Err(FieldError::new(
                join(at, "messageId"),
                format!("must be a string, found {}", kind(other)),
            ))
        }
    };

    Ok(IngestReading {
        device_id,
        device_timestamp,
        message_id,
        text: text.get().into(),
    })
}

/// The path of the first string or key under `value` that contains U+0000.
fn find_nul(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_nul(v, &format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let child = join_key(path, k);
            if k.contains('\0') {
                Some(child)
            } else {
                find_nul(v, &child)
            }
        }),
        _ => None,
    }
}

/// A supplied id (`messageId` or `Idempotency-Key`): 1..=200 visible ASCII characters.
pub fn check_supplied_id(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > MAX_SUPPLIED_ID_LEN {
        return Err("must be 1 to 200 characters long");
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = "0d000000-0000-4000-8000-000000000001";

    fn err(body: &str) -> FieldError {
        parse_body(body.as_bytes(), 10).unwrap_err()
    }

    #[test]
    fn single_reading_is_parsed_and_kept_as_received() {
        let body = format!(
            r#"{{"deviceId":"{DEV}","metrics":{{"temperature":25.5,"ok":true,"mode":"eco"}},
               "timestamp":"2026-01-28T12:00:00Z","metadata":{{"fw":"1.2"}},"messageId":"m-1"}}"#
        );
        let (shape, readings) = parse_body(body.as_bytes(), 10).unwrap();
        assert_eq!(shape, Shape::Single);
        let r = &readings[0];
        assert_eq!(r.device_id.to_string(), DEV);
        assert_eq!(r.message_id.as_deref(), Some("m-1"));
        assert_eq!(
            r.device_timestamp.unwrap().to_rfc3339(),
            "2026-01-28T12:00:00+00:00"
        );
        assert_eq!(&*r.text, body.trim());
    }

    #[test]
    fn a_reading_is_kept_digit_for_digit() {
        let one = format!(
            r#"{{"metrics":{{"n":12345678901234567890123,"d":0.1000000000000000055511151231257827,"e":1.5E+300}},"deviceId":"{DEV}"}}"#
        );
        let (_, single) = parse_body(format!(" {one}\n").as_bytes(), 10).unwrap();
        assert_eq!(&*single[0].text, one);
        let (_, batch) = parse_body(format!("[ {one} ,\n{one}]").as_bytes(), 10).unwrap();
        assert!(batch.iter().all(|r| *r.text == one));
    }

    #[test]
    fn batch_is_parsed() {
        let body = format!(
            r#"[{{"deviceId":"{DEV}","metrics":{{"a":1}}}},{{"deviceId":"{DEV}","metrics":{{"a":2}}}}]"#
        );
        let (shape, readings) = parse_body(body.as_bytes(), 10).unwrap();
        assert_eq!(shape, Shape::Batch);
        assert_eq!(readings.len(), 2);
    }

    #[test]
    fn errors_name_the_field_path() {
        assert_eq!(err("{").path, "");
        assert_eq!(err("42").path, "");
        assert_eq!(err("[]").path, "");
        assert_eq!(err(r#"{"metrics":{}}"#).path, "deviceId");
        assert_eq!(err(r#"{"deviceId":"nope","metrics":{}}"#).path, "deviceId");
        let bad_metric = format!(r#"{{"deviceId":"{DEV}","metrics":{{"temp":null}}}}"#);
        assert_eq!(err(&bad_metric).path, "metrics.temp");
        let odd_name = format!(r#"{{"deviceId":"{DEV}","metrics":{{"a b":{{}}}}}}"#);
        assert_eq!(err(&odd_name).path, r#"metrics["a b"]"#);
        let ts = format!(r#"{{"deviceId":"{DEV}","metrics":{{}},"timestamp":"yesterday"}}"#);
        assert_eq!(err(&ts).path, "timestamp");
        let md = format!(r#"{{"deviceId":"{DEV}","metrics":{{}},"metadata":[]}}"#);
        assert_eq!(err(&md).path, "metadata");
        let unknown = format!(r#"{{"deviceId":"{DEV}","metric":{{}}}}"#);
        assert_eq!(err(&unknown).path, "metric");
        let batch = format!(
            r#"[{{"deviceId":"{DEV}","metrics":{{}}}},{{"deviceId":"{DEV}","metrics":{{}}}},{{"metrics":{{}}}}]"#
        );
        assert_eq!(err(&batch).path, "[2].deviceId");
        assert_eq!(err(r#"[{"deviceId":1}]"#).path, "[0].deviceId");
        assert_eq!(err(r#"[1]"#).path, "[0]");
        let mid = format!(r#"{{"deviceId":"{DEV}","metrics":{{}},"messageId":""}}"#);
        assert_eq!(err(&mid).path, "messageId");
    }

    #[test]
    fn nul_characters_are_refused_naming_the_field() {
        let metric = format!(r#"{{"deviceId":"{DEV}","metrics":{{"t":"a\u0000b"}}}}"#);
        let e = err(&metric);
        assert_eq!(e.path, "metrics.t");
        assert!(e.problem.contains("U+0000"), "{}", e.problem);
        let deep = format!(
            r#"[{{"deviceId":"{DEV}","metrics":{{}}}},{{"deviceId":"{DEV}","metrics":{{}},"metadata":{{"x":["ok","\u0000"]}}}}]"#
        );
        assert_eq!(err(&deep).path, "[1].metadata.x[1]");
        let key = format!(r#"{{"deviceId":"{DEV}","metrics":{{"a\u0000":1}}}}"#);
        assert_eq!(err(&key).path, r#"metrics["a\u0000"]"#);
    }

    #[test]
    fn batch_size_is_bounded() {
        let one = format!(r#"{{"deviceId":"{DEV}","metrics":{{}}}}"#);
        let body = format!("[{}]", vec![one; 11].join(","));
        assert!(err(&body).problem.contains("at most 10"));
    }
}
