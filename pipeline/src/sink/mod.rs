//! The batch sink, shared by the MQTT bridge and the HTTP sidecar:
//! `enqueue → Batcher → Postgres (COPY, one transaction) → JetStream (pipelined) → Ticket`.
//!
//! ```ignore
//! let (sink, task) = Sink::start(SinkConfig::default(), pg_pool, jetstream);
//! // A source's admit stage: waits while the sink is full (backpressure).
//! let ticket = sink.enqueue(vec![reading]).await?; // Err(SinkClosed): shutting down, do not ack
//! // Acknowledge only after the ticket resolves Ok (the MQTT acker does, in receive order).
//! match ticket.await {
//!     Ok(delivered) => { /* durable in Postgres and JetStream, or dead-lettered
//!                           (delivered.dead_lettered): acknowledge */ }
//!     Err(SinkError::Closed) => { /* do not ack; the broker redelivers */ }
//! }
//! // A caller that must never wait uses `try_enqueue`, which hands the unit back
//! // (`TryEnqueueError::Full(unit)`) instead of waiting for space.
//! // Shutdown: stop intake, then
//! sink.close(); task.await; // flushes what is queued, resolves every ticket
//! ```
//!
//! Guarantees:
//! - A [`Ticket`] resolves `Ok` only when every reading of its unit is committed
//!   in `telemetry_raw` (new row or already there) AND acknowledged by JetStream,
//!   or — for a reading Postgres itself refuses (`unstorable`) — acknowledged by
//!   the DLQ stream. Nothing is dropped.
//! - Postgres or NATS down or slow: the same batch is retried with exponential
//!   backoff and jitter (capped at [`SinkConfig::retry_max`]) until they are back
//!   (an outage has no other cure, and nothing is acknowledged meanwhile); a batch
//!   that runs out of time (`pg_timeout`, or SQLSTATE 57014) is split in halves
//!   instead of being retried identically; tickets
//!   stay pending, the bounded queue fills, and `enqueue` waits / `try_enqueue`
//!   returns `Full`. [`SinkHandle::is_healthy`] is false meanwhile.
//! - One id, one content. A reading already stored with the same content digest
//!   (`telemetry_raw.content_sha256`, [`Reading::content_sha256`]) makes no second
//!   row (counted in [`Delivered::duplicates`], listed in
//!   [`Delivered::duplicate_ids`]) and is published again with the same
//!   `Nats-Msg-Id` and the stored row's delivery context, so both stores hold one
//!   content under one id even past JetStream's duplicate window. It is
//!   republished because the earlier attempt may have crashed between the commit
//!   and the publish. A reading under a stored id (or an id earlier in its batch)
//!   with another digest is not stored: it goes to `telemetry.dlq.id_conflict` and
//!   is listed in [`Delivered::conflicts`].
//! - An envelope JetStream can never take (past the server's `max_payload` or the
//!   stream's `max_msg_size`, decided from the error's kind) is not retried: its
//!   row stays stored, the reading goes to `telemetry.dlq.oversize` and is listed in
//!   [`Delivered::dead_lettered`].
//! - A unit (e.g. an HTTP batch) is written in one transaction with its batch:
//!   all of it or none of it. The exceptions are a batch that runs out of time
//!   (split, every part still stored) and a batch Postgres refuses for
//!   a data reason (SQLSTATE class 22/23, or 54): it is split in halves until
//!   the refused readings are isolated; the rest is stored, each refused
//!   reading goes to `telemetry.dlq.unstorable`, and its id is listed in
//!   [`Delivered::dead_lettered`].
//!
//! The queue bounds count the readings held by the sink (queued, batching or being
//! flushed) and their payload bytes, so memory is bounded by `queue_max_bytes`
//! whatever the payload sizes.

mod batcher;
pub mod copy;
mod flush;
mod publish;
mod store;
mod unit;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use batcher::{Batchable, Batcher, LingerMode};
pub use store::FlushError;
pub use unit::{Delivered, IdConflict, SinkConfig};
use unit::{Health, Unit};

