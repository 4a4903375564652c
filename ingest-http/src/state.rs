//! The application state every handler shares (one `Arc`, cheap to clone), and how
//! it is built from a [`Config`]: Postgres pool, NATS client, registry, sink.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use argus_bridge::registry::{Invalidation, Registry, RegistryConfig, RegistryError};
use argus_bridge::sink::{Sink, SinkConfig};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::admin::AdminToken;
use crate::certificates::CertState;
use crate::config::{Config, Limits};
use crate::pipeline::Pipeline;
use crate::ratelimit::RateLimiter;
use crate::usage::KeyUsage;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid --database-url: {0}")]
    DatabaseUrl(String),
    #[error("Postgres pool: {0}")]
    Pool(String),
    #[error("NATS connect: {0}")]
    Nats(String),
    #[error("certificate API (--pki-dir): {0}")]
    Pki(#[from] argus_pki::PkiError),
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
}

/// Shared state. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: deadpool_postgres::Pool,
    nats: async_nats::Client,
    registry: Registry,
    pipeline: Pipeline,
    admin: AdminToken,
    limits: Limits,
    limiter: RateLimiter,
    usage: KeyUsage,
    metrics: PrometheusHandle,
    /// The certificate API's state; `None` without `--pki-dir` (its routes are then absent).
    certificates: Option<CertState>,
    /// Set once shutdown began: `/health` and `/ready` answer 503.
    draining: AtomicBool,
    config: Config,
}

/// A Postgres pool from a URL (no connection is made until first use).
pub fn pg_pool(url: &str, size: usize) -> Result<deadpool_postgres::Pool, StartError> {
    // Short waits: a request waits on Postgres at most this long before its 503.
    let timeouts = argus_bridge::pg::PoolTimeouts {
        create: std::time::Duration::from_secs(2),
        wait: std::time::Duration::from_secs(2),
    };
    argus_bridge::pg::pool(url, size, timeouts).map_err(|e| match e {
        argus_bridge::pg::PoolError::Url(e) => StartError::DatabaseUrl(e.to_string()),
        e @ argus_bridge::pg::PoolError::Build(_) => StartError::Pool(e.to_string()),
    })
}

impl AppState {
    /// Connects everything the sidecar needs. Postgres and Redis may be down at start
    /// (the pool and the registry connect lazily; `/ready` tells); NATS must answer.
    pub async fn connect(config: Config) -> Result<AppState, StartError> {
        let pool = pg_pool(&config.database_url, config.pg_pool_size)?;
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(config.nats_urls.clone())
            .await
            .map_err(|e| StartError::Nats(e.to_string()))?;
        let registry = Registry::start(
            RegistryConfig {
                redis_url: config.redis_url.clone(),
                ..RegistryConfig::default()
            },
            pool.clone(),
        )?;
        let (sink, task) = Sink::start(
            SinkConfig {
                batch_size: config.batch_size,
                batch_linger: config.batch_linger,
                ..SinkConfig::default()
            },
            pool.clone(),
            async_nats::jetstream::new(nats.clone()),
        );
        let pipeline = Pipeline::new(sink, task);
        let certificates = match &config.pki_dir {
            Some(dir) => {
                let mut cert = CertState::load(
                    dir,
                    config.crl_url.clone(),
                    pool.clone(),
                    config.admin_token.clone(),
                )?;
                if let Some(pid_file) = &config.broker_pid_file {
                    cert = cert.with_broker_pid_file(pid_file.clone());
                }
                Some(cert)
            }
            None => {
                tracing::info!("No --pki-dir: the certificate API is disabled.");
                None
            }
        };
        Ok(Self::from_parts(
            config,
            pool,
            nats,
            registry,
            pipeline,
            certificates,
        ))
    }

    fn from_parts(
        config: Config,
        pool: deadpool_postgres::Pool,
        nats: async_nats::Client,
        registry: Registry,
        pipeline: Pipeline,
        certificates: Option<CertState>,
    ) -> AppState {
        let limits = config.limits.clone();
        AppState {
            inner: Arc::new(Inner {
                usage: KeyUsage::start(pool.clone()),
                limiter: RateLimiter::new(limits.rate_limit_per_device, limits.rate_limit_burst),
                admin: config.admin_token.clone(),
                metrics: crate::metrics::prometheus_handle(),
                draining: AtomicBool::new(false),
                pool,
                nats,
                registry,
                pipeline,
                certificates,
                limits,
                config,
            }),
        }
    }

    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.inner.pool
    }
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }
    pub fn pipeline(&self) -> &Pipeline {
        &self.inner.pipeline
    }
    pub fn admin(&self) -> &AdminToken {
        &self.inner.admin
    }
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }
    pub fn limiter(&self) -> &RateLimiter {
        &self.inner.limiter
    }
    pub fn usage(&self) -> &KeyUsage {
        &self.inner.usage
    }
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }
    pub fn certificates(&self) -> Option<&CertState> {
        self.inner.certificates.as_ref()
    }
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Drops the cached key here and tells every other process to drop theirs.
    pub async fn invalidate_api_key(&self, digest: &[u8]) -> Result<(), RegistryError> {
        let digest: [u8; 32] = digest
            .try_into()
            .map_err(|_| RegistryError::Config("stored key digest is not 32 bytes".into()))?;
        self.inner
            .registry
            .invalidate(Invalidation::api_key(&digest))
            .await
    }
}
