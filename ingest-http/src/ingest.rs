//! `POST /api/v1/telemetry/ingest`: one reading, or a batch (JSON array), authenticated
//! by the device's `X-API-Key`.
//!
//! Checks, in order (the first failure answers; nothing is stored for any of them):
//! 1. A request slot (`--max-in-flight-requests`) → else 503 `overloaded`, `Retry-After`.
//! 2. `X-API-Key` ([`crate::auth`]): missing → 401; malformed, unknown, revoked or
//!    expired → 403; the key's device unknown or not `active` → 403. A key this
//!    process does not know yet first passes the per-address limiter → else 429.
//! 3. Per-device rate limit → 429 with `Retry-After`.
//! 4. `Content-Type: application/json` → else 415; a bad `Idempotency-Key` → 400.
//! 5. Body size: `Content-Length` over the limit → 413; its bytes from the in-flight
//!    budget (`--max-in-flight-bytes`) → else 503 `overloaded`; then while reading → 413.
//! 6. JSON and fields, the whole batch before anything is stored → 400 naming the field.
//! 7. Every reading's `deviceId` equals the key's device → else 403.
//! 8. Per reading ([`crate::readings`]): its message id; its size as stored and its
//!    envelope against NATS → 413 `reading_too_large` naming it; a batch naming one id
//!    twice → 422 `duplicate_message_id` naming both readings.
//! 9. The unit goes to the sink and the request waits until it is durable in Postgres
//!    and acknowledged by JetStream (bounded by the durability timeout); sink failure or
//!    timeout → 503; the sink's verdict per reading ([`crate::outcome`]) → 200 (with
//!    `duplicate` flags), 409 `id_conflict` or 422 `unstorable`.
//!
//! A request refused in steps 1–4 has its body read and discarded ([`drain`]), so its
//! keep-alive connection stays usable.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use chrono::Utc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admission::Slot;
use crate::auth::{authenticate, Caller};
use crate::error::ApiError;
use crate::metrics::{reject, Rejection};
use crate::openapi::{ErrorBody, IngestBody};
use crate::outcome::{self, Accepted, Sent};
use crate::ratelimit::retry_after_secs;
use crate::readings::{self, Context};
use crate::request::{self, check_supplied_id, Shape};
use crate::state::AppState;

pub use crate::auth::API_KEY_HEADER;
/// The idempotency header.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The ingest route, with its state applied (merged by [`crate::build_app_and_document`]).
pub fn router(state: &AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(ingest))
        .with_state(state.clone())
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

fn too_large(limit: usize) -> ApiError {
    reject(
        Rejection::PayloadTooLarge,
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("The request body is larger than {limit} bytes."),
        ),
    )
}

/// The body's declared length, if any.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// How long a refused request's body is read before its connection closes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads and discards the body of a request refused before its body was read: up to
/// `limit` bytes, for at most [`DRAIN_TIMEOUT`], and nothing if it declares more.
/// With the body unread, hyper closes the connection after the answer without a
/// `Connection: close`, and a client that reuses it loses its next request (Python's
/// requests with 200 kB bodies and a bad key: every other one). Read, the connection
/// stays usable.
async fn drain(headers: &HeaderMap, body: Body, limit: usize) {
    use futures::StreamExt;
    if content_length(headers).is_some_and(|n| n > limit as u64) {
        return;
    }
    let mut chunks = body.into_data_stream();
    let read = async {
        let mut read = 0;
        while let Some(Ok(chunk)) = chunks.next().await {
            read += chunk.len();
            if read > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, read).await;
}

/// Reads at most `limit` bytes, holding them in the in-flight byte budget: the
/// returned permit goes with the request until it is answered.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<(Vec<u8>, crate::admission::BodyBytes), ApiError> {
    let declared = content_length(headers);
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    // Config keeps the body limit within u32; without a length, count the whole limit.
    let charge = declared.map_or(limit as u64, |n| n.min(limit as u64));
    let held = state
        .admission()
        .try_bytes(u32::try_from(charge).unwrap_or(u32::MAX))?;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes.to_vec(),
        Err(e) => {
            // `to_bytes` fails either on the limit or on a broken connection; the limit is
            // the only one a client can act on, and a broken client reads no answer anyway.
            tracing::debug!(error = %e, "Could not read a request body.");
            return Err(too_large(limit));
        }
    };
    Ok((bytes, held))
}