use crate::dlq::DlqPublisher;
use crate::metrics;
use crate::reading::Reading;

/// Why a ticket failed. It never fails for an outage (those are retried);
/// only when the sink stops before the unit is durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The sink task ended (aborted or panicked) before the unit was durable.
    /// Do not acknowledge: the sender or broker must deliver it again.
    #[error("sink stopped before the unit was durable")]
    Closed,
}

/// The sink no longer takes units (closed or ended).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sink is closed")]
pub struct SinkClosed;

/// [`SinkHandle::try_enqueue`] did not take the unit; it is handed back.
#[derive(Debug, thiserror::Error)]
pub enum TryEnqueueError {
    /// The queue is at capacity: back off (stop reading) and retry.
    #[error("sink queue is full")]
    Full(Vec<Reading>),
    /// The sink is closed.
    #[error("sink is closed")]
    Closed(Vec<Reading>),
}

impl TryEnqueueError {
    /// The unit, back to the caller.
    pub fn into_inner(self) -> Vec<Reading> {
        match self {
            TryEnqueueError::Full(u) | TryEnqueueError::Closed(u) => u,
        }
    }
}

/// Resolves when the unit is durable (see [`Delivered`]). Dropping it does not
/// cancel the write.
#[derive(Debug)]
pub struct Ticket {
    rx: oneshot::Receiver<Delivered>,
}

impl std::future::Future for Ticket {
    type Output = Result<Delivered, SinkError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_err(|_| SinkError::Closed))
    }
}

/// A cheap, cloneable handle to the sink.
#[derive(Clone, Debug)]
pub struct SinkHandle {
    tx: mpsc::Sender<Unit>,
    permits: Arc<Semaphore>,
    capacity: usize,
    bytes: Arc<Semaphore>,
    capacity_bytes: usize,
    health: Arc<Health>,
    close: CancellationToken,
}

/// Starts the sink.
pub struct Sink;

impl Sink {
    /// Spawns the sink's tasks. The returned task ends after [`SinkHandle::close`]
    /// (or when every handle is dropped) once everything queued is flushed and
    /// every ticket resolved. Aborting it resolves pending tickets with
    /// [`SinkError::Closed`].
    pub fn start(
        config: SinkConfig,
        pg: deadpool_postgres::Pool,
        js: async_nats::jetstream::Context,
    ) -> (SinkHandle, JoinHandle<()>) {
        let capacity = config.queue_capacity.max(1);
        // Permits are acquired as u32.
        let capacity_bytes = config.queue_max_bytes.clamp(1, u32::MAX as usize);
        // Every unit holds at least one permit, so the channel never fills
        // before the semaphore does.
        let (tx, rx) = mpsc::channel(capacity);
        let close = CancellationToken::new();
        let health = Arc::new(Health::default());
        metrics::sink_healthy(true);
        let handle = SinkHandle {
            tx,
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            bytes: Arc::new(Semaphore::new(capacity_bytes)),
            capacity_bytes,
            health: health.clone(),
            close: close.clone(),
        };
        let batcher = Batcher::new(
            rx,
            config.batch_size,
            config.batch_max_bytes,
            config.batch_linger,
            config.linger_mode,
            close,
        );
        let dlq = DlqPublisher::new(js.clone()).with_timeout(config.publish_timeout);
        let task = tokio::spawn(flush::run(config, batcher, pg, js, dlq, health));
        (handle, task)
    }
}

impl SinkHandle {
    /// Queues a unit, waiting for capacity (backpressure). A unit of several
    /// readings is stored in one transaction. An empty unit resolves at once.
    pub async fn enqueue(&self, unit: Vec<Reading>) -> Result<Ticket, SinkClosed> {
        let (n, bytes) = self.permits_for(&unit);
        let permits = async {
            let p = self.permits.clone().acquire_many_owned(n).await?;
            let b = self.bytes.clone().acquire_many_owned(bytes).await?;
            Ok::<_, tokio::sync::AcquireError>((p, b))
        };
        let permits = tokio::select! {
            p = permits => p.map_err(|_| SinkClosed)?,
            () = self.close.cancelled() => return Err(SinkClosed),
        };
        self.send(unit, permits).map_err(|e| match e {
            TryEnqueueError::Full(_) | TryEnqueueError::Closed(_) => SinkClosed,
        })
    }

