//! The sink's publish stage: every stored id to `telemetry.raw.v1.<deviceId>` with
//! `Nats-Msg-Id` (a duplicate with the stored row's context), refused readings, id
//! conflicts and envelopes JetStream can never take to the DLQ, then each unit's
//! [`Delivered`].

use std::collections::{HashMap, HashSet};

use async_nats::jetstream;
use bytes::Bytes;
use tokio::time::Instant;
use uuid::Uuid;

use super::store::{FlushError, Outcome, Stored, StoredContext};
use super::unit::{Delivered, Health, IdConflict, SinkConfig, Stage, Unit};
use crate::backoff::Backoff;
use crate::dlq::{DeadLetter, DlqPublisher, DlqReason};
use crate::reading::{Reading, Reject};
use crate::{envelope, metrics};

/// One message to publish, encoded once and reused across retries.
struct Outgoing<'a> {
    reading: &'a Reading,
    subject: async_nats::Subject,
    id: String,
    body: Bytes,
}

impl<'a> Outgoing<'a> {
    /// `body` is the envelope to publish for `reading`'s id.
    fn new(reading: &'a Reading, body: Vec<u8>) -> Self {
        Outgoing {
            reading,
            subject: envelope::subject(reading.device_id).into(),
            id: reading.message_id.to_string(),
            body: Bytes::from(body),
        }
    }
}

/// What becomes of one reading of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    New,
    Duplicate,
    Conflict,
    Unstorable,
}

/// A dead letter for `r` with its message id.
fn letter(r: &Reading, reason: DlqReason, why: String) -> DeadLetter {
    let mut letter = DeadLetter::new(
        Reject::new(reason, why).with_device(r.device_id),
        r.mqtt_topic.clone(),
        r.client_id.clone(),
        r.received_at,
        r.payload.clone(),
    );
    letter.message_id = Some(r.message_id);
    letter.properties = r
        .properties
        .as_deref()
        .and_then(|p| serde_json::from_slice(p).ok());
    letter
}

/// Whether two payloads hold equal JSON (key order and whitespace aside), for a
/// second copy in one batch whose bytes differ from the first's. Rare, so parsed here.
fn same_json(a: &[u8], b: &[u8]) -> bool {
    match (
        serde_json::from_slice::<serde_json::Value>(a),
        serde_json::from_slice::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `r` as the stored row has it: a duplicate's envelope carries the stored row's
/// delivery context, not the redelivery's.
fn as_stored(r: &Reading, context: &StoredContext) -> Reading {
    let mut stored = r.clone();
    stored.received_at = context.received_at;
    stored.source = context.source.unwrap_or(r.source);
    stored.mqtt_topic.clone_from(&context.mqtt_topic);
    stored.client_id.clone_from(&context.client_id);
    stored.properties = context.properties.clone().map(Bytes::from);
    stored
}

/// The publish stage's plan for a batch: each reading's verdict (per unit), the
/// envelopes to publish (one per stored id) and the dead letters to write.
struct Plan<'a> {
    verdicts: Vec<Vec<Verdict>>,
    conflicts: Vec<Vec<IdConflict>>,
    outgoing: Vec<Outgoing<'a>>,
    letters: Vec<DeadLetter>,
}

fn plan<'a>(
    units: &'a [Unit],
    outcome: &HashMap<Uuid, Outcome>,
    digests: &HashMap<Uuid, [u8; 32]>,
) -> Plan<'a> {
    let mut first_copy: HashMap<Uuid, &Reading> = HashMap::with_capacity(outcome.len());
    let mut published = HashSet::with_capacity(outcome.len());
    let mut plan = Plan {
        verdicts: Vec::with_capacity(units.len()),
        conflicts: Vec::with_capacity(units.len()),
        outgoing: Vec::with_capacity(outcome.len()),
        letters: Vec::new(),
    };
    for unit in units {
        let mut verdicts = Vec::with_capacity(unit.readings.len());
        let mut conflicts = Vec::new();
        for r in &unit.readings {
            let first = match first_copy.entry(r.message_id) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(r);
                    true
                }
                std::collections::hash_map::Entry::Occupied(_) => false,
            };
            let verdict = match outcome.get(&r.message_id) {
                Some(Outcome::Unstorable(why)) => {
                    if first {
                        plan.letters
                            .push(letter(r, DlqReason::Unstorable, why.clone()));
                    }
                    Verdict::Unstorable
                }
                Some(Outcome::Row(row)) => {
                    let own = match digests.get(&r.message_id) {
                        Some(d) if first => *d,
                        _ => r.content_sha256(),
                    };
                    let same = row.digest == Some(own)
                        || (!first
                            && row.digest == digests.get(&r.message_id).copied()
                            && same_json(&first_copy[&r.message_id].payload, &r.payload));
                    if same {
                        if published.insert(r.message_id) {
                            let body = match &row.existing {
                                Some(context) => envelope::encode(&as_stored(r, context)),
                                None => envelope::encode(r),
                            };
                            plan.outgoing.push(Outgoing::new(r, body));
                        }
                        if first && row.existing.is_none() {
                            Verdict::New
                        } else {
                            Verdict::Duplicate
                        }
                    } else {
                        let conflict = IdConflict {
                            id: r.message_id,
                            stored_sha256: row
                                .digest
                                .map_or_else(|| "unrecorded".to_owned(), hex::encode),
                            sha256: hex::encode(own),
                        };
                        tracing::warn!(message_id = %r.message_id, device_id = %r.device_id,
                            stored_sha256 = %conflict.stored_sha256, sha256 = %conflict.sha256,
                            "A reading reuses a stored message id with other content; dead-lettering it as id_conflict.");
                        plan.letters.push(letter(
                            r,
                            DlqReason::IdConflict,
                            format!(
                                "message id {} is stored with content sha256 {}; this reading's is {}",
                                r.message_id, conflict.stored_sha256, conflict.sha256
                            ),
                        ));
                        conflicts.push(conflict);
                        Verdict::Conflict
                    }
                }
                // Every unique id has an outcome; publish rather than lose it.
                None => {
                    if published.insert(r.message_id) {
                        plan.outgoing.push(Outgoing::new(r, envelope::encode(r)));
                    }
                    if first {
                        Verdict::New
                    } else {
                        Verdict::Duplicate
                    }
                }
            };
            verdicts.push(verdict);
        }
        plan.verdicts.push(verdicts);
        plan.conflicts.push(conflicts);
    }
    plan
}

