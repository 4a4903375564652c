//! The Postgres connection pool of the bridge and the HTTP sidecar: one builder, so both
//! processes connect, recycle and time out the same way, with TLS as the URL's `sslmode`
//! says (`argus_schema::tls`; `--pg-ca-file` travels in the URL as `sslrootcert=`, see
//! [`crate::flags::PgArgs::url`]).

use std::time::Duration;

/// How long a caller may wait for a new connection, and for a free one.
#[derive(Debug, Clone, Copy)]
pub struct PoolTimeouts {
    pub create: Duration,
    pub wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}")]
    Url(#[from] argus_schema::tls::TlsConfigError),
    #[error("cannot build the connection pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
}

/// A pool of at most `size` connections to `url` (TLS as its `sslmode` says;
/// connections are made on first use, so Postgres may be down when this is called, but
/// a bad URL or an unreadable CA file fails here).
pub fn pool(
    url: &str,
    size: usize,
    timeouts: PoolTimeouts,
) -> Result<deadpool_postgres::Pool, PoolError> {
    let pg = argus_schema::tls::PgConnectConfig::parse(url, None)?;
    let manager = deadpool_postgres::Manager::from_config(
        pg.config,
        pg.tls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Ok(deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .create_timeout(Some(timeouts.create))
        .wait_timeout(Some(timeouts.wait))
        .build()?)
}
