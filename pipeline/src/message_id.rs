//! The message id: one UUID that is `telemetry_raw.id`, the JetStream
//! `Nats-Msg-Id` header and the `messageId` HTTP ingest returns.
//!
//! It is deterministic from what the device sent, so a redelivered copy (broker
//! redelivery, a retry by the device, a second bridge replica) gets the same id
//! and both stores deduplicate it. It is namespaced by the device id, so one
//! device can never produce (or forge) another device's ids.
//!
//! Exact construction (other implementations, e.g. the load tester, may rely on it):
//!
//! - supplied id (the payload's `messageId` string, or HTTP `Idempotency-Key`):
//!   `SHA-256( device_id[16 bytes] || "id" || 0x00 || supplied UTF-8 bytes )`
//! - otherwise:
//!   `SHA-256( device_id[16 bytes] || "raw" || 0x00 || len(topic) as u32 big-endian || topic || payload )`
//!
//! The first 16 bytes of the digest become a UUIDv8 (RFC 9562: version nibble
//! set to 8, variant bits set to `10`), so 122 bits of the hash survive.
//!
//! Consequence to know: without a supplied id, two byte-identical payloads from
//! the same device on the same topic are the same message. Devices that can
//! legitimately repeat a payload should include a `timestamp` or a `messageId`.
//!
//! Note: the id is random-looking, not time-ordered; `docs/pipeline.md`
//! discusses what that costs the primary-key index.

use crate::digest;
use uuid::Uuid;

/// Derives the message id. `supplied` is the device's own id (payload
/// `messageId` or HTTP `Idempotency-Key`), which wins over the content hash.
///
/// For HTTP without an idempotency key, pass the canonical topic
/// [`crate::reading::canonical_topic`] (`devices/<id>/telemetry`), so the same
/// payload gets the same id over MQTT and HTTP.
pub fn derive(device_id: Uuid, topic: &str, payload: &[u8], supplied: Option<&str>) -> Uuid {
    let mut h = digest::sha256_context();
    h.update(device_id.as_bytes());
    match supplied {
        Some(id) => {
            h.update(b"id\0");
            h.update(id.as_bytes());
        }
        None => {
            h.update(b"raw\0");
            // MQTT topics are at most 65535 bytes, so u32 never truncates; the
            // length prefix keeps (topic, payload) boundaries unambiguous.
            h.update(&(topic.len() as u32).to_be_bytes());
            h.update(topic.as_bytes());
            h.update(payload);
        }
    }
    let digest = digest::finish(h);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV_A: Uuid = Uuid::from_u128(0x0d000000_0000_4000_8000_000000000001);
    const DEV_B: Uuid = Uuid::from_u128(0x0d000000_0000_4000_8000_000000000002);

    #[test]
    fn is_a_v8_uuid_and_deterministic() {
        let a = derive(DEV_A, "devices/x/telemetry", b"{}", None);
        assert_eq!(a.get_version_num(), 8);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(a, derive(DEV_A, "devices/x/telemetry", b"{}", None));
    }

    #[test]
    fn namespaced_by_device() {
        assert_ne!(
            derive(DEV_A, "t", b"{}", None),
            derive(DEV_B, "t", b"{}", None)
        );
        assert_ne!(
            derive(DEV_A, "t", b"{}", Some("m1")),
            derive(DEV_B, "t", b"{}", Some("m1"))
        );
    }

    #[test]
    fn supplied_id_ignores_topic_and_payload() {
        assert_eq!(
            derive(DEV_A, "a", b"{\"x\":1}", Some("m1")),
            derive(DEV_A, "b", b"{\"x\":2}", Some("m1"))
        );
        assert_ne!(
            derive(DEV_A, "a", b"{}", Some("m1")),
            derive(DEV_A, "a", b"{}", None)
        );
    }

    #[test]
    fn topic_payload_boundary_is_unambiguous() {
        assert_ne!(
            derive(DEV_A, "ab", b"c", None),
            derive(DEV_A, "a", b"bc", None)
        );
    }
}
