//! The payload's known fields, parsed in one pass with serde: the top-level value
//! must be an object; `timestamp`, `correlationId`, `sequenceNumber`,
//! `totalChunks` and `messageId` are typed and range-checked; every other value is
//! walked without being built, and refused where `jsonb` could not store it.

use std::borrow::Cow;
use std::collections::HashSet;

use chrono::{DateTime, Datelike, SubsecRound, Utc};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::reject::{DlqReason, Reject};

/// Longest accepted `correlationId` / `messageId`, in bytes.
pub const MAX_ID_FIELD_BYTES: usize = 256;

/// The fields the pipeline takes from the payload. `None` when absent or `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// `timestamp`, truncated to microseconds.
    pub device_timestamp: Option<DateTime<Utc>>,
    pub correlation_id: Option<String>,
    pub sequence_number: Option<i32>,
    pub total_chunks: Option<i32>,
    /// `messageId` as sent; the seed of the message id.
    pub message_id: Option<String>,
}

/// Steps 4–6 of the checks in `reading`: one JSON object, whose known fields have
/// the right types. One pass over the bytes; unknown fields are validated but not
/// materialized.
pub(super) fn parse(payload: &[u8]) -> Result<Fields, Reject> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let top = de
        .deserialize_any(TopVisitor)
        .and_then(|top| de.end().map(|()| top))
        .map_err(|e| Reject::new(DlqReason::InvalidJson, e.to_string()))?;
    match top {
        Top::Object(raw) => raw.into_fields(),
        Top::Other(kind) => Err(Reject::new(
            DlqReason::NotObject,
            format!("payload is a JSON {kind}, not an object"),
        )),
    }
}

/// The top-level JSON value: an object's known fields, or the kind of non-object.
enum Top {
    Object(RawFields),
    Other(&'static str),
}

/// Known fields as parsed JSON values (small), validated after parsing.
#[derive(Default)]
struct RawFields {
    timestamp: Option<serde_json::Value>,
    correlation_id: Option<serde_json::Value>,
    sequence_number: Option<serde_json::Value>,
    total_chunks: Option<serde_json::Value>,
    message_id: Option<serde_json::Value>,
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn invalid(field: &str, expected: &str, got: &serde_json::Value) -> Reject {
    Reject::new(
        DlqReason::InvalidField,
        format!("{field}: expected {expected}, got {}", json_kind(got)),
    )
}

/// `None` for absent or `null`.
fn present(v: Option<serde_json::Value>) -> Option<serde_json::Value> {
    v.filter(|v| !v.is_null())
}

impl RawFields {
    fn into_fields(self) -> Result<Fields, Reject> {
        Ok(Fields {
            device_timestamp: present(self.timestamp).map(|v| timestamp(&v)).transpose()?,
            correlation_id: present(self.correlation_id)
                .map(|v| id_string("correlationId", v))
                .transpose()?,
            sequence_number: present(self.sequence_number)
                .map(|v| int32("sequenceNumber", &v))
                .transpose()?,
            total_chunks: present(self.total_chunks)
                .map(|v| int32("totalChunks", &v))
                .transpose()?,
            message_id: present(self.message_id)
                .map(|v| id_string("messageId", v))
                .transpose()?,
        })
    }
}

fn timestamp(v: &serde_json::Value) -> Result<DateTime<Utc>, Reject> {
    const EXPECTED: &str = "an RFC 3339 string or integer epoch milliseconds";
    let parsed = match v {
        serde_json::Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                Reject::new(
                    DlqReason::InvalidField,
                    "timestamp: string is not RFC 3339".to_string(),
                )
            })?,
        serde_json::Value::Number(n) => n
            .as_i64()
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| invalid("timestamp", EXPECTED, v))?,
        other => return Err(invalid("timestamp", EXPECTED, other)),
    };
    if !(1..=9999).contains(&parsed.year()) {
        return Err(Reject::new(
            DlqReason::InvalidField,
            "timestamp: year outside 1..=9999",
        ));
    }
    Ok(parsed.trunc_subsecs(6))
}

fn int32(field: &str, v: &serde_json::Value) -> Result<i32, Reject> {
    v.as_i64()
        .and_then(|n| i32::try_from(n).ok())
        .ok_or_else(|| invalid(field, "an integer in i32 range", v))
}

fn id_string(field: &str, v: serde_json::Value) -> Result<String, Reject> {
    match v {
        serde_json::Value::String(s) if s.contains('\0') => Err(Reject::new(
            DlqReason::InvalidField,
            format!("{field}: contains U+0000, which cannot be stored"),
        )),
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= MAX_ID_FIELD_BYTES => Ok(s),
        serde_json::Value::String(_) => Err(Reject::new(
            DlqReason::InvalidField,
            format!("{field}: expected 1..={MAX_ID_FIELD_BYTES} bytes"),
        )),
        other => Err(invalid(field, "a string", &other)),
    }
}

enum Key {
    Timestamp,
    CorrelationId,
    SequenceNumber,
    TotalChunks,
    MessageId,
    Other,
}

impl Key {
    fn of(name: &str) -> Key {
        match name {
            "timestamp" => Key::Timestamp,
            "correlationId" => Key::CorrelationId,
            "sequenceNumber" => Key::SequenceNumber,
            "totalChunks" => Key::TotalChunks,
            "messageId" => Key::MessageId,
            _ => Key::Other,
        }
    }
}

