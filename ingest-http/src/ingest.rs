//! `POST /api/v1/telemetry/ingest`: one reading, or a batch (JSON array), authenticated
//! by the device's `X-API-Key`.
//!
//! Checks, in order (the first failure answers; nothing is stored for any of them):
//! 1. `X-API-Key`: missing → 401; malformed, unknown, revoked or expired → 403;
//!    the key's device unknown or not `active` → 403.
//! 2. Per-device rate limit → 429 with `Retry-After`.
//! 3. `Content-Type: application/json` → else 415.
//! 4. Body size (`Content-Length` first, then while reading) → 413.
//! 5. JSON and fields, the whole batch before anything is stored → 400 naming the field.
//! 6. Every reading's `deviceId` equals the key's device → else 403.
//! 7. Message ids; the unit goes to the sink and the request waits until it is durable in
//!    Postgres and acknowledged by JetStream (bounded by the durability timeout) → 200;
//!    sink failure or timeout → 503.
//!
//! Message id of each reading: the pipeline's rules, shared with the MQTT bridge
//! ([`Checked::for_device`], which calls
//! [`argus_pipeline::message_id::derive`]): the `Idempotency-Key` header if present (a
//! batch's reading `i` uses `<key>/<i>`), else the reading's `messageId` field, else the
//! hash of the device's canonical topic `devices/<id>/telemetry` and the reading's
//! compact JSON (the stored payload). A retry therefore gets the same id and is stored once.

use std::time::Instant;

use argus_pipeline::reading::{Checked, Reading, Source};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use crate::apikey;
use crate::error::ApiError;
use crate::metrics::{self as m, Rejection};
use crate::ratelimit::retry_after_secs;
use crate::request::{self, check_supplied_id, Shape};
use crate::state::AppState;
use crate::submit::SubmitError;

/// The API key header.
pub const API_KEY_HEADER: &str = "x-api-key";
/// The idempotency header.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The ingest route, with its state applied (merged by [`crate::build_app`]).
pub fn router(state: &AppState) -> Router {
    Router::new()
        .route("/api/v1/telemetry/ingest", post(ingest))
        .with_state(state.clone())
}

fn reject(reason: Rejection, error: ApiError) -> ApiError {
    m::rejected(reason);
    error
}

fn invalid_key() -> ApiError {
    // One message for every kind of bad key: the caller learns nothing about which keys exist.
    reject(
        Rejection::InvalidKey,
        ApiError::forbidden("The API key is not valid for this request."),
    )
}

/// The authenticated caller: the key's id and its device.
struct Caller {
    key_id: Uuid,
    device_id: Uuid,
    tenant_id: Uuid,
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(API_KEY_HEADER) else {
        return Err(reject(
            Rejection::MissingKey,
            ApiError::unauthorized("An X-API-Key header is required."),
        ));
    };
    let presented = value.to_str().map_err(|_| invalid_key())?.trim();
    let digest = apikey::parse_presented(presented).ok_or_else(invalid_key)?;
    let info = match state.registry().api_key(&digest).await {
        Ok(Some(info)) => info,
        Ok(None) => return Err(invalid_key()),
        Err(e) => {
            tracing::warn!(error = %e, "API key look-up failed.");
            return Err(reject(Rejection::Unavailable, ApiError::unavailable()));
        }
    };
    if !info.is_valid_at(Utc::now()) {
        return Err(invalid_key());
    }
    let device = match state.registry().device(info.device_id).await {
        Ok(Some(device)) => device,
        Ok(None) => return Err(invalid_key()),
        Err(e) => {
            tracing::warn!(error = %e, "Device look-up failed.");
            return Err(reject(Rejection::Unavailable, ApiError::unavailable()));
        }
    };
    if !device.is_active() {
        return Err(reject(
            Rejection::DeviceNotActive,
            ApiError::forbidden("The device is not active."),
        ));
    }
    Ok(Caller {
        key_id: info.key_id,
        device_id: device.device_id,
        tenant_id: device.tenant_id,
    })
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

async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            // `to_bytes` fails either on the limit or on a broken connection; the limit is
            // the only one a client can act on, and a broken client reads no answer anyway.
            tracing::debug!(error = %e, "Could not read a request body.");
            Err(too_large(limit))
        }
    }
}