/// `POST /api/v1/telemetry/ingest`
#[utoipa::path(
    post,
    path = "/api/v1/telemetry/ingest",
    tag = "ingest",
    security(("apiKey" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,200}$",
         description = "Seeds the message ids: a single reading's is the key, reading `i` of a \
            batch the key, NUL, `i`. 1 to 200 visible ASCII characters (else 400 `invalid_header`).")
    ),
    request_body(content = IngestBody, content_type = "application/json",
        description = "One reading, or an array of 1 to --max-batch-readings readings."),
    responses(
        (status = 200, description = "Every reading is committed in Postgres and acknowledged \
            by JetStream (`duplicate`: it was already stored with the same content).", body = Accepted),
        (status = 400, description = "`invalid_body` (malformed JSON, a repeated key, a wrong, \
            missing or unknown field, an empty or too long batch; the message starts with the \
            field's path) or `invalid_header` (Idempotency-Key). Nothing stored.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no X-API-Key.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the key is malformed, unknown, revoked or \
            expired; its device is unknown or not active; a reading's deviceId is not the key's \
            device. Nothing stored.", body = ErrorBody),
        (status = 409, description = "`id_conflict`: a reading's message id is stored with \
            other content; it is dead-lettered, the batch's other readings are stored \
            (`error.details.conflicts`, `error.details.messageIds`).", body = ErrorBody),
        (status = 413, description = "`payload_too_large` (body over --body-limit) or \
            `reading_too_large` (one reading over --max-reading-bytes, or its envelope over \
            NATS's max_payload). Nothing stored.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: Content-Type is not \
            application/json. Nothing stored.", body = ErrorBody),
        (status = 422, description = "`duplicate_message_id` (a batch names one message id \
            twice; nothing stored) or `unstorable` (Postgres refused readings for a data \
            reason; they are dead-lettered, the others stored).", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the device's rate limit, or the client \
            address's key look-up limit. Nothing stored.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry may pass."))),
        (status = 503, description = "`overloaded` (in-flight requests or bytes) or \
            `unavailable` (Postgres or NATS down or slow, the sink full, shutting down). The \
            readings may still land: retry with the same body or Idempotency-Key.",
            body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait.")))
    )
)]
pub async fn ingest(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let peer: Option<IpAddr> = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let (_slot, caller, idempotency_key) = match admit(&state, &headers, peer).await {
        Ok(admitted) => admitted,
        Err(e) => {
            drain(&headers, body, state.limits().body_limit).await;
            return Err(e);
        }
    };
    let limits = state.limits();
    let (bytes, _held) = read_body(&state, &headers, body, limits.body_limit).await?;
    let received_at = Utc::now();
    let (shape, parsed) = request::parse_body(&bytes, limits.max_batch_readings).map_err(|e| {
        reject(
            Rejection::InvalidBody,
            ApiError::bad_request("invalid_body", e.to_string()),
        )
    })?;
    drop(bytes);

    if let Some(i) = parsed.iter().position(|r| r.device_id != caller.device_id) {
        let path = match shape {
            Shape::Single => "deviceId".to_string(),
            Shape::Batch => format!("[{i}].deviceId"),
        };
        return Err(reject(
            Rejection::DeviceMismatch,
            ApiError::forbidden(format!("{path}: does not match the API key's device.")),
        ));
    }

    let cx = Context {
        caller: &caller,
        shape,
        idempotency_key: idempotency_key.as_deref(),
        received_at,
    };
    let unit = readings::build(cx, parsed, limits, state.publish_limits())?;
    let sent = Sent::of(shape, &unit);

    let started = Instant::now();
    match state
        .submitter()
        .submit(unit.readings, limits.durability_timeout)
        .await
    {
        Ok(delivered) => outcome::respond(&sent, &delivered),
        Err(e) => {
            tracing::warn!(device_id = %caller.device_id, readings = sent.ids.len(), waited_ms = started.elapsed().as_millis() as u64, error = %e, "Readings not confirmed durable; answering 503.");
            Err(reject(Rejection::Unavailable, ApiError::unavailable()))
        }
    }
}

/// Steps 1–4: what is decided before the body is read.
async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<(Slot, Caller, Option<String>), ApiError> {
    let slot = state.admission().try_request()?;
    let caller = authenticate(state, headers, peer).await?;
    state.usage().touch(caller.key_id);

    if let Err(wait) = state.limiter().check(caller.device_id) {
        return Err(reject(
            Rejection::RateLimited,
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests for this device; slow down.",
            )
            .with_retry_after(retry_after_secs(wait)),
        ));
    }

    if !is_json(headers) {
        return Err(reject(
            Rejection::UnsupportedMediaType,
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type must be application/json.",
            ),
        ));
    }

    let idempotency_key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(v) => {
            let key = v.to_str().ok().map(str::trim).unwrap_or("");
            if let Err(problem) = check_supplied_id(key) {
                return Err(reject(
                    Rejection::InvalidBody,
                    ApiError::bad_request(
                        "invalid_header",
                        format!("Idempotency-Key header: {problem}"),
                    ),
                ));
            }
            Some(key.to_owned())
        }
    };
    Ok((slot, caller, idempotency_key))
}
