//! Every metric name of the HTTP sidecar, in one place, and the Prometheus recorder.
//!
//! Names follow the bridge's convention, `argus_http_<what>_<unit>`; labels are bounded:
//! `route` is the matched route template (never a raw path with ids), `status` a class
//! (`2xx`, `4xx`, `5xx`), `reason` one of [`Rejection::as_str`]. The bridge's sink
//! records its own `argus_bridge_*` metrics into the same recorder, so `/metrics`
//! shows both.

use metrics_exporter_prometheus::PrometheusHandle;

/// Counter: requests answered, labels `route`, `status` (class).
pub const REQUESTS_TOTAL: &str = "argus_http_requests_total";
/// Histogram: request latency in seconds, label `route`.
pub const REQUEST_DURATION_SECONDS: &str = "argus_http_request_duration_seconds";
/// Counter: ingest requests refused, label `reason`.
pub const REJECTED_TOTAL: &str = "argus_http_rejected_total";
/// Counter: readings stored and published (acknowledged to the client).
pub const READINGS_ACCEPTED_TOTAL: &str = "argus_http_readings_accepted_total";
/// Counter: API keys created / revoked through the admin API, label `action`.
pub const API_KEY_ADMIN_TOTAL: &str = "argus_http_api_key_admin_total";

/// Why an ingest request was refused: the bounded label set of [`REJECTED_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    MissingKey,
    InvalidKey,
    DeviceMismatch,
    DeviceNotActive,
    UnsupportedMediaType,
    PayloadTooLarge,
    InvalidBody,
    RateLimited,
    Unavailable,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingKey => "missing_key",
            Self::InvalidKey => "invalid_key",
            Self::DeviceMismatch => "device_mismatch",
            Self::DeviceNotActive => "device_not_active",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::InvalidBody => "invalid_body",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
        }
    }
}

pub fn rejected(reason: Rejection) {
    metrics::counter!(REJECTED_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// The process-wide Prometheus handle: the bridge's recorder, installed globally once
/// (the `metrics` facade has one recorder per process), so the sink's `argus_bridge_*`
/// metrics and ours render together, and two sidecars in one test process share it.
/// No listener is bound: `/metrics` renders through this handle.
pub fn prometheus_handle() -> PrometheusHandle {
    argus_bridge::server::prometheus_handle()
}

/// `2xx`, `4xx`, ...: the bounded status label.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
