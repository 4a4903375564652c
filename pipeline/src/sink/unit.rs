//! What the sink's handle ([`super::SinkHandle`]) and its flush task share: the
//! configuration, the unit travelling through the sink, its outcome, and the health
//! of each stage.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;
use uuid::Uuid;

use super::batcher::{Batchable, LingerMode};
use crate::metrics;
use crate::reading::Reading;

/// Sink configuration. Every field is a bridge flag (`--batch-size`, ...).
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Flush when this many readings are pending. Default 500.
    pub batch_size: usize,
    /// Flush before the pending payload bytes would pass this; a unit larger than
    /// it is a batch by itself. Default 8 MiB, so one batch is written well within
    /// `pg_timeout` (a statement timeout splits a batch anyway).
    pub batch_max_bytes: usize,
    /// Flush when the oldest pending reading has waited this long: at most this,
    /// and with [`LingerMode::Adaptive`] less while the sink is not busy. Default 20 ms.
    pub batch_linger: Duration,
    /// Adaptive (the default) or fixed linger.
    pub linger_mode: LingerMode,
    /// Readings the sink may hold (queued + batching + flushing) before
    /// `enqueue` waits and `try_enqueue` returns `Full`. Default 10 000.
    /// Size it from the broker inflight window × connections.
    pub queue_capacity: usize,
    /// Payload bytes the sink may hold, the same way. Default 64 MiB. With
    /// `queue_capacity` this bounds the sink's memory whatever the payload sizes.
    pub queue_max_bytes: usize,
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
            batch_max_bytes: 8 * 1024 * 1024,
            batch_linger: Duration::from_millis(20),
            linger_mode: LingerMode::Adaptive,
            queue_capacity: 10_000,
            queue_max_bytes: 64 * 1024 * 1024,
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
    /// Message ids of readings Postgres refused, now in `telemetry.dlq.unstorable`,
    /// or that JetStream can never take (the envelope is past the server's
    /// `max_payload`), now in `telemetry.dlq.oversize` with their row stored.
    /// Empty in practice; the HTTP sidecar may report them per reading.
    pub dead_lettered: Vec<Uuid>,
    /// Message ids of the readings counted in `duplicates`: already stored with
    /// the same content (and republished from the stored row).
    pub duplicate_ids: Vec<Uuid>,
    /// Readings whose id was already stored with different content: not stored,
    /// dead-lettered as `id_conflict` (see [`IdConflict`]).
    pub conflicts: Vec<IdConflict>,
}

/// A reading that arrived under an id already stored with a different content
/// digest. It is not a duplicate: the stored row stays, the new reading goes to
/// `telemetry.dlq.id_conflict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdConflict {
    /// The message id, which is the stored row's `telemetry_raw.id`.
    pub id: Uuid,
    /// Hex SHA-256 of the stored row's content (`telemetry_raw.content_sha256`).
    pub stored_sha256: String,
    /// Hex SHA-256 of the refused reading's content.
    pub sha256: String,
}

/// One enqueued unit travelling through the sink.
pub(super) struct Unit {
    pub(super) readings: Vec<Reading>,
    pub(super) done: oneshot::Sender<Delivered>,
    /// Held until the unit resolves: the queue bounds count in-flight readings
    /// and their payload bytes.
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) _bytes_permit: OwnedSemaphorePermit,
    /// Payload bytes of `readings`.
    pub(super) bytes: usize,
    pub(super) enqueued_at: Instant,
}

impl Batchable for Unit {
    fn weight(&self) -> usize {
        self.readings.len()
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
    fn enqueued_at(&self) -> Instant {
        self.enqueued_at
    }
}

/// The stage a health report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Postgres,
    JetStream,
}

/// Health shared between the sink tasks and handles: one flag per stage, so a
/// healthy stage never masks the other one's outage.
#[derive(Debug, Default)]
pub(super) struct Health {
    pg_down: AtomicBool,
    js_down: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Health {
    /// The error of the last failed attempt, while unhealthy.
    pub(super) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn flag(&self, stage: Stage) -> &AtomicBool {
        match stage {
            Stage::Postgres => &self.pg_down,
            Stage::JetStream => &self.js_down,
        }
    }

    pub(super) fn is_healthy(&self) -> bool {
        !self.pg_down.load(Ordering::Relaxed) && !self.js_down.load(Ordering::Relaxed)
    }

    pub(super) fn ok(&self, stage: Stage) {
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

    pub(super) fn failed(&self, stage: Stage, error: String) {
        self.flag(stage).store(true, Ordering::Relaxed);
        metrics::sink_healthy(false);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error);
        }
    }
}

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit")
            .field("readings", &self.readings.len())
            .finish()
    }
}
