//! `argus-pipeline`: what every Argus source (the MQTT bridge, the HTTP sidecar)
//! shares, from a message's bytes to "durable in Postgres and JetStream".
//!
//! Layout (data flows top to bottom):
//! - [`reading`]: topic and payload checks; turns an accepted message into a [`reading::Reading`].
//! - [`properties`]: MQTT 5 publish properties: bounds, chunk fields, their JSON for both stores.
//! - [`reject`]: why a message is refused: [`reject::DlqReason`] and [`reject::Reject`].
//! - [`digest`]: SHA-256 (ring's assembly), for ids and content digests.
//! - [`message_id`]: the deterministic message id (dedup key in Postgres and JetStream).
//! - [`registry`]: device and API-key look-ups (memory -> Redis -> Postgres) with invalidation.
//! - [`sink`]: batching, `COPY` into `telemetry_raw`, pipelined JetStream publishes.
//! - [`envelope`]: the JSON envelope published to `TELEMETRY_RAW_V1`.
//! - [`dlq`]: dead letters to `TELEMETRY_DLQ` with their reason.
//! - [`limits`]: the NATS server's `max_payload`, checked against each binary's payload limit at start-up and per reading.
//! - [`metrics`]: every shared metric name, and the process's Prometheus recorder.
//! - [`pg`]: the Postgres connection pool.
//! - [`nats`]: the NATS connection: login as `--nats-user`, server errors counted, refusals the sink reads.
//! - [`backoff`]: the one retry delay (exponential, capped, jittered).
//! - [`flags`]: shared command-line flag blocks, `parse_duration`, `ConfigError`.
//! - [`process`]: what every binary does at start and stop: logging, SIGTERM/SIGINT.
//!
//! Stream and subject names come from `argus_schema::streams`, which defines the
//! topology. A source crate adds only what is its own: how messages arrive, how
//! they are acknowledged, and its binary.

pub mod backoff;
pub mod digest;
pub mod dlq;
pub mod envelope;
pub mod flags;
pub mod limits;
pub mod message_id;
pub mod metrics;
pub mod nats;
pub mod pg;
pub mod process;
pub mod properties;
pub mod reading;
pub mod registry;
pub mod reject;
pub mod sink;
