//! An exact local cache of denials.
//!
//! When Redis denies a request because some enforced limit lacks tokens until t, this
//! instance answers the same request (the same buckets at the same costs) with 429 until
//! t without asking again. That is exact, not approximate: a bucket only gains tokens
//! with time, and other instances can only take them, so Redis could not say yes before
//! t either. With several limits, t is when the *last* limit that lacked tokens has them:
//! until then at least one still lacks them, and all or nothing means no. The deadline is
//! measured from when the question was *sent*, which is no later than when Redis answered
//! it, so the cache never outlasts the real denial.
//!
//! The one thing that gives tokens back early is a reset (`DELETE /v1/buckets/…`): the
//! instance that resets clears its whole cache ([`DenyCache::clear`]), and an answer to a
//! question sent before that is not cached afterwards. Other instances cannot know, and
//! keep answering a denial they cached until its retry-after passes.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use quick_cache::sync::Cache;

use crate::bucket::{Group, Level, Taken};
use crate::store::KeyedCharge;

/// One bucket's figures in a cached denial, as deadlines on the cache's clock.
#[derive(Debug, Clone, Copy)]
struct Figures {
    allowed: bool,
    remaining: u64,
    next_token_at_us: u64,
    full_at_us: u64,
    retry_at_us: u64,
}

#[derive(Debug, Clone)]
struct Denial {
    /// No admission before this (µs since `epoch`).
    until_us: u64,
    buckets: Box<[Figures]>,
}

/// What identifies one request's question: its buckets, costs and groups.
pub type Fingerprint = u128;

pub struct DenyCache {
    /// Bounded: the least recently useful entries are evicted first.
    entries: Cache<Fingerprint, Denial>,
    /// Two independent hashes make a 128-bit fingerprint, so two different questions
    /// never share an answer in practice.
    hashers: [RandomState; 2],
    epoch: Instant,
    /// Answers to questions sent before this (µs since `epoch`) are not cached: the
    /// buckets may have been reset since.
    cleared_at_us: AtomicU64,
}

impl DenyCache {
    /// A cache of at most `capacity` entries, or none when `capacity` is 0
    /// (`DENY_CACHE_SIZE=0`).
    pub fn new(capacity: usize) -> Option<Self> {
        (capacity > 0).then(|| Self {
            entries: Cache::new(capacity),
            hashers: [RandomState::new(), RandomState::new()],
            epoch: Instant::now(),
            cleared_at_us: AtomicU64::new(0),
        })
    }

    pub fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn fingerprint(&self, charges: &[KeyedCharge]) -> Fingerprint {
        let [high, low] = &self.hashers;
        (u128::from(high.hash_one(charges)) << 64) | u128::from(low.hash_one(charges))
    }

    /// The cached denial of the question `fingerprint` at `now_us`, if one still holds.
    pub fn lookup_at(&self, fingerprint: Fingerprint, now_us: u64) -> Option<Vec<Level>> {
        let denial = self.entries.get(&fingerprint)?;
        if now_us >= denial.until_us {
            self.entries.remove(&fingerprint);
            return None;
        }
        let after = |at_us: u64| at_us.saturating_sub(now_us);
        Some(
            denial
                .buckets
                .iter()
                .map(|figures| Level {
                    allowed: figures.allowed && figures.retry_at_us <= now_us,
                    remaining: figures.remaining,
                    next_token_us: after(figures.next_token_at_us),
                    full_after_us: after(figures.full_at_us),
                    retry_after_us: after(figures.retry_at_us),
                })
                .collect(),
        )
    }

