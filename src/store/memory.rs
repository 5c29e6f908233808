//! Buckets kept in this process: the embedded store when no Redis is configured, and the
//! local fallback when Redis cannot decide.
//!
//! Limits are then per instance, not shared. Memory stays bounded by dropping buckets
//! that have refilled completely: a missing bucket is a full one, so nothing is lost.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::Instant;

use super::{Store, StoreFuture};
use crate::identity::ClientKey;
use crate::limiter::{BucketState, Decision, Policy, bucket};

/// Enough shards that worker threads rarely wait on one another.
const SHARDS: usize = 64;
/// A shard is swept for full buckets whenever it has grown past this many since the last sweep.
const MIN_SWEEP_LEN: usize = 1024;

pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Buckets measure time from here; a monotonic clock cannot jump.
    epoch: Instant,
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<ClientKey, BucketState>,
    sweep_at_len: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    buckets: HashMap::new(),
                    sweep_at_len: MIN_SWEEP_LEN,
                })
            })
            .collect();
        Self {
            shards,
            hasher: RandomState::new(),
            epoch: Instant::now(),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// [`Store::take`] at an explicit time, so tests can drive the clock.
    pub fn take_at(&self, key: &ClientKey, policy: &Policy, now_us: u64) -> Decision {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        // A poisoned shard only means another thread panicked mid-update of plain data;
        // the map is still consistent, so keep serving.
        let mut shard = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = shard.buckets.get(key).copied();
        let (decision, new_state) = bucket::take(policy, state, now_us);
        if let Some(new_state) = new_state {
            shard.buckets.insert(*key, new_state);
            if shard.buckets.len() >= shard.sweep_at_len {
                shard.sweep(policy, now_us);
            }
        }
        decision
    }

    /// Takes a token now, on this store's clock.
    pub fn take_now(&self, key: &ClientKey, policy: &Policy) -> Decision {
        self.take_at(key, policy, self.now_us())
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
    fn sweep(&mut self, policy: &Policy, now_us: u64) {
        let capacity = policy.capacity_units();
        self.buckets
            .retain(|_, state| bucket::refill(policy, Some(*state), now_us) < capacity);
        self.sweep_at_len = (self.buckets.len() * 2).max(MIN_SWEEP_LEN);
    }
}

impl Store for MemoryStore {
    fn take(&self, key: ClientKey, policy: Policy) -> StoreFuture<'_, Decision> {
        let decision = self.take_now(&key, &policy);
        Box::pin(std::future::ready(Ok(decision)))
    }

    fn check_ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key(n: u32) -> ClientKey {
        ClientKey::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn clients_have_separate_buckets() {
        let store = MemoryStore::new();
        let policy = Policy::parse(1, 60, 1).unwrap();
        assert!(store.take_at(&key(1), &policy, 0).allowed);
        assert!(!store.take_at(&key(1), &policy, 1).allowed);
        assert!(store.take_at(&key(2), &policy, 1).allowed);
    }

    #[test]
    fn buckets_that_have_refilled_are_dropped() {
        let store = MemoryStore::new();
        let policy = Policy::parse(10, 1, 10).unwrap();
        let old_clients = (SHARDS * MIN_SWEEP_LEN) as u32;
        for n in 0..old_clients {
            store.take_at(&key(n), &policy, 0);
        }
        // One second later every old bucket is full; new traffic sweeps every shard.
        for n in 0..old_clients * 4 {
            store.take_at(&key(n + 10_000_000), &policy, 1_000_000);
        }
        let old_still_held = (0..old_clients).filter(|n| store.holds(&key(*n))).count();
        assert_eq!(old_still_held, 0);
    }

    #[test]
    fn buckets_still_refilling_are_kept() {
        let store = MemoryStore::new();
        let policy = Policy::parse(1, 3600, 1).unwrap();
        store.take_at(&key(7), &policy, 0);
        for n in 0..(SHARDS * MIN_SWEEP_LEN * 2) as u32 {
            store.take_at(&key(n + 100), &policy, 1);
        }
        assert!(!store.take_at(&key(7), &policy, 2).allowed);
    }
}
