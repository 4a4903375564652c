//! Message-id derivation (`argus_pipeline::message_id::derive`).
//!
//! Input layout: 16 bytes of device id, one flag byte (bit 0: a supplied id is
//! present), then the rest split at the first `0xff` into topic | payload (or
//! supplied | payload). Properties: deterministic; a UUIDv8 with the RFC variant;
//! a supplied id ignores topic and payload; another device never gets the same id;
//! the (topic, payload) boundary is unambiguous.
#![no_main]

use argus_pipeline::message_id::derive;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let mut dev = [0u8; 16];
    dev.copy_from_slice(&data[..16]);
    let device = Uuid::from_bytes(dev);
    let flag = data[16];
    let rest = &data[17..];
    let (head, payload) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let supplied = (flag & 1 == 1).then_some(head.as_ref());
    let topic = if supplied.is_some() {
        "devices/x/telemetry"
    } else {
        head.as_ref()
    };

    let id = derive(device, topic, payload, supplied);
    assert_eq!(
        id,
        derive(device, topic, payload, supplied),
        "not deterministic"
    );
    assert_eq!(id.get_version_num(), 8);
    assert_eq!(id.get_variant(), uuid::Variant::RFC4122);

    let mut other = dev;
    other[15] ^= 1;
    assert_ne!(
        id,
        derive(Uuid::from_bytes(other), topic, payload, supplied)
    );

    match supplied {
        Some(s) => {
            assert_eq!(id, derive(device, "other/topic", b"{\"other\":1}", Some(s)));
            assert_ne!(id, derive(device, topic, payload, None));
        }
        None => {
            // Moving one byte across the boundary changes the id.
            if let Some((&first, tail)) = payload.split_first() {
                if let Ok(c) = std::str::from_utf8(&[first]) {
                    let moved = format!("{topic}{c}");
                    assert_ne!(id, derive(device, &moved, tail, None));
                }
            }
        }
    }
});
