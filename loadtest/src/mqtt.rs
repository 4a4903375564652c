//! The MQTT publisher: simulated devices over mTLS, QoS 1, one rumqttc connection per group
//! of `--devices-per-connection` devices, every PUBACK counted by packet id.
//!
//! Packet ids are matched to sequence numbers in order: each connection has one publisher,
//! rumqttc turns requests into `Outgoing::Publish(pkid)` events in request order, so a FIFO of
//! the sent sequence numbers maps each pkid to its message, and `PubAck(pkid)` marks it acked.
//! A connection that fails is not reconnected: its unacked messages are reported as unacked
//! (never as lost), and the error is reported.
//!
//! `--devices-per-connection` > 1 publishes for several devices with the *first* device's
//! certificate. The stock broker ACL (`pattern write devices/%u/telemetry`) refuses that, and
//! Mosquitto still PUBACKs refused QoS 1 publishes, so those messages show up as lost: use
//! it only with a permissive ACL.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::ProgressBar;
use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};

use crate::devices::Device;
use crate::latency::Latencies;
use crate::pacing::{Pacer, Rate};
use crate::payload::{mqtt_payload, now_ns};
use crate::stop::stop_pair;

/// Where to connect: `mqtts://host:port` (mTLS) or `mqtt://host:port`.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// CA certificate PEM; `Some` for `mqtts://`.
    pub ca_pem: Option<Vec<u8>>,
}

impl Target {
    pub fn parse(url: &str, ca_pem: Option<Vec<u8>>) -> anyhow::Result<Target> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            anyhow::bail!(
                "--mqtt-url: expected mqtts://host:port or mqtt://host:port, got `{url}`"
            );
        };
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .with_context(|| format!("--mqtt-url: no port in `{url}`"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("--mqtt-url: bad port in `{url}`"))?;
        if tls {
            anyhow::ensure!(ca_pem.is_some(), "--mqtt-ca-file is required for mqtts://");
        }
        Ok(Target {
            host: host.to_string(),
            port,
            ca_pem: if tls { ca_pem } else { None },
        })
    }

    pub fn options(&self, client_id: &str, device: &Device, inflight: u16) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_inflight(inflight.max(1));
        // Bounded: a full inflight window stops the event loop reading requests, and this
        // channel then pushes back on the publisher.
        o.set_request_channel_capacity(usize::from(inflight.max(1)));
        o.set_max_packet_size(1 << 20, 1 << 20);
        if let Some(ca) = &self.ca_pem {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca: ca.clone(),
                alpn: None,
                client_auth: Some((
                    device.cert_pem.clone().into_bytes(),
                    device.key_pem.clone().into_bytes(),
                )),
            }));
        }
        o
    }
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct Plan {
    pub run_id: String,
    pub rate: Rate,
    /// Stop after this many messages in total (across connections) ...
    pub count: Option<u64>,
    /// ... or after this long.
    pub duration: Option<Duration>,
    pub devices_per_connection: usize,
    pub inflight: u16,
    /// How long to wait for the last PUBACKs after the last publish.
    pub ack_timeout: Duration,
}

/// The publishers' side of the run.
pub struct Published {
    pub sent: u64,
    pub acked: Vec<u64>,
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    pub ack_latency: Latencies,
    pub errors: Vec<String>,
}

#[derive(Default)]
struct ConnState {
    /// Sequence numbers handed to the client, waiting for their `Outgoing::Publish(pkid)`.
    fifo: VecDeque<(u64, u64)>,
    by_pkid: HashMap<u16, (u64, u64)>,
    acked: Vec<u64>,
    error: Option<String>,
}

struct ConnResult {
    sent: u64,
    acked: Vec<u64>,
    first_send_ns: u64,
    last_send_ns: u64,
    ack_latency: Latencies,
    error: Option<String>,
}

