//! Security cases of issue 8 on the HTTP side, against the real sidecar (API keys,
//! certificate API, CRL) with real Postgres, NATS and Redis:
//! - the certificate and API-key APIs refuse every request without the exact admin
//!   bearer token, and a refused request changes nothing;
//! - no endpoint reveals a key, a password, an internal URL or a stack trace, for
//!   bad requests to every route and while Postgres is down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use argus_testkit::nats::NatsServer;
use argus_testkit::pg::PgServer;
use argus_testkit::redis::RedisServer;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

struct SecStack {
    pg: PgServer,
    db_url: String,
    _nats: NatsServer,
    _redis: RedisServer,
    pki: tempfile::TempDir,
    app: App,
    http: reqwest::Client,
}

async fn start() -> SecStack {
    let (pg, nats, redis) =
        tokio::join!(PgServer::start(), NatsServer::start(), RedisServer::start());
    let db_url = pg.create_database("argus").await;
    prepare_database(&db_url).await;
    apply_streams(&nats).await;
    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).unwrap();
    let mut config = config(&db_url, &nats, &redis.url(), test_limits());
    config.pki_dir = Some(pki.path().to_path_buf());
    let app = App::start(config).await;
    SecStack {
        pg,
        db_url,
        _nats: nats,
        _redis: redis,
        pki,
        app,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap(),
    }
}

