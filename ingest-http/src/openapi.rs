//! The OpenAPI 3.1 document of the HTTP API, generated from the code and served at
//! `GET /openapi.json`.
//!
//! Every route is registered through `utoipa_axum`'s [`OpenApiRouter`] with
//! `routes!(handler)`: the handler's `#[utoipa::path]` attribute gives both the
//! router's path and method and the document's operation (its parameters, request
//! body, every answer and its headers), so a route cannot be mounted without being
//! described. `tests/openapi.rs` checks it from the outside too: it lists the paths
//! of the built router and probes every method, against the served document, both
//! ways.
//!
//! The response bodies are the types the handlers serialise (`ToSchema` derives next
//! to them); the error body is [`crate::error::ApiError`]'s, with its stable `code`s;
//! the ingest request body is [`crate::request`]'s hand-written validation, written
//! out as a JSON Schema here ([`IngestBody`]) with the limits of this process.
//!
//! Each listener has its own document, of exactly its routes ([`ApiDoc::for_side`]): the
//! device listener's (ingest, `/health`) and the admin listener's (the rest). Each is
//! built and rendered once, in [`crate::build_app_and_document`]; the route answers the
//! same bytes every time (never generated per request).

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Limits;
use crate::error::ApiError;

/// Security scheme of the ingest endpoint: the device's `X-API-Key`.
pub const API_KEY_SCHEME: &str = "apiKey";
/// Security scheme of the operator endpoints: `Authorization: Bearer <admin token>`.
pub const ADMIN_SCHEME: &str = "adminToken";

/// Which listener a router or document is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Devices: ingest and `/health` (TLS unless loopback or `--insecure-http`).
    Device,
    /// Operators and the monitoring: everything else, on an internal address.
    Admin,
}

/// The document's fixed part: info, tags, security schemes and the shared schemas.
/// The paths come from the routers ([`crate::build_app_and_document`]).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "argus-ingest-http",
        description = "HTTP telemetry ingest with per-device API keys, API-key and device \
            certificate administration, health, readiness and metrics. Every error answers \
            `{\"success\": false, \"error\": {\"code\", \"message\", \"details\"?}}`; match on `code`. \
            See docs/ingest-http.md.",
        license(name = "Apache-2.0")
    ),
    modifiers(&SecuritySchemes),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode)),
    tags(
        (name = "ingest", description = "Device telemetry (X-API-Key)."),
        (name = "api-keys", description = "Device API keys (admin token)."),
        (name = "certificates", description = "Device certificates and the CRL (with --pki-dir)."),
        (name = "operations", description = "Health, readiness, metrics and this document.")
    )
)]
pub struct ApiDoc;

