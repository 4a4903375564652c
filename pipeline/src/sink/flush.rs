//! The sink's two stages, run concurrently in one task so that batch N+1 is
//! written to Postgres while batch N is published to JetStream:
//!
//! 1. store: [`Batcher`] → dedupe by id → one transaction with binary `COPY`
//!    (fallback on a unique violation: a temp staging table and
//!    `INSERT … ON CONFLICT (id) DO NOTHING RETURNING id`), retried forever on
//!    outages, split in halves on data errors;
//! 2. publish: every stored reading to `telemetry.raw.v1.<deviceId>` with
//!    `Nats-Msg-Id`, all sends first, then all acks awaited together; refused
//!    readings to the DLQ; then the tickets resolve.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::{Bytes, BytesMut};
use futures::SinkExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::batcher::Batcher;
use super::copy::{self, COLUMNS};
use super::unit::{Delivered, Health, SinkConfig, Stage, Unit};
use crate::backoff::Backoff;
use crate::dlq::{DeadLetter, DlqPublisher, DlqReason};
use crate::reading::{Reading, Reject};
use crate::{envelope, metrics};

/// Chunk size of `CopyData` messages.
const COPY_CHUNK: usize = 64 * 1024;

const STAGING_CREATE: &str = "CREATE TEMP TABLE argus_raw_staging (\
     id uuid, tenant_id uuid, device_id uuid, payload jsonb, payload_size_bytes int4, \
     correlation_id text, sequence_number int4, total_chunks int4, device_timestamp timestamptz, \
     received_at timestamptz, ingestion_source text, mqtt_topic text, client_id text) ON COMMIT DROP";

/// A failed flush attempt.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres attempt timed out after {0:?}")]
    PgTimeout(Duration),
    #[error("jetstream publish: {0}")]
    Publish(#[from] jetstream::context::PublishError),
    #[error("jetstream attempt timed out after {0:?}")]
    PublishTimeout(Duration),
}

impl FlushError {
    /// Data-caused: Postgres refuses these rows and will refuse them again
    /// (SQLSTATE class 22 data exception, 23 integrity, 54 program limit).
    pub fn is_data(&self) -> bool {
        let FlushError::Postgres(e) = self else {
            return false;
        };
        e.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
        })
    }

    /// Everything that is not data-caused is an outage: retry the same batch.
    pub fn is_retriable(&self) -> bool {
        !self.is_data()
    }

    /// A short text for logs and dead letters: the server's message and
    /// SQLSTATE only (never the DETAIL/CONTEXT, which quote the payload).
    fn short(&self) -> String {
        match self {
            FlushError::Postgres(e) => match e.as_db_error() {
                Some(db) => format!("postgres {}: {}", db.code().code(), db.message()),
                None => format!("postgres: {e}"),
            },
            other => other.to_string(),
        }
    }

    fn is_unique_violation(&self) -> bool {
        matches!(self, FlushError::Postgres(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION))
    }
}

/// What Postgres made of each unique reading of a batch.
#[derive(Debug)]
enum Outcome {
    New,
    Duplicate,
    Unstorable(String),
}

/// A batch after the store stage.
struct Stored {
    units: Vec<Unit>,
    outcome: HashMap<Uuid, Outcome>,
}

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