async fn count(db_url: &str, table: &str) -> i64 {
    let c = argus_testkit::pg::connect(db_url).await;
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// The admin routes: (method, path, body).
fn admin_routes(key_id: Uuid) -> Vec<(Method, String, &'static str)> {
    vec![
        (
            Method::POST,
            format!("/api/v1/devices/{DEVICE}/api-keys"),
            "",
        ),
        (
            Method::GET,
            format!("/api/v1/devices/{DEVICE}/api-keys"),
            "",
        ),
        (
            Method::DELETE,
            format!("/api/v1/devices/{DEVICE}/api-keys/{key_id}"),
            "",
        ),
        (
            Method::POST,
            format!("/api/v1/devices/{DEVICE}/certificate"),
            r#"{"validityDays":30}"#,
        ),
        (
            Method::DELETE,
            format!("/api/v1/devices/{DEVICE}/certificate"),
            "",
        ),
    ]
}

#[tokio::test]
async fn admin_apis_refuse_without_the_admin_token() {
    let s = start().await;
    let (key_id, key) = create_key(&s.http, &s.app, DEVICE).await;
    let ca = argus_pki::Ca::load(s.pki.path()).unwrap();
    let index_before = ca.certificates().unwrap().len();
    let keys_before = count(&s.db_url, "device_api_keys").await;

    let wrong_prefix = &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1];
    // (Authorization value or None, X-API-Key or None, expected status)
    let variants: Vec<(Option<String>, Option<String>, u16)> = vec![
        (None, None, 401),
        (Some("Bearer".into()), None, 401),
        (Some("Bearer ".into()), None, 401),
        (Some(format!("Basic {ADMIN_TOKEN}")), None, 401),
        (Some(format!("Token {ADMIN_TOKEN}")), None, 401),
        (Some(ADMIN_TOKEN.to_string()), None, 401),
        (None, Some(ADMIN_TOKEN.to_string()), 401),
        (Some("Bearer wrong-token".into()), None, 403),
        (Some(format!("Bearer {ADMIN_TOKEN}x")), None, 403),
        (Some(format!("Bearer {wrong_prefix}")), None, 403),
        (
            Some(format!("Bearer {}", ADMIN_TOKEN.to_uppercase())),
            None,
            403,
        ),
        (Some(format!("Bearer {key}")), None, 403),
    ];
    for (method, path, body) in admin_routes(key_id) {
        for (auth, api_key, want) in &variants {
            let mut req = s
                .http
                .request(method.clone(), s.app.admin_url(&path))
                .header("content-type", "application/json")
                .body(body);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            if let Some(k) = api_key {
                req = req.header("x-api-key", k);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let b: Value = resp.json().await.unwrap();
            assert_eq!(
                status, *want,
                "{method} {path} with {auth:?}/{api_key:?}: {b}"
            );
            let code = error_code(&b);
            assert!(code == "unauthorized" || code == "forbidden", "{code}");
        }
    }

    // Nothing changed: no key created or revoked, no certificate issued or revoked.
    assert_eq!(count(&s.db_url, "device_api_keys").await, keys_before);
    let revoked: i64 = argus_testkit::pg::connect(&s.db_url)
        .await
        .query_one(
            "SELECT count(*) FROM device_api_keys WHERE revoked_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(revoked, 0);
    assert_eq!(count(&s.db_url, "device_certificates").await, 0);
    assert_eq!(ca.certificates().unwrap().len(), index_before);
    // The device's key still works, and the admin token is not an API key.
    let (st, _, _) = ingest(&s.http, &s.app, Some(&key), &reading(DEVICE, 1.0), None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = ingest(
        &s.http,
        &s.app,
        Some(ADMIN_TOKEN),
        &reading(DEVICE, 2.0),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // And with the token, the same routes work (the refusals above were the token's).
    let r = s
        .http
        .post(
            s.app
                .admin_url(&format!("/api/v1/devices/{DEVICE}/certificate")),
        )
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"validityDays": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// (method, path, headers, body)
type Request = (Method, String, Vec<(&'static str, String)>, String);

/// One exchange: what was asked and what came back.
struct Seen {
    what: String,
    status: u16,
    text: String,
}

async fn battery(s: &SecStack, key: &str, key_id: Uuid) -> Vec<Seen> {
    let mut out = Vec::new();
    let long = "x".repeat(16 * 1024);
    let requests: Vec<Request> = vec![
        // Ingest: every kind of bad request, with a valid key.
        (Method::POST, "/api/v1/telemetry/ingest".into(), vec![("x-api-key", key.into()), ("content-type", "application/json".into())], "{".into()),
        (Method::POST, "/api/v1/telemetry/ingest".into(), vec![("x-api-key", key.into()), ("content-type", "application/json".into())], format!(r#"{{"deviceId":"{DEVICE}","metrics":{{"s":"a\u0000"}}}}"#)),
        (Method::POST, "/api/v1/telemetry/ingest".into(), vec![("x-api-key", key.into()), ("content-type", "application/json".into())], serde_json::to_string(&reading(DEVICE, 3.0)).unwrap()),
        (Method::POST, "/api/v1/telemetry/ingest".into(), vec![("x-api-key", key.into()), ("content-type", "application/json".into())], serde_json::to_string(&reading(OTHER_DEVICE, 3.0)).unwrap()),
        (Method::POST, "/api/v1/telemetry/ingest".into(), vec![("x-api-key", key.into()), ("content-type", "application/json".into()), ("idempotency-key", "a b".into())], "{}".into()),
        (Method::POST, "/api/v1/telemetry/ingest".into(), vec![("x-api-key", format!("{key}x")), ("content-type", "application/json".into())], "{}".into()),
        (Method::POST, "/api/v1/telemetry/ingest".into(), vec![("x-api-key", long.clone())], "{}".into()),
        (Method::POST, "/api/v1/telemetry/ingest".into(), vec![("x-api-key", key.into()), ("content-type", "text/xml".into())], "<x/>".into()),
        (Method::GET, "/api/v1/telemetry/ingest".into(), vec![], String::new()),
        // Admin: with the token but bad input, and without it.
        (Method::POST, format!("/api/v1/devices/{DEVICE}/certificate"), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], r#"{"csr":"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}"#.into()),
        (Method::POST, format!("/api/v1/devices/{DEVICE}/certificate"), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], r#"{"validityDays":"forever"}"#.into()),
        (Method::POST, format!("/api/v1/devices/{DEVICE}/certificate"), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], r#"{"validityDays":100000}"#.into()),
        (Method::POST, format!("/api/v1/devices/{DEVICE}/certificate"), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], "not json".into()),
        (Method::POST, format!("/api/v1/devices/{}/certificate", Uuid::new_v4()), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], "{}".into()),
        (Method::POST, "/api/v1/devices/not-a-uuid/certificate".into(), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], "{}".into()),
        (Method::DELETE, format!("/api/v1/devices/{DEVICE}/certificate"), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], r#"{"reason":"'; DROP TABLE devices; --"}"#.into()),
        (Method::POST, format!("/api/v1/devices/{DEVICE}/certificate"), vec![], "{}".into()),
        (Method::POST, format!("/api/v1/devices/{DEVICE}/api-keys"), vec![("authorization", "Bearer wrong".into())], String::new()),
        (Method::POST, format!("/api/v1/devices/{}/api-keys", Uuid::new_v4()), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], String::new()),
        (Method::POST, "/api/v1/devices/'%20OR%201=1--/api-keys".into(), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], String::new()),
        (Method::GET, format!("/api/v1/devices/{DEVICE}/api-keys"), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], String::new()),
        (Method::DELETE, format!("/api/v1/devices/{DEVICE}/api-keys/{}", Uuid::new_v4()), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], String::new()),
        (Method::DELETE, format!("/api/v1/devices/{OTHER_DEVICE}/api-keys/{key_id}"), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], String::new()),
        (Method::DELETE, format!("/api/v1/devices/{DEVICE}/api-keys/nope"), vec![("authorization", format!("Bearer {ADMIN_TOKEN}"))], String::new()),
        // Public and unknown routes, traversal attempts.
        (Method::GET, "/pki/crl.pem".into(), vec![], String::new()),
        (Method::GET, "/pki/crl.der".into(), vec![], String::new()),
        (Method::GET, "/pki/ca.key".into(), vec![], String::new()),
        (Method::GET, "/pki/..%2fca.key".into(), vec![], String::new()),
        (Method::GET, "/pki/%2e%2e/ca.key".into(), vec![], String::new()),
        (Method::GET, "/health".into(), vec![], String::new()),
        (Method::GET, "/ready".into(), vec![], String::new()),
        (Method::GET, "/metrics".into(), vec![], String::new()),
        (Method::GET, "/.env".into(), vec![], String::new()),
        (Method::GET, "/debug/vars".into(), vec![], String::new()),
        (Method::PUT, "/health".into(), vec![], long.clone()),
    ];
    // On both listeners: the admin paths answer 404 on the device listener, the
    // ingest path 404 on the admin listener; neither may leak anything.
    let on_both = requests.into_iter().flat_map(|r| {
        [
            (s.app.base.clone(), r.clone()),
            (s.app.admin_base.clone(), r),
        ]
    });
    for (base, (method, path, headers, body)) in on_both {
        let mut req = s
            .http
            .request(method.clone(), format!("{base}{path}"))
            .body(body);
        for (h, v) in &headers {
            req = req.header(*h, v);
        }
        let what = format!("{method} {base}{path}");
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let mut text = format!("{:?}\n", resp.headers());
                let bytes = resp.bytes().await.unwrap_or_default();
                text.push_str(&String::from_utf8_lossy(&bytes));
                out.push(Seen { what, status, text });
            }
            Err(e) => panic!("{what}: no response: {e}"),
        }
    }
    out
}

