//! Reading a run back from every store: JetStream (`TELEMETRY_RAW_V1`, `TELEMETRY_DLQ`)
//! through the test's own ephemeral ordered consumers, and `telemetry_raw` in Postgres.
//!
//! The consumers are created *before* the first publish with `DeliverPolicy::New`, so they
//! see every message of the run and nothing older. Messages of other runs (a shared stack)
//! are skipped by their `runId`.

use argus_pipeline::backoff::Backoff;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures::StreamExt;
use uuid::Uuid;

use crate::accounting::Counts;
use crate::latency::Latencies;
use crate::payload::{find_in_record, now_ns};

/// Raw stream subject prefix (`telemetry.raw.v1.<deviceId>`) and the dead-letter
/// subjects (`telemetry.dlq.<reason>`), from the topology in `argus-schema`.
pub use argus_schema::streams::{DLQ_SUBJECTS, RAW_SUBJECTS, RAW_SUBJECT_PREFIX};

/// Retries of a consumer or of the Postgres count: 100 ms doubling up to 2 s.
const RETRY_INITIAL: std::time::Duration = std::time::Duration::from_millis(100);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// Up to this many devices get one consumer each, filtered on the device's own subject;
/// above it one consumer reads `telemetry.raw.v1.>` and skips other runs' messages
/// (nats-server 2.9 has no multi-subject filters).
pub const MAX_PER_DEVICE_CONSUMERS: usize = 16;

/// What the consumers have seen so far.
#[derive(Default)]
pub struct Seen {
    pub counts: Counts,
    pub latencies: Option<Latencies>,
    pub last_seen_ns: u64,
    /// Messages of the run (first copies) whose record carries `properties`.
    pub with_properties: u64,
}

pub type SharedSeen = Arc<Mutex<Seen>>;

/// Connects as `auth` (the loadtest user; `baseline` runs as admin) to the
/// comma-separated `urls`.
pub async fn connect_nats(
    urls: &str,
    auth: &argus_schema::nats::NatsAuth,
) -> anyhow::Result<async_nats::Client> {
    let urls: Vec<String> = urls
        .split(',')
        .map(|u| u.trim().replace('\\', ""))
        .collect();
    Ok(argus_schema::nats::connect(
        auth,
        &urls,
        "argus-loadtest",
        argus_schema::nats::Unreachable::Fail,
    )
    .await?)
}

/// Starts consumers on `stream` for `filters`; every message whose payload carries this
/// run's marker is counted in `seen` (and its latency recorded when `latency_start_ns` is set).
pub async fn spawn_collector(
    js: &jetstream::Context,
    stream: &str,
    filters: Vec<String>,
    run_id: &str,
    latency_start_ns: Option<u64>,
) -> anyhow::Result<SharedSeen> {
    let seen: SharedSeen = Arc::new(Mutex::new(Seen {
        latencies: latency_start_ns.map(Latencies::new),
        ..Seen::default()
    }));
    let s = js.get_stream(stream).await.with_context(|| {
        format!("stream {stream} not found (run `argus-schema streams apply` first)")
    })?;
    // Where `DeliverPolicy::New` starts: used when a consumer has to be made again.
    let start_after = s.cached_info().state.last_sequence;
    for filter in filters {
        let config = OrderedConfig {
            filter_subject: filter.clone(),
            deliver_policy: DeliverPolicy::New,
            description: Some(format!("argus-loadtest run {run_id}")),
            ..OrderedConfig::default()
        };
        let consumer = s
            .create_consumer(config.clone())
            .await
            .with_context(|| format!("creating a consumer on {stream} for {filter}"))?;
        let messages = consumer
            .messages()
            .await
            .with_context(|| format!("consuming {stream}"))?;
        // Weak: the task ends once the run's `Seen` is dropped.
        let seen = Arc::downgrade(&seen);
        let run_id = run_id.to_string();
        let stream_name = stream.to_string();
        let s = s.clone();
        tokio::spawn(async move {
            // The ordered consumer recreates itself on most faults; should its stream ever
            // end, a new one starts after the last stream sequence seen, and nothing already
            // counted is counted again.
            let mut last = start_after;
            let mut messages = Some(messages);
            let mut backoff = Backoff::between(RETRY_INITIAL, RETRY_MAX);
            loop {
                let mut msgs = match messages.take() {
                    Some(m) => m,
                    None => {
                        if seen.strong_count() == 0 {
                            return;
                        }
                        let again = OrderedConfig {
                            deliver_policy: DeliverPolicy::ByStartSequence {
                                start_sequence: last + 1,
                            },
                            ..config.clone()
                        };
                        let made = match s.create_consumer(again).await {
                            Ok(c) => c.messages().await.map_err(anyhow::Error::from),
                            Err(e) => Err(anyhow::Error::from(e)),
                        };
                        match made {
                            Ok(m) => m,
                            Err(e) => {
                                tracing::warn!(stream = %stream_name, error = %e, "Cannot make the consumer again; retrying.");
                                tokio::time::sleep(backoff.next_delay()).await;
                                continue;
                            }
                        }
                    }
                };
                while let Some(next) = msgs.next().await {
                    let msg = match next {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(stream = %stream_name, error = %e, "Consumer error; the ordered consumer recreates itself.");
                            continue;
                        }
                    };
                    backoff.reset();
                    if let Ok(info) = msg.info() {
                        if info.stream_sequence <= last {
                            continue;
                        }
                        last = info.stream_sequence;
                    }
                    let at = now_ns();
                    let Some(found) = find_in_record(&msg.payload, &run_id) else {
                        continue;
                    };
                    let marker = found.marker;
                    let Some(seen) = seen.upgrade() else {
                        return;
                    };
                    // A poisoned lock only means another collector task panicked; keep counting.
                    let mut g = seen.lock().unwrap_or_else(|e| e.into_inner());
                    let n = g.counts.entry(marker.seq).or_insert(0);
                    *n += 1;
                    let first = *n == 1;
                    if first {
                        if found.has_properties {
                            g.with_properties += 1;
                        }
                        if let Some(l) = g.latencies.as_mut() {
                            l.record(marker.sent_at_ns, at);
                        }
                        g.last_seen_ns = g.last_seen_ns.max(at);
                    }
                }
                tracing::warn!(stream = %stream_name, "Consumer stream ended; making it again.");
            }
        });
    }
    Ok(seen)
}

