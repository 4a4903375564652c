//! The next hop's limits, checked at start-up and per reading: what one
//! JetStream publish may carry.
//!
//! NATS refuses a message whose headers and body together exceed the server's
//! `max_payload` (1 MiB by default). Every stored reading is published as an
//! envelope ([`crate::envelope`]): the payload plus its metadata, plus the
//! `Nats-Msg-Id` header. A source whose own payload limit lets an envelope grow
//! past `max_payload` would commit a row it can never publish, so each binary
//! reads the server's `max_payload` after connecting and refuses to start when
//! its largest envelope would not fit ([`PublishLimits::check_config`]).
//! Dead letters never need this check: they are cut to fit
//! ([`crate::dlq::DeadLetter::encode_within`]).
//!
//! ```ignore
//! let limits = PublishLimits::from_server(js.client()).await;
//! limits.check_config(config.max_payload_bytes, "--max-payload-bytes")?; // refuse to start
//! limits.check_reading(&reading)?; // per reading, before Postgres (HTTP: 413)
//! ```

use std::time::Duration;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use uuid::Uuid;

use crate::dlq::DlqPublisher;
use crate::envelope;
use crate::properties::PropertyLimits;
use crate::reading::{self, Reading, Source};

/// The longest MQTT client id an envelope is sized for. Bridge client ids are
/// `<prefix>-<replica>-<connection>`; the bridge refuses a longer prefix.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// What a JetStream publish may carry on the connected server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishLimits {
    /// The server's `max_payload`: headers and body together.
    pub server_max_payload: usize,
}

/// The configuration allows envelopes the server would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{flag} {max_payload_bytes} allows envelopes of up to {largest} bytes with headers, \
     over the NATS server's max_payload of {server_max_payload}: set {flag} to at most \
     {fits}, or raise max_payload on the NATS servers"
)]
pub struct LimitError {
    pub flag: String,
    pub max_payload_bytes: usize,
    pub largest: usize,
    pub server_max_payload: usize,
    /// The largest value of `flag` that fits.
    pub fits: usize,
}

/// One reading's envelope would not fit (see [`PublishLimits::check_reading`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("its envelope would be {needed} bytes with headers, over the NATS limit of {limit}")]
pub struct TooLarge {
    /// Envelope plus header allowance.
    pub needed: usize,
    /// The server's `max_payload`.
    pub limit: usize,
}

impl PublishLimits {
    /// How long [`Self::from_server`] waits for the server's INFO.
    const INFO_WAIT: Duration = Duration::from_secs(5);

