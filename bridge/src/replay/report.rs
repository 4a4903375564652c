//! What a `list` or `replay` run prints: a summary table on stdout (or JSON
//! with `--json`); the progress bar goes to stderr, on a terminal only.

use std::collections::BTreeMap;

use serde::Serialize;

use super::outcome::Outcome;

/// Counts of one replay run, by outcome (`crate::replay::outcome` module docs).
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// `--dry-run`: nothing was written.
    pub dry_run: bool,
    /// The run resumed an interrupted one (its earlier letters are not counted again).
    pub resumed: bool,
    /// Every letter up to the run's bound was taken; false when `--max-letters` stopped it.
    pub complete: bool,
    /// Letters read (those outside the filters included).
    pub read: u64,
    pub stored: u64,
    pub already_stored: u64,
    /// Still refused, by the reason they are refused with now.
    pub still_rejected: BTreeMap<String, u64>,
    /// Of `still_rejected`, those whose reason changed (a letter with the new reason was written).
    pub new_reason: u64,
    pub truncated: u64,
    pub unreadable: u64,
    pub skipped: u64,
}

impl Summary {
    pub fn count(&mut self, outcome: &Outcome) {
        self.read += 1;
        match outcome {
            Outcome::Stored => self.stored += 1,
            Outcome::AlreadyStored => self.already_stored += 1,
            Outcome::Rejected { reason, was, .. } => {
                *self.still_rejected.entry(reason.to_string()).or_default() += 1;
                self.new_reason += u64::from(reason != was);
            }
            Outcome::Truncated => self.truncated += 1,
            Outcome::Unreadable(_) => self.unreadable += 1,
            Outcome::Skipped => self.skipped += 1,
        }
    }

    /// Letters refused again, every reason.
    pub fn rejected(&self) -> u64 {
        self.still_rejected.values().sum()
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let stored = if self.dry_run {
            "would be stored"
        } else {
            "stored"
        };
        let mut rows = vec![
            (stored.to_string(), self.stored),
            ("already stored".to_string(), self.already_stored),
            ("still rejected".to_string(), self.rejected()),
        ];
        for (reason, n) in &self.still_rejected {
            rows.push((format!("  {reason}"), *n));
        }
        if self.new_reason > 0 {
            let what = if self.dry_run {
                "would be rewritten"
            } else {
                "rewritten"
            };
            rows.push((format!("  (with a new reason, {what})"), self.new_reason));
        }
        rows.push(("truncated, not replayable".to_string(), self.truncated));
        rows.push(("unreadable".to_string(), self.unreadable));
        rows.push(("outside the filters".to_string(), self.skipped));
        rows.push(("letters read".to_string(), self.read));
        table(&rows)
    }
}

/// Rows of `label  count`, the counts right-aligned.
pub fn table(rows: &[(String, u64)]) -> String {
    let width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let digits = rows
        .iter()
        .map(|(_, n)| n.to_string().len())
        .max()
        .unwrap_or(1);
    rows.iter()
        .map(|(l, n)| format!("{l:<width$}  {n:>digits$}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use argus_pipeline::dlq::DlqReason;

    #[test]
    fn every_outcome_is_counted_once() {
        let mut s = Summary::default();
        for o in [
            Outcome::Stored,
            Outcome::AlreadyStored,
            Outcome::Rejected {
                reason: DlqReason::InvalidJson,
                was: DlqReason::InvalidJson,
                rewritten: false,
            },
            Outcome::Rejected {
                reason: DlqReason::UnknownDevice,
                was: DlqReason::DisabledDevice,
                rewritten: true,
            },
            Outcome::Truncated,
            Outcome::Unreadable("x".into()),
            Outcome::Skipped,
        ] {
            s.count(&o);
        }
        assert_eq!(
            (s.read, s.stored, s.already_stored, s.rejected()),
            (7, 1, 1, 2)
        );
        assert_eq!(
            (s.new_reason, s.truncated, s.unreadable, s.skipped),
            (1, 1, 1, 1)
        );
        let t = s.table();
        let line = t
            .lines()
            .find(|l| l.starts_with("  invalid_json"))
            .expect(&t);
        assert!(line.ends_with(" 1"), "{t}");
        assert!(
            t.lines()
                .all(|l| l.len() == t.lines().next().unwrap().len()),
            "aligned:\n{t}"
        );
    }
}