/// The consumer filters for the raw stream, per [`MAX_PER_DEVICE_CONSUMERS`].
pub fn raw_filters(devices: &[Uuid]) -> Vec<String> {
    if devices.len() <= MAX_PER_DEVICE_CONSUMERS {
        devices
            .iter()
            .map(|d| format!("{RAW_SUBJECT_PREFIX}.{d}"))
            .collect()
    } else {
        vec![RAW_SUBJECTS.to_string()]
    }
}

/// Rows of this run in `telemetry_raw`: occurrences per `seq` (MQTT payloads carry it at the
/// top level, HTTP readings under `metadata`).
pub async fn postgres_counts(
    pg: &tokio_postgres::Client,
    devices: &[Uuid],
    run_id: &str,
) -> anyhow::Result<Counts> {
    let rows = pg
        .query(
            "SELECT coalesce(payload->>'seq', payload->'metadata'->>'seq')::int8 AS seq, count(*)::int8 \
             FROM telemetry_raw \
             WHERE device_id = ANY($1) \
               AND coalesce(payload->>'runId', payload->'metadata'->>'runId') = $2 \
             GROUP BY 1",
            &[&devices, &run_id],
        )
        .await
        .context("counting the run's rows in telemetry_raw")?;
    let mut out = Counts::new();
    for r in rows {
        let seq: Option<i64> = r.get(0);
        let n: i64 = r.get(1);
        if let Some(seq) = seq {
            out.insert(seq as u64, n as u32);
        }
    }
    Ok(out)
}

/// Rows of the run that carry MQTT 5 properties: (`mqtt_properties` set, all
/// three chunk columns set).
pub async fn postgres_properties(
    pg: &tokio_postgres::Client,
    devices: &[Uuid],
    run_id: &str,
) -> anyhow::Result<(u64, u64)> {
    let row = pg
        .query_one(
            "SELECT count(*) FILTER (WHERE mqtt_properties IS NOT NULL)::int8, \
                    count(*) FILTER (WHERE correlation_id IS NOT NULL \
                      AND sequence_number IS NOT NULL AND total_chunks IS NOT NULL)::int8 \
             FROM telemetry_raw \
             WHERE device_id = ANY($1) AND payload->>'runId' = $2",
            &[&devices, &run_id],
        )
        .await
        .context("counting the run's rows with properties")?;
    let (props, chunks): (i64, i64) = (row.get(0), row.get(1));
    Ok((props as u64, chunks as u64))
}

