//! The devices' MQTT client in either protocol version (`--mqtt-version`):
//! rumqttc's 3.1.1 client and its MQTT 5 client behind one face, reduced to what
//! the publisher tracks ([`crate::acks`]): the CONNACK, the packet id each
//! publish went out with, and the PUBACKs.
//!
//! Both clients number packets and hold back a publish whose packet id is still
//! unacknowledged the same way (`Outgoing::Publish`, `Outgoing::AwaitAck`), so
//! the FIFO matching of packet ids to messages holds for either. With MQTT 5 the
//! window of a connection is the smaller of `--inflight` and the broker's
//! Receive Maximum.
//!
//! Publish properties ([`Properties`], from `--properties`) exist only in MQTT 5;
//! [`Options::connect`]'s callers refuse them with 3.1.1 before connecting.

use std::time::Duration;

use argus_pipeline::flags::MqttVersion;
use argus_pipeline::properties::Properties;
use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{Outgoing, Packet, QoS, TlsConfiguration, Transport};

/// What one [`EventLoop::poll`] yielded, as far as the publisher cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    ConnAck,
    /// The next queued publish went out with this packet id.
    Published(u16),
    /// The next queued publish waits: this packet id is still unacknowledged.
    AwaitAck(u16),
    PubAck(u16),
    /// An MQTT 5 PUBACK with a reason code of failure (such as `NotAuthorized`
    /// from the broker's ACL): the broker took the message and dropped it.
    /// A 3.1.1 broker acknowledges a refused publish like any other.
    Refused {
        pkid: u16,
        reason: String,
    },
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

/// The connection settings, in the form of the protocol version.
#[derive(Clone)]
pub enum Options {
    V311(Box<rumqttc::MqttOptions>),
    V5(Box<rumqttc::v5::MqttOptions>),
}

/// Where and how one device connects.
pub struct Settings<'a> {
    pub client_id: &'a str,
    pub host: &'a str,
    pub port: u16,
    /// `Some` for mTLS: (CA PEM, certificate PEM, key PEM).
    pub tls: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    /// QoS 1 publishes in flight on the connection.
    pub inflight: u16,
}

/// Largest packet either way (the bridge's default `--max-payload-bytes` is 256 KiB).
const MAX_PACKET: usize = 1 << 20;

impl Options {
    pub fn new(version: MqttVersion, s: Settings<'_>) -> Options {
        match version {
            MqttVersion::V311 => Options::V311(Box::new(v311_options(s))),
            MqttVersion::V5 => Options::V5(Box::new(v5_options(s))),
        }
    }

    /// A client and its event loop (nothing is sent until the loop is polled).
    pub fn connect(&self, cap: usize) -> (Client, EventLoop) {
        match self {
            Options::V311(o) => {
                let (c, l) = rumqttc::AsyncClient::new((**o).clone(), cap);
                (Client::V311(c), EventLoop::V311(Box::new(l)))
            }
            Options::V5(o) => {
                let (c, l) = rumqttc::v5::AsyncClient::new((**o).clone(), cap);
                (Client::V5(c), EventLoop::V5(Box::new(l)))
            }
        }
    }
}

fn transport(tls: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>) -> Option<Transport> {
    tls.map(|(ca, cert, key)| {
        Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: Some((cert, key)),
        })
    })
}

