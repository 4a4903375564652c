//! Every metric name of the bridge (and of the sink and DLQ it shares with the
//! HTTP sidecar), in one place.
//!
//! Naming: `argus_<component>_<what>_<unit>`; counters end in `_total`,
//! histograms of time in `_seconds`. Labels are bounded (`reason`, `stage`,
//! `source`, `target`), never a device id. Components: `bridge` (the MQTT
//! source and process), `sink` (batching, Postgres, JetStream; also runs in
//! `argus-ingest-http`), `dlq` (dead letters), `registry` (device look-ups).
//!
//! Call [`describe`] once at start-up, after installing the recorder, so
//! `/metrics` carries `# HELP` lines. Recording is through the small helper
//! functions below, so call sites cannot misspell a name or a label.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use crate::dlq::DlqReason;
use crate::reading::Source;

// ---- bridge (MQTT source) -------------------------------------------------

/// Counter: MQTT publishes received from the broker (before any check).
pub const RECEIVED_TOTAL: &str = "argus_bridge_received_total";
/// Counter: PUBACKs sent to the broker (after durability or dead-lettering).
pub const ACKS_TOTAL: &str = "argus_bridge_acks_total";
/// Histogram: seconds from receiving a message to sending its PUBACK.
pub const ACK_LAG_SECONDS: &str = "argus_bridge_ack_lag_seconds";
/// Gauge: messages received and not yet acknowledged (all connections).
pub const IN_FLIGHT_MESSAGES: &str = "argus_bridge_in_flight_messages";
/// Counter: MQTT (re)connections after the first, label `target` = `mqtt`.
pub const RECONNECTS_TOTAL: &str = "argus_bridge_reconnects_total";
/// Gauge: 1 while the connection to the broker is up (label `connection` = index, bounded by `--connections`).
pub const MQTT_CONNECTED: &str = "argus_bridge_mqtt_connected";
/// Counter: messages rejected by the checks, label `reason` (they go to the DLQ).
pub const REJECTED_TOTAL: &str = "argus_bridge_rejected_total";

// ---- sink (shared with the HTTP sidecar) ----------------------------------

/// Counter: readings accepted into the sink queue, label `source` = mqtt|http.
pub const SINK_ENQUEUED_TOTAL: &str = "argus_sink_enqueued_total";
/// Counter: readings durable in Postgres (new rows plus duplicates already stored).
pub const PERSISTED_TOTAL: &str = "argus_sink_persisted_total";
/// Counter: readings acknowledged by JetStream.
pub const PUBLISHED_TOTAL: &str = "argus_sink_published_total";
/// Counter: readings that were already in `telemetry_raw` (or twice in one batch); no second row.
pub const DUPLICATES_SKIPPED_TOTAL: &str = "argus_sink_duplicates_skipped_total";
/// Counter: JetStream acks flagged `duplicate` (deduplicated by `Nats-Msg-Id`).
pub const PUBLISH_DUPLICATES_TOTAL: &str = "argus_sink_publish_duplicates_total";
/// Histogram: readings per flushed batch.
pub const BATCH_SIZE_MESSAGES: &str = "argus_sink_batch_size_messages";
/// Histogram: seconds per flush stage, label `stage` = postgres|jetstream.
pub const FLUSH_DURATION_SECONDS: &str = "argus_sink_flush_duration_seconds";
/// Histogram: seconds from `received_at` until a reading is durable in both stores.
pub const DURABLE_LAG_SECONDS: &str = "argus_sink_durable_lag_seconds";
/// Gauge: readings held by the sink (queued, batching, or being flushed).
pub const SINK_QUEUED_MESSAGES: &str = "argus_sink_queued_messages";
/// Counter: failed flush attempts that will be retried, label `stage` = postgres|jetstream|dlq.
pub const FLUSH_RETRIES_TOTAL: &str = "argus_sink_flush_retries_total";
/// Counter: batches redone through the staging table after a unique violation.
pub const STAGING_FALLBACKS_TOTAL: &str = "argus_sink_staging_fallbacks_total";
/// Gauge: 1 while the last flush attempt succeeded, 0 while retrying.
pub const SINK_HEALTHY: &str = "argus_sink_healthy";

