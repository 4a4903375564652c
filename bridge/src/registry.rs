//! Device registry: device, API-key and device-profile look-ups for the hot path.
//!
//! Three layers, each in front of the next:
//! 1. a small bounded in-process cache (per process, TTL [`RegistryConfig::local_ttl`]);
//! 2. Redis (shared by every process, the plan's §4.2 key patterns, TTL [`RegistryConfig::redis_ttl`]);
//! 3. Postgres (the truth; a `deadpool_postgres::Pool` passed in).
//!
//! Absent rows are cached too ("negative caching", TTL [`RegistryConfig::negative_ttl`]), so a
//! flood from an unknown device costs Postgres one query per TTL, not one per message.
//!
//! Redis keys (values are JSON; `null` means "known absent"):
//! - `device:<uuid>` → [`DeviceInfo`] (300 s)
//! - `api_key:<hex sha-256 digest>` → [`ApiKeyInfo`] (300 s)
//! - `device_profile:<device_type_id>` → [`DeviceProfile`] (300 s, plan §4.2)
//!
//! Invalidation (plan §4.3): [`Registry::invalidate`] deletes the Redis key, clears the local
//! entry and publishes `{"type": ..., "id": ...}` on the Redis channel `cache:invalidate`; a
//! background task in every [`Registry`] subscribes and clears its Redis key and local entry.
//! After the subscription was lost (Redis restart), the whole local layer is cleared, because
//! invalidations may have been missed meanwhile.
//!
//! Redis down: look-ups fall through to Postgres; every Redis call has a short timeout
//! ([`RegistryConfig::redis_timeout`]); after a failure Redis is skipped for
//! [`RegistryConfig::redis_retry_after`], then tried again. Failures increment
//! [`crate::metrics::REGISTRY_REDIS_ERRORS_TOTAL`] and log a warning at most once per
//! [`RegistryConfig::warn_interval`].
//!
//! ```no_run
//! # async fn demo(pool: deadpool_postgres::Pool, id: uuid::Uuid) -> Result<(), argus_bridge::registry::RegistryError> {
//! use argus_bridge::registry::{Registry, RegistryConfig, Invalidation};
//! let config = RegistryConfig { redis_url: Some("redis://127.0.0.1:6379".into()), ..Default::default() };
//! let registry = Registry::start(config, pool)?;
//! if let Some(device) = registry.device(id).await? {
//!     if device.is_active() { /* accept, tenant = device.tenant_id */ }
//! }
//! registry.invalidate(Invalidation::device(id)).await?; // after changing the row
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use crate::metrics as m;

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
    /// Entries per kind in the in-process layer (bounded memory): 10,000.
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
/// Postgres); only [`Registry::invalidate`] reports them, as [`RegistryError::Redis`].
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

/// The device registry. Cheap to clone (one `Arc`); the background invalidation listener stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("redis", &self.inner.shared.redis.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    shared: Arc<Shared>,
    subscribed: watch::Receiver<bool>,
    _stop: DropGuard,
}

struct Shared {
    config: RegistryConfig,
    pg: deadpool_postgres::Pool,
    redis: Option<RedisLayer>,
    devices: LocalCache<Uuid, DeviceInfo>,
    api_keys: LocalCache<[u8; 32], ApiKeyInfo>,
    profiles: LocalCache<Uuid, DeviceProfile>,
    stats: Counters,
}

struct RedisLayer {
    client: redis::Client,
    conn: ConnectionManager,
    /// Redis is skipped until this instant (nanos since `epoch`) after a failure.
    down_until: AtomicU64,
    epoch: Instant,
    last_warn: Mutex<Option<Instant>>,
    down: AtomicBool,
}

#[derive(Default)]
struct Counters {
    local_hits: AtomicU64,
    local_misses: AtomicU64,
    redis_hits: AtomicU64,
    redis_misses: AtomicU64,
    redis_errors: AtomicU64,
    postgres_hits: AtomicU64,
    postgres_misses: AtomicU64,
    invalidations_received: AtomicU64,
}

const LAYER_LOCAL: &str = "local";
const LAYER_REDIS: &str = "redis";
const LAYER_POSTGRES: &str = "postgres";

fn count(layer: &'static str, result: &'static str) {
    metrics::counter!(m::REGISTRY_CACHE_LOOKUPS_TOTAL, "layer" => layer, "result" => result)
        .increment(1);
}

