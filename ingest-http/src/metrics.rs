//! Every metric name of the HTTP sidecar, in one place, and the Prometheus recorder.
//!
//! Names follow the convention of every Argus crate (see [`argus_pipeline::metrics`]),
//! `argus_http_<what>_<unit>`; labels are bounded: `route` is the matched route
//! template (never a raw path with ids), `status` a class (`2xx`, `4xx`, `5xx`),
//! `reason` one of [`Rejection::as_str`], `action` `create` or `revoke`. The shared
//! pipeline records its own metrics (`argus_sink_*`, `argus_dlq_*`, `argus_registry_*`)
//! into the same recorder, so `/metrics` shows them all.
//!
//! At start-up (where the state is built): [`prometheus_handle`], then [`describe`],
//! so `/metrics` carries `# HELP` lines and each bounded-label counter exists at zero.

use metrics::{counter, describe_counter, describe_histogram};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::error::ApiError;

/// Counter: requests answered, labels `route`, `status` (class).
pub const REQUESTS_TOTAL: &str = "argus_http_requests_total";
/// Histogram: request latency in seconds, label `route`.
pub const REQUEST_DURATION_SECONDS: &str = "argus_http_request_duration_seconds";
/// Counter: ingest requests refused, label `reason`.
pub const REJECTED_TOTAL: &str = "argus_http_rejected_total";
/// Counter: readings stored and published (acknowledged to the client).
pub const READINGS_ACCEPTED_TOTAL: &str = "argus_http_readings_accepted_total";
/// Counter: readings answered `"duplicate": true` (already stored with the same content).
pub const READINGS_DUPLICATE_TOTAL: &str = "argus_http_readings_duplicate_total";
/// Counter: API keys created / revoked through the admin API, label `action`.
pub const API_KEY_ADMIN_TOTAL: &str = "argus_http_api_key_admin_total";
/// Counter: reloads of the device listener's TLS certificate (SIGHUP), label `result`
/// (`ok`, `error`: the old certificate stays).
pub const TLS_RELOADS_TOTAL: &str = "argus_http_tls_reloads_total";
/// Counter: TLS handshakes on the device listener that failed or timed out.
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "argus_http_tls_handshake_failures_total";
/// Counter: EMQX kicks after a certificate revocation, label `outcome`
/// (one of [`EMQX_KICK_OUTCOMES`]).
pub const EMQX_KICKS_TOTAL: &str = "argus_http_emqx_kicks_total";
/// The `outcome` label values of [`EMQX_KICKS_TOTAL`] (`crate::emqx`'s outcomes).
pub const EMQX_KICK_OUTCOMES: [&str; 4] = ["disabled", "kicked", "not_connected", "failed"];

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
    /// 429 from the per-address limiter in front of the key look-up.
    PreauthRateLimited,
    /// 503: the in-flight request or byte budget is full.
    Overloaded,
    /// 413: one reading's stored size or envelope is over the limit.
    ReadingTooLarge,
    /// 422: a batch names one message id twice.
    DuplicateMessageId,
    /// 409: a reading's id is stored with different content.
    IdConflict,
}

impl Rejection {
    /// Every reason, for the zero series.
    pub const ALL: [Rejection; 14] = [
        Self::MissingKey,
        Self::InvalidKey,
        Self::DeviceMismatch,
        Self::DeviceNotActive,
        Self::UnsupportedMediaType,
        Self::PayloadTooLarge,
        Self::InvalidBody,
        Self::RateLimited,
        Self::Unavailable,
        Self::PreauthRateLimited,
        Self::Overloaded,
        Self::ReadingTooLarge,
        Self::DuplicateMessageId,
        Self::IdConflict,
    ];

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
            Self::PreauthRateLimited => "preauth_rate_limited",
            Self::Overloaded => "overloaded",
            Self::ReadingTooLarge => "reading_too_large",
            Self::DuplicateMessageId => "duplicate_message_id",
            Self::IdConflict => "id_conflict",
        }
    }
}

/// The `action` label values of [`API_KEY_ADMIN_TOTAL`].
pub const API_KEY_ACTIONS: [&str; 2] = ["create", "revoke"];

