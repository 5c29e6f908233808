//! Buckets kept in this process: the embedded store when no Redis is configured, and the
//! local fallback when Redis cannot decide.
//!
//! A request over several buckets is decided under the locks of all their shards at once
//! (taken in shard order, so two requests never wait on each other in a circle): the same
//! all-or-nothing step the Lua script is in Redis. Like the script, it writes only the
//! buckets that paid: a denial, or a charge of 0 tokens (a read), stores nothing.
//!
//! Hits given back ([`MemoryStore::give_back_at`]) are added to their buckets under the
//! same locks, never past full, as `refund.lua` adds them in Redis.
//!
//! Limits are then per instance, not shared. Buckets that have refilled completely are
//! dropped, which loses nothing: a missing bucket is a full one. When more clients than
//! `max_buckets` are still refilling at once, the store forgets the buckets closest to
//! full: a forgotten client regains only the few tokens it was missing, the least
//! loosening any eviction can cause, and memory stays bounded whatever the traffic.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::{KeyedCharge, Store, StoreFuture};
use crate::bucket::{self, BucketState, Charge, Level, Limit, Paid, Taken};

/// Enough shards that worker threads rarely wait on one another.
const SHARDS: usize = 64;
/// A shard is swept for full buckets whenever it has grown past this many since the last sweep.
const MIN_SWEEP_LEN: usize = 1024;
/// `MEMORY_STORE_MAX_BUCKETS` when not set: about 20 MiB of buckets.
pub const DEFAULT_MAX_BUCKETS: usize = 200_000;

pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// Two independent hashes of a bucket's name make its 128-bit key here: names are long
    /// strings, and 16 bytes a bucket is what memory can afford.
    hashers: [RandomState; 2],
    /// Buckets measure time from here; a monotonic clock cannot jump.
    epoch: Instant,
    /// Most buckets one shard holds; `max_buckets` spread over the shards.
    shard_capacity: usize,
    /// Evicting means the limit is looser than configured, so it is logged, once.
    evicted: AtomicBool,
}

/// A bucket's 128-bit key (see [`MemoryStore::hashers`]).
type Key = u128;

/// A bucket and what it needs to be swept: how full is full, and how fast it refills.
#[derive(Debug, Clone, Copy)]
struct Held {
    state: BucketState,
    capacity_units: u64,
    refill_units_per_us: u64,
}

impl Held {
    /// Units still missing at `now_us`: 0 means the bucket is full and can be forgotten.
    fn missing(&self, now_us: u64) -> u64 {
        let elapsed = now_us.saturating_sub(self.state.updated_us);
        let gained = u128::from(elapsed) * u128::from(self.refill_units_per_us);
        let missing = self.capacity_units.saturating_sub(self.state.tokens);
        u64::try_from(u128::from(missing).saturating_sub(gained)).unwrap_or(0)
    }
}

struct Shard {
    buckets: HashMap<Key, Held>,
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
            hashers: [RandomState::new(), RandomState::new()],
            epoch: Instant::now(),
            shard_capacity,
            evicted: AtomicBool::new(false),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn key(&self, key: &str, field: &str) -> Key {
        let [high, low] = &self.hashers;
        let name = (key, field);
        (u128::from(high.hash_one(name)) << 64) | u128::from(low.hash_one(name))
    }

    fn shard_of(key: Key) -> usize {
        (key % SHARDS as u128) as usize
    }