/// The 3.1.1 options (also the baseline's subscriber, `crate::baseline`).
pub fn v311_options(s: Settings<'_>) -> rumqttc::MqttOptions {
    let inflight = s.inflight.max(1);
    let mut o = rumqttc::MqttOptions::new(s.client_id, s.host, s.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_inflight(inflight);
    // Bounded: a full inflight window stops the event loop reading requests, and
    // this channel then pushes back on the publisher.
    o.set_request_channel_capacity(usize::from(inflight));
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some(t) = transport(s.tls) {
        o.set_transport(t);
    }
    o
}

fn v5_options(s: Settings<'_>) -> rumqttc::v5::MqttOptions {
    let inflight = s.inflight.max(1);
    let mut o = rumqttc::v5::MqttOptions::new(s.client_id, s.host, s.port);
    o.set_keep_alive(Duration::from_secs(30));
    // A new session each time, as with 3.1.1's clean session: what a lost
    // session left unacknowledged is published again.
    o.set_clean_start(true);
    o.set_outgoing_inflight_upper_limit(inflight);
    o.set_request_channel_capacity(usize::from(inflight));
    o.set_max_packet_size(Some(MAX_PACKET as u32));
    if let Some(t) = transport(s.tls) {
        o.set_transport(t);
    }
    o
}

/// Queues requests for an [`EventLoop`].
#[derive(Clone)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Queues a QoS 1 publish; waits while the request channel is full.
    /// `properties` are sent with MQTT 5 and must be `None` with 3.1.1.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        properties: Option<Properties>,
    ) -> Result<(), String> {
        match self {
            Client::V311(c) => {
                debug_assert!(properties.is_none(), "3.1.1 has no publish properties");
                c.publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V5(c) => match properties {
                Some(p) => {
                    c.publish_with_properties(
                        topic,
                        QoS5::AtLeastOnce,
                        false,
                        payload,
                        publish_properties(p),
                    )
                    .await
                }
                None => c.publish(topic, QoS5::AtLeastOnce, false, payload).await,
            }
            .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT behind what is already queued.
    pub async fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V311(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        }
    }
}

/// The event loop of one connection.
pub enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl EventLoop {
    /// Drives the connection until its next event (connecting first).
    pub async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V311(l) => match l.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => Ok(incoming_311(&p)),
                Ok(rumqttc::Event::Outgoing(o)) => Ok(outgoing(o)),
                Err(e) => Err(e.to_string()),
            },
            EventLoop::V5(l) => match l.poll().await {
                Ok(rumqttc::v5::Event::Incoming(p)) => Ok(incoming_5(&p)),
                Ok(rumqttc::v5::Event::Outgoing(o)) => Ok(outgoing(o)),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// The events read in the same batch as a failure, which `poll` did not
    /// yield: PUBACKs among them are real acknowledgements.
    pub fn drain(&mut self) -> Vec<Event> {
        match self {
            EventLoop::V311(l) => l
                .state
                .events
                .drain(..)
                .map(|e| match e {
                    rumqttc::Event::Incoming(p) => incoming_311(&p),
                    rumqttc::Event::Outgoing(o) => outgoing(o),
                })
                .collect(),
            EventLoop::V5(l) => l
                .state
                .events
                .drain(..)
                .map(|e| match e {
                    rumqttc::v5::Event::Incoming(p) => incoming_5(&p),
                    rumqttc::v5::Event::Outgoing(o) => outgoing(o),
                })
                .collect(),
        }
    }
}

fn outgoing(o: Outgoing) -> Event {
    match o {
        Outgoing::Publish(pkid) => Event::Published(pkid),
        Outgoing::AwaitAck(pkid) => Event::AwaitAck(pkid),
        Outgoing::Disconnect => Event::Disconnected,
        _ => Event::Other,
    }
}

fn incoming_311(p: &Packet) -> Event {
    match p {
        Packet::ConnAck(_) => Event::ConnAck,
        Packet::PubAck(a) => Event::PubAck(a.pkid),
        _ => Event::Other,
    }
}

fn incoming_5(p: &Packet5) -> Event {
    match p {
        Packet5::ConnAck(_) => Event::ConnAck,
        Packet5::PubAck(a) => match a.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Event::PubAck(a.pkid),
            r => Event::Refused {
                pkid: a.pkid,
                reason: format!("{r:?}"),
            },
        },
        _ => Event::Other,
    }
}

fn publish_properties(p: Properties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        content_type: p.content_type,
        ..PublishProperties::default()
    }
}
