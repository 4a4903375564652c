//! The pre-auth state of the ingest endpoint ([`KeyGate`]): which presented API-key
//! digests this process has seen exist in Postgres (`known`), which it has seen absent
//! (`absent`), and the per-client-address limiter that every other look-up must pass.
//! [`crate::auth`] uses it before the registry; the two sets are apart, so a flood of
//! unknown keys only ever evicts its own entries.

use std::net::IpAddr;
use std::time::Duration;

use crate::apikey::KeyDigest;
use crate::ratelimit::RateLimiter;

/// Digests known to exist: bounded, and only real keys ever enter it.
const KNOWN_CAPACITY: u64 = 100_000;
/// How long a digest stays known (validity is the registry's, checked every request).
const KNOWN_TTL: Duration = Duration::from_secs(600);
/// Digests known absent: bounded apart from `known`, so a flood only evicts its own.
const ABSENT_CAPACITY: u64 = 10_000;
/// How long a digest stays known absent (as the registry's negative TTL).
const ABSENT_TTL: Duration = Duration::from_secs(10);

/// The pre-auth state: which digests exist, which do not, and the per-address limiter.
pub struct KeyGate {
    known: moka::sync::Cache<KeyDigest, ()>,
    absent: moka::sync::Cache<KeyDigest, ()>,
    limiter: RateLimiter<IpAddr>,
}

impl KeyGate {
    pub fn new(rate_per_address: f64, burst: u32) -> KeyGate {
        KeyGate {
            known: moka::sync::Cache::builder()
                .max_capacity(KNOWN_CAPACITY)
                .time_to_live(KNOWN_TTL)
                .build(),
            absent: moka::sync::Cache::builder()
                .max_capacity(ABSENT_CAPACITY)
                .time_to_live(ABSENT_TTL)
                .build(),
            limiter: RateLimiter::new(rate_per_address, burst),
        }
    }

    /// The digest was found in Postgres lately.
    pub fn is_known(&self, digest: &KeyDigest) -> bool {
        self.known.contains_key(digest)
    }

    /// The digest was looked for in Postgres lately, and not found.
    pub fn is_absent(&self, digest: &KeyDigest) -> bool {
        self.absent.contains_key(digest)
    }

    /// Takes a look-up cell of `address`; `Err(wait)` when it has none left.
    pub fn check_address(&self, address: IpAddr) -> Result<(), Duration> {
        self.limiter.check(address)
    }

    pub fn mark_known(&self, digest: &KeyDigest) {
        self.known.insert(*digest, ());
    }

    pub fn mark_absent(&self, digest: &KeyDigest) {
        self.absent.insert(*digest, ());
    }
}

impl std::fmt::Debug for KeyGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyGate")
            .field("known", &self.known.entry_count())
            .field("absent", &self.absent.entry_count())
            .finish_non_exhaustive()
    }
}
