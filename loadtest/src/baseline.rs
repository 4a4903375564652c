//! `argus-loadtest baseline`: what each part of the path can do alone, on this machine, in
//! this run, so that the bridge's figure becomes a ratio:
//!
//! - **broker**: QoS 1 publish -> subscribe through a private Mosquitto started here with
//!   the stack's mTLS settings (server certificate from `--pki-dir`, client certificates
//!   required, no ACL), the same publishers as `mqtt --rate max`, one subscriber;
//! - **copy**: binary `COPY` of telemetry_raw-shaped rows, `--batch` rows per transaction,
//!   into a temporary table `LIKE telemetry_raw INCLUDING DEFAULTS INCLUDING INDEXES`;
//! - **jetstream**: envelopes published to a temporary stream (same storage and replicas as
//!   `TELEMETRY_RAW_V1`) with `Nats-Msg-Id`, `--batch` publishes awaited together;
//! - **per-message**: the plan's design, one `INSERT` (autocommit) then one JetStream publish
//!   awaited, per message;
//! - **bridge**: an `mqtt --rate max` run through the stack (or `--bridge-rate`).
//!
//! Pipeline efficiency = bridge / slowest of (broker, copy, jetstream).

use std::future::IntoFuture;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use argus_pipeline::flags::MqttVersion;
use async_nats::jetstream;
use futures::future::join_all;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::cli::{BaselineArgs, MqttArgs};
use crate::collect;
use crate::devices::{self, Device};
use crate::mqtt::{self, Plan, Target};
use crate::pacing::Rate;
use crate::payload::{mqtt_payload, now_ns, PropertiesMode};
use crate::report::{round1, Machine};

#[derive(Debug, Clone, Serialize)]
pub struct BaselineReport {
    pub run_id: String,
    pub started_at: String,
    pub command: String,
    pub machine: Machine,
    pub count: u64,
    pub batch: usize,
    pub devices: usize,
    pub broker_msgs_per_s: f64,
    pub copy_rows_per_s: f64,
    pub jetstream_msgs_per_s: f64,
    pub per_message_msgs_per_s: f64,
    pub per_message_count: u64,
    pub slowest_part: String,
    pub slowest_msgs_per_s: f64,
    pub bridge_msgs_per_s: Option<f64>,
    /// "measured" (an `mqtt --rate max` run in this baseline) or "given" (`--bridge-rate`).
    pub bridge_source: String,
    pub bridge_run_lost: Option<u64>,
    pub pipeline_efficiency: Option<f64>,
    pub multiple_of_per_message: Option<f64>,
    /// Whole-machine CPU over the baseline run (100 = one core).
    pub system_cpu_percent: Option<f64>,
    /// Machine CPU not used by the stack's processes nor by this tool: other work.
    pub other_cpu_percent: Option<f64>,
}

/// Ratios (pure, unit-tested): (slowest part name, its rate, efficiency, multiple).
pub fn ratios(
    broker: f64,
    copy: f64,
    jetstream: f64,
    per_message: f64,
    bridge: Option<f64>,
) -> (&'static str, f64, Option<f64>, Option<f64>) {
    let parts = [("broker", broker), ("copy", copy), ("jetstream", jetstream)];
    let (name, slowest) =
        parts.iter().copied().fold(
            ("none", f64::INFINITY),
            |a, b| if b.1 < a.1 { b } else { a },
        );
    let eff = bridge
        .filter(|_| slowest > 0.0 && slowest.is_finite())
        .map(|b| b / slowest);
    let mult = bridge
        .filter(|_| per_message > 0.0)
        .map(|b| b / per_message);
    (name, slowest, eff, mult)
}

struct Row {
    id: Uuid,
    device: Uuid,
    payload: Value,
    size: i32,
    ts: chrono::DateTime<chrono::Utc>,
    topic: String,
}

