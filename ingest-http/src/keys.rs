//! Admin API for device API keys (admin bearer token required):
//!
//! - `POST   /api/v1/devices/{deviceId}/api-keys` (optional `{"expiresInDays": N}`):
//!   creates a key and returns it **once** (201), with its id and prefix;
//! - `GET    /api/v1/devices/{deviceId}/api-keys`: ids, prefixes and times, never a key;
//! - `DELETE /api/v1/devices/{deviceId}/api-keys/{keyId}`: revokes it, then publishes a
//!   registry invalidation so every sidecar refuses the key at once.
//!
//! Unknown device or key: 404. Several active keys per device are allowed (rotation:
//! create the new key, deploy it, revoke the old one).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::admin::{body_bytes, body_object, parse_device_id, path_segments};
use crate::apikey::ApiKey;
use crate::error::ApiError;
use crate::metrics as m;
use crate::openapi::{AdminRefusals, ErrorBody};
use crate::state::AppState;

const NO_DEVICE: &str = "No device with this id.";

/// Longest key lifetime accepted in `expiresInDays` (10 years).
const MAX_EXPIRES_IN_DAYS: i64 = 3650;

/// The API-key routes, with their state applied (merged by [`crate::build_app_and_document`]).
pub fn router(state: &AppState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(revoke))
        .with_state(state.clone())
}

/// `POST .../api-keys` body (optional; empty = `{}`).
// `deny_unknown_fields` and the renames shape the schema (`additionalProperties: false`,
// camelCase names): the body is read by hand, refusing unknown fields.
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = CreateApiKeyRequest)]
#[allow(dead_code)] // A schema only: `parse_create_body` reads the body.
pub struct CreateRequest {
    /// Days until the key expires, 1 to 3650; absent or `null`: never.
    #[schema(minimum = 1, maximum = 3650, value_type = Option<i64>)]
    expires_in_days: Option<i64>,
}

/// `POST .../api-keys` answer: the key, shown this once.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    /// Always `true`.
    pub success: bool,
    pub id: Uuid,
    pub device_id: Uuid,
    /// `argus_<8 hex>`: what operators and logs see.
    pub prefix: String,
    /// `argus_<8 hex>_<43 base64url>`; only its digest is stored.
    pub key: String,
    pub created_at: DateTime<Utc>,
    /// `null`: never expires.
    #[schema(required = true)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// One key of a device, never the key itself.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: Uuid,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    #[schema(required = true)]
    pub last_used_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub expires_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// Neither revoked nor expired.
    pub active: bool,
}

/// `GET .../api-keys` answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyList {
    /// Always `true`.
    pub success: bool,
    pub device_id: Uuid,
    /// In creation order.
    pub keys: Vec<KeyInfo>,
}

/// `DELETE .../api-keys/{keyId}` answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokedKey {
    /// Always `true`.
    pub success: bool,
    pub id: Uuid,
    pub device_id: Uuid,
    /// The first revocation's time (a repeated DELETE keeps it).
    pub revoked_at: DateTime<Utc>,
}

async fn device_exists(
    client: &deadpool_postgres::Client,
    device_id: Uuid,
) -> Result<bool, ApiError> {
    let row = client
        .query_opt("SELECT 1 FROM devices WHERE id = $1", &[&device_id])
        .await?;
    Ok(row.is_some())
}

/// `{"expiresInDays": N}`; an empty body means no expiry.
fn parse_create_body(body: &[u8]) -> Result<Option<i64>, ApiError> {
    let map = body_object(body, &["expiresInDays"])?;
    match map.get("expiresInDays") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(days) if (1..=MAX_EXPIRES_IN_DAYS).contains(&days) => Ok(Some(days)),
            _ => Err(ApiError::bad_request(
                "invalid_body",
                format!("expiresInDays: must be a whole number from 1 to {MAX_EXPIRES_IN_DAYS}"),
            )),
        },
    }
}

/// `POST /api/v1/devices/{deviceId}/api-keys`
#[utoipa::path(
    post,
    path = "/api/v1/devices/{deviceId}/api-keys",
    tag = "api-keys",
    security(("adminToken" = [])),
    params(("deviceId" = Uuid, Path, description = "The device's id.")),
    request_body(content = Option<CreateRequest>, content_type = "application/json",
        description = "Optional; an empty body means no expiry."),
    responses(
        (status = 201, description = "Created; the key is in this answer only.", body = CreatedKey),
        (status = 400, description = "`invalid_body`: malformed JSON, not an object, an unknown \
            field, or expiresInDays out of range.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: a body over 2 MiB.", body = ErrorBody),
        AdminRefusals,
        (status = 404, description = "`not_found`: no such device (or the id is not a UUID).", body = ErrorBody),
        (status = 500, description = "`internal`: a bug (no details).", body = ErrorBody),
        (status = 503, description = "`unavailable`: Postgres is down or slow.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait.")))
    )
)]
pub async fn create(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.admin().check(&headers)?;
    let device_id = parse_device_id(&path_segments(path, NO_DEVICE)?)?;
    let expires_in_days = parse_create_body(&body_bytes(body)?)?;
    let client = state.admin_pool().get().await?;
    if !device_exists(&client, device_id).await? {
        return Err(ApiError::not_found("No device with this id."));
    }
    let key = ApiKey::generate().map_err(|e| {
        tracing::error!(error = %e, "The OS random number generator failed.");
        ApiError::internal()
    })?;
    let digest = key.digest();
    let row = client
        .query_one(
            "INSERT INTO device_api_keys (device_id, prefix, key_digest, expires_at) \
             VALUES ($1, $2, $3, now() + $4::bigint * interval '1 day') \
             RETURNING id, created_at, expires_at",
            &[&device_id, &key.prefix(), &&digest[..], &expires_in_days],
        )
        .await?;
    let id: Uuid = row.get(0);
    let created_at: DateTime<Utc> = row.get(1);
    let expires_at: Option<DateTime<Utc>> = row.get(2);
    metrics::counter!(m::API_KEY_ADMIN_TOTAL, "action" => "create").increment(1);
    tracing::info!(%device_id, key_id = %id, prefix = key.prefix(), "Created an API key.");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            success: true,
            id,
            device_id,
            prefix: key.prefix().to_owned(),
            key: key.expose().to_owned(),
            created_at,
            expires_at,
        }),
    )
        .into_response())
}