impl ApiDoc {
    /// The fixed part of one listener's document: its title, tags and security scheme
    /// (the device listener's document describes the device routes only, the admin
    /// listener's the rest; each is exactly its router).
    pub fn for_side(side: Side) -> utoipa::openapi::OpenApi {
        let mut doc = ApiDoc::openapi();
        let (title, tags, scheme): (&str, &[&str], &str) = match side {
            Side::Device => (
                "argus-ingest-http device listener",
                &["ingest", "operations"],
                API_KEY_SCHEME,
            ),
            Side::Admin => (
                "argus-ingest-http admin listener",
                &["api-keys", "certificates", "operations"],
                ADMIN_SCHEME,
            ),
        };
        doc.info.title = title.to_owned();
        doc.info.description = doc.info.description.map(|d| {
            let which = match side {
                Side::Device => {
                    "This is the device listener (`--listen`, TLS): telemetry and health. \
                     The admin API is on the admin listener (`--admin-listen`), with its own \
                     document."
                }
                Side::Admin => {
                    "This is the admin listener (`--admin-listen`, an internal address): \
                     API keys, certificates, the CRL, health, readiness and metrics. Devices \
                     send telemetry to the device listener (`--listen`), with its own document."
                }
            };
            format!("{d} {which}")
        });
        if let Some(all) = doc.tags.as_mut() {
            all.retain(|t| tags.contains(&t.name.as_str()));
        }
        if let Some(components) = doc.components.as_mut() {
            components.security_schemes.retain(|name, _| name == scheme);
        }
        doc
    }
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY_SCHEME,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "The device's API key, `argus_<8 hex>_<43 base64url>` (created by \
                 POST /api/v1/devices/{deviceId}/api-keys).",
            ))),
        );
        components.add_security_scheme(
            ADMIN_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The operator token (--admin-token / ARGUS_ADMIN_TOKEN). \
                         Missing: 401; wrong: 403.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The error body every endpoint answers (built by [`ApiError`]'s `IntoResponse`).
#[derive(ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)] // A schema only: `ApiError` writes this shape.
pub struct ErrorBody {
    /// Always `false`.
    success: bool,
    error: ErrorDetail,
}

/// The refusals of the admin bearer-token check (`crate::admin`), which every
/// operator route answers the same way; listed in each route's `responses(...)`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // A document part only: `ApiError` writes these answers.
pub enum AdminRefusals {
    #[response(status = 401, description = "`unauthorized`: no admin bearer token.")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "`forbidden`: a wrong admin token.")]
    Forbidden(ErrorBody),
}

/// `error` of [`ErrorBody`].
#[derive(ToSchema)]
#[allow(dead_code)] // A schema only.
pub struct ErrorDetail {
    code: ErrorCode,
    /// For a person; never carries keys, passwords or internal details. Validation
    /// messages start with the field's path (`metrics.temp`, `[2].deviceId`).
    message: String,
    /// Machine-readable detail of a few codes (`id_conflict`, `unstorable`,
    /// `duplicate_message_id`); absent otherwise.
    #[schema(value_type = Object, required = false)]
    details: Option<serde_json::Value>,
}

/// The stable error codes ([`ApiError::code`]).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // A schema only.
pub enum ErrorCode {
    InvalidBody,
    InvalidHeader,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    IdConflict,
    DeviceDecommissioned,
    PayloadTooLarge,
    ReadingTooLarge,
    UnsupportedMediaType,
    DuplicateMessageId,
    Unstorable,
    RateLimited,
    Overloaded,
    Unavailable,
    Internal,
}

/// The ingest request body: one reading, or a batch of them (see [`crate::request`]).
/// Written out by hand, as the validation is: every field rule of `request.rs`.
pub struct IngestBody;

/// One reading (plan §7.1).
pub struct Reading;

/// The pattern of a supplied id (`messageId`, `Idempotency-Key`): 1 to 200 visible
/// ASCII characters ([`crate::request::check_supplied_id`]).
pub const SUPPLIED_ID_PATTERN: &str = "^[!-~]{1,200}$";

fn schema_of(value: serde_json::Value) -> RefOr<Schema> {
    // The literals below are valid schemas (`tests::the_ingest_schemas_round_trip`).
    serde_json::from_value(value).unwrap_or_default()
}

impl Reading {
    fn json() -> serde_json::Value {
        json!({
            "type": "object",
            "description": "One reading. Any other field is refused (400), and so is `null` \
                for an optional field (leave it out), a key repeated in one object, and the \
                character U+0000 in any string or key. Stored as sent, digit for digit.",
            "required": ["deviceId", "metrics"],
            "additionalProperties": false,
            "properties": {
                "deviceId": {
                    "type": "string", "format": "uuid",
                    "description": "Must be the API key's device (else 403)."
                },
                "metrics": {
                    "type": "object",
                    "description": "Metric name (not empty) → a number, string or boolean.",
                    "propertyNames": {"type": "string", "minLength": 1, "pattern": NO_NUL},
                    "additionalProperties": {
                        "oneOf": [
                            {"type": "number"},
                            {"type": "string", "pattern": NO_NUL},
                            {"type": "boolean"}
                        ]
                    }
                },
                "timestamp": {
                    "type": "string", "format": "date-time",
                    "description": "RFC 3339; stored as telemetry_raw.device_timestamp."
                },
                "metadata": {
                    "type": "object",
                    "description": "Stored as sent (any JSON without U+0000).",
                    "propertyNames": {"type": "string", "pattern": NO_NUL},
                    "additionalProperties": {"$ref": "#/components/schemas/MetadataValue"}
                },
                "messageId": {
                    "type": "string", "pattern": SUPPLIED_ID_PATTERN,
                    "description": "Seeds the message id (unless an Idempotency-Key is sent)."
                }
            },
            "example": {
                "deviceId": "0d000000-0000-4000-8000-000000000001",
                "metrics": {"temperature": 25.5, "door": "open", "ok": true},
                "timestamp": "2026-01-28T12:00:00Z"
            }
        })
    }
}

/// A JSON value without U+0000 in any string or key (Postgres' `jsonb` cannot hold it).
pub struct MetadataValue;

impl MetadataValue {
    fn json() -> serde_json::Value {
        let nested = json!({"$ref": "#/components/schemas/MetadataValue"});
        json!({
            "description": "Any JSON value; no string or key holds U+0000.",
            "oneOf": [
                {"type": "null"},
                {"type": "boolean"},
                {"type": "number"},
                {"type": "string", "pattern": NO_NUL},
                {"type": "array", "items": nested},
                {
                    "type": "object",
                    "propertyNames": {"type": "string", "pattern": NO_NUL},
                    "additionalProperties": nested
                }
            ]
        })
    }
}

/// A string without U+0000.
const NO_NUL: &str = "^[^\\u0000]*$";

impl PartialSchema for Reading {
    fn schema() -> RefOr<Schema> {
        schema_of(Reading::json())
    }
}

impl ToSchema for Reading {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Reading")
    }
}

impl IngestBody {
    /// `max_batch`: `--max-batch-readings`.
    fn json(max_batch: usize) -> serde_json::Value {
        json!({
            "description": "A reading, or a batch: an array of readings (all stored or none).",
            "oneOf": [
                {"$ref": "#/components/schemas/Reading"},
                {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/Reading"},
                    "minItems": 1,
                    "maxItems": max_batch
                }
            ]
        })
    }
}

impl PartialSchema for IngestBody {
    fn schema() -> RefOr<Schema> {
        schema_of(IngestBody::json(Limits::default().max_batch_readings))
    }
}

impl ToSchema for IngestBody {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("IngestBody")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Reading::name().into(), Reading::schema()));
        schemas.push(("MetadataValue".into(), schema_of(MetadataValue::json())));
    }
}