fn rows(run_id: &str, devices: &[Uuid], n: u64) -> Vec<Row> {
    (0..n)
        .map(|seq| {
            let device = devices[(seq as usize) % devices.len()];
            let sent = now_ns();
            let bytes = mqtt_payload(run_id, device, seq, sent);
            Row {
                id: Uuid::new_v4(),
                device,
                size: bytes.len() as i32,
                payload: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                ts: chrono::Utc::now(),
                topic: format!("devices/{device}/telemetry"),
            }
        })
        .collect()
}

fn envelope(r: &Row) -> Vec<u8> {
    let v = json!({
        "messageId": r.id,
        "deviceId": r.device,
        "tenantId": argus_schema::seed::DEMO_ORG_ID,
        "topic": r.topic,
        "clientId": format!("{}", r.device),
        "receivedAt": r.ts.to_rfc3339(),
        "deviceTimestamp": r.ts.to_rfc3339(),
        "payload": r.payload,
        "source": "mqtt",
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

const COPY_COLUMNS: &str = "id, tenant_id, device_id, payload, payload_size_bytes, device_timestamp, received_at, ingestion_source, mqtt_topic, client_id";
const COPY_TYPES: [Type; 10] = [
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::JSONB,
    Type::INT4,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

async fn copy_rate(
    pg: &mut tokio_postgres::Client,
    data: &[Row],
    batch: usize,
) -> anyhow::Result<f64> {
    pg.batch_execute(
        "CREATE TEMP TABLE lt_baseline_copy (LIKE telemetry_raw INCLUDING DEFAULTS INCLUDING INDEXES)",
    )
    .await
    .context("creating the temporary COPY table")?;
    let org = argus_schema::seed::DEMO_ORG_ID;
    let source = "mqtt".to_string();
    let t0 = Instant::now();
    for chunk in data.chunks(batch.max(1)) {
        let tx = pg.transaction().await?;
        let sink = tx
            .copy_in(&format!(
                "COPY lt_baseline_copy ({COPY_COLUMNS}) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
        futures::pin_mut!(writer);
        for r in chunk {
            let client_id = r.device.to_string();
            let values: [&(dyn ToSql + Sync); 10] = [
                &r.id, &org, &r.device, &r.payload, &r.size, &r.ts, &r.ts, &source, &r.topic,
                &client_id,
            ];
            writer.as_mut().write(&values).await?;
        }
        writer.finish().await?;
        tx.commit().await?;
    }
    Ok(data.len() as f64 / t0.elapsed().as_secs_f64())
}

async fn jetstream_rate(
    js: &jetstream::Context,
    run_id: &str,
    raw_stream: &str,
    data: &[Row],
    batch: usize,
) -> anyhow::Result<f64> {
    let (storage, replicas) = match js.get_stream(raw_stream).await {
        Ok(mut s) => {
            let i = s.info().await?;
            (i.config.storage, i.config.num_replicas)
        }
        Err(_) => (jetstream::stream::StorageType::File, 1),
    };
    let name = format!("LT_BASELINE_{}", run_id.to_uppercase());
    let prefix = format!("loadtest.baseline.{run_id}");
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        storage,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("creating the temporary baseline stream")?;
    let result = async {
        let t0 = Instant::now();
        for chunk in data.chunks(batch.max(1)) {
            let mut acks = Vec::with_capacity(chunk.len());
            for r in chunk {
                let msg = jetstream::message::PublishMessage::build()
                    .payload(envelope(r).into())
                    .message_id(r.id.to_string());
                acks.push(
                    js.send_publish(format!("{prefix}.{}", r.device), msg)
                        .await?
                        .into_future(),
                );
            }
            for a in join_all(acks).await {
                a?;
            }
        }
        anyhow::Ok(data.len() as f64 / t0.elapsed().as_secs_f64())
    }
    .await;
    let _ = js.delete_stream(&name).await;
    result
}

async fn per_message_rate(
    pg: &tokio_postgres::Client,
    js: &jetstream::Context,
    run_id: &str,
    data: &[Row],
) -> anyhow::Result<f64> {
    pg.batch_execute(
        "CREATE TEMP TABLE lt_baseline_insert (LIKE telemetry_raw INCLUDING DEFAULTS INCLUDING INDEXES)",
    )
    .await?;
    let name = format!("LT_BASELINE_PM_{}", run_id.to_uppercase());
    let prefix = format!("loadtest.baseline-pm.{run_id}");
    let (storage, replicas) = match js.get_stream(argus_schema::streams::RAW_STREAM).await {
        Ok(mut s) => {
            let i = s.info().await?;
            (i.config.storage, i.config.num_replicas)
        }
        Err(_) => (jetstream::stream::StorageType::File, 1),
    };
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        storage,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let insert = pg
        .prepare(&format!(
            "INSERT INTO lt_baseline_insert ({COPY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .await?;
    let org = argus_schema::seed::DEMO_ORG_ID;
    let source = "mqtt".to_string();
    let result = async {
        let t0 = Instant::now();
        for r in data {
            let client_id = r.device.to_string();
            pg.execute(
                &insert,
                &[
                    &r.id, &org, &r.device, &r.payload, &r.size, &r.ts, &r.ts, &source, &r.topic,
                    &client_id,
                ],
            )
            .await?;
            let msg = jetstream::message::PublishMessage::build()
                .payload(envelope(r).into())
                .message_id(r.id.to_string());
            js.send_publish(format!("{prefix}.{}", r.device), msg)
                .await?
                .await?;
        }
        anyhow::Ok(data.len() as f64 / t0.elapsed().as_secs_f64())
    }
    .await;
    let _ = js.delete_stream(&name).await;
    result
}

/// A private Mosquitto with the stack's mTLS settings; killed on drop.
struct PrivateBroker {
    child: tokio::process::Child,
    port: u16,
    _dir: TempDirGuard,
}

struct TempDirGuard(std::path::PathBuf);
impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_broker(
    bin: &str,
    pki_dir: &std::path::Path,
    run_id: &str,
) -> anyhow::Result<PrivateBroker> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("argus-loadtest-broker-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    let guard = TempDirGuard(dir.clone());
    let pki = std::fs::canonicalize(pki_dir)?;
    let mut conf = format!(
        "per_listener_settings false\nlistener {port} 127.0.0.1\ncafile {p}/ca.crt\ncertfile {p}/server.crt\nkeyfile {p}/server.key\n\
tls_version tlsv1.2\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\npersistence false\n\
max_inflight_messages 1000\nmax_queued_messages 0\nmax_queued_bytes 0\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\n",
        p = pki.display()
    );
    // Mosquitto drops root privileges to `mosquitto` unless told otherwise, and could then
    // not read the CA directory.
    if std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
    {
        conf = format!("user root\n{conf}");
    }
    let conf_path = dir.join("mosquitto.conf");
    std::fs::write(&conf_path, conf)?;
    let child = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {bin} (--mosquitto)"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the private broker did not start on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(PrivateBroker {
        child,
        port,
        _dir: guard,
    })
}

async fn broker_rate(
    args: &BaselineArgs,
    run_id: &str,
    devs: &[Device],
    sub_dev: &Device,
) -> anyhow::Result<f64> {
    let mut broker = start_broker(&args.mosquitto, &args.mqtt.pki_dir, run_id).await?;
    let ca = std::fs::read(args.mqtt.pki_dir.join("ca.crt"))?;
    let target = Target {
        host: "127.0.0.1".into(),
        port: broker.port,
        ca_pem: Some(ca),
    };
    // The subscriber: counts this run's messages, remembers the last arrival.
    let received = Arc::new(Mutex::new((0u64, 0u64)));
    let sub_id = format!("loadtest-{run_id}-sub");
    let (client, mut el) = AsyncClient::new(
        crate::device_client::v311_options(target.settings(&sub_id, sub_dev, 1000)),
        1000,
    );
    client
        .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await?;
    let (sub_ready_tx, sub_ready) = tokio::sync::oneshot::channel();
    let rec = received.clone();
    let sub = tokio::spawn(async move {
        let mut ready = Some(sub_ready_tx);
        while let Ok(ev) = el.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(_)) => {
                    let mut g = rec.lock().unwrap_or_else(|e| e.into_inner());
                    g.0 += 1;
                    g.1 = now_ns();
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), sub_ready)
        .await
        .context("the baseline subscriber got no SUBACK")??;
    let plan = Plan {
        run_id: format!("{run_id}b"),
        rate: Rate::Max,
        count: Some(args.count),
        duration: None,
        devices_per_connection: 1,
        inflight: 100,
        mqtt_version: MqttVersion::V311,
        properties: PropertiesMode::None,
        ack_timeout: Duration::from_secs(30),
    };
    let start = now_ns();
    let p = mqtt::publish(
        &target,
        devs,
        &plan,
        indicatif::ProgressBar::hidden(),
        start,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = received.lock().unwrap_or_else(|e| e.into_inner()).0;
        if n >= p.acked.len() as u64 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (n, last) = *received.lock().unwrap_or_else(|e| e.into_inner());
    sub.abort();
    let _ = broker.child.kill().await;
    let span = last.saturating_sub(p.first_send_ns) as f64 / 1e9;
    anyhow::ensure!(
        n > 0 && span > 0.0,
        "the baseline subscriber received nothing"
    );
    Ok(n as f64 / span)
}

pub async fn run(args: &BaselineArgs) -> anyhow::Result<BaselineReport> {
    crate::commands::install_crypto();
    let run_id = args
        .common
        .run_id
        .clone()
        .unwrap_or_else(crate::run::new_run_id);
    let started_at = chrono::Utc::now().to_rfc3339();
    let (cpu_stop, cpu_stopped) = crate::stop::stop_pair();
    let cpu = tokio::spawn(crate::procstat::sample_groups(
        crate::procstat::groups_from_dir(&args.common.pid_dir),
        Duration::from_millis(500),
        cpu_stopped,
    ));
    let mut pg = collect::connect_pg(&args.common.database_url).await?;
    let nats =
        collect::connect_nats(&args.common.nats_urls, &args.common.nats_auth.auth()?).await?;
    let js = jetstream::new(nats);
    let n_dev = args.devices.max(1);
    let ids: Vec<(Uuid, bool)> = (0..=n_dev).map(|_| (Uuid::new_v4(), false)).collect();
    let pki_dir = args.mqtt.pki_dir.clone();
    let mut devs = tokio::task::spawn_blocking(move || devices::issue(&pki_dir, &ids)).await??;
    let sub_dev = devs.pop().context("no subscriber identity")?;

    eprintln!("baseline: broker alone (private Mosquitto, mTLS, QoS 1) ...");
    let broker = broker_rate(args, &run_id, &devs, &sub_dev).await?;
    // Rows reference the demo devices only through their shape: the temp tables have no FKs.
    let dev_ids: Vec<Uuid> = devs.iter().map(|d| d.id).collect();
    let data = rows(&run_id, &dev_ids, args.count);
    eprintln!("baseline: Postgres COPY ...");
    let copy = copy_rate(&mut pg, &data, args.batch).await?;
    eprintln!("baseline: JetStream pipelined publishes ...");
    let jet = jetstream_rate(&js, &run_id, &args.common.raw_stream, &data, args.batch).await?;
    let pm_n = (args.count / 10).max(500).min(args.count);
    eprintln!("baseline: per-message design (INSERT + synchronous publish) x {pm_n} ...");
    let pm = per_message_rate(&pg, &js, &run_id, &data[..pm_n as usize]).await?;

    let (bridge, source, bridge_lost) = match args.bridge_rate {
        Some(r) => (Some(r), "given", None),
        None => {
            eprintln!("baseline: the bridge, mqtt --rate max x {} ...", args.count);
            let mut common = args.common.clone();
            common.run_id = Some(format!("{run_id}m"));
            common.json = None;
            common.markdown = None;
            common.plot = None;
            let r = crate::commands::mqtt(&MqttArgs {
                common,
                mqtt: args.mqtt.clone(),
                devices: n_dev,
                unknown_devices: 0,
                devices_per_connection: 1,
                rate: Rate::Max,
                count: args.count,
                duration: None,
                inflight: 100,
                mqtt_version: MqttVersion::V311,
                properties: PropertiesMode::None,
            })
            .await?;
            (
                Some(r.throughput_msgs_per_s),
                "measured",
                Some(r.accounting.lost),
            )
        }
    };
    let (slowest_name, slowest, eff, mult) = ratios(broker, copy, jet, pm, bridge);
    cpu_stop.stop();
    let (processes, system) = cpu.await.unwrap_or_default();
    let system_cpu_percent = system.map(|s| s.cpu_percent_mean);
    let other_cpu_percent = system_cpu_percent.map(|s| {
        let ours: f64 = processes.iter().map(|p| p.cpu_percent_mean).sum();
        round1((s - ours).max(0.0))
    });
    Ok(BaselineReport {
        run_id,
        started_at,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::detect(),
        count: args.count,
        batch: args.batch,
        devices: n_dev,
        broker_msgs_per_s: broker.round(),
        copy_rows_per_s: copy.round(),
        jetstream_msgs_per_s: jet.round(),
        per_message_msgs_per_s: pm.round(),
        per_message_count: pm_n,
        slowest_part: slowest_name.into(),
        slowest_msgs_per_s: slowest.round(),
        bridge_msgs_per_s: bridge.map(f64::round),
        bridge_source: source.into(),
        bridge_run_lost: bridge_lost,
        pipeline_efficiency: eff.map(|e| (e * 100.0).round() / 100.0),
        multiple_of_per_message: mult.map(round1),
        system_cpu_percent,
        other_cpu_percent,
    })
}

impl BaselineReport {
    pub fn markdown(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v}"));
        format!(
            "### argus-loadtest baseline `{}`\n\n- command: `{}`\n- date: {}\n- machine: {} CPUs ({}), {:.1} GiB RAM\n- {} messages per part, batch {}, {} devices\n\n\
| part | msg/s |\n|---|---|\n\
| broker alone: Mosquitto mTLS QoS 1 publish -> subscribe | {} |\n\
| Postgres binary COPY, {} rows per transaction | {} |\n\
| JetStream pipelined publishes, {} acks awaited together | {} |\n\
| per-message design: INSERT + synchronous publish ({} messages) | {} |\n\
| bridge end to end ({}) | {} |\n\n\
- slowest part alone: {} at {} msg/s\n- pipeline efficiency (bridge / slowest part): {}\n- bridge as a multiple of the per-message design: {}\n\
- machine CPU over the run: {} % (of it outside the stack and this tool: {} %)\n",
            self.run_id,
            self.command,
            self.started_at,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_gib,
            self.count,
            self.batch,
            self.devices,
            self.broker_msgs_per_s,
            self.batch,
            self.copy_rows_per_s,
            self.batch,
            self.jetstream_msgs_per_s,
            self.per_message_count,
            self.per_message_msgs_per_s,
            self.bridge_source,
            opt(self.bridge_msgs_per_s),
            self.slowest_part,
            self.slowest_msgs_per_s,
            opt(self.pipeline_efficiency),
            opt(self.multiple_of_per_message),
            opt(self.system_cpu_percent),
            opt(self.other_cpu_percent),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efficiency_is_against_the_slowest_part() {
        let (name, slowest, eff, mult) =
            ratios(30_000.0, 60_000.0, 25_000.0, 1_000.0, Some(20_000.0));
        assert_eq!(name, "jetstream");
        assert_eq!(slowest, 25_000.0);
        assert!((eff.unwrap() - 0.8).abs() < 1e-9);
        assert!((mult.unwrap() - 20.0).abs() < 1e-9);
        let (_, _, eff, mult) = ratios(1.0, 1.0, 1.0, 0.0, None);
        assert_eq!((eff, mult), (None, None));
    }
}
