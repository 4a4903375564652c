//! Message ids of HTTP readings: a batch that names one id twice is refused (422,
//! naming both readings); the ids derived from an `Idempotency-Key` on a single
//! reading and on a batch live in separate namespaces (`k/0` alone is not reading 0
//! of a batch sent with `k`). The `"duplicate": true` and 409 `id_conflict` answers
//! wait for the sink's content digests (`ingest-http/tests/conflicts.rs.pending`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_batch_with_one_message_id_twice_is_refused_naming_both_readings() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let pg = s.pg().await;

    // Two different readings with the same `messageId`.
    let mut a = reading(DEVICE, 1.0);
    a["messageId"] = json!("m-7");
    let mut b = reading(DEVICE, 2.0);
    b["messageId"] = json!("m-7");
    let batch = json!([reading(DEVICE, 0.5), a, b]);
    let (st, body, _) = ingest(&s.http, &s.app, Some(&key), &batch, None).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "duplicate_message_id");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("[2]") && message.contains("[1]"),
        "{message}"
    );
    assert!(message.contains("messageId"), "{message}");

    // Two byte-identical readings without any id: the same content hash.
    let twin = json!([
        reading(DEVICE, 3.0),
        reading(DEVICE, 4.0),
        reading(DEVICE, 3.0)
    ]);
    let (st, body, _) = ingest(&s.http, &s.app, Some(&key), &twin, None).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "duplicate_message_id");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("[2]") && message.contains("[0]"),
        "{message}"
    );
    assert_eq!(row_count(&pg).await, 0, "a refused batch stores nothing");

    // The same batch with distinct ids is stored whole.
    let mut b = reading(DEVICE, 2.0);
    b["messageId"] = json!("m-8");
    let mut a = reading(DEVICE, 1.0);
    a["messageId"] = json!("m-7");
    let (st, body, _) = ingest(&s.http, &s.app, Some(&key), &json!([a, b]), None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(row_count(&pg).await, 2);
}

#[tokio::test]
async fn idempotency_keys_of_single_readings_and_batches_do_not_collide() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let pg = s.pg().await;

    let first = reading(DEVICE, 1.0);
    let (st, single, _) = ingest(&s.http, &s.app, Some(&key), &first, Some("k/0")).await;
    assert_eq!(st, StatusCode::OK, "{single}");
    let batch = json!([reading(DEVICE, 2.0), reading(DEVICE, 3.0)]);
    let (st, batched, _) = ingest(&s.http, &s.app, Some(&key), &batch, Some("k")).await;
    assert_eq!(st, StatusCode::OK, "{batched}");
    let ids = batched["messageIds"].as_array().unwrap();
    assert_ne!(
        single["messageId"], ids[0],
        "k/0 alone is not [0] of batch k"
    );
    assert_eq!(row_count(&pg).await, 3, "all three readings stored");

    // Both stay idempotent: each retry returns its own ids and stores nothing new.
    let (_, again, _) = ingest(&s.http, &s.app, Some(&key), &first, Some("k/0")).await;
    assert_eq!(again["messageId"], single["messageId"]);
    assert_eq!(again["duplicate"], true, "{again}");
    // The key again with another reading is refused, not silently answered.
    let (st, other, _) = ingest(
        &s.http,
        &s.app,
        Some(&key),
        &reading(DEVICE, 9.0),
        Some("k/0"),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{other}");
    assert_eq!(other["error"]["code"], "id_conflict", "{other}");
    let (_, again, _) = ingest(&s.http, &s.app, Some(&key), &batch, Some("k")).await;
    assert_eq!(again["messageIds"], batched["messageIds"]);
    assert_eq!(row_count(&pg).await, 3);

    // A single reading's id from its Idempotency-Key is what it was before (stable):
    // the pipeline's supplied-id derivation of the key itself.
    let expected = argus_pipeline::message_id::derive(DEVICE, "", b"", Some("k/0"));
    assert_eq!(single["messageId"], json!(expected));
}
