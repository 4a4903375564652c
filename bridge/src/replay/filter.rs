//! Which dead letters a `list` or `replay` is about: `--reason`, `--device`,
//! `--since`, `--until`.

use argus_pipeline::dlq::{DlqReason, StoredLetter};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use argus_schema::streams::DLQ_SUBJECTS;

/// The letters to read. The reason narrows the stream's subject and `since` its
/// start time on the server; the device and both times are checked per letter
/// against the record (`receivedAt`), which the stream's own timestamp can
/// only follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub reason: Option<DlqReason>,
    pub device: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    /// The subject to consume: `telemetry.dlq.<reason>` or every reason.
    pub fn subject(&self) -> String {
        match self.reason {
            Some(r) => r.subject(),
            None => DLQ_SUBJECTS.to_string(),
        }
    }

    /// True when the letter is one this filter selects.
    pub fn matches(&self, stored: &StoredLetter) -> bool {
        let l = &stored.letter;
        self.reason.is_none_or(|r| r == l.reason)
            && self.device.is_none_or(|d| l.device_id == Some(d))
            && self.since.is_none_or(|t| l.received_at >= t)
            && self.until.is_none_or(|t| l.received_at < t)
    }

    /// The filters as flags, e.g. `--reason unknown_device --device …`; empty for none.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = self.reason {
            parts.push(format!("--reason {r}"));
        }
        if let Some(d) = self.device {
            parts.push(format!("--device {d}"));
        }
        let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        if let Some(t) = &self.since {
            parts.push(format!("--since {}", time(t)));
        }
        if let Some(t) = &self.until {
            parts.push(format!("--until {}", time(t)));
        }
        parts.join(" ")
    }

    /// The durable consumer that keeps a replay's progress: one per set of
    /// filters, so running the same command again resumes it, and a replay
    /// with other filters has its own.
    pub fn durable_name(&self) -> String {
        let digest = argus_pipeline::digest::sha256(self.describe().as_bytes());
        format!("argus-dlq-replay-{}", &hex::encode(digest)[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argus_pipeline::dlq::{DeadLetter, Reject};
    use bytes::Bytes;

    fn stored(reason: DlqReason, device: Option<Uuid>, at: i64) -> StoredLetter {
        let mut letter = DeadLetter::new(
            Reject::new(reason, "x"),
            None,
            None,
            DateTime::from_timestamp(at, 0).unwrap(),
            Bytes::new(),
        );
        letter.device_id = device;
        StoredLetter {
            letter,
            truncated: None,
        }
    }

    #[test]
    fn every_filter_narrows_and_none_takes_all() {
        let d = Uuid::from_u128(1);
        let l = stored(DlqReason::UnknownDevice, Some(d), 1_000);
        assert!(Filter::default().matches(&l));
        let f = |f: Filter| f.matches(&l);
        assert!(f(Filter {
            reason: Some(DlqReason::UnknownDevice),
            ..Default::default()
        }));
        assert!(!f(Filter {
            reason: Some(DlqReason::InvalidJson),
            ..Default::default()
        }));
        assert!(f(Filter {
            device: Some(d),
            ..Default::default()
        }));
        assert!(!f(Filter {
            device: Some(Uuid::from_u128(2)),
            ..Default::default()
        }));
        let t = |s| DateTime::from_timestamp(s, 0);
        assert!(f(Filter {
            since: t(1_000),
            until: t(1_001),
            ..Default::default()
        }));
        assert!(!f(Filter {
            since: t(1_001),
            ..Default::default()
        }));
        assert!(
            !f(Filter {
                until: t(1_000),
                ..Default::default()
            }),
            "until is exclusive"
        );
        // A letter with no device never matches --device.
        assert!(!Filter {
            device: Some(d),
            ..Default::default()
        }
        .matches(&stored(DlqReason::InvalidJson, None, 1_000)));
    }

    #[test]
    fn each_set_of_filters_has_its_own_consumer() {
        let a = Filter::default();
        let b = Filter {
            reason: Some(DlqReason::UnknownDevice),
            ..Default::default()
        };
        assert_eq!(a.durable_name(), Filter::default().durable_name());
        assert_ne!(a.durable_name(), b.durable_name());
        assert_eq!(b.subject(), "telemetry.dlq.unknown_device");
        assert_eq!(a.subject(), "telemetry.dlq.>");
        assert_eq!(b.describe(), "--reason unknown_device");
    }
}
