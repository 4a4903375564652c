//! Device certificate API (owned by the PKI work), mounted by the app via [`router`]
//! when `--pki-dir` is set:
//!
//! - `POST   /api/v1/devices/{deviceId}/certificate` with `{"validityDays": N, "csr": "PEM"}`
//!   (both optional; `validityDays` defaults to 365, at most 365): issues a client certificate
//!   with CN = the device id. Returns (201) `certificate`, `privateKey` (absent when a CSR was
//!   given: the key stays on the device), `caCertificate`, `serialNumber`, `fingerprintSha256`,
//!   `notBefore`, `expiresAt`.
//! - `DELETE /api/v1/devices/{deviceId}/certificate` (optional `{"reason": "keyCompromise"}`):
//!   revokes every active certificate of the device and rewrites the CRL; the broker must
//!   reload it (see [`CertState::with_broker_pid_file`]).
//! - `GET /pki/crl.der`, `GET /pki/crl.pem`: the current CRL (public; EMQX fetches the DER).
//!
//! The two device endpoints need the admin bearer token (401 without, 403 wrong). Unknown
//! device: 404. Bad `validityDays`, `csr` or `reason`: 400 naming the field. Every issued
//! certificate is recorded in `device_certificates`; `devices.network_metadata` is merged
//! (`||`), never replaced. The CA's file I/O and signing run on the blocking pool.

use argus_pki::{PkiError, RevocationReason, Subject};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::admin::{body_object, parse_device_id};
use crate::error::ApiError;
use crate::state::AppState;
pub use crate::state::CertState;

/// The certificate routes of the app (merged by [`crate::build_app`]): empty when the
/// state has no certificate API (no `--pki-dir`), so the paths answer 404.
pub fn router(state: &AppState) -> Router {
    match state.certificates() {
        Some(cert) => standalone(cert.clone()),
        None => Router::new(),
    }
}

/// The certificate routes alone, with their state applied: what [`router`] mounts,
/// and what a test or another binary can serve without an [`AppState`].
pub fn standalone(state: CertState) -> Router {
    Router::new()
        .route(
            "/api/v1/devices/{device_id}/certificate",
            post(issue).delete(revoke),
        )
        .route("/pki/crl.der", get(crl_der))
        .route("/pki/crl.pem", get(crl_pem))
        .with_state(state)
}

/// Maps a CA failure: the caller's input is a 400 naming the field; the rest is ours.
fn pki_error(e: PkiError) -> ApiError {
    match e {
        PkiError::InvalidValidity { max, .. } => ApiError::bad_request(
            "invalid_body",
            format!("validityDays: must be a whole number from 1 to {max}"),
        ),
        PkiError::InvalidCsr(why) => ApiError::bad_request("invalid_body", format!("csr: {why}")),
        e if e.is_retriable() => {
            tracing::warn!(error = %e, "The PKI directory is busy.");
            ApiError::unavailable()
        }
        e => {
            tracing::error!(error = %e, "Certificate operation failed.");
            ApiError::internal()
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PkiError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(pki_error),
        Err(e) => {
            tracing::error!(error = %e, "A certificate task failed.");
            Err(ApiError::internal())
        }
    }
}

struct IssueRequest {
    validity_days: u32,
    csr: Option<String>,
}

fn parse_issue_body(body: &[u8]) -> Result<IssueRequest, ApiError> {
    let map = body_object(body, &["validityDays", "csr"])?;
    let max = argus_pki::MAX_DEVICE_VALIDITY_DAYS;
    let validity_days = match map.get("validityDays") {
        None | Some(Value::Null) => argus_pki::DEFAULT_VALIDITY_DAYS,
        Some(v) => v
            .as_u64()
            .and_then(|d| u32::try_from(d).ok())
            .filter(|d| (1..=max).contains(d))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_body",
                    format!("validityDays: must be a whole number from 1 to {max}"),
                )
            })?,
    };
    let csr = match map.get("csr") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "csr: must be a PEM CERTIFICATE REQUEST string",
            ))
        }
    };
    Ok(IssueRequest { validity_days, csr })
}

fn chrono_time(t: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.unix_timestamp(), 0).unwrap_or_default()
}

