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
//!   reload it (see [`CertState::with_broker_pid_file`]). With `--emqx-api-url`, EMQX
//!   then kicks the device's live connection ([`crate::emqx`]); the answer's
//!   `brokerKick` says how that went, and a failed kick never undoes the revocation.
//! - `GET /pki/crl.der`, `GET /pki/crl.pem`: the current CRL (public; EMQX fetches the DER).
//!
//! The two device endpoints need the admin bearer token (401 without, 403 wrong). Unknown
//! device: 404. Bad `validityDays`, `csr` or `reason`: 400 naming the field. Every issued
//! certificate is recorded in `device_certificates`; `devices.network_metadata` is merged
//! (`||`), never replaced. The CA's file I/O and signing run on the blocking pool.

use argus_pki::{PkiError, RevocationReason, Subject};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admin::{body_bytes, body_object, parse_device_id, path_segments};
use crate::error::ApiError;
use crate::openapi::{AdminRefusals, ErrorBody};
use crate::state::AppState;
pub use crate::state::CertState;

/// The certificate routes of the admin listener (merged by [`crate::build_app_and_document`]): empty when the
/// state has no certificate API (no `--pki-dir`), so the paths answer 404 (and the
/// document does not describe them).
pub fn router(state: &AppState) -> OpenApiRouter {
    match state.certificates() {
        Some(cert) => routes(cert.clone()),
        None => OpenApiRouter::new(),
    }
}

/// The certificate routes with their state applied, and their part of the document.
pub fn routes(state: CertState) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(issue, revoke))
        .routes(routes!(crl_der))
        .routes(routes!(crl_pem))
        .with_state(state)
}

/// The certificate routes alone: what [`router`] mounts, and what a test or another
/// binary can serve without an [`AppState`].
pub fn standalone(state: CertState) -> Router {
    routes(state).split_for_parts().0
}

/// `POST .../certificate` body (optional; empty = `{}`).
// `deny_unknown_fields` and the renames shape the schema (`additionalProperties: false`,
// camelCase names): the body is read by hand, refusing unknown fields.
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = IssueCertificateRequest)]
#[allow(dead_code)] // A schema only: `parse_issue_body` reads the body.
pub struct IssueBody {
    /// Days of validity, 1 to 365 (default 365); `null` = the default.
    #[schema(minimum = 1, maximum = 365, value_type = Option<u32>)]
    validity_days: Option<u32>,
    /// A PEM `CERTIFICATE REQUEST` (the key stays on the device); absent or `null`: the
    /// CA makes the key pair and returns its private key.
    csr: Option<String>,
}

/// `DELETE .../certificate` body (optional; empty = `{}`).
// `deny_unknown_fields` and the renames shape the schema (`additionalProperties: false`,
// camelCase names): the body is read by hand, refusing unknown fields.
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = RevokeCertificateRequest)]
#[allow(dead_code)] // A schema only.
pub struct RevokeBody {
    /// An RFC 5280 reason in camelCase (`keyCompromise`, `superseded`, ...); absent or
    /// `null`: `unspecified`.
    reason: Option<String>,
}

