//! One connection's poll loop: connect, subscribe after every ConnAck, push each
//! publish onto the intake, reconnect with backoff, and on shutdown drain and
//! disconnect. The worker and the acker run beside it as tasks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use argus_pipeline::backoff::Backoff;
use chrono::Utc;
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::ack::{acker, bump_epoch, Epoch, Pending};
use super::handler::Handler;
use super::intake::{release_in_flight, Intake, Pushed, Received};
use super::options::request_capacity;
use super::protocol::{Event, Options};
use super::reconnect::{Reconnect, Retry};
use super::unacked::Unacked;
use super::worker::worker;
use crate::config::{MqttConfig, MqttVersion};
use crate::metrics;
use crate::server::Status;

/// How long a renewal waits for the broker to close the connection after our
/// DISCONNECT before it drops the connection itself.
const RENEW_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs one connection: the poll loop here, the worker and the acker as tasks.
pub async fn run_connection<H: Handler>(
    cfg: MqttConfig,
    conn: u16,
    opts: Options,
    handler: Arc<H>,
    status: Status,
    unacked: Unacked,
    shutdown: CancellationToken,
) {
    let client_id: Arc<str> = opts.client_id().into();
    let subscription = cfg.subscription();
    let (client, mut eventloop) = opts.connect(request_capacity(cfg.max_inflight));
    let epoch = Arc::new(Epoch::new());
    let intake = Arc::new(Intake::new(cfg.intake));
    let head = unacked.head(conn);
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
        head.clone(),
        shutdown.clone(),
    ));
    let acker = tokio::spawn(acker(
        pending_rx,
        client.clone(),
        epoch.clone(),
        client_id.clone(),
        head,
        drained.clone(),
    ));

    let mut reconnect = Reconnect::new(cfg.reconnect_max);
    let mut up = false;
    let mut subscribed = false;
    let mut current_epoch: u64 = epoch.get();
    let mut dropped_while_draining: u64 = 0;
    let mut overflow_warned = false;
    let mut shed_since_warned: u64 = 0;
    // Set when a QoS 1 message finds the intake full: further QoS 1 messages are
    // left to the broker until everything queued is acknowledged, then the
    // connection is renewed (the broker redelivers what it kept).
    let mut refusing = false;
    let mut full_backoff = Backoff::new(cfg.reconnect_max);
    // While a renewal's DISCONNECT is out: when to stop waiting for the broker
    // to close the connection.
    let mut renew_deadline: Option<tokio::time::Instant> = None;
    let mut renew_now = false;
    // PUBACKs written to the network; see `Epoch::drained`.
    let mut acks_written: u64 = 0;

    loop {
        if shutdown.is_cancelled() && (!up || drained.is_cancelled()) {
            // Not connected (nothing more can be acknowledged on this
            // session), or drained and the DISCONNECT could not be queued.
            break;
        }

        let polled = match renew_deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, eventloop.poll())
                .await
                .ok(),
            None => Some(eventloop.poll().await),
        };
        let polled = polled.unwrap_or_else(|| {
            warn!(client_id = %client_id, timeout_ms = RENEW_TIMEOUT.as_millis() as u64, "The broker did not close the connection after our DISCONNECT; dropping it.");
            renew_now = true;
            Ok(Event::Other)
        });
        match polled {
            Ok(Event::ConnAck { session_present }) => {
                reconnect.connected(Instant::now());
                if !up {
                    up = true;
                    metrics::mqtt_connected(conn, true);
                }
                info!(client_id = %client_id, mqtt_version = ?cfg.version, session_present, epoch = current_epoch, "Connected to the broker.");
                // Subscribe after every ConnAck: required when the session is
                // new, harmless when it was resumed.
                if let Err(e) = client.try_subscribe(subscription.clone()) {
                    warn!(client_id = %client_id, error = %e, "Subscribe request not queued.");
                }
            }
            Ok(Event::SubAck {
                refused: Some(reason),
            }) => {
                error!(client_id = %client_id, subscription = %subscription, reason = %reason, "The broker refused the subscription (check the ACL).");
            }
            Ok(Event::SubAck { refused: None }) => {
                info!(client_id = %client_id, subscription = %subscription, "Subscribed.");
                if !subscribed {
                    // Ready once messages can flow, not merely connected.
                    subscribed = true;
                    status.connection_up();
                }
            }
            Ok(Event::ServerDisconnect { reason }) => {
                // The connection error that follows reconnects.
                warn!(client_id = %client_id, reason = %reason, "The broker closed the session.");
            }
            Ok(Event::Publish(publish)) => {
                metrics::received();
                if !epoch.track(current_epoch, &publish) {
                    // Already queued on this connection; its PUBACK follows.
                    metrics::dup_skipped();
                    continue;
                }
                if refusing && publish.qos != QoS::AtMostOnce {
                    epoch.untrack(current_epoch, publish.pkid);
                    metrics::left_to_broker();
                    continue;
                }
                if cfg.version == MqttVersion::V5
                    && publish.qos != QoS::AtMostOnce
                    && epoch.over_window(current_epoch, cfg.max_inflight)
                {
                    // The broker sent past our Receive Maximum (Mosquitto 2.0.11
                    // does once acknowledgements flow: its issue #2301). Hold to
                    // the bound ourselves: leave it to the broker, as when the
                    // intake is full, and renew the connection once drained.
                    epoch.untrack(current_epoch, publish.pkid);
                    metrics::receive_maximum_exceeded();
                    metrics::left_to_broker();
                    if !refusing {
                        refusing = true;
                        warn!(client_id = %client_id, receive_maximum = cfg.max_inflight, "The broker sent more unacknowledged messages than the Receive Maximum: leaving further QoS 1 messages to it until what is queued is acknowledged, then reconnecting so it redelivers them.");
                    }
                    continue;
                }
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
                    Pushed::Full(r) if r.is_qos0() => {
                        // At-most-once by contract: shed, counted, never queued
                        // without bound (docs/reliability.md).
                        metrics::shed_qos0();
                        if shed_since_warned == 0 {
                            warn!(client_id = %client_id, max_messages = cfg.intake.max_messages, max_bytes = cfg.intake.max_bytes, "Intake full: shedding QoS 0 messages (counted in argus_bridge_shed_total) until it drains.");
                        }
                        shed_since_warned += 1;
                    }
                    Pushed::Full(r) => {
                        // A QoS 1 message the broker sent past its window: not
                        // admitted, not acknowledged. The broker keeps it and
                        // redelivers it on the resumed session; see `refusing`.
                        epoch.untrack(current_epoch, r.publish.pkid);
                        metrics::left_to_broker();
                        if !refusing {
                            refusing = true;
                            warn!(client_id = %client_id, max_messages = cfg.intake.max_messages, max_bytes = cfg.intake.max_bytes, "Intake full with a QoS 1 message: leaving further QoS 1 messages to the broker until what is queued is acknowledged, then reconnecting so it redelivers them.");
                        }
                    }
                    Pushed::Queued(len) => {
                        metrics::in_flight(1.0);
                        if len == 1 && shed_since_warned > 0 {
                            info!(client_id = %client_id, shed = shed_since_warned, "Intake drained; QoS 0 messages are admitted again.");
                            shed_since_warned = 0;
                        }
                        if len > cfg.max_inflight && !overflow_warned {
                            overflow_warned = true;
                            metrics::intake_overflow();
                            warn!(client_id = %client_id, max_inflight = cfg.max_inflight, queued = len, "More messages queued than --max-inflight: the broker's inflight window is larger; raise --max-inflight to match it.");
                        }
                    }
                }
            }
            Ok(Event::DisconnectWritten) => {
                debug!(client_id = %client_id, "DISCONNECT sent.");
                if shutdown.is_cancelled() && renew_deadline.is_none() {
                    break;
                }
            }
            Ok(Event::PubAckWritten) => {
                acks_written += 1;
                // Progress: a reconnect after an intake-full episode may follow at once.
                full_backoff.reset();
            }
            Ok(Event::Other) => {}
            Err(e) if renew_deadline.is_some() => {
                // The broker closed the connection after our DISCONNECT.
                debug!(client_id = %client_id, error = %e, "Connection closed for the renewal.");
                renew_now = true;
            }
            Err(e) => {
                went_down(&status, conn, &mut up, &mut subscribed);
                // Everything received on the lost connection stays
                // unacknowledged; acks for it are dropped from now on.
                current_epoch = bump_epoch(&epoch, &mut eventloop);
                acks_written = epoch.acks_queued();
                // Their copies come again on the resumed session; processing
                // the old ones would only hold up the new.
                release_in_flight(intake.purge_before(current_epoch));
                if shutdown.is_cancelled() || e.requests_done {
                    break;
                }
                let Retry { delay, reported } = reconnect.failed(Instant::now());
                if reported {
                    metrics::reconnected();
                    warn!(client_id = %client_id, error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection lost or refused; reconnecting.");
                } else {
                    debug!(client_id = %client_id, error = %e, "Broker not back yet; trying again.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
        if refusing && renew_deadline.is_none() && epoch.drained(current_epoch, acks_written) {
            // Everything queued before the intake filled is acknowledged: have
            // the broker end the connection so it redelivers what was left to it.
            // A DISCONNECT behind the written PUBACKs, not a dropped socket: a
            // socket closed with unread data (the broker is still sending)
            // is reset, Linux discards what it had not sent yet, and the broker
            // redelivers the very messages just acknowledged (measured: 659 of
            // 16,024 stored in 120 s after a 40 s stall). Each round
            // acknowledges what the intake held, so this cannot spin without
            // progress; rounds that acknowledged nothing back off.
            metrics::intake_full_disconnect();
            info!(client_id = %client_id, "Queued messages acknowledged; disconnecting so the broker redelivers what it kept.");
            match client.try_disconnect() {
                Ok(()) => {
                    renew_deadline = Some(tokio::time::Instant::now() + RENEW_TIMEOUT);
                }
                Err(e) => {
                    warn!(client_id = %client_id, error = %e, "DISCONNECT not queued; dropping the connection.");
                    renew_now = true;
                }
            }
        }
        if std::mem::take(&mut renew_now) {
            refusing = false;
            renew_deadline = None;
            went_down(&status, conn, &mut up, &mut subscribed);
            // Drops the network if the broker has not already; the acks were
            // flushed before the DISCONNECT.
            current_epoch = bump_epoch(&epoch, &mut eventloop);
            acks_written = epoch.acks_queued();
            release_in_flight(intake.purge_before(current_epoch));
            metrics::reconnected();
            let delay = full_backoff.next_delay();
            info!(client_id = %client_id, retry_in_ms = delay.as_millis() as u64, "Reconnecting so the broker redelivers what it kept.");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    if subscribed {
        status.connection_down();
    }
    if up {
        metrics::mqtt_connected(conn, false);
    }
    if dropped_while_draining > 0 {
        info!(client_id = %client_id, count = dropped_while_draining, "Publishes received while draining were left to the broker.");
    }
    // Stop the worker and acker if they still run (connection lost during the
    // drain); what they hold is not acknowledged and will be redelivered.
    intake.close();
    release_in_flight(intake.discard_all());
    worker.abort();
    acker.abort();
    let _ = worker.await;
    let _ = acker.await;
    drop(eventloop);
    info!(client_id = %client_id, "MQTT connection closed.");
}

/// The connection is gone: not ready, not connected.
fn went_down(status: &Status, conn: u16, up: &mut bool, subscribed: &mut bool) {
    if std::mem::take(subscribed) {
        status.connection_down();
    }
    if std::mem::take(up) {
        metrics::mqtt_connected(conn, false);
    }
}