    /// [`Store::take`] at an explicit time, so tests can drive the clock.
    pub fn take_all_at(&self, charges: &[KeyedCharge], now_us: u64) -> Taken {
        let keys: Vec<Key> = charges.iter().map(|c| self.key(&c.key, &c.field)).collect();
        let mut shard_ids: Vec<usize> = keys.iter().map(|k| Self::shard_of(*k)).collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        // A poisoned shard only means another thread panicked mid-update of plain data;
        // the map is still consistent, so keep serving.
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> = shard_ids
            .iter()
            .map(|&id| {
                let guard = self.shards[id]
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                (id, guard)
            })
            .collect();
        let bucket_charges: Vec<Charge> = charges.iter().map(|c| c.charge).collect();
        let states: Vec<Option<BucketState>> = keys
            .iter()
            .map(|key| {
                locked(&mut guards, *key)
                    .buckets
                    .get(key)
                    .map(|held| held.state)
            })
            .collect();
        let (taken, writes) = bucket::take_all(&bucket_charges, &states, now_us);
        let mut evicted = false;
        for ((key, charge), write) in keys.iter().zip(&bucket_charges).zip(&writes.0) {
            let Some(state) = write else { continue };
            let shard = locked(&mut guards, *key);
            shard.buckets.insert(
                *key,
                Held {
                    state: *state,
                    capacity_units: charge.limit.capacity_units(),
                    refill_units_per_us: charge.limit.refill_units_per_us(),
                },
            );
            if shard.buckets.len() >= shard.sweep_at_len {
                evicted |= shard.shrink(now_us, self.shard_capacity);
            }
        }
        if evicted && !self.evicted.swap(true, Ordering::Relaxed) {
            log::warn!(
                "memory store full: more than {} clients are refilling at once, so the buckets closest to full are forgotten (their clients regain those tokens early); raise MEMORY_STORE_MAX_BUCKETS",
                self.shard_capacity * SHARDS
            );
        }
        taken
    }

    /// [`Store::give_back`] at an explicit time: each charge's cost given back to its
    /// bucket, never past full.
    pub fn give_back_at(&self, charges: &[KeyedCharge], now_us: u64) -> Vec<Level> {
        let mut levels = Vec::with_capacity(charges.len());
        for keyed in charges {
            let key = self.key(&keyed.key, &keyed.field);
            let limit = &keyed.charge.limit;
            let mut shard = self.shards[Self::shard_of(key)]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let state = shard.buckets.get(&key).map(|held| held.state);
            let given = bucket::refund(limit, state, keyed.charge.cost, Paid::Unknown, now_us);
            if let Some(state) = given.write {
                shard.buckets.insert(
                    key,
                    Held {
                        state,
                        capacity_units: limit.capacity_units(),
                        refill_units_per_us: limit.refill_units_per_us(),
                    },
                );
            }
            levels.push(Level::from_units(limit, true, given.units, 0));
        }
        levels
    }

    /// [`MemoryStore::give_back_at`] now, on this store's clock.
    pub fn give_back_now(&self, charges: &[KeyedCharge]) -> Vec<Level> {
        self.give_back_at(charges, self.now_us())
    }

    /// Decides now, on this store's clock.
    pub fn take_all_now(&self, charges: &[KeyedCharge]) -> Taken {
        self.take_all_at(charges, self.now_us())
    }

    /// One token from the bucket `key` under `limit`, at `now_us`.
    pub fn take_at(&self, key: &str, limit: &Limit, now_us: u64) -> Level {
        let charge = KeyedCharge {
            key: key.into(),
            field: "".into(),
            charge: Charge::one(*limit),
        };
        self.take_all_at(std::slice::from_ref(&charge), now_us)
            .levels[0]
    }

    /// Forgets the buckets of `buckets` (by key and field), so they are full again.
    pub fn remove(&self, buckets: &[KeyedCharge]) {
        for bucket in buckets {
            let key = self.key(&bucket.key, &bucket.field);
            self.shards[Self::shard_of(key)]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .buckets
                .remove(&key);
        }
    }

