//! Command-line arguments (every flag has an `env` twin).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use argus_pipeline::flags::MqttVersion;

use crate::pacing::{parse_duration, Rate};
use crate::payload::PropertiesMode;

#[derive(Debug, Parser)]
#[command(
    name = "argus-loadtest",
    version,
    about = "Load generator and report for the Argus ingestion edge: throughput, latency, loss, duplicates, CPU, memory.",
    long_about = "Load generator and report for the Argus ingestion edge.\n\n\
Every run registers its own devices (active devices of the demo organization named \
loadtest-<run>-<n>), publishes messages that carry runId/seq/sentAtNs, reads them back from \
TELEMETRY_RAW_V1 (its own ephemeral consumers), TELEMETRY_DLQ and telemetry_raw, and reports \
lost (acked but missing from Postgres or JetStream), duplicated and dead-lettered messages.\n\n\
Exit code: 0 when messages were sent and none was lost, duplicated or left unacked and no \
sender failed; 1 otherwise; 2 on a setup error. Results and method: docs/benchmarks.md.\n\n\
With the local stack: source .stack/env first (it sets DATABASE_OWNER_URL, NATS_URLS, MQTT_URL, \
MQTT_CA_FILE, ARGUS_PKI_DIR, INGEST_HTTP_URL, INGEST_HTTP_CA_FILE, INGEST_HTTP_ADMIN_URL, \
ARGUS_ADMIN_TOKEN)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Simulated devices over MQTT (mTLS, QoS 1), measured end to end.
    Mqtt(MqttArgs),
    /// The same accounting against the HTTP sidecar (API keys, single readings or batches).
    Http(HttpArgs),
    /// Steps the MQTT rate up until p95 exceeds a bound or anything is lost.
    Ramp(RampArgs),
    /// What each part can do alone (broker, COPY, JetStream, per-message design), as ratios.
    Baseline(BaselineArgs),
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// Where the stores are, how long to wait, where to write the report.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Postgres URL as the owner role: each run registers its devices (INSERT into
    /// devices) and reads telemetry_raw. `.stack/env` exports DATABASE_OWNER_URL.
    #[arg(long, env = "DATABASE_OWNER_URL", hide_env_values = true)]
    pub database_url: String,
    /// Comma-separated NATS URLs.
    #[arg(long, env = "NATS_URLS")]
    pub nats_urls: String,
    /// The NATS user: `loadtest` for runs (it reads the raw and dead-letter streams),
    /// `admin` for `baseline` (it makes scratch streams).
    #[command(flatten)]
    pub nats_auth: argus_schema::nats::NatsAuthArgs,
    #[arg(
        long,
        env = "ARGUS_LOADTEST_RAW_STREAM",
        default_value = argus_schema::streams::RAW_STREAM
    )]
    pub raw_stream: String,
    #[arg(
        long,
        env = "ARGUS_LOADTEST_DLQ_STREAM",
        default_value = argus_schema::streams::DLQ_STREAM
    )]
    pub dlq_stream: String,
    /// How long to wait after the last send for every acked message to show up.
    #[arg(long, env = "ARGUS_LOADTEST_SETTLE", default_value = "30s", value_parser = duration)]
    pub settle: Duration,
    /// Write the report as JSON.
    #[arg(long, env = "ARGUS_LOADTEST_JSON")]
    pub json: Option<PathBuf>,
    /// Write a Markdown summary.
    #[arg(long, env = "ARGUS_LOADTEST_MARKDOWN")]
    pub markdown: Option<PathBuf>,
    /// Write an SVG plot of p50/p95/p99 per 1-second window.
    #[arg(long, env = "ARGUS_LOADTEST_PLOT")]
    pub plot: Option<PathBuf>,
    /// Process ids to sample CPU and RSS from (repeatable). Default: every live
    /// `bridge-*.pid` (mqtt, ramp) or `ingest-http*.pid` (http) in --pid-dir.
    #[arg(
        long = "bridge-pid",
        env = "ARGUS_LOADTEST_BRIDGE_PIDS",
        value_delimiter = ','
    )]
    pub bridge_pids: Vec<u32>,
    #[arg(long, env = "ARGUS_LOADTEST_PID_DIR", default_value = ".stack/pids")]
    pub pid_dir: PathBuf,
    /// Run id (default: random `lt<8 hex>`); tags devices, client ids and payloads.
    #[arg(long, env = "ARGUS_LOADTEST_RUN_ID")]
    pub run_id: Option<String>,
    /// No progress bar.
    #[arg(long, env = "ARGUS_LOADTEST_QUIET")]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub mqtt: MqttConn,
    /// Registered (active) devices to simulate.
    #[arg(long, env = "ARGUS_LOADTEST_DEVICES", default_value_t = 10)]
    pub devices: usize,
    /// Extra devices with a valid certificate but no registry entry: their messages must be
    /// dead-lettered (`unknown_device`), never lost.
    #[arg(long, env = "ARGUS_LOADTEST_UNKNOWN_DEVICES", default_value_t = 0)]
    pub unknown_devices: usize,
    /// Devices per MQTT connection. 1 = one connection per device certificate. Above 1, a
    /// connection publishes for several devices with the first one's certificate, which the
    /// stock ACL refuses (those messages are then reported lost): needs a permissive ACL.
    #[arg(
        long,
        env = "ARGUS_LOADTEST_DEVICES_PER_CONNECTION",
        default_value_t = 1
    )]
    pub devices_per_connection: usize,
    /// Messages per second in total, or `max` (as fast as acked, bounded by --inflight).
    #[arg(long, env = "ARGUS_LOADTEST_RATE", default_value = "1000")]
    pub rate: Rate,
    /// Messages in total (ignored when --duration is given).
    #[arg(long, env = "ARGUS_LOADTEST_COUNT", default_value_t = 10_000)]
    pub count: u64,
    /// Publish for this long instead of --count messages.
    #[arg(long, env = "ARGUS_LOADTEST_DURATION", value_parser = duration)]
    pub duration: Option<Duration>,
    /// QoS 1 messages in flight per connection. With MQTT 5 the broker's Receive
    /// Maximum may lower it.
    #[arg(long, env = "ARGUS_LOADTEST_INFLIGHT", default_value_t = 100)]
    pub inflight: u16,
    /// The devices' MQTT version. 3.1.1 by default, as in the figures of
    /// docs/benchmarks.md taken before the bridge spoke MQTT 5.
    #[arg(long, env = "ARGUS_LOADTEST_MQTT_VERSION", value_enum, default_value_t = MqttVersion::V311)]
    pub mqtt_version: MqttVersion,
    /// MQTT 5 publish properties to send with every message, checked in both
    /// stores: `user` (content type, payload format indicator, correlation data,
    /// user properties) or `chunked` (`user` plus the chunked gateway's
    /// correlationId, sequenceNumber and totalChunks as user properties). Needs
    /// --mqtt-version 5.
    #[arg(long, env = "ARGUS_LOADTEST_PROPERTIES", value_enum, default_value_t = PropertiesMode::None)]
    pub properties: PropertiesMode,
}