fn check_clean(seen: &[Seen], secrets: &[(&str, String)]) {
    for s in seen {
        for (name, secret) in secrets {
            assert!(
                !s.text.contains(secret.as_str()),
                "{} ({}) reveals {name}:\n{}",
                s.what,
                s.status,
                &s.text[..s.text.len().min(2000)]
            );
        }
        for marker in [
            "panicked",
            "stack backtrace",
            "RUST_BACKTRACE",
            "postgres://",
            "redis://",
            "nats://",
            "PRIVATE KEY",
            "ca.key",
            "SQLSTATE",
            "tokio_postgres",
            "deadpool",
            "/tmp/",
        ] {
            assert!(
                !s.text.contains(marker),
                "{} ({}) shows {marker:?}:\n{}",
                s.what,
                s.status,
                &s.text[..s.text.len().min(2000)]
            );
        }
        assert_ne!(s.status, 500, "{} answered 500: {}", s.what, s.text);
    }
}

#[tokio::test]
async fn no_endpoint_reveals_a_secret_or_a_stack_trace() {
    let mut s = start().await;
    let (key_id, key) = create_key(&s.http, &s.app, DEVICE).await;
    let ca_key = std::fs::read_to_string(s.pki.path().join("ca.key")).unwrap();
    let ca_key_body: String = ca_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    // A slice from the middle: PKCS#8 keys of one algorithm share their first ~48
    // base64 characters (the ASN.1 header), so the start would match any key.
    let mid = ca_key_body.len() / 2;
    let ca_key_body = ca_key_body[mid..mid + 32].to_string();
    let secret_part = api_key_secret(&key).to_string();
    let secrets = vec![
        ("the admin token", ADMIN_TOKEN.to_string()),
        ("the API key", key.clone()),
        ("the API key's secret", secret_part),
        ("the database URL", s.db_url.clone()),
        ("the CA key", ca_key_body.clone()),
        ("the PKI directory", s.pki.path().display().to_string()),
    ];

    let seen = battery(&s, &key, key_id).await;
    assert!(seen.len() > 30);
    check_clean(&seen, &secrets);
    // The certificate API returns a private key only on success, and never the CA's.
    let r = s
        .http
        .post(
            s.app
                .admin_url(&format!("/api/v1/devices/{DEVICE}/certificate")),
        )
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let text = r.text().await.unwrap();
    assert!(!text.contains(&ca_key_body), "the CA key was returned");
    assert!(!text.contains(ADMIN_TOKEN));

    // Postgres down: the same requests answer 503 (or their auth/validation error),
    // never a 500, never a connection string.
    s.pg.stop().await;
    let seen = battery(&s, &key, key_id).await;
    check_clean(&seen, &secrets);
    assert!(
        seen.iter().any(|x| x.status == 503),
        "no 503 while Postgres is down"
    );
    s.pg.restart().await;
}