impl Registry {
    /// Builds the registry and, if `config.redis_url` is set, starts the invalidation listener
    /// (a tokio task; call from within a runtime). Redis need not be up: the connection is lazy
    /// and look-ups fall back to Postgres until it is.
    pub fn start(
        config: RegistryConfig,
        pg: deadpool_postgres::Pool,
    ) -> Result<Registry, RegistryError> {
        if config.local_capacity == 0 {
            return Err(RegistryError::Config(
                "local_capacity must be at least 1".into(),
            ));
        }
        let redis = match &config.redis_url {
            None => None,
            Some(url) => {
                let client = redis::Client::open(url.as_str()).map_err(RegistryError::RedisUrl)?;
                let cm_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.redis_timeout))
                    .set_response_timeout(Some(config.redis_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(config.redis_timeout);
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), cm_config)
                    .map_err(RegistryError::RedisUrl)?;
                Some(RedisLayer {
                    client,
                    conn,
                    down_until: AtomicU64::new(0),
                    epoch: Instant::now(),
                    last_warn: Mutex::new(None),
                    down: AtomicBool::new(false),
                })
            }
        };
        let cap = config.local_capacity;
        let shared = Arc::new(Shared {
            pg,
            redis,
            devices: LocalCache::new(cap),
            api_keys: LocalCache::new(cap),
            profiles: LocalCache::new(cap),
            stats: Counters::default(),
            config,
        });
        let stop = CancellationToken::new();
        let (tx, rx) = watch::channel(false);
        if shared.redis.is_some() {
            tokio::spawn(listen(shared.clone(), stop.clone(), tx));
        }
        Ok(Registry {
            inner: Arc::new(Inner {
                shared,
                subscribed: rx,
                _stop: stop.drop_guard(),
            }),
        })
    }

    /// Device id → tenant, status, device type. `Ok(None)`: no such device (cached as absent
    /// for `negative_ttl`). Errors only if Postgres is needed and fails.
    pub async fn device(&self, id: Uuid) -> Result<Option<DeviceInfo>, RegistryError> {
        let s = &self.inner.shared;
        s.lookup(&s.devices, id, &format!("device:{id}"), || async move {
            let client = s.pg.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT tenant_id, status, device_type_id FROM devices WHERE id = $1",
                )
                .await?;
            Ok(client
                .query_opt(&stmt, &[&id])
                .await?
                .map(|row| DeviceInfo {
                    device_id: id,
                    tenant_id: row.get(0),
                    status: DeviceStatus::from_db(row.get(1)),
                    device_type_id: row.get(2),
                }))
        })
        .await
    }

    /// API key (SHA-256 digest of the whole key) → key row. The digest is matched by Postgres'
    /// unique index and by hash-map / Redis key look-up; it is the hash of a high-entropy secret,
    /// so no byte-by-byte comparison of secrets happens here. Callers check
    /// [`ApiKeyInfo::is_valid_at`] and the device's status.
    pub async fn api_key(&self, digest: &[u8; 32]) -> Result<Option<ApiKeyInfo>, RegistryError> {
        let s = &self.inner.shared;
        let digest = *digest;
        let key = format!("api_key:{}", hex::encode(digest));
        s.lookup(&s.api_keys, digest, &key, || async move {
            let client = s.pg.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id, device_id, expires_at, revoked_at FROM device_api_keys \
                     WHERE key_digest = $1",
                )
                .await?;
            Ok(client
                .query_opt(&stmt, &[&&digest[..]])
                .await?
                .map(|row| ApiKeyInfo {
                    key_id: row.get(0),
                    device_id: row.get(1),
                    expires_at: row.get(2),
                    revoked_at: row.get(3),
                }))
        })
        .await
    }

    /// Device type → processing profile (plan §4.2 `device_profile:<id>`).
    pub async fn device_profile(
        &self,
        device_type_id: Uuid,
    ) -> Result<Option<DeviceProfile>, RegistryError> {
        let s = &self.inner.shared;
        let key = format!("device_profile:{device_type_id}");
        s.lookup(&s.profiles, device_type_id, &key, || async move {
            let client = s.pg.get().await?;
            let stmt = client
                .prepare_cached("SELECT to_jsonb(t) FROM device_types t WHERE t.id = $1")
                .await?;
            Ok(client
                .query_opt(&stmt, &[&device_type_id])
                .await?
                .map(|row| {
                    let row: serde_json::Value = row.get(0);
                    let text = |k: &str| row.get(k).and_then(|v| v.as_str()).map(str::to_owned);
                    DeviceProfile {
                        device_type_id,
                        processing_mode: text("processing_mode"),
                        protocol_adapter: text("protocol_adapter"),
                        row,
                    }
                }))
        })
        .await
    }

    /// Clears the entry here (always), deletes its Redis key and publishes the invalidation on
    /// `cache:invalidate` so every other process clears its own. `Err(Redis)` means the local
    /// entry was cleared but other processes may keep theirs until their `local_ttl` ends.
    pub async fn invalidate(&self, inv: Invalidation) -> Result<(), RegistryError> {
        let s = &self.inner.shared;
        s.clear_local(&inv);
        let Some(r) = &s.redis else { return Ok(()) };
        let payload =
            serde_json::to_string(&inv).map_err(|e| RegistryError::Redis(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.del(inv.redis_key())
            .ignore()
            .publish(INVALIDATION_CHANNEL, payload)
            .ignore();
        let mut conn = r.conn.clone();
        let res =
            tokio::time::timeout(s.config.redis_timeout, pipe.query_async::<()>(&mut conn)).await;
        match res {
            Ok(Ok(())) => {
                s.redis_ok();
                Ok(())
            }
            Ok(Err(e)) => {
                s.redis_failed(&e.to_string());
                Err(RegistryError::Redis(e.to_string()))
            }
            Err(_) => {
                s.redis_failed("timed out");
                Err(RegistryError::Redis("timed out".into()))
            }
        }
    }

    /// True while the invalidation listener is subscribed to `cache:invalidate`.
    pub fn is_subscribed(&self) -> bool {
        *self.inner.subscribed.borrow()
    }

    /// Waits until the invalidation listener is subscribed (e.g. before a test publishes).
    /// Returns false after `timeout`, or at once if Redis is not configured.
    pub async fn wait_subscribed(&self, timeout: Duration) -> bool {
        if self.inner.shared.redis.is_none() {
            return false;
        }
        let mut rx = self.inner.subscribed.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Clears the whole in-process layer (Redis is untouched).
    pub fn clear_local(&self) {
        self.inner.shared.clear_all_local();
    }

    /// Look-up counters since start.
    pub fn stats(&self) -> RegistryStats {
        let c = &self.inner.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RegistryStats {
            local_hits: g(&c.local_hits),
            local_misses: g(&c.local_misses),
            redis_hits: g(&c.redis_hits),
            redis_misses: g(&c.redis_misses),
            redis_errors: g(&c.redis_errors),
            postgres_hits: g(&c.postgres_hits),
            postgres_misses: g(&c.postgres_misses),
            invalidations_received: g(&c.invalidations_received),
        }
    }

    /// The clock of the in-process TTLs (tests advance it).
    pub fn clock(&self) -> &Clock {
        &self.inner.shared.config.clock
    }
}

impl Shared {
    /// Local → Redis → Postgres, filling the layers above on the way back.
    async fn lookup<K, V, F, Fut>(
        &self,
        local: &LocalCache<K, V>,
        key: K,
        redis_key: &str,
        load: F,
    ) -> Result<Option<V>, RegistryError>
    where
        K: Eq + Hash + Copy,
        V: Clone + Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<V>, RegistryError>>,
    {
        let now = self.config.clock.now();
        if let Some(v) = local.get(&key, now) {
            self.stats.local_hits.fetch_add(1, Ordering::Relaxed);
            count(LAYER_LOCAL, "hit");
            return Ok(v);
        }
        self.stats.local_misses.fetch_add(1, Ordering::Relaxed);
        count(LAYER_LOCAL, "miss");
        // An invalidation that arrives while we read below must win over what we read.
        let generation = local.generation();

        if let Some(v) = self.redis_get::<V>(redis_key).await {
            self.stats.redis_hits.fetch_add(1, Ordering::Relaxed);
            count(LAYER_REDIS, "hit");
            local.insert_if(key, v.clone(), self.local_expiry(v.is_some()), generation);
            return Ok(v);
        }

        let v = match load().await {
            Ok(v) => v,
            Err(e) => {
                count(LAYER_POSTGRES, "error");
                return Err(e);
            }
        };
        if v.is_some() {
            self.stats.postgres_hits.fetch_add(1, Ordering::Relaxed);
            count(LAYER_POSTGRES, "hit");
        } else {
            self.stats.postgres_misses.fetch_add(1, Ordering::Relaxed);
            count(LAYER_POSTGRES, "miss");
        }
        if local.generation() == generation {
            let ttl = if v.is_some() {
                self.config.redis_ttl
            } else {
                self.config.negative_ttl
            };
            self.redis_set(redis_key, &v, ttl).await;
        }
        local.insert_if(key, v.clone(), self.local_expiry(v.is_some()), generation);
        Ok(v)
    }

    fn local_expiry(&self, present: bool) -> Instant {
        let ttl = if present {
            self.config.local_ttl
        } else {
            self.config.negative_ttl.min(self.config.local_ttl)
        };
        self.config.clock.now() + ttl
    }

    /// `Some(value)` on a Redis hit (`Some(None)` = cached absent); `None` on miss or failure.
    async fn redis_get<V: DeserializeOwned>(&self, key: &str) -> Option<Option<V>> {
        let r = self.redis.as_ref()?;
        if r.skipping() {
            count(LAYER_REDIS, "skipped");
            return None;
        }
        let mut conn = r.conn.clone();
        let res = tokio::time::timeout(
            self.config.redis_timeout,
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut conn),
        )
        .await;
        match res {
            Ok(Ok(Some(text))) => {
                self.redis_ok();
                match serde_json::from_str::<Option<V>>(&text) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        // A value written by another version: treat as a miss and overwrite.
                        tracing::debug!(key, error = %e, "Ignored undecodable registry cache value.");
                        self.stats.redis_misses.fetch_add(1, Ordering::Relaxed);
                        count(LAYER_REDIS, "miss");
                        None
                    }
                }
            }
            Ok(Ok(None)) => {
                self.redis_ok();
                self.stats.redis_misses.fetch_add(1, Ordering::Relaxed);
                count(LAYER_REDIS, "miss");
                None
            }
            Ok(Err(e)) => {
                self.redis_failed(&e.to_string());
                None
            }
            Err(_) => {
                self.redis_failed("timed out");
                None
            }
        }
    }

    async fn redis_set<V: Serialize>(&self, key: &str, v: &Option<V>, ttl: Duration) {
        let Some(r) = &self.redis else { return };
        if r.skipping() {
            return;
        }
        let Ok(text) = serde_json::to_string(v) else {
            return;
        };
        let mut conn = r.conn.clone();
        let secs = ttl.as_secs().max(1);
        let res = tokio::time::timeout(
            self.config.redis_timeout,
            redis::cmd("SET")
                .arg(key)
                .arg(text)
                .arg("EX")
                .arg(secs)
                .query_async::<()>(&mut conn),
        )
        .await;
        match res {
            Ok(Ok(())) => self.redis_ok(),
            Ok(Err(e)) => self.redis_failed(&e.to_string()),
            Err(_) => self.redis_failed("timed out"),
        }
    }

    fn redis_ok(&self) {
        if let Some(r) = &self.redis {
            if r.down.swap(false, Ordering::Relaxed) {
                tracing::info!("Redis is reachable again; the registry uses it again.");
            }
        }
    }

    fn redis_failed(&self, error: &str) {
        let Some(r) = &self.redis else { return };
        self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::REGISTRY_REDIS_ERRORS_TOTAL).increment(1);
        count(LAYER_REDIS, "error");
        r.down.store(true, Ordering::Relaxed);
        let until = r.epoch.elapsed() + self.config.redis_retry_after;
        r.down_until.store(
            u64::try_from(until.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let now = Instant::now();
        let Ok(mut last) = r.last_warn.lock() else {
            return;
        };
        if last.is_none_or(|t| now.duration_since(t) >= self.config.warn_interval) {
            *last = Some(now);
            tracing::warn!(
                error,
                retry_after_ms = self.config.redis_retry_after.as_millis() as u64,
                "Redis unavailable; registry look-ups fall through to Postgres."
            );
        }
    }

    fn clear_local(&self, inv: &Invalidation) {
        match inv.kind {
            InvalidationKind::Device => {
                if let Ok(id) = inv.id.parse::<Uuid>() {
                    self.devices.remove(&id);
                }
            }
            InvalidationKind::ApiKey => {
                let mut d = [0u8; 32];
                if hex::decode_to_slice(&inv.id, &mut d).is_ok() {
                    self.api_keys.remove(&d);
                }
            }
            InvalidationKind::DeviceProfile => {
                if let Ok(id) = inv.id.parse::<Uuid>() {
                    self.profiles.remove(&id);
                }
            }
            // Not cached in process by this registry; only the Redis key is cleared.
            InvalidationKind::AssetProfile
            | InvalidationKind::ThresholdRules
            | InvalidationKind::DeviceAssetLinks => {}
        }
    }

    fn clear_all_local(&self) {
        self.devices.clear();
        self.api_keys.clear();
        self.profiles.clear();
    }
}

