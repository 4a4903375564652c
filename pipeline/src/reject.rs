//! Why a message is refused: [`DlqReason`] (the bounded set of reasons, which is a
//! subject token and a metric label) and [`Reject`] (a reason with its detail).
//!
//! Both live here, below every module that uses them ([`crate::reading`] produces
//! rejects, [`crate::dlq`] records them, [`crate::metrics`] counts them), so none of
//! those imports another to name a reason.

use uuid::Uuid;

use argus_schema::streams::DLQ_SUBJECT_PREFIX;

/// Why a message was dead-lettered. A bounded set: it is the last subject token
/// and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqReason {
    /// The topic is not `devices/<uuid>/telemetry`.
    BadTopic,
    /// The payload is not valid UTF-8.
    NotUtf8,
    /// The payload is UTF-8 but not valid JSON.
    InvalidJson,
    /// The payload is valid JSON but not an object.
    NotObject,
    /// The payload is larger than the configured limit.
    Oversize,
    /// The device id from the topic is not registered.
    UnknownDevice,
    /// The device exists but its status is not `active`.
    DisabledDevice,
    /// A known field (`timestamp`, `correlationId`, `sequenceNumber`,
    /// `totalChunks`, `messageId`) has the wrong type or range.
    InvalidField,
    /// Postgres rejected the reading itself (e.g. a `\u0000` in a JSON string,
    /// which `jsonb` cannot hold). Found by the sink when it splits a failing
    /// batch down to the single reading.
    Unstorable,
    /// The message id is already stored with other content (a device whose counter
    /// restarted, say): the stored row stays, this reading is not stored. Found by
    /// the sink from `telemetry_raw.content_sha256`.
    IdConflict,
    /// MQTT 5 publish properties past their bounds (count of user properties,
    /// bytes) or holding what `jsonb` cannot store (U+0000).
    InvalidProperties,
    /// A chunk field (`correlationId`, `sequenceNumber`, `totalChunks`) sent as
    /// an MQTT 5 user property disagrees with the payload's field, or is sent
    /// twice with two values.
    ChunkConflict,
}

impl DlqReason {
    /// Every reason, e.g. to pre-register metric series.
    pub const ALL: [DlqReason; 12] = [
        DlqReason::BadTopic,
        DlqReason::NotUtf8,
        DlqReason::InvalidJson,
        DlqReason::NotObject,
        DlqReason::Oversize,
        DlqReason::UnknownDevice,
        DlqReason::DisabledDevice,
        DlqReason::InvalidField,
        DlqReason::Unstorable,
        DlqReason::IdConflict,
        DlqReason::InvalidProperties,
        DlqReason::ChunkConflict,
    ];

    /// The snake_case name: subject token, metric label, `reason` field.
    pub const fn as_str(self) -> &'static str {
        match self {
            DlqReason::BadTopic => "bad_topic",
            DlqReason::NotUtf8 => "not_utf8",
            DlqReason::InvalidJson => "invalid_json",
            DlqReason::NotObject => "not_object",
            DlqReason::Oversize => "oversize",
            DlqReason::UnknownDevice => "unknown_device",
            DlqReason::DisabledDevice => "disabled_device",
            DlqReason::InvalidField => "invalid_field",
            DlqReason::Unstorable => "unstorable",
            DlqReason::IdConflict => "id_conflict",
            DlqReason::InvalidProperties => "invalid_properties",
            DlqReason::ChunkConflict => "chunk_conflict",
        }
    }

    /// The inverse of [`DlqReason::as_str`].
    pub fn parse(name: &str) -> Option<DlqReason> {
        DlqReason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The subject this reason's letters are published to: `telemetry.dlq.<reason>`.
    pub fn subject(self) -> String {
        format!("{DLQ_SUBJECT_PREFIX}.{}", self.as_str())
    }
}

impl std::fmt::Display for DlqReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message is not accepted. Turn it into a `DeadLetter` with `DeadLetter::new`
/// (`crate::dlq`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Reject {
    pub reason: DlqReason,
    /// Human-readable, without payload content.
    pub detail: String,
    /// The device, when the topic named one.
    pub device_id: Option<Uuid>,
}

impl Reject {
    pub fn new(reason: DlqReason, detail: impl Into<String>) -> Self {
        Reject {
            reason,
            detail: detail.into(),
            device_id: None,
        }
    }

    /// Attaches the device id (known once the topic parsed).
    pub fn with_device(mut self, device_id: Uuid) -> Self {
        self.device_id = Some(device_id);
        self
    }

    /// The registry does not know the device.
    pub fn unknown_device(device_id: Uuid) -> Self {
        Reject::new(DlqReason::UnknownDevice, "device is not registered").with_device(device_id)
    }

    /// The device exists but may not send (status is not `active`).
    pub fn disabled_device(device_id: Uuid, status: &str) -> Self {
        // The status comes from our own table (a bounded set), not from input.
        Reject::new(
            DlqReason::DisabledDevice,
            format!("device status is {status}, not active"),
        )
        .with_device(device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_names() {
        assert_eq!(DlqReason::Unstorable.subject(), "telemetry.dlq.unstorable");
        let names: std::collections::HashSet<_> =
            DlqReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DlqReason::ALL.len());
        for r in DlqReason::ALL {
            assert_eq!(DlqReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(DlqReason::parse("Unknown_Device"), None);
    }
}
