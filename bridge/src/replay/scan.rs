//! Reading `TELEMETRY_DLQ` in order, up to a bound fixed when the run began.
//!
//! A replay reads through a **durable** consumer (explicit acks), so an
//! interrupted run resumes where it stopped: a letter is acknowledged to the
//! consumer only once its outcome is durable. The consumer's description
//! records the run's bound, `until_seq=<N>`: the stream's last sequence when the
//! run began. Letters past it (among them the ones this run writes back with a
//! new reason) are not this run's, so no run can chase its own output. A run
//! that completes deletes its consumer; the next run starts from the beginning
//! again (replaying is idempotent, `crate::replay::outcome`).
//!
//! `list` and `--dry-run` change nothing: they read through an ephemeral
//! consumer that acknowledges nothing.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use futures::StreamExt as _;

use super::filter::Filter;
use argus_schema::streams::DLQ_STREAM;

/// One letter as the consumer delivered it.
pub struct Delivery {
    /// Its sequence in `TELEMETRY_DLQ`.
    pub seq: u64,
    /// False when the consumer delivers it again (an interrupted run had it).
    pub first: bool,
    pub record: Bytes,
    message: jetstream::Message,
}

/// Where a scan stands when it is created.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    /// The last stream sequence this run reads.
    pub until_seq: u64,
    /// True when a durable consumer from an interrupted run was found.
    pub resumed: bool,
    /// Letters of the subject still to deliver (filters other than the reason not applied).
    pub pending: u64,
}

/// The letters of one run, in stream order.
pub struct Scan {
    stream: Stream,
    consumer: jetstream::consumer::PullConsumer,
    durable: Option<String>,
    pub start: Start,
    /// A letter past `until_seq` was delivered: everything before it has been.
    past_end: bool,
}

impl Scan {
    /// A scan that changes nothing (`list`, `--dry-run`).
    pub async fn ephemeral(js: &jetstream::Context, filter: &Filter) -> anyhow::Result<Scan> {
        let mut stream = dlq_stream(js).await?;
        let until_seq = last_sequence(&mut stream).await?;
        let config = pull::Config {
            filter_subject: filter.subject(),
            deliver_policy: deliver_policy(filter),
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .context("creating a consumer on TELEMETRY_DLQ")?;
        Scan::new(stream, consumer, None, until_seq, false).await
    }

    /// The durable scan of a replay: resumes the consumer of an interrupted run
    /// with the same filters, or starts one bounded at the stream's last sequence.
    pub async fn durable(
        js: &jetstream::Context,
        filter: &Filter,
        ack_wait: Duration,
    ) -> anyhow::Result<Scan> {
        let mut stream = dlq_stream(js).await?;
        let name = filter.durable_name();
        match stream.consumer_info(&name).await {
            Ok(info) => {
                let until_seq = info
                    .config
                    .description
                    .as_deref()
                    .and_then(parse_until)
                    .with_context(|| format!("consumer {name} on TELEMETRY_DLQ has no until_seq in its description: not a replay's; delete it"))?;
                let consumer: jetstream::consumer::PullConsumer = stream
                    .get_consumer(&name)
                    .await
                    .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
                return Scan::new(stream, consumer, Some(name), until_seq, true).await;
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("consumer {name} on TELEMETRY_DLQ")),
        }
        let until_seq = last_sequence(&mut stream).await?;
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!(
                "argus-dlq replay {}; until_seq={until_seq}",
                filter.describe()
            )),
            filter_subject: filter.subject(),
            deliver_policy: deliver_policy(filter),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .with_context(|| format!("creating consumer {name} on TELEMETRY_DLQ"))?;
        Scan::new(stream, consumer, Some(name), until_seq, false).await
    }

    async fn new(
        stream: Stream,
        mut consumer: jetstream::consumer::PullConsumer,
        durable: Option<String>,
        until_seq: u64,
        resumed: bool,
    ) -> anyhow::Result<Scan> {
        let info = consumer.info().await.context("consumer info")?;
        let pending = info.num_pending + info.num_ack_pending as u64;
        Ok(Scan {
            stream,
            consumer,
            durable,
            start: Start {
                until_seq,
                resumed,
                pending,
            },
            past_end: false,
        })
    }

