//! The MQTT source: `--connections` shared-subscription connections per process,
//! each with in-order, durable-only PUBACKs.
//!
//! ## One connection, three tasks
//!
//! ```text
//!  broker ──> poll task ──(intake)──> worker ──(pending, cap = max_inflight)──> acker ──> client.try_ack
//!              ^  never awaits anything but EventLoop::poll   admit(): checks, registry,    awaits durability
//!              '──────── request channel (cap = 2 * max_inflight + 16) <──────────────────'  in receive order
//! ```
//!
//! - The **poll task** only drives [`rumqttc::EventLoop::poll`]. It stamps each
//!   publish with its receive time and pushes it onto the intake, which never
//!   blocks (ARCHITECTURE trap 3). The intake is bounded by the protocol: it
//!   holds only unacknowledged messages of the current connection, and the
//!   broker never has more than its inflight window of those outstanding;
//!   entries of a lost connection are purged when it reconnects. A length
//!   above `--max-inflight` means the broker's window is larger than
//!   configured and is reported (metric and warning).
//! - The **worker** awaits [`Handler::admit`] for one publish at a time, in
//!   receive order: topic and payload checks, the registry look-up, and a place
//!   in the sink (it waits there when the sink is full: backpressure). `admit`
//!   returns a [`Durable`] future that completes when the message is stored and
//!   published, or dead-lettered.
//! - The **acker** awaits those futures in receive order and acknowledges each
//!   with `try_ack`. The request channel holds more than the connection can
//!   ever have unacknowledged, so `try_ack` does not find it full.
//!
//! Backpressure: when the sink is full the worker waits, the intake queue
//! fills up to the broker's window, the broker stops sending (its inflight
//! window is full of unacknowledged messages) and keeps the rest queued. The
//! poll task keeps reading and writing (pings, acks) all the while.
//!
//! ## Sessions and reconnects
//!
//! Client ids are stable (`bridge-<replica>-<connection>`) and sessions
//! persistent (`clean_session = false`), so a restarted replica resumes its
//! sessions and the messages the broker queued for them (ARCHITECTURE trap 2).
//! After a disconnect the poll task waits with exponential backoff and jitter
//! and polls again, which reconnects; it subscribes again after every ConnAck.
//!
//! Each connection attempt is an *epoch*. An acknowledgement is only sent on
//! the connection that received the message: the broker redelivers everything
//! unacknowledged when the session resumes, and the message id makes the copy
//! harmless, whereas a stale packet id sent on a new connection could
//! acknowledge a different message.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{MqttConfig, MqttScheme};
use crate::metrics as m;
use crate::server::Status;

/// Source-only metric names not in [`crate::metrics`] (the rest are there).
pub mod metric {
    /// Counter: publishes parked because the intake queue was full
    /// (`--max-inflight` is below the broker's inflight window).
    pub const INTAKE_OVERFLOW: &str = "argus_bridge_intake_overflow_total";
    /// Counter: acknowledgements dropped because the connection that received
    /// the message is gone (the broker redelivers the message).
    pub const STALE_ACKS: &str = "argus_bridge_stale_acks_total";
}

/// One message as received from the broker.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The payload bytes, unchecked.
    pub payload: Bytes,
    /// The MQTT client id of the bridge connection that received it.
    pub client_id: Arc<str>,
    /// When the bridge received it.
    pub received_at: DateTime<Utc>,
    /// True when the broker marked it as a redelivery.
    pub dup: bool,
}

/// Why a message could not be made durable; it is then not acknowledged and
/// the broker redelivers it when the session resumes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotDurable(pub String);

/// Completes when a message is durable (stored and published, or dead-lettered).
pub type Durable = Pin<Box<dyn Future<Output = Result<(), NotDurable>> + Send>>;

