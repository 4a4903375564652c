//! The operational endpoints, open to every caller (no key, no token):
//!
//! - `GET /health`: the process is up, `{"status": "ok"}`; 503 `{"status": "draining"}`
//!   from the moment shutdown begins.
//! - `GET /ready`: Postgres answers, NATS is connected and the sink is healthy,
//!   `{"ready": true}`; otherwise 503 `{"ready": false, "down": {...}}` naming each
//!   dependency that is down (details stay in the log).
//! - `GET /metrics`: Prometheus text exposition of every metric of the process.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::state::AppState;

/// The health, readiness and metrics routes, with their state applied (merged by
/// [`crate::build_app`]).
pub fn router(state: &AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(state.clone())
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
    if !state.submitter().is_healthy() {
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
