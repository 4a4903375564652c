//! Device registry: device, API-key and device-profile look-ups for the hot path.
//!
//! Three layers, each in front of the next:
//! 1. a bounded in-process cache (per process, [`RegistryConfig::local_capacity`] entries per
//!    kind on `moka`, which keeps the frequently read ones; TTL [`RegistryConfig::local_ttl`],
//!    measured on [`RegistryConfig::clock`]);
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
//! Layout: `types` (the public value types, configuration and errors, re-exported here),
//! `cache` (the in-process layer), `layers` (the state shared with the listener and the look-up
//! through the three layers), `listener` (the `cache:invalidate` subscriber); this module holds
//! the [`Registry`] handle. Dependencies point one way: this module → `listener` → `layers` →
//! `cache`, `types`.
//!
//! ```no_run
//! # async fn demo(pool: deadpool_postgres::Pool, id: uuid::Uuid) -> Result<(), argus_pipeline::registry::RegistryError> {
//! use argus_pipeline::registry::{Registry, RegistryConfig, Invalidation};
//! let config = RegistryConfig { redis_url: Some("redis://127.0.0.1:6379".into()), ..Default::default() };
//! let registry = Registry::start(config, pool)?;
//! if let Some(device) = registry.device(id).await? {
//!     if device.is_active() { /* accept, tenant = device.tenant_id */ }
//! }
//! registry.invalidate(Invalidation::device(id)).await?; // after changing the row
//! # Ok(()) }
//! ```

mod cache;
mod layers;
mod listener;
mod types;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use layers::Shared;
pub use types::{
    ApiKeyInfo, Clock, DeviceInfo, DeviceProfile, DeviceStatus, Invalidation, InvalidationKind,
    RegistryConfig, RegistryError, RegistryStats, INVALIDATION_CHANNEL,
};

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

impl Registry {
    /// Builds the registry and, if `config.redis_url` is set, starts the invalidation listener
    /// (a tokio task; call from within a runtime). Redis need not be up: the connection is lazy
    /// and look-ups fall back to Postgres until it is.
    pub fn start(
        config: RegistryConfig,
        pg: deadpool_postgres::Pool,
    ) -> Result<Registry, RegistryError> {
        let shared = Arc::new(Shared::new(config, pg)?);
        let stop = CancellationToken::new();
        let (tx, rx) = watch::channel(false);
        if shared.redis.is_some() {
            tokio::spawn(listener::listen(shared.clone(), stop.clone(), tx));
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
    /// unique index and by in-process cache / Redis key look-up; it is the hash of a high-entropy secret,
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
        s.publish_invalidation(&inv).await
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
        self.inner.shared.stats()
    }

    /// The clock of the in-process TTLs (tests advance it).
    pub fn clock(&self) -> &Clock {
        &self.inner.shared.config.clock
    }
}
