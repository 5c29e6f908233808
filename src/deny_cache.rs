//! An exact local cache of denials.
//!
//! When Redis answers "no token until t" for a key, this instance answers that key with
//! 429 until t without asking again. That is exact, not approximate: a bucket only gains
//! tokens with time, and other instances can only take them, so Redis could not say yes
//! before t either. The deadline is measured from when the question was *sent*, which is
//! no later than when Redis answered it, so the cache never outlasts the real denial.

use std::time::Instant;

use quick_cache::sync::Cache;

use crate::bucket::Decision;
use crate::identity::ClientKey;

#[derive(Debug, Clone, Copy)]
struct Denial {
    /// No token before this (µs since `epoch`).
    until_us: u64,
    /// The bucket is full again at this (µs since `epoch`), for `X-RateLimit-Reset`.
    full_at_us: u64,
}

pub struct DenyCache {
    /// Bounded: the least recently useful entries are evicted first.
    entries: Cache<ClientKey, Denial>,
    epoch: Instant,
}

impl DenyCache {
    /// A cache of at most `capacity` keys, or none when `capacity` is 0 (`DENY_CACHE_SIZE=0`).
    pub fn new(capacity: usize) -> Option<Self> {
        (capacity > 0).then(|| Self {
            entries: Cache::new(capacity),
            epoch: Instant::now(),
        })
    }

    pub fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The cached denial of `key` at `now_us`, if one still holds.
    pub fn lookup_at(&self, key: &ClientKey, now_us: u64) -> Option<Decision> {
        let denial = self.entries.get(key)?;
        if now_us >= denial.until_us {
            self.entries.remove(key);
            return None;
        }
        Some(Decision {
            allowed: false,
            remaining: 0,
            next_token_us: denial.until_us - now_us,
            full_after_us: denial.full_at_us.saturating_sub(now_us),
        })
    }

    /// Remembers a denial that the store gave to a question sent at `asked_at_us`.
    pub fn remember_at(&self, key: &ClientKey, asked_at_us: u64, decision: &Decision) {
        if decision.allowed || decision.next_token_us == 0 {
            return;
        }
        self.entries.insert(
            *key,
            Denial {
                until_us: asked_at_us.saturating_add(decision.next_token_us),
                full_at_us: asked_at_us.saturating_add(decision.full_after_us),
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{self, Limit, LimitSpec};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn key(n: u32) -> ClientKey {
        ClientKey::V4(Ipv4Addr::from(n))
    }

    fn denial(next_token_us: u64) -> Decision {
        Decision {
            allowed: false,
            remaining: 0,
            next_token_us,
            full_after_us: next_token_us * 10,
        }
    }

    #[test]
    fn a_size_of_zero_turns_the_cache_off() {
        assert!(DenyCache::new(0).is_none());
    }

    #[test]
    fn a_denial_is_answered_locally_until_the_next_token_and_not_after() {
        let cache = DenyCache::new(10).unwrap();
        cache.remember_at(&key(1), 1_000, &denial(6_000_000));
        let cached = cache.lookup_at(&key(1), 2_000).unwrap();
        assert!(!cached.allowed);
        assert_eq!(cached.next_token_us, 6_000_000 - 1_000);
        assert_eq!(cached.full_after_us, 60_000_000 - 1_000);
        assert!(cache.lookup_at(&key(1), 6_000_999).is_some());
        assert!(cache.lookup_at(&key(1), 6_001_000).is_none());
        assert!(cache.lookup_at(&key(2), 2_000).is_none());
    }

    #[test]
    fn admissions_are_never_cached() {
        let cache = DenyCache::new(10).unwrap();
        let admitted = Decision {
            allowed: true,
            ..denial(5)
        };
        cache.remember_at(&key(1), 0, &admitted);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_cache_holds_no_more_than_its_capacity() {
        let cache = DenyCache::new(100).unwrap();
        for n in 0..10_000 {
            cache.remember_at(&key(n), 0, &denial(1_000_000));
        }
        assert!(cache.len() <= 100, "{} entries", cache.len());
    }

    proptest! {
        /// A flood through the cache admits exactly what the bucket alone admits, with the
        /// store answering at an arbitrary delay after each question was sent.
        #[test]
        fn a_flood_is_admitted_exactly_as_without_the_cache(
            rate in 1u64..50,
            window_s in 1u64..20,
            burst in 1u64..20,
            gap in 1u64..200_000,
            delay in 0u64..5_000,
            steps in 1usize..2_000,
        ) {
            let limit = Limit::parse(LimitSpec { rate, window_s, burst }).unwrap();
            let cache = DenyCache::new(16).unwrap();
            let k = key(7);
            let (mut with_cache, mut without) = (None, None);
            let (mut admitted_with, mut admitted_without) = (0, 0);
            for i in 0..steps as u64 {
                let sent = i * gap;
                let (plain, new_state) = bucket::take(&limit, without, sent + delay);
                without = new_state.or(without);
                admitted_without += u64::from(plain.allowed);

                if cache.lookup_at(&k, sent).is_some() {
                    continue;
                }
                let (decision, new_state) = bucket::take(&limit, with_cache, sent + delay);
                with_cache = new_state.or(with_cache);
                admitted_with += u64::from(decision.allowed);
                cache.remember_at(&k, sent, &decision);
            }
            prop_assert_eq!(admitted_with, admitted_without);
        }
    }
}
