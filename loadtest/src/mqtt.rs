//! The MQTT publisher: simulated devices over mTLS, QoS 1, one rumqttc connection per group
//! of `--devices-per-connection` devices, every PUBACK counted by packet id. The devices
//! speak MQTT 3.1.1 or 5 (`--mqtt-version`, [`crate::device_client`]); with 5 they may send
//! publish properties (`--properties`).
//!
//! Packet ids are matched to sequence numbers in order ([`crate::acks`]): each connection
//! has one publisher, rumqttc turns requests into `Outgoing::Publish(pkid)` events in request
//! order, so a FIFO of the handed-over messages maps each pkid to its message, and
//! `PubAck(pkid)` marks it acked. An MQTT 5 PUBACK with a failure reason code (the broker's
//! ACL refused the publish) leaves its message unacked and is named in the report's notes.
//!
//! A connection that is lost after it was established (a broker restart, a network fault) is
//! made again with a short backoff, and every message not acknowledged yet is published again
//! in the new session (see [`run_connection`]); the broker binds the client id to the
//! certificate's CN, so each device certificate has one connection at a time. Messages that
//! are never acknowledged are reported as unacked (never as lost); a connection that cannot be
//! made at all, or not again within the ack timeout, is reported as an error.
//!
//! `--devices-per-connection` > 1 publishes for several devices with the *first* device's
//! certificate. The stock broker ACL (`pattern write devices/%u/telemetry`) refuses that, and
//! Mosquitto still PUBACKs refused QoS 1 publishes, so those messages show up as lost: use
//! it only with a permissive ACL. With MQTT 5 Mosquitto answers those publishes with
//! `NotAuthorized`, and they are reported unacked instead.

use argus_pipeline::backoff::Backoff;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use argus_pipeline::flags::MqttVersion;
use indicatif::ProgressBar;

use crate::acks::{AckTracker, Msg};
use crate::device_client::{Event, EventLoop, Options, Settings};

use crate::devices::Device;
use crate::latency::Latencies;
use crate::pacing::{Pacer, Rate};
use crate::payload::{mqtt_payload, mqtt_properties, now_ns, PropertiesMode};
use crate::stop::{stop_pair, StopHandle};

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

    pub fn options(
        &self,
        version: MqttVersion,
        client_id: &str,
        device: &Device,
        inflight: u16,
    ) -> Options {
        Options::new(version, self.settings(client_id, device, inflight))
    }

    /// How `device` connects here as `client_id`.
    pub fn settings<'a>(
        &'a self,
        client_id: &'a str,
        device: &Device,
        inflight: u16,
    ) -> Settings<'a> {
        Settings {
            client_id,
            host: &self.host,
            port: self.port,
            tls: self.ca_pem.as_ref().map(|ca| {
                (
                    ca.clone(),
                    device.cert_pem.clone().into_bytes(),
                    device.key_pem.clone().into_bytes(),
                )
            }),
            inflight,
        }
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
    pub mqtt_version: MqttVersion,
    /// Publish properties (MQTT 5 only).
    pub properties: PropertiesMode,
    /// How long to wait for the last PUBACKs after the last publish; also how long a lost
    /// connection keeps trying to reconnect before it gives up.
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
    /// Sessions re-established after a lost connection, over all connections.
    pub reconnects: u64,
    /// Messages published again in a new session because the old one ended before their PUBACK.
    pub resent: u64,
    /// Why connections were lost (at most one line per connection).
    pub notes: Vec<String>,
}

struct ConnResult {
    sent: u64,
    acked: Vec<u64>,
    first_send_ns: u64,
    last_send_ns: u64,
    ack_latency: Latencies,
    error: Option<String>,
    reconnects: u64,
    resent: u64,
    note: Option<String>,
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
        reconnects: 0,
        resent: 0,
        notes: Vec::new(),
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
        out.reconnects += r.reconnects;
        out.resent += r.resent;
        out.notes.extend(r.note);
    }
    if out.first_send_ns == u64::MAX {
        out.first_send_ns = start_ns;
    }
    Ok(out)
}

/// First wait before reconnecting after a lost connection; it doubles up to
/// [`RECONNECT_MAX`] while the broker stays away.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How long a connection attempt may take until its CONNACK.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(15);

/// What one session (one rumqttc event loop) of a connection ended with.
enum SessionEnd {
    /// Everything generated and acknowledged, or the ack deadline passed: done.
    Done,
    /// The connection was lost (or could not be made): reconnect.
    Lost(String),
}

