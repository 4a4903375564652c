//! The registry's value types, configuration, errors and counters: plain data, no I/O.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Redis pub/sub channel for cache invalidations (plan §4.2 `CACHE_INVALIDATION_CHANNEL`).
pub const INVALIDATION_CHANNEL: &str = "cache:invalidate";

/// Status of a device (`devices.status`). Only [`DeviceStatus::Active`] devices may send telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Active,
    Disabled,
    Decommissioned,
    /// A value this build does not know (the check constraint should prevent it); never active.
    #[serde(other)]
    Unknown,
}

impl DeviceStatus {
    /// Parses the `devices.status` text; unknown values map to [`DeviceStatus::Unknown`].
    pub fn from_db(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "disabled" => Self::Disabled,
            "decommissioned" => Self::Decommissioned,
            _ => Self::Unknown,
        }
    }

    /// The `devices.status` text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Decommissioned => "decommissioned",
            Self::Unknown => "unknown",
        }
    }
}

/// What the hot path needs to know about a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device_id: Uuid,
    pub tenant_id: Uuid,
    pub status: DeviceStatus,
    pub device_type_id: Option<Uuid>,
}

impl DeviceInfo {
    /// True if the device may send telemetry (`status = 'active'`).
    pub fn is_active(&self) -> bool {
        self.status == DeviceStatus::Active
    }
}

/// A row of `device_api_keys`, found by the SHA-256 digest of the whole key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub key_id: Uuid,
    pub device_id: Uuid,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKeyInfo {
    /// True if the key is neither revoked nor expired at `now`.
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// Processing configuration of a device type (`device_types` row, plan §1.1 step 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    pub device_type_id: Uuid,
    /// `device_types.processing_mode` if the column exists and is set.
    pub processing_mode: Option<String>,
    /// `device_types.protocol_adapter` if the column exists and is set.
    pub protocol_adapter: Option<String>,
    /// The whole row as JSON (`to_jsonb(device_types)`), so new columns need no code change here.
    pub row: serde_json::Value,
}

/// Kind of a cache invalidation: the plan's four §4.3 types plus `device` and `api_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidationKind {
    DeviceProfile,
    AssetProfile,
    ThresholdRules,
    DeviceAssetLinks,
    Device,
    ApiKey,
}

impl InvalidationKind {
    /// The wire name and Redis key prefix (`device_profile`, ..., `device`, `api_key`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeviceProfile => "device_profile",
            Self::AssetProfile => "asset_profile",
            Self::ThresholdRules => "threshold_rules",
            Self::DeviceAssetLinks => "device_asset_links",
            Self::Device => "device",
            Self::ApiKey => "api_key",
        }
    }
}

/// One invalidation message, JSON `{"type": "<kind>", "id": "<id>"}` on `cache:invalidate`.
///
/// `id` is the UUID for devices and profiles, and the lowercase hex SHA-256 digest for API keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidation {
    #[serde(rename = "type")]
    pub kind: InvalidationKind,
    pub id: String,
}

impl Invalidation {
    /// Invalidate `device:<id>`.
    pub fn device(id: Uuid) -> Self {
        Self {
            kind: InvalidationKind::Device,
            id: id.to_string(),
        }
    }
    /// Invalidate `api_key:<hex digest>`.
    pub fn api_key(digest: &[u8; 32]) -> Self {
        Self {
            kind: InvalidationKind::ApiKey,
            id: hex::encode(digest),
        }
    }
    /// Invalidate `device_profile:<device_type_id>`.
    pub fn device_profile(device_type_id: Uuid) -> Self {
        Self {
            kind: InvalidationKind::DeviceProfile,
            id: device_type_id.to_string(),
        }
    }
    /// The Redis key this invalidation clears (`<type>:<id>`).
    pub fn redis_key(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.id)
    }
}

/// A clock for the in-process TTLs: real time plus an offset that tests can advance, so expiry
/// is testable without sleeping (tokio's paused time would also fire the real I/O timeouts).
#[derive(Clone, Default)]
pub struct Clock {
    offset_nanos: Arc<AtomicU64>,
}

