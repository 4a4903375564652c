//! The dead-letter record on the wire: [`DeadLetter::encode`] and
//! [`DeadLetter::encode_within`] write it (its shape is in the `dlq` module
//! docs), [`StoredLetter::decode`] reads it back for the replay tool
//! (`argus-dlq`, in the bridge crate).

use crate::digest::sha256;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{DeadLetter, DlqReason};

impl DeadLetter {
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
            payload_sha256: truncated.then(|| hex::encode(sha256(&self.payload))),
        };
        // Serializing a struct of strings and UUIDs into a Vec cannot fail.
        serde_json::to_vec(&record).unwrap_or_default()
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

/// A record read back from `TELEMETRY_DLQ`: the letter as it was written, and
/// whether its payload was cut to fit (then the letter holds only a prefix and
/// must never be stored: a replay reports it instead).
#[derive(Debug, Clone)]
pub struct StoredLetter {
    pub letter: DeadLetter,
    /// Set when the record kept only a prefix of the payload.
    pub truncated: Option<Truncation>,
}

/// What a truncated record says of the payload it cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The original payload's length.
    pub payload_bytes: usize,
    /// Hex SHA-256 of the original payload.
    pub payload_sha256: String,
}

/// A record that is not a dead letter this version can read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a dead-letter record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown reason {0:?}")]
    Reason(String),
    #[error("payloadBase64 is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("payloadTruncated without payloadBytes and payloadSha256")]
    Truncation,
}

impl StoredLetter {
    /// Reads a record written by [`DeadLetter::encode_within`].
    pub fn decode(record: &[u8]) -> Result<StoredLetter, DecodeError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Record {
            reason: String,
            detail: String,
            topic: Option<String>,
            client_id: Option<String>,
            received_at: DateTime<Utc>,
            device_id: Option<Uuid>,
            message_id: Option<Uuid>,
            properties: Option<serde_json::Value>,
            payload: Option<String>,
            payload_base64: Option<String>,
            #[serde(default)]
            payload_truncated: bool,
            payload_bytes: Option<usize>,
            payload_sha256: Option<String>,
        }
        let r: Record = serde_json::from_slice(record)?;
        let reason = DlqReason::parse(&r.reason).ok_or(DecodeError::Reason(r.reason))?;
        let payload = match (r.payload, r.payload_base64) {
            (Some(text), _) => Bytes::from(text),
            (None, Some(b64)) => {
                Bytes::from(base64::engine::general_purpose::STANDARD.decode(b64)?)
            }
            (None, None) => Bytes::new(),
        };
        let truncated = match (r.payload_truncated, r.payload_bytes, r.payload_sha256) {
            (false, _, _) => None,
            (true, Some(payload_bytes), Some(payload_sha256)) => Some(Truncation {
                payload_bytes,
                payload_sha256,
            }),
            (true, _, _) => return Err(DecodeError::Truncation),
        };
        Ok(StoredLetter {
            letter: DeadLetter {
                reason,
                detail: r.detail,
                topic: r.topic,
                client_id: r.client_id,
                received_at: r.received_at,
                payload,
                device_id: r.device_id,
                message_id: r.message_id,
                properties: r.properties,
            },
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reject::Reject;

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
        assert_eq!(v["payloadSha256"], hex::encode(sha256(&payload)));
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

    #[test]
    fn a_record_reads_back_as_the_letter_it_was() {
        let mut l = letter(b"{\"t\":1.50}");
        l.device_id = Some(Uuid::from_u128(7));
        l.message_id = Some(Uuid::from_u128(8));
        l.properties = Some(serde_json::json!({"contentType": "application/json"}));
        let back = StoredLetter::decode(&l.encode()).unwrap();
        assert!(back.truncated.is_none());
        let b = back.letter;
        assert_eq!(b.reason, l.reason);
        assert_eq!(b.detail, l.detail);
        assert_eq!(b.topic, l.topic);
        assert_eq!(b.client_id, l.client_id);
        assert_eq!(b.received_at, l.received_at);
        assert_eq!(b.payload, l.payload, "the payload's bytes, as sent");
        assert_eq!(b.device_id, l.device_id);
        assert_eq!(b.message_id, l.message_id);
        assert_eq!(b.properties, l.properties);
        assert_eq!(b.dedup_id(), l.dedup_id());

        let binary = letter(b"\xff\x00\x01");
        let b = StoredLetter::decode(&binary.encode()).unwrap().letter;
        assert_eq!(b.payload, binary.payload);
    }

    #[test]
    fn a_truncated_record_says_so_when_read_back() {
        let mut l = letter(b"");
        l.payload = Bytes::from(vec![b'a'; 10_000]);
        let back = StoredLetter::decode(&l.encode_within(2_000)).unwrap();
        let t = back.truncated.expect("marked truncated");
        assert_eq!(t.payload_bytes, 10_000);
        assert_eq!(t.payload_sha256, hex::encode(sha256(&l.payload)));
        assert!(back.letter.payload.len() < 10_000);
    }

    #[test]
    fn what_is_not_a_record_is_an_error() {
        assert!(matches!(
            StoredLetter::decode(b"{oops"),
            Err(DecodeError::Json(_))
        ));
        let mut v: serde_json::Value = serde_json::from_slice(&letter(b"x").encode()).unwrap();
        v["reason"] = "no_such_reason".into();
        assert!(matches!(
            StoredLetter::decode(v.to_string().as_bytes()),
            Err(DecodeError::Reason(_))
        ));
    }
}
