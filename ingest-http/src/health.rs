//! The operational endpoints, open to every caller (no key, no token):
//!
//! - `GET /health`: the process is up, `{"status": "ok"}`; 503 `{"status": "draining"}`
//!   from the moment shutdown begins.
//! - `GET /ready`: Postgres answers, NATS is connected and the sink is healthy,
//!   `{"ready": true}`; otherwise 503 `{"ready": false, "down": {...}}` naming each
//!   dependency that is down (details stay in the log).
//! - `GET /metrics`: Prometheus text exposition of every metric of the process.
//!
//! All three are on the admin listener; the device listener has `/health` only
//! ([`device_router`]). `GET /openapi.json` (each listener's document) is
//! [`crate::openapi`]'s.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

/// The device listener's part: `/health` alone (load balancers and the container's
/// health check); merged by [`crate::build_device_app`].
pub fn device_router(state: &AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(health))
        .with_state(state.clone())
}

/// The health, readiness and metrics routes, with their state applied (merged by
/// [`crate::build_admin_app`]).
pub fn router(state: &AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(render_metrics))
        .with_state(state.clone())
}

/// `/health`'s body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `draining` once shutdown began.
    #[schema(pattern = "^(ok|draining)$")]
    pub status: &'static str,
}

/// `/ready`'s body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
    /// When not ready: each dependency that is down (`postgres`, `nats`, `sink`,
    /// `process`) and why, in a word (details stay in the log).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub down: Option<BTreeMap<&'static str, &'static str>>,
}

/// `GET /health`: the process is up (503 while draining).
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "Up: `{\"status\": \"ok\"}`.", body = Health),
        (status = 503, description = "Shutting down: `{\"status\": \"draining\"}`.", body = Health)
    )
)]
pub async fn health(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health { status: "draining" }),
        )
            .into_response()
    } else {
        Json(Health { status: "ok" }).into_response()
    }
}

/// `GET /ready`: Postgres answers, NATS is connected and the sink is healthy.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: `{\"ready\": true}`.", body = Ready),
        (status = 503, description = "Not ready: `{\"ready\": false, \"down\": {...}}`.", body = Ready)
    )
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    let mut down = BTreeMap::new();
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
            down.insert("postgres", "unreachable");
        }
        Err(_) => {
            down.insert("postgres", "timed out");
        }
    }
    if state.nats().connection_state() != async_nats::connection::State::Connected {
        down.insert("nats", "not connected");
    }
    if !state.submitter().is_healthy() {
        down.insert("sink", "not healthy");
    }
    if state.is_draining() {
        down.insert("process", "draining");
    }
    if down.is_empty() {
        Json(Ready {
            ready: true,
            down: None,
        })
        .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Ready {
                ready: false,
                down: Some(down),
            }),
        )
            .into_response()
    }
}

/// `GET /metrics`: Prometheus text exposition of every metric of the process.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition (version 0.0.4).",
         content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)
    )
)]
pub async fn render_metrics(State(state): State<AppState>) -> Response {
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
