//! Loss, duplicate and dead-letter accounting: pure arithmetic over what was sent, what
//! the broker acknowledged and what each store holds.
//!
//! Definitions (the report and the exit code use exactly these):
//! - **acked**: the broker (or the HTTP sidecar) acknowledged the message.
//! - **persisted** / **published**: distinct messages of the run found in `telemetry_raw` /
//!   in `TELEMETRY_RAW_V1`.
//! - **dead-lettered**: distinct messages found in `TELEMETRY_DLQ`. A dead-lettered message
//!   is accounted for; it is never counted as lost.
//! - **lost**: acked, not dead-lettered, and missing from Postgres or from JetStream (or both).
//! - **duplicated**: messages with more than one row, more than one stream message, or more
//!   than one dead letter.
//! - **unacked**: sent but never acknowledged (the sender knows it failed; not lost).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// Occurrences per sequence number in one store.
pub type Counts = HashMap<u64, u32>;

/// What was observed during one run, keyed by the message's sequence number.
#[derive(Debug, Default, Clone)]
pub struct Observations {
    pub sent: u64,
    pub acked: HashSet<u64>,
    pub postgres: Counts,
    pub jetstream: Counts,
    pub dead_letters: Counts,
}

/// The accounting the report prints and the exit code is derived from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Accounting {
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    pub persisted: u64,
    pub published: u64,
    pub dead_lettered: u64,
    pub lost: u64,
    pub missing_postgres: u64,
    pub missing_jetstream: u64,
    pub duplicated: u64,
    /// Rows beyond the first, summed over duplicated messages.
    pub duplicate_rows: u64,
    /// Stream messages beyond the first, summed over duplicated messages.
    pub duplicate_stream_messages: u64,
}

impl Observations {
    pub fn account(&self) -> Accounting {
        let acked = self.acked.len() as u64;
        let mut a = Accounting {
            sent: self.sent,
            acked,
            unacked: self.sent.saturating_sub(acked),
            persisted: self.postgres.len() as u64,
            published: self.jetstream.len() as u64,
            dead_lettered: self.dead_letters.len() as u64,
            ..Accounting::default()
        };
        for seq in &self.acked {
            if self.dead_letters.contains_key(seq) {
                continue;
            }
            let in_pg = self.postgres.contains_key(seq);
            let in_js = self.jetstream.contains_key(seq);
            if !in_pg {
                a.missing_postgres += 1;
            }
            if !in_js {
                a.missing_jetstream += 1;
            }
            if !(in_pg && in_js) {
                a.lost += 1;
            }
        }
        let mut dup: HashSet<u64> = HashSet::new();
        for (seq, n) in &self.postgres {
            if *n > 1 {
                dup.insert(*seq);
                a.duplicate_rows += u64::from(n - 1);
            }
        }
        for (seq, n) in &self.jetstream {
            if *n > 1 {
                dup.insert(*seq);
                a.duplicate_stream_messages += u64::from(n - 1);
            }
        }
        for (seq, n) in &self.dead_letters {
            if *n > 1 {
                dup.insert(*seq);
            }
        }
        a.duplicated = dup.len() as u64;
        a
    }

    /// True when every acked message is accounted for (stored in both, or dead-lettered).
    /// Used by the settle loop to stop waiting early.
    pub fn complete(&self) -> bool {
        self.acked.iter().all(|s| {
            self.dead_letters.contains_key(s)
                || (self.postgres.contains_key(s) && self.jetstream.contains_key(s))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(u64, u32)]) -> Counts {
        pairs.iter().copied().collect()
    }

    #[test]
    fn everything_delivered_once_is_clean() {
        let o = Observations {
            sent: 3,
            acked: [0, 1, 2].into(),
            postgres: counts(&[(0, 1), (1, 1), (2, 1)]),
            jetstream: counts(&[(0, 1), (1, 1), (2, 1)]),
            dead_letters: Counts::new(),
        };
        let a = o.account();
        assert_eq!((a.lost, a.duplicated, a.unacked), (0, 0, 0));
        assert_eq!((a.persisted, a.published), (3, 3));
        assert!(o.complete());
    }

    #[test]
    fn missing_from_either_store_is_lost_once() {
        let o = Observations {
            sent: 4,
            acked: [0, 1, 2, 3].into(),
            postgres: counts(&[(0, 1), (1, 1)]), // 2 and 3 missing
            jetstream: counts(&[(0, 1), (2, 1)]), // 1 and 3 missing
            dead_letters: Counts::new(),
        };
        let a = o.account();
        assert_eq!(a.lost, 3); // 1, 2, 3: each counted once
        assert_eq!(a.missing_postgres, 2);
        assert_eq!(a.missing_jetstream, 2);
        assert!(!o.complete());
    }

    #[test]
    fn dead_lettered_is_not_lost() {
        let o = Observations {
            sent: 3,
            acked: [0, 1, 2].into(),
            postgres: counts(&[(0, 1)]),
            jetstream: counts(&[(0, 1)]),
            dead_letters: counts(&[(1, 1), (2, 1)]),
        };
        let a = o.account();
        assert_eq!((a.lost, a.dead_lettered), (0, 2));
        assert!(o.complete());
    }

    #[test]
    fn unacked_messages_are_not_lost_and_duplicates_are_counted_per_message() {
        let o = Observations {
            sent: 5,
            acked: [0, 1, 2].into(), // 3 and 4 never acked
            postgres: counts(&[(0, 2), (1, 1), (2, 1), (3, 1)]),
            jetstream: counts(&[(0, 3), (1, 2), (2, 1)]),
            dead_letters: Counts::new(),
        };
        let a = o.account();
        assert_eq!(a.unacked, 2);
        assert_eq!(a.lost, 0);
        assert_eq!(a.duplicated, 2); // seq 0 (both stores) and seq 1 (stream)
        assert_eq!(a.duplicate_rows, 1);
        assert_eq!(a.duplicate_stream_messages, 3);
        assert_eq!(a.persisted, 4); // an unacked message that arrived still counts as stored
    }
}