impl RedisLayer {
    fn skipping(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until != 0 && (self.epoch.elapsed().as_nanos() as u64) < until
    }
}

/// The invalidation listener: subscribes to `cache:invalidate`, clears entries; reconnects
/// with backoff, clearing the whole local layer after each (re)subscription.
async fn listen(shared: Arc<Shared>, stop: CancellationToken, subscribed: watch::Sender<bool>) {
    let Some(r) = &shared.redis else { return };
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let attempt = async {
            let mut ps =
                tokio::time::timeout(shared.config.redis_timeout, r.client.get_async_pubsub())
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
            tokio::time::timeout(
                shared.config.redis_timeout,
                ps.subscribe(INVALIDATION_CHANNEL),
            )
            .await
            .map_err(|_| "subscribe timed out".to_owned())?
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(ps)
        };
        let ps = tokio::select! {
            _ = stop.cancelled() => return,
            ps = attempt => ps,
        };
        match ps {
            Ok(ps) => {
                backoff = Duration::from_millis(100);
                if !first {
                    // Invalidations may have been missed while we were not subscribed.
                    shared.clear_all_local();
                    tracing::info!(
                        "Resubscribed to cache invalidations; cleared the in-process cache."
                    );
                }
                first = false;
                let _ = subscribed.send(true);
                let mut msgs = ps.into_on_message();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        msg = msgs.next() => msg,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(text) = msg.get_payload::<String>() else {
                        continue;
                    };
                    match serde_json::from_str::<Invalidation>(&text) {
                        Ok(inv) => shared.apply_invalidation(&inv).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "Ignored a malformed cache invalidation message.")
                        }
                    }
                }
                let _ = subscribed.send(false);
                // Whatever we cached may be stale from now on.
                shared.clear_all_local();
                tracing::warn!("Lost the cache invalidation subscription; reconnecting.");
            }
            Err(e) => {
                shared.redis_failed(&e);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

impl Shared {
    async fn apply_invalidation(&self, inv: &Invalidation) {
        self.stats
            .invalidations_received
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::REGISTRY_INVALIDATIONS_TOTAL, "type" => inv.kind.as_str())
            .increment(1);
        self.clear_local(inv);
        // Also delete the Redis key, in case a look-up refilled it after the publisher's DEL.
        if let Some(r) = &self.redis {
            let mut conn = r.conn.clone();
            let _ = tokio::time::timeout(
                self.config.redis_timeout,
                redis::cmd("DEL")
                    .arg(inv.redis_key())
                    .query_async::<()>(&mut conn),
            )
            .await;
        }
    }
}

