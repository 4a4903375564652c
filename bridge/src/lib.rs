//! `argus-bridge`: the MQTT source of the Argus ingestion edge, and its binary. What
//! it shares with the HTTP sidecar (checks, message ids, registry, sink, dead
//! letters) is `argus-pipeline`; this crate adds only what is MQTT's own.
//!
//! Layout (data flows top to bottom):
//! - [`source`]: MQTT shared-subscription connections (rumqttc), ordered PUBACKs.
//! - [`admit`]: one message through the checks and the registry into the sink, or to the DLQ.
//! - [`app`]: wires it all together: `app::run(config, shutdown)`, used by the binary and the tests.
//! - [`server`]: `/health`, `/ready`, `/metrics`.
//! - [`config`]: the command-line flags (each with an `env` twin) and their validation.
//! - [`lease`]: replica slot leases for `--replica auto`.
//! - [`replay`]: `argus-dlq list|replay`, the dead-letter stream back through [`admit`].
//! - [`metrics`]: the bridge's own metric names (`argus_bridge_*`).

pub mod admit;
pub mod app;
pub mod config;
pub mod lease;
pub mod metrics;
pub mod replay;
pub mod server;
pub mod source;