// ---- dlq -------------------------------------------------------------------

/// Counter: dead letters acknowledged by JetStream, label `reason`.
pub const DEAD_LETTERED_TOTAL: &str = "argus_dlq_dead_lettered_total";
/// Counter: dead letters that could not be written (the message stays unacknowledged).
pub const DLQ_PUBLISH_FAILURES_TOTAL: &str = "argus_dlq_publish_failures_total";

/// Registers `# HELP` text for every metric above. Idempotent.
pub fn describe() {
    describe_counter!(RECEIVED_TOTAL, "MQTT messages received from the broker.");
    describe_counter!(ACKS_TOTAL, "PUBACKs sent to the broker.");
    describe_histogram!(
        ACK_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Time from receiving a message to acknowledging it."
    );
    describe_gauge!(
        IN_FLIGHT_MESSAGES,
        "Messages received and not yet acknowledged."
    );
    describe_counter!(
        RECONNECTS_TOTAL,
        "Reconnections after the first connection."
    );
    describe_gauge!(MQTT_CONNECTED, "1 while the MQTT connection is up.");
    describe_counter!(
        REJECTED_TOTAL,
        "Messages rejected by the checks, by reason."
    );
    describe_counter!(
        SINK_ENQUEUED_TOTAL,
        "Readings accepted into the sink queue."
    );
    describe_counter!(PERSISTED_TOTAL, "Readings durable in Postgres.");
    describe_counter!(PUBLISHED_TOTAL, "Readings acknowledged by JetStream.");
    describe_counter!(
        DUPLICATES_SKIPPED_TOTAL,
        "Readings already stored; no second row was written."
    );
    describe_counter!(
        PUBLISH_DUPLICATES_TOTAL,
        "JetStream acks flagged as duplicate by Nats-Msg-Id."
    );
    describe_histogram!(BATCH_SIZE_MESSAGES, "Readings per flushed batch.");
    describe_histogram!(
        FLUSH_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Duration of each flush stage."
    );
    describe_histogram!(
        DURABLE_LAG_SECONDS,
        metrics::Unit::Seconds,
        "Time from receipt until durable in Postgres and JetStream."
    );
    describe_gauge!(SINK_QUEUED_MESSAGES, "Readings held by the sink.");
    describe_counter!(FLUSH_RETRIES_TOTAL, "Failed flush attempts, retried.");
    describe_counter!(
        STAGING_FALLBACKS_TOTAL,
        "Batches redone through the staging table after a unique violation."
    );
    describe_gauge!(
        SINK_HEALTHY,
        "1 while the sink's last flush attempt succeeded."
    );
    describe_counter!(DEAD_LETTERED_TOTAL, "Dead letters written, by reason.");
    describe_counter!(
        DLQ_PUBLISH_FAILURES_TOTAL,
        "Dead letters that could not be written."
    );
    describe_registry();
    register_zeroes();
}