    /// What the store holds for one bucket; `None` for a bucket it has never written (or
    /// has dropped), which is a full one.
    pub fn state(&self, key: &str, field: &str) -> Option<BucketState> {
        let key = self.key(key, field);
        let shard = self.shards[Self::shard_of(key)]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        shard.buckets.get(&key).map(|held| held.state)
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
    fn holds(&self, name: &str) -> bool {
        let key = self.key(name, "");
        let shard = &self.shards[Self::shard_of(key)];
        shard.lock().unwrap().buckets.contains_key(&key)
    }
}

/// The shard of `key` among the locked ones.
fn locked<'g>(guards: &'g mut [(usize, MutexGuard<'_, Shard>)], key: Key) -> &'g mut Shard {
    let id = MemoryStore::shard_of(key);
    let at = guards
        .iter()
        .position(|(held, _)| *held == id)
        .unwrap_or_else(|| unreachable!("every key's shard is locked"));
    &mut guards[at].1
}

impl Shard {
    /// Drops the buckets that are full again; if the shard still holds more than
    /// `shard_capacity`, forgets those closest to full down to 7/8 of it, so the cost of a
    /// pass is shared by the next eighth of inserts. Says whether it had to forget any.
    fn shrink(&mut self, now_us: u64, shard_capacity: usize) -> bool {
        self.buckets.retain(|_, held| held.missing(now_us) > 0);
        let over = self.buckets.len() > shard_capacity;
        if over {
            let keep = shard_capacity - shard_capacity / 8;
            let mut by_missing: Vec<(u64, Key)> = self
                .buckets
                .iter()
                .map(|(key, held)| (held.missing(now_us), *key))
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
    fn take<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Taken> {
        Box::pin(std::future::ready(Ok(self.take_all_now(charges))))
    }

    /// Forgets the buckets named (this store has no hashes: each bucket is kept on its own,
    /// so only the fields given are forgotten).
    fn reset<'a>(&'a self, buckets: &'a [KeyedCharge]) -> StoreFuture<'a, ()> {
        self.remove(buckets);
        Box::pin(std::future::ready(Ok(())))
    }

    fn give_back<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Vec<Level>> {
        Box::pin(std::future::ready(Ok(self.give_back_now(charges))))
    }

    fn check_ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> String {
        format!("client-{n}")
    }

    #[test]
    fn clients_have_separate_buckets() {
        let store = MemoryStore::default();
        let limit = Limit::per(1, 60, 1).unwrap();
        assert!(store.take_at(&key(1), &limit, 0).allowed);
        assert!(!store.take_at(&key(1), &limit, 1).allowed);
        assert!(store.take_at(&key(2), &limit, 1).allowed);
    }

    #[test]
    fn a_charge_of_zero_tokens_stores_nothing() {
        let store = MemoryStore::default();
        let limit = Limit::per(1, 60, 2).unwrap();
        let read = |name: &str| KeyedCharge {
            key: name.into(),
            field: "".into(),
            charge: Charge {
                cost: 0,
                ..Charge::one(limit)
            },
        };
        let fresh = store.take_all_at(&[read("fresh")], 0);
        assert_eq!(fresh.levels[0].remaining, 2);
        assert!(store.is_empty(), "a read made a bucket");
        store.take_at("spent", &limit, 0);
        let before = store.state("spent", "");
        let found = store.take_all_at(&[read("spent")], 30_000_000);
        assert!(found.admitted);
        assert_eq!(found.levels[0].remaining, 1);
        assert_eq!(store.state("spent", ""), before);
    }

    #[test]
    fn a_removed_bucket_is_full_again_and_its_neighbours_are_kept() {
        let store = MemoryStore::default();
        let limit = Limit::per(1, 60, 1).unwrap();
        store.take_at(&key(1), &limit, 0);
        store.take_at(&key(2), &limit, 0);
        let bucket = KeyedCharge {
            key: key(1).into(),
            field: "".into(),
            charge: Charge::one(limit),
        };
        store.remove(std::slice::from_ref(&bucket));
        assert!(store.take_at(&key(1), &limit, 1).allowed);
        assert!(!store.take_at(&key(2), &limit, 1).allowed);
    }

    #[test]
    fn buckets_that_have_refilled_are_dropped() {
        let store = MemoryStore::new(usize::MAX / 2);
        let limit = Limit::per(10, 1, 10).unwrap();
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
        let limit = Limit::per(1, 3600, 1).unwrap();
        store.take_at(&key(7), &limit, 0);
        for n in 0..(SHARDS * MIN_SWEEP_LEN * 2) as u32 {
            store.take_at(&key(n + 100), &limit, 1);
        }
        assert!(!store.take_at(&key(7), &limit, 2).allowed);
    }

    #[test]
    fn the_store_never_holds_more_than_its_capacity() {
        let store = MemoryStore::new(SHARDS * 16);
        let limit = Limit::per(10, 3600, 10).unwrap();
        for n in 0..(SHARDS * 16 * 10) as u32 {
            store.take_at(&key(n), &limit, u64::from(n));
            assert!(store.len() <= SHARDS * 16, "{} buckets", store.len());
        }
    }

    #[test]
    fn a_full_store_forgets_the_buckets_closest_to_full_first() {
        let store = MemoryStore::new(SHARDS * 16);
        let limit = Limit::per(10, 3600, 10).unwrap();
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
