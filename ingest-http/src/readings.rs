//! One request's validated readings → the sink unit: message ids, the per-reading size
//! checks, and the refusal of a batch that names one message id twice. Nothing is
//! stored when any of these fails.
//!
//! Message id of each reading: the pipeline's rules, shared with the MQTT bridge
//! ([`Checked::for_device`], which calls [`argus_pipeline::message_id::derive`]):
//! - with an `Idempotency-Key` `k`: a single reading's supplied id is `k` itself;
//!   reading `i` of a batch uses `k`, a NUL character, then `i` (`k\0i`). A supplied id
//!   is visible ASCII, so it never holds NUL: no single reading's key (`k/0`, say) can
//!   name a batch's reading;
//! - else the reading's `messageId` field;
//! - else the hash of the device's canonical topic and the reading's text as sent (the
//!   stored payload). A retry of the same bytes therefore gets the same id and is
//!   stored once.
//!
//! Sizes: a reading's text as sent (what is stored) is at most `--max-reading-bytes`,
//! and its envelope must fit the NATS server's `max_payload`
//! ([`PublishLimits::check_reading`]); either failing answers 413 naming the reading,
//! before anything reaches Postgres.

use std::collections::HashMap;

use argus_pipeline::limits::PublishLimits;
use argus_pipeline::reading::{self, Checked, Reading, Source};
use argus_pipeline::reject::DlqReason;
use axum::body::Bytes;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::auth::Caller;
use crate::config::Limits;
use crate::error::ApiError;
use crate::metrics::{reject, Rejection};
use crate::request::{IngestReading, Shape};

/// The unit for the sink, and what each reading's id came from (for the answers).
#[derive(Debug)]
pub struct Unit {
    pub readings: Vec<Reading>,
    /// The device's `messageId` field of each reading, when its id came from it.
    pub supplied: Vec<Option<String>>,
}

/// How a reading is named in an answer: `reading` alone, `[i]` in a batch.
pub fn label(shape: Shape, i: usize) -> String {
    match shape {
        Shape::Single => "reading".to_string(),
        Shape::Batch => format!("[{i}]"),
    }
}

/// The field prefix of reading `i` in an error message (`""` alone, `[i].` in a batch).
fn at(shape: Shape, i: usize) -> String {
    match shape {
        Shape::Single => String::new(),
        Shape::Batch => format!("[{i}]."),
    }
}

fn too_large(message: String) -> ApiError {
    reject(
        Rejection::ReadingTooLarge,
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "reading_too_large", message),
    )
}

/// What the request carried besides its readings.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub caller: &'a Caller,
    pub shape: Shape,
    pub idempotency_key: Option<&'a str>,
    pub received_at: DateTime<Utc>,
}

/// Builds the unit, or the answer refusing the whole request.
pub fn build(
    cx: Context<'_>,
    parsed: Vec<IngestReading>,
    limits: &Limits,
    publish: &PublishLimits,
) -> Result<Unit, ApiError> {
    let payload_limits = reading::Limits {
        max_payload_bytes: limits.max_reading_bytes,
    };
    let shape = cx.shape;
    let mut unit = Unit {
        readings: Vec::with_capacity(parsed.len()),
        supplied: Vec::with_capacity(parsed.len()),
    };
    let mut seen: HashMap<Uuid, usize> = HashMap::with_capacity(parsed.len());
    for (i, r) in parsed.into_iter().enumerate() {
        // The stored payload and the id's hash input: the reading as sent.
        let payload = r.text.into_boxed_bytes().into_vec();
        let keyed = cx.idempotency_key.map(|key| match shape {
            Shape::Single => key.to_owned(),
            Shape::Batch => format!("{key}\0{i}"),
        });
        let checked = Checked::for_device(
            cx.caller.device_id,
            &payload,
            keyed.as_deref(),
            &payload_limits,
        )
        .map_err(|e| match e.reason {
            DlqReason::Oversize => too_large(format!(
                "{}: the reading is {} bytes as sent, over the limit of {} \
                 (--max-reading-bytes).",
                label(shape, i),
                payload.len(),
                limits.max_reading_bytes
            )),
            _ => reject(
                Rejection::InvalidBody,
                ApiError::bad_request("invalid_body", format!("{}{}", at(shape, i), e.detail)),
            ),
        })?;
        let reading = Reading::from_checked(
            checked,
            cx.caller.tenant_id,
            Bytes::from(payload),
            cx.received_at,
            Source::Http,
            None,
            None,
        );
        if let Err(e) = publish.check_reading(&reading) {
            return Err(too_large(format!("{}: {e}.", label(shape, i))));
        }
        let supplied = if keyed.is_none() { r.message_id } else { None };
        if let Some(&first) = seen.get(&reading.message_id) {
            return Err(duplicate(i, first, supplied.as_deref()));
        }
        seen.insert(reading.message_id, i);
        unit.readings.push(reading);
        unit.supplied.push(supplied);
    }
    Ok(unit)
}

/// Reading `i` of a batch has the id of reading `first` (only a batch can).
fn duplicate(i: usize, first: usize, supplied: Option<&str>) -> ApiError {
    let message = match supplied {
        Some(id) => format!(
            "[{i}].messageId: {id:?} is also the messageId of [{first}]; \
             each reading of a batch needs its own."
        ),
        None => format!(
            "[{i}]: the same content as [{first}], so the same message id; give each \
             reading a distinct messageId or timestamp."
        ),
    };
    reject(
        Rejection::DuplicateMessageId,
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "duplicate_message_id",
            message,
        )
        .with_details(serde_json::json!({ "index": i, "sameAs": first })),
    )
}
