//! Admin API-key endpoints, and keys never leaking into responses or logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

#[tokio::test]
async fn admin_endpoints_create_list_revoke() {
    let s = Stack::start().await;
    let keys_url = s
        .app
        .admin_url(&format!("/api/v1/devices/{DEVICE}/api-keys"));

    // Admin token: missing → 401, wrong → 403.
    let resp = s.http.post(&keys_url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&resp.json().await.unwrap()), "unauthorized");
    let resp = s
        .http
        .get(&keys_url)
        .bearer_auth("wrong-token-xxxxxxxxxx")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // Unknown device → 404 (create and list).
    let unknown = s
        .app
        .admin_url(&format!("/api/v1/devices/{}/api-keys", Uuid::new_v4()));
    for resp in [
        s.http
            .post(&unknown)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap(),
        s.http
            .get(&unknown)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(&resp.json().await.unwrap()), "not_found");
    }

    // Create: the key once, with its id and prefix; optional expiry.
    let resp = s
        .http
        .post(&keys_url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"expiresInDays": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = resp.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let prefix = created["prefix"].as_str().unwrap().to_string();
    let key_id: Uuid = created["id"].as_str().unwrap().parse().unwrap();
    assert!(key.starts_with("argus_") && key.starts_with(&prefix));
    assert_eq!(prefix.len(), "argus_".len() + 8);
    assert!(
        key.len() >= prefix.len() + 1 + 22,
        "secret must carry >= 128 bits"
    );
    assert!(created["expiresAt"].is_string());
    let resp = s
        .http
        .post(&keys_url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"expiresInDays": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (second_id, _) = create_key(&s.http, &s.app, DEVICE).await;

    // Only the digest is stored.
    let pg = s.pg().await;
    let row = pg
        .query_one(
            "SELECT prefix, key_digest FROM device_api_keys WHERE id = $1",
            &[&key_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), prefix);
    let digest: Vec<u8> = row.get(1);
    assert_eq!(digest, argus_ingest_http::apikey::digest(&key).to_vec());

    // Use it: last_used_at is set in the background.
    let (st, _, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 1.0), None).await;
    assert_eq!(st, StatusCode::OK);
    let mut used = false;
    for _ in 0..50 {
        let row = pg
            .query_one(
                "SELECT last_used_at IS NOT NULL FROM device_api_keys WHERE id = $1",
                &[&key_id],
            )
            .await
            .unwrap();
        if row.get::<_, bool>(0) {
            used = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(used, "last_used_at was not updated");

    // List: ids, prefixes and times, never a key.
    let resp = s
        .http
        .get(&keys_url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(!text.contains(&key));
    let list: Value = serde_json::from_str(&text).unwrap();
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["id"], key_id.to_string());
    assert_eq!(keys[0]["prefix"], prefix);
    assert!(keys[0]["lastUsedAt"].is_string());
    assert!(keys[0]["revokedAt"].is_null());
    assert_eq!(keys[0]["active"], true);
    assert!(keys[0].get("key").is_none());

    // Revoke: 200, then listed as revoked; the other key stays active.
    revoke_key(&s.http, &s.app, DEVICE, key_id).await;
    let list: Value = s
        .http
        .get(&keys_url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let k0 = &list["keys"][0];
    assert!(k0["revokedAt"].is_string());
    assert_eq!(k0["active"], false);
    assert_eq!(list["keys"][1]["id"], second_id.to_string());
    assert_eq!(list["keys"][1]["active"], true);
    // Unknown key, or a key of another device → 404.
    for url in [
        format!("{keys_url}/{}", Uuid::new_v4()),
        s.app.admin_url(&format!(
            "/api/v1/devices/{OTHER_DEVICE}/api-keys/{second_id}"
        )),
    ] {
        let resp = s
            .http
            .delete(&url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{url}");
    }
}

/// A writer into a shared buffer, to capture the process's logs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The key appears in exactly one place: the creation response. Never in another
/// response, an error, or a log line (debug level, every crate).
#[tokio::test]
async fn keys_never_appear_in_responses_or_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let s = Stack::start().await;
    let (key_id, key) = create_key(&s.http, &s.app, DEVICE).await;
    let secret = api_key_secret(&key).to_string();
    let mut bodies = Vec::new();
    let mismatched = reading(OTHER_DEVICE, 1.0);
    let invalid = json!({"deviceId": DEVICE, "metrics": {"t": {}}});
    for (body, idem) in [
        (reading(DEVICE, 1.0), None),
        (reading(DEVICE, 1.0), Some(key.as_str())),
        (mismatched, None),
        (invalid, None),
    ] {
        let (_, b, h) = ingest(&s.http, &s.app, Some(&key), &body, idem).await;
        bodies.push(format!("{b} {h:?}"));
    }
    // A key sent in the wrong header, a near-miss key, a revoked key.
    let near = format!("{}x", &key[..key.len() - 1]);
    let (_, b, _) = ingest(&s.http, &s.app, Some(&near), &reading(DEVICE, 2.0), None).await;
    bodies.push(b.to_string());
    let resp = s
        .http
        .get(
            s.app
                .admin_url(&format!("/api/v1/devices/{DEVICE}/api-keys")),
        )
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    bodies.push(resp.text().await.unwrap());
    revoke_key(&s.http, &s.app, DEVICE, key_id).await;
    let (_, b, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 3.0), None).await;
    bodies.push(b.to_string());
    bodies.push(metrics_text(&s.http, &s.app).await);

    for body in &bodies {
        assert!(!body.contains(&secret), "a response echoed the key: {body}");
    }
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(!logs.is_empty(), "no logs captured");
    assert!(!logs.contains(&secret), "the key appears in the logs");
    assert!(
        !logs.contains(ADMIN_TOKEN),
        "the admin token appears in the logs"
    );
}