    /// Remembers a denial that the store gave to `charges`, asked at `asked_at_us`.
    pub fn remember_at(
        &self,
        fingerprint: Fingerprint,
        asked_at_us: u64,
        charges: &[KeyedCharge],
        outcome: &Taken,
    ) {
        if outcome.admitted || asked_at_us < self.cleared_at_us.load(Ordering::Acquire) {
            return;
        }
        let lacking = charges
            .iter()
            .zip(&outcome.levels)
            .filter(|(keyed, decision)| keyed.charge.group == Group::Enforced && !decision.allowed)
            .map(|(_, decision)| decision.retry_after_us)
            .max()
            .unwrap_or(0);
        if lacking == 0 {
            return;
        }
        let at = |after_us: u64| asked_at_us.saturating_add(after_us);
        let buckets = outcome
            .levels
            .iter()
            .map(|decision| Figures {
                allowed: decision.allowed,
                remaining: decision.remaining,
                next_token_at_us: at(decision.next_token_us),
                full_at_us: at(decision.full_after_us),
                retry_at_us: at(decision.retry_after_us),
            })
            .collect();
        self.entries.insert(
            fingerprint,
            Denial {
                until_us: at(lacking),
                buckets,
            },
        );
    }

    /// Forgets every denial, for after a reset of some buckets: the cache is keyed by
    /// fingerprints, which do not say which buckets they cover, and resets are rare.
    pub fn clear(&self) {
        self.clear_at(self.now_us());
    }