pub(super) async fn publish_batch(
    config: &SinkConfig,
    js: &jetstream::Context,
    dlq: &DlqPublisher,
    health: &Health,
    stored: Stored,
) {
    let started = Instant::now();
    let Stored {
        units,
        outcome,
        digests,
    } = stored;
    let Plan {
        verdicts,
        conflicts,
        outgoing,
        mut letters,
    } = plan(&units, &outcome, &digests);

    let mut backoff = Backoff::between(config.retry_initial, config.retry_max);
    let mut pending: Vec<&Outgoing> = outgoing.iter().collect();
    let mut dup_acks = 0usize;
    // Ids JetStream can never take: their rows are stored, their readings dead-lettered.
    let mut unpublishable: HashSet<Uuid> = HashSet::new();
    while !pending.is_empty() {
        let attempt = publish_attempt(config, js, &pending).await;
        dup_acks += attempt.duplicates;
        for (m, why) in attempt.permanent {
            tracing::warn!(message_id = %m.reading.message_id, bytes = m.body.len(), error = %why,
                "JetStream can never take this envelope; its row is stored, dead-lettering it as oversize.");
            unpublishable.insert(m.reading.message_id);
            letters.push(letter(
                m.reading,
                DlqReason::Oversize,
                format!(
                    "stored in telemetry_raw, but its envelope of {} bytes is refused by JetStream: {why}",
                    m.body.len()
                ),
            ));
        }
        match attempt.error {
            None => {
                pending.clear();
                health.ok(Stage::JetStream);
            }
            Some(e @ FlushError::PublishRefused) => {
                // Not transient: nothing passes until the server's permissions change.
                // Nothing is acknowledged either (the rows are stored, the source keeps
                // the messages), so retry at the longest delay, loudly.
                metrics::publish_refused();
                let delay = config.retry_max;
                tracing::error!(failed = attempt.retry.len(), error = %e, retry_in = ?delay,
                    "NATS refused the sink's publish; fix the user's permissions. Nothing is acknowledged meanwhile.");
                health.failed(Stage::JetStream, e.to_string());
                pending = attempt.retry;
                tokio::time::sleep(delay).await;
            }
            Some(e) => {
                metrics::flush_retry("jetstream");
                let delay = backoff.next_delay();
                tracing::warn!(failed = attempt.retry.len(), error = %e, retry_in = ?delay,
                    "JetStream publish failed; retrying.");
                health.failed(Stage::JetStream, e.to_string());
                pending = attempt.retry;
                tokio::time::sleep(delay).await;
            }
        }
    }
    let published = outgoing.len() - unpublishable.len();
    drop(outgoing);
    write_letters(dlq, health, &mut backoff, letters).await;
    metrics::flush_duration("jetstream", started.elapsed());
    metrics::published(published);
    metrics::publish_duplicates(dup_acks);

    // Resolve, per unit.
    let now = chrono::Utc::now();
    let (mut persisted, mut duplicates, mut conflicted) = (0usize, 0usize, 0usize);
    for ((unit, verdicts), conflicts) in units.into_iter().zip(verdicts).zip(conflicts) {
        let mut d = Delivered {
            readings: unit.readings.len(),
            conflicts,
            ..Delivered::default()
        };
        for (r, verdict) in unit.readings.iter().zip(verdicts) {
            match verdict {
                Verdict::New => persisted += 1,
                Verdict::Duplicate => {
                    d.duplicates += 1;
                    d.duplicate_ids.push(r.message_id);
                }
                Verdict::Conflict => conflicted += 1,
                Verdict::Unstorable => d.dead_lettered.push(r.message_id),
            }
            if unpublishable.contains(&r.message_id) && verdict != Verdict::Conflict {
                d.dead_lettered.push(r.message_id);
            }
            if let Ok(lag) = (now - r.received_at).to_std() {
                metrics::durable_lag(lag);
            }
        }
        duplicates += d.duplicates;
        metrics::sink_queued(-(d.readings as f64));
        metrics::sink_queued_bytes(-(unit.bytes as f64));
        // The receiver may be gone (caller dropped the ticket); the data is durable either way.
        let _ = unit.done.send(d);
        // `unit._permit` drops here, freeing queue capacity.
    }
    metrics::persisted(persisted);
    metrics::duplicates_skipped(duplicates);
    metrics::id_conflicts(conflicted);
}

