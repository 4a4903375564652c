//! One batch of dead letters back through the admit stage.
//!
//! Each letter ends in exactly one [`Outcome`]:
//! - **stored**: it passes the checks and the registry now, and the sink stored
//!   and published it under the id it would have had live (the same topic,
//!   payload and `receivedAt`; an HTTP letter keeps its `messageId`);
//! - **already stored**: its id is in `telemetry_raw` with the same content
//!   (an earlier replay stored it). Nothing is written: not the row, and not the
//!   envelope either, which a publish outside JetStream's duplicate window
//!   would add a second time. A letter the consumer delivers *again* (an
//!   interrupted run had it, and may have stored it without publishing it) goes
//!   through the sink instead, which publishes it from the stored row;
//! - **still rejected**: refused again. With the reason it had, it stays as it
//!   is. With another reason a letter with that reason is written, and once it
//!   is acknowledged the old one is removed, so each message has one letter and
//!   repeated replays add none. The sink's own refusals (`unstorable`,
//!   `id_conflict`) it writes itself, and the old letter is removed likewise;
//! - **truncated**: the record kept only a prefix of the payload, which must
//!   never be stored as if whole;
//! - **unreadable**: not a record this version reads;
//! - **skipped**: outside `--device`/`--since`/`--until`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use argus_pipeline::backoff::Backoff;
use argus_pipeline::dlq::{DeadLetter, DlqReason, Reject, StoredLetter};
use argus_pipeline::properties::Properties;
use argus_pipeline::reading::{Checked, Reading, Source};
use uuid::Uuid;

use super::filter::Filter;
use super::scan::Delivery;
use crate::admit::{self, Admit};
use crate::source::Message;

/// What became of one letter (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored and published (with `--dry-run`: would be).
    Stored,
    AlreadyStored,
    /// Refused again with `reason`; `was` is the letter's own reason.
    /// `rewritten`: a new letter holds it now (written by the replay with the
    /// new reason, or by the sink), so the old one is removed from the stream.
    Rejected {
        reason: DlqReason,
        was: DlqReason,
        rewritten: bool,
    },
    Truncated,
    Unreadable(String),
    Skipped,
}

/// Sends letters back through the admit stage (`crate::admit`) and the sink.
pub struct Replayer {
    pub admit: Admit,
    pub pool: deadpool_postgres::Pool,
    /// Decide every outcome, write nothing.
    pub dry_run: bool,
}

/// Attempts at writing a letter with its new reason before the run stops
/// (unacknowledged, so the next run takes it again).
const DLQ_ATTEMPTS: usize = 5;

impl Replayer {
    /// The outcome of each delivery, in order, once each is durable.
    pub async fn batch(
        &self,
        deliveries: &[Delivery],
        filter: &Filter,
    ) -> anyhow::Result<Vec<Outcome>> {
        let mut outcomes = vec![Outcome::Skipped; deliveries.len()];
        // (index, reading, the letter, redelivered)
        let mut readings = Vec::new();
        for (i, d) in deliveries.iter().enumerate() {
            let stored = match StoredLetter::decode(&d.record) {
                Ok(s) => s,
                Err(e) => {
                    outcomes[i] = Outcome::Unreadable(e.to_string());
                    continue;
                }
            };
            if !filter.matches(&stored) {
                continue;
            }
            if stored.truncated.is_some() {
                outcomes[i] = Outcome::Truncated;
                continue;
            }
            match self.reading(&stored.letter).await {
                Ok(Ok(reading)) => readings.push((i, reading, stored.letter, !d.first)),
                Ok(Err(reject)) => {
                    outcomes[i] = self.rejected(reject, stored.letter).await?;
                }
                Err(why) => outcomes[i] = Outcome::Unreadable(why),
            }
        }

        let stored = self.stored_digests(&readings).await?;
        let mut tickets = Vec::new();
        for (i, reading, letter, again) in readings {
            let was = letter.reason;
            match stored.get(&reading.message_id) {
                Some(digest) if !again && digest[..] == reading.content_sha256() => {
                    outcomes[i] = Outcome::AlreadyStored;
                }
                Some(digest) if !again => {
                    let reject = Reject::new(
                        DlqReason::IdConflict,
                        format!(
                            "id {} is stored with content sha256 {}; this reading's is {}",
                            reading.message_id,
                            hex::encode(digest),
                            hex::encode(reading.content_sha256())
                        ),
                    )
                    .with_device(reading.device_id);
                    let mut letter = letter;
                    letter.message_id = Some(reading.message_id);
                    outcomes[i] = self.rejected(reject, letter).await?;
                }
                _ if self.dry_run => outcomes[i] = Outcome::Stored,
                _ => {
                    let ticket = self
                        .admit
                        .sink
                        .enqueue(vec![reading])
                        .await
                        .context("the sink is closed")?;
                    tickets.push((i, was, ticket));
                }
            }
        }
        for (i, was, ticket) in tickets {
            let delivered = ticket.await.context("the sink stopped")?;
            // The sink has dead-lettered these itself.
            outcomes[i] = if !delivered.conflicts.is_empty() {
                Outcome::Rejected {
                    reason: DlqReason::IdConflict,
                    was,
                    rewritten: true,
                }
            } else if !delivered.dead_lettered.is_empty() {
                Outcome::Rejected {
                    reason: DlqReason::Unstorable,
                    was,
                    rewritten: true,
                }
            } else if delivered.duplicates > 0 {
                Outcome::AlreadyStored
            } else {
                Outcome::Stored
            };
        }
        Ok(outcomes)
    }

