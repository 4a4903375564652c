//! The two MQTT protocol versions behind one face: rumqttc's 3.1.1 client
//! (`rumqttc::AsyncClient`) and its MQTT 5 client (`rumqttc::v5::AsyncClient`).
//!
//! The rest of the source sees only what it needs: an [`EventLoop`] that yields
//! [`Event`]s, a [`Client`] that queues acknowledgements, subscribes and
//! disconnects, and each publish as an [`Inbound`]. Everything else (epochs,
//! in-order acks, the intake) is the same for both versions.
//!
//! What MQTT 5 adds here:
//! - **Receive Maximum** = `--max-inflight` in CONNECT: the broker may not have
//!   more QoS 1 messages outstanding to the connection than that. With 3.1.1
//!   the window is only a broker setting, and Mosquitto 2.0 does not hold it.
//! - **Session expiry** (`--session-expiry`) instead of 3.1.1's "forever or
//!   nothing".
//! - **Reason codes** on SUBACK and on a DISCONNECT from the broker, which are
//!   logged by name.
//! - **Publish properties**, carried in [`Inbound::properties`].

use argus_pipeline::properties::Properties;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{Outgoing, Publish, QoS};

/// One publish as received, whichever the protocol.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub qos: QoS,
    pub pkid: u16,
    pub dup: bool,
    pub payload: Bytes,
    /// MQTT 5 publish properties that reach the stores; `None` with 3.1.1 and
    /// when a message has none.
    pub properties: Option<Box<Properties>>,
}

/// What one [`EventLoop::poll`] yielded, reduced to what the source acts on.
#[derive(Debug)]
pub enum Event {
    ConnAck {
        session_present: bool,
    },
    /// `refused` names the first reason code that was not a success.
    SubAck {
        refused: Option<String>,
    },
    Publish(Inbound),
    /// A PUBACK was written to the network.
    PubAckWritten,
    /// Our DISCONNECT was written to the network.
    DisconnectWritten,
    /// An MQTT 5 broker closed the session with this reason code.
    ServerDisconnect {
        reason: String,
    },
    Other,
}

/// A lost or refused connection.
#[derive(Debug)]
pub struct PollError {
    message: String,
    /// Every client handle is gone: the loop cannot be driven any more.
    pub requests_done: bool,
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The event loop of one connection.
pub enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The handle that queues requests for an [`EventLoop`].
#[derive(Clone)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The request channel is full or closed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotQueued(String);

/// Options for one connection, in the form of its protocol version.
pub enum Options {
    V311(Box<rumqttc::MqttOptions>),
    V5(Box<rumqttc::v5::MqttOptions>),
}

impl Options {
    pub fn client_id(&self) -> String {
        match self {
            Options::V311(o) => o.client_id(),
            Options::V5(o) => o.client_id(),
        }
    }

