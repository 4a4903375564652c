//! The Postgres connection pool of the bridge and the HTTP sidecar: one builder, so both
//! processes connect, recycle and time out the same way.

use std::time::Duration;

/// How long a caller may wait for a new connection, and for a free one.
#[derive(Debug, Clone, Copy)]
pub struct PoolTimeouts {
    pub create: Duration,
    pub wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid database URL: {0}")]
    Url(#[from] tokio_postgres::Error),
    #[error("cannot build the connection pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
}

/// A pool of at most `size` connections to `url` (plain TCP; connections are made on
/// first use, so Postgres may be down when this is called).
pub fn pool(
    url: &str,
    size: usize,
    timeouts: PoolTimeouts,
) -> Result<deadpool_postgres::Pool, PoolError> {
    let pg_config: tokio_postgres::Config = url.parse()?;
    let manager = deadpool_postgres::Manager::from_config(
        pg_config,
        tokio_postgres::NoTls,
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