/// An object key, borrowed from the payload when it has no escapes, checked for
/// what `jsonb` cannot store.
struct KeyName<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for KeyName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = KeyName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<KeyName<'de>, E> {
                storable_str(s)?;
                Ok(KeyName(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<KeyName<'de>, E> {
                storable_str(s)?;
                Ok(KeyName(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

/// The keys seen so far in one object: a repeated key is refused as invalid JSON.
/// Parsers disagree on which copy wins (Postgres `jsonb` keeps the last, others the
/// first), and a check that reads one copy while the store keeps the other can be
/// bypassed (`{"sequenceNumber":"\u0000","sequenceNumber":1}`).
///
/// A telemetry object has a handful of keys: up to [`SeenKeys::FEW`] are compared
/// in a list (no hashing; callgrind counted the hash set at a third of a whole
/// `check`), past that in a hash set, so an object of many keys stays linear.
enum SeenKeys<'de> {
    Few(Vec<Cow<'de, str>>),
    Many(HashSet<Cow<'de, str>>),
}

impl Default for SeenKeys<'_> {
    fn default() -> Self {
        SeenKeys::Few(Vec::new())
    }
}

impl<'de> SeenKeys<'de> {
    const FEW: usize = 16;

    fn insert<E: de::Error>(&mut self, key: KeyName<'de>) -> Result<(), E> {
        let new = match self {
            SeenKeys::Few(keys) if keys.contains(&key.0) => false,
            SeenKeys::Few(keys) if keys.len() < Self::FEW => {
                keys.push(key.0);
                true
            }
            SeenKeys::Few(keys) => {
                let mut set: HashSet<_> = keys.drain(..).collect();
                set.insert(key.0);
                *self = SeenKeys::Many(set);
                true
            }
            SeenKeys::Many(set) => set.insert(key.0),
        };
        if new {
            Ok(())
        } else {
            Err(E::custom("duplicate object key"))
        }
    }
}

/// Postgres `jsonb` cannot hold U+0000 in a string or key: refused here, as invalid
/// JSON, rather than by Postgres, which would make the sink split its batch.
fn storable_str<E: de::Error>(s: &str) -> Result<(), E> {
    if s.contains('\0') {
        Err(E::custom("U+0000 in a string cannot be stored"))
    } else {
        Ok(())
    }
}

/// An unknown field's value, walked without being built and checked for what `jsonb`
/// cannot store: U+0000 in strings and keys ([`storable_str`]), numbers beyond f64
/// (serde_json refuses them when it decodes a number, as it refuses lone surrogates and
/// nesting deeper than 128 levels, which `IgnoredAny` would skip unchecked).
struct Storable;

impl<'de> Deserialize<'de> for Storable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StorableVisitor)
    }
}

struct StorableVisitor;

impl<'de> Visitor<'de> for StorableVisitor {
    type Value = Storable;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Storable, E> {
        Ok(Storable)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Storable, E> {
        Ok(Storable)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Storable, E> {
        Ok(Storable)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Storable, E> {
        Ok(Storable)
    }
    fn visit_unit<E>(self) -> Result<Storable, E> {
        Ok(Storable)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Storable, E> {
        storable_str(s).map(|()| Storable)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Storable, A::Error> {
        while seq.next_element::<Storable>()?.is_some() {}
        Ok(Storable)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Storable, A::Error> {
        let mut seen = SeenKeys::default();
        while let Some(key) = map.next_key::<KeyName<'de>>()? {
            seen.insert(key)?;
            map.next_value::<Storable>()?;
        }
        Ok(Storable)
    }
}

/// Checks any JSON text for what `jsonb` would store other than sent: a key
/// repeated in one object (at any depth), or U+0000 in a string or key. The error
/// is serde_json's message with line and column, never the text's content. For a
/// source that parses its body with another parser first (the HTTP sidecar).
pub fn storable_json(json: &[u8]) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_slice(json);
    Storable::deserialize(&mut de)
        .and_then(|_| de.end())
        .map_err(|e| e.to_string())
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut raw = RawFields::default();
        let mut seen = SeenKeys::default();
        while let Some(name) = map.next_key::<KeyName<'de>>()? {
            let key = Key::of(&name.0);
            seen.insert(name)?;
            match key {
                Key::Timestamp => raw.timestamp = Some(map.next_value()?),
                Key::CorrelationId => raw.correlation_id = Some(map.next_value()?),
                Key::SequenceNumber => raw.sequence_number = Some(map.next_value()?),
                Key::TotalChunks => raw.total_chunks = Some(map.next_value()?),
                Key::MessageId => raw.message_id = Some(map.next_value()?),
                Key::Other => {
                    map.next_value::<Storable>()?;
                }
            }
        }
        Ok(Top::Object(raw))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Top::Other("array"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Top, E> {
        Ok(Top::Other("boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Top, E> {
        Ok(Top::Other("number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Top, E> {
        Ok(Top::Other("number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Top, E> {
        Ok(Top::Other("number"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Top, E> {
        Ok(Top::Other("string"))
    }
    fn visit_unit<E>(self) -> Result<Top, E> {
        Ok(Top::Other("null"))
    }
}
