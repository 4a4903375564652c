//! `argus-ingest-http`: the HTTP sidecar. Devices that cannot speak MQTT send telemetry
//! with an API key; it goes through the bridge's sink, so an HTTP reading is stored and
//! published exactly like an MQTT one. Operators manage API keys and certificates.
//!
//! Layout:
//! - [`config`]: flags with env twins, validated into [`config::Config`].
//! - [`state`]: shared state (Postgres pool, NATS, registry, sink, limits) and start-up.
//! - [`ingest`]: `POST /api/v1/telemetry/ingest` (auth, limits, validation, durability).
//! - [`request`]: the body's readings, validated with field paths.
//! - [`apikey`]: key format, generation (OS CSPRNG) and SHA-256 digest.
//! - [`keys`]: admin endpoints to create, list and revoke API keys.
//! - [`ratelimit`]: per-device token buckets.
//! - [`usage`]: throttled background `last_used_at` updates.
//! - [`pipeline`]: the seam to the bridge's batching sink (one request = one unit).
//! - [`metrics`]: metric names; `/metrics` renders them.
//! - [`error`]: the stable JSON error body every endpoint returns.
//! - [`admin`]: the admin bearer-token check for operator endpoints.
//! - [`certificates`]: the device certificate API (issue, revoke, CRL).
//!
//! Entry points: [`build_app`] (the router) and [`serve`] (run it on a listener until a
//! shutdown future completes, then drain the sink). The binary only parses flags and
//! calls them, so tests run the real server in-process.

pub mod admin;
pub mod apikey;
pub mod certificates;
pub mod config;
pub mod error;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod pipeline;
pub mod ratelimit;
pub mod request;
pub mod state;
pub mod usage;

use std::future::Future;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

pub use config::{Cli, Config, Limits};
pub use state::{AppState, StartError};

use crate::error::ApiError;

/// The whole HTTP API.
pub fn build_app(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/telemetry/ingest", post(ingest::ingest))
        .route(
            "/api/v1/devices/{device_id}/api-keys",
            post(keys::create).get(keys::list),
        )
        .route(
            "/api/v1/devices/{device_id}/api-keys/{key_id}",
            delete(keys::revoke),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    // The certificate API (issue/revoke, CRL), when `--pki-dir` is set.
    let api = match state.certificates() {
        Some(cert) => api.merge(certificates::router(cert.clone())),
        None => api,
    };
    api.layer(middleware::from_fn(track))
}

/// Serves `build_app(state)` on `listener` until `shutdown` completes: in-flight
/// requests finish, then the sink flushes and stops. `/health` answers 503 from the
/// moment the shutdown begins.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = build_app(state.clone());
    let draining = state.clone();
    let signal = async move {
        shutdown.await;
        draining.set_draining();
        tracing::info!("Shutting down: finishing in-flight requests.");
    };
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await;
    state
        .pipeline()
        .close(state.config().shutdown_timeout)
        .await;
    tracing::info!("Sink closed.");
    result
}

/// Records every request: count by route and status class, latency by route.
async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = metrics::status_class(response.status().as_u16());
    ::metrics::counter!(metrics::REQUESTS_TOTAL, "route" => route.clone(), "status" => status)
        .increment(1);
    ::metrics::histogram!(metrics::REQUEST_DURATION_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("No such endpoint.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This endpoint does not support this method.",
    )
}

/// `/health`: the process is up (503 while draining).
async fn health(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

/// `/ready`: Postgres answers, NATS is connected and the sink is healthy.
async fn ready(State(state): State<AppState>) -> Response {
    let mut down = serde_json::Map::new();
    let pg = async {
        let client = state.pool().get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), pg).await {
        Ok(Ok(())) => {}
        // Details stay in the log; the body names the dependency only.
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "Readiness: Postgres is down.");
            down.insert("postgres".into(), "unreachable".into());
        }
        Err(_) => {
            down.insert("postgres".into(), "timed out".into());
        }
    }
    if state.nats().connection_state() != async_nats::connection::State::Connected {
        down.insert("nats".into(), "not connected".into());
    }
    if !state.pipeline().is_healthy() {
        down.insert("sink".into(), "not healthy".into());
    }
    if state.is_draining() {
        down.insert("process".into(), "draining".into());
    }
    if down.is_empty() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "down": down})),
        )
            .into_response()
    }
}

/// `/metrics`: Prometheus text exposition of every metric of the process.
async fn render_metrics(State(state): State<AppState>) -> Response {
    let handle = state.metrics();
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}
