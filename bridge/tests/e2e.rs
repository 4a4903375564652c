//! End to end against real servers: a device publishes over mutual TLS through
//! Mosquitto (the local stack's template and ACL); the bridge stores the
//! message in Postgres and publishes it to JetStream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use argus_bridge::config::MqttVersion;
use chrono::{DateTime, Utc};
use common::*;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_publish_lands_once_with_every_field() {
    lands_once_with_every_field(MqttVersion::V5).await;
}

/// The same with the bridge on MQTT 3.1.1 (`--mqtt-version 3.1.1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mqtt_3_1_1_a_publish_lands_once_with_every_field() {
    lands_once_with_every_field(MqttVersion::V311).await;
}

async fn lands_once_with_every_field(version: MqttVersion) {
    let stack = Stack::start(false).await;
    let mut config = stack.bridge_config(0);
    config.mqtt.version = version;
    let bridge = stack.bridge_in_process_with(config).await;

    let device = DEMO_DEVICE_ID;
    let topic = telemetry_topic(device);
    let payload = r#"{"timestamp":"2024-05-01T12:00:00.123456Z","correlationId":"corr-1","sequenceNumber":2,"totalChunks":3,"temperature":21.5}"#;
    let publisher = stack.device(device);
    let before = Utc::now();
    publisher.publish(&topic, payload).await;
    publisher.wait_acked(1, Duration::from_secs(10)).await;
    wait_stored(&stack, 1, Duration::from_secs(15)).await;

    let db = stack.db().await;
    let row = db
        .query_one(
            "SELECT id, tenant_id, device_id, payload, payload_size_bytes, correlation_id, \
             sequence_number, total_chunks, device_timestamp, received_at, ingestion_source, \
             mqtt_topic, client_id FROM telemetry_raw",
            &[],
        )
        .await
        .unwrap();
    let id: Uuid = row.get(0);
    assert_eq!(
        id,
        expected_id(device, payload),
        "id is the derived message id"
    );
    assert_eq!(
        row.get::<_, Uuid>(1),
        DEMO_ORG_ID,
        "tenant from the registry"
    );
    assert_eq!(row.get::<_, Uuid>(2), device);
    let stored: serde_json::Value = row.get(3);
    assert_eq!(
        stored,
        serde_json::from_str::<serde_json::Value>(payload).unwrap()
    );
    assert_eq!(row.get::<_, Option<i32>>(4), Some(payload.len() as i32));
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("corr-1"));
    assert_eq!(row.get::<_, Option<i32>>(6), Some(2));
    assert_eq!(row.get::<_, Option<i32>>(7), Some(3));
    let device_ts: Option<DateTime<Utc>> = row.get(8);
    assert_eq!(
        device_ts
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "2024-05-01T12:00:00.123456Z"
    );
    let received_at: DateTime<Utc> = row.get(9);
    assert!(received_at >= before - chrono::Duration::seconds(1) && received_at <= Utc::now());
    assert_eq!(row.get::<_, Option<String>>(10).as_deref(), Some("mqtt"));
    assert_eq!(
        row.get::<_, Option<String>>(11).as_deref(),
        Some(topic.as_str())
    );
    let client_id: String = row.get::<_, Option<String>>(12).unwrap();
    assert!(
        client_id == "bridge-0-0" || client_id == "bridge-0-1",
        "client_id is the receiving connection: {client_id}"
    );

    // The broker saw the bridge's connections speak `version` (Mosquitto logs the
    // protocol as p2 for 3.1.1, p5 for 5).
    let log = std::fs::read_to_string(stack.mq.dir().join("mosquitto.log")).unwrap();
    let level = match version {
        MqttVersion::V5 => "p5",
        MqttVersion::V311 => "p2",
    };
    assert!(
        log.contains(&format!("as {client_id} ({level}, c0")),
        "{client_id} did not connect with {level}:\n{log}"
    );

    let msgs = stream_messages(&stack.js().await, "TELEMETRY_RAW_V1").await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.subject, format!("telemetry.raw.v1.{device}"));
    assert_eq!(
        m.msg_id.as_deref(),
        Some(id.to_string().as_str()),
        "Nats-Msg-Id == row id"
    );
    let e = &m.body;
    assert_eq!(e["messageId"], id.to_string());
    assert_eq!(e["deviceId"], device.to_string());
    assert_eq!(e["tenantId"], DEMO_ORG_ID.to_string());
    assert_eq!(e["topic"], topic);
    assert_eq!(e["clientId"], client_id);
    assert_eq!(e["source"], "mqtt");
    assert_eq!(e["payload"], stored);
    let env_received: DateTime<Utc> = e["receivedAt"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        env_received, received_at,
        "envelope and row agree on receivedAt"
    );
    let env_device_ts: DateTime<Utc> = e["deviceTimestamp"].as_str().unwrap().parse().unwrap();
    assert_eq!(Some(env_device_ts), device_ts);

    bridge.shutdown.cancel();
    bridge.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_message_twice_leaves_one_row_and_one_stream_message() {
    let stack = Stack::start(false).await;
    let bridge = stack.bridge_in_process(0).await;
    let device = DEMO_DEVICE_ID;
    let topic = telemetry_topic(device);
    let publisher = stack.device(device);

    // A: the same bytes twice in quick succession (likely in one batch).
    let a = r#"{"temperature":20.0}"#;
    publisher.publish(&topic, a).await;
    publisher.publish(&topic, a).await;
    publisher.wait_acked(2, Duration::from_secs(10)).await;
    wait_stored(&stack, 1, Duration::from_secs(15)).await;

    // B: a device-supplied messageId, sent again after the first copy is
    // stored and published, as a broker redelivers it after a lost PUBACK:
    // the second copy meets the existing row and the JetStream dedup window.
    let b1 = r#"{"messageId":"m-1","temperature":1}"#;
    let b2 = r#"{"temperature":1,"messageId":"m-1"}"#; // same id, other bytes
    publisher.publish(&topic, b1).await;
    publisher.wait_acked(3, Duration::from_secs(10)).await;
    wait_stored(&stack, 2, Duration::from_secs(15)).await;
    publisher.publish(&topic, b2).await;
    publisher.wait_acked(4, Duration::from_secs(10)).await;

    // Give the bridge time to (not) write a second copy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expected: HashSet<Uuid> = [expected_id(device, a), expected_id(device, b1)].into();
    assert_eq!(expected_id(device, b1), expected_id(device, b2));
    assert_exactly_once(&stack, &expected).await;

    let metrics = argus_bridge::server::prometheus_handle().render();
    assert!(
        metric_sum(&metrics, "argus_sink_duplicates_skipped_total") >= 2.0,
        "duplicates counted:\n{metrics}"
    );
    bridge.shutdown.cancel();
    bridge.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_go_to_the_dlq_and_good_ones_keep_flowing() {
    let stack = Stack::start(false).await;
    let disabled = SENSOR_IDS[1];
    stack
        .db()
        .await
        .execute(
            "UPDATE devices SET status = 'disabled' WHERE id = $1",
            &[&disabled],
        )
        .await
        .unwrap();
    let bridge = stack.bridge_in_process(0).await;

    let good_device = DEMO_DEVICE_ID;
    let good = stack.device(good_device);
    let unknown_device = Uuid::new_v4();
    let unknown = stack.device(unknown_device);
    let disabled_pub = stack.device(disabled);
    // A client whose certificate CN is not a device id: the broker's ACL lets
    // it publish only to devices/<its CN>/telemetry, which is a malformed topic.
    let odd_cn = "not-a-device";
    let odd = Publisher::new(
        stack.mq.port(),
        &stack.pki.ca_file(),
        &stack.pki.odd_client(odd_cn),
        odd_cn,
    );
    let gt = telemetry_topic(good_device);
    let mut good_payloads = Vec::new();
    let mut send_good = |n: usize| {
        let p = numbered_payload("dlq", n);
        good_payloads.push(p.clone());
        p
    };

    let oversize = format!(r#"{{"blob":"{}"}}"#, "x".repeat(300 * 1024));
    let not_utf8: Vec<u8> = vec![b'{', b'"', b'a', b'"', b':', b'"', 0xff, 0xfe, b'"', b'}'];

    let p = send_good(0);
    good.publish(&gt, p).await;
    good.publish(&gt, r#"{"temperature": 21.5"#).await; // invalid_json
    let p = send_good(1);
    good.publish(&gt, p).await;
    good.publish(&gt, "[1,2,3]").await; // not_object
    good.publish(&gt, oversize.clone()).await; // oversize
    let p = send_good(2);
    good.publish(&gt, p).await;
    good.publish(&gt, not_utf8.clone()).await; // not_utf8
    unknown
        .publish(&telemetry_topic(unknown_device), r#"{"temperature":1}"#)
        .await; // unknown_device
    disabled_pub
        .publish(&telemetry_topic(disabled), r#"{"temperature":2}"#)
        .await; // disabled_device
    odd.publish(
        &format!("devices/{odd_cn}/telemetry"),
        r#"{"temperature":3}"#,
    )
    .await; // bad_topic
    let p = send_good(3);
    good.publish(&gt, p).await;

    good.wait_acked(8, Duration::from_secs(10)).await;
    unknown.wait_acked(1, Duration::from_secs(10)).await;
    disabled_pub.wait_acked(1, Duration::from_secs(10)).await;
    odd.wait_acked(1, Duration::from_secs(10)).await;

    wait_stored(&stack, good_payloads.len(), Duration::from_secs(15)).await;
    let js = stack.js().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while stream_count(&js, "TELEMETRY_DLQ").await < 7 {
        assert!(std::time::Instant::now() < deadline, "dead letters missing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let expected: HashSet<Uuid> = good_payloads
        .iter()
        .map(|p| expected_id(good_device, p))
        .collect();
    assert_exactly_once(&stack, &expected).await;

    let letters = stream_messages(&js, "TELEMETRY_DLQ").await;
    let by_reason: HashMap<String, &StreamMsg> = letters
        .iter()
        .map(|m| (m.body["reason"].as_str().unwrap().to_owned(), m))
        .collect();
    assert_eq!(letters.len(), 7, "one letter per bad input: {letters:#?}");
    for reason in [
        "invalid_json",
        "not_object",
        "oversize",
        "not_utf8",
        "unknown_device",
        "disabled_device",
        "bad_topic",
    ] {
        let m = by_reason
            .get(reason)
            .unwrap_or_else(|| panic!("no dead letter with reason {reason}: {letters:#?}"));
        assert_eq!(m.subject, format!("telemetry.dlq.{reason}"));
        let client_id = m.body["clientId"].as_str().unwrap();
        assert!(client_id.starts_with("bridge-0-"), "{client_id}");
        assert!(m.body["receivedAt"].as_str().is_some());
    }
    assert_eq!(
        by_reason["invalid_json"].body["payload"],
        r#"{"temperature": 21.5"#
    );
    assert_eq!(by_reason["invalid_json"].body["topic"], gt);
    assert_eq!(
        by_reason["bad_topic"].body["topic"],
        format!("devices/{odd_cn}/telemetry")
    );
    assert_eq!(
        by_reason["unknown_device"].body["topic"],
        telemetry_topic(unknown_device)
    );
    use base64::Engine as _;
    let b64 = by_reason["not_utf8"].body["payloadBase64"]
        .as_str()
        .unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        not_utf8
    );
    assert_eq!(
        by_reason["oversize"].body["payload"].as_str().map(str::len),
        Some(oversize.len())
    );

    bridge.shutdown.cancel();
    bridge.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics_and_graceful_shutdown() {
    let stack = Stack::start(false).await;
    let bridge = stack.bridge_in_process(0).await;
    let port = bridge.metrics_addr.port();

    let (status, body) = argus_testkit::http_get(port, "/health").unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = argus_testkit::http_get(port, "/ready").unwrap();
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["mqttConnections"], 2);

    // Some traffic, then every metric the issue names is exposed.
    let publisher = stack.device(DEMO_DEVICE_ID);
    let topic = telemetry_topic(DEMO_DEVICE_ID);
    let mut expected = HashSet::new();
    for n in 0..200 {
        let p = numbered_payload("health", n);
        expected.insert(expected_id(DEMO_DEVICE_ID, &p));
        publisher.publish(&topic, p).await;
    }
    publisher.publish(&topic, "nope").await;
    publisher.wait_acked(201, Duration::from_secs(15)).await;
    wait_stored(&stack, 200, Duration::from_secs(15)).await;
    // The broker acknowledged the device on receipt; the bridge acknowledges
    // the broker only once a reading is stored and published (or dead-lettered).
    wait_for("the bridge to ack all 201", Duration::from_secs(15), || {
        argus_testkit::http_get(port, "/metrics")
            .is_some_and(|(_, m)| metric_sum(&m, "argus_bridge_acks_total") >= 201.0)
    })
    .await;
    let (status, metrics) = argus_testkit::http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "argus_bridge_received_total",
        "argus_bridge_acks_total",
        "argus_bridge_ack_lag_seconds",
        "argus_bridge_in_flight_messages",
        "argus_bridge_mqtt_connected",
        "argus_sink_persisted_total",
        "argus_sink_published_total",
        "argus_sink_batch_size_messages",
        "argus_sink_flush_duration_seconds",
        "argus_dlq_dead_lettered_total",
        "argus_registry_cache_lookups_total",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    assert!(metric_sum(&metrics, "argus_bridge_acks_total") >= 201.0);

    // Graceful shutdown: drains, disconnects, and ends well within the timeout.
    let started = std::time::Instant::now();
    bridge.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), bridge.task)
        .await
        .expect("shutdown within --shutdown-timeout")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        argus_testkit::http_get(port, "/health").is_none(),
        "server stopped"
    );
    assert_exactly_once(&stack, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_past_max_payload_does_not_stall_the_connection() {
    // 180 KB of 0x01: under the bridge's 256 KiB limit, valid UTF-8, not JSON. Its
    // dead letter escapes every byte to `\u0001` (~1.08 MB), over NATS's 1 MiB
    // max_payload; written whole it would fail forever and the in-order acker would
    // never acknowledge anything after it on this connection.
    let stack = Stack::start(false).await;
    let _bridge = stack.bridge_in_process(0).await;
    let device = DEMO_DEVICE_ID;
    let publisher = stack.device(device);
    let topic = telemetry_topic(device);
    let poison = vec![0x01u8; 180_000];

    let mut good = Vec::new();
    for n in 0..21 {
        if n == 1 {
            publisher.publish(&topic, poison.clone()).await;
        }
        let p = numbered_payload("poison", n);
        publisher.publish(&topic, p.clone()).await;
        good.push(p);
    }
    publisher.wait_acked(22, Duration::from_secs(20)).await;
    wait_stored(&stack, good.len(), Duration::from_secs(15)).await;
    let expected: HashSet<Uuid> = good.iter().map(|p| expected_id(device, p)).collect();
    assert_exactly_once(&stack, &expected).await;

    // The letter is written beside the ordinary messages: wait for it.
    let js = stack.js().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while stream_count(&js, "TELEMETRY_DLQ").await < 1 {
        assert!(std::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = stream_messages(&js, "TELEMETRY_DLQ").await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0].body;
    assert_eq!(letter["reason"], "invalid_json");
    assert_eq!(letter["payloadTruncated"], true);
    assert_eq!(letter["payloadBytes"], 180_000);
    let kept = letter["payload"].as_str().expect("a text prefix");
    assert!(!kept.is_empty() && poison.starts_with(kept.as_bytes()));

    // The bridge acknowledged every message to the broker, the poison included:
    // nothing stays in flight behind it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = argus_bridge::server::prometheus_handle().render();
        let acks = metric_sum(&metrics, "argus_bridge_acks_total");
        let in_flight = metric_sum(&metrics, "argus_bridge_in_flight_messages");
        if acks >= 22.0 && in_flight == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bridge still holds messages: {acks} acked, {in_flight} in flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
