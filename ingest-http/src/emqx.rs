//! The EMQX kick (production broker): after a device's certificates are revoked, the
//! sidecar asks EMQX to close the device's live connection, so a revoked device is cut
//! off at once instead of at its next reconnect (when EMQX's CRL check refuses it).
//!
//! `DELETE {--emqx-api-url}/api/v5/clients/{clientid}` with HTTP Basic `key:secret` (an
//! EMQX v5 API key), no body; the client id is the certificate's CN, the device id
//! (`compose/emqx/emqx.conf`: `peer_cert_as_clientid = cn`). The request and EMQX's
//! answers, with the EMQX references, are written down in
//! `ingest-http/contract/emqx-kick.json`; `ingest-http/tests/emqx_kick.rs` checks the
//! request against that file.
//!
//! Answers: 204 kicked; 404 (`CLIENTID_NOT_FOUND`) the device is not connected, which
//! is fine. A timeout, a connection error, a 5xx or a 429 is tried again, at most
//! [`ATTEMPTS`] times; any other answer (401/403: a wrong or expired API key) is not.
//! A kick that fails never undoes or blocks the revocation: the CRL is already
//! rewritten, so EMQX refuses the next connection anyway. Each outcome is logged and
//! counted (`argus_http_emqx_kicks_total{outcome}`). The secret is never logged.

use std::time::Duration;

use base64::Engine as _;
use serde::Serialize;
use utoipa::ToSchema;

use crate::metrics;

/// Requests per kick at most (the first and two retries).
pub const ATTEMPTS: u32 = 3;

/// Pause before the second attempt (doubled before the third).
pub const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// An EMQX v5 API key's secret. `Debug` never prints it.
#[derive(Clone)]
pub struct ApiSecret(std::sync::Arc<str>);

impl ApiSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(std::sync::Arc::from(secret.into()))
    }
}

impl std::fmt::Debug for ApiSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiSecret(..)")
    }
}

/// `--emqx-api-url`, `--emqx-api-key`, the secret, `--emqx-api-timeout`.
#[derive(Clone, Debug)]
pub struct EmqxConfig {
    /// Base URL, without a trailing `/` (e.g. `http://emqx:18083`).
    pub api_url: String,
    pub api_key: String,
    pub api_secret: ApiSecret,
    /// Per attempt.
    pub timeout: Duration,
}

/// What became of a kick: the `brokerKick.outcome` of the revoke answer and the
/// `outcome` label of `argus_http_emqx_kicks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KickOutcome {
    /// No `--emqx-api-url`: nothing was asked (the local stack's Mosquitto is kicked by
    /// its CRL reload).
    Disabled,
    /// EMQX answered 204: the connection is closed.
    Kicked,
    /// EMQX answered 404: the device was not connected.
    NotConnected,
    /// No 204 or 404 after the retries (see the log); the revocation stands.
    Failed,
}

impl KickOutcome {
    pub const ALL: [KickOutcome; 4] = [
        Self::Disabled,
        Self::Kicked,
        Self::NotConnected,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Kicked => "kicked",
            Self::NotConnected => "not_connected",
            Self::Failed => "failed",
        }
    }
}

/// The revoke answer's `brokerKick`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerKick {
    pub outcome: KickOutcome,
    /// Requests sent to EMQX (0 when disabled).
    pub attempts: u32,
    /// The last failure (`failed` only): an HTTP status or `timeout`/`connection`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The configured kick (cheap to clone). `Debug` shows the URL only.
#[derive(Clone)]
pub struct EmqxKick {
    config: EmqxConfig,
    authorization: std::sync::Arc<str>,
    client: reqwest::Client,
}

impl std::fmt::Debug for EmqxKick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmqxKick")
            .field("api_url", &self.config.api_url)
            .finish_non_exhaustive()
    }
}

impl EmqxKick {
    pub fn new(config: EmqxConfig) -> EmqxKick {
        let pair = format!("{}:{}", config.api_key, &*config.api_secret.0);
        let authorization = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        );
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        EmqxKick {
            config,
            authorization: authorization.into(),
            client,
        }
    }

    /// `{api_url}/api/v5/clients/{client_id}`, the id percent-encoded.
    pub fn url(&self, client_id: &str) -> String {
        format!(
            "{}/api/v5/clients/{}",
            self.config.api_url,
            percent_encode(client_id)
        )
    }

    /// Kicks `client_id`, retrying as described in the module docs; logs and counts
    /// the outcome.
    pub async fn kick(&self, client_id: &str) -> BrokerKick {
        let url = self.url(client_id);
        let mut last_error = String::new();
        let mut attempts = 0;
        while attempts < ATTEMPTS {
            if attempts > 0 {
                tokio::time::sleep(RETRY_PAUSE * 2u32.pow(attempts - 1)).await;
            }
            attempts += 1;
            let sent = self
                .client
                .delete(&url)
                .header(reqwest::header::AUTHORIZATION, &*self.authorization)
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await;
            let retry = match sent {
                Ok(resp) => {
                    let status = resp.status();
                    if status == reqwest::StatusCode::NO_CONTENT {
                        return done(client_id, KickOutcome::Kicked, attempts, None);
                    }
                    if status == reqwest::StatusCode::NOT_FOUND {
                        return done(client_id, KickOutcome::NotConnected, attempts, None);
                    }
                    last_error = format!("HTTP {}", status.as_u16());
                    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                }
                Err(e) => {
                    last_error = if e.is_timeout() {
                        "timeout".to_owned()
                    } else if e.is_connect() {
                        "connection".to_owned()
                    } else {
                        "request".to_owned()
                    };
                    true
                }
            };
            tracing::warn!(%client_id, attempt = attempts, error = %last_error, "EMQX kick did not succeed.");
            if !retry {
                break;
            }
        }
        done(client_id, KickOutcome::Failed, attempts, Some(last_error))
    }
}

fn done(client_id: &str, outcome: KickOutcome, attempts: u32, error: Option<String>) -> BrokerKick {
    ::metrics::counter!(metrics::EMQX_KICKS_TOTAL, "outcome" => outcome.as_str()).increment(1);
    match outcome {
        KickOutcome::Failed => tracing::error!(
            %client_id, attempts, error = error.as_deref().unwrap_or(""),
            "EMQX kick failed: the certificate is revoked, but a live connection may stay open \
             until EMQX rechecks the CRL; kick the client in EMQX's dashboard."
        ),
        _ => tracing::info!(%client_id, outcome = outcome.as_str(), attempts, "EMQX kick."),
    }
    BrokerKick {
        outcome,
        attempts,
        error,
    }
}

/// The kick answer when there is no EMQX to ask.
pub fn disabled() -> BrokerKick {
    BrokerKick {
        outcome: KickOutcome::Disabled,
        attempts: 0,
        error: None,
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metric_labels_are_the_outcomes() {
        let labels: Vec<_> = KickOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels, metrics::EMQX_KICK_OUTCOMES);
    }

    #[test]
    fn the_secret_stays_out_of_debug_and_the_id_is_encoded() {
        let kick = EmqxKick::new(EmqxConfig {
            api_url: "http://emqx:18083".into(),
            api_key: "key".into(),
            api_secret: ApiSecret::new("s3cr3t-value"),
            timeout: Duration::from_secs(1),
        });
        assert!(!format!("{kick:?}").contains("s3cr3t-value"));
        assert!(!format!("{kick:?}")
            .contains(&base64::engine::general_purpose::STANDARD.encode("key:s3cr3t-value")));
        assert_eq!(
            kick.url("a b/c"),
            "http://emqx:18083/api/v5/clients/a%20b%2Fc"
        );
    }
}