    /// The limits of the server `client` is connected to. async-nats fills in the
    /// server's INFO on connect; until then (at most a few seconds after a
    /// connect that has not completed) NATS's default 1 MiB is assumed and a
    /// warning logged.
    pub async fn from_server(client: &async_nats::Client) -> PublishLimits {
        let deadline = tokio::time::Instant::now() + Self::INFO_WAIT;
        loop {
            let n = client.server_info().max_payload;
            if n > 0 {
                return PublishLimits {
                    server_max_payload: n,
                };
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    assumed = DlqPublisher::DEFAULT_MAX_PAYLOAD,
                    "The NATS server has not sent its max_payload; assuming the default."
                );
                return PublishLimits {
                    server_max_payload: DlqPublisher::DEFAULT_MAX_PAYLOAD,
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The largest envelope, with headers, that a payload of `payload_bytes`
    /// can produce: the payload, the longest metadata ([`envelope_overhead`])
    /// and [`DlqPublisher::HEADER_ALLOWANCE`].
    pub fn largest_envelope(payload_bytes: usize) -> usize {
        payload_bytes + envelope_overhead() + DlqPublisher::HEADER_ALLOWANCE
    }

    /// Refuses a payload limit (`flag`'s value) whose largest envelope the server
    /// would refuse. The error names the flag and the largest value that fits.
    pub fn check_config(&self, max_payload_bytes: usize, flag: &str) -> Result<(), LimitError> {
        self.check_config_with_properties(max_payload_bytes, None, flag)
    }

    /// [`Self::check_config`] for a source whose envelopes may also carry MQTT 5
    /// properties within `properties` (the bridge).
    pub fn check_config_with_properties(
        &self,
        max_payload_bytes: usize,
        properties: Option<&PropertyLimits>,
        flag: &str,
    ) -> Result<(), LimitError> {
        let extra = properties.map_or(0, properties_overhead);
        let largest = Self::largest_envelope(max_payload_bytes) + extra;
        if largest <= self.server_max_payload {
            return Ok(());
        }
        Err(LimitError {
            flag: flag.to_string(),
            max_payload_bytes,
            largest,
            server_max_payload: self.server_max_payload,
            fits: self
                .server_max_payload
                .saturating_sub(Self::largest_envelope(0) + extra),
        })
    }

    /// Checks that `reading`'s envelope, with headers, fits the server.
    pub fn check_reading(&self, r: &Reading) -> Result<(), TooLarge> {
        let needed = envelope_len(r) + DlqPublisher::HEADER_ALLOWANCE;
        if needed <= self.server_max_payload {
            Ok(())
        } else {
            Err(TooLarge {
                needed,
                limit: self.server_max_payload,
            })
        }
    }
}

/// The exact length of `r`'s envelope, without encoding its payload.
pub fn envelope_len(r: &Reading) -> usize {
    let mut meta = r.clone();
    meta.payload = Bytes::new();
    envelope::encode(&meta).len() + r.payload.len()
}

/// The most bytes MQTT 5 properties within `limits` add to an envelope: the
/// member's name and the longest JSON of [`PropertyLimits::max_json_bytes`].
pub fn properties_overhead(limits: &PropertyLimits) -> usize {
    envelope::PROPERTIES_MEMBER.len() + limits.max_json_bytes()
}

/// The most bytes the envelope adds around a payload: every field at its
/// longest (the checked topic, a client id of [`MAX_CLIENT_ID_LEN`] bytes,
/// both timestamps).
pub fn envelope_overhead() -> usize {
    let id = Uuid::max();
    let at = Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap();
    let longest = Reading {
        message_id: id,
        tenant_id: id,
        device_id: id,
        payload: Bytes::new(),
        payload_size_bytes: 0,
        device_timestamp: Some(at),
        correlation_id: None,
        sequence_number: None,
        total_chunks: None,
        received_at: at,
        source: Source::Mqtt,
        mqtt_topic: Some(reading::canonical_topic(id)),
        client_id: Some("c".repeat(MAX_CLIENT_ID_LEN)),
        properties: None,
    };
    envelope_len(&longest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(n: usize) -> PublishLimits {
        PublishLimits {
            server_max_payload: n,
        }
    }

    /// A reading as the sidecar builds it: no topic, no client id.
    fn http_reading(payload: Bytes) -> Reading {
        let id = Uuid::new_v4();
        Reading {
            message_id: id,
            tenant_id: id,
            device_id: id,
            payload_size_bytes: payload.len() as i32,
            payload,
            device_timestamp: None,
            correlation_id: None,
            sequence_number: None,
            total_chunks: None,
            received_at: Utc::now(),
            source: Source::Http,
            mqtt_topic: None,
            client_id: None,
            properties: None,
        }
    }

    #[test]
    fn the_default_payload_limit_fits_the_default_server() {
        assert!(limits(1024 * 1024)
            .check_config(reading::DEFAULT_MAX_PAYLOAD_BYTES, "--max-payload-bytes")
            .is_ok());
    }

    #[test]
    fn a_payload_limit_at_max_payload_is_refused_naming_the_flag_and_what_fits() {
        let e = limits(1024 * 1024)
            .check_config(1024 * 1024, "--max-payload-bytes")
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("--max-payload-bytes 1048576"), "{text}");
        assert!(text.contains("max_payload of 1048576"), "{text}");
        // What it proposes is exactly the largest value that passes.
        assert!(limits(1024 * 1024)
            .check_config(e.fits, "--max-payload-bytes")
            .is_ok());
        assert!(limits(1024 * 1024)
            .check_config(e.fits + 1, "--max-payload-bytes")
            .is_err());
    }

    #[test]
    fn the_overhead_bounds_every_real_envelope() {
        // An HTTP reading (no topic, no client id) and an MQTT one with a
        // long client id both stay within payload + overhead.
        let payload = Bytes::from_static(br#"{"temperature":21.5}"#);
        let mut r = http_reading(payload.clone());
        assert_eq!(envelope_len(&r), envelope::encode(&r).len());
        assert!(envelope_len(&r) <= payload.len() + envelope_overhead());
        r.source = Source::Mqtt;
        r.mqtt_topic = Some(reading::canonical_topic(r.device_id));
        r.client_id = Some("bridge-0-7".into());
        assert_eq!(envelope_len(&r), envelope::encode(&r).len());
        assert!(envelope_len(&r) <= payload.len() + envelope_overhead());
    }

    #[test]
    fn the_properties_overhead_bounds_the_longest_properties() {
        use crate::properties::Properties;
        let bounds = PropertyLimits {
            max_user_properties: 4,
            max_bytes: 64,
        };
        // Control characters (6 bytes each in JSON) up to the byte bound, across
        // every kind of property.
        let worst = Properties {
            content_type: Some("\u{1}".repeat(16)),
            payload_format_indicator: Some(1),
            response_topic: Some("\u{2}".repeat(16)),
            correlation_data: Some(Bytes::from(vec![0xff; 8])),
            user_properties: vec![("\u{3}".repeat(2), "\u{4}".repeat(4)); 4],
        };
        assert!(worst.check(&bounds).is_ok());
        let payload = Bytes::from_static(b"{}");
        let mut r = http_reading(payload.clone());
        r.source = Source::Mqtt;
        r.mqtt_topic = Some(reading::canonical_topic(r.device_id));
        r.client_id = Some("c".repeat(MAX_CLIENT_ID_LEN));
        r.properties = Some(worst.to_json());
        assert_eq!(envelope_len(&r), envelope::encode(&r).len());
        assert!(
            envelope_len(&r) <= payload.len() + envelope_overhead() + properties_overhead(&bounds)
        );
        // And the start-up check counts it.
        let server = limits(PublishLimits::largest_envelope(1000) + properties_overhead(&bounds));
        assert!(server
            .check_config_with_properties(1000, Some(&bounds), "--max-payload-bytes")
            .is_ok());
        let e = server
            .check_config_with_properties(1001, Some(&bounds), "--max-payload-bytes")
            .unwrap_err();
        assert_eq!(e.fits, 1000);
    }

    #[test]
    fn a_reading_over_the_server_limit_is_too_large() {
        let r = http_reading(Bytes::from(vec![b' '; 1000]));
        let needed = envelope_len(&r) + DlqPublisher::HEADER_ALLOWANCE;
        assert_eq!(limits(needed).check_reading(&r), Ok(()));
        assert_eq!(
            limits(needed - 1).check_reading(&r),
            Err(TooLarge {
                needed,
                limit: needed - 1
            })
        );
    }
}