/// Writes the batch's dead letters, retrying what may pass later. A letter that
/// can never be written (even empty it exceeds the server's `max_payload`, which
/// the start-up check rules out) is given up: the publisher logged it and counted
/// it in `argus_dlq_unwritable_total`, and retrying would stall the sink forever.
async fn write_letters(
    dlq: &DlqPublisher,
    health: &Health,
    backoff: &mut Backoff,
    letters: Vec<DeadLetter>,
) {
    for letter in letters {
        backoff.reset();
        loop {
            match dlq.publish(letter.clone()).await {
                Ok(()) => break,
                Err(e) if !e.is_retriable() => break,
                Err(e) => {
                    metrics::flush_retry("dlq");
                    health.failed(Stage::JetStream, e.to_string());
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        health.ok(Stage::JetStream);
    }
}

/// A publish error that no retry can cure, decided from its kind: the envelope is
/// past the server's `max_payload`, or past the stream's `max_msg_size` (JetStream
/// error 10054). Everything else (not connected, no ack in time, no stream yet) may pass.
fn is_permanent(e: &jetstream::context::PublishError) -> bool {
    use jetstream::context::PublishErrorKind;
    use jetstream::ErrorCode;
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|j| j.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM),
        _ => false,
    }
}

/// One publish attempt's result.
struct Attempt<'a, 'b> {
    /// Acks that said "duplicate".
    duplicates: usize,
    /// Messages to send again.
    retry: Vec<&'b Outgoing<'a>>,
    /// Messages no retry can deliver, with the error.
    permanent: Vec<(&'b Outgoing<'a>, String)>,
    /// The last transient error, if any message is to be sent again.
    error: Option<FlushError>,
}

/// Publishes all, then awaits all acks together.
async fn publish_attempt<'a, 'b>(
    config: &SinkConfig,
    js: &jetstream::Context,
    pending: &[&'b Outgoing<'a>],
) -> Attempt<'a, 'b> {
    let mut result = Attempt {
        duplicates: 0,
        retry: Vec::new(),
        permanent: Vec::new(),
        error: None,
    };
    // A refused publish shows only as a server error event and a missing ack.
    let refusals_before = crate::nats::refusals();
    let attempt = async {
        let mut acks = Vec::with_capacity(pending.len());
        let mut failed = Vec::new();
        for &m in pending {
            let msg = jetstream::message::PublishMessage::build()
                .payload(m.body.clone())
                .message_id(&m.id);
            match js.send_publish(m.subject.clone(), msg).await {
                Ok(ack) => acks.push((m, ack)),
                Err(e) => failed.push((m, e)),
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
                Err(e) => failed.push((m, e)),
            }
        }
        (dups, failed)
    };
    match tokio::time::timeout(config.publish_timeout, attempt).await {
        Ok((dups, failed)) => {
            result.duplicates = dups;
            for (m, e) in failed {
                if is_permanent(&e) {
                    result.permanent.push((m, e.to_string()));
                } else {
                    result.retry.push(m);
                    result.error = Some(FlushError::Publish(e));
                }
            }
        }
        Err(_) => {
            result.retry = pending.to_vec();
            result.error = Some(FlushError::PublishTimeout(config.publish_timeout));
        }
    }
    if result.error.is_some() && crate::nats::refusals() > refusals_before {
        result.error = Some(FlushError::PublishRefused);
    }
    result
}
