//! The rumqttc options of one connection: stable client id, persistent session,
//! manual acks, and a request channel sized from `--max-inflight`.

use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use crate::config::MqttConfig;

/// The MQTT options of connection `conn`.
pub fn mqtt_options(
    cfg: &MqttConfig,
    conn: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut o = MqttOptions::new(cfg.client_id(conn), cfg.addr.host.clone(), cfg.addr.port);
    o.set_keep_alive(cfg.keep_alive)
        // Persistent session: the broker keeps our subscription and queues our
        // share while we are away; a restart resumes it.
        .set_clean_session(false)
        .set_manual_acks(true)
        // Accept any packet the broker forwards: rejecting one here would break
        // the connection and make the broker redeliver it forever. The broker's
        // own message size limit is the guard; oversize payloads go to the DLQ.
        .set_max_packet_size(268_435_455, 64 * 1024)
        // The poll task and the acker never leave more than this many requests
        // (acks, one subscribe, one disconnect) in the channel.
        .set_request_channel_capacity(request_capacity(cfg.max_inflight));
    if let Some(tls) = tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    o
}

/// Requests the poll task and the acker may have queued at once: one ack per
/// unacknowledged message (at most the window, twice over across a reconnect),
/// one subscribe and one disconnect, with room to spare.
pub fn request_capacity(max_inflight: usize) -> usize {
    2 * max_inflight + 16
}
