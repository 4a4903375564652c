//! Command-line flags (each with an environment twin) and their validation.
//!
//! [`Cli`] is what clap parses; [`Cli::into_config`] checks it and returns a
//! [`Config`] whose fields are already typed (durations, socket addresses, the
//! broker address split into scheme, host and port, in [`url`]). Validation
//! errors name the flag, never panic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use argus_pipeline::flags::{BatchArgs, FlagEnv, NatsArgs, PgArgs, RedisArgs, ShutdownArgs};
use argus_pipeline::properties::PropertyLimits;
use clap::{Parser, ValueEnum};

mod admit;
mod mqtt;
mod url;
pub use admit::AdmitArgs;
pub use mqtt::{ClientIdentity, IntakeLimits, MqttConfig, MqttVersion, SessionExpiry};
pub use url::{parse_mqtt_url, MqttAddr, MqttScheme};

pub use argus_pipeline::flags::{parse_duration, ConfigError};

/// The bridge's env names and defaults of the shared flag blocks.
#[derive(Debug, Clone)]
pub struct BridgeEnv;

impl FlagEnv for BridgeEnv {
    const PG_POOL_SIZE: &'static str = "ARGUS_BRIDGE_PG_POOL_SIZE";
    const PG_POOL_SIZE_DEFAULT: &'static str = "8";
    const BATCH_SIZE: &'static str = "ARGUS_BRIDGE_BATCH_SIZE";
    const BATCH_SIZE_DEFAULT: &'static str = "500";
    const BATCH_LINGER: &'static str = "ARGUS_BRIDGE_BATCH_LINGER";
    const BATCH_LINGER_DEFAULT: &'static str = "20ms";
    const BATCH_LINGER_MODE: &'static str = "ARGUS_BRIDGE_BATCH_LINGER_MODE";
    const BATCH_MAX_BYTES: &'static str = "ARGUS_BRIDGE_BATCH_MAX_BYTES";
    const BATCH_MAX_BYTES_DEFAULT: &'static str = "8388608";
    const SHUTDOWN_TIMEOUT: &'static str = "ARGUS_BRIDGE_SHUTDOWN_TIMEOUT";
    const SHUTDOWN_TIMEOUT_DEFAULT: &'static str = "10s";
}

/// The `argus-bridge` command line. Every flag has an `env` twin.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "argus-bridge",
    version,
    about = "MQTT shared subscriber: stores device telemetry once in Postgres, publishes it once to JetStream, then acknowledges the broker.",
    long_about = None,
    // A flag given twice (or on top of its env twin) takes the last value.
    args_override_self = true
)]
pub struct Cli {
    /// Broker address: `mqtts://host:port` (mutual TLS) or `mqtt://host:port` (plain, tests only).
    #[arg(long, env = "MQTT_URL", default_value = "mqtts://127.0.0.1:8883")]
    pub mqtt_url: String,

