//! Command-line flags (each with an environment twin) and their validation.
//!
//! [`Cli`] is what clap parses; [`Cli::into_config`] checks it and returns a typed
//! [`Config`]. Errors name the flag and never echo a secret (the admin token's value
//! is hidden from `--help`, from `Debug` and from every error).
//!
//! Postgres, NATS, Redis, batching and shutdown flags are the shared blocks of
//! [`argus_pipeline::flags`], flattened in; [`HttpEnv`] gives their tuning flags the
//! sidecar's env names and defaults (`ARGUS_HTTP_*`). The rest is the sidecar's own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use argus_pipeline::flags::{BatchArgs, FlagEnv, NatsArgs, PgArgs, RedisArgs, ShutdownArgs};
use clap::Parser;

use argus_pki::profile::Profile;

use crate::admin::AdminToken;
use crate::emqx::{ApiSecret, EmqxConfig};

/// A flag with a value that cannot be used (the reason never contains a secret).
pub use argus_pipeline::flags::{parse_duration, ConfigError};

/// The sidecar's env names and defaults of the shared tuning flags.
#[derive(Debug, Clone, Copy)]
pub struct HttpEnv;

impl FlagEnv for HttpEnv {
    const PG_POOL_SIZE: &'static str = "ARGUS_HTTP_PG_POOL_SIZE";
    const PG_POOL_SIZE_DEFAULT: &'static str = "4";
    const BATCH_SIZE: &'static str = "ARGUS_HTTP_BATCH_SIZE";
    const BATCH_SIZE_DEFAULT: &'static str = "500";
    // Short: a request waits for its batch (MQTT's bridge lingers longer).
    const BATCH_LINGER: &'static str = "ARGUS_HTTP_BATCH_LINGER";
    const BATCH_LINGER_DEFAULT: &'static str = "5ms";
    const BATCH_LINGER_MODE: &'static str = "ARGUS_HTTP_BATCH_LINGER_MODE";
    const BATCH_MAX_BYTES: &'static str = "ARGUS_HTTP_BATCH_MAX_BYTES";
    const BATCH_MAX_BYTES_DEFAULT: &'static str = "8388608";
    const SHUTDOWN_TIMEOUT: &'static str = "ARGUS_HTTP_SHUTDOWN_TIMEOUT";
    const SHUTDOWN_TIMEOUT_DEFAULT: &'static str = "10s";
}

/// Shortest admin token accepted at start-up.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The `argus-ingest-http` command line.
#[derive(Clone, Parser)]
#[command(
    name = "argus-ingest-http",
    version,
    // A later flag wins over an earlier one (scripts can append overrides).
    args_override_self = true,
    about = "HTTP telemetry ingest with device API keys, and the device certificate API.",
    long_about = None
)]
pub struct Cli {
    /// Device listener: `POST /api/v1/telemetry/ingest`, `/health` and its own
    /// `/openapi.json`; every admin path answers 404 here. TLS with --tls-cert and
    /// --tls-key; plain HTTP only on a loopback address, or anywhere with --insecure-http.
    #[arg(long, env = "ARGUS_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Admin listener, plain HTTP on an internal address (never publish it): API-key and
    /// certificate admin, the CRL (`/pki/crl.der`, `/pki/crl.pem`), `/metrics`, `/ready`,
    /// `/health` and its own `/openapi.json`.
    #[arg(
        long,
        env = "ARGUS_HTTP_ADMIN_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub admin_listen: String,

    /// PEM certificate chain of the device listener (server certificate first). Re-read,
    /// with --tls-key, on SIGHUP; a file that cannot be used then keeps the old one.
    #[arg(long, env = "ARGUS_HTTP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "ARGUS_HTTP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve the device listener over plain HTTP on a non-loopback address (behind a
    /// proxy that terminates TLS). Without it, plain HTTP is refused there at start-up.
    #[arg(long, env = "ARGUS_HTTP_INSECURE_HTTP", default_value_t = false)]
    pub insecure_http: bool,