    /// The letter as a reading through today's checks and registry, or why it
    /// is refused; `Err` when the letter cannot be replayed at all.
    async fn reading(&self, letter: &DeadLetter) -> Result<Result<Reading, Reject>, String> {
        let properties = match &letter.properties {
            Some(v) => Some(Box::new(
                Properties::from_value(v)
                    .ok_or("properties are not the shape the bridge writes")?,
            )),
            None => None,
        };
        if let Some(topic) = &letter.topic {
            let msg = Message {
                topic: topic.clone(),
                payload: letter.payload.clone(),
                client_id: Arc::from(letter.client_id.as_deref().unwrap_or("argus-dlq")),
                received_at: letter.received_at,
                dup: false,
                properties,
            };
            return Ok(self.admit.check(msg).await.map_err(|refused| refused.0));
        }
        // No topic: an HTTP reading, dead-lettered by the sink (`unstorable`,
        // `id_conflict`, `oversize`), which records its device and message id.
        let device_id = letter.device_id.ok_or("an HTTP letter without deviceId")?;
        let message_id = letter
            .message_id
            .ok_or("an HTTP letter without messageId")?;
        let mut checked =
            match Checked::for_device(device_id, &letter.payload, None, &self.admit.limits) {
                Ok(c) => c,
                Err(reject) => return Ok(Err(reject)),
            };
        checked.message_id = message_id;
        let device = self.admit.device(device_id).await;
        Ok(admit::tenant(device_id, device.as_ref()).map(|tenant_id| {
            Reading::from_checked(
                checked,
                tenant_id,
                letter.payload.clone(),
                letter.received_at,
                Source::Http,
                None,
                letter.client_id.clone(),
            )
        }))
    }

    /// Refused again: unchanged, or written with its new reason.
    async fn rejected(&self, reject: Reject, letter: DeadLetter) -> anyhow::Result<Outcome> {
        let was = letter.reason;
        let reason = reject.reason;
        let rewritten = reason != was;
        if rewritten && !self.dry_run {
            let mut again = letter;
            again.reason = reason;
            again.detail = reject.detail;
            again.device_id = again.device_id.or(reject.device_id);
            let mut backoff = Backoff::new(Duration::from_secs(2));
            let mut attempt = 1;
            loop {
                match self.admit.dlq.publish(again.clone()).await {
                    Ok(()) => break,
                    Err(e) if e.is_retriable() && attempt < DLQ_ATTEMPTS => {
                        attempt += 1;
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => return Err(e).context("writing a letter with its new reason"),
                }
            }
        }
        Ok(Outcome::Rejected {
            reason,
            was,
            rewritten,
        })
    }

    /// `content_sha256` of those readings already in `telemetry_raw`.
    async fn stored_digests(
        &self,
        readings: &[(usize, Reading, DeadLetter, bool)],
    ) -> anyhow::Result<HashMap<Uuid, Vec<u8>>> {
        if readings.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<Uuid> = readings.iter().map(|(_, r, _, _)| r.message_id).collect();
        let client = self.pool.get().await.context("Postgres")?;
        let rows = client
            .query(
                "SELECT id, content_sha256 FROM telemetry_raw WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .context("looking up stored readings")?;
        Ok(rows
            .iter()
            .map(|row| {
                (
                    row.get::<_, Uuid>(0),
                    row.get::<_, Option<Vec<u8>>>(1).unwrap_or_default(),
                )
            })
            .collect())
    }
}
