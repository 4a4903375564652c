//! The command-line pieces every Argus binary shares: [`parse_duration`], one
//! [`ConfigError`] that names the flag, and the flag blocks that each binary
//! flattens into its own `Cli` with `#[command(flatten)]`:
//!
//! | block | flags | env |
//! |---|---|---|
//! | [`PgArgs`] | `--database-url`, `--pg-ca-file`, `--pg-pool-size` | `DATABASE_URL`, `PGSSLROOTCERT`, `<PREFIX>PG_POOL_SIZE` |
//! | [`NatsArgs`] | `--nats-urls`, `--nats-user`, `--nats-password-file` | `NATS_URLS`, `NATS_USER`, `NATS_PASSWORD_FILE` (or the password in `NATS_PASSWORD`) |
//! | [`RedisArgs`] | `--redis-url` | `REDIS_URL` |
//! | [`BatchArgs`] | `--batch-size`, `--batch-max-bytes`, `--batch-linger`, `--batch-linger-mode` | `<PREFIX>BATCH_SIZE`, `<PREFIX>BATCH_MAX_BYTES`, `<PREFIX>BATCH_LINGER`, `<PREFIX>BATCH_LINGER_MODE` |
//! | [`ShutdownArgs`] | `--shutdown-timeout` | `<PREFIX>SHUTDOWN_TIMEOUT` |
//!
//! Connection URLs have the same env name in every binary (one `.env` serves them
//! all). Tuning flags keep a per-binary name and default, given by the binary's
//! [`FlagEnv`] (`ARGUS_BRIDGE_*`, `ARGUS_HTTP_*`), because the bridge and the
//! sidecar are tuned apart (a 20 ms linger for MQTT throughput, 5 ms for an HTTP
//! request's latency). Each block's `validate` returns typed values or a
//! [`ConfigError`] naming the flag; none echoes a URL, which may hold a password.

use std::marker::PhantomData;
use std::time::Duration;

use argus_schema::nats::{NatsAuth, NatsAuthArgs};
use clap::{Args, ValueEnum};

use crate::sink::LingerMode;

/// An MQTT protocol version (`--mqtt-version` of the bridge and of the load
/// tester's devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MqttVersion {
    /// MQTT 5.0.
    #[value(name = "5")]
    V5,
    /// MQTT 3.1.1.
    #[value(name = "3.1.1")]
    V311,
}

impl std::fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MqttVersion::V5 => "5",
            MqttVersion::V311 => "3.1.1",
        })
    }
}

/// A flag with a value that cannot be used. The reason never contains a secret.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct ConfigError {
    /// The flag's long name, without dashes.
    pub flag: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub fn new(flag: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            flag,
            reason: reason.into(),
        }
    }
}

/// Parses a duration such as `250ms`, `20ms`, `1.5s`, `2m`, `1h` or `1500us`.
/// A bare number is seconds. Shared by every Argus binary's flags.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 20ms, 5s or 1m"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "ns" => value / 1e9,
        "m" | "min" | "mins" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The env names and defaults of one binary's tuning flags.
pub trait FlagEnv: Clone + Send + Sync + 'static {
    const PG_POOL_SIZE: &'static str;
    const PG_POOL_SIZE_DEFAULT: &'static str;
    const BATCH_SIZE: &'static str;
    const BATCH_SIZE_DEFAULT: &'static str;
    const BATCH_LINGER: &'static str;
    const BATCH_LINGER_DEFAULT: &'static str;
    const BATCH_LINGER_MODE: &'static str;
    const BATCH_MAX_BYTES: &'static str;
    const BATCH_MAX_BYTES_DEFAULT: &'static str;
    const SHUTDOWN_TIMEOUT: &'static str;
    const SHUTDOWN_TIMEOUT_DEFAULT: &'static str;
}

/// Postgres: where, and how many connections.
#[derive(Debug, Clone, Args)]
pub struct PgArgs<E: FlagEnv> {
    /// Postgres connection URL. TLS: `?sslmode=verify-full` (certificate must chain to
    /// --pg-ca-file and name the host), `require` (encrypted; checked only with a CA
    /// file), `disable` or no sslmode (plain TCP).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// CA certificate (PEM) the Postgres server's certificate must chain to. The URL's
    /// own `sslrootcert=` wins. Same env name as libpq's, so `psql` checks the same way.
    #[arg(long, env = "PGSSLROOTCERT", value_name = "FILE")]
    pub pg_ca_file: Option<std::path::PathBuf>,

    /// Postgres connection pool size.
    #[arg(long, env = E::PG_POOL_SIZE, default_value = E::PG_POOL_SIZE_DEFAULT)]
    pub pg_pool_size: usize,