/// `POST /api/v1/devices/{deviceId}/certificate`
async fn issue(
    State(state): State<CertState>,
    UrlPath(device_id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.admin.check(&headers)?;
    let device_id = parse_device_id(&device_id)?;
    let request = parse_issue_body(&body)?;
    let mut client = state.pool.get().await?;
    let status: Option<String> = client
        .query_opt("SELECT status FROM devices WHERE id = $1", &[&device_id])
        .await?
        .map(|row| row.get(0));
    match status.as_deref() {
        None => return Err(ApiError::not_found("No device with this id.")),
        Some("decommissioned") => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "device_decommissioned",
                "The device is decommissioned; it gets no new certificate.",
            ))
        }
        Some(_) => {}
    }

    let ca = state.ca.clone();
    let IssueRequest { validity_days, csr } = request;
    let issued =
        blocking(move || ca.issue(&Subject::Device(device_id), validity_days, csr.as_deref()))
            .await?;
    let not_before = chrono_time(issued.not_before);
    let not_after = chrono_time(issued.not_after);

    let recorded = async {
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO device_certificates \
             (device_id, serial_number, fingerprint_sha256, not_before, not_after) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &device_id,
                &issued.serial_hex,
                &issued.fingerprint_sha256,
                &not_before,
                &not_after,
            ],
        )
        .await?;
        let meta = json!({
            "certificateIssued": true,
            "certificateIssuedAt": Utc::now(),
            "certificateExpiresAt": not_after,
            "certificateSerialNumber": issued.serial_hex,
        });
        tx.execute(
            "UPDATE devices SET network_metadata = COALESCE(network_metadata, '{}'::jsonb) || $2::jsonb, \
             updated_at = now() WHERE id = $1",
            &[&device_id, &meta],
        )
        .await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = recorded {
        // A certificate nobody recorded must not stay valid: revoke it before failing.
        let ca = state.ca.clone();
        let serial = issued.serial_hex.clone();
        if let Err(re) = blocking(move || ca.revoke(&serial, RevocationReason::Superseded)).await {
            tracing::error!(serial = %issued.serial_hex, error = %re, "Could not revoke an unrecorded certificate.");
        }
        state.reload_broker();
        return Err(e.into());
    }
    tracing::info!(%device_id, serial = %issued.serial_hex, %not_after, "Issued a device certificate.");

    let mut out = json!({
        "success": true,
        "deviceId": device_id,
        "certificate": issued.certificate_pem,
        "caCertificate": state.ca.ca_certificate_pem(),
        "serialNumber": issued.serial_hex,
        "fingerprintSha256": issued.fingerprint_sha256,
        "notBefore": not_before,
        "expiresAt": not_after,
    });
    if let (Some(key), Some(obj)) = (issued.private_key_pem, out.as_object_mut()) {
        obj.insert("privateKey".into(), Value::String(key));
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `DELETE /api/v1/devices/{deviceId}/certificate`
async fn revoke(
    State(state): State<CertState>,
    UrlPath(device_id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.admin.check(&headers)?;
    let device_id = parse_device_id(&device_id)?;
    let map = body_object(&body, &["reason"])?;
    let reason = match map.get("reason") {
        None | Some(Value::Null) => RevocationReason::Unspecified,
        Some(Value::String(s)) => s
            .parse::<RevocationReason>()
            .map_err(|why| ApiError::bad_request("invalid_body", format!("reason: {why}")))?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "reason: must be a string",
            ))
        }
    };
    let mut client = state.pool.get().await?;
    let exists = client
        .query_opt("SELECT 1 FROM devices WHERE id = $1", &[&device_id])
        .await?
        .is_some();
    if !exists {
        return Err(ApiError::not_found("No device with this id."));
    }

    // The CA's index first: it is what the CRL is made from (and it also holds
    // certificates issued with the CLI).
    let ca = state.ca.clone();
    let mut serials = blocking(move || ca.revoke_device(device_id, reason)).await?;
    state.reload_broker();

    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "UPDATE device_certificates SET revoked_at = now(), revocation_reason = $2 \
             WHERE device_id = $1 AND revoked_at IS NULL RETURNING serial_number",
            &[&device_id, &reason.as_str()],
        )
        .await?;
    for row in rows {
        let s: String = row.get(0);
        if !serials.contains(&s) {
            serials.push(s);
        }
    }
    let meta = json!({
        "certificateRevoked": true,
        "certificateRevokedAt": Utc::now(),
    });
    tx.execute(
        "UPDATE devices SET network_metadata = COALESCE(network_metadata, '{}'::jsonb) || $2::jsonb, \
         updated_at = now() WHERE id = $1",
        &[&device_id, &meta],
    )
    .await
    ?;
    tx.commit().await?;
    tracing::info!(%device_id, revoked = serials.len(), %reason, "Revoked device certificates.");
    Ok(Json(json!({
        "success": true,
        "deviceId": device_id,
        "revokedSerialNumbers": serials,
        "reason": reason.as_str(),
    }))
    .into_response())
}

fn crl_response(bytes: Vec<u8>, content_type: &'static str) -> Response {
    let mut response = bytes.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /pki/crl.der`
async fn crl_der(State(state): State<CertState>) -> Result<Response, ApiError> {
    let ca = state.ca.clone();
    let der = blocking(move || ca.crl_der()).await?;
    Ok(crl_response(der, "application/pkix-crl"))
}

/// `GET /pki/crl.pem`
async fn crl_pem(State(state): State<CertState>) -> Result<Response, ApiError> {
    let ca = state.ca.clone();
    let pem = blocking(move || ca.crl_pem()).await?;
    Ok(crl_response(pem.into_bytes(), "application/x-pem-file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_body_names_the_bad_field() {
        let ok = parse_issue_body(b"").unwrap();
        assert_eq!(ok.validity_days, 365);
        assert!(ok.csr.is_none());
        assert_eq!(
            parse_issue_body(br#"{"validityDays": 30}"#)
                .unwrap()
                .validity_days,
            30
        );
        for bad in [
            r#"{"validityDays": 0}"#,
            r#"{"validityDays": 366}"#,
            r#"{"validityDays": "30"}"#,
            r#"{"validityDays": 1.5}"#,
        ] {
            let e = parse_issue_body(bad.as_bytes()).err().unwrap();
            assert!(e.message.starts_with("validityDays"), "{bad}: {e}");
        }
        let e = parse_issue_body(br#"{"csr": 5}"#).err().unwrap();
        assert!(e.message.starts_with("csr"));
        let e = parse_issue_body(br#"{"other": 5}"#).err().unwrap();
        assert!(e.message.starts_with("other"));
    }
}
