//! MQTT 5 publish properties a device may send, checked against bounds and
//! carried into both stores: `telemetry_raw.mqtt_properties` and the envelope's
//! `properties` (docs/pipeline.md).
//!
//! ```json
//! {"contentType":"application/json","payloadFormatIndicator":1,
//!  "responseTopic":"devices/…/replies","correlationData":"<base64>",
//!  "userProperties":[["site","north"],["site","south"]]}
//! ```
//!
//! Absent properties are left out; a message with none has no `properties`.
//! User properties are a list of pairs, in the order sent: MQTT 5 allows a
//! name to repeat, and the order may matter to a consumer.
//!
//! For chunked gateways `correlationId`, `sequenceNumber` and `totalChunks` may
//! come as user properties instead of payload fields ([`Properties::merge_chunk_fields`]).

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize as _;

use crate::reading::{DlqReason, Fields, Reject, MAX_ID_FIELD_BYTES};

/// Default of [`PropertyLimits::max_user_properties`].
pub const DEFAULT_MAX_USER_PROPERTIES: usize = 32;
/// Default of [`PropertyLimits::max_bytes`].
pub const DEFAULT_MAX_PROPERTY_BYTES: usize = 4096;

/// Bounds of one message's properties (`--max-user-properties`,
/// `--max-property-bytes`). Past either, the message is dead-lettered as
/// `invalid_properties`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyLimits {
    pub max_user_properties: usize,
    /// Bytes of every string and of the correlation data, together.
    pub max_bytes: usize,
}

impl Default for PropertyLimits {
    fn default() -> Self {
        PropertyLimits {
            max_user_properties: DEFAULT_MAX_USER_PROPERTIES,
            max_bytes: DEFAULT_MAX_PROPERTY_BYTES,
        }
    }
}

impl PropertyLimits {
    /// The longest JSON that [`Properties::to_json`] writes for properties
    /// within these bounds: every byte escaped as `\u00XX` (6), correlation
    /// data in base64 (4/3, counted as 6 too), the names of the five members,
    /// and per user property its brackets, quotes and commas.
    pub fn max_json_bytes(&self) -> usize {
        6 * self.max_bytes + 8 * self.max_user_properties + 128
    }
}

/// The publish properties of one MQTT 5 message that reach the stores.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub payload_format_indicator: Option<u8>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// The user-property names a chunked gateway may use for the chunk fields.
const CHUNK_NAMES: [&str; 3] = ["correlationId", "sequenceNumber", "totalChunks"];

impl Properties {
    /// True when there is nothing to store.
    pub fn is_empty(&self) -> bool {
        self.content_type.is_none()
            && self.payload_format_indicator.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
    }

