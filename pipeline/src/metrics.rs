//! Every metric name of the shared pipeline, in one place, and the process's
//! Prometheus recorder.
//!
//! Naming, for every Argus crate: `argus_<component>_<what>_<unit>`; counters end
//! in `_total`, histograms of time in `_seconds`. Labels are bounded (`reason`,
//! `stage`, `source`, `layer`, `result`, `type`), never a device id. The
//! components here are `sink` (batching, Postgres, JetStream), `dlq` (dead
//! letters) and `registry` (device look-ups); they run in every source process.
//! Each source crate keeps its own names the same way (`argus-bridge`'s
//! `metrics` module for `argus_bridge_*`, `argus-ingest-http`'s for
//! `argus_http_*`) and its `describe()` calls [`describe`] here.
//!
//! At start-up: [`prometheus_handle`] (installs the recorder once per process),
//! then [`describe`], so `/metrics` carries `# HELP` lines and every counter of a
//! bounded label set exists at zero. Recording is through the small helper
//! functions below, so call sites cannot misspell a name or a label.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::reading::Source;
use crate::reject::DlqReason;

// ---- sink -----------------------------------------------------------------

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
/// Gauge: payload bytes held by the sink (bounded by `queue_max_bytes`).
pub const SINK_QUEUED_BYTES: &str = "argus_sink_queued_bytes";
/// The linger the next batch gets (adaptive: less while the sink is not busy).
pub const SINK_BATCH_LINGER_SECONDS: &str = "argus_sink_batch_linger_seconds";
/// Counter: batches split in halves, label `cause` = data|timeout.
pub const BATCH_SPLITS_TOTAL: &str = "argus_sink_batch_splits_total";
/// Counter: readings that reused a stored message id with other content (dead-lettered
/// as `id_conflict`).
pub const ID_CONFLICTS_TOTAL: &str = "argus_sink_id_conflicts_total";

// ---- nats ------------------------------------------------------------------

/// Counter: errors the NATS server reported on this process's connection, label
/// `kind` = refused (a publish or subscription its permissions do not allow)|authorization
/// (login refused)|slow_consumer.
pub const NATS_SERVER_ERRORS_TOTAL: &str = "argus_nats_server_errors_total";
/// Counter: JetStream publish attempts of the sink that failed while the server refused
/// this user a publish (its permissions): retried at the longest delay, never acknowledged.
pub const PUBLISH_REFUSED_TOTAL: &str = "argus_sink_publish_refused_total";

/// The `kind` labels of [`NATS_SERVER_ERRORS_TOTAL`].
pub const NATS_ERROR_KINDS: [&str; 3] = ["refused", "authorization", "slow_consumer"];

// ---- dlq -------------------------------------------------------------------

/// Counter: dead letters acknowledged by JetStream, label `reason`.
pub const DEAD_LETTERED_TOTAL: &str = "argus_dlq_dead_lettered_total";
/// Counter: dead-letter publish attempts that failed (retried when transient).
pub const DLQ_PUBLISH_FAILURES_TOTAL: &str = "argus_dlq_publish_failures_total";
/// Counter: dead letters given up because no retry can write them (even empty they
/// exceed the server's `max_payload`), label `reason`. The start-up check rules this
/// out; any increase is a misconfigured server.
pub const DLQ_UNWRITABLE_TOTAL: &str = "argus_dlq_unwritable_total";

/// Registers `# HELP` text for every metric above and the zero series. Idempotent.
pub fn describe() {
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
        NATS_SERVER_ERRORS_TOTAL,
        "Errors the NATS server reported on this process's connection, by kind."
    );
    describe_counter!(
        PUBLISH_REFUSED_TOTAL,
        "JetStream publish attempts that failed while NATS refused this user a publish."
    );
    for kind in NATS_ERROR_KINDS {
        counter!(NATS_SERVER_ERRORS_TOTAL, "kind" => kind).absolute(0);
    }
    counter!(PUBLISH_REFUSED_TOTAL).absolute(0);
    describe_counter!(
        STAGING_FALLBACKS_TOTAL,
        "Batches redone through the staging table after a unique violation."
    );
    describe_gauge!(
        SINK_HEALTHY,
        "1 while the sink's last flush attempt succeeded."
    );
    describe_gauge!(SINK_QUEUED_BYTES, "Payload bytes held by the sink.");
    describe_gauge!(
        SINK_BATCH_LINGER_SECONDS,
        "The linger the next batch gets (adaptive: shorter while the sink is not busy)."
    );
    describe_counter!(
        BATCH_SPLITS_TOTAL,
        "Batches split in halves after a data error or a timeout."
    );
    describe_counter!(
        ID_CONFLICTS_TOTAL,
        "Readings that reused a stored message id with other content."
    );
    describe_counter!(DEAD_LETTERED_TOTAL, "Dead letters written, by reason.");
    describe_counter!(
        DLQ_PUBLISH_FAILURES_TOTAL,
        "Dead-letter publish attempts that failed."
    );
    describe_counter!(
        DLQ_UNWRITABLE_TOTAL,
        "Dead letters given up: no retry can write them."
    );
    describe_registry();
    register_zeroes();
}