    /// The next letters of this run, at most `max`; `None` once every letter up
    /// to the bound is delivered and (durable) acknowledged. Waits for the
    /// letters an interrupted run left unacknowledged: the server delivers them
    /// again once their ack wait has passed.
    pub async fn next_batch(&mut self, max: usize) -> anyhow::Result<Option<Vec<Delivery>>> {
        loop {
            if !self.past_end {
                let mut batch = Vec::new();
                let mut messages = self
                    .consumer
                    .fetch()
                    .max_messages(max)
                    .messages()
                    .await
                    .context("fetching dead letters")?;
                while let Some(message) = messages.next().await {
                    let message =
                        message.map_err(|e| anyhow::anyhow!("fetching dead letters: {e}"))?;
                    let info = message
                        .info()
                        .map_err(|e| anyhow::anyhow!("dead letter without JetStream info: {e}"))?;
                    let (seq, first) = (info.stream_sequence, info.delivered <= 1);
                    if seq > self.start.until_seq {
                        // Not this run's; acknowledged so that it is not delivered again.
                        self.past_end = true;
                        if self.durable.is_some() {
                            message
                                .ack()
                                .await
                                .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                        }
                        continue;
                    }
                    batch.push(Delivery {
                        seq,
                        first,
                        record: message.payload.clone(),
                        message,
                    });
                }
                if !batch.is_empty() {
                    return Ok(Some(batch));
                }
            }
            let info = self.consumer.info().await.context("consumer info")?;
            let delivered_all = self.past_end || info.num_pending == 0;
            if delivered_all && info.num_ack_pending == 0 {
                return Ok(None);
            }
            if delivered_all {
                // An interrupted run's letters, not yet due again.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// Records that this letter's outcome is durable (durable scans; a no-op otherwise).
    pub async fn done(&self, delivery: Delivery) -> anyhow::Result<()> {
        if self.durable.is_some() {
            delivery
                .message
                .double_ack()
                .await
                .map_err(|e| anyhow::anyhow!("acknowledging dead letter {}: {e}", delivery.seq))?;
        }
        Ok(())
    }

    /// Removes letter `seq` from the stream (another letter holds its message now).
    pub async fn remove(&self, seq: u64) -> anyhow::Result<()> {
        self.stream
            .delete_message(seq)
            .await
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("removing dead letter {seq}: {e}"))
    }

    /// The run is complete: the next run starts from the beginning.
    pub async fn finish(self) -> anyhow::Result<()> {
        if let Some(name) = &self.durable {
            self.stream
                .delete_consumer(name)
                .await
                .with_context(|| format!("deleting consumer {name}"))?;
        }
        Ok(())
    }
}

async fn dlq_stream(js: &jetstream::Context) -> anyhow::Result<Stream> {
    js.get_stream(DLQ_STREAM)
        .await
        .context("stream TELEMETRY_DLQ (apply the topology: argus-schema streams apply)")
}

/// The stream's last sequence now: the bound of a run that begins now.
async fn last_sequence(stream: &mut Stream) -> anyhow::Result<u64> {
    let info = stream.info().await.context("TELEMETRY_DLQ info")?;
    Ok(info.state.last_sequence)
}

fn deliver_policy(filter: &Filter) -> DeliverPolicy {
    let start = filter
        .since
        .and_then(|t| t.timestamp_nanos_opt())
        .and_then(|n| time::OffsetDateTime::from_unix_timestamp_nanos(n.into()).ok());
    match start {
        Some(start_time) => DeliverPolicy::ByStartTime { start_time },
        None => DeliverPolicy::All,
    }
}

fn parse_until(description: &str) -> Option<u64> {
    description.rsplit_once("until_seq=")?.1.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_reads_back_from_the_description() {
        assert_eq!(
            parse_until("argus-dlq replay --reason unknown_device; until_seq=42"),
            Some(42)
        );
        assert_eq!(parse_until("someone else's consumer"), None);
    }
}