impl Clock {
    /// Now, as this clock sees it.
    pub fn now(&self) -> Instant {
        Instant::now() + Duration::from_nanos(self.offset_nanos.load(Ordering::Relaxed))
    }
    /// Moves this clock (and every clone of it) forward by `d`.
    pub fn advance(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.offset_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock")
            .field("offset_nanos", &self.offset_nanos.load(Ordering::Relaxed))
            .finish()
    }
}

/// Registry settings. `Default` gives production values with Redis disabled.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `redis://host:port[/db]`; `None` runs with the in-process layer and Postgres only.
    pub redis_url: Option<String>,
    /// Entries per kind in the in-process layer (bounded memory; when full, moka's TinyLFU
    /// keeps the frequently read entries): 10,000.
    pub local_capacity: usize,
    /// In-process TTL: 30 s; short, because only invalidations over Redis shorten it.
    pub local_ttl: Duration,
    /// TTL of "absent" entries, both layers: 10 s.
    pub negative_ttl: Duration,
    /// Redis TTL: 300 s (the plan's §4.2 value for every key pattern).
    pub redis_ttl: Duration,
    /// Time limit of each Redis call (also the connect timeout): 250 ms, so a dead Redis costs
    /// little latency before Postgres answers.
    pub redis_timeout: Duration,
    /// After a Redis failure, skip Redis for this long before trying again: 1 s.
    pub redis_retry_after: Duration,
    /// At most one "Redis unavailable" warning per this interval: 30 s.
    pub warn_interval: Duration,
    /// The in-process TTL clock; tests advance it.
    pub clock: Clock,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            local_capacity: 10_000,
            local_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(10),
            redis_ttl: Duration::from_secs(300),
            redis_timeout: Duration::from_millis(250),
            redis_retry_after: Duration::from_secs(1),
            warn_interval: Duration::from_secs(30),
            clock: Clock::default(),
        }
    }
}

/// Errors of registry look-ups. Redis failures never surface from look-ups (they fall back to
/// Postgres); only `Registry::invalidate` reports them, as [`RegistryError::Redis`].
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry: no Postgres connection from the pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("registry: Postgres query failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("registry: invalid Redis URL: {0}")]
    RedisUrl(redis::RedisError),
    #[error("registry: Redis unavailable: {0}")]
    Redis(String),
    #[error("registry: bad configuration: {0}")]
    Config(String),
}

impl RegistryError {
    /// True if retrying later may succeed (connection trouble), false for configuration errors.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, Self::RedisUrl(_) | Self::Config(_))
    }
}

/// Look-up counters of one registry (also exported as metrics); handy in tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub local_hits: u64,
    pub local_misses: u64,
    pub redis_hits: u64,
    pub redis_misses: u64,
    pub redis_errors: u64,
    pub postgres_hits: u64,
    pub postgres_misses: u64,
    pub invalidations_received: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_wire_format() {
        let id = Uuid::nil();
        let s = serde_json::to_string(&Invalidation::device(id)).unwrap();
        assert_eq!(
            s,
            r#"{"type":"device","id":"00000000-0000-0000-0000-000000000000"}"#
        );
        let p: Invalidation =
            serde_json::from_str(r#"{"type":"device_asset_links","id":"x"}"#).unwrap();
        assert_eq!(p.kind, InvalidationKind::DeviceAssetLinks);
        assert_eq!(p.redis_key(), "device_asset_links:x");
        assert_eq!(
            Invalidation::api_key(&[0xab; 32]).redis_key(),
            format!("api_key:{}", "ab".repeat(32))
        );
    }

    #[test]
    fn clock_advances() {
        let c = Clock::default();
        let a = c.now();
        c.advance(Duration::from_secs(60));
        assert!(c.clone().now() >= a + Duration::from_secs(60));
    }

    #[test]
    fn api_key_validity() {
        let now = Utc::now();
        let k = ApiKeyInfo {
            key_id: Uuid::nil(),
            device_id: Uuid::nil(),
            expires_at: None,
            revoked_at: None,
        };
        assert!(k.is_valid_at(now));
        assert!(!ApiKeyInfo {
            revoked_at: Some(now),
            ..k.clone()
        }
        .is_valid_at(now));
        assert!(!ApiKeyInfo {
            expires_at: Some(now),
            ..k
        }
        .is_valid_at(now));
    }
}