async fn store_batch(
    config: &SinkConfig,
    pg: &deadpool_postgres::Pool,
    health: &Health,
    units: Vec<Unit>,
) -> Stored {
    let started = Instant::now();
    let total: usize = units.iter().map(|u| u.readings.len()).sum();
    metrics::batch_size(total);
    // Dedupe within the batch: the first copy is written, later copies share its outcome.
    let mut seen = HashSet::with_capacity(total);
    let unique: Vec<&Reading> = units
        .iter()
        .flat_map(|u| u.readings.iter())
        .filter(|r| seen.insert(r.message_id))
        .collect();
    let mut outcome = HashMap::with_capacity(unique.len());
    let mut backoff = Backoff::between(config.retry_initial, config.retry_max);
    // Split on data errors until the refused readings are isolated.
    let mut todo: Vec<Range<usize>> = Vec::with_capacity(8);
    todo.push(0..unique.len());
    while let Some(range) = todo.pop() {
        let part = &unique[range.clone()];
        match store_with_retry(config, pg, health, &mut backoff, part).await {
            Ok(duplicates) => {
                for r in part {
                    let o = if duplicates.contains(&r.message_id) {
                        Outcome::Duplicate
                    } else {
                        Outcome::New
                    };
                    outcome.insert(r.message_id, o);
                }
            }
            Err(e) if part.len() == 1 => {
                tracing::warn!(message_id = %part[0].message_id, device_id = %part[0].device_id,
                    error = %e.short(), "Postgres refused a reading; dead-lettering it as unstorable.");
                outcome.insert(part[0].message_id, Outcome::Unstorable(e.short()));
            }
            Err(e) => {
                tracing::warn!(rows = part.len(), error = %e.short(), "Postgres refused a batch; splitting it.");
                let mid = range.start + part.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
        }
    }
    metrics::flush_duration("postgres", started.elapsed());
    Stored { units, outcome }
}

/// Stores `part`, retrying outages forever; returns the ids that were already
/// stored, or the data error that refuses `part`.
async fn store_with_retry(
    config: &SinkConfig,
    pg: &deadpool_postgres::Pool,
    health: &Health,
    backoff: &mut Backoff,
    part: &[&Reading],
) -> Result<HashSet<Uuid>, FlushError> {
    loop {
        match store_once(config, pg, part).await {
            Ok(dups) => {
                health.ok(Stage::Postgres);
                backoff.reset();
                return Ok(dups);
            }
            Err(e) if e.is_data() => {
                health.ok(Stage::Postgres);
                return Err(e);
            }
            Err(e) => {
                metrics::flush_retry("postgres");
                let delay = backoff.next_delay();
                tracing::warn!(rows = part.len(), error = %e.short(), retry_in = ?delay,
                    "Postgres write failed; retrying the batch.");
                health.failed(Stage::Postgres, e.short());
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn store_once(
    config: &SinkConfig,
    pg: &deadpool_postgres::Pool,
    part: &[&Reading],
) -> Result<HashSet<Uuid>, FlushError> {
    let mut client = tokio::time::timeout(config.pg_timeout, pg.get())
        .await
        .map_err(|_| FlushError::PgTimeout(config.pg_timeout))??;
    let encoded = copy::encode(part.iter().copied());
    let attempt = async {
        match copy_fast(&mut client, encoded.clone()).await {
            Ok(()) => Ok(HashSet::new()),
            Err(e) if e.is_unique_violation() => {
                metrics::staging_fallback();
                copy_staged(&mut client, encoded, part).await
            }
            Err(e) => Err(e),
        }
    };
    let result = match tokio::time::timeout(config.pg_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(FlushError::PgTimeout(config.pg_timeout)),
    };
    if let Err(e) = &result {
        if !e.is_data() {
            // The connection may be mid-COPY or broken: never give it back to the pool.
            drop(deadpool_postgres::Object::take(client));
        }
    }
    result
}

async fn send_copy(
    sink: tokio_postgres::CopyInSink<Bytes>,
    mut data: BytesMut,
) -> Result<u64, tokio_postgres::Error> {
    futures::pin_mut!(sink);
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(COPY_CHUNK)).freeze();
        sink.feed(chunk).await?;
    }
    sink.as_mut().finish().await
}

/// The fast path: COPY straight into `telemetry_raw`.
async fn copy_fast(
    client: &mut deadpool_postgres::Object,
    data: BytesMut,
) -> Result<(), FlushError> {
    let stmt = client
        .prepare_cached(&format!(
            "COPY telemetry_raw ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let tx = client.transaction().await?;
    let sink = tx.copy_in(&stmt).await?;
    send_copy(sink, data).await?;
    tx.commit().await?;
    Ok(())
}

/// The idempotent path: COPY into a temp table, then insert what is new.
async fn copy_staged(
    client: &mut deadpool_postgres::Object,
    data: BytesMut,
    part: &[&Reading],
) -> Result<HashSet<Uuid>, FlushError> {
    let tx = client.transaction().await?;
    tx.batch_execute(STAGING_CREATE).await?;
    // Not cached: the table is new in every transaction.
    let sink = tx
        .copy_in(&format!(
            "COPY argus_raw_staging ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    send_copy(sink, data).await?;
    let inserted = tx
        .query(
            &format!(
                "INSERT INTO telemetry_raw ({COLUMNS}) SELECT {COLUMNS} FROM argus_raw_staging \
                 ON CONFLICT (id) DO NOTHING RETURNING id"
            ),
            &[],
        )
        .await?;
    tx.commit().await?;
    let inserted: HashSet<Uuid> = inserted.iter().map(|row| row.get(0)).collect();
    Ok(part
        .iter()
        .map(|r| r.message_id)
        .filter(|id| !inserted.contains(id))
        .collect())
}

/// One message to publish, encoded once and reused across retries.
struct Outgoing {
    subject: async_nats::Subject,
    id: String,
    body: Bytes,
}

async fn publish_batch(
    config: &SinkConfig,
    js: &jetstream::Context,
    dlq: &DlqPublisher,
    health: &Health,
    stored: Stored,
) {
    let started = Instant::now();
    let Stored { units, outcome } = stored;
    let mut seen = HashSet::with_capacity(outcome.len());
    let mut outgoing = Vec::with_capacity(outcome.len());
    let mut letters = Vec::new();
    for r in units.iter().flat_map(|u| u.readings.iter()) {
        if !seen.insert(r.message_id) {
            continue;
        }
        match outcome.get(&r.message_id) {
            Some(Outcome::Unstorable(why)) => {
                let mut letter = DeadLetter::new(
                    Reject::new(DlqReason::Unstorable, why.clone()).with_device(r.device_id),
                    r.mqtt_topic.clone(),
                    r.client_id.clone(),
                    r.received_at,
                    r.payload.clone(),
                );
                letter.message_id = Some(r.message_id);
                letters.push(letter);
            }
            Some(Outcome::New | Outcome::Duplicate) | None => outgoing.push(Outgoing {
                subject: envelope::subject(r.device_id).into(),
                id: r.message_id.to_string(),
                body: Bytes::from(envelope::encode(r)),
            }),
        }
    }

    let mut backoff = Backoff::between(config.retry_initial, config.retry_max);
    let mut pending: Vec<&Outgoing> = outgoing.iter().collect();
    let mut dup_acks = 0usize;
    while !pending.is_empty() {
        match publish_attempt(config, js, &pending).await {
            Ok(dups) => {
                dup_acks += dups;
                pending.clear();
                health.ok(Stage::JetStream);
            }
            Err((failed, dups, e)) => {
                dup_acks += dups;
                metrics::flush_retry("jetstream");
                let delay = backoff.next_delay();
                tracing::warn!(failed = failed.len(), error = %e, retry_in = ?delay,
                    "JetStream publish failed; retrying.");
                health.failed(Stage::JetStream, e.to_string());
                pending = failed;
                tokio::time::sleep(delay).await;
            }
        }
    }
    for letter in letters {
        backoff.reset();
        while let Err(e) = dlq.publish(letter.clone()).await {
            metrics::flush_retry("dlq");
            health.failed(Stage::JetStream, e.to_string());
            tokio::time::sleep(backoff.next_delay()).await;
        }
        health.ok(Stage::JetStream);
    }
    metrics::flush_duration("jetstream", started.elapsed());
    metrics::published(outgoing.len());
    metrics::publish_duplicates(dup_acks);

    // Resolve, per unit.
    let now = chrono::Utc::now();
    let mut first_copy = HashSet::with_capacity(outcome.len());
    let (mut persisted, mut duplicates) = (0usize, 0usize);
    for unit in units {
        let mut d = Delivered {
            readings: unit.readings.len(),
            ..Delivered::default()
        };
        for r in &unit.readings {
            let first = first_copy.insert(r.message_id);
            match outcome.get(&r.message_id) {
                Some(Outcome::Unstorable(_)) => d.dead_lettered.push(r.message_id),
                Some(Outcome::Duplicate) => d.duplicates += 1,
                Some(Outcome::New) | None if !first => d.duplicates += 1,
                Some(Outcome::New) | None => {}
            }
            if !matches!(outcome.get(&r.message_id), Some(Outcome::Unstorable(_))) && first {
                persisted += 1;
            }
            if let Ok(lag) = (now - r.received_at).to_std() {
                metrics::durable_lag(lag);
            }
        }
        duplicates += d.duplicates;
        metrics::sink_queued(-(d.readings as f64));
        // The receiver may be gone (caller dropped the ticket); the data is durable either way.
        let _ = unit.done.send(d);
        // `unit._permit` drops here, freeing queue capacity.
    }
    metrics::persisted(persisted);
    metrics::duplicates_skipped(duplicates);
}

type AttemptError<'a> = (Vec<&'a Outgoing>, usize, FlushError);

/// Publishes all, then awaits all acks together. `Ok(duplicate acks)`, or the
/// messages to retry.
async fn publish_attempt<'a>(
    config: &SinkConfig,
    js: &jetstream::Context,
    pending: &[&'a Outgoing],
) -> Result<usize, AttemptError<'a>> {
    let attempt = async {
        let mut acks = Vec::with_capacity(pending.len());
        let mut failed = Vec::new();
        let mut last_error = None;
        for &m in pending {
            let msg = jetstream::message::PublishMessage::build()
                .payload(m.body.clone())
                .message_id(&m.id);
            match js.send_publish(m.subject.clone(), msg).await {
                Ok(ack) => acks.push((m, ack)),
                Err(e) => {
                    failed.push(m);
                    last_error = Some(e);
                }
            }
        }
        let results = futures::future::join_all(
            acks.into_iter()
                .map(|(m, ack)| async move { (m, ack.await) }),
        )
        .await;
        let mut dups = 0;
        for (m, r) in results {
            match r {
                Ok(ack) => dups += usize::from(ack.duplicate),
                Err(e) => {
                    failed.push(m);
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            None => Ok(dups),
            Some(e) => Err((failed, dups, FlushError::Publish(e))),
        }
    };
    match tokio::time::timeout(config.publish_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err((
            pending.to_vec(),
            0,
            FlushError::PublishTimeout(config.publish_timeout),
        )),
    }
}
