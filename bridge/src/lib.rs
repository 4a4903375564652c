//! `argus-bridge`: the MQTT source and the shared ingestion pipeline.
//!
//! Layout (data flows top to bottom):
//! - [`source`]: MQTT shared-subscription connections (rumqttc), ordered PUBACKs.
//! - [`reading`]: topic and payload checks; turns an accepted message into a [`reading::Reading`].
//! - [`message_id`]: the deterministic message id (dedup key in Postgres and JetStream).
//! - [`registry`]: device and API-key look-ups (memory -> Redis -> Postgres) with invalidation.
//! - [`sink`]: batching, `COPY` into `telemetry_raw`, pipelined JetStream publishes.
//! - [`envelope`]: the JSON envelope published to `TELEMETRY_RAW_V1`.
//! - [`dlq`]: dead letters to `TELEMETRY_DLQ` with their reason.
//! - [`metrics`]: every metric name, in one place.
//! - [`pg`]: the Postgres connection pool (shared with the HTTP sidecar).
//! - [`server`]: `/health`, `/ready`, `/metrics`.
//! - [`config`]: the command-line flags (each with an `env` twin) and their validation.
//! - [`lease`]: replica slot leases for `--replica auto`.
//! - [`app`]: wires it all together: `app::run(config, shutdown)`, used by the binary and the tests.

pub mod app;
pub mod config;
pub mod dlq;
pub mod envelope;
pub mod lease;
pub mod message_id;
pub mod metrics;
pub mod pg;
pub mod reading;
pub mod registry;
pub mod server;
pub mod sink;
pub mod source;