/// Publishes `plan` from `devices` (grouped into connections) and waits for the PUBACKs.
pub async fn publish(
    target: &Target,
    devices: &[Device],
    plan: &Plan,
    progress: ProgressBar,
    start_ns: u64,
) -> anyhow::Result<Published> {
    anyhow::ensure!(
        !devices.is_empty(),
        "--devices: at least one device is needed"
    );
    let groups: Vec<Vec<Device>> = devices
        .chunks(plan.devices_per_connection.max(1))
        .map(|c| c.to_vec())
        .collect();
    let n = groups.len();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (idx, group) in groups.into_iter().enumerate() {
        let target = target.clone();
        let plan = plan.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            run_connection(target, idx, n, group, plan, start, start_ns, progress).await
        }));
    }
    let mut out = Published {
        sent: 0,
        acked: Vec::new(),
        first_send_ns: u64::MAX,
        last_send_ns: 0,
        ack_latency: Latencies::new(start_ns),
        errors: Vec::new(),
    };
    for t in tasks {
        let r = t.await.context("a publisher task panicked")?;
        out.sent += r.sent;
        out.acked.extend(r.acked);
        if r.sent > 0 {
            out.first_send_ns = out.first_send_ns.min(r.first_send_ns);
            out.last_send_ns = out.last_send_ns.max(r.last_send_ns);
        }
        out.ack_latency.merge(&r.ack_latency);
        out.errors.extend(r.error);
    }
    if out.first_send_ns == u64::MAX {
        out.first_send_ns = start_ns;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn run_connection(
    target: Target,
    idx: usize,
    n_conns: usize,
    devices: Vec<Device>,
    plan: Plan,
    start: Instant,
    start_ns: u64,
    progress: ProgressBar,
) -> ConnResult {
    let mut result = ConnResult {
        sent: 0,
        acked: Vec::new(),
        first_send_ns: 0,
        last_send_ns: 0,
        ack_latency: Latencies::new(start_ns),
        error: None,
    };
    let client_id = format!("loadtest-{}-{idx}", plan.run_id);
    let opts = target.options(&client_id, &devices[0], plan.inflight);
    let (client, mut eventloop) = AsyncClient::new(opts, usize::from(plan.inflight.max(1)));
    let state = Arc::new(Mutex::new(ConnState::default()));
    let latency = Arc::new(Mutex::new(Latencies::new(start_ns)));
    let (dead_tx, dead) = stop_pair();
    let (conn_tx, connected) = stop_pair();

    let poll = {
        let state = state.clone();
        let latency = latency.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => conn_tx.stop(),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let mut s = lock(&state);
                        if let Some(v) = s.fifo.pop_front() {
                            s.by_pkid.insert(pkid, v);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let now = now_ns();
                        let hit = lock(&state).by_pkid.remove(&ack.pkid);
                        if let Some((seq, sent)) = hit {
                            lock(&state).acked.push(seq);
                            lock(&latency).record(sent, now);
                            progress.inc(1);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        lock(&state).error = Some(format!("connection {idx}: {e}"));
                        break;
                    }
                }
            }
            dead_tx.stop();
        })
    };

    // Wait for the CONNACK (or the connection failing).
    tokio::select! {
        _ = connected.stopped() => {}
        _ = dead.stopped() => {}
        _ = tokio::time::sleep(Duration::from_secs(15)) => {
            lock(&state).error = Some(format!("connection {idx}: no CONNACK within 15 s"));
        }
    }

    let conn_rate = plan.rate.split(n_conns);
    let pacer = Pacer::new(start, conn_rate);
    let deadline = plan.duration.map(|d| start + d);
    let mut k: u64 = 0;
    if lock(&state).error.is_none() && !dead.is_stopped() {
        loop {
            let seq = idx as u64 + k * n_conns as u64;
            if plan.count.is_some_and(|n| seq >= n) {
                break;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break;
            }
            if k >= pacer.allowed(now) {
                tokio::time::sleep_until(pacer.due(k).into()).await;
                continue;
            }
            let device = &devices[(k as usize) % devices.len()];
            let sent_ns = now_ns();
            let payload = mqtt_payload(&plan.run_id, device.id, seq, sent_ns);
            let topic = format!("devices/{}/telemetry", device.id);
            lock(&state).fifo.push_back((seq, sent_ns));
            let published = tokio::select! {
                r = client.publish(topic, QoS::AtLeastOnce, false, payload) => r.is_ok(),
                _ = dead.stopped() => false,
            };
            if !published {
                lock(&state).fifo.pop_back();
                break;
            }
            if k == 0 {
                result.first_send_ns = sent_ns;
            }
            result.last_send_ns = sent_ns;
            k += 1;
        }
    }
    result.sent = k;

    // Wait for the remaining PUBACKs.
    let ack_deadline = Instant::now() + plan.ack_timeout;
    loop {
        let outstanding = {
            let s = lock(&state);
            s.fifo.len() + s.by_pkid.len()
        };
        if outstanding == 0 || dead.is_stopped() || Instant::now() >= ack_deadline {
            break;
        }
        let _ = dead.wait_timeout(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(2), dead.stopped())
        .await
        .is_err()
    {
        poll.abort();
    }
    let mut s = lock(&state);
    result.acked = std::mem::take(&mut s.acked);
    result.error = s.error.take();
    result.ack_latency = std::mem::replace(&mut *lock(&latency), Latencies::new(start_ns));
    result
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked mid-update; the counters stay usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("mqtts://127.0.0.1:17883", Some(b"ca".to_vec())).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 17883));
        assert!(t.ca_pem.is_some());
        let t = Target::parse("mqtt://localhost:1883", None).unwrap();
        assert!(t.ca_pem.is_none());
        assert!(Target::parse("mqtts://127.0.0.1:17883", None).is_err());
        assert!(Target::parse("http://x:1", None).is_err());
    }
}
