//! Outages: Postgres stopped → 503 (nothing half-written); after restart the same
//! request succeeds, once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use argus_testkit::nats::NatsServer;
use argus_testkit::pg::PgServer;
use argus_testkit::redis::RedisServer;
use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn postgres_stopped_gives_503_then_the_same_request_succeeds() {
    let (mut pg, nats, redis) =
        tokio::join!(PgServer::start(), NatsServer::start(), RedisServer::start());
    let db_url = pg.create_database("argus").await;
    prepare_database(&db_url).await;
    apply_streams(&nats).await;
    let mut limits = test_limits();
    limits.durability_timeout = Duration::from_secs(1);
    let mut app = App::start(config(&db_url, &nats, &redis.url(), limits)).await;
    let http = reqwest::Client::new();
    let (_, key) = create_key(&http, &app, DEVICE).await;
    // Warm the key and device caches (look-ups then need no Postgres).
    let (st, _, _) = ingest(&http, &app, Some(&key), &reading(DEVICE, 1.0), None).await;
    assert_eq!(st, StatusCode::OK);

    pg.stop().await;
    let batch = json!([reading(DEVICE, 2.0), reading(DEVICE, 3.0)]);
    let (st, body, headers) = ingest(&http, &app, Some(&key), &batch, Some("outage-1")).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "unavailable");
    assert!(headers.get("retry-after").is_some());
    let ready = http.get(app.admin_url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    pg.restart().await;
    // The same request (same Idempotency-Key) now succeeds; the sink may also have
    // written the first attempt meanwhile — either way there is one row per reading.
    let mut ok = None;
    for _ in 0..40 {
        let (st, body, _) = ingest(&http, &app, Some(&key), &batch, Some("outage-1")).await;
        if st == StatusCode::OK {
            ok = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let body = ok.expect("the retried request never succeeded after the restart");
    assert_eq!(body["messageIds"].as_array().unwrap().len(), 2);
    let client = argus_testkit::pg::connect(&db_url).await;
    assert_eq!(row_count(&client).await, 3);
    assert_eq!(stream_count(&nats).await, 3);
    app.stop().await;
}

#[tokio::test]
async fn nats_stopped_gives_503_then_the_same_request_succeeds() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let (st, _, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 1.0), None).await;
    assert_eq!(st, StatusCode::OK);

    let mut nats = s.nats;
    nats.stop().await;
    let body = reading(DEVICE, 2.0);
    let (st, resp, _) = ingest(&s.http, &s.app, Some(&key), &body, Some("nats-outage")).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{resp}");
    assert_eq!(error_code(&resp), "unavailable");

    nats.restart().await;
    let mut ok = None;
    for _ in 0..60 {
        let (st, resp, _) = ingest(&s.http, &s.app, Some(&key), &body, Some("nats-outage")).await;
        if st == StatusCode::OK {
            ok = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let resp = ok.expect("the retried request never succeeded after NATS came back");
    let id: uuid::Uuid = resp["messageId"].as_str().unwrap().parse().unwrap();
    let pg = s.db.client().await;
    assert_eq!(row_count(&pg).await, 2);
    let n: i64 = pg
        .query_one("SELECT count(*) FROM telemetry_raw WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(stream_count(&nats).await, 2);
}