/// Registers every counter of a bounded label set at zero, so each series exists from
/// start-up: Prometheus' `rate()` and `increase()` then see the first event, and a
/// dashboard or alert never queries a name that is not exported yet.
fn register_zeroes() {
    for name in [
        PERSISTED_TOTAL,
        PUBLISHED_TOTAL,
        DUPLICATES_SKIPPED_TOTAL,
        PUBLISH_DUPLICATES_TOTAL,
        STAGING_FALLBACKS_TOTAL,
        ID_CONFLICTS_TOTAL,
        DLQ_PUBLISH_FAILURES_TOTAL,
    ] {
        counter!(name).absolute(0);
    }
    for reason in DlqReason::ALL {
        counter!(DEAD_LETTERED_TOTAL, "reason" => reason.as_str()).absolute(0);
        counter!(DLQ_UNWRITABLE_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
    for cause in ["data", "timeout"] {
        counter!(BATCH_SPLITS_TOTAL, "cause" => cause).absolute(0);
    }
    for stage in ["postgres", "jetstream", "dlq"] {
        counter!(FLUSH_RETRIES_TOTAL, "stage" => stage).absolute(0);
    }
    for source in [Source::Mqtt, Source::Http] {
        counter!(SINK_ENQUEUED_TOTAL, "source" => source.as_str()).absolute(0);
    }
    gauge!(SINK_QUEUED_MESSAGES).set(0.0);
    gauge!(SINK_QUEUED_BYTES).set(0.0);
}

// ---- recording helpers -------------------------------------------------------

/// A metric handle resolved once per call site: `cached!(Counter, counter!(NAME))`.
///
/// `counter!` and friends build their key and look it up in the recorder's registry on
/// every call; the handle records with one atomic operation. A series recorded once or
/// more per message goes through here (`docs/benchmarks.md`, "Instructions per
/// message"). The process's recorder is installed first ([`prometheus_handle`]), so no
/// handle is ever bound to the no-op recorder. Labels must be fixed at the call site.
#[macro_export]
macro_rules! cached {
    ($ty:ident, $make:expr) => {{
        static HANDLE: ::std::sync::OnceLock<::metrics::$ty> = ::std::sync::OnceLock::new();
        HANDLE.get_or_init(|| {
            let _ = $crate::metrics::prometheus_handle();
            $make
        })
    }};
}
pub use cached;

pub fn dead_lettered(reason: DlqReason) {
    counter!(DEAD_LETTERED_TOTAL, "reason" => reason.as_str()).increment(1);
}

pub fn dlq_publish_failed() {
    counter!(DLQ_PUBLISH_FAILURES_TOTAL).increment(1);
}

pub fn dlq_unwritable(reason: DlqReason) {
    counter!(DLQ_UNWRITABLE_TOTAL, "reason" => reason.as_str()).increment(1);
}

pub fn sink_enqueued(source: Source, n: usize) {
    let c = match source {
        Source::Mqtt => cached!(Counter, counter!(SINK_ENQUEUED_TOTAL, "source" => "mqtt")),
        Source::Http => cached!(Counter, counter!(SINK_ENQUEUED_TOTAL, "source" => "http")),
    };
    c.increment(n as u64);
}

pub fn sink_queued(delta: f64) {
    cached!(Gauge, gauge!(SINK_QUEUED_MESSAGES)).increment(delta);
}

pub fn sink_linger(linger: std::time::Duration) {
    cached!(Gauge, gauge!(SINK_BATCH_LINGER_SECONDS)).set(linger.as_secs_f64());
}

pub fn sink_queued_bytes(delta: f64) {
    cached!(Gauge, gauge!(SINK_QUEUED_BYTES)).increment(delta);
}

/// `cause` is `data` or `timeout`.
pub fn batch_split(cause: &'static str) {
    counter!(BATCH_SPLITS_TOTAL, "cause" => cause).increment(1);
}

pub fn id_conflicts(n: usize) {
    cached!(Counter, counter!(ID_CONFLICTS_TOTAL)).increment(n as u64);
}

pub fn persisted(n: usize) {
    cached!(Counter, counter!(PERSISTED_TOTAL)).increment(n as u64);
}

pub fn published(n: usize) {
    cached!(Counter, counter!(PUBLISHED_TOTAL)).increment(n as u64);
}

pub fn duplicates_skipped(n: usize) {
    cached!(Counter, counter!(DUPLICATES_SKIPPED_TOTAL)).increment(n as u64);
}

pub fn publish_duplicates(n: usize) {
    cached!(Counter, counter!(PUBLISH_DUPLICATES_TOTAL)).increment(n as u64);
}

pub fn batch_size(n: usize) {
    cached!(Histogram, histogram!(BATCH_SIZE_MESSAGES)).record(n as f64);
}

/// `stage` is one of `postgres`, `jetstream`.
pub fn flush_duration(stage: &'static str, d: Duration) {
    let h = match stage {
        "postgres" => cached!(
            Histogram,
            histogram!(FLUSH_DURATION_SECONDS, "stage" => "postgres")
        ),
        "jetstream" => cached!(
            Histogram,
            histogram!(FLUSH_DURATION_SECONDS, "stage" => "jetstream")
        ),
        _ => &histogram!(FLUSH_DURATION_SECONDS, "stage" => stage),
    };
    h.record(d.as_secs_f64());
}

pub fn durable_lag(d: Duration) {
    cached!(Histogram, histogram!(DURABLE_LAG_SECONDS)).record(d.as_secs_f64());
}

/// `stage` is one of `postgres`, `jetstream`, `dlq`.
/// One server error on a NATS connection, `kind` one of [`NATS_ERROR_KINDS`].
pub fn nats_server_error(kind: &'static str) {
    counter!(NATS_SERVER_ERRORS_TOTAL, "kind" => kind).increment(1);
}

pub fn publish_refused() {
    counter!(PUBLISH_REFUSED_TOTAL).increment(1);
}

pub fn flush_retry(stage: &'static str) {
    counter!(FLUSH_RETRIES_TOTAL, "stage" => stage).increment(1);
}

pub fn staging_fallback() {
    counter!(STAGING_FALLBACKS_TOTAL).increment(1);
}

pub fn sink_healthy(ok: bool) {
    gauge!(SINK_HEALTHY).set(if ok { 1.0 } else { 0.0 });
}

// ---- registry (`crate::registry` records these) ------------------------------

/// Counter: registry look-ups by cache layer and result.
/// Labels: `layer` = `local` | `redis` | `postgres`; `result` = `hit` | `miss` | `error` | `skipped`
/// (`skipped`: Redis not asked because it failed less than `redis_retry_after` ago).
pub const REGISTRY_CACHE_LOOKUPS_TOTAL: &str = "argus_registry_cache_lookups_total";
/// Counter: failed or timed-out Redis calls of the registry (look-ups, fills, invalidations, subscribe).
pub const REGISTRY_REDIS_ERRORS_TOTAL: &str = "argus_registry_redis_errors_total";
/// Counter: invalidation messages received on `cache:invalidate`, label `type`.
pub const REGISTRY_INVALIDATIONS_TOTAL: &str = "argus_registry_invalidations_total";

/// `# HELP` lines of the registry metrics (called by [`describe`]).
fn describe_registry() {
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

// ---- the recorder ------------------------------------------------------------

/// Histogram buckets of every `_seconds` histogram: 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of [`BATCH_SIZE_MESSAGES`].
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
];

/// The process-wide Prometheus handle. The `metrics` facade has one recorder per
/// process: the first call installs it, later calls (a second bridge or sidecar in
/// one test process) share it. No listener is bound; each binary's `/metrics`
/// renders through this handle.
pub fn prometheus_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(SECONDS_BUCKETS)
                // Only fails for empty bucket lists; ours are fixed and non-empty.
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full(BATCH_SIZE_MESSAGES.to_string()),
                    BATCH_BUCKETS,
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. a test harness);
            // then our handle renders nothing but the process still works.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
