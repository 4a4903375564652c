//! Dead letters against a real JetStream: record shape (text and base64),
//! subject per reason, deduplication of a redelivered letter, and an error
//! (so the caller does not acknowledge) when the DLQ cannot be written.
// Helpers outside #[test] fns panic on purpose: a test whose setup fails must fail loudly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use argus_pipeline::dlq::{DeadLetter, DlqPublisher};
use argus_pipeline::reading::{check, Limits, Reject};
use argus_schema::nats::{NatsAuth, Unreachable};
use argus_testkit::nats::NatsServer;
use async_nats::jetstream;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

const DLQ_STREAM: &str = "TELEMETRY_DLQ";
const DEVICE: Uuid = Uuid::from_u128(0x0d000000_0000_4000_8000_000000000001);

/// A client logged in as `user`, as the process it stands for would.
async fn client_as(nats: &NatsServer, user: &str) -> async_nats::Client {
    let c = nats.credentials(user);
    argus_pipeline::nats::connect(
        NatsAuth::user_password(c.user, c.password),
        &[nats.url()],
        "dlq-test",
        Unreachable::Retry,
    )
    .await
    .unwrap()
}

/// A NATS server with the topology; JetStream as the bridge.
async fn setup() -> (NatsServer, jetstream::Context) {
    let nats = NatsServer::start().await;
    argus_schema::streams::apply(&client_as(&nats, "admin").await, Some(1))
        .await
        .unwrap();
    let js = jetstream::new(client_as(&nats, "bridge").await);
    (nats, js)
}

/// The stored letters, read as `admin`.
async fn letters(nats: &NatsServer) -> Vec<jetstream::message::StreamMessage> {
    let js = jetstream::new(client_as(nats, "admin").await);
    let mut s = js.get_stream(DLQ_STREAM).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        out.push(s.get_raw_message(seq).await.unwrap());
    }
    out
}

fn at() -> DateTime<Utc> {
    DateTime::from_timestamp(1_714_557_600, 250_000_000).unwrap()
}

fn rejected(topic: &str, payload: &'static [u8]) -> DeadLetter {
    let reject = check(topic, payload, &Limits::default()).unwrap_err();
    DeadLetter::new(
        reject,
        Some(topic.to_string()),
        Some("bridge-0-1".into()),
        at(),
        Bytes::from_static(payload),
    )
}

#[tokio::test]
async fn records_have_the_contract_shape() {
    let (nats, js) = setup().await;
    let dlq = DlqPublisher::new(js.clone());
    let topic = format!("devices/{DEVICE}/telemetry");

    dlq.publish(rejected(&topic, b"{\"t\": 21.5,"))
        .await
        .unwrap();
    dlq.publish(rejected(&topic, b"\x00\x9f\x92\x96 binary"))
        .await
        .unwrap();
    dlq.publish(rejected("devices/nope/telemetry", b"{}"))
        .await
        .unwrap();
    dlq.publish(DeadLetter::new(
        Reject::unknown_device(DEVICE),
        Some(topic.clone()),
        None,
        at(),
        Bytes::from_static(b"{}"),
    ))
    .await
    .unwrap();

    let msgs = letters(&nats).await;
    assert_eq!(msgs.len(), 4);
    let subjects: Vec<&str> = msgs.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "telemetry.dlq.invalid_json",
            "telemetry.dlq.not_utf8",
            "telemetry.dlq.bad_topic",
            "telemetry.dlq.unknown_device"
        ]
    );
    let v: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();

    // Text payload.
    assert_eq!(v[0]["reason"], "invalid_json");
    assert_eq!(v[0]["payload"], "{\"t\": 21.5,");
    assert!(v[0].get("payloadBase64").is_none());
    assert_eq!(v[0]["topic"], topic);
    assert_eq!(v[0]["clientId"], "bridge-0-1");
    assert_eq!(v[0]["receivedAt"], "2024-05-01T10:00:00.250000Z");
    assert_eq!(v[0]["deviceId"], DEVICE.to_string());
    assert!(!v[0]["detail"].as_str().unwrap().is_empty());

    // Binary payload: base64, and no text field.
    assert_eq!(v[1]["reason"], "not_utf8");
    assert_eq!(v[1]["payloadBase64"], "AJ+SliBiaW5hcnk=");
    assert!(v[1].get("payload").is_none());
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v[1]["payloadBase64"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, b"\x00\x9f\x92\x96 binary");

    // A bad topic names no device.
    assert_eq!(v[2]["reason"], "bad_topic");
    assert!(v[2].get("deviceId").is_none());

    assert_eq!(v[3]["reason"], "unknown_device");
    assert!(v[3]["clientId"].is_null());
}