    /// PEM file with the CA that signed the broker's certificate (required for mqtts://).
    #[arg(long, env = "MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// PEM file with the client certificate (chain). `{replica}` and `{connection}` are
    /// replaced per connection, e.g. `bridges/bridge-{replica}-{connection}.crt`: a broker that
    /// takes the client id from the certificate's CN (our Mosquitto, EMQX `peer_cert_as_clientid`)
    /// needs one certificate per connection, CN = `bridge-<replica>-<connection>`.
    #[arg(long, env = "MQTT_CERT_FILE")]
    pub mqtt_cert_file: Option<PathBuf>,

    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1); same placeholders as the certificate.
    #[arg(long, env = "MQTT_KEY_FILE")]
    pub mqtt_key_file: Option<PathBuf>,

    /// Replica slot of this process: a number, or `auto` to lease the lowest free slot
    /// below `--max-replicas` through a Postgres advisory lock (for orchestrators that
    /// cannot number replicas, e.g. `docker compose --scale`). MQTT client ids are
    /// `bridge-<replica>-<connection>`; a restarted replica must get its slot back to
    /// resume its persistent sessions.
    #[arg(long, env = "ARGUS_BRIDGE_REPLICA", default_value = "0")]
    pub replica: String,

    /// With `--replica auto`: how many slots exist (the broker ACL and the bridge
    /// certificates must cover them all).
    #[arg(long, env = "ARGUS_BRIDGE_MAX_REPLICAS", default_value_t = 8)]
    pub max_replicas: u32,

    /// MQTT connections per process, each a member of the shared subscription with its own
    /// broker inflight window.
    #[arg(long, env = "ARGUS_BRIDGE_CONNECTIONS", default_value_t = 2)]
    pub connections: u16,

    /// Shared-subscription group: the subscription is `$share/<group>/<filter>`.
    #[arg(long, env = "ARGUS_BRIDGE_SHARE_GROUP", default_value = "bridge")]
    pub share_group: String,

    /// Topic filter inside the shared subscription.
    #[arg(
        long,
        env = "ARGUS_BRIDGE_TOPIC_FILTER",
        default_value = "devices/+/telemetry"
    )]
    pub topic_filter: String,

    /// MQTT protocol version: `5` (default) or `3.1.1` for brokers without MQTT 5. With 5 the
    /// broker keeps to `--max-inflight` by protocol (Receive Maximum); with 3.1.1 only by its
    /// own setting, which Mosquitto 2.0 does not hold.
    #[arg(long, env = "ARGUS_BRIDGE_MQTT_VERSION", value_enum, default_value_t = MqttVersion::V5)]
    pub mqtt_version: MqttVersion,

    /// Most unacknowledged QoS 1 messages the broker may have in flight on one connection.
    /// With MQTT 5 it is sent as Receive Maximum and the broker must keep to it (EMQX takes the
    /// smaller of it and its zone's `mqtt.max_inflight`, default 32: raise that to match).
    /// With 3.1.1 keep it at least the broker's window (Mosquitto `max_inflight_messages`,
    /// EMQX `max_inflight`). Sizes the per-connection queues and the MQTT request channel.
    #[arg(long, env = "ARGUS_BRIDGE_MAX_INFLIGHT", default_value_t = 1000)]
    pub max_inflight: usize,

    /// MQTT 5 only: how long the broker keeps a connection's session (its subscription and
    /// the share queued for it) after the connection is lost, e.g. `7d`, or `never` (default)
    /// for a session that does not expire. Mosquitto discards an expired session's queue
    /// (loss); EMQX hands it to the group's other members. See docs/bridge.md.
    #[arg(long, env = "ARGUS_BRIDGE_SESSION_EXPIRY")]
    pub session_expiry: Option<String>,

    /// Most messages one connection's intake (poll task to worker) may hold. Past it, or past
    /// `--intake-max-bytes`, a QoS 0 message is shed (counted in `argus_bridge_shed_total`) and a
    /// QoS 1 message drops the connection, so the broker keeps it and redelivers it.
    #[arg(
        long,
        env = "ARGUS_BRIDGE_INTAKE_MAX_MESSAGES",
        default_value_t = 10_000
    )]
    pub intake_max_messages: usize,

    /// Most topic and payload bytes one connection's intake may hold (see
    /// `--intake-max-messages`). The process holds at most `--connections` times this.
    #[arg(long, env = "ARGUS_BRIDGE_INTAKE_MAX_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub intake_max_bytes: usize,

    /// `/ready` answers 503 (check `delivery`) while a message has waited longer than this
    /// without being acknowledged, e.g. `60s`: delivery is stuck.
    #[arg(
        long,
        env = "ARGUS_BRIDGE_READY_MAX_UNACKED_AGE",
        default_value = "60s"
    )]
    pub ready_max_unacked_age: String,

    /// MQTT keep-alive interval, e.g. `30s`.
    #[arg(long, env = "ARGUS_BRIDGE_KEEP_ALIVE", default_value = "30s")]
    pub keep_alive: String,

    /// Longest wait between reconnect attempts (backoff doubles from 100ms up to this, with jitter).
    #[arg(long, env = "ARGUS_BRIDGE_RECONNECT_MAX", default_value = "5s")]
    pub reconnect_max: String,

    #[command(flatten)]
    pub pg: PgArgs<BridgeEnv>,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub batch: BatchArgs<BridgeEnv>,

    #[command(flatten)]
    pub admit: AdmitArgs,

    /// Address of the HTTP server for `/health`, `/ready` and `/metrics`.
    #[arg(
        long,
        env = "ARGUS_BRIDGE_METRICS_ADDR",
        default_value = "127.0.0.1:9101"
    )]
    pub metrics_addr: String,

    #[command(flatten)]
    pub shutdown: ShutdownArgs<BridgeEnv>,

    /// Log format on stderr. The level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "ARGUS_BRIDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration of one bridge process.
