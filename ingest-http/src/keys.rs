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
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::admin::{body_object, parse_device_id};
use crate::apikey::ApiKey;
use crate::error::ApiError;
use crate::metrics as m;
use crate::state::AppState;

/// Longest key lifetime accepted in `expiresInDays` (10 years).
const MAX_EXPIRES_IN_DAYS: i64 = 3650;

/// The API-key routes, with their state applied (merged by [`crate::build_app`]).
pub fn router(state: &AppState) -> Router {
    Router::new()
        .route(
            "/api/v1/devices/{device_id}/api-keys",
            post(create).get(list),
        )
        .route(
            "/api/v1/devices/{device_id}/api-keys/{key_id}",
            delete(revoke),
        )
        .with_state(state.clone())
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
pub async fn create(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.admin().check(&headers)?;
    let device_id = parse_device_id(&device_id)?;
    let expires_in_days = parse_create_body(&body)?;
    let client = state.pool().get().await?;
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
        Json(json!({
            "success": true,
            "id": id,
            "deviceId": device_id,
            "prefix": key.prefix(),
            "key": key.expose(),
            "createdAt": created_at,
            "expiresAt": expires_at,
        })),
    )
        .into_response())
}

/// `GET /api/v1/devices/{deviceId}/api-keys`
pub async fn list(
    State(state): State<AppState>,
    Path(device_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.admin().check(&headers)?;
    let device_id = parse_device_id(&device_id)?;
    let client = state.pool().get().await?;
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
    let keys: Vec<Value> = rows
        .iter()
        .map(|r| {
            let expires_at: Option<DateTime<Utc>> = r.get(4);
            let revoked_at: Option<DateTime<Utc>> = r.get(5);
            let active = revoked_at.is_none() && expires_at.is_none_or(|t| t > now);
            json!({
                "id": r.get::<_, Uuid>(0),
                "prefix": r.get::<_, String>(1),
                "createdAt": r.get::<_, DateTime<Utc>>(2),
                "lastUsedAt": r.get::<_, Option<DateTime<Utc>>>(3),
                "expiresAt": expires_at,
                "revokedAt": revoked_at,
                "active": active,
            })
        })
        .collect();
    Ok(Json(json!({"success": true, "deviceId": device_id, "keys": keys})).into_response())
}

/// `DELETE /api/v1/devices/{deviceId}/api-keys/{keyId}`
///
/// Idempotent: revoking a revoked key keeps its first revocation time and publishes
/// the invalidation again (so a retry after a failed publish is the fix).
pub async fn revoke(
    State(state): State<AppState>,
    Path((device_id, key_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.admin().check(&headers)?;
    let device_id = parse_device_id(&device_id)?;
    let key_id =
        Uuid::parse_str(&key_id).map_err(|_| ApiError::not_found("No API key with this id."))?;
    let client = state.pool().get().await?;
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
    Ok(Json(json!({
        "success": true,
        "id": key_id,
        "deviceId": device_id,
        "revokedAt": revoked_at,
    }))
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
