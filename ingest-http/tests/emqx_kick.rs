//! The EMQX kick against the recorded contract (`ingest-http/contract/emqx-kick.json`;
//! EMQX cannot run here). A local HTTP server stands in for EMQX: it records the
//! request the sidecar sends after a revoke through the admin API, and answers each
//! status the contract lists. The request must be the contract's (method, path with the
//! device id, Basic `key:secret`, `Accept`, no body); each answer must give the
//! contract's outcome and retries; and whatever the kick does, the revocation stands.
//! The API key's secret is generated per run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use argus_ingest_http::emqx::{ApiSecret, EmqxConfig};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use common::*;
use serde_json::Value;

const API_KEY: &str = "argus-sidecar";

/// One request the stand-in received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// What the stand-in answers: a status and body, or nothing for `delay`.
#[derive(Clone, Default)]
struct Answer {
    status: Option<u16>,
    body: Option<Value>,
    delay: Duration,
}

#[derive(Clone, Default)]
struct FakeEmqx {
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Arc<Mutex<Answer>>,
}

async fn record(
    State(fake): State<FakeEmqx>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.seen.lock().unwrap().push(Seen {
        method,
        path: uri.path().to_owned(),
        headers,
        body,
    });
    let answer = fake.answer.lock().unwrap().clone();
    tokio::time::sleep(answer.delay).await;
    let status = StatusCode::from_u16(answer.status.unwrap_or(503)).unwrap();
    match answer.body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    }
}

async fn start_fake() -> (FakeEmqx, String) {
    let fake = FakeEmqx::default();
    let app = axum::Router::new()
        .fallback(record)
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, url)
}

fn contract() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contract/emqx-kick.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A random secret, made for this run.
fn secret() -> String {
    use rand::Rng as _;
    let bytes: [u8; 24] = rand::rng().random();
    hex::encode(bytes)
}

struct Kicking {
    s: Stack,
    app: App,
    fake: FakeEmqx,
    secret: String,
    _pki: tempfile::TempDir,
}

async fn start(timeout: Duration) -> Kicking {
    let s = Stack::start().await;
    let (fake, url) = start_fake().await;
    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).expect("pki init");
    let secret = secret();
    let mut cfg = config(s.db.url(), &s.nats, &s.redis.url(), test_limits());
    cfg.pki_dir = Some(pki.path().to_path_buf());
    cfg.emqx = Some(EmqxConfig {
        api_url: url,
        api_key: API_KEY.into(),
        api_secret: ApiSecret::new(secret.clone()),
        timeout,
    });
    let app = App::start(cfg).await;
    Kicking {
        s,
        app,
        fake,
        secret,
        _pki: pki,
    }
}

impl Kicking {
    /// Issues a certificate to DEVICE, then revokes it through the admin API; returns
    /// the revoke answer and the requests EMQX saw.
    async fn issue_and_revoke(&self) -> (Value, Vec<Seen>) {
        let cert = self
            .s
            .http
            .post(
                self.app
                    .admin_url(&format!("/api/v1/devices/{DEVICE}/certificate")),
            )
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(cert.status(), StatusCode::CREATED);
        self.fake.seen.lock().unwrap().clear();
        let resp = self
            .s
            .http
            .delete(
                self.app
                    .admin_url(&format!("/api/v1/devices/{DEVICE}/certificate")),
            )
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        // The revocation succeeds whatever EMQX did.
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["success"], true, "{body}");
        assert_eq!(
            body["revokedSerialNumbers"].as_array().unwrap().len(),
            1,
            "{body}"
        );
        let still_active: i64 = self
            .s
            .pg()
            .await
            .query_one(
                "SELECT count(*) FROM device_certificates WHERE device_id = $1 AND revoked_at IS NULL",
                &[&DEVICE],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(still_active, 0, "the revocation did not stand");
        let seen = self.fake.seen.lock().unwrap().clone();
        (body, seen)
    }

