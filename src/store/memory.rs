//! Buckets kept in this process: the embedded store when no Redis is configured, and the
//! local fallback when Redis cannot decide.
//!
//! Limits are then per instance, not shared. Buckets that have refilled completely are
//! dropped, which loses nothing: a missing bucket is a full one. When more clients than
//! `max_buckets` are still refilling at once, the store forgets the buckets closest to
//! full: a forgotten client regains only the few tokens it was missing, the least
//! loosening any eviction can cause, and memory stays bounded whatever the traffic.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{Store, StoreFuture};
use crate::bucket::{self, BucketState, Decision, Limit};
use crate::identity::ClientKey;

/// Enough shards that worker threads rarely wait on one another.
const SHARDS: usize = 64;
/// A shard is swept for full buckets whenever it has grown past this many since the last sweep.
const MIN_SWEEP_LEN: usize = 1024;
/// `MEMORY_STORE_MAX_BUCKETS` when not set: about 20 MiB of buckets.
pub const DEFAULT_MAX_BUCKETS: usize = 200_000;

pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Buckets measure time from here; a monotonic clock cannot jump.
    epoch: Instant,
    /// Most buckets one shard holds; `max_buckets` spread over the shards.
    shard_capacity: usize,
    /// Evicting means the limit is looser than configured, so it is logged, once.
    evicted: AtomicBool,
}

struct Shard {
    buckets: HashMap<ClientKey, BucketState>,
    sweep_at_len: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BUCKETS)
    }
}

impl MemoryStore {
    /// A store that holds at most about `max_buckets` buckets (rounded up to a multiple
    /// of the shard count).
    pub fn new(max_buckets: usize) -> Self {
        let shard_capacity = max_buckets.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    buckets: HashMap::new(),
                    sweep_at_len: MIN_SWEEP_LEN.min(shard_capacity),
                })
            })
            .collect();
        Self {
            shards,
            hasher: RandomState::new(),
            epoch: Instant::now(),
            shard_capacity,
            evicted: AtomicBool::new(false),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// [`Store::take`] at an explicit time, so tests can drive the clock.
    pub fn take_at(&self, key: &ClientKey, limit: &Limit, now_us: u64) -> Decision {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        // A poisoned shard only means another thread panicked mid-update of plain data;
        // the map is still consistent, so keep serving.
        let mut shard = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = shard.buckets.get(key).copied();
        let (decision, new_state) = bucket::take(limit, state, now_us);
        if let Some(new_state) = new_state {
            shard.buckets.insert(*key, new_state);
            if shard.buckets.len() >= shard.sweep_at_len
                && shard.shrink(limit, now_us, self.shard_capacity)
                && !self.evicted.swap(true, Ordering::Relaxed)
            {
                log::warn!(
                    "memory store full: more than {} clients are refilling at once, so the buckets closest to full are forgotten (their clients regain those tokens early); raise MEMORY_STORE_MAX_BUCKETS",
                    self.shard_capacity * SHARDS
                );
            }
        }
        decision
    }

    /// Takes a token now, on this store's clock.
    pub fn take_now(&self, key: &ClientKey, limit: &Limit) -> Decision {
        self.take_at(key, limit, self.now_us())
    }

    /// How many buckets are held, full ones not yet swept included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().map_or(0, |shard| shard.buckets.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[cfg(test)]
    fn holds(&self, key: &ClientKey) -> bool {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        shard.lock().unwrap().buckets.contains_key(key)
    }
}

