//! Send pacing: a fixed rate (spread evenly, no bursts beyond one timer tick) or as fast as
//! the bounded inflight window allows; plus the duration syntax the CLI accepts.

use std::str::FromStr;
use std::time::{Duration, Instant};

/// `--rate`: a number of messages per second, or `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Max,
    PerSecond(f64),
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Rate::Max);
        }
        let v: f64 = s
            .replace('_', "")
            .parse()
            .map_err(|_| format!("--rate: expected a number of msg/s or `max`, got `{s}`"))?;
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("--rate: must be positive, got `{s}`"));
        }
        Ok(Rate::PerSecond(v))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Max => f.write_str("max"),
            Rate::PerSecond(v) => write!(f, "{v}"),
        }
    }
}

impl Rate {
    /// The share of one of `n` senders.
    pub fn split(self, n: usize) -> Rate {
        match self {
            Rate::Max => Rate::Max,
            Rate::PerSecond(v) => Rate::PerSecond(v / n.max(1) as f64),
        }
    }

    pub fn per_second(self) -> Option<f64> {
        match self {
            Rate::Max => None,
            Rate::PerSecond(v) => Some(v),
        }
    }
}

/// How many messages a sender may have sent by a given instant.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    start: Instant,
    rate: Rate,
}

impl Pacer {
    pub fn new(start: Instant, rate: Rate) -> Self {
        Self { start, rate }
    }

    /// Messages allowed by `now` (the first one immediately); `u64::MAX` at `max`.
    pub fn allowed(&self, now: Instant) -> u64 {
        match self.rate {
            Rate::Max => u64::MAX,
            Rate::PerSecond(r) => {
                let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
                (elapsed * r).floor() as u64 + 1
            }
        }
    }

    /// When message number `n` (0-based) is due.
    pub fn due(&self, n: u64) -> Instant {
        match self.rate {
            Rate::Max => self.start,
            Rate::PerSecond(r) => self.start + Duration::from_secs_f64(n as f64 / r),
        }
    }
}

/// Parses `250ms`, `1.5s`, `2m`, `1h`, or a bare number of seconds (the bridge's parser,
/// so every Argus binary reads durations alike).
pub use argus_pipeline::flags::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_parses_numbers_and_max() {
        assert_eq!("max".parse::<Rate>().unwrap(), Rate::Max);
        assert_eq!("1_000".parse::<Rate>().unwrap(), Rate::PerSecond(1000.0));
        assert!("0".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
        assert_eq!(Rate::PerSecond(1000.0).split(4), Rate::PerSecond(250.0));
    }

    #[test]
    fn pacer_spreads_messages_evenly() {
        let t0 = Instant::now();
        let p = Pacer::new(t0, Rate::PerSecond(1000.0));
        assert_eq!(p.allowed(t0), 1);
        assert_eq!(p.allowed(t0 + Duration::from_millis(10)), 11);
        assert_eq!(p.allowed(t0 + Duration::from_secs(1)), 1001);
        assert_eq!(p.due(500), t0 + Duration::from_millis(500));
        assert_eq!(Pacer::new(t0, Rate::Max).allowed(t0), u64::MAX);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3 parsecs").is_err());
    }
}
