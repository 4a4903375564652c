//! The rumqttc options of one connection: stable client id, persistent session,
//! manual acks, and a request channel sized from `--max-inflight`; with MQTT 5
//! also Receive Maximum and the session expiry interval.

use std::sync::Arc;

use rumqttc::{TlsConfiguration, Transport};

use super::protocol::Options;
use crate::config::{MqttConfig, MqttVersion};

/// The largest packet MQTT allows (its remaining-length field). We accept any
/// packet the broker forwards: rejecting one would break the connection and
/// make the broker redeliver it forever, and an MQTT 5 broker silently drops a
/// message larger than the client's Maximum Packet Size. The broker's own
/// message size limit is the guard; oversize payloads go to the DLQ.
const MAX_PACKET: u32 = 268_435_455;

/// The options of connection `conn`.
pub fn mqtt_options(
    cfg: &MqttConfig,
    conn: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Options {
    let id = cfg.client_id(conn);
    let (host, port) = (cfg.addr.host.clone(), cfg.addr.port);
    let transport = tls.map(|t| Transport::tls_with_config(TlsConfiguration::Rustls(t)));
    match cfg.version {
        MqttVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(id, host, port);
            o.set_keep_alive(cfg.keep_alive)
                // Persistent session: the broker keeps our subscription and queues
                // our share while we are away; a restart resumes it.
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_max_packet_size(MAX_PACKET as usize, 64 * 1024)
                .set_request_channel_capacity(request_capacity(cfg.max_inflight));
            if let Some(t) = transport {
                o.set_transport(t);
            }
            Options::V311(Box::new(o))
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
            o.set_keep_alive(cfg.keep_alive)
                // Resume the session (and the share queued for it) on reconnect;
                // it lives on at the broker for `--session-expiry`.
                .set_clean_start(false)
                .set_session_expiry_interval(Some(cfg.session_expiry.seconds()))
                // The broker may have at most this many QoS 1 messages
                // unacknowledged on this connection: the intake and the pending
                // acks are sized for it.
                .set_receive_maximum(Some(receive_maximum(cfg.max_inflight)))
                .set_max_packet_size(Some(MAX_PACKET))
                // The bridge publishes nothing. Without an upper limit rumqttc
                // sizes its outgoing-publish table for 65,535 packet ids up front,
                // about 13 MiB per connection (measured: RSS 44 MiB against 17 MiB
                // with 3.1.1, whose client defaults to 100).
                .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
                .set_manual_acks(true)
                .set_request_channel_capacity(request_capacity(cfg.max_inflight));
            if let Some(t) = transport {
                o.set_transport(t);
            }
            Options::V5(Box::new(o))
        }
    }
}

/// Outgoing QoS 1 publishes in flight with MQTT 5: 3.1.1's default, as the bridge
/// only subscribes.
const OUTGOING_INFLIGHT: u16 = 100;

/// `--max-inflight` as MQTT 5's Receive Maximum (1..=65535, checked by the config).
fn receive_maximum(max_inflight: usize) -> u16 {
    u16::try_from(max_inflight).unwrap_or(u16::MAX).max(1)
}

/// Requests the poll task and the acker may have queued at once: one ack per
/// unacknowledged message (at most the window, twice over across a reconnect),
/// one subscribe and one disconnect, with room to spare.
pub fn request_capacity(max_inflight: usize) -> usize {
    2 * max_inflight + 16
}