    /// [`DenyCache::clear`] at an explicit time: answers to questions sent before
    /// `now_us` are not remembered after it either.
    pub fn clear_at(&self, now_us: u64) {
        // First the mark, then the entries: a denial remembered in between is either
        // refused by the mark or removed with the rest.
        self.cleared_at_us.fetch_max(now_us, Ordering::AcqRel);
        self.entries.clear();
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
    use crate::bucket::{self, BucketState, Charge, Limit};
    use proptest::prelude::*;

    fn charges(name: &str, limits: &[Limit]) -> Vec<KeyedCharge> {
        limits
            .iter()
            .enumerate()
            .map(|(i, limit)| KeyedCharge {
                key: name.into(),
                field: i.to_string().into(),
                charge: Charge::one(*limit),
            })
            .collect()
    }

    fn denial(retry_after_us: u64) -> Taken {
        Taken {
            admitted: false,
            levels: vec![Level {
                allowed: false,
                remaining: 0,
                next_token_us: retry_after_us,
                full_after_us: retry_after_us * 10,
                retry_after_us,
            }],
        }
    }

    #[test]
    fn a_size_of_zero_turns_the_cache_off() {
        assert!(DenyCache::new(0).is_none());
    }

    #[test]
    fn a_denial_is_answered_locally_until_the_next_token_and_not_after() {
        let cache = DenyCache::new(10).unwrap();
        let one = charges("a", &[Limit::per(10, 60, 10).unwrap()]);
        let other = charges("b", &[Limit::per(10, 60, 10).unwrap()]);
        let key = cache.fingerprint(&one);
        cache.remember_at(key, 1_000, &one, &denial(6_000_000));
        let cached = cache.lookup_at(key, 2_000).unwrap();
        assert!(!cached[0].allowed);
        assert_eq!(cached[0].retry_after_us, 6_000_000 - 1_000);
        assert_eq!(cached[0].full_after_us, 60_000_000 - 1_000);
        assert!(cache.lookup_at(key, 6_000_999).is_some());
        assert!(cache.lookup_at(key, 6_001_000).is_none());
        assert!(cache.lookup_at(cache.fingerprint(&other), 2_000).is_none());
    }

    #[test]
    fn admissions_are_never_cached() {
        let cache = DenyCache::new(10).unwrap();
        let one = charges("a", &[Limit::per(10, 60, 10).unwrap()]);
        let mut admitted = denial(5);
        admitted.admitted = true;
        cache.remember_at(cache.fingerprint(&one), 0, &one, &admitted);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_same_buckets_at_another_cost_are_another_question() {
        let cache = DenyCache::new(10).unwrap();
        let one = charges("a", &[Limit::per(10, 60, 10).unwrap()]);
        let mut costly = one.clone();
        costly[0].charge.cost = 5;
        assert_ne!(cache.fingerprint(&one), cache.fingerprint(&costly));
    }

    #[test]
    fn with_several_limits_the_denial_lasts_until_the_last_lacking_one_recovers() {
        let cache = DenyCache::new(10).unwrap();
        let both = charges(
            "a",
            &[
                Limit::per(10, 60, 10).unwrap(),
                Limit::per(15, 3600, 15).unwrap(),
            ],
        );
        let lacking = |retry_after_us| Level {
            allowed: false,
            remaining: 0,
            next_token_us: retry_after_us,
            full_after_us: retry_after_us,
            retry_after_us,
        };
        let outcome = Taken {
            admitted: false,
            levels: vec![lacking(6_000_000), lacking(240_000_000)],
        };
        let key = cache.fingerprint(&both);
        cache.remember_at(key, 0, &both, &outcome);
        assert!(cache.lookup_at(key, 239_999_999).is_some());
        assert!(cache.lookup_at(key, 240_000_000).is_none());
    }

    #[test]
    fn a_clear_forgets_every_denial_and_refuses_answers_to_questions_sent_before_it() {
        let cache = DenyCache::new(10).unwrap();
        let one = charges("a", &[Limit::per(10, 60, 10).unwrap()]);
        let key = cache.fingerprint(&one);
        cache.remember_at(key, 1_000, &one, &denial(6_000_000));
        cache.clear_at(2_000);
        assert!(cache.lookup_at(key, 2_001).is_none());
        // Sent before the reset, answered after it: the bucket may be full now.
        cache.remember_at(key, 1_500, &one, &denial(6_000_000));
        assert!(cache.is_empty());
        cache.remember_at(key, 2_000, &one, &denial(6_000_000));
        assert!(cache.lookup_at(key, 2_001).is_some());
    }

    #[test]
    fn the_cache_holds_no_more_than_its_capacity() {
        let cache = DenyCache::new(100).unwrap();
        for n in 0..10_000 {
            let one = charges(&n.to_string(), &[Limit::per(1, 60, 1).unwrap()]);
            cache.remember_at(cache.fingerprint(&one), 0, &one, &denial(1_000_000));
        }
        assert!(cache.len() <= 100, "{} entries", cache.len());
    }

    proptest! {
        /// A flood through the cache admits exactly what the buckets alone admit, over two
        /// limits, with the store answering at an arbitrary delay after each question was
        /// sent.
        #[test]
        fn a_flood_is_admitted_exactly_as_without_the_cache(
            rate in 1u64..50,
            window_s in 1u64..20,
            burst in 1u64..20,
            day_rate in 1u64..80,
            gap in 1u64..200_000,
            delay in 0u64..5_000,
            steps in 1usize..2_000,
        ) {
            let limits = [Limit::per(rate, window_s, burst).unwrap(), Limit::per(day_rate, 60, day_rate).unwrap()];
            let question = charges("k", &limits);
            let bucket_charges: Vec<Charge> = question.iter().map(|c| c.charge).collect();
            let cache = DenyCache::new(16).unwrap();
            let key = cache.fingerprint(&question);
            let mut with_cache: Vec<Option<BucketState>> = vec![None, None];
            let mut without: Vec<Option<BucketState>> = vec![None, None];
            let (mut admitted_with, mut admitted_without) = (0, 0);
            for i in 0..steps as u64 {
                let sent = i * gap;
                let (plain, plain_writes) = bucket::take_all(&bucket_charges, &without, sent + delay);
                plain_writes.apply_to(&mut without);
                admitted_without += u64::from(plain.admitted);

                if cache.lookup_at(key, sent).is_some() {
                    continue;
                }
                let (taken, taken_writes) = bucket::take_all(&bucket_charges, &with_cache, sent + delay);
                taken_writes.apply_to(&mut with_cache);
                admitted_with += u64::from(taken.admitted);
                let outcome = Taken { admitted: taken.admitted, levels: taken.levels };
                cache.remember_at(key, sent, &question, &outcome);
            }
            prop_assert_eq!(admitted_with, admitted_without);
        }
    }
}