/// One connection of the run: a device (or group) that publishes its share of the plan.
///
/// Each session is a fresh rumqttc `AsyncClient` + `EventLoop`. When a session's connection is
/// lost after it had been established, the connection waits (100 ms, doubling up to 2 s) and
/// connects again, then publishes every message not yet acknowledged again (oldest first;
/// the bridge's message ids make the copies idempotent) before going on. The pacing is by
/// the clock, so messages due while the broker was away go out right after the reconnect,
/// the way a device flushes the readings it buffered. The bookkeeping is [`AckTracker`].
///
/// A connection gives up when its *first* connection fails (a setup error: wrong URL, CA or
/// certificate), or when it cannot reconnect for longer than `plan.ack_timeout`, or when
/// the ack deadline passes; what is then still unacknowledged is reported as unacked.
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
        reconnects: 0,
        resent: 0,
        note: None,
    };
    let client_id = format!("loadtest-{}-{idx}", plan.run_id);
    let opts = target.options(plan.mqtt_version, &client_id, &devices[0], plan.inflight);
    let tracker = Arc::new(Mutex::new(AckTracker::default()));
    let latency = Arc::new(Mutex::new(Latencies::new(start_ns)));
    let mut gen = Generator {
        idx: idx as u64,
        n_conns: n_conns as u64,
        pacer: Pacer::new(start, plan.rate.split(n_conns)),
        rate_is_max: plan.rate.per_second().is_none(),
        deadline: plan.duration.map(|d| start + d),
        count: plan.count,
        k: 0,
    };
    let mut ack_deadline: Option<Instant> = None;
    // Sessions that got a CONNACK.
    let mut sessions: u64 = 0;
    let mut down_since: Option<Instant> = None;
    let mut backoff = Backoff::between(RECONNECT_INITIAL, RECONNECT_MAX);
    let mut losses: Vec<String> = Vec::new();
    loop {
        // Whatever an earlier session left unacknowledged is published again.
        lock(&tracker).new_session();
        let (end, established) = run_session(
            &opts,
            &plan,
            &devices,
            &mut gen,
            &mut ack_deadline,
            &tracker,
            &latency,
            &progress,
            &mut result,
        )
        .await;
        if established {
            sessions += 1;
        }
        let e = match end {
            SessionEnd::Done => break,
            SessionEnd::Lost(e) => e,
        };
        if sessions == 0 {
            // Never connected: a setup error (URL, CA, certificate), not a fault under test.
            result.error = Some(format!("connection {idx}: {e}"));
            break;
        }
        let now = Instant::now();
        if established {
            losses.push(e.clone());
            down_since = Some(now);
            backoff.reset();
        }
        let since = down_since.unwrap_or(now);
        if ack_deadline.is_some_and(|d| now >= d) || now.duration_since(since) >= plan.ack_timeout {
            let outstanding = lock(&tracker).outstanding();
            result.error = Some(format!(
                "connection {idx}: gave up reconnecting after {:.1} s ({e}); {outstanding} message(s) unacknowledged",
                now.duration_since(since).as_secs_f64()
            ));
            break;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    result.reconnects = sessions.saturating_sub(1);
    if !losses.is_empty() {
        result.note = Some(format!(
            "connection {idx}: lost {} time(s), reconnected; first: {}",
            losses.len(),
            losses[0]
        ));
    }
    let mut t = lock(&tracker);
    if t.refused > 0 {
        let why = t.refused_reason.clone().unwrap_or_default();
        let note = format!(
            "connection {idx}: the broker refused {} publish(es) ({why}): unacked",
            t.refused
        );
        result.note = Some(match result.note.take() {
            Some(n) => format!("{n}; {note}"),
            None => note,
        });
    }
    result.sent = gen.k;
    result.acked = t.take_acked();
    result.resent = t.resent;
    result.ack_latency = std::mem::replace(&mut *lock(&latency), Latencies::new(start_ns));
    result
}

/// Which message comes next on one connection, and when.
struct Generator {
    idx: u64,
    n_conns: u64,
    pacer: Pacer,
    rate_is_max: bool,
    deadline: Option<Instant>,
    count: Option<u64>,
    /// Messages generated so far on this connection.
    k: u64,
}

impl Generator {
    fn seq(&self) -> u64 {
        self.idx + self.k * self.n_conns
    }

    /// True when every message of the plan has been generated. At a fixed rate a message is
    /// part of the plan when it is due before the deadline (even if a reconnect delays it).
    fn finished(&self, now: Instant) -> bool {
        if self.count.is_some_and(|n| self.seq() >= n) {
            return true;
        }
        match self.deadline {
            None => false,
            Some(d) if self.rate_is_max => now >= d,
            Some(d) => self.pacer.due(self.k) >= d,
        }
    }
}

/// One session: connect, publish again what an earlier session left unacknowledged, go on
/// generating, wait for the PUBACKs. Returns how it ended and whether it got a CONNACK.
#[allow(clippy::too_many_arguments)]
async fn run_session(
    opts: &Options,
    plan: &Plan,
    devices: &[Device],
    gen: &mut Generator,
    ack_deadline: &mut Option<Instant>,
    tracker: &Arc<Mutex<AckTracker>>,
    latency: &Arc<Mutex<Latencies>>,
    progress: &ProgressBar,
    result: &mut ConnResult,
) -> (SessionEnd, bool) {
    let (client, eventloop) = opts.connect(usize::from(plan.inflight.max(1)));
    let (dead_tx, dead) = stop_pair();
    let (conn_tx, connected) = stop_pair();
    let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut poll = tokio::spawn(poll_session(
        eventloop,
        tracker.clone(),
        latency.clone(),
        progress.clone(),
        conn_tx,
        dead_tx,
        error.clone(),
    ));
    let lost = |error: &Arc<Mutex<Option<String>>>| {
        lock(error)
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    };

    tokio::select! {
        _ = connected.stopped() => {}
        _ = dead.stopped() => {}
        _ = tokio::time::sleep(CONNACK_TIMEOUT) => {}
    }
    if !connected.is_stopped() {
        poll.abort();
        let _ = (&mut poll).await;
        let e = if dead.is_stopped() {
            lost(&error)
        } else {
            format!("no CONNACK within {} s", CONNACK_TIMEOUT.as_secs())
        };
        return (SessionEnd::Lost(e), false);
    }

    let topic = |d: usize| format!("devices/{}/telemetry", devices[d].id);
    let payload = |m: &Msg| mqtt_payload(&plan.run_id, devices[m.device].id, m.seq, m.sent_ns);
    let properties =
        |m: &Msg| mqtt_properties(plan.properties, &plan.run_id, devices[m.device].id, m.seq);
    let mut alive = true;

    // What an earlier session left unacknowledged goes first, oldest first.
    while alive {
        let Some(m) = lock(tracker).next_resend() else {
            break;
        };
        lock(tracker).queued(m);
        alive = tokio::select! {
            r = client.publish(topic(m.device), payload(&m), properties(&m)) => r.is_ok(),
            _ = dead.stopped() => false,
        };
    }

    // Then the plan, paced by the clock.
    while alive {
        let now = Instant::now();
        if gen.finished(now) {
            break;
        }
        if gen.k >= gen.pacer.allowed(now) {
            tokio::select! {
                _ = tokio::time::sleep_until(gen.pacer.due(gen.k).into()) => {}
                _ = dead.stopped() => alive = false,
            }
            continue;
        }
        let m = Msg {
            seq: gen.seq(),
            sent_ns: now_ns(),
            device: (gen.k as usize) % devices.len(),
        };
        lock(tracker).queued(m);
        // From here on the message is part of the run: if this publish does not get through,
        // the next session sends it again.
        if gen.k == 0 {
            result.first_send_ns = m.sent_ns;
        }
        result.last_send_ns = m.sent_ns;
        gen.k += 1;
        alive = tokio::select! {
            r = client.publish(topic(m.device), payload(&m), properties(&m)) => r.is_ok(),
            _ = dead.stopped() => false,
        };
    }

    // Wait for the remaining PUBACKs.
    if alive {
        let deadline = *ack_deadline.get_or_insert_with(|| Instant::now() + plan.ack_timeout);
        loop {
            if lock(tracker).outstanding() == 0 || Instant::now() >= deadline {
                break;
            }
            if dead.wait_timeout(Duration::from_millis(20)).await {
                alive = false;
                break;
            }
        }
    }
    if !alive {
        let _ = (&mut poll).await;
        return (SessionEnd::Lost(lost(&error)), true);
    }
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(2), dead.stopped())
        .await
        .is_err()
    {
        poll.abort();
    }
    let _ = poll.await;
    (SessionEnd::Done, true)
}

