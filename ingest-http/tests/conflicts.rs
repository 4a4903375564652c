//! One id, one content (issue 13): a stored reading sent again is a duplicate; a
//! reused id with other content is a 409 `id_conflict`, dead-lettered, never stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_stored_reading_is_a_duplicate_and_a_reused_id_with_other_content_a_conflict() {
    let s = Stack::start().await;
    let (_, key) = create_key(&s.http, &s.app, DEVICE).await;
    let pg = s.pg().await;

    let mut first = reading(DEVICE, 1.0);
    first["messageId"] = json!("m-1");
    let (st, body, _) = ingest(&s.http, &s.app, Some(&key), &first, None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["duplicate"], false, "{body}");
    let id = body["messageId"].clone();

    // The same reading again (a retry): stored once, answered as a duplicate.
    let (st, body, _) = ingest(&s.http, &s.app, Some(&key), &first, None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["messageId"], &body["duplicate"]),
        (&id, &json!(true))
    );
    // In a batch, per reading.
    let batch = json!([first, reading(DEVICE, 5.0)]);
    let (st, body, _) = ingest(&s.http, &s.app, Some(&key), &batch, None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["readings"][0]["duplicate"], true, "{body}");
    assert_eq!(body["readings"][1]["duplicate"], false, "{body}");
    assert_eq!(row_count(&pg).await, 2);

    // A restarted counter: the same id, other content. Refused naming the reading, both
    // ids and both digests; the stored row keeps its content.
    let mut reused = reading(DEVICE, 2.0);
    reused["messageId"] = json!("m-1");
    let batch = json!([reading(DEVICE, 6.0), reused]);
    let (st, body, _) = ingest(&s.http, &s.app, Some(&key), &batch, None).await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_code(&body), "id_conflict");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("[1]"),
        "{body}"
    );
    let conflict = &body["error"]["details"]["conflicts"][0];
    assert_eq!(conflict["index"], 1, "{body}");
    assert_eq!(conflict["suppliedId"], "m-1", "{body}");
    assert_eq!((&conflict["messageId"], &conflict["storedId"]), (&id, &id));
    let (stored, new) = (
        conflict["storedSha256"].as_str(),
        conflict["sha256"].as_str(),
    );
    assert!(
        stored.is_some_and(|d| d.len() == 64) && stored != new,
        "{body}"
    );
    assert_eq!(
        row_count(&pg).await,
        3,
        "the batch's other reading is stored"
    );
    let stored: String = pg
        .query_one(
            "SELECT payload::text FROM telemetry_raw WHERE id = $1",
            &[&id.as_str().unwrap().parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["metrics"]["temperature"], 1.0);
}