    /// The client and its event loop; `cap` is the request channel's capacity.
    pub fn connect(self, cap: usize) -> (Client, EventLoop) {
        match self {
            Options::V311(o) => {
                let (c, l) = rumqttc::AsyncClient::new(*o, cap);
                (Client::V311(c), EventLoop::V311(Box::new(l)))
            }
            Options::V5(o) => {
                let (c, l) = rumqttc::v5::AsyncClient::new(*o, cap);
                (Client::V5(c), EventLoop::V5(Box::new(l)))
            }
        }
    }
}

impl Client {
    /// Queues the acknowledgement of a QoS 1 publish (nothing for QoS 0).
    pub fn try_ack(&self, qos: QoS, pkid: u16) -> Result<(), NotQueued> {
        let r = match self {
            Client::V311(c) => {
                let mut p = Publish::new("", qos, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", qos5(qos), "", None);
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
        };
        r.map_err(NotQueued)
    }

    /// Queues a QoS 1 subscription to `filter`.
    pub fn try_subscribe(&self, filter: String) -> Result<(), NotQueued> {
        let r = match self {
            Client::V311(c) => c
                .try_subscribe(filter, QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe(filter, QoS5::AtLeastOnce)
                .map_err(|e| e.to_string()),
        };
        r.map_err(NotQueued)
    }

    /// Queues a DISCONNECT behind what is already queued.
    pub fn try_disconnect(&self) -> Result<(), NotQueued> {
        let r = match self {
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
        r.map_err(NotQueued)
    }
}

impl EventLoop {
    /// Drives the connection until the next event (connecting first if needed).
    pub async fn poll(&mut self) -> Result<Event, PollError> {
        match self {
            EventLoop::V311(l) => match l.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => Ok(incoming_311(p)),
                Ok(rumqttc::Event::Outgoing(o)) => Ok(outgoing(o)),
                Err(e) => Err(PollError {
                    requests_done: matches!(e, rumqttc::ConnectionError::RequestsDone),
                    message: e.to_string(),
                }),
            },
            EventLoop::V5(l) => match l.poll().await {
                Ok(rumqttc::v5::Event::Incoming(p)) => Ok(incoming_5(p)),
                Ok(rumqttc::v5::Event::Outgoing(o)) => Ok(outgoing(o)),
                Err(e) => Err(PollError {
                    requests_done: matches!(e, rumqttc::v5::ConnectionError::RequestsDone),
                    message: e.to_string(),
                }),
            },
        }
    }

    /// Drops the network (when it is not gone already) and the acks still
    /// queued in the request channel; other requests are sent after the next
    /// ConnAck. Then forgets the packets the old connection read that `poll`
    /// has not yielded yet: the broker redelivers them.
    pub fn clean(&mut self) {
        match self {
            EventLoop::V311(l) => {
                l.clean();
                l.state.events.clear();
            }
            EventLoop::V5(l) => {
                l.clean();
                l.state.events.clear();
            }
        }
    }
}

fn outgoing(o: Outgoing) -> Event {
    match o {
        Outgoing::PubAck(_) => Event::PubAckWritten,
        Outgoing::Disconnect => Event::DisconnectWritten,
        _ => Event::Other,
    }
}

fn incoming_311(p: rumqttc::Packet) -> Event {
    use rumqttc::Packet as P;
    match p {
        P::ConnAck(a) => Event::ConnAck {
            session_present: a.session_present,
        },
        P::SubAck(a) => Event::SubAck {
            refused: a
                .return_codes
                .iter()
                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .then(|| "Failure".to_string()),
        },
        P::Publish(p) => Event::Publish(Inbound {
            topic: p.topic,
            qos: p.qos,
            pkid: p.pkid,
            dup: p.dup,
            payload: p.payload,
            properties: None,
        }),
        _ => Event::Other,
    }
}

fn incoming_5(p: Packet) -> Event {
    match p {
        Packet::ConnAck(a) => Event::ConnAck {
            session_present: a.session_present,
        },
        Packet::SubAck(a) => Event::SubAck {
            refused: a
                .return_codes
                .iter()
                .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                .map(|c| format!("{c:?}")),
        },
        Packet::Publish(p) => Event::Publish(Inbound {
            // The broker checks that a topic is UTF-8 before it routes it
            // (MQTT 5 §1.5.4); the lossy form keeps any other topic failing the
            // topic check, which dead-letters it as `bad_topic`.
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            qos: qos311(p.qos),
            pkid: p.pkid,
            dup: p.dup,
            payload: p.payload,
            properties: p.properties.and_then(stored_properties),
        }),
        Packet::Disconnect(d) => Event::ServerDisconnect {
            reason: format!("{:?}", d.reason_code),
        },
        _ => Event::Other,
    }
}

/// The publish properties a device set. Topic alias, message expiry and
/// subscription identifiers are the broker's and the connection's, not the
/// reading's, and are left out.
fn stored_properties(p: PublishProperties) -> Option<Box<Properties>> {
    let props = Properties {
        content_type: p.content_type,
        payload_format_indicator: p.payload_format_indicator,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
    };
    (!props.is_empty()).then(|| Box::new(props))
}

fn qos5(q: QoS) -> QoS5 {
    match q {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn qos311(q: QoS5) -> QoS {
    match q {
        QoS5::AtMostOnce => QoS::AtMostOnce,
        QoS5::AtLeastOnce => QoS::AtLeastOnce,
        QoS5::ExactlyOnce => QoS::ExactlyOnce,
    }
}
