//! The sink's store stage: a batch into `telemetry_raw` in one transaction (binary
//! `COPY`, or the staging path after a unique violation), and what Postgres made of
//! each id ([`Outcome`]) for the publish stage.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use async_nats::jetstream;

use bytes::{Bytes, BytesMut};
use futures::SinkExt as _;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::copy::{self, COLUMNS};
use super::unit::{Health, SinkConfig, Stage, Unit};
use crate::backoff::Backoff;
use crate::metrics;
use crate::reading::{Reading, Source};

/// Chunk size of `CopyData` messages.
const COPY_CHUNK: usize = 64 * 1024;

const STAGING_CREATE: &str = "CREATE TEMP TABLE argus_raw_staging (\
     id uuid, tenant_id uuid, device_id uuid, payload jsonb, payload_size_bytes int4, \
     correlation_id text, sequence_number int4, total_chunks int4, device_timestamp timestamptz, \
     received_at timestamptz, ingestion_source text, mqtt_topic text, client_id text, \
     content_sha256 bytea, mqtt_properties jsonb) ON COMMIT DROP";

/// For the staged rows that were not inserted: what the stored row holds, and
/// whether its payload equals the staged one as `jsonb` (key order and whitespace
/// aside), which makes a re-encoded copy a duplicate rather than a conflict.
const STAGING_EXISTING: &str = "SELECT s.id, t.content_sha256, t.payload = s.payload AS same, \
     t.received_at, t.ingestion_source, t.mqtt_topic, t.client_id, t.mqtt_properties::text \
     FROM argus_raw_staging s JOIN telemetry_raw t ON t.id = s.id \
     WHERE NOT (s.id = ANY($1::uuid[]))";

