//! `argus-ingest-http`: the HTTP sidecar. Devices that cannot speak MQTT send telemetry
//! with an API key; it goes through the shared pipeline's sink ([`argus_pipeline`]), so
//! an HTTP reading is checked, stored and published exactly like an MQTT one. Operators
//! manage API keys and certificates.
//!
//! Layout:
//! - [`config`]: flags with env twins (the shared blocks of [`argus_pipeline::flags`]
//!   plus the sidecar's own), validated into [`config::Config`].
//! - [`state`]: shared state (the look-up and sink Postgres pools, NATS and its publish
//!   limits, registry, sink, limits, the certificate API's [`state::CertState`]) and
//!   start-up (refused when `--max-reading-bytes` cannot fit NATS's `max_payload`).
//! - [`ingest`]: `POST /api/v1/telemetry/ingest` (the order of checks, the handler).
//! - [`admission`]: the in-flight request and body-byte budgets (503 `overloaded`).
//! - [`auth`]: the API-key look-up and the pre-auth protection in front of it (the
//!   per-address limiter; unknown keys never reach the registry).
//! - [`preauth`]: the pre-auth state: digests known to exist, known absent, and the
//!   per-address limiter.
//! - [`request`]: the body's readings, validated with field paths.
//! - [`readings`]: validated readings → the sink unit (message ids, per-reading size
//!   checks, a batch's repeated id).
//! - [`outcome`]: the sink's verdict → the answer (200 with `duplicate`, 409
//!   `id_conflict`, 422 `unstorable`).
//! - [`submit`]: [`submit::Submitter`], one request = one sink unit, bounded by the
//!   durability timeout.
//! - [`apikey`]: key format, generation (OS CSPRNG) and SHA-256 digest.
//! - [`keys`]: admin endpoints to create, list and revoke API keys.
//! - [`certificates`]: the device certificate API (issue, revoke with the EMQX kick,
//!   CRL), with `--pki-dir`.
//! - [`crl`]: re-signs the CRL past `--crl-max-age`; its age as a metric.
//! - [`admin`]: what operator endpoints share: the admin bearer-token check, the
//!   device id in the path, the JSON object body.
//! - [`health`]: `/health`, `/ready` and `/metrics`.
//! - [`openapi`]: the OpenAPI 3.1 document, generated from the routes' annotations
//!   (the router and the document come from one route list), served at `/openapi.json`.
//! - [`ratelimit`]: keyed rate limits, per device and per client address (`governor`'s
//!   keyed GCRA limiter).
//! - [`usage`]: throttled background `last_used_at` updates.
//! - [`metrics`]: the sidecar's metric names and their `# HELP` text; `/metrics`
//!   renders them.
//! - [`error`]: the stable JSON error body every endpoint returns.
//!
//! - [`tls`]: the device listener's TLS (rustls), its certificate reloaded on SIGHUP.
//! - [`emqx`]: the EMQX kick of a revoked device's live connection (`--emqx-api-url`).
//!
//! Two listeners ([`Side`]): the device listener ([`build_device_app`]: ingest and
//! `/health`, TLS) and the admin listener ([`build_admin_app`]: everything else, on an
//! internal address). Entry points: those two routers and [`serve`] (run both on their
//! [`Listeners`] until a shutdown future completes, then drain the sink). The binary
//! only parses flags and calls them, so tests run the real server in-process.

pub mod admin;
pub mod admission;
pub mod apikey;
pub mod auth;
pub mod certificates;
pub mod config;
pub mod crl;
pub mod emqx;
pub mod error;
pub mod health;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod outcome;
pub mod preauth;
pub mod ratelimit;
pub mod readings;
pub mod request;
pub mod state;
pub mod submit;
pub mod tls;
pub mod usage;

use std::future::Future;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use utoipa_axum::router::OpenApiRouter;

pub use config::{Cli, Config, Limits};
pub use openapi::Side;
pub use state::{AppState, StartError};

use crate::error::ApiError;

/// The device listener's router: `POST /api/v1/telemetry/ingest`, `/health` and its
/// own `/openapi.json`; any other path (every admin path) is the JSON 404.
pub fn build_device_app(state: AppState) -> Router {
    build_app_and_document(state, Side::Device).0
}

/// The admin listener's router: API keys, certificates and the CRL, `/health`,
/// `/ready`, `/metrics` and its own `/openapi.json`.
pub fn build_admin_app(state: AppState) -> Router {
    build_app_and_document(state, Side::Admin).0
}

/// One listener's router, and the OpenAPI document of exactly its routes (what its
/// `/openapi.json` serves). Every route is mounted through [`OpenApiRouter::routes`],
/// so the router and the document come from one list; the document is rendered once,
/// here. Then the JSON 404 and 405 fallbacks and the request metrics, which apply to
/// all of them.
pub fn build_app_and_document(state: AppState, side: Side) -> (Router, utoipa::openapi::OpenApi) {
    let document = openapi::Document::default();
    let routes = OpenApiRouter::with_openapi(openapi::ApiDoc::for_side(side));
    let routes = match side {
        Side::Device => routes
            .merge(ingest::router(&state))
            .merge(health::device_router(&state)),
        Side::Admin => routes
            .merge(keys::router(&state))
            .merge(certificates::router(&state))
            .merge(health::router(&state)),
    };
    let (router, api) = routes.merge(openapi::router(&document)).split_for_parts();
    let api = openapi::finish(api, state.limits(), side);
    document.set(&api);
    let router = router
        .fallback(not_found)
        // After the merges: it applies to the routes registered so far.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track));
    (router, api)
}

/// The device listener: plain TCP (loopback, or `--insecure-http`) or TLS.
pub enum DeviceListener {
    Plain(tokio::net::TcpListener),
    Tls(tls::TlsListener),
}

impl DeviceListener {
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            DeviceListener::Plain(l) => l.local_addr(),
            DeviceListener::Tls(l) => axum::serve::Listener::local_addr(l),
        }
    }
}

/// Both listeners of one sidecar.
pub struct Listeners {
    pub device: DeviceListener,
    pub admin: tokio::net::TcpListener,
}

/// Serves the device and admin routers on their listeners until `shutdown` completes:
/// both stop accepting, in-flight requests finish, then the sink flushes and stops.
/// `/health` answers 503 from the moment the shutdown begins. Each request carries its
/// peer address (the pre-auth limiter's key).
pub async fn serve(
    listeners: Listeners,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    use std::net::SocketAddr;

    let device_app =
        build_device_app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let admin_app =
        build_admin_app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let draining = state.clone();
    let signal = async move {
        shutdown.await;
        draining.set_draining();
        tracing::info!("Shutting down: finishing in-flight requests.");
        let _ = stop_tx.send(true);
    };
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let device = async {
        match listeners.device {
            DeviceListener::Plain(l) => {
                axum::serve(l, device_app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .await
            }
            DeviceListener::Tls(l) => {
                // `tap_io` also gives the TLS stream axum's `ConnectInfo<SocketAddr>`.
                let l = l.tap_io(|tls| {
                    let _ = tls.get_ref().0.set_nodelay(true);
                });
                axum::serve(l, device_app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .await
            }
        }
    };
    let admin =
        axum::serve(listeners.admin, admin_app).with_graceful_shutdown(stopped(stop_rx.clone()));
    let ((), device, admin) = tokio::join!(signal, device, admin);
    state
        .submitter()
        .close(state.config().shutdown_timeout)
        .await;
    tracing::info!("Sink closed.");
    device.and(admin)
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
