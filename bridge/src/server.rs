//! The operations HTTP server on `--metrics-addr`: `/health`, `/ready`, `/metrics`.
//!
//! - `/health`: 200 `ok` while the process runs normally, 503 `draining` once a
//!   shutdown has begun (so an orchestrator stops routing to it).
//! - `/ready`: 200 when at least one MQTT connection is up, Postgres answers and
//!   NATS is connected; otherwise 503 with a JSON body naming what is down.
//! - `/metrics`: the Prometheus text exposition of every metric of the process.
//!
//! Run it with [`serve`]; it stops when the `shutdown` future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

/// A readiness probe of one dependency: `Ok(())` when it is reachable.
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A named dependency check, run on every `/ready` request (with a timeout).
pub type Check = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// Process-wide state the probes read. Cheap to clone.
#[derive(Clone, Default)]
pub struct Status {
    inner: Arc<StatusInner>,
}

#[derive(Default)]
struct StatusInner {
    /// Set once a shutdown signal has arrived; `/health` then answers 503.
    draining: AtomicBool,
    /// MQTT connections that currently have a ConnAck.
    connected: AtomicUsize,
}

impl Status {
    /// Marks the process as draining.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// True once a shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// One MQTT connection came up.
    pub fn connection_up(&self) {
        self.inner.connected.fetch_add(1, Ordering::SeqCst);
    }

    /// One MQTT connection went down (call once per earlier `connection_up`).
    pub fn connection_down(&self) {
        // Saturating: never wraps below zero even if called out of pairing.
        let _ = self
            .inner
            .connected
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// MQTT connections currently up.
    pub fn connected(&self) -> usize {
        self.inner.connected.load(Ordering::SeqCst)
    }
}

/// What the server needs: the shared status, the dependency checks and the
/// metrics handle.
#[derive(Clone)]
pub struct ServerState {
    pub status: Status,
    /// `(name, check)` pairs, e.g. `("postgres", ...)`, `("nats", ...)`.
    pub checks: Vec<(&'static str, Check)>,
    pub metrics: PrometheusHandle,
}

/// The process-wide Prometheus recorder's handle (installed on first use).
pub use argus_pipeline::metrics::prometheus_handle;

/// The router, without binding (tests call it directly).
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

/// Binds `addr` and serves until `shutdown` completes. Returns the bound address
/// through `bound` before serving (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "Operations HTTP server stopped with an error.");
        }
    });
    Ok((local, task))
}

async fn health(State(s): State<ServerState>) -> Response {
    if s.status.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn ready(State(s): State<ServerState>) -> Response {
    let mut down = serde_json::Map::new();
    let connected = s.status.connected();
    if connected == 0 {
        down.insert("mqtt".into(), "no connection to the broker".into());
    }
    let checks = s.checks.iter().map(|(name, check)| async move {
        let r = match tokio::time::timeout(Duration::from_secs(2), check()).await {
            Ok(r) => r,
            Err(_) => Err("timed out after 2s".to_owned()),
        };
        (*name, r)
    });
    for (name, r) in futures::future::join_all(checks).await {
        if let Err(e) = r {
            down.insert(name.into(), e.into());
        }
    }
    if s.status.is_draining() {
        down.insert("process".into(), "draining".into());
    }
    if down.is_empty() {
        (
            StatusCode::OK,
            Json(serde_json::json!({"ready": true, "mqttConnections": connected})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "mqttConnections": connected, "down": down})),
        )
            .into_response()
    }
}

async fn render_metrics(State(s): State<ServerState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}