    /// Queues a unit if there is capacity now; never waits. For the MQTT poll
    /// loop, which must never block (the rumqttc manual-ack deadlock in `docs/bridge.md`).
    pub fn try_enqueue(&self, unit: Vec<Reading>) -> Result<Ticket, TryEnqueueError> {
        if self.close.is_cancelled() {
            return Err(TryEnqueueError::Closed(unit));
        }
        let (n, bytes) = self.permits_for(&unit);
        let permits = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .and_then(|p| Ok((p, self.bytes.clone().try_acquire_many_owned(bytes)?)));
        match permits {
            Ok(permits) => self.send(unit, permits),
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(TryEnqueueError::Full(unit)),
            Err(tokio::sync::TryAcquireError::Closed) => Err(TryEnqueueError::Closed(unit)),
        }
    }

    /// Stops intake: later `enqueue`s fail with [`SinkClosed`]; what is queued
    /// is flushed and the sink task ends. Await the task from [`Sink::start`]
    /// (with a timeout: a store that stays down keeps it retrying).
    pub fn close(&self) {
        self.close.cancel();
    }

    /// False while the last flush attempt failed (Postgres or NATS unreachable);
    /// for `/ready`.
    pub fn is_healthy(&self) -> bool {
        self.health.is_healthy()
    }

    /// The error of the last failed attempt, while unhealthy. No secrets: the
    /// text of a driver error.
    pub fn last_error(&self) -> Option<String> {
        self.health.last_error()
    }

    /// Readings the sink holds now (queued, batching, flushing).
    pub fn queued(&self) -> usize {
        self.capacity
            .saturating_sub(self.permits.available_permits())
    }

    /// The configured capacity, in readings.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Payload bytes the sink holds now.
    pub fn queued_bytes(&self) -> usize {
        self.capacity_bytes
            .saturating_sub(self.bytes.available_permits())
    }

    /// `(readings, bytes)` permits for `unit`. A unit larger than the whole queue
    /// takes the whole queue, rather than waiting forever.
    fn permits_for(&self, unit: &[Reading]) -> (u32, u32) {
        let bytes: usize = unit.iter().map(|r| r.payload.len()).sum();
        let n = u32::try_from(unit.len().clamp(1, self.capacity)).unwrap_or(u32::MAX);
        let b = u32::try_from(bytes.clamp(1, self.capacity_bytes)).unwrap_or(u32::MAX);
        (n, b)
    }

    fn send(
        &self,
        unit: Vec<Reading>,
        (permit, bytes_permit): (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) -> Result<Ticket, TryEnqueueError> {
        let (done, rx) = oneshot::channel();
        if unit.is_empty() {
            let _ = done.send(Delivered::default());
            return Ok(Ticket { rx });
        }
        let n = unit.len();
        let source = unit[0].source;
        let bytes: usize = unit.iter().map(|r| r.payload.len()).sum();
        let unit = Unit {
            readings: unit,
            done,
            _permit: permit,
            _bytes_permit: bytes_permit,
            bytes,
            enqueued_at: Instant::now(),
        };
        // Capacity is guaranteed by the permit; an error means the sink is closed.
        match self.tx.try_send(unit) {
            Ok(()) => {
                metrics::sink_enqueued(source, n);
                metrics::sink_queued(n as f64);
                metrics::sink_queued_bytes(bytes as f64);
                Ok(Ticket { rx })
            }
            Err(mpsc::error::TrySendError::Closed(u) | mpsc::error::TrySendError::Full(u)) => {
                Err(TryEnqueueError::Closed(u.readings))
            }
        }
    }
}
