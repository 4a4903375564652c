//! Ingest over real HTTP against real Postgres, NATS and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// Plan §7.3: a valid key → 200; one row and one stream message with the same id.
#[tokio::test]
async fn valid_key_stores_one_row_and_one_stream_message() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let body = reading(DEVICE, 25.5);
    let (status, resp, _) = ingest(&s.http, &s.app, Some(&key), &body, None).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["success"], true);
    let id: Uuid = resp["messageId"].as_str().unwrap().parse().unwrap();

    let pg = s.pg().await;
    let row = pg
        .query_one(
            "SELECT id, tenant_id, device_id, payload, ingestion_source, device_timestamp \
             FROM telemetry_raw",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), id);
    assert_eq!(row.get::<_, Uuid>(1), TENANT);
    assert_eq!(row.get::<_, Uuid>(2), DEVICE);
    assert_eq!(row.get::<_, Value>(3), body);
    assert_eq!(row.get::<_, String>(4), "http");
    assert_eq!(
        row.get::<_, chrono::DateTime<chrono::Utc>>(5).to_rfc3339(),
        "2026-01-28T12:00:00+00:00"
    );

    assert_eq!(stream_count(&s.nats).await, 1);
    let (msg_id, envelope) = last_stream_message(&s.nats, DEVICE).await;
    assert_eq!(msg_id, id.to_string());
    assert_eq!(envelope["messageId"], id.to_string());
    assert_eq!(envelope["deviceId"], DEVICE.to_string());
    assert_eq!(envelope["tenantId"], TENANT.to_string());
    assert_eq!(envelope["source"], "http");
    assert_eq!(envelope["payload"], body);
}

/// Numbers keep the digits the device sent (issue 15): integers past 2^64 and
/// decimals with 30+ significant digits, in the row and in the envelope. The
/// envelope carries the reading's text byte for byte; `jsonb` keeps every digit
/// (numbers are `numeric`) but writes an exponent out in full (`1.5E+3` → `1500`)
/// and drops the whitespace between tokens.
#[tokio::test]
async fn http_readings_keep_their_digits() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let text = format!(
        r#"{{"deviceId": "{DEVICE}", "metrics": {{"big": 123456789012345678901234567890123, "dec": 0.1000000000000000055511151231257827, "tiny": -1.2345678901234567890123456789E-21, "exp": 1.5E+3}}}}"#
    );
    let (status, resp, _) = ingest_raw(&s.http, &s.app, &key, text.clone().into_bytes()).await;
    assert_eq!(status, StatusCode::OK, "{resp}");

    let row = s
        .pg()
        .await
        .query_one(
            "SELECT payload->'metrics'->>'big', payload->'metrics'->>'dec', \
                    payload->'metrics'->>'tiny', payload->'metrics'->>'exp' FROM telemetry_raw",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<String> = (0..4).map(|i| row.get(i)).collect();
    assert_eq!(
        got,
        [
            "123456789012345678901234567890123",
            "0.1000000000000000055511151231257827",
            "-0.0000000000000000000012345678901234567890123456789",
            "1500",
        ]
    );

    let (_, envelope) = last_stream_bytes(&s.nats, DEVICE).await;
    let envelope = String::from_utf8(envelope).unwrap();
    assert!(
        envelope.contains(&format!(r#""payload":{text}"#)),
        "the envelope does not carry the reading as sent: {envelope}"
    );
}

/// A retry with the same Idempotency-Key (or the same messageId, or the same body) is a
/// no-op that returns the same messageId; a batch answers one id per reading.
#[tokio::test]
async fn retries_are_idempotent_and_batches_return_every_id() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let pg = s.pg().await;

    // Idempotency-Key: the same body again → the same id, nothing new stored; another
    // body under the same key → 409, the first is kept.
    let first = reading(DEVICE, 1.0);
    let (st1, r1, _) = ingest(&s.http, &s.app, Some(&key), &first, Some("req-1")).await;
    let (st2, r2, _) = ingest(&s.http, &s.app, Some(&key), &first, Some("req-1")).await;
    assert_eq!((st1, st2), (StatusCode::OK, StatusCode::OK));
    assert_eq!(r1["messageId"], r2["messageId"]);
    let (st3, r3, _) = ingest(
        &s.http,
        &s.app,
        Some(&key),
        &reading(DEVICE, 2.0),
        Some("req-1"),
    )
    .await;
    assert_eq!(st3, StatusCode::CONFLICT, "{r3}");
    assert_eq!(error_code(&r3), "id_conflict");
    assert_eq!(row_count(&pg).await, 1);

    // messageId field.
    let mut with_id = reading(DEVICE, 3.0);
    with_id["messageId"] = json!("m-42");
    let (_, a, _) = ingest(&s.http, &s.app, Some(&key), &with_id, None).await;
    let (_, b, _) = ingest(&s.http, &s.app, Some(&key), &with_id, None).await;
    assert_eq!(a["messageId"], b["messageId"]);
    assert_ne!(a["messageId"], r1["messageId"]);
    assert_eq!(row_count(&pg).await, 2);

    // No id at all: the same reading is the same message.
    let (_, c, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 4.0), None).await;
    let (_, d, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 4.0), None).await;
    assert_eq!(c["messageId"], d["messageId"]);
    assert_eq!(row_count(&pg).await, 3);

    // Batch: one id per reading, in order; retried with its key → same ids, no new rows.
    let batch = json!([
        reading(DEVICE, 5.0),
        reading(DEVICE, 6.0),
        reading(DEVICE, 7.0)
    ]);
    let (st, r, _) = ingest(&s.http, &s.app, Some(&key), &batch, Some("batch-1")).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let ids = r["messageIds"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 3);
    let (_, again, _) = ingest(&s.http, &s.app, Some(&key), &batch, Some("batch-1")).await;
    assert_eq!(again["messageIds"], json!(ids));
    assert_eq!(row_count(&pg).await, 6);
    assert_eq!(stream_count(&s.nats).await, 6);
    for id in &ids {
        let id: Uuid = id.as_str().unwrap().parse().unwrap();
        let n: i64 = pg
            .query_one(
                "SELECT count(*) FROM telemetry_raw WHERE id = $1 AND ingestion_source = 'http'",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }
}