/// A failed flush attempt.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no postgres connection within {0:?}")]
    PoolTimeout(Duration),
    #[error("postgres attempt timed out after {0:?}")]
    PgTimeout(Duration),
    #[error("jetstream publish: {0}")]
    Publish(#[from] jetstream::context::PublishError),
    #[error("jetstream attempt timed out after {0:?}")]
    PublishTimeout(Duration),
    /// The attempt failed while the NATS server refused this user a publish (its
    /// permissions, `compose/nats/authorization.conf`): no retry passes until the
    /// permissions change.
    #[error("NATS refused the publish: this user's permissions do not allow it (the server's error is logged)")]
    PublishRefused,
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

    /// The attempt ran out of time: our own `pg_timeout`, or the server's
    /// `statement_timeout` (SQLSTATE 57014). A batch is split on it, so that a
    /// batch too large to write in time is written in parts instead of being
    /// retried identically; a single reading is retried.
    pub fn is_too_slow(&self) -> bool {
        match self {
            FlushError::PgTimeout(_) => true,
            FlushError::Postgres(e) => e.code() == Some(&SqlState::QUERY_CANCELED),
            _ => false,
        }
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

/// What Postgres made of each unique id of a batch.
#[derive(Debug)]
pub(super) enum Outcome {
    /// A row holds this id.
    Row(Row),
    /// Postgres refused the reading (a data error): in the DLQ as `unstorable`.
    Unstorable(String),
}

/// The row under an id, after the store stage.
#[derive(Debug)]
pub(super) struct Row {
    /// The content digest under the id: the one written now; the batch's first
    /// copy's, when the stored row's payload equals it as `jsonb`; else the stored
    /// row's. `None`: a row stored before migration 0005 with other content.
    pub(super) digest: Option<[u8; 32]>,
    /// The stored row's delivery context, when the row was there already: a
    /// duplicate is republished with it, so that both stores keep one content
    /// under one id.
    pub(super) existing: Option<StoredContext>,
}

/// A stored row's delivery context (the envelope's fields that are not the payload).
#[derive(Debug, Clone)]
pub(super) struct StoredContext {
    pub(super) received_at: chrono::DateTime<chrono::Utc>,
    pub(super) source: Option<Source>,
    pub(super) mqtt_topic: Option<String>,
    pub(super) client_id: Option<String>,
    /// `mqtt_properties` as Postgres prints it (the same JSON, normalised).
    pub(super) properties: Option<String>,
}

/// What a stored row holds, for an id that was there already.
#[derive(Debug)]
pub(super) struct Existing {
    pub(super) digest: Option<[u8; 32]>,
    /// A row stored before migration 0005 (no digest) with an equal `jsonb` payload.
    same: bool,
    context: StoredContext,
}

/// A batch after the store stage.
pub(super) struct Stored {
    pub(super) units: Vec<Unit>,
    pub(super) outcome: HashMap<Uuid, Outcome>,
    /// The digest of each id's first copy in the batch.
    pub(super) digests: HashMap<Uuid, [u8; 32]>,
}

pub(super) async fn store_batch(
    config: &SinkConfig,
    pg: &deadpool_postgres::Pool,
    health: &Health,
    units: Vec<Unit>,
) -> Stored {
    let started = Instant::now();
    let total: usize = units.iter().map(|u| u.readings.len()).sum();
    metrics::batch_size(total);
    // Dedupe within the batch: the first copy is written; later copies are judged
    // against it in the publish stage.
    let mut digests = HashMap::with_capacity(total);
    let mut unique: Vec<&Reading> = Vec::with_capacity(total);
    for r in units.iter().flat_map(|u| u.readings.iter()) {
        if let std::collections::hash_map::Entry::Vacant(e) = digests.entry(r.message_id) {
            e.insert(r.content_sha256());
            unique.push(r);
        }
    }
    let mut outcome = HashMap::with_capacity(unique.len());
    let mut backoff = Backoff::between(config.retry_initial, config.retry_max);
    // Split on data errors until the refused readings are isolated, and on
    // timeouts until the parts are written in time.
    let mut todo: Vec<Range<usize>> = Vec::with_capacity(8);
    todo.push(0..unique.len());
    while let Some(range) = todo.pop() {
        let part: Vec<(&Reading, &[u8; 32])> = unique[range.clone()]
            .iter()
            .map(|r| (*r, &digests[&r.message_id]))
            .collect();
        match store_with_retry(config, pg, health, &mut backoff, &part).await {
            Ok(mut existing) => {
                for (r, digest) in &part {
                    let row = match existing.remove(&r.message_id) {
                        None => Row {
                            digest: Some(**digest),
                            existing: None,
                        },
                        Some(e) => Row {
                            // Equal JSON is the same content, whatever the bytes.
                            digest: if e.same { Some(**digest) } else { e.digest },
                            existing: Some(e.context),
                        },
                    };
                    outcome.insert(r.message_id, Outcome::Row(row));
                }
            }
            Err(e) if part.len() == 1 => {
                let r = part[0].0;
                tracing::warn!(message_id = %r.message_id, device_id = %r.device_id,
                    error = %e.short(), "Postgres refused a reading; dead-lettering it as unstorable.");
                outcome.insert(r.message_id, Outcome::Unstorable(e.short()));
            }
            Err(e) => {
                if e.is_too_slow() {
                    metrics::batch_split("timeout");
                    tracing::warn!(rows = part.len(), error = %e.short(),
                        "Postgres did not write a batch in time; splitting it.");
                } else {
                    metrics::batch_split("data");
                    tracing::warn!(rows = part.len(), error = %e.short(), "Postgres refused a batch; splitting it.");
                }
                let mid = range.start + part.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
        }
    }
    metrics::flush_duration("postgres", started.elapsed());
    Stored {
        units,
        outcome,
        digests,
    }
}

/// Stores `part`, retrying outages; returns what the rows hold for the ids that
/// were already stored, or the error to split `part` on: a data error, or a
/// timeout of more than one reading.
async fn store_with_retry(
    config: &SinkConfig,
    pg: &deadpool_postgres::Pool,
    health: &Health,
    backoff: &mut Backoff,
    part: &[(&Reading, &[u8; 32])],
) -> Result<HashMap<Uuid, Existing>, FlushError> {
    loop {
        match store_once(config, pg, part).await {
            Ok(existing) => {
                health.ok(Stage::Postgres);
                backoff.reset();
                return Ok(existing);
            }
            Err(e) if e.is_data() => {
                health.ok(Stage::Postgres);
                return Err(e);
            }
            Err(e) if e.is_too_slow() && part.len() > 1 => return Err(e),
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
    part: &[(&Reading, &[u8; 32])],
) -> Result<HashMap<Uuid, Existing>, FlushError> {
    let mut client = tokio::time::timeout(config.pg_timeout, pg.get())
        .await
        .map_err(|_| FlushError::PoolTimeout(config.pg_timeout))??;
    let encoded = copy::encode(part.iter().copied());
    let attempt = async {
        match copy_fast(&mut client, encoded.clone()).await {
            Ok(()) => Ok(HashMap::new()),
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

/// The idempotent path: COPY into a temp table, insert what is new, and read what
/// the stored rows hold for the rest.
async fn copy_staged(
    client: &mut deadpool_postgres::Object,
    data: BytesMut,
    part: &[(&Reading, &[u8; 32])],
) -> Result<HashMap<Uuid, Existing>, FlushError> {
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
    let inserted: Vec<Uuid> = inserted.iter().map(|row| row.get(0)).collect();
    let rows = tx.query(STAGING_EXISTING, &[&inserted]).await?;
    tx.commit().await?;
    let mut existing = HashMap::with_capacity(part.len() - inserted.len());
    for row in rows {
        let digest: Option<Vec<u8>> = row.get(1);
        let source: Option<String> = row.get(4);
        existing.insert(
            row.get::<_, Uuid>(0),
            Existing {
                digest: digest.and_then(|d| <[u8; 32]>::try_from(d).ok()),
                same: row.get(2),
                context: StoredContext {
                    received_at: row.get(3),
                    source: source.as_deref().and_then(Source::parse),
                    mqtt_topic: row.get(5),
                    client_id: row.get(6),
                    properties: row.get(7),
                },
            },
        );
    }
    Ok(existing)
}
