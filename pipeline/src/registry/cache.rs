//! The in-process layer: one bounded cache per kind, on [`moka::sync::Cache`].
//!
//! - Bounded: at most `capacity` entries; when full, moka's TinyLFU policy keeps the keys that
//!   are read often, so a fleet larger than the cache does not evict the hot devices.
//! - Expiry, two clocks: each entry carries its deadline on the registry's
//!   [`Clock`](super::types::Clock) (tests advance it without sleeping), and a look-up past that
//!   deadline is a miss. Moka is also told the entry's lifetime (per-entry [`Expiry`]), so it
//!   reclaims expired entries on real time. The registry clock never runs slower than real time,
//!   so moka never drops an entry that the clock still sees as fresh.
//! - Negative caching: values are `Option<V>`, `None` meaning "known absent".
//! - Generations: every removal or clear bumps a counter; a fill that read the counter before
//!   the removal is dropped, so a look-up that raced with an invalidation cannot put stale data
//!   back. Fills check the counter under a shared lock, removals bump it under the exclusive
//!   lock; reads take no lock. A clear also bumps a clear count kept in each entry, so an entry
//!   filled before a clear is never served after it, even when moka's `invalidate_all` (which
//!   compares timestamps) saw both in the same clock tick.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

/// One cached answer.
#[derive(Clone)]
struct Entry<V> {
    /// `None`: known absent.
    value: Option<V>,
    /// Fresh while the registry clock is before this; `None`: the TTL does not fit an `Instant`.
    deadline: Option<Instant>,
    /// The lifetime given to moka (real time).
    ttl: Duration,
    /// [`LocalCache::clears`] when it was filled.
    clears: u64,
}

/// Moka's per-entry expiry: the entry's own TTL from its (re)insertion; reads do not extend it.
struct EntryTtl;

impl<K, V> Expiry<K, Entry<V>> for EntryTtl {
    fn expire_after_create(&self, _: &K, entry: &Entry<V>, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &K,
        entry: &Entry<V>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// A bounded map with per-entry expiry and invalidation generations (see the module docs).
pub(super) struct LocalCache<K, V> {
    cache: Cache<K, Entry<V>>,
    /// Bumped by every removal, so a fill that started before it does not resurrect old data.
    generation: AtomicU64,
    /// Bumped by every clear (with `generation`); an entry from before the last clear is a miss.
    clears: AtomicU64,
    /// Fills hold it shared while they check `generation` and insert; removals hold it
    /// exclusively while they bump `generation` and remove. Guards no data.
    fills: RwLock<()>,
}

impl<K, V> LocalCache<K, V>
where
    K: Eq + Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(u64::try_from(capacity).unwrap_or(u64::MAX))
                .expire_after(EntryTtl)
                .build(),
            generation: AtomicU64::new(0),
            clears: AtomicU64::new(0),
            fills: RwLock::new(()),
        }
    }

    /// `Some(v)` if cached and fresh at `now` (registry clock); `Some(None)` = cached absent.
    pub(super) fn get(&self, key: &K, now: Instant) -> Option<Option<V>> {
        let entry = self.cache.get(key)?;
        if entry.clears != self.clears.load(Ordering::Acquire) {
            return None; // filled before a clear; moka drops it soon
        }
        if entry.deadline.is_none_or(|d| d > now) {
            return Some(entry.value);
        }
        // Expired on the registry clock. No generation bump: whatever a concurrent fill inserts
        // is at least as new as this entry (at worst we drop that fill, costing one more miss).
        self.cache.invalidate(key);
        None
    }

    /// The current generation; pass it to [`LocalCache::insert_if`] after the slow look-up.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches `v` for `ttl` from `now` (registry clock), unless a removal or clear happened
    /// since `generation` was read.
    pub(super) fn insert_if(
        &self,
        key: K,
        value: Option<V>,
        now: Instant,
        ttl: Duration,
        generation: u64,
    ) {
        // The lock guards no data, so a panic elsewhere while it was held changes nothing here.
        let _fill = self.fills.read().unwrap_or_else(PoisonError::into_inner);
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let entry = Entry {
            value,
            deadline: now.checked_add(ttl),
            ttl,
            clears: self.clears.load(Ordering::Acquire),
        };
        self.cache.insert(key, entry);
    }

    pub(super) fn remove(&self, key: &K) {
        let _removal = self.fills.write().unwrap_or_else(PoisonError::into_inner);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(key);
    }

    pub(super) fn clear(&self) {
        let _removal = self.fills.write().unwrap_or_else(PoisonError::into_inner);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.clears.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
    }

    /// Entries held, after moka's pending evictions ran (its bound is enforced eventually).
    #[cfg(test)]
    fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_cache_bounds_and_expiry() {
        let c: LocalCache<u32, u32> = LocalCache::new(2);
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let later = now + ttl;
        c.insert_if(1, Some(1), now, ttl, 0);
        c.insert_if(2, None, now, ttl, 0);
        assert_eq!(c.get(&2, now), Some(None), "absence is cached");
        c.insert_if(3, Some(3), now, ttl, 0);
        assert_eq!(c.get(&3, now), Some(Some(3)));
        assert_eq!(c.entry_count(), 2, "bounded by the capacity");
        // Whichever two survived are fresh until their deadline, and a miss from it on.
        let kept: Vec<u32> = [1, 2, 3]
            .into_iter()
            .filter(|k| c.get(k, now).is_some())
            .collect();
        assert_eq!(kept.len(), 2, "kept {kept:?}");
        for k in &kept {
            assert_eq!(c.get(k, later), None, "{k} expired at its deadline");
            assert_eq!(c.get(k, now), None, "{k} was removed when seen expired");
        }
        // A fill that raced with a removal is dropped.
        let g = c.generation();
        c.remove(&1);
        c.insert_if(1, Some(9), now, ttl, g);
        assert_eq!(c.get(&1, now), None);
        // ... and so is one that raced with a clear; a fill after it is kept.
        let g = c.generation();
        c.clear();
        c.insert_if(4, Some(4), now, ttl, g);
        assert_eq!(c.get(&4, now), None);
        c.insert_if(4, Some(4), now, ttl, c.generation());
        assert_eq!(c.get(&4, now), Some(Some(4)));
    }

    #[test]
    fn a_hot_key_survives_a_flood_of_cold_keys() {
        const CAPACITY: u64 = 100;
        let c: LocalCache<u32, u32> = LocalCache::new(CAPACITY as usize);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let hot = u32::MAX;
        c.insert_if(hot, Some(7), now, ttl, c.generation());
        let (mut reads, mut hits) = (0u32, 0u32);
        for k in 0..20_000u32 {
            // Each cold key is seen once (a miss, then a fill), as with a fleet far larger than
            // the cache; the hot key is read in between, as a device that sends often.
            if c.get(&k, now).is_none() {
                c.insert_if(k, Some(k), now, ttl, c.generation());
            }
            if k % 4 == 0 {
                reads += 1;
                match c.get(&hot, now) {
                    Some(v) => {
                        assert_eq!(v, Some(7));
                        hits += 1;
                    }
                    None => c.insert_if(hot, Some(7), now, ttl, c.generation()),
                }
            }
        }
        assert!(c.entry_count() <= CAPACITY, "{} entries", c.entry_count());
        assert_eq!(hits, reads, "the hot key was evicted");
        assert_eq!(c.get(&hot, now), Some(Some(7)));
    }
}
