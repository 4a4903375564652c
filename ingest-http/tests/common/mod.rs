//! Test harness: real Postgres, NATS (JetStream) and Redis on free ports, and the real
//! sidecar (`argus_ingest_http::serve`) in-process, its device and admin listeners on
//! 127.0.0.1:0, reached over HTTP (the device listener over TLS with [`App::start_tls`]).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use argus_ingest_http::admin::AdminToken;
use argus_ingest_http::tls::{CertReloader, TlsListener};
use argus_ingest_http::{AppState, Config, DeviceListener, Limits, Listeners};
use argus_testkit::nats::NatsServer;
use argus_testkit::redis::RedisServer;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const RAW_STREAM: &str = "TELEMETRY_RAW_V1";

/// The fixed rows every test database gets.
pub const TENANT: Uuid = Uuid::from_u128(0x0a00_0000_0000_4000_8000_0000_0000_0001);
pub const DEVICE: Uuid = Uuid::from_u128(0x0d00_0000_0000_4000_8000_0000_0000_0001);
pub const OTHER_DEVICE: Uuid = Uuid::from_u128(0x0d00_0000_0000_4000_8000_0000_0000_0002);
pub const DISABLED_DEVICE: Uuid = Uuid::from_u128(0x0d00_0000_0000_4000_8000_0000_0000_0003);

/// Migrates `url` and inserts one tenant and three devices (the third disabled).
pub async fn prepare_database(url: &str) {
    let mut client = argus_testkit::pg::connect(url).await;
    argus_schema::migrate::migrate(&mut client)
        .await
        .expect("migrate");
    client
        .execute(
            "INSERT INTO organizations (id, name, slug) VALUES ($1, 'Test', 'test')",
            &[&TENANT],
        )
        .await
        .unwrap();
    for (id, status) in [
        (DEVICE, "active"),
        (OTHER_DEVICE, "active"),
        (DISABLED_DEVICE, "disabled"),
    ] {
        client
            .execute(
                "INSERT INTO devices (id, tenant_id, name, status) VALUES ($1, $2, $3, $4)",
                &[&id, &TENANT, &format!("dev-{id}"), &status],
            )
            .await
            .unwrap();
    }
}

/// The sidecar's configuration for a migrated database at `db_url`: it connects as the
/// service roles, as in production (`argus_ingest` for devices and the sink,
/// `argus_admin` for the admin routes), never as the superuser in `db_url`.
pub fn config(db_url: &str, nats: &NatsServer, redis_url: &str, limits: Limits) -> Config {
    use argus_testkit::pg::with_user;
    let c = nats.credentials("ingest-http");
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        emqx: None,
        database_url: with_user(db_url, argus_schema::roles::INGEST),
        admin_database_url: with_user(db_url, argus_schema::roles::ADMIN),
        pg_pool_size: 4,
        sink_pg_pool_size: 4,
        nats_urls: vec![nats.url()],
        nats_auth: argus_schema::nats::NatsAuth::user_password(c.user, c.password),
        redis_url: Some(redis_url.to_string()),
        admin_token: AdminToken::new(ADMIN_TOKEN),
        pki_dir: None,
        crl_url: None,
        crl_max_age: Duration::from_secs(86_400),
        broker_pid_file: None,
        limits,
        batch_size: 100,
        batch_linger: Duration::from_millis(2),
        batch_linger_mode: Default::default(),
        batch_max_bytes: 8 * 1024 * 1024,
        shutdown_timeout: Duration::from_secs(5),
        log_json: false,
    }
}

/// Limits for tests: no rate limits (per device, per address) unless a test asks, short
/// durability timeout, the production in-flight bounds.
pub fn test_limits() -> Limits {
    Limits {
        body_limit: 64 * 1024,
        max_reading_bytes: 64 * 1024,
        max_batch_readings: 100,
        rate_limit_per_device: 0.0,
        rate_limit_burst: 1,
        durability_timeout: Duration::from_secs(2),
        preauth_rate_per_address: 0.0,
        preauth_burst: 1,
        ..Limits::default()
    }
}

