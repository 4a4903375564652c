//! The bridge process, wired together: `source → admit → sink`, plus the
//! operations server. The binary calls [`run`]; tests call [`start`] to run a
//! bridge in-process and stop it through the returned [`Running`].
//!
//! ```text
//! source (N connections) ──> admit::Admit: checks → Registry → SinkHandle::enqueue → Ticket
//!                                          '─ reject ─> DlqPublisher (then ack)
//! ```
//!
//! Shutdown, in two stages: cancelling the token marks the process draining
//! (`/health` 503), stops intake on every connection, lets the admitted
//! messages become durable and be acknowledged, disconnects, then closes and
//! flushes the sink. All of that within `--shutdown-timeout`; past it the
//! process stops anyway and the broker redelivers whatever was not
//! acknowledged.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use argus_pipeline::dlq::DlqPublisher;
use argus_pipeline::limits::PublishLimits;
use argus_pipeline::pg;
use argus_pipeline::reading::Limits;
use argus_pipeline::registry::{Registry, RegistryConfig};
use argus_pipeline::sink::{Sink, SinkConfig, SinkHandle};
use argus_schema::nats::Unreachable;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admit::Admit;
use crate::config::{Config, MqttVersion};
use crate::server::{self, Check, ServerState, Status};
use crate::source;

/// A bridge running in this process.
pub struct Running {
    /// The address the operations server bound (useful with port 0).
    pub metrics_addr: SocketAddr,
    /// Cancel to begin a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Ends when the bridge has stopped.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Runs the bridge until `shutdown` completes, then drains and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let running = start(config).await?;
    let token = running.shutdown.clone();
    let mut task = running.task;
    tokio::select! {
        r = &mut task => return r.context("bridge task")?,
        () = shutdown => token.cancel(),
    }
    task.await.context("bridge task")?
}