/// `POST /api/v1/telemetry/ingest`
pub async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers).await?;
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

    if !is_json(&headers) {
        return Err(reject(
            Rejection::UnsupportedMediaType,
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type must be application/json.",
            ),
        ));
    }

    let limits = state.limits();
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

    let bytes = read_body(&headers, body, limits.body_limit).await?;
    let received_at = Utc::now();
    let (shape, readings) =
        request::parse_body(&bytes, limits.max_batch_readings).map_err(|e| {
            reject(
                Rejection::InvalidBody,
                ApiError::bad_request("invalid_body", e.to_string()),
            )
        })?;

    if let Some(i) = readings
        .iter()
        .position(|r| r.device_id != caller.device_id)
    {
        let path = match shape {
            Shape::Single => "deviceId".to_string(),
            Shape::Batch => format!("[{i}].deviceId"),
        };
        return Err(reject(
            Rejection::DeviceMismatch,
            ApiError::forbidden(format!("{path}: does not match the API key's device.")),
        ));
    }

    let payload_limits = argus_pipeline::reading::Limits {
        max_payload_bytes: limits.body_limit,
    };
    let mut unit = Vec::with_capacity(readings.len());
    for (i, r) in readings.into_iter().enumerate() {
        // The stored payload and the id's hash input: the reading object, compact.
        // Serializing a map of JSON values cannot fail.
        let payload = serde_json::to_vec(&r.object).unwrap_or_default();
        let supplied = match (&idempotency_key, shape) {
            (Some(key), Shape::Single) => Some(key.clone()),
            (Some(key), Shape::Batch) => Some(format!("{key}/{i}")),
            (None, _) => None,
        };
        // The pipeline's checks and id rules, the same as the MQTT bridge's, so HTTP and
        // MQTT agree exactly.
        let checked = Checked::for_device(
            caller.device_id,
            &payload,
            supplied.as_deref(),
            &payload_limits,
        )
        .map_err(|e| {
            let at = match shape {
                Shape::Single => String::new(),
                Shape::Batch => format!("[{i}]."),
            };
            reject(
                Rejection::InvalidBody,
                ApiError::bad_request("invalid_body", format!("{at}{}", e.detail)),
            )
        })?;
        unit.push(Reading::from_checked(
            checked,
            caller.tenant_id,
            Bytes::from(payload),
            received_at,
            Source::Http,
            None,
            None,
        ));
    }
    let ids: Vec<Uuid> = unit.iter().map(|r| r.message_id).collect();

    let started = Instant::now();
    if let Err(e) = state
        .submitter()
        .submit(unit, limits.durability_timeout)
        .await
    {
        if let SubmitError::DeadLettered(refused) = &e {
            tracing::warn!(device_id = %caller.device_id, refused = refused.len(), "Postgres refused readings; they are in the dead-letter stream.");
            return Err(reject(
                Rejection::InvalidBody,
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unstorable",
                    format!(
                        "{} of {} readings could not be stored and were dead-lettered.",
                        refused.len(),
                        ids.len()
                    ),
                ),
            ));
        }
        tracing::warn!(device_id = %caller.device_id, readings = ids.len(), waited_ms = started.elapsed().as_millis() as u64, error = %e, "Readings not confirmed durable; answering 503.");
        return Err(reject(Rejection::Unavailable, ApiError::unavailable()));
    }
    metrics::counter!(m::READINGS_ACCEPTED_TOTAL).increment(ids.len() as u64);

    let body = match shape {
        Shape::Single => json!({"success": true, "messageId": ids[0]}),
        Shape::Batch => json!({"success": true, "messageIds": ids}),
    };
    Ok(Json(body).into_response())
}