#[tokio::test]
async fn a_redelivered_letter_is_recorded_once() {
    let (nats, js) = setup().await;
    let dlq = DlqPublisher::new(js.clone());
    let topic = format!("devices/{DEVICE}/telemetry");
    let letter = rejected(&topic, b"[1,2,3]");
    dlq.publish(letter.clone()).await.unwrap();
    dlq.publish(letter).await.unwrap();
    dlq.publish(rejected(&topic, b"[1,2,4]")).await.unwrap();
    assert_eq!(letters(&nats).await.len(), 2);
}

#[tokio::test]
async fn an_unwritable_dlq_is_an_error() {
    let (mut nats, js) = setup().await;
    let dlq = DlqPublisher::new(js.clone()).with_timeout(Duration::from_millis(500));
    nats.stop().await;
    let topic = format!("devices/{DEVICE}/telemetry");
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        dlq.publish(rejected(&topic, b"nope")),
    )
    .await
    .expect("publish must give up within its timeout")
    .unwrap_err();
    assert!(err.is_retriable());

    // And a stream that does not exist (topology not applied) is an error too.
    nats.restart().await;
    let admin = jetstream::new(client_as(&nats, "admin").await);
    admin.delete_stream(DLQ_STREAM).await.unwrap();
    let js = jetstream::new(client_as(&nats, "bridge").await);
    let dlq = DlqPublisher::new(js).with_timeout(Duration::from_secs(2));
    assert!(dlq.publish(rejected(&topic, b"nope")).await.is_err());
}

#[tokio::test]
async fn a_letter_past_max_payload_is_written_truncated() {
    // 180 KB of 0x01 is valid UTF-8 but not JSON; escaped to `\u0001` its whole record
    // is ~1.08 MB, over the server's 1 MiB max_payload: unwritable until truncated.
    let (nats, js) = setup().await;
    let dlq = DlqPublisher::new(js.clone());
    let payload = vec![0x01u8; 180_000];
    let topic = format!("devices/{DEVICE}/telemetry");
    let reject = check(&topic, &payload, &Limits::default()).unwrap_err();
    let letter = DeadLetter::new(
        reject,
        Some(topic.clone()),
        Some("bridge-0-1".into()),
        at(),
        Bytes::from(payload.clone()),
    );
    let max_payload = js.client().server_info().max_payload;
    assert!(
        letter.encode().len() > max_payload,
        "the case needs a record over the limit"
    );
    assert!(dlq.record_limit() < max_payload);

    tokio::time::timeout(Duration::from_secs(10), dlq.publish(letter))
        .await
        .expect("written, not retried")
        .expect("the truncated letter fits");

    let msgs = letters(&nats).await;
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].payload.len() <= max_payload);
    let v: serde_json::Value = serde_json::from_slice(&msgs[0].payload).unwrap();
    assert_eq!(v["reason"], "invalid_json");
    assert_eq!(v["payloadTruncated"], true);
    assert_eq!(v["payloadBytes"], 180_000);
    assert_eq!(
        v["payloadSha256"],
        hex::encode(argus_pipeline::digest::sha256(&payload))
    );
    assert!(payload.starts_with(v["payload"].as_str().unwrap().as_bytes()));
}