/// A bounded map with per-entry expiry. When full, expired entries go first, then arbitrary
/// ones (good enough for a cache of hot devices; no LRU bookkeeping on the read path).
struct LocalCache<K, V> {
    map: Mutex<HashMap<K, (Option<V>, Instant)>>,
    capacity: usize,
    /// Bumped by every removal, so a fill that started before it does not resurrect old data.
    generation: AtomicU64,
}

impl<K: Eq + Hash + Copy, V: Clone> LocalCache<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::with_capacity(capacity.min(1024))),
            capacity,
            generation: AtomicU64::new(0),
        }
    }

    /// `Some(v)` if cached and fresh (`Some(None)` = cached absent).
    fn get(&self, key: &K, now: Instant) -> Option<Option<V>> {
        let mut map = self.map.lock().ok()?;
        match map.get(key) {
            Some((v, exp)) if *exp > now => Some(v.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn insert_if(&self, key: K, v: Option<V>, expires: Instant, generation: u64) {
        let Ok(mut map) = self.map.lock() else { return };
        // Checked under the lock: removals bump the generation under the same lock.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if map.len() >= self.capacity && !map.contains_key(&key) {
            let now = Instant::now();
            map.retain(|_, (_, exp)| *exp > now);
            while map.len() >= self.capacity {
                let Some(victim) = map.keys().next().copied() else {
                    break;
                };
                map.remove(&victim);
            }
        }
        map.insert(key, (v, expires));
    }

    fn remove(&self, key: &K) {
        if let Ok(mut map) = self.map.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            map.remove(key);
        }
    }

    fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            map.clear();
        }
    }
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
    fn local_cache_bounds_and_expiry() {
        let c: LocalCache<u32, u32> = LocalCache::new(2);
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        c.insert_if(1, Some(1), later, 0);
        c.insert_if(2, None, later, 0);
        c.insert_if(3, Some(3), later, 0);
        assert_eq!(c.map.lock().unwrap().len(), 2);
        assert_eq!(c.get(&3, now), Some(Some(3)));
        assert_eq!(c.get(&3, later), None, "expired at its deadline");
        // A fill that raced with a removal is dropped.
        let g = c.generation();
        c.remove(&1);
        c.insert_if(1, Some(9), later, g);
        assert_eq!(c.get(&1, now), None);
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