/// Rows per second written for the run: row count over the span of `created_at` (the commit
/// times of the bridge's batches). `None` when fewer than two distinct commit times exist.
pub async fn postgres_write_rate(
    pg: &tokio_postgres::Client,
    devices: &[Uuid],
    run_id: &str,
) -> Option<f64> {
    let row = pg
        .query_one(
            "SELECT count(*)::int8, extract(epoch FROM max(created_at) - min(created_at))::float8 \
             FROM telemetry_raw \
             WHERE device_id = ANY($1) \
               AND coalesce(payload->>'runId', payload->'metadata'->>'runId') = $2",
            &[&devices, &run_id],
        )
        .await
        .map_err(|e| tracing::warn!(error = %e, "Cannot compute the Postgres write rate."))
        .ok()?;
    let n: i64 = row.get(0);
    let span: Option<f64> = row.get(1);
    match span {
        Some(s) if s > 0.0 && n > 1 => Some(n as f64 / s),
        _ => None,
    }
}

/// The load tester's own Postgres session for its accounting. The system under test may
/// restart Postgres or make it refuse connections (the chaos suite's `pg-restart`,
/// `pg-refuse`): the session is then made again, with a backoff, until the caller's deadline.
pub struct PgConn {
    url: String,
    client: tokio_postgres::Client,
    /// Sessions made again after the first.
    pub reconnects: u64,
}

impl std::ops::Deref for PgConn {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

/// Errors worth another try: the session is gone, or the server is restarting, shutting
/// down, refusing or out of connections (SQLSTATE classes 08 and 57P, 53300).
pub fn retryable(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(|pe| {
            pe.is_closed()
                || pe.code().is_none_or(|c| {
                    let c = c.code();
                    c.starts_with("08") || c.starts_with("57P") || c == "53300"
                })
        })
}

impl PgConn {
    pub async fn connect(url: &str) -> anyhow::Result<PgConn> {
        Ok(PgConn {
            url: url.to_string(),
            client: connect_pg(url).await?,
            reconnects: 0,
        })
    }

    /// Makes the session again if it has ended; errors are for the caller to retry.
    async fn ensure_open(&mut self) -> anyhow::Result<()> {
        if self.client.is_closed() {
            self.client = connect_pg(&self.url).await?;
            self.reconnects += 1;
            tracing::info!("Reconnected to Postgres for the accounting.");
        }
        Ok(())
    }

    /// [`postgres_counts`], retried (reconnecting, 100 ms doubling to 2 s) until `deadline`
    /// while Postgres is away; a non-connection error fails at once.
    pub async fn counts_until(
        &mut self,
        devices: &[Uuid],
        run_id: &str,
        deadline: std::time::Instant,
    ) -> anyhow::Result<Counts> {
        let mut backoff = Backoff::between(RETRY_INITIAL, RETRY_MAX);
        loop {
            let r = match self.ensure_open().await {
                Ok(()) => postgres_counts(&self.client, devices, run_id).await,
                Err(e) => Err(e),
            };
            let e = match r {
                Ok(c) => return Ok(c),
                Err(e) => e,
            };
            let now = std::time::Instant::now();
            if !retryable(&e) || now >= deadline {
                return Err(e.context(
                    "the load tester could not count the run in Postgres before the --settle deadline",
                ));
            }
            tracing::warn!(error = %format!("{e:#}"), "Postgres unavailable for the accounting; retrying.");
            tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
        }
    }

    /// [`postgres_write_rate`] after making the session again if needed (one try).
    pub async fn write_rate(&mut self, devices: &[Uuid], run_id: &str) -> Option<f64> {
        if let Err(e) = self.ensure_open().await {
            tracing::warn!(error = %format!("{e:#}"), "Cannot compute the Postgres write rate.");
            return None;
        }
        postgres_write_rate(&self.client, devices, run_id).await
    }
}

pub async fn connect_pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    // TLS as the URL's sslmode says (sslrootcert= for verify-full), as every Argus process.
    let pg = argus_schema::tls::PgConnectConfig::parse(url, None).context("--database-url")?;
    let (client, conn) = pg
        .config
        .connect(pg.tls)
        .await
        .with_context(|| "connecting to Postgres (--database-url)".to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "Postgres connection ended.");
        }
    });
    Ok(client)
}

/// Snapshot of a shared `Seen`'s counts.
pub fn counts_of(seen: &SharedSeen) -> Counts {
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .counts
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_devices_get_their_own_subjects_many_share_the_wildcard() {
        let few: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let f = raw_filters(&few);
        assert_eq!(f.len(), 3);
        assert_eq!(f[0], format!("telemetry.raw.v1.{}", few[0]));
        let many: Vec<Uuid> = (0..MAX_PER_DEVICE_CONSUMERS + 1)
            .map(|_| Uuid::new_v4())
            .collect();
        assert_eq!(raw_filters(&many), vec!["telemetry.raw.v1.>".to_string()]);
    }
}
