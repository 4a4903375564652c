//! MQTT topic → device id (`argus_pipeline::reading::parse_topic`).
//!
//! Properties: only `devices/<hyphenated uuid>/telemetry` is accepted, and the
//! accepted topic is exactly the canonical topic of the id it yields (modulo
//! the case of the hex digits); every rejection is `bad_topic`.
#![no_main]

use argus_pipeline::dlq::DlqReason;
use argus_pipeline::reading::{canonical_topic, parse_topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // MQTT topics are UTF-8 (the broker refuses anything else before the bridge sees it).
    let Ok(topic) = std::str::from_utf8(data) else {
        return;
    };
    match parse_topic(topic) {
        Ok(id) => {
            let canonical = canonical_topic(id);
            assert_eq!(
                topic.to_ascii_lowercase(),
                canonical,
                "accepted a topic that is not the canonical one"
            );
            assert_eq!(topic.split('/').count(), 3);
            assert!(!topic.contains(['+', '#', '\0']));
            // The canonical form round-trips.
            assert_eq!(parse_topic(&canonical).ok(), Some(id));
        }
        Err(reject) => {
            assert_eq!(reject.reason, DlqReason::BadTopic);
            assert!(reject.device_id.is_none());
        }
    }
});