/// `GET /api/v1/devices/{deviceId}/api-keys`
#[utoipa::path(
    get,
    path = "/api/v1/devices/{deviceId}/api-keys",
    tag = "api-keys",
    security(("adminToken" = [])),
    params(("deviceId" = Uuid, Path, description = "The device's id.")),
    responses(
        (status = 200, description = "The device's keys (ids, prefixes, times).", body = KeyList),
        AdminRefusals,
        (status = 404, description = "`not_found`: no such device (or the id is not a UUID).", body = ErrorBody),
        (status = 500, description = "`internal`: a bug (no details).", body = ErrorBody),
        (status = 503, description = "`unavailable`: Postgres is down or slow.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait.")))
    )
)]
pub async fn list(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.admin().check(&headers)?;
    let device_id = parse_device_id(&path_segments(path, NO_DEVICE)?)?;
    let client = state.admin_pool().get().await?;
    if !device_exists(&client, device_id).await? {
        return Err(ApiError::not_found("No device with this id."));
    }
    let rows = client
        .query(
            "SELECT id, prefix, created_at, last_used_at, expires_at, revoked_at \
             FROM device_api_keys WHERE device_id = $1 ORDER BY created_at, id",
            &[&device_id],
        )
        .await?;
    let now = Utc::now();
    let keys: Vec<KeyInfo> = rows
        .iter()
        .map(|r| {
            let expires_at: Option<DateTime<Utc>> = r.get(4);
            let revoked_at: Option<DateTime<Utc>> = r.get(5);
            KeyInfo {
                id: r.get(0),
                prefix: r.get(1),
                created_at: r.get(2),
                last_used_at: r.get(3),
                expires_at,
                revoked_at,
                active: revoked_at.is_none() && expires_at.is_none_or(|t| t > now),
            }
        })
        .collect();
    Ok(Json(KeyList {
        success: true,
        device_id,
        keys,
    })
    .into_response())
}

/// `DELETE /api/v1/devices/{deviceId}/api-keys/{keyId}`
///
/// Idempotent: revoking a revoked key keeps its first revocation time and publishes
/// the invalidation again (so a retry after a failed publish is the fix).
#[utoipa::path(
    delete,
    path = "/api/v1/devices/{deviceId}/api-keys/{keyId}",
    tag = "api-keys",
    security(("adminToken" = [])),
    params(("deviceId" = Uuid, Path, description = "The device's id."), ("keyId" = Uuid, Path, description = "The key's id (not the key).")),
    responses(
        (status = 200, description = "Revoked (again: the same answer).", body = RevokedKey),
        AdminRefusals,
        (status = 404, description = "`not_found`: no such device, or no such key of this device.", body = ErrorBody),
        (status = 500, description = "`internal`: a bug (no details).", body = ErrorBody),
        (status = 503, description = "`unavailable`: Postgres is down or slow, or the key is \
            revoked but the invalidation could not be published yet (retry the DELETE).",
            body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait.")))
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.admin().check(&headers)?;
    let (device_id, key_id) = path_segments(path, "No API key with this id for this device.")?;
    let device_id = parse_device_id(&device_id)?;
    let key_id =
        Uuid::parse_str(&key_id).map_err(|_| ApiError::not_found("No API key with this id."))?;
    let client = state.admin_pool().get().await?;
    let row = client
        .query_opt(
            "UPDATE device_api_keys SET revoked_at = COALESCE(revoked_at, now()) \
             WHERE id = $1 AND device_id = $2 RETURNING key_digest, revoked_at",
            &[&key_id, &device_id],
        )
        .await?;
    let Some(row) = row else {
        return Err(ApiError::not_found(
            "No API key with this id for this device.",
        ));
    };
    let digest: Vec<u8> = row.get(0);
    let revoked_at: DateTime<Utc> = row.get(1);
    // The revocation is committed; now make every process forget its cached copy.
    if let Err(e) = state.invalidate_api_key(&digest).await {
        tracing::warn!(%device_id, %key_id, error = %e, "Revoked an API key but could not publish the invalidation; caches expire it later. Retry the DELETE.");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "The key is revoked, but other processes could not be told yet; retry the request.",
        )
        .with_retry_after(1));
    }
    metrics::counter!(m::API_KEY_ADMIN_TOTAL, "action" => "revoke").increment(1);
    tracing::info!(%device_id, %key_id, "Revoked an API key.");
    Ok(Json(RevokedKey {
        success: true,
        id: key_id,
        device_id,
        revoked_at,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body() {
        assert_eq!(parse_create_body(b"").unwrap(), None);
        assert_eq!(parse_create_body(b" {} ").unwrap(), None);
        assert_eq!(
            parse_create_body(br#"{"expiresInDays": 30}"#).unwrap(),
            Some(30)
        );
        assert!(parse_create_body(br#"{"expiresInDays": 0}"#).is_err());
        assert!(parse_create_body(br#"{"expiresInDays": 1.5}"#).is_err());
        assert!(parse_create_body(br#"{"expires": 3}"#)
            .unwrap_err()
            .message
            .starts_with("expires:"));
        assert!(parse_create_body(b"[").is_err());
    }
}