/// Every rejection answers its status with the stable error body, and stores nothing.
#[tokio::test]
async fn rejections_store_nothing() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let (other_id, other_key) = create_key(&s.http, &s.app, OTHER_DEVICE).await;
    let (_, disabled_key) = create_key(&s.http, &s.app, DISABLED_DEVICE).await;
    let pg = s.pg().await;
    let good = reading(DEVICE, 20.0);

    // 401: no key.
    let (st, b, _) = ingest(&s.http, &s.app, None, &good, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&b), "unauthorized");

    // 403: malformed key, well-formed unknown key.
    let last = if key.ends_with('A') { "B" } else { "A" };
    let unknown = format!("{}{last}", &key[..key.len() - 1]);
    for bad in ["nope", &key[..key.len() - 1], &unknown] {
        let (st, b, _) = ingest(&s.http, &s.app, Some(bad), &good, None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{bad}");
        assert_eq!(error_code(&b), "forbidden");
    }

    // 403: the key of another device (deviceId does not match the key's device).
    let (st, b, _) = ingest(&s.http, &s.app, Some(&other_key), &good, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("deviceId"),
        "{b}"
    );
    let batch = json!([reading(OTHER_DEVICE, 1.0), reading(DEVICE, 2.0)]);
    let (st, b, _) = ingest(&s.http, &s.app, Some(&other_key), &batch, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("[1].deviceId"),
        "{b}"
    );

    // 403: the key of a disabled device.
    let (st, _, _) = ingest(
        &s.http,
        &s.app,
        Some(&disabled_key),
        &reading(DISABLED_DEVICE, 1.0),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // 403: revoked key (was valid and cached a moment ago).
    let (st, _, _) = ingest(
        &s.http,
        &s.app,
        Some(&other_key),
        &reading(OTHER_DEVICE, 1.0),
        Some("x"),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(row_count(&pg).await, 1);
    revoke_key(&s.http, &s.app, OTHER_DEVICE, other_id).await;
    let (st, _, _) = ingest(
        &s.http,
        &s.app,
        Some(&other_key),
        &reading(OTHER_DEVICE, 2.0),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // 403: expired key.
    let (expired_id, expired_key) = create_key(&s.http, &s.app, DEVICE).await;
    pg.execute(
        "UPDATE device_api_keys SET expires_at = now() - interval '1 minute' WHERE id = $1",
        &[&expired_id],
    )
    .await
    .unwrap();
    let (st, _, _) = ingest(&s.http, &s.app, Some(&expired_key), &good, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // 415: wrong content type.
    let resp = s
        .http
        .post(s.app.url("/api/v1/telemetry/ingest"))
        .header("x-api-key", &key)
        .header("content-type", "text/plain")
        .body(serde_json::to_vec(&good).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        error_code(&resp.json().await.unwrap()),
        "unsupported_media_type"
    );

    // 413: body over the limit (64 KiB in tests).
    let mut big = reading(DEVICE, 1.0);
    big["metadata"] = json!({"blob": "x".repeat(70 * 1024)});
    let (st, b, _) = ingest(&s.http, &s.app, Some(&key), &big, None).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&b), "payload_too_large");

    // 400 naming the field path.
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"deviceId": DEVICE, "metrics": {"temp": null}}),
            "metrics.temp",
        ),
        (json!({"deviceId": "not-a-uuid", "metrics": {}}), "deviceId"),
        (
            json!({"deviceId": DEVICE, "metrics": {}, "timestamp": "noon"}),
            "timestamp",
        ),
        (json!({"deviceId": DEVICE, "metrics": [1]}), "metrics"),
        (
            json!([reading(DEVICE, 1.0), reading(DEVICE, 2.0), {"metrics": {}}]),
            "[2].deviceId",
        ),
    ];
    for (body, path) in cases {
        let (st, b, _) = ingest(&s.http, &s.app, Some(&key), &body, None).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_code(&b), "invalid_body");
        let msg = b["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("{path}:")),
            "{msg} should name {path}"
        );
    }
    let resp = s
        .http
        .post(s.app.url("/api/v1/telemetry/ingest"))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body("{\"deviceId\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // A batch with one invalid reading stores none of them.
    let batch = json!([reading(DEVICE, 1.0), {"deviceId": DEVICE, "metrics": {"t": [1]}}]);
    let (st, b, _) = ingest(&s.http, &s.app, Some(&key), &batch, None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("[1].metrics.t"));

    // Only the one accepted reading above is stored and published.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(row_count(&pg).await, 1);
    assert_eq!(stream_count(&s.nats).await, 1);

    // Rejections are counted by reason.
    let metrics = metrics_text(&s.http, &s.app).await;
    for reason in [
        "missing_key",
        "invalid_key",
        "device_mismatch",
        "device_not_active",
        "payload_too_large",
        "unsupported_media_type",
        "invalid_body",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason} missing in /metrics"
        );
    }
}