    async fn kicks(&self, outcome: &str) -> f64 {
        let text = metrics_text(&self.s.http, &self.app).await;
        let series = format!("argus_http_emqx_kicks_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }
}

/// The request is the contract's: method, path, Basic auth, headers, no body.
fn check_request(contract: &Value, seen: &Seen, secret: &str) {
    let request = &contract["request"];
    assert_eq!(seen.method.as_str(), request["method"], "{seen:?}");
    let path = request["path"]
        .as_str()
        .unwrap()
        .replace("{clientid}", &DEVICE.to_string());
    assert_eq!(seen.path, path);
    assert_eq!(request["auth"]["scheme"], "Basic");
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("{API_KEY}:{secret}"));
    assert_eq!(
        seen.headers["authorization"].to_str().unwrap(),
        format!("Basic {credentials}")
    );
    for (name, value) in request["headers"].as_object().unwrap() {
        assert_eq!(
            seen.headers[name.as_str()].to_str().unwrap(),
            value.as_str().unwrap(),
            "{name}"
        );
    }
    assert!(request["body"].is_null());
    assert!(seen.body.is_empty(), "a body was sent: {:?}", seen.body);
    assert!(
        seen.headers.get("content-length").is_none_or(|v| v == "0"),
        "{:?}",
        seen.headers
    );
}

#[tokio::test]
async fn the_kick_request_is_the_recorded_contract() {
    let k = start(Duration::from_secs(2)).await;
    k.fake.answer.lock().unwrap().status = Some(204);
    let (body, seen) = k.issue_and_revoke().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    check_request(&contract(), &seen[0], &k.secret);
    assert_eq!(body["brokerKick"]["outcome"], "kicked", "{body}");
    assert_eq!(body["brokerKick"]["attempts"], 1);
    assert!(!body.to_string().contains(&k.secret));
    assert_eq!(k.kicks("kicked").await, 1.0);
}

/// Every answer the contract lists gives its outcome and retries, and never undoes
/// the revocation.
#[tokio::test]
async fn every_recorded_answer_is_handled_as_the_contract_says() {
    let contract = contract();
    let answers = contract["answers"].as_array().unwrap();
    assert!(answers.len() >= 5, "{answers:?}");
    let timeout = Duration::from_millis(300);
    let k = start(timeout).await;
    for answer in answers {
        let status = answer["status"].as_u64().map(|s| s as u16);
        *k.fake.answer.lock().unwrap() = Answer {
            status,
            body: answer.get("body").cloned(),
            // No status: the stand-in answers too late.
            delay: if status.is_none() {
                timeout * 3
            } else {
                Duration::ZERO
            },
        };
        let outcome = answer["sidecar"]["outcome"].as_str().unwrap();
        let before = k.kicks(outcome).await;
        let (body, seen) = k.issue_and_revoke().await;
        let what = format!("EMQX answering {status:?}");
        let retried = answer["sidecar"]["retried"].as_bool().unwrap();
        let attempts = if retried {
            argus_ingest_http::emqx::ATTEMPTS as usize
        } else {
            1
        };
        assert_eq!(seen.len(), attempts, "{what}: {seen:?}");
        for request in &seen {
            check_request(&contract, request, &k.secret);
        }
        let kick = &body["brokerKick"];
        assert_eq!(kick["outcome"], outcome, "{what}: {body}");
        assert_eq!(kick["attempts"], attempts, "{what}: {body}");
        if outcome == "failed" {
            let error = kick["error"].as_str().unwrap();
            match status {
                Some(code) => assert_eq!(error, format!("HTTP {code}"), "{what}"),
                None => assert_eq!(error, "timeout", "{what}"),
            }
        } else {
            assert!(kick.get("error").is_none(), "{what}: {body}");
        }
        assert_eq!(k.kicks(outcome).await, before + 1.0, "{what}");
    }
}

/// EMQX unreachable (nothing listens): the revocation stands and says the kick failed.
#[tokio::test]
async fn an_unreachable_emqx_never_blocks_the_revocation() {
    let mut k = start(Duration::from_millis(300)).await;
    let port = argus_testkit::free_port();
    let mut cfg = config(k.s.db.url(), &k.s.nats, &k.s.redis.url(), test_limits());
    cfg.pki_dir = Some(k._pki.path().to_path_buf());
    cfg.emqx = Some(EmqxConfig {
        api_url: format!("http://127.0.0.1:{port}"),
        api_key: API_KEY.into(),
        api_secret: ApiSecret::new(k.secret.clone()),
        timeout: Duration::from_millis(300),
    });
    k.app.stop().await;
    k.app = App::start(cfg).await;
    let (body, _) = k.issue_and_revoke().await;
    assert_eq!(body["brokerKick"]["outcome"], "failed", "{body}");
    assert_eq!(body["brokerKick"]["error"], "connection", "{body}");
    assert_eq!(body["brokerKick"]["attempts"], 3, "{body}");
}