impl Shard {
    /// Drops the buckets that are full again; if the shard still holds more than
    /// `shard_capacity`, forgets those closest to full down to 7/8 of it, so the cost of a
    /// pass is shared by the next eighth of inserts. Says whether it had to forget any.
    fn shrink(&mut self, limit: &Limit, now_us: u64, shard_capacity: usize) -> bool {
        let capacity = limit.capacity_units();
        let missing = |state: &BucketState| capacity - bucket::refill(limit, Some(*state), now_us);
        self.buckets.retain(|_, state| missing(state) > 0);
        let over = self.buckets.len() > shard_capacity;
        if over {
            let keep = shard_capacity - shard_capacity / 8;
            let mut by_missing: Vec<(u64, ClientKey)> = self
                .buckets
                .iter()
                .map(|(key, state)| (missing(state), *key))
                .collect();
            let forget = by_missing.len() - keep;
            by_missing.select_nth_unstable_by_key(forget, |(missing, _)| *missing);
            for (_, key) in &by_missing[..forget] {
                self.buckets.remove(key);
            }
        }
        self.sweep_at_len = (self.buckets.len() * 2)
            .max(MIN_SWEEP_LEN)
            .min(shard_capacity + 1);
        over
    }
}

impl Store for MemoryStore {
    fn take(&self, key: ClientKey, limit: Limit) -> StoreFuture<'_, Decision> {
        let decision = self.take_now(&key, &limit);
        Box::pin(std::future::ready(Ok(decision)))
    }

    fn check_ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::LimitSpec;
    use std::net::Ipv4Addr;

    fn key(n: u32) -> ClientKey {
        ClientKey::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn clients_have_separate_buckets() {
        let store = MemoryStore::default();
        let limit = Limit::parse(LimitSpec {
            rate: 1,
            window_s: 60,
            burst: 1,
        })
        .unwrap();
        assert!(store.take_at(&key(1), &limit, 0).allowed);
        assert!(!store.take_at(&key(1), &limit, 1).allowed);
        assert!(store.take_at(&key(2), &limit, 1).allowed);
    }

    #[test]
    fn buckets_that_have_refilled_are_dropped() {
        let store = MemoryStore::new(usize::MAX / 2);
        let limit = Limit::parse(LimitSpec {
            rate: 10,
            window_s: 1,
            burst: 10,
        })
        .unwrap();
        let old_clients = (SHARDS * MIN_SWEEP_LEN) as u32;
        for n in 0..old_clients {
            store.take_at(&key(n), &limit, 0);
        }
        // One second later every old bucket is full; new traffic sweeps every shard.
        for n in 0..old_clients * 4 {
            store.take_at(&key(n + 10_000_000), &limit, 1_000_000);
        }
        let old_still_held = (0..old_clients).filter(|n| store.holds(&key(*n))).count();
        assert_eq!(old_still_held, 0);
    }

    #[test]
    fn buckets_still_refilling_are_kept() {
        let store = MemoryStore::default();
        let limit = Limit::parse(LimitSpec {
            rate: 1,
            window_s: 3600,
            burst: 1,
        })
        .unwrap();
        store.take_at(&key(7), &limit, 0);
        for n in 0..(SHARDS * MIN_SWEEP_LEN * 2) as u32 {
            store.take_at(&key(n + 100), &limit, 1);
        }
        assert!(!store.take_at(&key(7), &limit, 2).allowed);
    }

    #[test]
    fn the_store_never_holds_more_than_its_capacity() {
        let store = MemoryStore::new(SHARDS * 16);
        let limit = Limit::parse(LimitSpec {
            rate: 10,
            window_s: 3600,
            burst: 10,
        })
        .unwrap();
        for n in 0..(SHARDS * 16 * 10) as u32 {
            store.take_at(&key(n), &limit, u64::from(n));
            assert!(store.len() <= SHARDS * 16, "{} buckets", store.len());
        }
    }

    #[test]
    fn a_full_store_forgets_the_buckets_closest_to_full_first() {
        let store = MemoryStore::new(SHARDS * 16);
        let limit = Limit::parse(LimitSpec {
            rate: 10,
            window_s: 3600,
            burst: 10,
        })
        .unwrap();
        let drained = key(u32::MAX);
        for _ in 0..10 {
            assert!(store.take_at(&drained, &limit, 0).allowed);
        }
        // Each of these clients misses one token; the drained one misses ten.
        for n in 0..(SHARDS * 16 * 10) as u32 {
            store.take_at(&key(n), &limit, 1);
        }
        assert!(store.holds(&drained));
        assert!(!store.take_at(&drained, &limit, 2).allowed);
    }
}