/// One running sidecar.
pub struct App {
    /// The device listener (`http://` or `https://`).
    pub base: String,
    /// The admin listener.
    pub admin_base: String,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl App {
    pub async fn start(config: Config) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(config, DeviceListener::Plain(listener)).await
    }

    /// The device listener over TLS with `reloader`'s certificate.
    pub async fn start_tls(config: Config, reloader: &Arc<CertReloader>) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = TlsListener::new(listener, reloader.server_config().unwrap()).unwrap();
        Self::start_on(config, DeviceListener::Tls(tls)).await
    }

    pub async fn start_on(config: Config, device: DeviceListener) -> App {
        let state = AppState::connect(config).await.expect("connect");
        let scheme = match device {
            DeviceListener::Plain(_) => "http",
            DeviceListener::Tls(_) => "https",
        };
        let base = format!("{scheme}://{}", device.local_addr().unwrap());
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_base = format!("http://{}", admin.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let listeners = Listeners { device, admin };
        let task = tokio::spawn(argus_ingest_http::serve(listeners, state.clone(), async {
            let _ = rx.await;
        }));
        // The registry's invalidation listener must be subscribed before a test revokes.
        assert!(
            state
                .registry()
                .wait_subscribed(Duration::from_secs(10))
                .await,
            "registry did not subscribe to invalidations"
        );
        App {
            base,
            admin_base,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `path` on the device listener.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `path` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{}", self.admin_base, path)
    }

    /// Graceful shutdown: stop, drain, close the sink.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Postgres (a fresh database), NATS with the streams, Redis, and one sidecar.
pub struct Stack {
    pub db: argus_testkit::pg::TestDb,
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub app: App,
    pub http: reqwest::Client,
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with(test_limits()).await
    }

    pub async fn start_with(limits: Limits) -> Stack {
        let (db, nats, redis) = tokio::join!(
            argus_testkit::pg::TestDb::create(),
            NatsServer::start(),
            RedisServer::start()
        );
        prepare_database(db.url()).await;
        apply_streams(&nats).await;
        let app = App::start(config(db.url(), &nats, &redis.url(), limits)).await;
        Stack {
            db,
            nats,
            redis,
            app,
            http: reqwest::Client::new(),
        }
    }

    /// A second sidecar on the same stores (its own registry and caches, as a second
    /// process would have).
    pub async fn second_app(&self) -> App {
        App::start(config(
            self.db.url(),
            &self.nats,
            &self.redis.url(),
            test_limits(),
        ))
        .await
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        self.db.client().await
    }
}

/// A NATS client logged in as `user` (`compose/nats/authorization.conf`).
pub async fn nats_client(nats: &NatsServer, user: &str) -> async_nats::Client {
    let c = nats.credentials(user);
    argus_schema::nats::connect(
        &argus_schema::nats::NatsAuth::user_password(c.user, c.password),
        &[nats.url()],
        "ingest-http-test",
        argus_schema::nats::Unreachable::Fail,
    )
    .await
    .expect("nats connect")
}

pub async fn apply_streams(nats: &NatsServer) {
    let client = nats_client(nats, "admin").await;
    argus_schema::streams::apply(&client, Some(1))
        .await
        .expect("apply streams");
}

pub async fn row_count(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one("SELECT count(*) FROM telemetry_raw", &[])
        .await
        .unwrap()
        .get(0)
}

pub async fn stream_count(nats: &NatsServer) -> u64 {
    let client = nats_client(nats, "admin").await;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(RAW_STREAM).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// The last message on `telemetry.raw.v1.<device>`: (Nats-Msg-Id, envelope).
pub async fn last_stream_message(nats: &NatsServer, device: Uuid) -> (String, Value) {
    let (id, bytes) = last_stream_bytes(nats, device).await;
    (id, serde_json::from_slice(&bytes).unwrap())
}

/// [`last_stream_message`] with the envelope's bytes as published.
pub async fn last_stream_bytes(nats: &NatsServer, device: Uuid) -> (String, Vec<u8>) {
    let client = nats_client(nats, "admin").await;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(RAW_STREAM).await.unwrap();
    let msg = stream
        .get_last_raw_message_by_subject(&format!("telemetry.raw.v1.{device}"))
        .await
        .unwrap();
    let id = msg
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    (id, msg.payload.to_vec())
}

/// Admin: creates a key for `device`; returns (key id, key).
pub async fn create_key(http: &reqwest::Client, app: &App, device: Uuid) -> (Uuid, String) {
    let resp = http
        .post(app.admin_url(&format!("/api/v1/devices/{device}/api-keys")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.unwrap();
    (
        body["id"].as_str().unwrap().parse().unwrap(),
        body["key"].as_str().unwrap().to_string(),
    )
}

/// Admin: revokes a key.
pub async fn revoke_key(http: &reqwest::Client, app: &App, device: Uuid, key_id: Uuid) {
    let resp = http
        .delete(app.admin_url(&format!("/api/v1/devices/{device}/api-keys/{key_id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

pub fn reading(device: Uuid, temp: f64) -> Value {
    json!({
        "deviceId": device,
        "metrics": {"temperature": temp, "humidity": 60, "ok": true, "mode": "eco"},
        "timestamp": "2026-01-28T12:00:00Z",
    })
}

/// POST /api/v1/telemetry/ingest with a JSON body and optional key / idempotency key.
pub async fn ingest(
    http: &reqwest::Client,
    app: &App,
    key: Option<&str>,
    body: &Value,
    idempotency_key: Option<&str>,
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let mut req = http
        .post(app.url("/api/v1/telemetry/ingest"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap());
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    if let Some(k) = idempotency_key {
        req = req.header("idempotency-key", k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

/// Asserts the stable error body and returns its code.
pub fn error_code(body: &Value) -> &str {
    assert_eq!(body["success"], false, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    body["error"]["code"].as_str().unwrap()
}

pub fn reading_with(metrics: &str, extra: &str) -> String {
    format!(r#"{{"deviceId":"{DEVICE}","metrics":{metrics}{extra}}}"#)
}

/// A compact single reading of exactly `len` bytes (as sent and as stored).
pub fn reading_of_len(len: usize) -> Vec<u8> {
    let empty = reading_with(r#"{"pad":""}"#, "");
    reading_with(
        &format!(r#"{{"pad":"{}"}}"#, "x".repeat(len - empty.len())),
        "",
    )
    .into_bytes()
}

/// POST /api/v1/telemetry/ingest with raw body bytes and a key.
pub async fn ingest_raw(
    http: &reqwest::Client,
    app: &App,
    key: &str,
    body: Vec<u8>,
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let resp = http
        .post(app.url("/api/v1/telemetry/ingest"))
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, resp.json().await.unwrap_or(Value::Null), headers)
}

/// An ingest request that declares `content_length` body bytes and sends one: the
/// sidecar holds it (and its budgets) until the connection is dropped.
pub async fn hold_request(app: &App, key: &str, content_length: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/telemetry/ingest HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: application/json\r\nx-api-key: {key}\r\n\
         content-length: {content_length}\r\n\r\n["
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

/// The secret part of an API key: everything after the `argus_` scheme. The
/// secret's own alphabet has `_`, so its last `_`-separated piece can be a
/// character or two that any response or log holds (a flaky check).
pub fn api_key_secret(key: &str) -> &str {
    let secret = key.split_once('_').map_or(key, |(_, s)| s);
    assert!(secret.len() >= 16, "{key}");
    secret
}

/// The sidecar's `/metrics` exposition.
pub async fn metrics_text(http: &reqwest::Client, app: &App) -> String {
    let response = http.get(app.admin_url("/metrics")).send().await.unwrap();
    response.text().await.unwrap()
}

/// Waits (at most 10 s) until `done` holds.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
