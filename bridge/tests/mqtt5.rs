//! MQTT 5 end to end, against the real servers: a device's publish properties
//! reach `telemetry_raw.mqtt_properties` and the envelope's `properties`; chunk
//! fields sent as user properties fill in the payload's, and a disagreement is
//! dead-lettered as `chunk_conflict`; properties past their bounds are
//! dead-lettered as `invalid_properties`; payload format indicator 1 on bytes
//! that are not UTF-8 is dead-lettered as `not_utf8`; a redelivery with other
//! properties is a duplicate, republished with the stored row's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use argus_schema::seed::DEMO_DEVICE_ID;
use bytes::Bytes;
use common::*;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

fn user(pairs: &[(&str, &str)]) -> PublishProperties {
    PublishProperties {
        user_properties: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..PublishProperties::default()
    }
}

/// The dead letters of one reason, as JSON.
async fn letters(js: &async_nats::jetstream::Context, reason: &str) -> Vec<serde_json::Value> {
    dlq_records(js)
        .await
        .into_iter()
        .filter(|v| v["reason"] == reason)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_reach_both_stores_and_bad_ones_end_in_the_dlq() {
    let stack = Stack::start(false).await;
    let bridge = stack.bridge_in_process(0).await;
    let device = stack.device5(DEMO_DEVICE_ID);
    let topic = telemetry_topic(DEMO_DEVICE_ID);

    // 1. Every kind of property, user properties repeated and in order.
    let mut all = user(&[("site", "north"), ("site", "south"), ("k\"", "é")]);
    all.content_type = Some("application/json".into());
    all.payload_format_indicator = Some(1);
    all.response_topic = Some(format!("devices/{DEMO_DEVICE_ID}/replies"));
    all.correlation_data = Some(Bytes::from_static(b"\x00\xffreq-7"));
    let with_all = r#"{"messageId":"p5-all","v":1}"#;
    device.publish(&topic, with_all, all).await;
    // 2. Chunk fields as user properties fill in the payload's.
    let chunk = r#"{"messageId":"p5-chunk","part":"a"}"#;
    device
        .publish(
            &topic,
            chunk,
            user(&[
                ("correlationId", "batch-9"),
                ("sequenceNumber", "2"),
                ("totalChunks", "3"),
            ]),
        )
        .await;
    // 3. A property that disagrees with the payload's field.
    let conflict = r#"{"messageId":"p5-conflict","sequenceNumber":1}"#;
    device
        .publish(&topic, conflict, user(&[("sequenceNumber", "2")]))
        .await;
    // 4. More user properties than the default bound (32).
    let many: Vec<(String, String)> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let too_many = r#"{"messageId":"p5-many"}"#;
    device
        .publish(
            &topic,
            too_many,
            PublishProperties {
                user_properties: many,
                ..PublishProperties::default()
            },
        )
        .await;
    // 5. No properties at all.
    let plain = r#"{"messageId":"p5-plain"}"#;
    device
        .publish(&topic, plain, PublishProperties::default())
        .await;
    // 6. Payload format indicator 1 (UTF-8) on bytes that are not UTF-8.
    let not_utf8: &[u8] = b"{\"v\":\"\xff\xfe\"}";
    device
        .publish(
            &topic,
            not_utf8.to_vec(),
            PublishProperties {
                payload_format_indicator: Some(1),
                ..PublishProperties::default()
            },
        )
        .await;
    device.wait_acked(6, Duration::from_secs(20)).await;
    let js = stack.js().await;
    let db = stack.db().await;
    wait_stored(&stack, 3, Duration::from_secs(20)).await;
    // 7. The first reading again, once it is stored, with other properties: a
    //    duplicate (counted by the sink), which changes neither store.
    let metrics = || argus_bridge::server::prometheus_handle().render();
    let skipped = metric_sum(&metrics(), "argus_sink_duplicates_skipped_total");
    device
        .publish(&topic, with_all, user(&[("site", "elsewhere")]))
        .await;
    device.wait_acked(7, Duration::from_secs(20)).await;
    wait_for("the duplicate", Duration::from_secs(20), || {
        metric_sum(&metrics(), "argus_sink_duplicates_skipped_total") > skipped
    })
    .await;
    let mut dead = Vec::new();
    for _ in 0..100 {
        dead = [
            letters(&js, "chunk_conflict").await,
            letters(&js, "invalid_properties").await,
            letters(&js, "not_utf8").await,
        ]
        .concat();
        if dead.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Postgres: the properties object, and the chunk fields from user properties.
    let stored = |id: &str| {
        let db = &db;
        let id = id.to_string();
        async move {
            db.query_one(
                "SELECT mqtt_properties, correlation_id, sequence_number, total_chunks \
                 FROM telemetry_raw WHERE payload->>'messageId' = $1",
                &[&id],
            )
            .await
            .unwrap()
        }
    };
    let expected_all = serde_json::json!({
        "contentType": "application/json",
        "payloadFormatIndicator": 1,
        "responseTopic": format!("devices/{DEMO_DEVICE_ID}/replies"),
        "correlationData": "AP9yZXEtNw==",
        "userProperties": [["site", "north"], ["site", "south"], ["k\"", "é"]],
    });
    let row = stored("p5-all").await;
    assert_eq!(
        row.get::<_, Option<serde_json::Value>>(0),
        Some(expected_all.clone())
    );
    let row = stored("p5-chunk").await;
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("batch-9"));
    assert_eq!(row.get::<_, Option<i32>>(2), Some(2));
    assert_eq!(row.get::<_, Option<i32>>(3), Some(3));
    let row = stored("p5-plain").await;
    assert_eq!(row.get::<_, Option<serde_json::Value>>(0), None);
    assert_eq!(
        row_count(&db).await,
        3,
        "the duplicate was not stored again"
    );

    // JetStream: one envelope per row, `properties` as stored.
    let envelopes = stream_messages(&js, "TELEMETRY_RAW_V1").await;
    assert_eq!(envelopes.len(), 3);
    let by_id = |id: &str| {
        envelopes
            .iter()
            .find(|m| m.body["payload"]["messageId"] == id)
            .unwrap_or_else(|| panic!("no envelope for {id}"))
            .body
            .clone()
    };
    assert_eq!(by_id("p5-all")["properties"], expected_all);
    assert_eq!(
        by_id("p5-chunk")["properties"]["userProperties"][0],
        serde_json::json!(["correlationId", "batch-9"])
    );
    assert!(by_id("p5-plain").get("properties").is_none());

    // The DLQ: each bad message once, with its reason.
    let conflicts: Vec<_> = dead
        .iter()
        .filter(|l| l["reason"] == "chunk_conflict")
        .collect();
    assert_eq!(conflicts.len(), 1, "{dead:?}");
    assert_eq!(conflicts[0]["payload"], conflict);
    assert!(conflicts[0]["detail"]
        .as_str()
        .unwrap()
        .contains("sequenceNumber"));
    assert_eq!(
        conflicts[0]["properties"]["userProperties"],
        serde_json::json!([["sequenceNumber", "2"]])
    );
    let invalid: Vec<_> = dead
        .iter()
        .filter(|l| l["reason"] == "invalid_properties")
        .collect();
    assert_eq!(invalid.len(), 1, "{dead:?}");
    assert_eq!(invalid[0]["payload"], too_many);
    assert!(invalid[0]["detail"]
        .as_str()
        .unwrap()
        .contains("33 user properties"));
    assert!(invalid[0].get("properties").is_none());
    let bad_utf8: Vec<_> = dead.iter().filter(|l| l["reason"] == "not_utf8").collect();
    assert_eq!(bad_utf8.len(), 1, "{dead:?}");
    assert_eq!(
        bad_utf8[0]["properties"],
        serde_json::json!({"payloadFormatIndicator": 1})
    );
    assert!(bad_utf8[0]["payloadBase64"].is_string());

    bridge.shutdown.cancel();
    bridge.task.await.unwrap().unwrap();
}