#[derive(Debug, Clone)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub database_url: String,
    pub pg_pool_size: usize,
    pub nats_urls: Vec<String>,
    /// `--nats-user` and its password.
    pub nats_auth: argus_schema::nats::NatsAuth,
    pub redis_url: Option<String>,
    pub batch_size: usize,
    pub batch_linger: Duration,
    pub batch_linger_mode: argus_pipeline::sink::LingerMode,
    pub batch_max_bytes: usize,
    pub max_payload_bytes: usize,
    /// Bounds of an MQTT 5 message's properties.
    pub property_limits: PropertyLimits,
    pub metrics_addr: SocketAddr,
    /// `/ready` fails past this age of the oldest unacknowledged message.
    pub ready_max_unacked_age: Duration,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    /// `--replica auto`: lease a slot below this many at start-up; `mqtt.replica` is
    /// then set from the lease.
    pub replica_auto: Option<u32>,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::new(flag, reason)
}

impl Cli {
    /// Checks every flag and converts it to its typed form.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let addr = parse_mqtt_url(&self.mqtt_url).map_err(|r| invalid("mqtt-url", r))?;
        let identity = match (self.mqtt_cert_file, self.mqtt_key_file) {
            (Some(cert_file), Some(key_file)) => Some(ClientIdentity {
                cert_file,
                key_file,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "mqtt-key-file",
                    "required when --mqtt-cert-file is set",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "mqtt-cert-file",
                    "required when --mqtt-key-file is set",
                ))
            }
        };
        if addr.scheme == MqttScheme::Tls && self.mqtt_ca_file.is_none() {
            return Err(invalid("mqtt-ca-file", "required for an mqtts:// broker"));
        }
        if addr.scheme == MqttScheme::Plain && identity.is_some() {
            return Err(invalid(
                "mqtt-cert-file",
                "a client certificate needs an mqtts:// broker",
            ));
        }
        if self.connections == 0 {
            return Err(invalid("connections", "must be at least 1"));
        }
        if self.share_group.is_empty() || self.share_group.contains(['/', '+', '#']) {
            return Err(invalid(
                "share-group",
                "must be non-empty and contain no '/', '+' or '#'",
            ));
        }
        if self.topic_filter.is_empty() || self.topic_filter.starts_with('$') {
            return Err(invalid(
                "topic-filter",
                "must be non-empty and not start with '$'",
            ));
        }
        if self.max_inflight == 0 || self.max_inflight > u16::MAX as usize {
            return Err(invalid("max-inflight", "must be between 1 and 65535"));
        }
        let session_expiry = match (&self.session_expiry, self.mqtt_version) {
            (None, _) => SessionExpiry::Never,
            (Some(text), MqttVersion::V5) => {
                SessionExpiry::parse(text).map_err(|r| invalid("session-expiry", r))?
            }
            (Some(_), MqttVersion::V311) => {
                return Err(invalid(
                    "session-expiry",
                    "applies to --mqtt-version 5 only (a 3.1.1 session lasts until the broker's own expiry, e.g. Mosquitto persistent_client_expiration)",
                ))
            }
        };
        if self.intake_max_messages == 0 {
            return Err(invalid("intake-max-messages", "must be at least 1"));
        }
        if self.intake_max_bytes == 0 {
            return Err(invalid("intake-max-bytes", "must be at least 1"));
        }
        let ready_max_unacked_age = parse_duration(&self.ready_max_unacked_age)
            .map_err(|r| invalid("ready-max-unacked-age", r))?;
        if ready_max_unacked_age < Duration::from_secs(1) {
            return Err(invalid("ready-max-unacked-age", "must be at least 1s"));
        }
        let keep_alive = parse_duration(&self.keep_alive).map_err(|r| invalid("keep-alive", r))?;
        if keep_alive < Duration::from_secs(1) {
            return Err(invalid("keep-alive", "must be at least 1s"));
        }
        let reconnect_max =
            parse_duration(&self.reconnect_max).map_err(|r| invalid("reconnect-max", r))?;
        self.pg.validate()?;
        let nats_urls = self.nats.validate()?;
        let nats_auth = self.nats.auth()?;
        let (limits, property_limits) = self.admit.validate()?;
        let batching = self
            .batch
            .validate(limits.max_payload_bytes, "--max-payload-bytes")?;
        let (replica, replica_auto) = match self.replica.trim() {
            "auto" => {
                if self.max_replicas == 0 {
                    return Err(invalid("max-replicas", "must be at least 1"));
                }
                (0, Some(self.max_replicas))
            }
            n => (
                n.parse::<u32>()
                    .map_err(|_| invalid("replica", "must be a slot number or `auto`"))?,
                None,
            ),
        };
        let metrics_addr: SocketAddr = self
            .metrics_addr
            .parse()
            .map_err(|e| invalid("metrics-addr", format!("not a socket address: {e}")))?;
        let shutdown_timeout = self.shutdown.validate()?;
        Ok(Config {
            mqtt: MqttConfig {
                addr,
                ca_file: self.mqtt_ca_file,
                identity,
                replica,
                connections: self.connections,
                share_group: self.share_group,
                topic_filter: self.topic_filter,
                version: self.mqtt_version,
                max_inflight: self.max_inflight,
                session_expiry,
                intake: IntakeLimits {
                    max_messages: self.intake_max_messages,
                    max_bytes: self.intake_max_bytes,
                },
                keep_alive,
                reconnect_max,
            },
            database_url: self.pg.url()?,
            pg_pool_size: self.pg.pg_pool_size,
            nats_urls,
            nats_auth,
            redis_url: self.redis.url(),
            batch_size: batching.size,
            batch_linger: batching.linger,
            batch_linger_mode: batching.linger_mode,
            batch_max_bytes: batching.max_bytes,
            max_payload_bytes: limits.max_payload_bytes,
            property_limits,
            metrics_addr,
            ready_max_unacked_age,
            shutdown_timeout,
            log_format: self.log_format,
            replica_auto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        vec![
            "argus-bridge",
            "--mqtt-url",
            "mqtt://127.0.0.1:1883",
            "--database-url",
            "postgres://x@127.0.0.1/argus",
            "--nats-urls",
            "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
        ]
    }

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        // The flags' env twins would leak a shell's (or compose/test's) settings into
        // these cases: parse from the arguments alone.
        for (name, _) in std::env::vars() {
            if name.starts_with("MQTT_") || name.starts_with("ARGUS_BRIDGE_") {
                std::env::remove_var(name);
            }
        }
        let mut args = base();
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).expect("clap").into_config()
    }

    #[test]
    fn defaults_are_usable() {
        let c = parse(&[]).expect("valid");
        assert_eq!(c.mqtt.connections, 2);
        assert_eq!(c.mqtt.subscription(), "$share/bridge/devices/+/telemetry");
        assert_eq!(c.mqtt.client_id(1), "bridge-0-1");
        assert_eq!(c.nats_urls.len(), 2);
        assert_eq!(c.batch_linger, Duration::from_millis(20));
        assert_eq!(c.max_payload_bytes, 262_144);
        assert_eq!(c.metrics_addr.port(), 9101);
        assert_eq!(c.mqtt.intake.max_bytes, 16 << 20);
        assert_eq!(c.ready_max_unacked_age, Duration::from_secs(60));
    }

    #[test]
    fn client_ids_fit_the_envelope_bound() {
        // `argus_pipeline::limits` sizes the largest envelope with a client id of
        // at most MAX_CLIENT_ID_LEN bytes; ours are `bridge-<u32>-<u16>`.
        let mut c = parse(&[]).expect("valid");
        c.mqtt.replica = u32::MAX;
        assert!(c.mqtt.client_id(u16::MAX).len() <= argus_pipeline::limits::MAX_CLIENT_ID_LEN);
    }

    #[test]
    fn errors_name_the_flag() {
        let e = parse(&["--connections", "0"]).unwrap_err();
        assert_eq!(e.flag, "connections");
        assert!(e.to_string().contains("--connections"));
        let e = parse(&["--batch-linger", "soon"]).unwrap_err();
        assert_eq!(e.flag, "batch-linger");
        let e = parse(&["--mqtt-url", "mqtts://h:8883"]).unwrap_err();
        assert_eq!(e.flag, "mqtt-ca-file");
        let e = parse(&["--mqtt-url", "http://h"]).unwrap_err();
        assert_eq!(e.flag, "mqtt-url");
        let e = parse(&["--mqtt-cert-file", "/a"]).unwrap_err();
        assert_eq!(e.flag, "mqtt-key-file");
        let e = parse(&["--metrics-addr", "nope"]).unwrap_err();
        assert_eq!(e.flag, "metrics-addr");
        let e = parse(&["--share-group", "a/b"]).unwrap_err();
        assert_eq!(e.flag, "share-group");
        let e = parse(&["--replica", "first"]).unwrap_err();
        assert_eq!(e.flag, "replica");
        let e = parse(&["--intake-max-bytes", "0"]).unwrap_err();
        assert_eq!(e.flag, "intake-max-bytes");
        let e = parse(&["--ready-max-unacked-age", "0s"]).unwrap_err();
        assert_eq!(e.flag, "ready-max-unacked-age");
    }

    #[test]
    fn mqtt_5_by_default_with_a_session_that_does_not_expire() {
        let c = parse(&[]).expect("valid");
        assert_eq!(c.mqtt.version, MqttVersion::V5);
        assert_eq!(c.mqtt.session_expiry.seconds(), u32::MAX);
        let c = parse(&["--session-expiry", "7d"]).expect("valid");
        assert_eq!(c.mqtt.session_expiry.seconds(), 7 * 86_400);
        let c = parse(&["--mqtt-version", "3.1.1"]).expect("valid");
        assert_eq!(c.mqtt.version, MqttVersion::V311);
        let e = parse(&["--session-expiry", "0s"]).unwrap_err();
        assert_eq!(e.flag, "session-expiry");
        let e = parse(&["--mqtt-version", "3.1.1", "--session-expiry", "1h"]).unwrap_err();
        assert_eq!(e.flag, "session-expiry");
        assert!(Cli::try_parse_from(["argus-bridge", "--mqtt-version", "4"]).is_err());
    }

    #[test]
    fn replica_auto_leases_later() {
        let c = parse(&["--replica", "auto", "--max-replicas", "3"]).expect("ok");
        assert_eq!(c.replica_auto, Some(3));
        let c = parse(&["--replica", "5"]).expect("ok");
        assert_eq!((c.mqtt.replica, c.replica_auto), (5, None));
    }
}