    /// Bytes counted against [`PropertyLimits::max_bytes`].
    pub fn size(&self) -> usize {
        let s = |o: &Option<String>| o.as_ref().map_or(0, String::len);
        s(&self.content_type)
            + s(&self.response_topic)
            + self.correlation_data.as_ref().map_or(0, Bytes::len)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Checks the bounds, and that every string can be stored as `jsonb` (no
    /// U+0000). Details name the property, never its value.
    pub fn check(&self, limits: &PropertyLimits) -> Result<(), Reject> {
        let bad = |d: String| Reject::new(DlqReason::InvalidProperties, d);
        if self.user_properties.len() > limits.max_user_properties {
            return Err(bad(format!(
                "{} user properties, limit {}",
                self.user_properties.len(),
                limits.max_user_properties
            )));
        }
        let size = self.size();
        if size > limits.max_bytes {
            return Err(bad(format!(
                "properties are {size} bytes, limit {}",
                limits.max_bytes
            )));
        }
        let nul = |s: &str| s.contains('\0');
        if self.content_type.as_deref().is_some_and(nul) {
            return Err(bad("contentType contains U+0000".into()));
        }
        if self.response_topic.as_deref().is_some_and(nul) {
            return Err(bad("responseTopic contains U+0000".into()));
        }
        if let Some(i) = self
            .user_properties
            .iter()
            .position(|(k, v)| nul(k) || nul(v))
        {
            return Err(bad(format!("user property {i} contains U+0000")));
        }
        Ok(())
    }

    /// Fills `correlationId`, `sequenceNumber` and `totalChunks` from user
    /// properties of those names where the payload has none. A property that
    /// disagrees with the payload's field, or that is sent twice with two
    /// values, is `chunk_conflict`; one that is not a valid value for its field
    /// is `invalid_field`, as it would be in the payload.
    pub fn merge_chunk_fields(&self, fields: &mut Fields) -> Result<(), Reject> {
        for name in CHUNK_NAMES {
            let mut values = self
                .user_properties
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str());
            let Some(value) = values.next() else {
                continue;
            };
            if values.any(|v| v != value) {
                return Err(Reject::new(
                    DlqReason::ChunkConflict,
                    format!("user property {name} is sent twice with two values"),
                ));
            }
            let conflict = || {
                Reject::new(
                    DlqReason::ChunkConflict,
                    format!("user property {name} disagrees with the payload's {name}"),
                )
            };
            let invalid = |why: &str| {
                Reject::new(
                    DlqReason::InvalidField,
                    format!("{name} (user property) {why}"),
                )
            };
            match name {
                "correlationId" => {
                    if value.is_empty() || value.len() > MAX_ID_FIELD_BYTES {
                        return Err(invalid("must be 1 to 256 bytes"));
                    }
                    match &fields.correlation_id {
                        Some(f) if f != value => return Err(conflict()),
                        Some(_) => {}
                        None => fields.correlation_id = Some(value.to_string()),
                    }
                }
                _ => {
                    let n: i32 = value
                        .parse()
                        .map_err(|_| invalid("must be an integer in i32 range"))?;
                    let field = if name == "sequenceNumber" {
                        &mut fields.sequence_number
                    } else {
                        &mut fields.total_chunks
                    };
                    match field {
                        Some(f) if *f != n => return Err(conflict()),
                        Some(_) => {}
                        None => *field = Some(n),
                    }
                }
            }
        }
        Ok(())
    }

    /// The JSON object stored in `telemetry_raw.mqtt_properties` and spliced
    /// into the envelope as `properties`.
    pub fn to_json(&self) -> Bytes {
        // Serialising a map of strings and numbers cannot fail.
        Bytes::from(serde_json::to_vec(&self.to_value()).unwrap_or_default())
    }

    /// [`Properties::to_json`] as a value (a dead letter's `properties`).
    pub fn to_value(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        if let Some(c) = &self.content_type {
            m.insert("contentType".into(), c.clone().into());
        }
        if let Some(p) = self.payload_format_indicator {
            m.insert("payloadFormatIndicator".into(), p.into());
        }
        if let Some(r) = &self.response_topic {
            m.insert("responseTopic".into(), r.clone().into());
        }
        if let Some(d) = &self.correlation_data {
            m.insert(
                "correlationData".into(),
                base64::engine::general_purpose::STANDARD.encode(d).into(),
            );
        }
        if !self.user_properties.is_empty() {
            let pairs = self
                .user_properties
                .iter()
                .map(|(k, v)| serde_json::json!([k, v]))
                .collect();
            m.insert("userProperties".into(), serde_json::Value::Array(pairs));
        }
        serde_json::Value::Object(m)
    }

    /// The inverse of [`Properties::to_value`], for a dead letter read back
    /// (`argus-dlq replay`); `None` when `value` is not that shape.
    pub fn from_value(value: &serde_json::Value) -> Option<Properties> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Json {
            content_type: Option<String>,
            payload_format_indicator: Option<u8>,
            response_topic: Option<String>,
            correlation_data: Option<String>,
            #[serde(default)]
            user_properties: Vec<(String, String)>,
        }
        let j = Json::deserialize(value).ok()?;
        let correlation_data = match j.correlation_data {
            Some(b64) => Some(Bytes::from(
                base64::engine::general_purpose::STANDARD.decode(b64).ok()?,
            )),
            None => None,
        };
        Some(Properties {
            content_type: j.content_type,
            payload_format_indicator: j.payload_format_indicator,
            response_topic: j.response_topic,
            correlation_data,
            user_properties: j.user_properties,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(pairs: &[(&str, &str)]) -> Properties {
        Properties {
            user_properties: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Properties::default()
        }
    }

    #[test]
    fn json_keeps_order_and_repeats_and_leaves_out_what_is_absent() {
        let mut p = user(&[("site", "north"), ("site", "south")]);
        p.content_type = Some("application/json".into());
        p.correlation_data = Some(Bytes::from_static(b"\x00\x01"));
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "contentType": "application/json",
                "correlationData": "AAE=",
                "userProperties": [["site", "north"], ["site", "south"]],
            })
        );
        assert!(Properties::default().is_empty());
    }

