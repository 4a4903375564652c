//! Bounds on what the sidecar holds: a reading too large for NATS is refused (413
//! naming it) before Postgres, and later requests still succeed; requests and body
//! bytes in flight are capped (503 with `Retry-After`), and the sidecar recovers once
//! the held requests end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use argus_ingest_http::Limits;
use argus_pipeline::limits::PublishLimits;
use common::*;
use reqwest::StatusCode;
use serde_json::json;

/// NATS's default `max_payload`, which the test server keeps.
const NATS_MAX_PAYLOAD: usize = 1024 * 1024;

#[tokio::test]
async fn a_reading_at_the_body_limit_is_refused_naming_it_and_later_requests_succeed() {
    // The largest reading the start-up check allows against this server.
    let fits = PublishLimits {
        server_max_payload: NATS_MAX_PAYLOAD,
    }
    .check_config(NATS_MAX_PAYLOAD, "--max-reading-bytes")
    .unwrap_err()
    .fits;
    let s = Stack::start_with(Limits {
        body_limit: 1024 * 1024,
        max_reading_bytes: fits,
        ..test_limits()
    })
    .await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let pg = s.pg().await;

    // A reading at the body limit: 413 naming it, nothing stored.
    let (st, body, _) = ingest_raw(&s.http, &s.app, &key, reading_of_len(1024 * 1024)).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(error_code(&body), "reading_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("reading:"),
        "{body}"
    );
    // In a batch, the reading is named by its index.
    let batch = format!(
        "[{},{}]",
        reading_with(r#"{"t":1}"#, ""),
        String::from_utf8(reading_of_len(fits + 1)).unwrap()
    );
    let (st, body, _) = ingest_raw(&s.http, &s.app, &key, batch.into_bytes()).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("[1]:"),
        "{body}"
    );
    assert_eq!(row_count(&pg).await, 0);

    // The largest allowed reading is stored and published; ordinary requests follow.
    let (st, body, _) = ingest_raw(&s.http, &s.app, &key, reading_of_len(fits)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    for i in 0..5 {
        let (st, body, _) = ingest(
            &s.http,
            &s.app,
            Some(&key),
            &reading(DEVICE, i as f64),
            None,
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    assert_eq!(row_count(&pg).await, 6);
    assert_eq!(stream_count(&s.nats).await, 6);
    let metrics = metrics_text(&s.http, &s.app).await;
    assert!(
        metrics.contains(r#"argus_http_rejected_total{reason="reading_too_large"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn requests_in_flight_are_capped_with_retry_after_and_recover() {
    let s = Stack::start_with(Limits {
        max_in_flight_requests: 2,
        ..test_limits()
    })
    .await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let admission = s.app.state.admission();

    let held = [
        hold_request(&s.app, &key, 1000).await,
        hold_request(&s.app, &key, 1000).await,
    ];
    wait_until("two requests held", || admission.requests_in_flight() == 2).await;
    let (st, body, headers) =
        ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 1.0), None).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "overloaded");
    assert_eq!(headers["retry-after"], "1");
    // The operational endpoints stay open.
    let ready = s.http.get(s.app.url("/health")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    drop(held);
    wait_until("held requests ended", || {
        admission.requests_in_flight() == 0
    })
    .await;
    let (st, body, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 2.0), None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(row_count(&s.pg().await).await, 1);
}

#[tokio::test]
async fn body_bytes_in_flight_are_capped_with_retry_after_and_recover() {
    const LIMIT: usize = 64 * 1024;
    let s = Stack::start_with(Limits {
        body_limit: LIMIT,
        max_in_flight_bytes: LIMIT,
        ..test_limits()
    })
    .await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let admission = s.app.state.admission();

    // A slow client holds 40 KiB of the 64 KiB budget.
    let held = hold_request(&s.app, &key, 40 * 1024).await;
    wait_until("40 KiB held", || admission.bytes_in_flight() == 40 * 1024).await;
    let big = reading_of_len(30 * 1024);
    let (st, body, headers) = ingest_raw(&s.http, &s.app, &key, big.clone()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "overloaded");
    assert_eq!(headers["retry-after"], "1");
    // What still fits is served.
    let (st, body, _) = ingest(
        &s.http,
        &s.app,
        Some(&key),
        &json!(reading(DEVICE, 1.0)),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");

    drop(held);
    wait_until("budget returned", || admission.bytes_in_flight() == 0).await;
    let (st, body, _) = ingest_raw(&s.http, &s.app, &key, big).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(row_count(&s.pg().await).await, 2);
}
