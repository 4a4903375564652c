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
//!   backoff and jitter (capped at [`SinkConfig::retry_max`]) forever; tickets
//!   stay pending, the bounded queue fills, and `enqueue` waits / `try_enqueue`
//!   returns `Full`. [`SinkHandle::is_healthy`] is false meanwhile.
//! - Idempotent by message id: a reading already stored makes no second row
//!   (counted in [`Delivered::duplicates`]) and is published again with the same
//!   `Nats-Msg-Id` (JetStream drops it inside its duplicate window). It is
//!   republished because the earlier attempt may have crashed between the
//!   commit and the publish. Past the window (2 min in the plan's stream
//!   config) such a redelivery yields a second stream message with the same
//!   `Nats-Msg-Id`; consumers that must be exact dedupe on `messageId`.
//! - A unit (e.g. an HTTP batch) is written in one transaction with its batch:
//!   all of it or none of it. The one exception is a batch Postgres refuses for
//!   a data reason (SQLSTATE class 22/23, or 54): it is split in halves until
//!   the refused readings are isolated; the rest is stored, each refused
//!   reading goes to `telemetry.dlq.unstorable`, and its id is listed in
//!   [`Delivered::dead_lettered`].
//!
//! The queue bound counts readings held by the sink (queued, batching or being
//! flushed), so memory is bounded by `queue_capacity × max payload`.

mod batcher;
pub mod copy;
mod flush;
mod unit;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use batcher::{Batchable, Batcher};
pub use flush::FlushError;
pub use unit::{Delivered, SinkConfig};
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
            health: health.clone(),
            close: close.clone(),
        };
        let batcher = Batcher::new(rx, config.batch_size, config.batch_linger, close);
        let dlq = DlqPublisher::new(js.clone()).with_timeout(config.publish_timeout);
        let task = tokio::spawn(flush::run(config, batcher, pg, js, dlq, health));
        (handle, task)
    }
}

impl SinkHandle {
    /// Queues a unit, waiting for capacity (backpressure). A unit of several
    /// readings is stored in one transaction. An empty unit resolves at once.
    pub async fn enqueue(&self, unit: Vec<Reading>) -> Result<Ticket, SinkClosed> {
        let n = self.permits_for(&unit);
        let permit = tokio::select! {
            p = self.permits.clone().acquire_many_owned(n) => p.map_err(|_| SinkClosed)?,
            () = self.close.cancelled() => return Err(SinkClosed),
        };
        self.send(unit, permit).map_err(|e| match e {
            TryEnqueueError::Full(_) | TryEnqueueError::Closed(_) => SinkClosed,
        })
    }

    /// Queues a unit if there is capacity now; never waits. For the MQTT poll
    /// loop, which must never block (the rumqttc manual-ack deadlock in `docs/bridge.md`).
    pub fn try_enqueue(&self, unit: Vec<Reading>) -> Result<Ticket, TryEnqueueError> {
        if self.close.is_cancelled() {
            return Err(TryEnqueueError::Closed(unit));
        }
        let n = self.permits_for(&unit);
        match self.permits.clone().try_acquire_many_owned(n) {
            Ok(permit) => self.send(unit, permit),
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

    fn permits_for(&self, unit: &[Reading]) -> u32 {
        // A unit larger than the whole queue takes the whole queue, rather than
        // waiting forever.
        u32::try_from(unit.len().clamp(1, self.capacity)).unwrap_or(u32::MAX)
    }

    fn send(
        &self,
        unit: Vec<Reading>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Ticket, TryEnqueueError> {
        let (done, rx) = oneshot::channel();
        if unit.is_empty() {
            let _ = done.send(Delivered::default());
            return Ok(Ticket { rx });
        }
        let n = unit.len();
        let source = unit[0].source;
        let unit = Unit {
            readings: unit,
            done,
            _permit: permit,
            enqueued_at: Instant::now(),
        };
        // Capacity is guaranteed by the permit; an error means the sink is closed.
        match self.tx.try_send(unit) {
            Ok(()) => {
                metrics::sink_enqueued(source, n);
                metrics::sink_queued(n as f64);
                Ok(Ticket { rx })
            }
            Err(mpsc::error::TrySendError::Closed(u) | mpsc::error::TrySendError::Full(u)) => {
                Err(TryEnqueueError::Closed(u.readings))
            }
        }
    }
}