/// Drives one event loop until its connection ends; feeds the tracker.
async fn poll_session(
    mut eventloop: EventLoop,
    tracker: Arc<Mutex<AckTracker>>,
    latency: Arc<Mutex<Latencies>>,
    progress: ProgressBar,
    conn_tx: StopHandle,
    dead_tx: StopHandle,
    error: Arc<Mutex<Option<String>>>,
) {
    let on_event = |ev: Event| match ev {
        Event::ConnAck => conn_tx.stop(),
        Event::Published(pkid) => lock(&tracker).on_publish(pkid),
        Event::AwaitAck(pkid) => lock(&tracker).on_await_ack(pkid),
        Event::PubAck(pkid) => {
            let now = now_ns();
            let first = lock(&tracker).on_puback(pkid);
            if let Some(m) = first {
                lock(&latency).record(m.sent_ns, now);
                progress.inc(1);
            }
        }
        Event::Refused { pkid, reason } => {
            lock(&tracker).on_refused(pkid, reason);
        }
        Event::Disconnected | Event::Other => {}
    };
    loop {
        match eventloop.poll().await {
            Ok(Event::Disconnected) => break,
            Ok(ev) => on_event(ev),
            Err(e) => {
                // PUBACKs read in the same batch as the failure are real acknowledgements.
                for ev in eventloop.drain() {
                    on_event(ev);
                }
                *lock(&error) = Some(e);
                break;
            }
        }
    }
    dead_tx.stop();
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