/// `POST .../certificate` answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificate {
    /// Always `true`.
    pub success: bool,
    pub device_id: uuid::Uuid,
    /// PEM; CN = the device id.
    pub certificate: String,
    /// PEM; only when no CSR was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub private_key: Option<String>,
    /// PEM of the issuing CA.
    pub ca_certificate: String,
    /// Hex.
    pub serial_number: String,
    pub fingerprint_sha256: String,
    pub not_before: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// `DELETE .../certificate` answer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokedCertificates {
    /// Always `true`.
    pub success: bool,
    pub device_id: uuid::Uuid,
    /// Every certificate revoked now (empty when none was active).
    pub revoked_serial_numbers: Vec<String>,
    pub reason: String,
    /// What became of the EMQX kick of the device's live connection (`disabled`
    /// without `--emqx-api-url`). A failed kick leaves the revocation in force.
    pub broker_kick: crate::emqx::BrokerKick,
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
#[utoipa::path(
    post,
    path = "/api/v1/devices/{deviceId}/certificate",
    tag = "certificates",
    security(("adminToken" = [])),
    params(("deviceId" = uuid::Uuid, Path, description = "The device's id (the certificate's CN).")),
    request_body(content = Option<IssueBody>, content_type = "application/json",
        description = "Optional; an empty body issues a 365-day certificate with a new key."),
    responses(
        (status = 201, description = "Issued and recorded.", body = IssuedCertificate),
        (status = 400, description = "`invalid_body`: malformed JSON, not an object, an unknown \
            field, a bad validityDays or csr.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: a body over 2 MiB.", body = ErrorBody),
        (status = 409, description = "`device_decommissioned`: the device gets no new \
            certificate.", body = ErrorBody),
        AdminRefusals,
        (status = 404, description = "`not_found`: no such device (or the id is not a UUID).", body = ErrorBody),
        (status = 500, description = "`internal`: a bug or a CA failure (no details).", body = ErrorBody),
        (status = 503, description = "`unavailable`: Postgres is down or slow, or the PKI \
            directory is busy.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait.")))
    )
)]
pub async fn issue(
    State(state): State<CertState>,
    path: Result<UrlPath<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.admin.check(&headers)?;
    let device_id = parse_device_id(&path_segments(path, "No device with this id.")?)?;
    let body = body_bytes(body)?;
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

    let out = IssuedCertificate {
        success: true,
        device_id,
        certificate: issued.certificate_pem,
        private_key: issued.private_key_pem,
        ca_certificate: state.ca.ca_certificate_pem().to_owned(),
        serial_number: issued.serial_hex,
        fingerprint_sha256: issued.fingerprint_sha256,
        not_before,
        expires_at: not_after,
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `DELETE /api/v1/devices/{deviceId}/certificate`
#[utoipa::path(
    delete,
    path = "/api/v1/devices/{deviceId}/certificate",
    tag = "certificates",
    security(("adminToken" = [])),
    params(("deviceId" = uuid::Uuid, Path, description = "The device's id (the certificate's CN).")),
    request_body(content = Option<RevokeBody>, content_type = "application/json",
        description = "Optional; an empty body revokes with reason `unspecified`."),
    responses(
        (status = 200, description = "Every active certificate of the device is revoked and \
            the CRL rewritten.", body = RevokedCertificates),
        (status = 400, description = "`invalid_body`: malformed JSON, not an object, an unknown \
            field, or an unknown reason.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: a body over 2 MiB.", body = ErrorBody),
        AdminRefusals,
        (status = 404, description = "`not_found`: no such device (or the id is not a UUID).", body = ErrorBody),
        (status = 500, description = "`internal`: a bug or a CA failure (no details).", body = ErrorBody),
        (status = 503, description = "`unavailable`: Postgres is down or slow, or the PKI \
            directory is busy.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait.")))
    )
)]
pub async fn revoke(
    State(state): State<CertState>,
    path: Result<UrlPath<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.admin.check(&headers)?;
    let device_id = parse_device_id(&path_segments(path, "No device with this id.")?)?;
    let body = body_bytes(body)?;
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
    // After the commit: the revocation stands whatever the kick does.
    let broker_kick = match &state.emqx {
        Some(kick) => kick.kick(&device_id.to_string()).await,
        None => crate::emqx::disabled(),
    };
    Ok(Json(RevokedCertificates {
        success: true,
        device_id,
        revoked_serial_numbers: serials,
        reason: reason.as_str().to_owned(),
        broker_kick,
    })
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
#[utoipa::path(
    get,
    path = "/pki/crl.der",
    tag = "certificates",
    responses(
        (status = 200, description = "The current CRL, DER.", content_type = "application/pkix-crl", body = Vec<u8>),
        (status = 500, description = "`internal`: the CRL could not be read.", body = ErrorBody),
        (status = 503, description = "`unavailable`: the PKI directory is busy.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait.")))
    )
)]
pub async fn crl_der(State(state): State<CertState>) -> Result<Response, ApiError> {
    let ca = state.ca.clone();
    let der = blocking(move || ca.crl_der()).await?;
    Ok(crl_response(der, "application/pkix-crl"))
}

/// `GET /pki/crl.pem`
#[utoipa::path(
    get,
    path = "/pki/crl.pem",
    tag = "certificates",
    responses(
        (status = 200, description = "The current CRL, PEM.", content_type = "application/x-pem-file", body = String),
        (status = 500, description = "`internal`: the CRL could not be read.", body = ErrorBody),
        (status = 503, description = "`unavailable`: the PKI directory is busy.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait.")))
    )
)]
pub async fn crl_pem(State(state): State<CertState>) -> Result<Response, ApiError> {
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
