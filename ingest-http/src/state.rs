//! The application state every handler shares (one `Arc`, cheap to clone), and how
//! it is built from a [`Config`]: three Postgres pools (look-ups and the sink's own as
//! `--database-url`'s role, the admin routes' as `--admin-database-url`'s),
//! NATS client and its publish limits, registry, sink, the in-flight budgets, the
//! pre-auth [`KeyGate`], and the certificate API's [`CertState`] (served by
//! `crate::certificates`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use argus_pki::{Ca, PkiError};

use argus_pipeline::limits::{LimitError, PublishLimits};
use argus_pipeline::registry::{Invalidation, Registry, RegistryConfig, RegistryError};
use argus_pipeline::sink::{Sink, SinkConfig};
use argus_schema::nats::Unreachable;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::admin::AdminToken;
use crate::admission::Admission;
use crate::config::{Config, Limits};
use crate::preauth::KeyGate;
use crate::ratelimit::RateLimiter;
use crate::submit::Submitter;
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
    /// A flag allows readings NATS would refuse; the message names the flag.
    #[error("limits: {0}")]
    Limits(#[from] LimitError),
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
    /// The admin routes' pool (API keys, certificates): another role than `pool`'s.
    admin_pool: deadpool_postgres::Pool,
    nats: async_nats::Client,
    registry: Registry,
    submitter: Submitter,
    admin: AdminToken,
    limits: Limits,
    limiter: RateLimiter,
    /// What one JetStream publish may carry (read from the server at start-up).
    publish_limits: PublishLimits,
    admission: Admission,
    key_gate: KeyGate,
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
    let timeouts = argus_pipeline::pg::PoolTimeouts {
        create: std::time::Duration::from_secs(2),
        wait: std::time::Duration::from_secs(2),
    };
    argus_pipeline::pg::pool(url, size, timeouts).map_err(|e| match e {
        argus_pipeline::pg::PoolError::Url(e) => StartError::DatabaseUrl(e.to_string()),
        e @ argus_pipeline::pg::PoolError::Build(_) => StartError::Pool(e.to_string()),
    })
}