/// What the source hands each message to (the pipeline, see `app`).
pub trait Handler: Send + Sync + 'static {
    /// Admits one message. Called in receive order, one message at a time per
    /// connection; it may wait (registry look-up, a full sink). The returned
    /// future completes once the message is durable; the source acknowledges it
    /// then, in receive order.
    fn admit(&self, msg: Message) -> impl Future<Output = Durable> + Send;
}

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Pem {
        what: &'static str,
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("CA certificate from {path} rejected: {source}")]
    BadCa { path: String, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls configuration of every connection, in connection order (see [`tls_config`]).
pub fn tls_configs(cfg: &MqttConfig) -> Result<Vec<Option<Arc<rustls::ClientConfig>>>, TlsError> {
    (0..cfg.connections).map(|c| tls_config(cfg, c)).collect()
}

/// Builds the rustls client configuration (ring provider) of connection
/// `conn`: the CA from `--mqtt-ca-file` and, when configured, the client
/// certificate and key, with `{replica}` and `{connection}` in their paths
/// expanded (brokers that take the client id from the certificate's CN need
/// one certificate per connection: `bridges/bridge-{replica}-{connection}.crt`).
pub fn tls_config(
    cfg: &MqttConfig,
    conn: u16,
) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    if cfg.addr.scheme != MqttScheme::Tls {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &cfg.ca_file {
        let path = ca.display().to_string();
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Pem {
                what: "CA file",
                path: path.clone(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate { path });
        }
        for c in certs {
            roots.add(c).map_err(|source| TlsError::BadCa {
                path: path.clone(),
                source,
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match cfg
        .identity
        .as_ref()
        .map(|id| id.for_connection(cfg.replica, conn))
    {
        Some(id) => {
            let cert_path = id.cert_file.display().to_string();
            let chain = CertificateDer::pem_file_iter(&id.cert_file)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::Pem {
                    what: "client certificate",
                    path: cert_path.clone(),
                    source,
                })?;
            if chain.is_empty() {
                return Err(TlsError::NoCertificate { path: cert_path });
            }
            let key =
                PrivateKeyDer::from_pem_file(&id.key_file).map_err(|source| TlsError::Pem {
                    what: "client key",
                    path: id.key_file.display().to_string(),
                    source,
                })?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

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

fn request_capacity(max_inflight: usize) -> usize {
    2 * max_inflight + 16
}

/// Runs all `--connections` connections until `shutdown` is cancelled, then
/// drains them: no new messages are admitted, admitted ones are acknowledged
/// once durable, and each connection disconnects cleanly.
pub async fn run<H: Handler>(
    cfg: MqttConfig,
    tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    handler: Arc<H>,
    status: Status,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..cfg.connections {
        let opts = mqtt_options(&cfg, conn, tls.get(usize::from(conn)).cloned().flatten());
        tasks.spawn(run_connection(
            cfg.clone(),
            conn,
            opts,
            handler.clone(),
            status.clone(),
            shutdown.clone(),
        ));
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            error!(error = %e, "An MQTT connection task failed.");
        }
    }
}

/// Which connection attempt of a connection is current (see the module docs).
struct Epoch {
    current: Mutex<u64>,
}

impl Epoch {
    fn get(&self) -> u64 {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queue from the poll task to the worker.
///
/// The poll task must never wait (trap 3), so pushing never blocks. The queue
/// is bounded by the protocol instead of by a capacity: it only holds messages
/// of the current connection that are not yet acknowledged, and the broker
/// never has more than its inflight window of those outstanding. Entries of a
/// lost connection are purged on reconnect (the broker redelivers them).
/// A length above `--max-inflight` is reported as a configuration mismatch.
#[derive(Default)]
struct Intake {
    queue: Mutex<VecDeque<Received>>,
    closed: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

enum Pushed {
    Queued(usize),
    Closed,
}

impl Intake {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Received>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, r: Received) -> Pushed {
        let len = {
            let mut q = self.lock();
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Pushed::Closed;
            }
            q.push_back(r);
            q.len()
        };
        self.notify.notify_one();
        Pushed::Queued(len)
    }

    /// Stops accepting; what is queued can still be popped.
    fn close(&self) {
        {
            let _q = self.lock();
            self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.notify.notify_one();
    }

    /// Removes entries received before `epoch`; returns how many.
    fn purge_before(&self, epoch: u64) -> usize {
        let mut q = self.lock();
        let before = q.len();
        q.retain(|r| r.epoch >= epoch);
        before - q.len()
    }

    /// The next entry; `None` once closed and empty.
    async fn pop(&self) -> Option<Received> {
        loop {
            {
                let mut q = self.lock();
                if let Some(r) = q.pop_front() {
                    return Some(r);
                }
                if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                    return None;
                }
            }
            // `notify_one` stores a permit when nobody waits, so a push
            // between the check above and this await is not missed.
            self.notify.notified().await;
        }
    }
}

/// A publish handed from the poll task to the worker.
struct Received {
    epoch: u64,
    publish: Publish,
    at: Instant,
    received_at: DateTime<Utc>,
}

/// An admitted publish waiting, in order, for durability.
struct Pending {
    epoch: u64,
    publish: Publish,
    at: Instant,
    durable: Durable,
}

/// Runs one connection: the poll loop here, the worker and the acker as tasks.
pub async fn run_connection<H: Handler>(
    cfg: MqttConfig,
    conn: u16,
    opts: MqttOptions,
    handler: Arc<H>,
    status: Status,
    shutdown: CancellationToken,
) {
    let client_id: Arc<str> = opts.client_id().into();
    let subscription = cfg.subscription();
    let (client, mut eventloop) = AsyncClient::new(opts, request_capacity(cfg.max_inflight));
    let epoch = Arc::new(Epoch {
        current: Mutex::new(0),
    });
    let intake = Arc::new(Intake::default());
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(cfg.max_inflight);
    // Cancelled by the acker when everything admitted has been acknowledged
    // after the intake closed, so the poll loop can disconnect.
    let drained = CancellationToken::new();

    let worker = tokio::spawn(worker(
        intake.clone(),
        pending_tx,
        handler,
        client_id.clone(),
        epoch.clone(),
        shutdown.clone(),
    ));
    let acker = tokio::spawn(acker(
        pending_rx,
        client.clone(),
        epoch.clone(),
        client_id.clone(),
        drained.clone(),
    ));

    let mut backoff = Backoff::new(cfg.reconnect_max);
    let mut up = false;
    let mut subscribed = false;
    let mut current_epoch: u64 = epoch.get();
    let mut dropped_while_draining: u64 = 0;
    let mut overflow_warned = false;

    loop {
        if shutdown.is_cancelled() && (!up || drained.is_cancelled()) {
            // Not connected (nothing more can be acknowledged on this
            // session), or drained and the DISCONNECT could not be queued.
            break;
        }

        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                backoff.reset();
                if !up {
                    up = true;
                    metrics::gauge!(m::MQTT_CONNECTED, "connection" => conn.to_string()).set(1.0);
                }
                info!(client_id = %client_id, session_present = ack.session_present, epoch = current_epoch, "Connected to the broker.");
                // Subscribe after every ConnAck: required when the session is
                // new, harmless when it was resumed.
                if let Err(e) = client.try_subscribe(subscription.clone(), QoS::AtLeastOnce) {
                    warn!(client_id = %client_id, error = %e, "Subscribe request not queued.");
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    error!(client_id = %client_id, subscription = %subscription, "The broker refused the subscription (check the ACL).");
                } else {
                    info!(client_id = %client_id, subscription = %subscription, "Subscribed.");
                    if !subscribed {
                        // Ready once messages can flow, not merely connected.
                        subscribed = true;
                        status.connection_up();
                    }
                }
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                metrics::counter!(m::RECEIVED_TOTAL).increment(1);
                let r = Received {
                    epoch: current_epoch,
                    publish,
                    at: Instant::now(),
                    received_at: Utc::now(),
                };
                match intake.push(r) {
                    Pushed::Closed => {
                        // Draining: not admitted, not acknowledged; the
                        // broker redelivers it when the session resumes.
                        dropped_while_draining += 1;
                    }
                    Pushed::Queued(len) => {
                        metrics::gauge!(m::IN_FLIGHT_MESSAGES).increment(1.0);
                        if len > cfg.max_inflight && !overflow_warned {
                            overflow_warned = true;
                            metrics::counter!(metric::INTAKE_OVERFLOW).increment(1);
                            warn!(client_id = %client_id, max_inflight = cfg.max_inflight, queued = len, "More messages queued than --max-inflight: the broker's inflight window is larger; raise --max-inflight to match it.");
                        }
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                debug!(client_id = %client_id, "DISCONNECT sent.");
                if shutdown.is_cancelled() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if subscribed {
                    subscribed = false;
                    status.connection_down();
                }
                if up {
                    up = false;
                    metrics::gauge!(m::MQTT_CONNECTED, "connection" => conn.to_string()).set(0.0);
                }
                // Everything received on the lost connection stays
                // unacknowledged; acks for it are dropped from now on.
                current_epoch = bump_epoch(&epoch, &mut eventloop);
                // Their copies come again on the resumed session; processing
                // the old ones would only hold up the new.
                release_in_flight(intake.purge_before(current_epoch));
                if shutdown.is_cancelled() || matches!(e, ConnectionError::RequestsDone) {
                    break;
                }
                metrics::counter!(m::RECONNECTS_TOTAL, "target" => "mqtt").increment(1);
                let delay = backoff.next_delay();
                warn!(client_id = %client_id, error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection lost or refused; reconnecting.");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }

    if subscribed {
        status.connection_down();
    }
    if up {
        metrics::gauge!(m::MQTT_CONNECTED, "connection" => conn.to_string()).set(0.0);
    }
    if dropped_while_draining > 0 {
        info!(client_id = %client_id, count = dropped_while_draining, "Publishes received while draining were left to the broker.");
    }
    // Stop the worker and acker if they still run (connection lost during the
    // drain); what they hold is not acknowledged and will be redelivered.
    intake.close();
    release_in_flight(intake.purge_before(u64::MAX));
    worker.abort();
    acker.abort();
    let _ = worker.await;
    let _ = acker.await;
    drop(eventloop);
    info!(client_id = %client_id, "MQTT connection closed.");
}

fn release_in_flight(n: usize) {
    if n > 0 {
        metrics::gauge!(m::IN_FLIGHT_MESSAGES).decrement(n as f64);
    }
}

/// Starts a new epoch after a lost connection and removes any ack still
/// queued for the old one.
fn bump_epoch(epoch: &Epoch, eventloop: &mut EventLoop) -> u64 {
    let mut g = epoch.current.lock().unwrap_or_else(|p| p.into_inner());
    *g += 1;
    // `clean` drops queued PubAcks from the request channel (the network is
    // already gone, so it touches nothing else). The acker only queues an ack
    // while holding this lock and after checking the epoch, so none for the
    // old epoch can be queued after this point.
    eventloop.clean();
    *g
}

async fn worker<H: Handler>(
    intake: Arc<Intake>,
    pending: mpsc::Sender<Pending>,
    handler: Arc<H>,
    client_id: Arc<str>,
    epoch: Arc<Epoch>,
    shutdown: CancellationToken,
) {
    let mut closed = false;
    loop {
        let r = tokio::select! {
            biased;
            () = shutdown.cancelled(), if !closed => {
                // Stage 1 of shutdown: take no more publishes, but finish the
                // ones already queued. (The poll task may be idle inside
                // `poll`, so the worker closes the intake, not the poll task.)
                info!(client_id = %client_id, "Stopping intake; draining admitted messages.");
                intake.close();
                closed = true;
                continue;
            }
            r = intake.pop() => match r {
                Some(r) => r,
                None => break,
            },
        };
        if r.epoch != epoch.get() {
            // Received on a connection that is gone: the broker sends it again.
            release_in_flight(1);
            continue;
        }
        let msg = Message {
            topic: r.publish.topic.clone(),
            payload: r.publish.payload.clone(),
            client_id: client_id.clone(),
            received_at: r.received_at,
            dup: r.publish.dup,
        };
        let durable = handler.admit(msg).await;
        // Keep only what the ack needs; the payload lives on in the sink.
        let mut publish = r.publish;
        publish.payload = Bytes::new();
        let p = Pending {
            epoch: r.epoch,
            publish,
            at: r.at,
            durable,
        };
        if pending.send(p).await.is_err() {
            break;
        }
    }
}

async fn acker(
    mut pending: mpsc::Receiver<Pending>,
    client: AsyncClient,
    epoch: Arc<Epoch>,
    client_id: Arc<str>,
    drained: CancellationToken,
) {
    while let Some(Pending {
        epoch: msg_epoch,
        publish,
        at,
        durable,
    }) = pending.recv().await
    {
        let result = durable.await;
        metrics::gauge!(m::IN_FLIGHT_MESSAGES).decrement(1.0);
        match result {
            Ok(()) if publish.qos == QoS::AtMostOnce => {}
            Ok(()) => {
                if ack_in_epoch(&client, &epoch, msg_epoch, &publish).await {
                    metrics::counter!(m::ACKS_TOTAL).increment(1);
                    metrics::histogram!(m::ACK_LAG_SECONDS).record(at.elapsed().as_secs_f64());
                } else {
                    metrics::counter!(metric::STALE_ACKS).increment(1);
                }
            }
            Err(e) => {
                // Not durable: never acknowledge it. Acknowledging the later
                // messages would leave this one unacknowledged until the next
                // session anyway, so end this session: the broker redelivers.
                let mut g = epoch.current.lock().unwrap_or_else(|p| p.into_inner());
                if *g == msg_epoch {
                    warn!(client_id = %client_id, error = %e, "Message not durable; reconnecting so the broker redelivers it.");
                    // Fence off the rest of this epoch's acks.
                    *g += 1;
                    let _ = client.try_disconnect();
                }
            }
        }
    }
    // The intake is closed and everything admitted has been handled: ask for
    // a clean DISCONNECT, queued behind the last ack.
    drained.cancel();
    let _ = client.try_disconnect();
}

/// Queues the ack of `publish` if its connection is still the current one. Returns
/// false when the ack is stale (the broker will redeliver the message).
async fn ack_in_epoch(
    client: &AsyncClient,
    epoch: &Epoch,
    msg_epoch: u64,
    publish: &Publish,
) -> bool {
    loop {
        {
            let g = epoch.current.lock().unwrap_or_else(|p| p.into_inner());
            if *g != msg_epoch {
                return false;
            }
            if client.try_ack(publish).is_ok() {
                return true;
            }
        }
        // The request channel holds more than this connection can have
        // unacknowledged, so it is only full (or closed) while the poll task is
        // between connections; wait without holding the lock. The connection
        // task aborts this task when it ends.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Exponential backoff with full jitter: 100ms, 200ms, ... up to `max`.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Self { attempt: 0, max }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: uniformly random in [base/2, base], base doubling each time.
    pub fn next_delay(&mut self) -> Duration {
        let base = Duration::from_millis(100)
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let jitter = rand::random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }
}