#[derive(Debug, Clone, Args)]
pub struct MqttConn {
    #[arg(long, env = "MQTT_URL", default_value = "mqtts://127.0.0.1:17883")]
    pub mqtt_url: String,
    #[arg(long, env = "MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// The CA directory that issues the devices' certificates (argus-pki layout).
    #[arg(long, env = "ARGUS_PKI_DIR")]
    pub pki_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The sidecar's device listener (ingest), `https://` with --ingest-http-ca-file.
    #[arg(
        long,
        env = "INGEST_HTTP_URL",
        default_value = "https://127.0.0.1:17080"
    )]
    pub ingest_http_url: String,
    /// PEM CA certificate(s) the device listener's certificate must chain to (the local
    /// stack's `ca.crt`); without it, only the system's roots are trusted.
    #[arg(long, env = "INGEST_HTTP_CA_FILE")]
    pub ingest_http_ca_file: Option<PathBuf>,
    /// The sidecar's admin listener, where the API keys are created.
    #[arg(
        long,
        env = "INGEST_HTTP_ADMIN_URL",
        default_value = "http://127.0.0.1:17081"
    )]
    pub ingest_http_admin_url: String,
    #[arg(long, env = "ARGUS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    #[arg(long, env = "ARGUS_LOADTEST_DEVICES", default_value_t = 10)]
    pub devices: usize,
    /// Readings per request: 1 = single readings, K > 1 = a JSON array of K readings.
    #[arg(long, env = "ARGUS_LOADTEST_BATCH", default_value_t = 1)]
    pub batch: usize,
    /// Concurrent HTTP clients.
    #[arg(long, env = "ARGUS_LOADTEST_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Readings per second in total, or `max`.
    #[arg(long, env = "ARGUS_LOADTEST_RATE", default_value = "1000")]
    pub rate: Rate,
    #[arg(long, env = "ARGUS_LOADTEST_COUNT", default_value_t = 10_000)]
    pub count: u64,
    #[arg(long, env = "ARGUS_LOADTEST_DURATION", value_parser = duration)]
    pub duration: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