/// Registers every counter of a bounded label set at zero, so each series exists from
/// start-up: Prometheus' `rate()` and `increase()` then see the first event, and a
/// dashboard or alert never queries a name that is not exported yet.
fn register_zeroes() {
    for name in [
        RECEIVED_TOTAL,
        ACKS_TOTAL,
        RECONNECTS_TOTAL,
        PERSISTED_TOTAL,
        PUBLISHED_TOTAL,
        DUPLICATES_SKIPPED_TOTAL,
        PUBLISH_DUPLICATES_TOTAL,
        STAGING_FALLBACKS_TOTAL,
        DLQ_PUBLISH_FAILURES_TOTAL,
    ] {
        counter!(name).absolute(0);
    }
    for reason in DlqReason::ALL {
        counter!(DEAD_LETTERED_TOTAL, "reason" => reason.as_str()).absolute(0);
        counter!(REJECTED_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
    for stage in ["postgres", "jetstream", "dlq"] {
        counter!(FLUSH_RETRIES_TOTAL, "stage" => stage).absolute(0);
    }
    for source in [Source::Mqtt, Source::Http] {
        counter!(SINK_ENQUEUED_TOTAL, "source" => source.as_str()).absolute(0);
    }
    gauge!(IN_FLIGHT_MESSAGES).set(0.0);
    gauge!(SINK_QUEUED_MESSAGES).set(0.0);
}

// ---- recording helpers -------------------------------------------------------

pub fn dead_lettered(reason: DlqReason) {
    counter!(DEAD_LETTERED_TOTAL, "reason" => reason.as_str()).increment(1);
}

pub fn dlq_publish_failed() {
    counter!(DLQ_PUBLISH_FAILURES_TOTAL).increment(1);
}

pub fn rejected(reason: DlqReason) {
    counter!(REJECTED_TOTAL, "reason" => reason.as_str()).increment(1);
}

pub fn sink_enqueued(source: Source, n: usize) {
    counter!(SINK_ENQUEUED_TOTAL, "source" => source.as_str()).increment(n as u64);
}

pub fn sink_queued(delta: f64) {
    gauge!(SINK_QUEUED_MESSAGES).increment(delta);
}

pub fn persisted(n: usize) {
    counter!(PERSISTED_TOTAL).increment(n as u64);
}

pub fn published(n: usize) {
    counter!(PUBLISHED_TOTAL).increment(n as u64);
}

pub fn duplicates_skipped(n: usize) {
    counter!(DUPLICATES_SKIPPED_TOTAL).increment(n as u64);
}

pub fn publish_duplicates(n: usize) {
    counter!(PUBLISH_DUPLICATES_TOTAL).increment(n as u64);
}

pub fn batch_size(n: usize) {
    histogram!(BATCH_SIZE_MESSAGES).record(n as f64);
}

/// `stage` is one of `postgres`, `jetstream`.
pub fn flush_duration(stage: &'static str, d: Duration) {
    histogram!(FLUSH_DURATION_SECONDS, "stage" => stage).record(d.as_secs_f64());
}

pub fn durable_lag(d: Duration) {
    histogram!(DURABLE_LAG_SECONDS).record(d.as_secs_f64());
}

/// `stage` is one of `postgres`, `jetstream`, `dlq`.
pub fn flush_retry(stage: &'static str) {
    counter!(FLUSH_RETRIES_TOTAL, "stage" => stage).increment(1);
}

pub fn staging_fallback() {
    counter!(STAGING_FALLBACKS_TOTAL).increment(1);
}

pub fn sink_healthy(ok: bool) {
    gauge!(SINK_HEALTHY).set(if ok { 1.0 } else { 0.0 });
}

// registry: the registry engineer adds the registry's names below this line.
// ---- registry (owned by the registry work; `crate::registry` records these) ----

/// Counter: registry look-ups by cache layer and result.
/// Labels: `layer` = `local` | `redis` | `postgres`; `result` = `hit` | `miss` | `error` | `skipped`
/// (`skipped`: Redis not asked because it failed less than `redis_retry_after` ago).
pub const REGISTRY_CACHE_LOOKUPS_TOTAL: &str = "argus_registry_cache_lookups_total";
/// Counter: failed or timed-out Redis calls of the registry (look-ups, fills, invalidations, subscribe).
pub const REGISTRY_REDIS_ERRORS_TOTAL: &str = "argus_registry_redis_errors_total";
/// Counter: invalidation messages received on `cache:invalidate`, label `type`.
pub const REGISTRY_INVALIDATIONS_TOTAL: &str = "argus_registry_invalidations_total";

/// `# HELP` lines of the registry metrics (called by [`describe`] or at start-up).
pub fn describe_registry() {
    describe_counter!(
        REGISTRY_CACHE_LOOKUPS_TOTAL,
        "Registry look-ups by cache layer and result."
    );
    describe_counter!(
        REGISTRY_REDIS_ERRORS_TOTAL,
        "Failed or timed-out Redis calls of the registry."
    );
    describe_counter!(
        REGISTRY_INVALIDATIONS_TOTAL,
        "Cache invalidation messages received."
    );
}
// ---- end registry ----