/// Connects what must be connected up front (TLS files, the HTTP port), starts
/// every task and returns. Postgres, NATS and the broker need not be up: each
/// part retries until they are.
pub async fn start(mut config: Config) -> anyhow::Result<Running> {
    // `--replica auto`: the slot decides the client ids and certificate files.
    let lease = match config.replica_auto {
        Some(max) => {
            let lease = crate::lease::lease_slot(&config.database_url, max).await?;
            config.mqtt.replica = lease.slot;
            Some(lease)
        }
        None => None,
    };
    // Read the certificates first: a bad file is a configuration error, reported now.
    let tls = source::tls_configs(&config.mqtt).context("MQTT TLS configuration")?;

    let prometheus = server::prometheus_handle();
    crate::metrics::describe();

    let pool = pg_pool(&config.database_url, config.pg_pool_size)?;
    // Start even when NATS is down (the sink retries until it is back); refused
    // credentials are a start-up error that names the user.
    let nats = argus_pipeline::nats::connect(
        config.nats_auth.clone(),
        &config.nats_urls,
        &format!("argus-bridge-{}", config.mqtt.replica),
        Unreachable::Retry,
    )
    .await?;
    // The largest envelope and dead letter must fit the server's max_payload.
    // NATS down at start-up: the check assumes NATS's default (1 MiB) and says so;
    // a smaller server limit then shows per message (`docs/bridge.md`).
    // With MQTT 5 an envelope may also carry the message's properties.
    let properties = (config.mqtt.version == MqttVersion::V5).then_some(&config.property_limits);
    PublishLimits::from_server(&nats)
        .await
        .check_config_with_properties(
            config.max_payload_bytes,
            properties,
            "--max-payload-bytes",
        )?;
    let js = async_nats::jetstream::new(nats.clone());

    let sink_config = SinkConfig {
        batch_size: config.batch_size,
        batch_linger: config.batch_linger,
        linger_mode: config.batch_linger_mode,
        batch_max_bytes: config.batch_max_bytes,
        // Every connection can have a full broker window admitted at once.
        queue_capacity: (config.mqtt.max_inflight * config.mqtt.connections as usize)
            .max(config.batch_size * 2),
        ..SinkConfig::default()
    };
    let (sink, sink_task) = Sink::start(sink_config, pool.clone(), js.clone());
    let registry = Registry::start(
        RegistryConfig {
            redis_url: config.redis_url.clone(),
            ..RegistryConfig::default()
        },
        pool.clone(),
    )
    .context("--redis-url")?;
    let admit = Arc::new(Admit {
        sink: sink.clone(),
        registry,
        dlq: DlqPublisher::new(js),
        limits: Limits {
            max_payload_bytes: config.max_payload_bytes,
        },
        property_limits: config.property_limits,
    });

    let status = Status::default();
    let shutdown = CancellationToken::new();
    let server_stop = CancellationToken::new();
    let unacked = source::Unacked::new(config.mqtt.connections);
    let mut checks = readiness_checks(pool, nats, sink.clone());
    checks.push(delivery_check(
        unacked.clone(),
        config.ready_max_unacked_age,
    ));
    let (metrics_addr, server_task) = server::serve(
        config.metrics_addr,
        ServerState {
            status: status.clone(),
            checks,
            metrics: prometheus,
        },
        server_stop.clone().cancelled_owned(),
    )
    .await
    .with_context(|| format!("--metrics-addr {}", config.metrics_addr))?;
    info!(%metrics_addr, replica = config.mqtt.replica, connections = config.mqtt.connections, subscription = %config.mqtt.subscription(), "Bridge started.");

    tokio::spawn(
        unacked
            .clone()
            .watch(config.ready_max_unacked_age, server_stop.clone()),
    );
    let source_task = tokio::spawn(source::run(
        config.mqtt.clone(),
        tls,
        admit,
        status.clone(),
        unacked,
        shutdown.clone(),
    ));

    let token = shutdown.clone();
    let timeout = config.shutdown_timeout;
    let task = tokio::spawn(async move {
        match &lease {
            // Another process took the slot while the lease connection was down:
            // stop, so two processes do not keep sharing client ids.
            Some(lease) => tokio::select! {
                () = token.cancelled() => {}
                () = lease.lost.cancelled() => token.cancel(),
            },
            None => token.cancelled().await,
        }
        status.set_draining();
        info!(
            timeout_ms = timeout.as_millis() as u64,
            "Shutting down: draining."
        );
        let drain = async {
            // Stage 1: every connection stops intake, acknowledges what
            // becomes durable, disconnects.
            let _ = source_task.await;
            // Stage 2: nothing more comes in; flush whatever the sink holds.
            sink.close();
            let _ = sink_task.await;
        };
        let clean = tokio::time::timeout(timeout, drain).await.is_ok();
        server_stop.cancel();
        let _ = server_task.await;
        let lost = lease
            .as_ref()
            .filter(|l| l.lost.is_cancelled())
            .map(|l| l.slot);
        drop(lease);
        if let Some(slot) = lost {
            anyhow::bail!("replica slot {slot} is held by another process (its lease was lost and taken); stopped so two processes do not share its client ids");
        }
        if clean {
            info!("Bridge stopped cleanly.");
            Ok(())
        } else {
            warn!("Shutdown timeout reached; unacknowledged messages will be redelivered by the broker.");
            Ok(())
        }
    });

    Ok(Running {
        metrics_addr,
        shutdown,
        task,
    })
}

fn pg_pool(url: &str, size: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    let timeouts = pg::PoolTimeouts {
        create: Duration::from_secs(5),
        wait: Duration::from_secs(10),
    };
    pg::pool(url, size, timeouts).map_err(|e| match e {
        pg::PoolError::Url(e) => anyhow::anyhow!("invalid --database-url: {e}"),
        e @ pg::PoolError::Build(_) => anyhow::Error::new(e).context("--pg-pool-size"),
    })
}

fn readiness_checks(
    pool: deadpool_postgres::Pool,
    nats: async_nats::Client,
    sink: SinkHandle,
) -> Vec<(&'static str, Check)> {
    let postgres: Check = Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    });
    let nats: Check = Arc::new(move || {
        let state = nats.connection_state();
        Box::pin(async move {
            match state {
                async_nats::connection::State::Connected => Ok(()),
                other => Err(format!("{other}")),
            }
        })
    });
    let sink: Check = Arc::new(move || {
        let r = match sink.last_error() {
            Some(e) if !sink.is_healthy() => Err(e),
            _ => Ok(()),
        };
        Box::pin(futures::future::ready(r))
    });
    vec![("postgres", postgres), ("nats", nats), ("sink", sink)]
}

/// `/ready`'s `delivery` check: fails while a message has waited longer than
/// `bound` without being acknowledged (`--ready-max-unacked-age`).
fn delivery_check(unacked: source::Unacked, bound: Duration) -> (&'static str, Check) {
    let check: Check = Arc::new(move || Box::pin(futures::future::ready(unacked.check(bound))));
    ("delivery", check)
}