impl AppState {
    /// Connects everything the sidecar needs. Postgres and Redis may be down at start
    /// (the pool and the registry connect lazily; `/ready` tells); NATS must answer, and
    /// its `max_payload` must hold the envelope of a reading of `--max-reading-bytes`.
    pub async fn connect(config: Config) -> Result<AppState, StartError> {
        let pool = pg_pool(&config.database_url, config.pg_pool_size)?;
        let sink_pool = pg_pool(&config.database_url, config.sink_pg_pool_size)?;
        let admin_pool = pg_pool(&config.admin_database_url, config.pg_pool_size)?;
        let nats = argus_pipeline::nats::connect(
            config.nats_auth.clone(),
            &config.nats_urls,
            "argus-ingest-http",
            Unreachable::Retry,
        )
        .await
        .map_err(|e| StartError::Nats(e.to_string()))?;
        let publish_limits = PublishLimits::from_server(&nats).await;
        publish_limits.check_config(config.limits.max_reading_bytes, "--max-reading-bytes")?;
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
                linger_mode: config.batch_linger_mode,
                batch_max_bytes: config.batch_max_bytes,
                ..SinkConfig::default()
            },
            sink_pool,
            async_nats::jetstream::new(nats.clone()),
        );
        let submitter = Submitter::new(sink, task);
        let certificates = match &config.pki_dir {
            Some(dir) => {
                let mut cert = CertState::load(
                    dir,
                    config.crl_url.clone(),
                    admin_pool.clone(),
                    config.admin_token.clone(),
                )?;
                if let Some(pid_file) = &config.broker_pid_file {
                    cert = cert.with_broker_pid_file(pid_file.clone());
                }
                if let Some(emqx) = &config.emqx {
                    cert = cert.with_emqx(crate::emqx::EmqxKick::new(emqx.clone()));
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
            (pool, admin_pool),
            (nats, publish_limits),
            registry,
            submitter,
            certificates,
        ))
    }

    fn from_parts(
        config: Config,
        (pool, admin_pool): (deadpool_postgres::Pool, deadpool_postgres::Pool),
        (nats, publish_limits): (async_nats::Client, PublishLimits),
        registry: Registry,
        submitter: Submitter,
        certificates: Option<CertState>,
    ) -> AppState {
        let limits = config.limits.clone();
        // The recorder first, then the `# HELP` text and the zero series.
        let metrics = crate::metrics::prometheus_handle();
        crate::metrics::describe();
        AppState {
            inner: Arc::new(Inner {
                usage: KeyUsage::start(pool.clone()),
                limiter: RateLimiter::new(limits.rate_limit_per_device, limits.rate_limit_burst),
                publish_limits,
                admission: Admission::new(
                    limits.max_in_flight_requests,
                    limits.max_in_flight_bytes,
                ),
                key_gate: KeyGate::new(limits.preauth_rate_per_address, limits.preauth_burst),
                admin: config.admin_token.clone(),
                metrics,
                draining: AtomicBool::new(false),
                pool,
                admin_pool,
                nats,
                registry,
                submitter,
                certificates,
                limits,
                config,
            }),
        }
    }

    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.inner.pool
    }
    /// The admin routes' pool (`--admin-database-url`).
    pub fn admin_pool(&self) -> &deadpool_postgres::Pool {
        &self.inner.admin_pool
    }
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }
    /// Hands a request's readings to the sink and waits until they are durable.
    pub fn submitter(&self) -> &Submitter {
        &self.inner.submitter
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
    pub fn publish_limits(&self) -> &PublishLimits {
        &self.inner.publish_limits
    }
    /// The in-flight request and byte budgets of the ingest endpoint.
    pub fn admission(&self) -> &Admission {
        &self.inner.admission
    }
    pub fn key_gate(&self) -> &KeyGate {
        &self.inner.key_gate
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

/// What the certificate endpoints need.
#[derive(Clone)]
pub struct CertState {
    /// The CA. Shared without a mutex: every change to its directory takes the directory's
    /// lock file, so the CLI may run beside the server.
    pub ca: Arc<Ca>,
    pub pool: deadpool_postgres::Pool,
    pub admin: AdminToken,
    /// A pid file of the broker (the local stack's Mosquitto): it gets SIGHUP after every
    /// CRL change, so a revocation takes effect within a second. `None`: reload it yourself.
    pub broker_pid_file: Option<PathBuf>,
    /// `--emqx-api-url`: EMQX kicks the device's live connection after a revocation.
    pub emqx: Option<crate::emqx::EmqxKick>,
}

impl CertState {
    pub fn new(ca: Arc<Ca>, pool: deadpool_postgres::Pool, admin: AdminToken) -> CertState {
        CertState {
            ca,
            pool,
            admin,
            broker_pid_file: None,
            emqx: None,
        }
    }

    /// Loads the CA from `pki_dir` (`argus-pki init --dir`); `crl_url` is the distribution
    /// point written into certificates (default [`argus_pki::DEFAULT_CRL_URL`]).
    pub fn load(
        pki_dir: &Path,
        crl_url: Option<String>,
        pool: deadpool_postgres::Pool,
        admin: AdminToken,
    ) -> Result<CertState, PkiError> {
        let mut ca = Ca::load(pki_dir)?;
        if let Some(url) = crl_url {
            ca = ca.with_crl_url(url);
        }
        Ok(CertState::new(Arc::new(ca), pool, admin))
    }

    pub fn with_emqx(mut self, kick: crate::emqx::EmqxKick) -> CertState {
        self.emqx = Some(kick);
        self
    }

    pub fn with_broker_pid_file(mut self, path: impl Into<PathBuf>) -> CertState {
        self.broker_pid_file = Some(path.into());
        self
    }

    /// SIGHUP to the broker after a CRL change (best effort, logged).
    pub(crate) fn reload_broker(&self) {
        let Some(path) = &self.broker_pid_file else {
            return;
        };
        let pid = match std::fs::read_to_string(path) {
            Ok(text) => text.trim().to_string(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot read the broker pid file; reload the broker by hand.");
                return;
            }
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            tracing::warn!(path = %path.display(), "The broker pid file holds no pid.");
            return;
        }
        match std::process::Command::new("kill")
            .arg("-HUP")
            .arg(&pid)
            .status()
        {
            Ok(s) if s.success() => {
                tracing::info!(%pid, "Sent SIGHUP to the broker (CRL changed).")
            }
            Ok(s) => tracing::warn!(%pid, status = %s, "Could not signal the broker."),
            Err(e) => tracing::warn!(%pid, error = %e, "Could not signal the broker."),
        }
    }
}