    #[arg(skip)]
    _env: PhantomData<E>,
}

impl<E: FlagEnv> PgArgs<E> {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database_url.trim().is_empty() {
            return Err(ConfigError::new("database-url", "must not be empty"));
        }
        if self.pg_pool_size == 0 {
            return Err(ConfigError::new("pg-pool-size", "must be at least 1"));
        }
        let url = self.url()?;
        argus_schema::tls::PgConnectConfig::parse(&url, None).map_err(|e| match e {
            argus_schema::tls::TlsConfigError::CaFile { .. } => {
                ConfigError::new("pg-ca-file", e.to_string())
            }
            e => ConfigError::new("database-url", e.to_string()),
        })?;
        Ok(())
    }

    /// `--database-url` with `--pg-ca-file` folded in as `sslrootcert=`, so one string
    /// carries both to every pool and connection.
    pub fn url(&self) -> Result<String, ConfigError> {
        self.url_of(&self.database_url, "database-url")
    }

    /// Like [`PgArgs::url`], for another URL of the same server (the sidecar's admin URL).
    pub fn url_of(&self, url: &str, flag: &'static str) -> Result<String, ConfigError> {
        match &self.pg_ca_file {
            None => Ok(url.to_owned()),
            Some(ca) => argus_schema::tls::with_ca_file(url, ca)
                .map_err(|e| ConfigError::new(flag, e.to_string())),
        }
    }
}

/// NATS: the servers of the cluster, and the user to log in as.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS servers, comma-separated (`nats://h1:4222,nats://h2:4222`).
    #[arg(
        long,
        env = "NATS_URLS",
        hide_env_values = true,
        value_delimiter = ',',
        required = true
    )]
    pub nats_urls: Vec<String>,

    #[command(flatten)]
    pub auth: NatsAuthArgs,
}

impl NatsArgs {
    /// The user and its password (`NATS_PASSWORD` or `--nats-password-file`).
    pub fn auth(&self) -> Result<NatsAuth, ConfigError> {
        self.auth
            .auth()
            .map_err(|e| ConfigError::new(e.flag, e.reason))
    }

    /// The non-empty URLs, trimmed.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let urls: Vec<String> = self
            .nats_urls
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(ConfigError::new("nats-urls", "needs at least one server"));
        }
        Ok(urls)
    }
}

/// Redis: the shared registry cache and its invalidations.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL for the shared device (and API-key) cache and its invalidations. Optional:
    /// without it each process caches in memory and falls back to Postgres.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
}

impl RedisArgs {
    /// The URL, `None` when unset or blank.
    pub fn url(&self) -> Option<String> {
        self.redis_url.clone().filter(|u| !u.trim().is_empty())
    }
}

/// The batch sink: when a batch is written.
#[derive(Debug, Clone, Args)]
pub struct BatchArgs<E: FlagEnv> {
    /// A batch is written when it holds this many readings ...
    #[arg(long, env = E::BATCH_SIZE, default_value = E::BATCH_SIZE_DEFAULT)]
    pub batch_size: usize,

    /// ... or before its payload bytes would pass this many (a reading larger than
    /// it is a batch by itself), so one batch is written well within the Postgres
    /// attempt timeout. At least the largest payload accepted.
    #[arg(long, env = E::BATCH_MAX_BYTES, default_value = E::BATCH_MAX_BYTES_DEFAULT)]
    pub batch_max_bytes: usize,

    /// ... or when its oldest reading is this old, e.g. `20ms`: the longest linger.
    #[arg(long, env = E::BATCH_LINGER, default_value = E::BATCH_LINGER_DEFAULT)]
    pub batch_linger: String,

    /// `adaptive`: the linger grows with how busy the sink is, from nearly 0 when
    /// idle (a reading is written at once) up to --batch-linger under load (bigger
    /// batches). `fixed`: always --batch-linger.
    #[arg(long, env = E::BATCH_LINGER_MODE, value_enum, default_value_t = LingerMode::Adaptive)]
    pub batch_linger_mode: LingerMode,

    #[arg(skip)]
    _env: PhantomData<E>,
}

/// Validated [`BatchArgs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub size: usize,
    pub max_bytes: usize,
    pub linger: Duration,
    pub linger_mode: LingerMode,
}

