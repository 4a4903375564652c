//! `argus-schema`: the Postgres schema (migrations, seed) and the JetStream topology.
//!
//! Layout:
//! - [`migrate`]: the migration runner. Plain SQL files in `schema/migrations/`
//!   (`NNNN_name.up.sql` / `NNNN_name.down.sql`) embedded in the binary, applied
//!   in order, one transaction each, under a Postgres advisory lock, recorded
//!   with a SHA-256 checksum in `schema_migrations`.
//! - [`roles`]: the service roles (`argus_ingest`, `argus_admin`, `argus_reader`)
//!   that migration 0007 creates, and setting their passwords as SCRAM verifiers.
//! - [`seed`]: idempotent demo data (one organization, devices, assets, links,
//!   threshold rules) with fixed ids other crates and tests refer to.
//! - [`streams`]: JetStream streams and consumers as code.
//! - [`nats`]: the NATS connection every binary opens: user and password flags,
//!   the user's inbox prefix, and a refused login as an error naming the user.
//! - [`tls`]: TLS to Postgres for every Argus process (`sslmode` from the URL,
//!   verify-full against a CA file, rustls).
//! - [`connect`]: opens a Postgres connection and turns connection failures
//!   into one line that names host, port and database, never the password.

pub mod migrate;
pub mod nats;
pub mod roles;
pub mod seed;
pub mod streams;
pub mod tls;

use std::fmt::Write as _;
use std::time::Duration;

use tokio_postgres::config::Host;

/// Used when the URL does not set `connect_timeout`, so an unreachable host
/// fails in seconds instead of hanging on the kernel's TCP timeout.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection to Postgres could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL itself is malformed. The URL is not repeated (it may hold a password).
    #[error("invalid database URL: {reason}")]
    InvalidUrl { reason: String },
    /// The URL's TLS settings (or the CA file) cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
    /// The server could not be reached, refused the login, or the database does not exist.
    #[error("cannot connect to Postgres at {target}: {reason}")]
    Connect {
        /// `host:port, database "name", user "name"`; never the password.
        target: String,
        reason: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ConnectError {
    /// True when trying again later may succeed (server down or starting),
    /// false for a bad URL, a wrong password or a missing database.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::InvalidUrl { .. } | Self::Tls(_) => false,
            Self::Connect { source, .. } => source.as_db_error().is_none(),
        }
    }
}

/// Opens a connection to `url` (a `postgres://` URL or a libpq key=value
/// string) and spawns its driver on the current Tokio runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, ConnectError> {
    connect_with(url, None).await
}

/// [`connect`] with a CA file for `sslmode` (`--pg-ca-file`; see [`tls`]).
pub async fn connect_with(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres::Client, ConnectError> {
    let tls::PgConnectConfig {
        mut config, tls, ..
    } = tls::PgConnectConfig::parse(url, ca_file).map_err(|e| match e {
        tls::TlsConfigError::Url { reason } => ConnectError::InvalidUrl { reason },
        e => ConnectError::Tls(e),
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    let (client, connection) =
        config
            .connect(tls)
            .await
            .map_err(|source| ConnectError::Connect {
                target: describe_target(&config),
                reason: pg_error_text(&source),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %pg_error_text(&e), "Postgres connection ended.");
        }
    });
    Ok(client)
}

/// `127.0.0.1:5432, database "argus", user "argus"`: what a connection error
/// names. Built from the parsed config, so the password can never leak into it.
pub fn describe_target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = config
                .get_ports()
                .get(i)
                .or_else(|| config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "(default host)".to_owned()
    } else {
        hosts.join(",")
    };
    let user = config.get_user().unwrap_or("(default user)");
    let dbname = config.get_dbname().unwrap_or(user);
    format!("{hosts}, database \"{dbname}\", user \"{user}\"")
}

/// A one-line description of a Postgres error with its causes. The driver's
/// own `Display` says only "db error" or "error connecting to server"; the
/// useful part (the server's message, the I/O error) is in the source chain.
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{} ({})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            let _ = write!(text, "; {detail}");
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}