    /// `local` or `production` (the env of `argus-pki --profile`). With production and
    /// --pki-dir, --crl-url must name an address the broker can reach: empty or
    /// loopback is refused at start-up.
    #[arg(long, env = "ARGUS_PKI_PROFILE", value_enum, default_value_t = Profile::Local)]
    pub pki_profile: Profile,

    /// EMQX's REST API (e.g. `http://emqx:18083`, plain HTTP on the internal network):
    /// after a certificate revocation the sidecar kicks the device's live connection
    /// (`DELETE /api/v5/clients/{deviceId}`). Unset: no kick.
    #[arg(long, env = "ARGUS_HTTP_EMQX_API_URL")]
    pub emqx_api_url: Option<String>,

    /// The EMQX API key (its name, sent as the Basic auth user). Needed with --emqx-api-url.
    #[arg(long, env = "ARGUS_HTTP_EMQX_API_KEY")]
    pub emqx_api_key: Option<String>,

    /// The EMQX API key's secret. Never printed. Or --emqx-api-secret-file.
    #[arg(
        long,
        env = "ARGUS_HTTP_EMQX_API_SECRET",
        hide_env_values = true,
        conflicts_with = "emqx_api_secret_file"
    )]
    pub emqx_api_secret: Option<String>,

    /// A file holding the EMQX API key's secret (a Docker secret; surrounding
    /// whitespace is ignored).
    #[arg(long, env = "ARGUS_HTTP_EMQX_API_SECRET_FILE")]
    pub emqx_api_secret_file: Option<PathBuf>,

    /// Longest wait for one EMQX kick request (e.g. `2s`); a kick makes at most 3.
    #[arg(long, env = "ARGUS_HTTP_EMQX_API_TIMEOUT", default_value = "2s")]
    pub emqx_api_timeout: String,

    /// `--database-url`, `--pg-pool-size`.
    #[command(flatten)]
    pub pg: PgArgs<HttpEnv>,

    /// `--nats-urls`.
    #[command(flatten)]
    pub nats: NatsArgs,

    /// `--redis-url`.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Admin bearer token for operator endpoints (at least 16 characters). Never printed.
    #[arg(long, env = "ARGUS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,

    /// PKI directory (`argus-pki init --dir`) for the certificate API.
    #[arg(long, env = "ARGUS_PKI_DIR")]
    pub pki_dir: Option<PathBuf>,

    /// CRL distribution point written into issued device certificates
    /// (default: argus-pki's `DEFAULT_CRL_URL`).
    #[arg(long, env = "ARGUS_HTTP_CRL_URL")]
    pub crl_url: Option<String>,

    /// With --pki-dir: re-sign the CRL once it is older than this (e.g. `1d`, `12h`); at
    /// most 6 days, a day inside its 7-day next update.
    #[arg(long, env = "ARGUS_HTTP_CRL_MAX_AGE", default_value = "1d")]
    pub crl_max_age: String,

    /// Broker pid file: the broker gets SIGHUP after each CRL change (local stack's Mosquitto).
    #[arg(long, env = "ARGUS_HTTP_BROKER_PID_FILE")]
    pub broker_pid_file: Option<PathBuf>,

    /// Largest accepted request body in bytes (larger: 413). At most 4 GiB.
    #[arg(long, env = "ARGUS_HTTP_BODY_LIMIT", default_value_t = 1024 * 1024)]
    pub body_limit: usize,

    /// Largest reading in bytes, as sent and stored (its JSON text; larger: 413 naming it).
    /// Checked at start-up against the NATS server's max_payload.
    #[arg(long, env = "ARGUS_HTTP_MAX_READING_BYTES", default_value_t = argus_pipeline::reading::DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_reading_bytes: usize,

    /// Ingest requests handled at once; more answer 503 with Retry-After.
    #[arg(long, env = "ARGUS_HTTP_MAX_IN_FLIGHT_REQUESTS", default_value_t = 256)]
    pub max_in_flight_requests: usize,

    /// Request-body bytes held at once by ingest requests (each is counted at its
    /// Content-Length, or at --body-limit without one, until it is answered); a request
    /// that does not fit answers 503 with Retry-After. At least --body-limit.
    #[arg(long, env = "ARGUS_HTTP_MAX_IN_FLIGHT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_in_flight_bytes: usize,

    /// Key look-ups per second allowed per client IP address before authentication
    /// (a key already known to this process costs nothing; 0 disables the limit).
    #[arg(
        long,
        env = "ARGUS_HTTP_PREAUTH_RATE_PER_ADDRESS",
        default_value_t = 20.0
    )]
    pub preauth_rate_per_address: f64,

    /// Key look-ups a client address may make at once above its rate.
    #[arg(long, env = "ARGUS_HTTP_PREAUTH_BURST", default_value_t = 40)]
    pub preauth_burst: u32,

    /// Postgres URL of the admin routes (API keys, certificates), as the `argus_admin`
    /// role; the device routes and the sink use --database-url (`argus_ingest`), which
    /// may not issue keys or certificates. Same server, same --pg-ca-file. Default:
    /// --database-url. Its pool has --pg-pool-size connections.
    #[arg(long, env = "ADMIN_DATABASE_URL", hide_env_values = true)]
    pub admin_database_url: Option<String>,

    /// Postgres connections of the sink, a pool apart from the look-ups' `--pg-pool-size`,
    /// so a flood of look-ups cannot starve the writes.
    #[arg(long, env = "ARGUS_HTTP_SINK_PG_POOL_SIZE", default_value_t = 4)]
    pub sink_pg_pool_size: usize,

    /// Most readings in one batch request.
    #[arg(long, env = "ARGUS_HTTP_MAX_BATCH_READINGS", default_value_t = 1000)]
    pub max_batch_readings: usize,

    /// Requests per second allowed per device on average (0 disables the limit).
    #[arg(long, env = "ARGUS_HTTP_RATE_LIMIT_PER_DEVICE", default_value_t = 50.0)]
    pub rate_limit_per_device: f64,

    /// Requests a device may send at once above its rate (token bucket size).
    #[arg(long, env = "ARGUS_HTTP_RATE_LIMIT_BURST", default_value_t = 100)]
    pub rate_limit_burst: u32,

    /// Longest wait for a reading to be durable (Postgres commit + JetStream ack)
    /// before answering 503, e.g. `5s`.
    #[arg(long, env = "ARGUS_HTTP_DURABILITY_TIMEOUT", default_value = "5s")]
    pub durability_timeout: String,

    /// `--batch-size`, `--batch-linger`.
    #[command(flatten)]
    pub batch: BatchArgs<HttpEnv>,

    /// `--shutdown-timeout`.
    #[command(flatten)]
    pub shutdown: ShutdownArgs<HttpEnv>,

    /// Log lines as JSON instead of text. The level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "ARGUS_HTTP_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cli")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("nats_urls", &self.nats.nats_urls)
            .field("admin_token", &"..")
            .finish_non_exhaustive()
    }
}