/// The served document: rendered once, answered as the same bytes.
#[derive(Clone, Default)]
pub struct Document(Arc<OnceLock<Bytes>>);

impl Document {
    /// Renders `api` (see [`finish`]) as the served bytes.
    pub fn set(&self, api: &utoipa::openapi::OpenApi) {
        let bytes = match api.to_json() {
            Ok(text) => Bytes::from(text),
            Err(e) => {
                // Not expected: the document is plain data.
                tracing::error!(error = %e, "Could not render the OpenAPI document.");
                Bytes::new()
            }
        };
        // Set once, before the router serves; a second call keeps the first.
        let _ = self.0.set(bytes);
    }

    /// The rendered document (empty before [`Document::set`]).
    pub fn bytes(&self) -> Bytes {
        self.0.get().cloned().unwrap_or_default()
    }
}

/// Fills in this process's limits (`--max-batch-readings`); the admin document has no
/// ingest body.
pub fn finish(
    mut api: utoipa::openapi::OpenApi,
    limits: &Limits,
    side: Side,
) -> utoipa::openapi::OpenApi {
    if side == Side::Admin {
        return api;
    }
    if let Some(components) = api.components.as_mut() {
        components.schemas.insert(
            IngestBody::name().into(),
            schema_of(IngestBody::json(limits.max_batch_readings)),
        );
    }
    api
}

/// The `/openapi.json` route.
pub fn router(document: &Document) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(openapi_json))
        .with_state(document.clone())
}

/// `GET /openapi.json`
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json", body = Object),
        (status = 500, description = "`internal`: the document could not be rendered.", body = ErrorBody)
    )
)]
pub async fn openapi_json(State(document): State<Document>) -> Response {
    let bytes = document.bytes();
    if bytes.is_empty() {
        return ApiError::internal().into_response();
    }
    let mut response = (StatusCode::OK, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ingest_schemas_round_trip() {
        // What the document carries is exactly the literal: nothing dropped on the way.
        for literal in [Reading::json(), IngestBody::json(7), MetadataValue::json()] {
            let schema = schema_of(literal.clone());
            assert_eq!(serde_json::to_value(&schema).unwrap(), literal);
        }
    }
}