impl<E: FlagEnv> BatchArgs<E> {
    /// `largest_payload` is the largest payload the source accepts, and the name of
    /// its flag: a batch must be able to hold one.
    pub fn validate(
        &self,
        largest_payload: usize,
        payload_flag: &str,
    ) -> Result<Batching, ConfigError> {
        if self.batch_size == 0 {
            return Err(ConfigError::new("batch-size", "must be at least 1"));
        }
        if self.batch_max_bytes < largest_payload {
            return Err(ConfigError::new(
                "batch-max-bytes",
                format!(
                    "{} is less than {payload_flag} ({largest_payload}): a batch must hold the largest reading",
                    self.batch_max_bytes
                ),
            ));
        }
        let linger =
            parse_duration(&self.batch_linger).map_err(|r| ConfigError::new("batch-linger", r))?;
        Ok(Batching {
            size: self.batch_size,
            max_bytes: self.batch_max_bytes,
            linger,
            linger_mode: self.batch_linger_mode,
        })
    }
}

/// Shutdown: how long to drain.
#[derive(Debug, Clone, Args)]
pub struct ShutdownArgs<E: FlagEnv> {
    /// On SIGTERM/SIGINT: how long to drain (finish what was accepted, flush the sink)
    /// before exiting anyway.
    #[arg(long, env = E::SHUTDOWN_TIMEOUT, default_value = E::SHUTDOWN_TIMEOUT_DEFAULT)]
    pub shutdown_timeout: String,

    #[arg(skip)]
    _env: PhantomData<E>,
}

impl<E: FlagEnv> ShutdownArgs<E> {
    pub fn validate(&self) -> Result<Duration, ConfigError> {
        parse_duration(&self.shutdown_timeout).map_err(|r| ConfigError::new("shutdown-timeout", r))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Clone)]
    struct TestEnv;
    impl FlagEnv for TestEnv {
        const PG_POOL_SIZE: &'static str = "ARGUS_FLAGS_TEST_PG_POOL_SIZE";
        const PG_POOL_SIZE_DEFAULT: &'static str = "3";
        const BATCH_SIZE: &'static str = "ARGUS_FLAGS_TEST_BATCH_SIZE";
        const BATCH_SIZE_DEFAULT: &'static str = "7";
        const BATCH_LINGER: &'static str = "ARGUS_FLAGS_TEST_BATCH_LINGER";
        const BATCH_LINGER_DEFAULT: &'static str = "9ms";
        const BATCH_LINGER_MODE: &'static str = "ARGUS_FLAGS_TEST_BATCH_LINGER_MODE";
        const BATCH_MAX_BYTES: &'static str = "ARGUS_FLAGS_TEST_BATCH_MAX_BYTES";
        const BATCH_MAX_BYTES_DEFAULT: &'static str = "1000";
        const SHUTDOWN_TIMEOUT: &'static str = "ARGUS_FLAGS_TEST_SHUTDOWN_TIMEOUT";
        const SHUTDOWN_TIMEOUT_DEFAULT: &'static str = "4s";
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        pg: PgArgs<TestEnv>,
        #[command(flatten)]
        batch: BatchArgs<TestEnv>,
        #[command(flatten)]
        shutdown: ShutdownArgs<TestEnv>,
    }

    #[test]
    fn blocks_take_the_binarys_names_and_defaults() {
        let cli = Cli::try_parse_from(["t", "--database-url", "postgres://x@h/db"]).expect("clap");
        assert_eq!(cli.pg.pg_pool_size, 3);
        assert_eq!(
            cli.batch.validate(1000, "--max").expect("valid"),
            Batching {
                size: 7,
                max_bytes: 1000,
                linger: Duration::from_millis(9),
                linger_mode: LingerMode::Adaptive,
            }
        );
        // A batch must hold the largest reading; the error names both flags.
        let err = cli.batch.validate(1001, "--max").unwrap_err();
        assert_eq!(err.flag, "batch-max-bytes");
        assert!(err.to_string().contains("--max (1001)"), "{err}");
        assert_eq!(
            cli.shutdown.validate().expect("valid"),
            Duration::from_secs(4)
        );
        let help = {
            use clap::CommandFactory;
            Cli::command().render_long_help().to_string()
        };
        assert!(help.contains("ARGUS_FLAGS_TEST_BATCH_LINGER"), "{help}");
        assert!(help.contains("DATABASE_URL"), "{help}");
    }

    #[test]
    fn errors_name_the_flag() {
        let cli = Cli::try_parse_from(["t", "--database-url", " ", "--batch-linger", "soon"])
            .expect("clap");
        assert_eq!(cli.pg.validate().unwrap_err().flag, "database-url");
        assert_eq!(
            cli.batch.validate(1, "--max").unwrap_err().flag,
            "batch-linger"
        );
        let cli =
            Cli::try_parse_from(["t", "--database-url", "u", "--pg-pool-size", "0"]).expect("clap");
        assert_eq!(cli.pg.validate().unwrap_err().flag, "pg-pool-size");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1 fortnight").is_err());
    }
}