pub fn rejected(reason: Rejection) {
    counter!(REJECTED_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// Counts `error` under `reason` and returns it (`return Err(reject(..))`).
pub fn reject(reason: Rejection, error: ApiError) -> ApiError {
    rejected(reason);
    error
}

/// Registers `# HELP` text for every metric of the process (the shared pipeline's,
/// through [`argus_pipeline::metrics::describe`], and the `argus_http_*` ones), and
/// every counter of a bounded label set at zero, so each series exists from start-up.
/// Idempotent; call it after [`prometheus_handle`].
pub fn describe() {
    argus_pipeline::metrics::describe();
    describe_counter!(
        REQUESTS_TOTAL,
        "HTTP requests answered, by route and status class."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency, by route."
    );
    describe_counter!(REJECTED_TOTAL, "Ingest requests refused, by reason.");
    describe_counter!(
        READINGS_ACCEPTED_TOTAL,
        "Readings stored and published, acknowledged to the client."
    );
    describe_counter!(
        READINGS_DUPLICATE_TOTAL,
        "Readings already stored with the same content, answered as duplicates."
    );
    describe_counter!(
        API_KEY_ADMIN_TOTAL,
        "API keys created or revoked through the admin API, by action."
    );
    describe_counter!(
        TLS_RELOADS_TOTAL,
        "Reloads of the device listener's TLS certificate on SIGHUP, by result (error: the old one stays)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "TLS handshakes on the device listener that failed or timed out."
    );
    describe_counter!(
        EMQX_KICKS_TOTAL,
        "EMQX kicks of a revoked device's connection, by outcome."
    );
    for result in ["ok", "error"] {
        counter!(TLS_RELOADS_TOTAL, "result" => result).increment(0);
    }
    counter!(TLS_HANDSHAKE_FAILURES_TOTAL).increment(0);
    for outcome in EMQX_KICK_OUTCOMES {
        counter!(EMQX_KICKS_TOTAL, "outcome" => outcome).increment(0);
    }
    for reason in Rejection::ALL {
        counter!(REJECTED_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
    counter!(READINGS_ACCEPTED_TOTAL).absolute(0);
    counter!(READINGS_DUPLICATE_TOTAL).absolute(0);
    for action in API_KEY_ACTIONS {
        counter!(API_KEY_ADMIN_TOTAL, "action" => action).absolute(0);
    }
}

/// The process-wide Prometheus handle: the shared pipeline's recorder, installed
/// globally once (the `metrics` facade has one recorder per process), so the sink's
/// metrics and ours render together, and two sidecars in one test process share it.
/// No listener is bound: `/metrics` renders through this handle.
pub fn prometheus_handle() -> PrometheusHandle {
    argus_pipeline::metrics::prometheus_handle()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_exports_help_and_zero_series() {
        let handle = prometheus_handle();
        describe();
        describe(); // idempotent
                    // The exporter writes `# HELP` only for a metric with a series; these two have
                    // route labels, so they exist from the first request on.
        counter!(REQUESTS_TOTAL, "route" => "/health", "status" => "2xx").increment(1);
        metrics::histogram!(REQUEST_DURATION_SECONDS, "route" => "/health").record(0.001);
        let text = handle.render();
        for name in [
            REQUESTS_TOTAL,
            REQUEST_DURATION_SECONDS,
            REJECTED_TOTAL,
            READINGS_ACCEPTED_TOTAL,
            READINGS_DUPLICATE_TOTAL,
            API_KEY_ADMIN_TOTAL,
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
        }
        for reason in Rejection::ALL {
            let series = format!("{REJECTED_TOTAL}{{reason=\"{}\"}} 0", reason.as_str());
            assert!(text.contains(&series), "{series}: {text}");
        }
        assert!(text.contains(&format!("{READINGS_ACCEPTED_TOTAL} 0")));
        for action in API_KEY_ACTIONS {
            let series = format!("{API_KEY_ADMIN_TOTAL}{{action=\"{action}\"}} 0");
            assert!(text.contains(&series), "{series}: {text}");
        }
        // The shared pipeline's names come with it.
        assert!(
            text.contains("# HELP argus_sink_persisted_total "),
            "{text}"
        );
    }
}