/// The validated configuration. Connection URLs may hold passwords, so `Debug` omits them.
#[derive(Clone)]
pub struct Config {
    /// The device listener.
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin_listen: SocketAddr,
    /// `--tls-cert`, `--tls-key`: the device listener's TLS; `None`: plain HTTP
    /// (loopback, or `--insecure-http`).
    pub tls: Option<TlsFiles>,
    /// `--emqx-api-url` and its key: the kick after a revocation; `None`: off.
    pub emqx: Option<EmqxConfig>,
    pub database_url: String,
    /// The admin routes' URL (`--admin-database-url`, else `--database-url`).
    pub admin_database_url: String,
    /// The look-ups' pool (registry, API keys), and the admin routes' pool.
    pub pg_pool_size: usize,
    /// The sink's own pool.
    pub sink_pg_pool_size: usize,
    pub nats_urls: Vec<String>,
    /// `--nats-user` and its password.
    pub nats_auth: argus_schema::nats::NatsAuth,
    pub redis_url: Option<String>,
    pub admin_token: AdminToken,
    pub pki_dir: Option<PathBuf>,
    pub crl_url: Option<String>,
    /// `--crl-max-age`: the sidecar re-signs an older CRL (`ingest-http/src/crl.rs`).
    pub crl_max_age: Duration,
    pub broker_pid_file: Option<PathBuf>,
    pub limits: Limits,
    pub batch_size: usize,
    pub batch_linger: Duration,
    pub batch_linger_mode: argus_pipeline::sink::LingerMode,
    pub batch_max_bytes: usize,
    pub shutdown_timeout: Duration,
    pub log_json: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("tls", &self.tls)
            .field("pki_dir", &self.pki_dir)
            .field("limits", &self.limits)
            .field("batch_size", &self.batch_size)
            .field("batch_linger", &self.batch_linger)
            .field("batch_linger_mode", &self.batch_linger_mode)
            .finish_non_exhaustive()
    }
}

