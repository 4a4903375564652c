//! Keeps the CRL fresh: with `--pki-dir`, the sidecar re-signs the CRL once it
//! is older than `--crl-max-age` (default 1 day, well inside its 7-day next
//! update), so revocations stay in force without a cron job, and reloads the
//! broker as a revocation does. Its age and next update are metrics
//! ([`CRL_AGE_SECONDS`], [`CRL_NEXT_UPDATE_SECONDS`]); alert
//! `ArgusCrlNextUpdateSoon` (`compose/prometheus/rules/argus.yml`) fires when
//! neither this nor anything else re-signs it.

use std::time::Duration;

use metrics::{counter, gauge};
use time::OffsetDateTime;

use crate::state::CertState;

/// Gauge: seconds since the CRL's thisUpdate (which `argus-pki` back-dates by a
/// minute for clock skew, so a fresh CRL is 60 s old).
pub const CRL_AGE_SECONDS: &str = "argus_pki_crl_age_seconds";
/// Gauge: the CRL's next update, as a Unix timestamp.
pub const CRL_NEXT_UPDATE_SECONDS: &str = "argus_pki_crl_next_update_timestamp_seconds";
/// Counter: CRLs re-signed because they were older than `--crl-max-age`.
pub const CRL_RESIGNED_TOTAL: &str = "argus_pki_crl_resigned_total";
/// Counter: failed attempts to read or re-sign the CRL.
pub const CRL_ERRORS_TOTAL: &str = "argus_pki_crl_errors_total";

/// Describes the metrics (they appear on `/metrics` with `# HELP`).
pub fn describe() {
    metrics::describe_gauge!(
        CRL_AGE_SECONDS,
        metrics::Unit::Seconds,
        "Seconds since the CRL was signed."
    );
    metrics::describe_gauge!(
        CRL_NEXT_UPDATE_SECONDS,
        metrics::Unit::Seconds,
        "The CRL's next update (Unix time)."
    );
    metrics::describe_counter!(
        CRL_RESIGNED_TOTAL,
        "CRLs re-signed by the sidecar (older than --crl-max-age)."
    );
    metrics::describe_counter!(CRL_ERRORS_TOTAL, "Failed reads or re-signs of the CRL.");
    counter!(CRL_RESIGNED_TOTAL).absolute(0);
    counter!(CRL_ERRORS_TOTAL).absolute(0);
}

/// Runs forever: checks the CRL every `max_age / 4` (at most every minute) and
/// re-signs it once it is older than `max_age` or missing.
pub async fn keep_fresh(cert: CertState, max_age: Duration) {
    let period = (max_age / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ca = cert.ca.clone();
        let checked = tokio::task::spawn_blocking(move || -> Result<bool, argus_pki::PkiError> {
            let max_age = time::Duration::try_from(max_age).unwrap_or(time::Duration::MAX);
            let mut times = ca.crl_times()?;
            let due = times
                .is_none_or(|(this_update, _)| OffsetDateTime::now_utc() - this_update >= max_age);
            if due {
                let info = ca.write_crl()?;
                times = Some((info.this_update, info.next_update));
            }
            if let Some((this_update, next_update)) = times {
                let age = (OffsetDateTime::now_utc() - this_update).as_seconds_f64();
                gauge!(CRL_AGE_SECONDS).set(age.max(0.0));
                gauge!(CRL_NEXT_UPDATE_SECONDS).set(next_update.unix_timestamp() as f64);
            }
            Ok(due)
        })
        .await;
        match checked {
            Ok(Ok(true)) => {
                counter!(CRL_RESIGNED_TOTAL).increment(1);
                tracing::info!(
                    max_age_s = max_age.as_secs(),
                    "CRL re-signed (older than --crl-max-age)."
                );
                cert.reload_broker();
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                counter!(CRL_ERRORS_TOTAL).increment(1);
                tracing::warn!(error = %e, "Cannot read or re-sign the CRL; retrying.");
            }
            Err(e) => {
                counter!(CRL_ERRORS_TOTAL).increment(1);
                tracing::warn!(error = %e, "CRL task failed; retrying.");
            }
        }
    }
}