pub struct RampArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub mqtt: MqttConn,
    #[arg(long, env = "ARGUS_LOADTEST_DEVICES", default_value_t = 20)]
    pub devices: usize,
    #[arg(long, env = "ARGUS_LOADTEST_INFLIGHT", default_value_t = 100)]
    pub inflight: u16,
    /// The devices' MQTT version; a list (`5,3.1.1`) runs every step once per
    /// version, one after the other, and reports the highest sustainable rate of
    /// each: a comparison on the same machine in the same run.
    #[arg(
        long,
        env = "ARGUS_LOADTEST_MQTT_VERSION",
        value_enum,
        value_delimiter = ',',
        default_value = "3.1.1"
    )]
    pub mqtt_version: Vec<MqttVersion>,
    /// Rates to try, in order (msg/s).
    #[arg(
        long,
        env = "ARGUS_LOADTEST_STEPS",
        value_delimiter = ',',
        default_value = "1000,2000,5000,10000,15000,20000,25000,30000,40000"
    )]
    pub steps: Vec<f64>,
    /// How long each step publishes.
    #[arg(long, env = "ARGUS_LOADTEST_STEP_DURATION", default_value = "10s", value_parser = duration)]
    pub step_duration: Duration,
    /// A step fails when its p95 (publish -> JetStream) exceeds this.
    #[arg(long, env = "ARGUS_LOADTEST_P95_BOUND_MS", default_value_t = 100.0)]
    pub p95_bound_ms: f64,
}

#[derive(Debug, Clone, Args)]
pub struct BaselineArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub mqtt: MqttConn,
    /// Messages per part (the per-message design uses a tenth of it, at least 500).
    #[arg(long, env = "ARGUS_LOADTEST_COUNT", default_value_t = 20_000)]
    pub count: u64,
    /// Rows per COPY / JetStream publishes awaited together (the bridge's batch size).
    #[arg(long, env = "ARGUS_LOADTEST_BATCH", default_value_t = 500)]
    pub batch: usize,
    #[arg(long, env = "ARGUS_LOADTEST_DEVICES", default_value_t = 20)]
    pub devices: usize,
    /// The bridge's sustained rate (msg/s), e.g. from `ramp`. Default: measured in this run
    /// with an `mqtt --rate max` run of --count messages through the stack.
    #[arg(long, env = "ARGUS_LOADTEST_BRIDGE_RATE")]
    pub bridge_rate: Option<f64>,
    /// The `mosquitto` binary for the broker-alone part (a private broker on a free port,
    /// same mTLS settings, serving certificates from --pki-dir).
    #[arg(long, env = "ARGUS_LOADTEST_MOSQUITTO", default_value = "mosquitto")]
    pub mosquitto: String,
}