    #[test]
    fn bounds_and_nul_are_invalid_properties() {
        let limits = PropertyLimits {
            max_user_properties: 2,
            max_bytes: 10,
        };
        assert!(user(&[("a", "b"), ("c", "d")]).check(&limits).is_ok());
        let r = user(&[("a", "b"), ("c", "d"), ("e", "f")])
            .check(&limits)
            .unwrap_err();
        assert_eq!(r.reason, DlqReason::InvalidProperties);
        assert!(r.detail.contains("3 user properties"), "{}", r.detail);
        let r = user(&[("abcdef", "ghijk")]).check(&limits).unwrap_err();
        assert!(r.detail.contains("11 bytes"), "{}", r.detail);
        let r = user(&[("a", "\0")]).check(&limits).unwrap_err();
        assert_eq!(r.reason, DlqReason::InvalidProperties);
        // The longest JSON within the bounds fits what the limits reserve.
        let worst = Properties {
            content_type: Some("\u{1}".repeat(4)),
            payload_format_indicator: Some(1),
            response_topic: Some("\"".repeat(2)),
            correlation_data: Some(Bytes::from_static(b"\xff\xff")),
            user_properties: vec![("\u{2}".into(), String::new()); 1],
        };
        assert!(worst.check(&limits).is_ok());
        assert!(worst.to_json().len() <= limits.max_json_bytes());
    }

    #[test]
    fn chunk_fields_fill_in_and_conflicts_are_refused() {
        let mut f = Fields::default();
        user(&[
            ("correlationId", "c-1"),
            ("sequenceNumber", "2"),
            ("totalChunks", "5"),
        ])
        .merge_chunk_fields(&mut f)
        .unwrap();
        assert_eq!(f.correlation_id.as_deref(), Some("c-1"));
        assert_eq!((f.sequence_number, f.total_chunks), (Some(2), Some(5)));
        // Agreeing with the payload is fine; disagreeing is a conflict.
        user(&[("sequenceNumber", "2")])
            .merge_chunk_fields(&mut f)
            .unwrap();
        let r = user(&[("sequenceNumber", "3")])
            .merge_chunk_fields(&mut f)
            .unwrap_err();
        assert_eq!(r.reason, DlqReason::ChunkConflict);
        let r = user(&[("totalChunks", "5"), ("totalChunks", "6")])
            .merge_chunk_fields(&mut Fields::default())
            .unwrap_err();
        assert_eq!(r.reason, DlqReason::ChunkConflict);
        let r = user(&[("totalChunks", "five")])
            .merge_chunk_fields(&mut Fields::default())
            .unwrap_err();
        assert_eq!(r.reason, DlqReason::InvalidField);
        assert!(r.detail.starts_with("totalChunks"), "{}", r.detail);
    }

    #[test]
    fn properties_read_back_from_their_json() {
        let p = Properties {
            content_type: Some("application/json".into()),
            payload_format_indicator: Some(1),
            response_topic: Some("devices/x/replies".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\xffid")),
            user_properties: vec![("site".into(), "a".into()), ("site".into(), "b".into())],
        };
        assert_eq!(Properties::from_value(&p.to_value()), Some(p));
        assert_eq!(
            Properties::from_value(&serde_json::json!({})),
            Some(Properties::default())
        );
        assert_eq!(Properties::from_value(&serde_json::json!({"x": 1})), None);
        assert_eq!(Properties::from_value(&serde_json::json!([])), None);
    }
}
