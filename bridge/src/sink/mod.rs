//! The batch sink, shared by the MQTT bridge and the HTTP sidecar:
//! `enqueue → Batcher → Postgres (COPY, one transaction) → JetStream (pipelined) → Ticket`.
//!
//! ```ignore
//! let (sink, task) = Sink::start(SinkConfig::default(), pg_pool, jetstream);
//! // MQTT poll loop: never blocks.
//! match sink.try_enqueue(vec![reading]) {
//!     Ok(ticket) => { /* hand (ticket, publish) to the acker, in receive order */ }
//!     Err(TryEnqueueError::Full(unit)) => { /* keep it; stop reading; retry */ }
//!     Err(TryEnqueueError::Closed(_)) => { /* shutting down: do not ack */ }
//! }
//! // Acker: PUBACK only after the ticket resolves Ok.
//! match ticket.await {
//!     Ok(delivered) => { /* durable in Postgres and JetStream, or dead-lettered
//!                           (delivered.dead_lettered): PUBACK */ }
//!     Err(SinkError::Closed) => { /* do not ack; the broker redelivers */ }
//! }
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use batcher::{Batchable, Batcher};
pub use flush::FlushError;

use crate::dlq::DlqPublisher;
use crate::metrics;
use crate::reading::Reading;

/// Sink configuration. Every field is a bridge flag (`--batch-size`, ...).
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Flush when this many readings are pending. Default 500.
    pub batch_size: usize,
    /// Flush when the oldest pending reading has waited this long. Default 20 ms.
    pub batch_linger: Duration,
    /// Readings the sink may hold (queued + batching + flushing) before
    /// `enqueue` waits and `try_enqueue` returns `Full`. Default 10 000.
    /// Size it from the broker inflight window × connections.
    pub queue_capacity: usize,
    /// First retry delay after a failed flush attempt. Default 100 ms.
    pub retry_initial: Duration,
    /// Retry delay cap. Default 5 s.
    pub retry_max: Duration,
    /// Time limit of one Postgres attempt (connect, COPY, commit). Default 30 s.
    pub pg_timeout: Duration,
    /// Time limit of one JetStream attempt (publish all, await all acks). Default 10 s.
    pub publish_timeout: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            batch_size: 500,
            batch_linger: Duration::from_millis(20),
            queue_capacity: 10_000,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            pg_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// The outcome of a unit: every reading is durable in both stores or dead-lettered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Readings in the unit.
    pub readings: usize,
    /// Readings that were already stored (a redelivery), or a second copy of
    /// the same message in the same batch. No second row was written.
    pub duplicates: usize,
    /// Message ids of readings Postgres refused, now in `telemetry.dlq.unstorable`.
    /// Empty in practice; the HTTP sidecar may report them per reading.
    pub dead_lettered: Vec<Uuid>,
}

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

/// One enqueued unit travelling through the sink.
pub(crate) struct Unit {
    readings: Vec<Reading>,
    done: oneshot::Sender<Delivered>,
    /// Held until the unit resolves: the queue bound counts in-flight readings.
    _permit: OwnedSemaphorePermit,
    enqueued_at: Instant,
}

impl Batchable for Unit {
    fn weight(&self) -> usize {
        self.readings.len()
    }
    fn enqueued_at(&self) -> Instant {
        self.enqueued_at
    }
}

/// The stage a health report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Postgres,
    JetStream,
}

/// Health shared between the sink tasks and handles: one flag per stage, so a
/// healthy stage never masks the other one's outage.
#[derive(Debug, Default)]
struct Health {
    pg_down: AtomicBool,
    js_down: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Health {
    fn flag(&self, stage: Stage) -> &AtomicBool {
        match stage {
            Stage::Postgres => &self.pg_down,
            Stage::JetStream => &self.js_down,
        }
    }

    fn is_healthy(&self) -> bool {
        !self.pg_down.load(Ordering::Relaxed) && !self.js_down.load(Ordering::Relaxed)
    }

    fn ok(&self, stage: Stage) {
        if self.flag(stage).swap(false, Ordering::Relaxed) {
            let healthy = self.is_healthy();
            metrics::sink_healthy(healthy);
            if healthy {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
            }
        }
    }

    fn failed(&self, stage: Stage, error: String) {
        self.flag(stage).store(true, Ordering::Relaxed);
        metrics::sink_healthy(false);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error);
        }
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

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit")
            .field("readings", &self.readings.len())
            .finish()
    }
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
    /// loop, which must never block (rumqttc deadlock, ARCHITECTURE.md trap 3).
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
        self.health.last_error.lock().ok().and_then(|e| e.clone())
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