/// The device listener's certificate chain and key files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Request limits of the ingest endpoint.
#[derive(Debug, Clone)]
pub struct Limits {
    pub body_limit: usize,
    /// Largest stored reading (its JSON text as sent).
    pub max_reading_bytes: usize,
    pub max_batch_readings: usize,
    pub rate_limit_per_device: f64,
    pub rate_limit_burst: u32,
    pub durability_timeout: Duration,
    pub max_in_flight_requests: usize,
    pub max_in_flight_bytes: usize,
    pub preauth_rate_per_address: f64,
    pub preauth_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_limit: 1024 * 1024,
            max_reading_bytes: argus_pipeline::reading::DEFAULT_MAX_PAYLOAD_BYTES,
            max_batch_readings: 1000,
            rate_limit_per_device: 50.0,
            rate_limit_burst: 100,
            durability_timeout: Duration::from_secs(5),
            max_in_flight_requests: 256,
            max_in_flight_bytes: 64 * 1024 * 1024,
            preauth_rate_per_address: 20.0,
            preauth_burst: 40,
        }
    }
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::new(flag, reason)
}

impl Cli {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|e| invalid("listen", format!("not a socket address: {e}")))?;
        let admin_listen: SocketAddr = self
            .admin_listen
            .parse()
            .map_err(|e| invalid("admin-listen", format!("not a socket address: {e}")))?;
        if admin_listen == listen && listen.port() != 0 {
            return Err(invalid(
                "admin-listen",
                "must differ from --listen (the admin paths must not be on the device listener)",
            ));
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(invalid("tls-cert", "--tls-cert and --tls-key go together")),
        };
        if tls.is_none() && !listen.ip().is_loopback() && !self.insecure_http {
            return Err(invalid(
                "listen",
                format!(
                    "{listen} is not a loopback address, so devices would send their API keys \
                     in clear: give --tls-cert and --tls-key, or --insecure-http behind a proxy \
                     that terminates TLS"
                ),
            ));
        }
        if self.pki_dir.is_some() {
            let url = self.crl_url.as_deref().unwrap_or("").trim();
            self.pki_profile
                .check_crl_url(url)
                .map_err(|e| invalid("crl-url", e.to_string()))?;
        }
        let emqx_timeout =
            parse_duration(&self.emqx_api_timeout).map_err(|r| invalid("emqx-api-timeout", r))?;
        if emqx_timeout.is_zero() {
            return Err(invalid("emqx-api-timeout", "must be more than 0"));
        }
        let emqx = match self.emqx_api_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                if !url.starts_with("http://") || url.len() <= "http://".len() {
                    return Err(invalid(
                        "emqx-api-url",
                        "must be an http:// URL (EMQX's API port on the internal network)",
                    ));
                }
                let api_key = self
                    .emqx_api_key
                    .filter(|k| !k.trim().is_empty())
                    .ok_or_else(|| invalid("emqx-api-key", "is needed with --emqx-api-url"))?;
                let secret = match (self.emqx_api_secret, self.emqx_api_secret_file) {
                    (Some(s), _) => s,
                    (None, Some(path)) => std::fs::read_to_string(&path)
                        .map_err(|e| {
                            invalid(
                                "emqx-api-secret-file",
                                format!("cannot read {}: {e}", path.display()),
                            )
                        })?
                        .trim()
                        .to_owned(),
                    (None, None) => String::new(),
                };
                if secret.is_empty() {
                    return Err(invalid(
                        "emqx-api-secret",
                        "is needed with --emqx-api-url (or --emqx-api-secret-file)",
                    ));
                }
                Some(EmqxConfig {
                    api_url: url.trim_end_matches('/').to_owned(),
                    api_key: api_key.trim().to_owned(),
                    api_secret: ApiSecret::new(secret),
                    timeout: emqx_timeout,
                })
            }
        };
        self.pg.validate()?;
        let nats_urls = self.nats.validate()?;
        let nats_auth = self.nats.auth()?;
        if self.admin_token.chars().count() < MIN_ADMIN_TOKEN_LEN {
            return Err(invalid(
                "admin-token",
                format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters"),
            ));
        }
        if self.body_limit == 0 || u32::try_from(self.body_limit).is_err() {
            return Err(invalid("body-limit", "must be from 1 to 4294967295"));
        }
        if self.max_reading_bytes == 0 {
            return Err(invalid("max-reading-bytes", "must be at least 1"));
        }
        if self.max_in_flight_requests == 0 {
            return Err(invalid("max-in-flight-requests", "must be at least 1"));
        }
        if self.max_in_flight_bytes < self.body_limit {
            return Err(invalid(
                "max-in-flight-bytes",
                format!(
                    "must be at least --body-limit ({}), or no body that large is ever read",
                    self.body_limit
                ),
            ));
        }
        if !self.preauth_rate_per_address.is_finite() || self.preauth_rate_per_address < 0.0 {
            return Err(invalid(
                "preauth-rate-per-address",
                "must be a number >= 0 (0 disables)",
            ));
        }
        if self.preauth_burst == 0 {
            return Err(invalid("preauth-burst", "must be at least 1"));
        }
        if self.sink_pg_pool_size == 0 {
            return Err(invalid("sink-pg-pool-size", "must be at least 1"));
        }
        if self.max_batch_readings == 0 {
            return Err(invalid("max-batch-readings", "must be at least 1"));
        }
        if !self.rate_limit_per_device.is_finite() || self.rate_limit_per_device < 0.0 {
            return Err(invalid(
                "rate-limit-per-device",
                "must be a number >= 0 (0 disables)",
            ));
        }
        if self.rate_limit_burst == 0 {
            return Err(invalid("rate-limit-burst", "must be at least 1"));
        }
        let durability_timeout = parse_duration(&self.durability_timeout)
            .map_err(|r| invalid("durability-timeout", r))?;
        if durability_timeout.is_zero() {
            return Err(invalid("durability-timeout", "must be more than 0"));
        }
        let batching = self
            .batch
            .validate(self.max_reading_bytes, "--max-reading-bytes")?;
        let shutdown_timeout = self.shutdown.validate()?;
        let crl_max_age =
            parse_duration(&self.crl_max_age).map_err(|r| invalid("crl-max-age", r))?;
        // A day short of the CRL's next update, so a missed re-sign leaves a day to notice.
        let longest =
            Duration::from_secs((argus_pki::ca::CRL_NEXT_UPDATE_DAYS as u64 - 1) * 86_400);
        if crl_max_age.is_zero() || crl_max_age > longest {
            return Err(invalid(
                "crl-max-age",
                "must be more than 0 and at most 6d (the CRL's next update is 7 days out)",
            ));
        }
        Ok(Config {
            listen,
            admin_listen,
            tls,
            emqx,
            redis_url: self.redis.url(),
            admin_database_url: match self.admin_database_url.as_deref().map(str::trim) {
                None | Some("") => self.pg.url()?,
                Some(url) => {
                    let url = self.pg.url_of(url, "admin-database-url")?;
                    argus_schema::tls::PgConnectConfig::parse(&url, None)
                        .map_err(|e| invalid("admin-database-url", e.to_string()))?;
                    url
                }
            },
            database_url: self.pg.url()?,
            pg_pool_size: self.pg.pg_pool_size,
            sink_pg_pool_size: self.sink_pg_pool_size,
            nats_urls,
            nats_auth,
            admin_token: AdminToken::new(self.admin_token),
            pki_dir: self.pki_dir,
            crl_url: self.crl_url.filter(|u| !u.trim().is_empty()),
            crl_max_age,
            broker_pid_file: self.broker_pid_file,
            limits: Limits {
                body_limit: self.body_limit,
                max_reading_bytes: self.max_reading_bytes,
                max_batch_readings: self.max_batch_readings,
                rate_limit_per_device: self.rate_limit_per_device,
                rate_limit_burst: self.rate_limit_burst,
                durability_timeout,
                max_in_flight_requests: self.max_in_flight_requests,
                max_in_flight_bytes: self.max_in_flight_bytes,
                preauth_rate_per_address: self.preauth_rate_per_address,
                preauth_burst: self.preauth_burst,
            },
            batch_size: batching.size,
            batch_linger: batching.linger,
            batch_linger_mode: batching.linger_mode,
            batch_max_bytes: batching.max_bytes,
            shutdown_timeout,
            log_json: self.log_json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-secret";

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        argus_testkit::clear_flag_env();
        let mut args = vec![
            "argus-ingest-http",
            "--database-url",
            "postgres://x@127.0.0.1/argus",
            "--nats-urls",
            "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
            "--admin-token",
            TOKEN,
        ];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).expect("clap").into_config()
    }

    #[test]
    fn defaults_are_usable() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.nats_urls.len(), 2);
        assert_eq!(c.limits.body_limit, 1_048_576);
        assert_eq!(c.limits.durability_timeout, Duration::from_secs(5));
        assert_eq!(c.batch_linger, Duration::from_millis(5));
    }

    #[test]
    fn errors_name_the_flag_and_hide_the_token() {
        let e = parse(&["--admin-token", "short-token"]).unwrap_err();
        assert_eq!(e.flag, "admin-token");
        assert!(!e.to_string().contains("short-token"));
        assert_eq!(parse(&["--listen", "nope"]).unwrap_err().flag, "listen");
        assert_eq!(
            parse(&["--durability-timeout", "0s"]).unwrap_err().flag,
            "durability-timeout"
        );
        assert_eq!(
            parse(&["--rate-limit-per-device=-1"]).unwrap_err().flag,
            "rate-limit-per-device"
        );
        assert_eq!(
            parse(&["--max-in-flight-bytes", "1000"]).unwrap_err().flag,
            "max-in-flight-bytes"
        );
        assert_eq!(
            parse(&["--sink-pg-pool-size", "0"]).unwrap_err().flag,
            "sink-pg-pool-size"
        );
        let c = parse(&[]).unwrap();
        assert!(!format!("{c:?}").contains(TOKEN));
    }

    #[test]
    fn shared_blocks_keep_the_sidecars_names_and_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.pg_pool_size, 4);
        assert_eq!(c.batch_size, 500);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        let c = parse(&["--redis-url", " "]).unwrap();
        assert_eq!(c.redis_url, None);
        assert_eq!(
            parse(&["--pg-pool-size", "0"]).unwrap_err().flag,
            "pg-pool-size"
        );
        assert_eq!(
            parse(&["--batch-linger", "soon"]).unwrap_err().flag,
            "batch-linger"
        );
        let help = {
            use clap::CommandFactory;
            Cli::command().render_long_help().to_string()
        };
        for env in [
            "DATABASE_URL",
            "ARGUS_HTTP_PG_POOL_SIZE",
            "NATS_URLS",
            "REDIS_URL",
            "ARGUS_HTTP_BATCH_SIZE",
            "ARGUS_HTTP_BATCH_LINGER",
            "ARGUS_HTTP_SHUTDOWN_TIMEOUT",
            "ARGUS_HTTP_MAX_READING_BYTES",
            "ARGUS_HTTP_MAX_IN_FLIGHT_REQUESTS",
            "ARGUS_HTTP_MAX_IN_FLIGHT_BYTES",
            "ARGUS_HTTP_PREAUTH_RATE_PER_ADDRESS",
            "ARGUS_HTTP_PREAUTH_BURST",
            "ARGUS_HTTP_SINK_PG_POOL_SIZE",
        ] {
            assert!(help.contains(&format!("env: {env}")), "{env}: {help}");
        }
    }

    #[test]
    fn listeners_tls_and_the_emqx_kick() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8081");
        assert!(c.tls.is_none() && c.emqx.is_none());
        // Plain HTTP off loopback: refused, unless asked for; TLS is fine anywhere.
        let e = parse(&["--listen", "0.0.0.0:8080"]).unwrap_err();
        assert_eq!(e.flag, "listen");
        assert!(e.to_string().contains("--insecure-http"), "{e}");
        assert!(parse(&["--listen", "0.0.0.0:8080", "--insecure-http"]).is_ok());
        let tls = parse(&[
            "--listen",
            "0.0.0.0:8080",
            "--tls-cert",
            "/x/tls.crt",
            "--tls-key",
            "/x/tls.key",
        ])
        .unwrap();
        assert_eq!(tls.tls.unwrap().cert, PathBuf::from("/x/tls.crt"));
        assert_eq!(
            parse(&["--admin-listen", "127.0.0.1:8080"])
                .unwrap_err()
                .flag,
            "admin-listen"
        );
        // The kick needs its key and secret; the secret stays out of Debug and errors.
        assert_eq!(
            parse(&["--emqx-api-url", "http://emqx:18083"])
                .unwrap_err()
                .flag,
            "emqx-api-key"
        );
        assert_eq!(
            parse(&["--emqx-api-url", "http://emqx:18083", "--emqx-api-key", "k"])
                .unwrap_err()
                .flag,
            "emqx-api-secret"
        );
        assert_eq!(
            parse(&["--emqx-api-url", "emqx:18083"]).unwrap_err().flag,
            "emqx-api-url"
        );
        let c = parse(&[
            "--emqx-api-url",
            "http://emqx:18083/",
            "--emqx-api-key",
            "k",
            "--emqx-api-secret",
            "kick-secret-value",
        ])
        .unwrap();
        let emqx = c.emqx.clone().unwrap();
        assert_eq!(emqx.api_url, "http://emqx:18083");
        assert_eq!(emqx.timeout, Duration::from_secs(2));
        assert!(!format!("{c:?}").contains("kick-secret-value"));
        let help = {
            use clap::CommandFactory;
            Cli::command().render_long_help().to_string()
        };
        assert!(!help.contains("kick-secret-value"));
        for env in [
            "ARGUS_HTTP_ADMIN_LISTEN",
            "ARGUS_HTTP_TLS_CERT",
            "ARGUS_HTTP_TLS_KEY",
            "ARGUS_HTTP_INSECURE_HTTP",
            "ARGUS_PKI_PROFILE",
            "ARGUS_HTTP_EMQX_API_URL",
            "ARGUS_HTTP_EMQX_API_KEY",
            "ARGUS_HTTP_EMQX_API_SECRET",
            "ARGUS_HTTP_EMQX_API_SECRET_FILE",
            "ARGUS_HTTP_EMQX_API_TIMEOUT",
        ] {
            assert!(help.contains(&format!("env: {env}")), "{env}: {help}");
        }
    }

    #[test]
    fn the_production_profile_checks_the_crl_url_with_a_pki_dir() {
        let prod = ["--pki-profile", "production", "--pki-dir", "/pki"];
        assert_eq!(parse(&prod).unwrap_err().flag, "crl-url");
        let mut loopback = prod.to_vec();
        loopback.extend(["--crl-url", "http://127.0.0.1:17081/pki/crl.der"]);
        assert_eq!(parse(&loopback).unwrap_err().flag, "crl-url");
        let mut good = prod.to_vec();
        good.extend(["--crl-url", "http://ingest-http:8081/pki/crl.der"]);
        assert!(parse(&good).is_ok());
        // Without the certificate API there is nothing to issue.
        assert!(parse(&["--pki-profile", "production"]).is_ok());
        assert!(parse(&["--pki-dir", "/pki"]).is_ok());
    }
}
