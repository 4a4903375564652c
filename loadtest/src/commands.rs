//! The subcommands: thin glue between the CLI arguments and the measuring parts.

use anyhow::Context;
use serde_json::json;

use argus_pipeline::flags::MqttVersion;

use crate::cli::{MqttArgs, MqttConn};
use crate::devices;
use crate::mqtt::{self, Plan, Target};
use crate::payload::PropertiesMode;
use crate::report::Report;
use crate::run::{new_run_id, Harness, Sent};

/// Installs the ring provider for rustls once (ignored when already installed).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn target(conn: &MqttConn) -> anyhow::Result<Target> {
    let ca = match &conn.mqtt_ca_file {
        Some(p) => {
            Some(std::fs::read(p).with_context(|| format!("--mqtt-ca-file {}", p.display()))?)
        }
        None => None,
    };
    Target::parse(&conn.mqtt_url, ca)
}

/// `argus-loadtest mqtt`.
pub async fn mqtt(args: &MqttArgs) -> anyhow::Result<Report> {
    install_crypto();
    anyhow::ensure!(
        args.devices + args.unknown_devices > 0,
        "--devices: at least one device is needed"
    );
    anyhow::ensure!(args.inflight > 0, "--inflight must be at least 1");
    anyhow::ensure!(
        args.properties == PropertiesMode::None || args.mqtt_version == MqttVersion::V5,
        "--properties {:?} needs --mqtt-version 5: MQTT 3.1.1 has no publish properties",
        args.properties
    );
    let target = target(&args.mqtt)?;
    let run_id = args.common.run_id.clone().unwrap_or_else(new_run_id);
    let mut h = Harness::connect(&args.common, run_id.clone(), "bridge-").await?;

    let known = devices::register(&h.pg, &run_id, args.devices).await?;
    let mut ids: Vec<(uuid::Uuid, bool)> = known.iter().map(|id| (*id, true)).collect();
    ids.extend((0..args.unknown_devices).map(|_| (uuid::Uuid::new_v4(), false)));
    let pki_dir = args.mqtt.pki_dir.clone();
    let devs = tokio::task::spawn_blocking(move || devices::issue(&pki_dir, &ids))
        .await
        .context("certificate task panicked")??;
    h.start_collectors(devs.iter().map(|d| d.id).collect())
        .await?;

    let plan = Plan {
        run_id: run_id.clone(),
        rate: args.rate,
        count: if args.duration.is_some() {
            None
        } else {
            Some(args.count)
        },
        duration: args.duration,
        devices_per_connection: args.devices_per_connection.max(1),
        inflight: args.inflight,
        mqtt_version: args.mqtt_version,
        properties: args.properties,
        ack_timeout: args.common.settle.max(std::time::Duration::from_secs(5)),
    };
    let config = json!({
        "mqtt_url": args.mqtt.mqtt_url,
        "devices": args.devices,
        "unknown_devices": args.unknown_devices,
        "devices_per_connection": plan.devices_per_connection,
        "connections": devs.len().div_ceil(plan.devices_per_connection),
        "rate": args.rate.to_string(),
        "count": plan.count,
        "duration_s": args.duration.map(|d| d.as_secs_f64()),
        "inflight": args.inflight,
        "mqtt_version": args.mqtt_version.to_string(),
        "properties": args.properties,
        "settle_s": args.common.settle.as_secs_f64(),
    });
    let progress = h.progress(plan.count);
    let start_ns = h.start_ns;
    let device_ids = h.device_ids.clone();
    let mut report = h
        .measure("mqtt", config, async {
            let p = mqtt::publish(&target, &devs, &plan, progress.clone(), start_ns).await?;
            progress.finish_and_clear();
            Ok(Sent {
                sent: p.sent,
                acked: p.acked,
                first_send_ns: p.first_send_ns,
                last_send_ns: p.last_send_ns,
                ack_latency: p.ack_latency,
                errors: p.errors,
                reconnects: p.reconnects,
                resent: p.resent,
                notes: p.notes,
            })
        })
        .await?;
    if args.properties != PropertiesMode::None {
        let (persisted, chunked) =
            crate::collect::postgres_properties(&h.pg, &device_ids, &run_id).await?;
        report.check_properties(
            args.properties,
            h.published_with_properties(),
            persisted,
            chunked,
        );
    }
    if plan.devices_per_connection > 1 {
        report.notes.push(
            "--devices-per-connection > 1: devices share the first device's certificate; the stock ACL refuses their publishes (counted lost)".into(),
        );
    }
    if args.unknown_devices > 0 {
        report.notes.push(format!(
            "{} unknown devices (no registry entry): their messages are expected in TELEMETRY_DLQ",
            args.unknown_devices
        ));
    }
    Ok(report)
}

/// `argus-loadtest http`.
pub async fn http(args: &crate::cli::HttpArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.devices > 0, "--devices: at least one device is needed");
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let run_id = args.common.run_id.clone().unwrap_or_else(new_run_id);
    let mut h = Harness::connect(&args.common, run_id.clone(), "ingest-http").await?;
    let ids = devices::register(&h.pg, &run_id, args.devices).await?;
    let base = args.ingest_http_url.trim_end_matches('/').to_string();
    let admin = args.ingest_http_admin_url.trim_end_matches('/').to_string();
    let client = crate::http::client(args.concurrency, args.ingest_http_ca_file.as_deref())?;
    let keyed = crate::http::create_keys(&client, &admin, &args.admin_token, &ids).await?;
    h.start_collectors(ids.clone()).await?;
    let plan = crate::http::HttpPlan {
        run_id: run_id.clone(),
        url: base.clone(),
        rate: args.rate,
        count: if args.duration.is_some() {
            None
        } else {
            Some(args.count)
        },
        duration: args.duration,
        batch: args.batch,
        concurrency: args.concurrency,
    };
    let config = json!({
        "ingest_http_url": base,
        "ingest_http_admin_url": admin,
        "devices": args.devices,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "rate": args.rate.to_string(),
        "count": plan.count,
        "duration_s": args.duration.map(|d| d.as_secs_f64()),
        "settle_s": args.common.settle.as_secs_f64(),
    });
    let progress = h.progress(plan.count);
    let start_ns = h.start_ns;
    h.measure("http", config, async {
        let s = crate::http::send(client, keyed, plan, progress.clone(), start_ns).await?;
        progress.finish_and_clear();
        Ok(s)
    })
    .await
}
