//! `argus-dlq list|replay` against real servers: letters of a device unknown at
//! publish time are stored once after it is registered, a second replay stores
//! nothing, an interrupted replay (stopped at `--max-letters`, then killed)
//! resumes and stores everything once, and letters that are still refused or
//! truncated are counted as such.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use argus_pipeline::dlq::{DeadLetter, DlqReason, Reject};
use bytes::Bytes;
use common::*;
use uuid::Uuid;

const READINGS: usize = 30;

/// A stack whose bridge dead-lettered `READINGS` readings of an unknown device
/// and one invalid JSON payload of a known one.
async fn dead_lettered() -> (Stack, argus_bridge::app::Running, Uuid, Vec<String>) {
    let stack = Stack::start(false).await;
    let bridge = stack.bridge_in_process(0).await;
    let unknown = Uuid::new_v4();
    let device = stack.device(unknown);
    let payloads: Vec<String> = (0..READINGS).map(|n| numbered_payload("dlq", n)).collect();
    for p in &payloads {
        device.publish(&telemetry_topic(unknown), p.clone()).await;
    }
    let good = stack.device(DEMO_DEVICE_ID);
    good.publish(&telemetry_topic(DEMO_DEVICE_ID), r#"{"temperature": 21.5"#)
        .await;
    device.wait_acked(READINGS, Duration::from_secs(20)).await;
    good.wait_acked(1, Duration::from_secs(10)).await;
    let js = stack.js().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while stream_count(&js, "TELEMETRY_DLQ").await < READINGS as u64 + 1 {
        assert!(std::time::Instant::now() < deadline, "dead letters missing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (stack, bridge, unknown, payloads)
}

async fn register(stack: &Stack, id: Uuid) {
    stack
        .db()
        .await
        .execute(
            "INSERT INTO devices (id, tenant_id, device_type_id, name, status) \
             VALUES ($1, $2, $3, 'registered late', 'active')",
            &[
                &id,
                &DEMO_ORG_ID,
                &argus_schema::seed::TEMPERATURE_SENSOR_TYPE_ID,
            ],
        )
        .await
        .unwrap();
}

fn dlq(stack: &Stack, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_argus-dlq"));
    c.args(args)
        .env("DATABASE_URL", stack.pg.service_url())
        .env("NATS_URLS", stack.nats.url())
        .env("NATS_USER", "dlq")
        .env("NATS_PASSWORD", stack.nats.credentials("dlq").password)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

/// Runs `argus-dlq replay ARGS --json` to its end; its summary.
fn replay(stack: &Stack, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["replay", "--json"];
    all.extend_from_slice(args);
    let out = dlq(stack, &all).output().unwrap();
    summary(&out)
}

fn summary(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "argus-dlq failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("SUMMARY {}", stdout.trim());
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Rows of `device` in `telemetry_raw`: id -> copies.
async fn rows_of(stack: &Stack, device: Uuid) -> Vec<(Uuid, i64)> {
    stack
        .db()
        .await
        .query(
            "SELECT id, count(*) FROM telemetry_raw WHERE device_id = $1 GROUP BY id",
            &[&device],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Checks each reading of `device` is stored once under its live id and
/// published once (its `Nats-Msg-Id`).
async fn assert_each_once(stack: &Stack, device: Uuid, payloads: &[String]) {
    let expected: HashSet<Uuid> = payloads.iter().map(|p| expected_id(device, p)).collect();
    let rows = rows_of(stack, device).await;
    assert_eq!(rows.len(), expected.len(), "one row per reading: {rows:?}");
    for (id, copies) in &rows {
        assert!(
            expected.contains(id),
            "{id} is not an id the reading had live"
        );
        assert_eq!(*copies, 1);
    }
    let published: Vec<Uuid> = stream_messages(&stack.js().await, "TELEMETRY_RAW_V1")
        .await
        .into_iter()
        .filter_map(|m| m.msg_id.and_then(|id| id.parse().ok()))
        .filter(|id| expected.contains(id))
        .collect();
    assert_eq!(published.len(), expected.len(), "each published once");
    assert_eq!(
        published.iter().collect::<HashSet<_>>().len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_registered_late_has_its_letters_stored_once() {
    let (stack, _bridge, unknown, payloads) = dead_lettered().await;
    let js = stack.js().await;
    // One letter whose record kept only a prefix of its payload.
    let mut cut = DeadLetter::new(
        Reject::unknown_device(unknown),
        Some(telemetry_topic(unknown)),
        Some("bridge-0-0".into()),
        chrono::Utc::now(),
        Bytes::from(format!(r#"{{"blob":"{}"}}"#, "x".repeat(4000))),
    );
    cut.device_id = Some(unknown);
    js.publish(
        DlqReason::UnknownDevice.subject(),
        cut.encode_within(1000).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let letters = stream_count(&js, "TELEMETRY_DLQ").await;

    let list = summary(
        &dlq(&stack, &["list", "--json", "--limit", "5"])
            .output()
            .unwrap(),
    );
    assert_eq!(list["byReason"]["unknown_device"], READINGS + 1);
    assert_eq!(list["byReason"]["invalid_json"], 1);
    assert_eq!(list["letters"].as_array().unwrap().len(), 5);
    let mine = summary(
        &dlq(
            &stack,
            &["list", "--json", "--device", &unknown.to_string()],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(mine["total"], READINGS + 1);

    // Before the device exists, a dry run says so and changes nothing.
    let dry = replay(&stack, &["--reason", "unknown_device", "--dry-run"]);
    assert_eq!(dry["stillRejected"]["unknown_device"], READINGS);
    assert_eq!(
        (dry["stored"].as_u64(), dry["truncated"].as_u64()),
        (Some(0), Some(1))
    );

    register(&stack, unknown).await;
    let dry = replay(&stack, &["--reason", "unknown_device", "--dry-run"]);
    assert_eq!(dry["stored"], READINGS, "{dry}");
    assert!(
        rows_of(&stack, unknown).await.is_empty(),
        "a dry run stores nothing"
    );

    let first = replay(&stack, &["--reason", "unknown_device"]);
    assert_eq!(first["stored"], READINGS, "{first}");
    assert_eq!(first["truncated"], 1, "{first}");
    assert_eq!(first["complete"], true);
    assert_each_once(&stack, unknown, &payloads).await;
    let received_at: chrono::DateTime<chrono::Utc> = stack
        .db()
        .await
        .query_one(
            "SELECT min(received_at) FROM telemetry_raw WHERE device_id = $1 AND ingestion_source = 'mqtt' AND mqtt_topic = $2",
            &[&unknown, &telemetry_topic(unknown)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        received_at < chrono::Utc::now() - chrono::Duration::milliseconds(100),
        "stored with the time it was received live, not replayed"
    );

    let second = replay(&stack, &["--reason", "unknown_device"]);
    assert_eq!(
        (second["stored"].as_u64(), second["alreadyStored"].as_u64()),
        (Some(0), Some(READINGS as u64)),
        "{second}"
    );
    assert_each_once(&stack, unknown, &payloads).await;

    // Every letter: the invalid JSON one is still refused for the same reason,
    // so no letter is added.
    let all = replay(&stack, &[]);
    assert_eq!(all["stillRejected"]["invalid_json"], 1, "{all}");
    assert_eq!(all["newReason"], 0);
    assert_eq!(all["alreadyStored"], READINGS);
    assert_eq!(
        stream_count(&js, "TELEMETRY_DLQ").await,
        letters,
        "nothing dead-lettered again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_replay_resumes_and_stores_everything_once() {
    let (stack, _bridge, unknown, payloads) = dead_lettered().await;
    register(&stack, unknown).await;
    let args = ["--reason", "unknown_device", "--ack-wait", "2s"];

    // Stopped on purpose after 10 letters.
    let mut capped = args.to_vec();
    capped.extend(["--max-letters", "10", "--batch", "5"]);
    let part = replay(&stack, &capped);
    assert_eq!(
        (part["stored"].as_u64(), part["complete"].as_bool()),
        (Some(10), Some(false)),
        "{part}"
    );
    assert_eq!(rows_of(&stack, unknown).await.len(), 10);

    // Killed mid-run: slow letters, SIGKILL once a few more are stored.
    let mut slow = vec!["replay", "--json", "--rate", "10", "--batch", "1"];
    slow.extend(args);
    let mut child = dlq(&stack, &slow)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = stack.db().await;
    let count = || async {
        db.query_one(
            "SELECT count(*) FROM telemetry_raw WHERE device_id = $1",
            &[&unknown],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count().await < 14 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow replay stored nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stored_when_killed = count().await;
    assert!(
        stored_when_killed < READINGS as i64,
        "killed halfway: {stored_when_killed}"
    );

    let rest = replay(&stack, &args);
    assert_eq!(rest["resumed"], true, "{rest}");
    assert_eq!(rest["complete"], true, "{rest}");
    assert_eq!(
        rest["stored"].as_u64(),
        Some(READINGS as u64 - stored_when_killed as u64),
        "the rest, and only the rest: {rest}"
    );
    // At most the letter the kill caught between its row and its ack comes again.
    assert!(rest["alreadyStored"].as_u64().unwrap() <= 1, "{rest}");
    assert_each_once(&stack, unknown, &payloads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_letter_refused_for_another_reason_now_holds_that_reason() {
    let (stack, _bridge, unknown, _payloads) = dead_lettered().await;
    // Registered, but disabled: the letters are refused again, as disabled_device.
    register(&stack, unknown).await;
    stack
        .db()
        .await
        .execute(
            "UPDATE devices SET status = 'disabled' WHERE id = $1",
            &[&unknown],
        )
        .await
        .unwrap();
    let js = stack.js().await;
    let letters = stream_count(&js, "TELEMETRY_DLQ").await;

    let run = replay(&stack, &[]);
    assert_eq!(run["stillRejected"]["disabled_device"], READINGS, "{run}");
    assert_eq!(run["newReason"], READINGS);
    assert_eq!(
        run["complete"], true,
        "the run does not chase the letters it writes"
    );
    assert_eq!(run["read"], READINGS + 1, "{run}");
    let records = dlq_records(&js).await;
    assert_eq!(
        records.len() as u64,
        letters,
        "each message keeps one letter"
    );
    let reasons = |r: &str| records.iter().filter(|v| v["reason"] == r).count();
    assert_eq!(
        (reasons("disabled_device"), reasons("unknown_device")),
        (READINGS, 0)
    );
    assert!(rows_of(&stack, unknown).await.is_empty());

    // Again: unchanged, so nothing is written.
    let again = replay(&stack, &[]);
    assert_eq!(
        (again["newReason"].as_u64(), again["read"].as_u64()),
        (Some(0), Some(READINGS as u64 + 1)),
        "{again}"
    );
    assert_eq!(stream_count(&js, "TELEMETRY_DLQ").await, letters);
}
