//! The state every `Registry` clone and its listener share, and the look-up through
//! the layers: in-process ([`LocalCache`]) → Redis → Postgres, with the Redis health tracking,
//! the counters and the metrics.

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use super::cache::LocalCache;
use super::types::{
    ApiKeyInfo, DeviceInfo, DeviceProfile, Invalidation, InvalidationKind, RegistryConfig,
    RegistryError, RegistryStats, INVALIDATION_CHANNEL,
};
use crate::metrics as m;

/// Configuration, connections, the in-process caches (one per kind) and the counters.
pub(super) struct Shared {
    pub(super) config: RegistryConfig,
    pub(super) pg: deadpool_postgres::Pool,
    pub(super) redis: Option<RedisLayer>,
    pub(super) devices: LocalCache<Uuid, DeviceInfo>,
    pub(super) api_keys: LocalCache<[u8; 32], ApiKeyInfo>,
    pub(super) profiles: LocalCache<Uuid, DeviceProfile>,
    stats: Counters,
}

/// The Redis connection (lazy, auto-reconnecting) and its health.
pub(super) struct RedisLayer {
    /// For the listener's own pub/sub connection.
    pub(super) client: redis::Client,
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

/// A local-cache hit: once per message, so through a cached handle.
fn count_local_hit() {
    m::cached!(
        Counter,
        metrics::counter!(m::REGISTRY_CACHE_LOOKUPS_TOTAL, "layer" => LAYER_LOCAL, "result" => "hit")
    )
    .increment(1);
}

fn count(layer: &'static str, result: &'static str) {
    metrics::counter!(m::REGISTRY_CACHE_LOOKUPS_TOTAL, "layer" => layer, "result" => result)
        .increment(1);
}

impl Shared {
    /// The layers for `config`; the Redis connection is lazy (Redis need not be up).
    pub(super) fn new(
        config: RegistryConfig,
        pg: deadpool_postgres::Pool,
    ) -> Result<Shared, RegistryError> {
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
        Ok(Shared {
            pg,
            redis,
            devices: LocalCache::new(cap),
            api_keys: LocalCache::new(cap),
            profiles: LocalCache::new(cap),
            stats: Counters::default(),
            config,
        })
    }

    /// Local → Redis → Postgres, filling the layers above on the way back.
    pub(super) async fn lookup<K, V, F, Fut>(
        &self,
        local: &LocalCache<K, V>,
        key: K,
        redis_key: &str,
        load: F,
    ) -> Result<Option<V>, RegistryError>
    where
        K: Eq + Hash + Copy + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static + Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<V>, RegistryError>>,
    {
        let now = self.config.clock.now();
        if let Some(v) = local.get(&key, now) {
            self.stats.local_hits.fetch_add(1, Ordering::Relaxed);
            count_local_hit();
            return Ok(v);
        }
        self.stats.local_misses.fetch_add(1, Ordering::Relaxed);
        count(LAYER_LOCAL, "miss");
        // An invalidation that arrives while we read below must win over what we read.
        let generation = local.generation();

        if let Some(v) = self.redis_get::<V>(redis_key).await {
            self.stats.redis_hits.fetch_add(1, Ordering::Relaxed);
            count(LAYER_REDIS, "hit");
            self.fill(local, key, &v, generation);
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
        self.fill(local, key, &v, generation);
        Ok(v)
    }

    /// Caches `v` in process from now on: `local_ttl` for present rows,
    /// `min(negative_ttl, local_ttl)` for absent ones.
    fn fill<K, V>(&self, local: &LocalCache<K, V>, key: K, v: &Option<V>, generation: u64)
    where
        K: Eq + Hash + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let ttl = if v.is_some() {
            self.config.local_ttl
        } else {
            self.config.negative_ttl.min(self.config.local_ttl)
        };
        local.insert_if(key, v.clone(), self.config.clock.now(), ttl, generation);
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

    pub(super) fn redis_failed(&self, error: &str) {
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

    /// Clears the in-process entry of `inv` (kinds this registry does not cache: nothing).
    pub(super) fn clear_local(&self, inv: &Invalidation) {
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

    /// Clears the whole in-process layer.
    pub(super) fn clear_all_local(&self) {
        self.devices.clear();
        self.api_keys.clear();
        self.profiles.clear();
    }

    /// An invalidation received on `cache:invalidate`: counted, cleared here and in Redis.
    pub(super) async fn apply_invalidation(&self, inv: &Invalidation) {
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

    /// Deletes the Redis key of `inv` and publishes `inv` on `cache:invalidate`.
    pub(super) async fn publish_invalidation(
        &self,
        inv: &Invalidation,
    ) -> Result<(), RegistryError> {
        let Some(r) = &self.redis else { return Ok(()) };
        let payload =
            serde_json::to_string(inv).map_err(|e| RegistryError::Redis(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.del(inv.redis_key())
            .ignore()
            .publish(INVALIDATION_CHANNEL, payload)
            .ignore();
        let mut conn = r.conn.clone();
        let res =
            tokio::time::timeout(self.config.redis_timeout, pipe.query_async::<()>(&mut conn))
                .await;
        match res {
            Ok(Ok(())) => {
                self.redis_ok();
                Ok(())
            }
            Ok(Err(e)) => {
                self.redis_failed(&e.to_string());
                Err(RegistryError::Redis(e.to_string()))
            }
            Err(_) => {
                self.redis_failed("timed out");
                Err(RegistryError::Redis("timed out".into()))
            }
        }
    }

    /// Look-up counters since start.
    pub(super) fn stats(&self) -> RegistryStats {
        let c = &self.stats;
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
}

impl RedisLayer {
    fn skipping(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        until != 0 && (self.epoch.elapsed().as_nanos() as u64) < until
    }
}