/// Per-device token bucket: 429 with Retry-After; another device is unaffected.
#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let mut limits = test_limits();
    limits.rate_limit_per_device = 0.2;
    limits.rate_limit_burst = 2;
    let s = Stack::start_with(limits).await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let (_, other) = create_key(&s.http, &s.app, OTHER_DEVICE).await;
    for t in [1.0, 2.0] {
        let (st, _, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, t), None).await;
        assert_eq!(st, StatusCode::OK);
    }
    let (st, b, h) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 3.0), None).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&b), "rate_limited");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "Retry-After {retry}");
    let (st, _, _) = ingest(
        &s.http,
        &s.app,
        Some(&other),
        &reading(OTHER_DEVICE, 1.0),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(row_count(&s.pg().await).await, 3);
}

/// A revoked key is refused at once, by this sidecar and by a second one that had the
/// key cached (separate registries = separate processes, invalidated over Redis).
#[tokio::test]
async fn revoked_key_is_refused_at_once_by_every_instance() {
    let s = Stack::start().await;
    let mut second = s.second_app().await;
    let (key_id, key) = create_key(&s.http, &s.app, DEVICE).await;
    // Both instances accept it (and cache it).
    for (i, app) in [&s.app, &second].into_iter().enumerate() {
        let (st, _, _) = ingest(&s.http, app, Some(&key), &reading(DEVICE, i as f64), None).await;
        assert_eq!(st, StatusCode::OK);
    }
    revoke_key(&s.http, &s.app, DEVICE, key_id).await;
    // Give the pub/sub message a moment to travel (well under the caches' TTL).
    tokio::time::sleep(Duration::from_millis(200)).await;
    for app in [&s.app, &second] {
        let (st, _, _) = ingest(&s.http, app, Some(&key), &reading(DEVICE, 9.0), None).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{}", app.base);
    }
    assert_eq!(row_count(&s.pg().await).await, 2);
    second.stop().await;
}

/// `/health`, `/ready` and `/metrics`.
#[tokio::test]
async fn health_ready_and_metrics() {
    let mut s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let (st, _, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 1.0), None).await;
    assert_eq!(st, StatusCode::OK);

    let health = s.http.get(s.app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = s.http.get(s.app.admin_url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let metrics = metrics_text(&s.http, &s.app).await;
    assert!(
        metrics.contains(
            "argus_http_requests_total{route=\"/api/v1/telemetry/ingest\",status=\"2xx\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("argus_http_request_duration_seconds_bucket"));
    assert!(metrics.contains("argus_http_readings_accepted_total"));

    // Unknown routes answer the stable 404 body.
    let resp = s.http.get(s.app.url("/nope")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(&resp.json().await.unwrap()), "not_found");
    let resp = s
        .http
        .get(s.app.url("/api/v1/telemetry/ingest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        error_code(&resp.json().await.unwrap()),
        "method_not_allowed"
    );

    // NATS gone → not ready.
    s.nats.stop().await;
    let mut ready_status = StatusCode::OK;
    for _ in 0..50 {
        ready_status = s
            .http
            .get(s.app.admin_url("/ready"))
            .send()
            .await
            .unwrap()
            .status();
        if ready_status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready_status, StatusCode::SERVICE_UNAVAILABLE);
    s.app.stop().await;
}

/// The certificate API is mounted with `--pki-dir`, absent without it.
#[tokio::test]
async fn certificate_api_is_mounted_with_a_pki_dir() {
    let s = Stack::start().await;
    let resp = s
        .http
        .get(s.app.admin_url("/pki/crl.pem"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).expect("pki init");
    let mut cfg = config(s.db.url(), &s.nats, &s.redis.url(), test_limits());
    cfg.pki_dir = Some(pki.path().to_path_buf());
    let mut app = App::start(cfg).await;
    let resp = s
        .http
        .get(app.admin_url("/pki/crl.pem"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = s
        .http
        .post(app.admin_url(&format!("/api/v1/devices/{DEVICE}/certificate")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}
