//! `argus-loadtest`: the load generator and report for the Argus ingestion edge.
//!
//! Every run registers its own devices, publishes payloads that carry `runId`, `seq` and
//! `sentAtNs`, reads them back from every store and accounts for each message: persisted,
//! published, dead-lettered, lost or duplicated. `docs/benchmarks.md` has the results.
//!
//! Layout (the subcommands, then the parts they share):
//! - [`commands`]: `mqtt` and `http` runs; [`ramp`]: rate steps until p95 or loss says
//!   stop; [`baseline`]: each part alone (broker, COPY, JetStream, per-message design).
//! - [`cli`]: clap arguments, every flag with an `env` twin.
//! - [`mqtt`]: mTLS QoS 1 publishers (rumqttc), PUBACKs counted per packet id.
//! - [`device_client`]: the devices' MQTT 3.1.1 and 5 clients behind one face, and
//!   their publish properties (`--mqtt-version`, `--properties`).
//! - [`acks`]: matching PUBACKs to messages across reconnects (pure bookkeeping).
//! - [`http`]: API keys through the admin API, concurrent single/batch readings (reqwest).
//! - [`devices`]: the run's devices in Postgres and their certificates from `argus_pki`.
//! - [`run`]: the measuring harness: collectors first, senders, settle, report.
//! - [`collect`]: the test's own JetStream consumers (raw stream, DLQ) and Postgres counts.
//! - [`payload`]: realistic readings and their markers.
//! - [`pacing`]: fixed-rate or as-fast-as-acked pacing; `--rate` and duration syntax.
//! - [`accounting`]: lost / duplicated / dead-lettered arithmetic (pure).
//! - [`latency`]: HDR histograms for the run and per 1-second window.
//! - [`procstat`]: CPU and RSS of the bridge, of every stack process tree and of the machine.
//! - [`report`]: JSON, terminal table, Markdown, SVG plot.
//! - [`stop`]: a stop flag for background tasks.

pub mod accounting;
pub mod acks;
pub mod baseline;
pub mod cli;
pub mod collect;
pub mod commands;
pub mod device_client;
pub mod devices;
pub mod http;
pub mod latency;
pub mod mqtt;
pub mod pacing;
pub mod payload;
pub mod procstat;
pub mod ramp;
pub mod report;
pub mod run;
pub mod stop;
