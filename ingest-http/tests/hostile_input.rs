//! Hostile input over the real HTTP path (issue 8): the sidecar in-process on a real
//! socket, with real Postgres, NATS (JetStream) and Redis. Each row has its expected
//! status (and error code), and after the table the accounting: every 200 is one row
//! in `telemetry_raw` and one message in `TELEMETRY_RAW_V1` with its `messageId`,
//! every 422 (`unstorable`) one dead letter, and nothing else was stored. The
//! expected outcomes are explained in docs/reliability.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::*;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

const LIMIT: usize = 64 * 1024; // test_limits().body_limit

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// 200, stored once.
    Ok,
    /// An error status with this `error.code`.
    Err(u16, &'static str),
}
use Expect::*;

struct Row {
    name: &'static str,
    body: Vec<u8>,
    content_type: Option<&'static str>,
    idempotency_key: Option<&'static str>,
    expect: Expect,
}

fn row(name: &'static str, body: impl Into<Vec<u8>>, expect: Expect) -> Row {
    Row {
        name,
        body: body.into(),
        content_type: Some("application/json"),
        idempotency_key: None,
        expect,
    }
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn table() -> Vec<Row> {
    let bad = Err(400, "invalid_body");
    let mut rows = vec![
        row("good", reading_with(r#"{"t":1}"#, ""), Ok),
        // Sizes.
        row("empty body", "", bad),
        row("1 byte", "{", bad),
        row("exactly the body limit", reading_of_len(LIMIT), Ok),
        row(
            "one byte over the body limit",
            reading_of_len(LIMIT + 1),
            Err(413, "payload_too_large"),
        ),
        // Nesting (serde_json stops at 128 levels).
        row(
            "metadata nested 100 deep",
            reading_with(r#"{"t":2}"#, &format!(r#","metadata":{{"d":{}}}"#, nested(100))),
            Ok,
        ),
        row(
            "metadata nested 200 deep",
            reading_with(r#"{"t":3}"#, &format!(r#","metadata":{{"d":{}}}"#, nested(200))),
            bad,
        ),
        // Numbers.
        row(
            "huge integer metric (stored digit for digit)",
            reading_with(r#"{"big":123456789012345678901234567890}"#, ""),
            Ok,
        ),
        row("number out of f64 range", reading_with(r#"{"big":1e999999}"#, ""), bad),
        row("bare NaN", reading_with(r#"{"v":NaN}"#, ""), bad),
        row(
            "NaN-like strings",
            reading_with(r#"{"a":"NaN","b":"Infinity","c":"-Infinity"}"#, ""),
            Ok,
        ),
        row(
            "metric is an object",
            reading_with(r#"{"t":{"x":1}}"#, ""),
            bad,
        ),
        // Encodings.
        row(
            "invalid UTF-8",
            format!(r#"{{"deviceId":"{DEVICE}","metrics":{{"s":"_"}}}}"#)
                .replace('_', "\u{1}")
                .into_bytes()
                .into_iter()
                .map(|b| if b == 1 { 0xff } else { b })
                .collect::<Vec<u8>>(),
            bad,
        ),
        row("a BOM", format!("\u{feff}{}", reading_with(r#"{"t":4}"#, "")), bad),
        row(
            "lone surrogate escape",
            reading_with(r#"{"s":"\ud800"}"#, ""),
            bad,
        ),
        // Duplicate keys, at any depth: refused (serde_json would keep the last copy
        // silently, as the MQTT path's `invalid_json` refuses them too).
        row(
            "duplicate metrics key",
            format!(r#"{{"deviceId":"{DEVICE}","metrics":{{"t":5}},"metrics":{{"t":6}}}}"#),
            bad,
        ),
        row(
            "duplicate deviceId, own last",
            format!(
                r#"{{"deviceId":"{OTHER_DEVICE}","deviceId":"{DEVICE}","metrics":{{"t":7}}}}"#
            ),
            bad,
        ),
        row(
            "duplicate deviceId, other last",
            format!(
                r#"{{"deviceId":"{DEVICE}","deviceId":"{OTHER_DEVICE}","metrics":{{"t":8}}}}"#
            ),
            bad,
        ),
        row(
            "the same nested metadata object without the repeat",
            reading_with(r#"{"t":10}"#, r#","metadata":{"a":{"k":1}}"#),
            Ok,
        ),
        row(
            "a key repeated in a nested metadata object",
            reading_with(r#"{"t":9}"#, r#","metadata":{"a":{"k":1,"k":2}}"#),
            bad,
        ),
        // Timestamps.
        row(
            "timestamp far future",
            reading_with(r#"{"t":9}"#, r#","timestamp":"9999-12-31T23:59:59.999999Z""#),
            Ok,
        ),
        row(
            "timestamp far past",
            reading_with(r#"{"t":10}"#, r#","timestamp":"0001-01-01T00:00:00Z""#),
            Ok,
        ),
        row(
            "timestamp year 0",
            reading_with(r#"{"t":11}"#, r#","timestamp":"0000-01-01T00:00:00Z""#),
            bad,
        ),
        row(
            "timestamp as epoch millis",
            reading_with(r#"{"t":12}"#, r#","timestamp":1700000000000"#),
            bad,
        ),
        // SQL metacharacters and control characters in every string field.
        row(
            "SQL in metric name and value, metadata and messageId",
            reading_with(
                r#"{"'; DROP TABLE telemetry_raw; --":"x' OR '1'='1"}"#,
                r#","metadata":{"k\"; DELETE FROM devices; --":"\\'"},"messageId":"m'OR'1'='1;--""#,
            ),
            Ok,
        ),
        row(
            "control characters in metric name, value and metadata",
            reading_with(
                r#"{"c\u0001\t":"\u001b[2J\r\n\u007f"}"#,
                r#","metadata":{"\u001f":"\b\f"}"#,
            ),
            Ok,
        ),
        row(
            r"\u0000 in a metric value (Postgres cannot store it: refused up front)",
            reading_with(r#"{"s":"a\u0000b"}"#, ""),
            bad,
        ),
        row(
            r"\u0000 in a metadata key",
            reading_with(r#"{"t":13}"#, r#","metadata":{"k\u0000":1}"#),
            bad,
        ),
        row(
            r"\u0000 in messageId",
            reading_with(r#"{"t":14}"#, r#","messageId":"m\u0000""#),
            bad,
        ),
        row(
            "SQL in deviceId",
            format!(r#"{{"deviceId":"{DEVICE}' OR '1'='1","metrics":{{"t":1}}}}"#),
            bad,
        ),
        row(
            "raw NUL byte in a string",
            b"{\"deviceId\":\"0d000000-0000-4000-8000-000000000001\",\"metrics\":{\"s\":\"a\x00\"}}"
                .to_vec(),
            bad,
        ),
        row(
            "messageId of 201 characters",
            reading_with(r#"{"t":15}"#, &format!(r#","messageId":"{}""#, "m".repeat(201))),
            bad,
        ),
        // Shapes.
        row("empty batch", "[]", bad),
        row(
            "batch with one bad reading stores none",
            format!(
                "[{},{}]",
                reading_with(r#"{"t":16}"#, ""),
                reading_with(r#"{"t":[1]}"#, "")
            ),
            bad,
        ),
        row(
            "batch of 101 (limit 100)",
            format!(
                "[{}]",
                vec![reading_with(r#"{"t":17}"#, ""); 101].join(",")
            ),
            bad,
        ),
        row("a JSON string", r#""hello""#, bad),
    ];
    // Headers.
    rows.push(Row {
        content_type: None,
        ..row(
            "no content type",
            reading_with(r#"{"t":18}"#, ""),
            Err(415, "unsupported_media_type"),
        )
    });
    rows.push(Row {
        content_type: Some("text/plain"),
        ..row(
            "text/plain",
            reading_with(r#"{"t":19}"#, ""),
            Err(415, "unsupported_media_type"),
        )
    });
    rows.push(Row {
        idempotency_key: Some("k'; DROP TABLE telemetry_raw; --"),
        ..row(
            "SQL in Idempotency-Key (has spaces)",
            reading_with(r#"{"t":20}"#, ""),
            Err(400, "invalid_header"),
        )
    });
    rows.push(Row {
        idempotency_key: Some("k';DROP/**/TABLE/**/telemetry_raw;--"),
        ..row(
            "SQL in Idempotency-Key (visible ASCII)",
            reading_with(r#"{"t":21}"#, ""),
            Ok,
        )
    });
    rows.push(row("good after", reading_with(r#"{"t":22}"#, ""), Ok));
    rows
}

#[tokio::test]
async fn hostile_http_input_table() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let pg = s.pg().await;

    let mut ok_ids: HashSet<Uuid> = HashSet::new();
    let mut ok_bodies: Vec<(Uuid, &'static str, Vec<u8>)> = Vec::new();
    let mut unstorable = 0;
    let rows = table();
    for r in &rows {
        let mut req = s
            .http
            .post(s.app.url("/api/v1/telemetry/ingest"))
            .header("x-api-key", &key)
            .body(r.body.clone());
        if let Some(ct) = r.content_type {
            req = req.header("content-type", ct);
        }
        if let Some(k) = r.idempotency_key {
            req = req.header("idempotency-key", k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("row {:?}: body is not JSON: {text:?}", r.name));
        match r.expect {
            Ok => {
                assert_eq!(status, StatusCode::OK, "row {:?}: {body}", r.name);
                let id: Uuid = body["messageId"].as_str().unwrap().parse().unwrap();
                assert!(ok_ids.insert(id), "row {:?}: id repeats", r.name);
                ok_bodies.push((id, r.name, r.body.clone()));
            }
            Err(want, code) => {
                assert_eq!(status.as_u16(), want, "row {:?}: {body}", r.name);
                assert_eq!(error_code(&body), code, "row {:?}: {body}", r.name);
                if code == "unstorable" {
                    unstorable += 1;
                }
            }
        }
    }

    // Accounting: the 200s, once each, in both stores; nothing else.
    assert_eq!(row_count(&pg).await as usize, ok_ids.len(), "rows");
    assert_eq!(
        stream_count(&s.nats).await as usize,
        ok_ids.len(),
        "stream messages"
    );
    let stored: HashSet<Uuid> = pg
        .query("SELECT id FROM telemetry_raw", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ok_ids);
    // Stored right: the reading as parsed (duplicates resolved, numbers as f64).
    for (id, name, body) in &ok_bodies {
        let row = pg
            .query_one(
                "SELECT payload, device_id, ingestion_source FROM telemetry_raw WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        let sent: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(row.get::<_, Value>(0), sent, "row {name:?}: stored payload");
        assert_eq!(row.get::<_, Uuid>(1), DEVICE);
        assert_eq!(row.get::<_, String>(2), "http");
    }
    // Integers beyond 64 bits keep their digits: the reading's text is stored as
    // sent, as MQTT payloads are (before issue 15 the sidecar re-serialised it as f64).
    let big: String = pg
        .query_one(
            "SELECT payload->'metrics'->>'big' FROM telemetry_raw WHERE payload->'metrics' ? 'big'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(big, "123456789012345678901234567890");
    // The SQL rows did nothing but get stored.
    let devices: i64 = pg
        .query_one("SELECT count(*) FROM devices", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(devices, 3);
    // Postgres-refused readings: one dead letter each.
    let client = nats_client(&s.nats, "admin").await;
    let js = async_nats::jetstream::new(client);
    let mut dlq = js.get_stream("TELEMETRY_DLQ").await.unwrap();
    let letters = dlq.info().await.unwrap().state.messages;
    assert_eq!(letters, unstorable, "one dead letter per 422");
    if letters > 0 {
        let m = dlq
            .get_last_raw_message_by_subject("telemetry.dlq.unstorable")
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["reason"], "unstorable");
        assert_eq!(v["deviceId"], DEVICE.to_string());
    }
}
