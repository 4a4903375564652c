//! What every operator endpoint (API keys, certificates) shares: the admin bearer
//! token, the `{deviceId}` path segment, and the JSON object body.
//!
//! Missing or malformed `Authorization: Bearer ...` answers 401; a wrong token 403.
//! Tokens are compared in constant time, and never logged. A device id that is not a
//! UUID answers 404 (no such device), like an unknown one. A body is a JSON object
//! (empty = `{}`) with known fields only; anything else is 400 `invalid_body` naming
//! the problem.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::Path;
use axum::http::{header, HeaderMap, StatusCode};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::ApiError;

/// The configured admin token. `Debug` never prints it.
#[derive(Clone)]
pub struct AdminToken(std::sync::Arc<str>);

impl AdminToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(std::sync::Arc::from(token.into()))
    }

    /// Checks the request's bearer token: 401 when absent, 403 when wrong.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("An admin bearer token is required."))?;
        if bool::from(presented.as_bytes().ct_eq(self.0.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::forbidden("The admin token is not valid."))
        }
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// The `{deviceId}` path segment: not a UUID is the same 404 as an unknown device.
pub fn parse_device_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("No device with this id."))
}

/// The path's segments, taken as `Result<Path<T>, PathRejection>` so that a segment
/// axum cannot decode (invalid UTF-8 after percent-decoding) answers the stable JSON
/// 404 `not_found` with `message`, after the admin check, instead of axum's plain-text
/// 400. Such a segment is no UUID, so it names nothing, like any other non-UUID.
pub fn path_segments<T>(
    path: Result<Path<T>, PathRejection>,
    message: &'static str,
) -> Result<T, ApiError> {
    path.map(|Path(segments)| segments).map_err(|e| {
        tracing::debug!(error = %e, "Undecodable path segment.");
        ApiError::not_found(message)
    })
}

/// Largest operator request body (axum's default for a buffered body, 2 MiB).
pub const MAX_ADMIN_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The request body, taken as `Result<Bytes, BytesRejection>` so that a body over
/// [`MAX_ADMIN_BODY_BYTES`] answers the stable JSON 413 `payload_too_large` (and an
/// unreadable one 400 `invalid_body`) instead of axum's plain text.
pub fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("The request body is larger than {MAX_ADMIN_BODY_BYTES} bytes."),
            )
        } else {
            tracing::debug!(error = %e, "Could not read an operator request body.");
            ApiError::bad_request("invalid_body", "request body: could not be read")
        }
    })
}

/// The body as a JSON object (an empty or blank body = `{}`), refusing fields not in
/// `allowed`.
pub fn body_object(body: &[u8], allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("request body: malformed JSON ({e})"),
        )
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "request body: expected an object",
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("{unknown}: unknown field"),
        ));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn missing_token_is_401_wrong_is_403_right_is_ok() {
        let token = AdminToken::new("s3cret-token");
        assert_eq!(
            token.check(&headers(None)).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            token.check(&headers(Some("Basic abc"))).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            token
                .check(&headers(Some("Bearer nope")))
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        assert!(token.check(&headers(Some("Bearer s3cret-token"))).is_ok());
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
