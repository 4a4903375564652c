//! The answer to a unit the sink has finished with ([`Delivered`]), in this order:
//! - 409 `id_conflict`: a reading's message id is already stored with different content
//!   (a device whose counter restarted, say). That reading is not stored; the sink
//!   dead-letters it as `id_conflict`. `error.details.conflicts` names each one: its
//!   `index`, its `messageId`, the `suppliedId` it came from (its `messageId` field, or
//!   `null`), the stored row's id `storedId` (the same id: that is the conflict) and both
//!   content digests (`storedSha256`, `sha256`). The batch's other readings are stored.
//! - 422 `unstorable`: Postgres refused readings for a data reason; they are in the
//!   dead-letter stream, listed in `error.details.deadLettered`.
//! - 200: every reading is durable. `"duplicate": true` marks a reading that was
//!   already stored with the same content (a retry): single readings carry it at the
//!   top level, a batch per reading in `readings[i].duplicate`.

use argus_pipeline::sink::Delivered;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;
use crate::metrics::{self as m, reject, Rejection};
use crate::readings::{label, Unit};
use crate::request::Shape;

/// The 200 answer: a single reading's, or a batch's (by the request's shape).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Accepted {
    Single(AcceptedReading),
    Batch(AcceptedBatch),
}

/// A single reading, durable in Postgres and acknowledged by JetStream.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedReading {
    /// Always `true`.
    pub success: bool,
    /// `telemetry_raw.id`, the `Nats-Msg-Id`.
    pub message_id: Uuid,
    /// Already stored with the same content (a retry): nothing new was written.
    pub duplicate: bool,
}

/// A batch, every reading durable.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedBatch {
    /// Always `true`.
    pub success: bool,
    /// The readings' ids, in request order.
    pub message_ids: Vec<Uuid>,
    /// Per reading, in request order.
    pub readings: Vec<BatchReading>,
}

/// One reading of [`AcceptedBatch`].
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchReading {
    pub message_id: Uuid,
    pub duplicate: bool,
}

/// The unit's ids and where they came from, as sent to the sink.
#[derive(Debug)]
pub struct Sent {
    pub shape: Shape,
    pub ids: Vec<Uuid>,
    pub supplied: Vec<Option<String>>,
}

impl Sent {
    pub fn of(shape: Shape, unit: &Unit) -> Sent {
        Sent {
            shape,
            ids: unit.readings.iter().map(|r| r.message_id).collect(),
            supplied: unit.supplied.clone(),
        }
    }

    fn index(&self, id: Uuid) -> Option<usize> {
        self.ids.iter().position(|x| *x == id)
    }
}

/// 200 with the ids (and duplicate flags), or the 409 / 422 described above.
pub fn respond(sent: &Sent, delivered: &Delivered) -> Result<Response, ApiError> {
    let total = sent.ids.len();
    if let Some(first) = delivered.conflicts.first() {
        let conflicts: Vec<Value> = delivered
            .conflicts
            .iter()
            .map(|c| {
                let index = sent.index(c.id);
                json!({
                    "index": index,
                    "messageId": c.id,
                    "suppliedId": index.and_then(|i| sent.supplied[i].clone()),
                    "storedId": c.id,
                    "storedSha256": c.stored_sha256,
                    "sha256": c.sha256,
                })
            })
            .collect();
        let name = sent
            .index(first.id)
            .map_or_else(|| "a reading".to_string(), |i| label(sent.shape, i));
        let message = format!(
            "{name}: message id {} is already stored (row {}) with different content \
             (stored sha256 {}, this reading's {}); it was not stored and is in the \
             dead-letter stream as id_conflict. {} of {total} readings conflict; the others \
             are stored. Give a new reading a new messageId.",
            first.id,
            first.id,
            first.stored_sha256,
            first.sha256,
            delivered.conflicts.len(),
        );
        tracing::warn!(
            conflicts = conflicts.len(),
            "Readings reused a stored message id with other content."
        );
        return Err(reject(
            Rejection::IdConflict,
            ApiError::new(StatusCode::CONFLICT, "id_conflict", message)
                .with_details(json!({"conflicts": conflicts, "messageIds": sent.ids})),
        ));
    }
    if !delivered.dead_lettered.is_empty() {
        let refused: Vec<Value> = delivered
            .dead_lettered
            .iter()
            .map(|id| json!({"index": sent.index(*id), "messageId": id}))
            .collect();
        tracing::warn!(
            refused = refused.len(),
            "Postgres refused readings; they are in the dead-letter stream."
        );
        return Err(reject(
            Rejection::InvalidBody,
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unstorable",
                format!(
                    "{} of {total} readings could not be stored and were dead-lettered.",
                    refused.len()
                ),
            )
            .with_details(json!({"deadLettered": refused, "messageIds": sent.ids})),
        ));
    }
    let duplicate: Vec<bool> = sent
        .ids
        .iter()
        .map(|id| delivered.duplicate_ids.contains(id))
        .collect();
    let duplicates = duplicate.iter().filter(|d| **d).count();
    metrics::counter!(m::READINGS_ACCEPTED_TOTAL).increment(total as u64);
    metrics::counter!(m::READINGS_DUPLICATE_TOTAL).increment(duplicates as u64);
    let body = match (sent.shape, sent.ids.first()) {
        (Shape::Single, Some(&message_id)) => Accepted::Single(AcceptedReading {
            success: true,
            message_id,
            duplicate: duplicate.first().copied().unwrap_or(false),
        }),
        // A batch (a unit is never empty; if it were, it would answer as an empty batch).
        _ => Accepted::Batch(AcceptedBatch {
            success: true,
            message_ids: sent.ids.clone(),
            readings: sent
                .ids
                .iter()
                .zip(&duplicate)
                .map(|(&message_id, &duplicate)| BatchReading {
                    message_id,
                    duplicate,
                })
                .collect(),
        }),
    };
    Ok(Json(body).into_response())
}
