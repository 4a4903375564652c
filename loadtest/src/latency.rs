//! Latency recording: one HDR histogram for the whole run, one per 1-second window of
//! send time (for the plot), in microseconds with 3 significant digits.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency tracked: 10 minutes. Larger samples are clamped (and `max` says so).
const MAX_US: u64 = 600_000_000;

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// One window of the latency-over-time plot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    /// Seconds since the first send (window start).
    pub t_s: u64,
    #[serde(flatten)]
    pub latency_ms: Percentiles,
}

pub struct Latencies {
    start_ns: u64,
    all: Histogram<u64>,
    windows: Vec<Histogram<u64>>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. MAX_US with 3 significant digits are valid bounds; this cannot fail.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

impl Latencies {
    /// `start_ns`: the run's first send time; windows are counted from it.
    pub fn new(start_ns: u64) -> Self {
        Self {
            start_ns,
            all: new_hist(),
            windows: Vec::new(),
        }
    }

    /// Records one message sent at `sent_ns` and observed at `seen_ns` (Unix nanoseconds).
    pub fn record(&mut self, sent_ns: u64, seen_ns: u64) {
        let us = (seen_ns.saturating_sub(sent_ns) / 1_000).clamp(1, MAX_US);
        self.all.saturating_record(us);
        let w = (sent_ns.saturating_sub(self.start_ns) / 1_000_000_000) as usize;
        // A run is minutes long; cap the window count so a bogus timestamp cannot allocate wildly.
        if w < 86_400 {
            while self.windows.len() <= w {
                self.windows.push(new_hist());
            }
            self.windows[w].saturating_record(us);
        }
    }

    /// Adds another recorder's samples (same `start_ns` assumed for the windows).
    pub fn merge(&mut self, other: &Latencies) {
        // Both use the same bounds, so `add` cannot fail.
        let _ = self.all.add(&other.all);
        while self.windows.len() < other.windows.len() {
            self.windows.push(new_hist());
        }
        for (mine, theirs) in self.windows.iter_mut().zip(&other.windows) {
            let _ = mine.add(theirs);
        }
    }

    pub fn summary(&self) -> Percentiles {
        percentiles(&self.all)
    }

    /// Windows that hold at least one sample.
    pub fn windows(&self) -> Vec<Window> {
        self.windows
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, h)| Window {
                t_s: i as u64,
                latency_ms: percentiles(h),
            })
            .collect()
    }
}

pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| us as f64 / 1_000.0;
    Percentiles {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.50)),
        p95: ms(h.value_at_quantile(0.95)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
        mean: h.mean() / 1_000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_one_to_one_hundred_ms() {
        let start = 1_000_000_000_000;
        let mut l = Latencies::new(start);
        for ms in 1..=100u64 {
            l.record(start, start + ms * 1_000_000);
        }
        let p = l.summary();
        assert_eq!(p.count, 100);
        // HDR keeps 3 significant digits: values are exact to 0.1 %.
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p95 - 95.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        assert!((p.mean - 50.5).abs() < 0.1, "{p:?}");
    }

    #[test]
    fn windows_follow_send_time_and_skip_empty_seconds() {
        let start = 5_000_000_000;
        let mut l = Latencies::new(start);
        l.record(start + 100, start + 100 + 2_000_000); // window 0: 2 ms
        l.record(start + 2_500_000_000, start + 2_500_000_000 + 8_000_000); // window 2: 8 ms
        let w = l.windows();
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].t_s, w[1].t_s), (0, 2));
        assert!((w[0].latency_ms.p50 - 2.0).abs() < 0.01);
        assert!((w[1].latency_ms.p99 - 8.0).abs() < 0.01);
    }

    #[test]
    fn clock_skew_never_underflows() {
        let mut l = Latencies::new(10);
        l.record(100, 50); // observed "before" sent: clamps to 1 µs
        assert_eq!(l.summary().count, 1);
        assert!(l.summary().max <= 0.001 + f64::EPSILON);
        assert_eq!(Latencies::new(0).summary(), Percentiles::default());
    }
}
