//! The sink's two stages, run concurrently in one task so that batch N+1 is
//! written to Postgres while batch N is published to JetStream:
//!
//! 1. store: [`Batcher`] → dedupe by id → one transaction with binary `COPY`
//!    (fallback on a unique violation: a temp staging table,
//!    `INSERT … ON CONFLICT (id) DO NOTHING RETURNING id`, and the stored rows'
//!    digests and delivery context for the ids that were there already), retried
//!    on outages, split in halves on data errors and on timeouts;
//! 2. publish: every stored reading to `telemetry.raw.v1.<deviceId>` with
//!    `Nats-Msg-Id` (a duplicate with the stored row's context), all sends first,
//!    then all acks awaited together; refused readings, id conflicts and
//!    envelopes JetStream can never take to the DLQ; then the tickets resolve.

use std::sync::Arc;

use async_nats::jetstream;
use tokio::sync::mpsc;

use super::batcher::Batcher;
use super::publish::publish_batch;
use super::store::{store_batch, Stored};
use super::unit::{Health, SinkConfig, Unit};
use crate::dlq::DlqPublisher;
use crate::metrics;

pub(super) async fn run(
    config: SinkConfig,
    mut batcher: Batcher<Unit>,
    pg: deadpool_postgres::Pool,
    js: jetstream::Context,
    dlq: DlqPublisher,
    health: Arc<Health>,
) {
    // One stored batch waits while the previous one is published.
    let (tx, mut rx) = mpsc::channel::<Stored>(1);
    let store = async {
        while let Some(units) = batcher.next_batch().await {
            metrics::sink_linger(batcher.linger());
            let stored = store_batch(&config, &pg, &health, units).await;
            if tx.send(stored).await.is_err() {
                break;
            }
        }
        drop(tx);
    };
    let publish = async {
        while let Some(stored) = rx.recv().await {
            publish_batch(&config, &js, &dlq, &health, stored).await;
        }
    };
    tokio::join!(store, publish);
    tracing::info!("Sink drained and stopped.");
}
