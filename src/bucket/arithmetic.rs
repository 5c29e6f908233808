//! The token bucket, as pure arithmetic: states in, time in, decisions and new states out.
//! One job; most of the file is its tests, properties over every order of requests.
//!
//! A request may draw on several buckets at once (several limits of one policy, several
//! policies). [`take_all`] decides them all or nothing; `token_bucket.lua` mirrors it line
//! by line for Redis, and the parity tests run one table of cases against both.

use super::limit::Limit;

/// What a bucket remembers between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    /// Units held at `updated_us` (see [`Limit`] for units).
    pub tokens: u64,
    /// When `tokens` was last written, in µs on the deciding clock.
    pub updated_us: u64,
}

/// Which buckets are paid together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// Every enforced bucket of a request: all of them pay, or none.
    Enforced,
    /// The buckets of one shadow policy: they pay together when the request is admitted
    /// and they all have the tokens, and never change what an enforced bucket decides.
    Shadow(u32),
}

/// One bucket a request draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Charge {
    pub limit: Limit,
    /// Tokens this request costs here.
    pub cost: u64,
    pub group: Group,
}

impl Charge {
    /// One token from an enforced bucket: the shape of every request before policies.
    pub fn one(limit: Limit) -> Self {
        Self {
            limit,
            cost: 1,
            group: Group::Enforced,
        }
    }
}

/// One bucket's answer, and what the client may be told about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// Whether this bucket had the tokens. The request is admitted when every enforced
    /// bucket had them ([`Taken::admitted`]).
    pub allowed: bool,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Until the next whole token is in the bucket (0 when it is full).
    pub next_token_us: u64,
    /// Until the bucket is full again, which is also when forgetting it loses nothing.
    pub full_after_us: u64,
    /// For a bucket that lacked the tokens: until it has them (0 otherwise). Exactly when
    /// a retry can succeed here, since tokens only come back with time.
    pub retry_after_us: u64,
}

impl Level {
    /// Derives the client-facing figures from the units a bucket holds after deciding.
    /// Both stores call this, so headers cannot disagree between them.
    pub fn from_units(limit: &Limit, allowed: bool, tokens: u64, cost: u64) -> Self {
        let token = limit.token_units();
        let capacity = limit.capacity_units();
        let tokens = tokens.min(capacity);
        let next_token_us = if tokens >= capacity {
            0
        } else {
            limit.micros_to_gain(token - tokens % token)
        };
        let retry_after_us = if allowed {
            0
        } else {
            // A cost beyond the burst is never there: tell the time until the bucket is full.
            limit.micros_to_gain(limit.units_of(cost).min(capacity).saturating_sub(tokens))
        };
        Self {
            allowed,
            remaining: tokens / token,
            next_token_us,
            full_after_us: limit.micros_to_gain(capacity - tokens),
            retry_after_us,
        }
    }
}

/// The units a bucket holds at `now_us`: a missing bucket is full, and a clock that went
/// backwards (a failover to a node whose clock is behind) refills nothing.
pub fn refill(limit: &Limit, state: Option<BucketState>, now_us: u64) -> u64 {
    let capacity = limit.capacity_units();
    let Some(state) = state else {
        return capacity;
    };
    let elapsed = now_us.saturating_sub(state.updated_us);
    let missing = capacity.saturating_sub(state.tokens);
    let gained = u128::from(elapsed) * u128::from(limit.refill_units_per_us());
    if gained >= u128::from(missing) {
        capacity
    } else {
        state.tokens + gained as u64
    }
}

/// Whether `state` was written at a time still ahead of `now_us`: by a clock ahead of this
/// one, as after a failover to a node whose clock is behind. Such a bucket refills
/// nothing until this clock catches up, so it is written again at `now_us` with the
/// tokens it holds: the time it loses is the skew once, not as long as it keeps denying.
pub fn rebased(state: Option<BucketState>, now_us: u64) -> bool {
    state.is_some_and(|state| state.updated_us > now_us)
}

/// What one request did to its buckets: the answer every store gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// Every enforced bucket had the tokens, and paid them.
    pub admitted: bool,
    /// One per charge, in order.
    pub levels: Vec<Level>,
}

/// One per charge of a [`take_all`]: the state to store, or `None` where the stored one
/// still holds. A bucket that paid nothing (it did not pay, or was charged 0, which only
/// reads) is unchanged: refill is linear, so its old state still describes it exactly (and
/// a missing one is still full), and the store need not write. The exception is a bucket
/// written on a clock ahead of this one (see [`rebased`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writes(pub Vec<Option<BucketState>>);

impl Writes {
    /// `states` (one per charge) as they are after this decision: the written ones
    /// replaced, the others unchanged.
    pub fn apply_to(&self, states: &mut [Option<BucketState>]) {
        for (state, write) in states.iter_mut().zip(&self.0) {
            *state = write.or(*state);
        }
    }
}

/// Who pays for a request, by the one admission rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Every enforced bucket had the tokens.
    pub admitted: bool,
    /// One per charge: whether it pays.
    pub pays: Vec<bool>,
}

/// The admission rule, said once for every store (`token_bucket.lua` mirrors it, and the
/// parity table holds the two together): a request is admitted only if every enforced
/// bucket had the tokens, and then every enforced bucket pays; a shadow group pays only if
/// the request is admitted and every bucket of the group had the tokens, so a shadow
/// bucket never changes what an enforced one decides. `had(i)` says whether charge `i`'s
/// bucket had its tokens; `group` reads a charge's group.
pub fn settle<C>(
    charges: &[C],
    group: impl Fn(&C) -> Group,
    had: impl Fn(usize) -> bool,
) -> Settlement {
    let group_had = |wanted: Group| {
        charges
            .iter()
            .enumerate()
            .filter(|(_, charge)| group(charge) == wanted)
            .all(|(i, _)| had(i))
    };
    let admitted = group_had(Group::Enforced);
    let pays = charges
        .iter()
        .map(|charge| admitted && group_had(group(charge)))
        .collect();
    Settlement { admitted, pays }
}

/// Decides one request over all its buckets at `now_us`, all or nothing, by [`settle`]'s
/// rule. A bucket charged 0 tokens always has them and is never written: a cost of 0 is a
/// read.
pub fn take_all(
    charges: &[Charge],
    states: &[Option<BucketState>],
    now_us: u64,
) -> (Taken, Writes) {
    let held: Vec<u64> = charges
        .iter()
        .zip(states)
        .map(|(charge, state)| refill(&charge.limit, *state, now_us))
        .collect();
    let has = |i: usize| held[i] >= charges[i].limit.units_of(charges[i].cost);
    let settlement = settle(charges, |charge| charge.group, has);
    let mut levels = Vec::with_capacity(charges.len());
    let mut writes = Vec::with_capacity(charges.len());
    for (i, (charge, pays)) in charges.iter().zip(&settlement.pays).enumerate() {
        let tokens = if *pays {
            held[i] - charge.limit.units_of(charge.cost)
        } else {
            held[i]
        };
        levels.push(Level::from_units(
            &charge.limit,
            has(i),
            tokens,
            charge.cost,
        ));
        let paid = *pays && charge.cost > 0;
        writes.push((paid || rebased(states[i], now_us)).then_some(BucketState {
            tokens,
            updated_us: now_us,
        }));
    }
    let taken = Taken {
        admitted: settlement.admitted,
        levels,
    };
    (taken, Writes(writes))
}

/// Takes one token from one bucket: [`take_all`] for a single enforced charge.
pub fn take(
    limit: &Limit,
    state: Option<BucketState>,
    now_us: u64,
) -> (Level, Option<BucketState>) {
    let (taken, writes) = take_all(&[Charge::one(*limit)], &[state], now_us);
    (taken.levels[0], writes.0[0])
}

#[cfg(test)]
mod tests {
    use super::super::LimitSpec;
    use super::*;
    use proptest::prelude::*;

    const SECOND: u64 = 1_000_000;

    fn default_limit() -> Limit {
        Limit::parse(LimitSpec {
            rate: 10,
            window_s: 60,
            burst: 10,
        })
        .unwrap()
    }

    /// Replays `arrivals` (µs, ascending) through the bucket; returns admitted times.
    fn admitted_at(limit: &Limit, arrivals: &[u64]) -> Vec<u64> {
        let mut state = None;
        let mut admitted = Vec::new();
        for &now in arrivals {
            let (decision, new_state) = take(limit, state, now);
            if decision.allowed {
                admitted.push(now);
            }
            state = new_state.or(state);
        }
        admitted
    }

    #[test]
    fn ten_rapid_requests_pass_and_the_eleventh_waits_six_seconds() {
        let limit = default_limit();
        let mut state = None;
        for i in 0..10 {
            let (decision, new_state) = take(&limit, state, 1_000 + i);
            assert!(decision.allowed, "request {i} should pass");
            state = new_state;
        }
        let (decision, new_state) = take(&limit, state, 1_010);
        assert!(!decision.allowed);
        assert_eq!(new_state, None);
        assert_eq!(decision.remaining, 0);
        assert_eq!(decision.retry_after_us.div_ceil(SECOND), 6);
    }

    #[test]
    fn a_denied_client_is_admitted_exactly_when_told_to_retry() {
        let limit = default_limit();
        let arrivals: Vec<u64> = (0..10).collect();
        let mut state = None;
        for &now in &arrivals {
            state = take(&limit, state, now).1.or(state);
        }
        let (denied, _) = take(&limit, state, 10);
        let retry_at = 10 + denied.retry_after_us;
        assert!(!take(&limit, state, retry_at - 1).0.allowed);
        assert!(take(&limit, state, retry_at).0.allowed);
    }

    #[test]
    fn a_new_client_starts_with_a_full_bucket() {
        let limit = Limit::parse(LimitSpec {
            rate: 10,
            window_s: 60,
            burst: 25,
        })
        .unwrap();
        let (decision, _) = take(&limit, None, 0);
        assert!(decision.allowed);
        assert_eq!(decision.remaining, 24);
        assert_eq!(decision.full_after_us, 6 * SECOND);
    }

    #[test]
    fn a_full_bucket_reports_no_wait_for_a_next_token() {
        let limit = default_limit();
        let decision = Level::from_units(&limit, true, limit.capacity_units(), 1);
        assert_eq!(decision.next_token_us, 0);
        assert_eq!(decision.full_after_us, 0);
        assert_eq!(decision.remaining, 10);
    }

    #[test]
    fn a_clock_that_goes_backwards_refills_nothing() {
        let limit = default_limit();
        let state = BucketState {
            tokens: 0,
            updated_us: 100 * SECOND,
        };
        assert_eq!(refill(&limit, Some(state), 40 * SECOND), 0);
    }

    #[test]
    fn a_bucket_from_a_clock_ahead_loses_the_skew_once_not_until_the_clock_catches_up() {
        let limit = default_limit();
        // Emptied at 100 s by the old master; the new one's clock reads 40 s.
        let mut states = [Some(BucketState {
            tokens: 0,
            updated_us: 100 * SECOND,
        })];
        let charges = [Charge::one(limit)];
        let (denied, denied_writes) = take_all(&charges, &states, 40 * SECOND);
        assert!(!denied.admitted);
        assert_eq!(
            denied_writes.0[0],
            Some(BucketState {
                tokens: 0,
                updated_us: 40 * SECOND
            }),
            "a denial rewrites the time of a bucket from the future"
        );
        denied_writes.apply_to(&mut states);
        assert!(!take_all(&charges, &states, 46 * SECOND - 1).0.admitted);
        assert!(take_all(&charges, &states, 46 * SECOND).0.admitted);
    }

    #[test]
    fn a_denial_of_a_bucket_from_this_clock_writes_nothing() {
        let limit = default_limit();
        let states = [Some(BucketState {
            tokens: 0,
            updated_us: 40 * SECOND,
        })];
        let (_, denied_writes) = take_all(&[Charge::one(limit)], &states, 41 * SECOND);
        assert_eq!(denied_writes.0, vec![None]);
    }

    #[test]
    fn one_request_passes_every_six_seconds_after_the_burst() {
        let limit = default_limit();
        // Ten at t=0, then one attempt every second for a minute.
        let mut arrivals: Vec<u64> = vec![0; 10];
        arrivals.extend((1..=60).map(|s| s * SECOND));
        let admitted = admitted_at(&limit, &arrivals);
        assert_eq!(admitted.len(), 10 + 10);
        let refills: Vec<u64> = admitted[10..].iter().map(|t| t / SECOND).collect();
        assert_eq!(refills, vec![6, 12, 18, 24, 30, 36, 42, 48, 54, 60]);
    }

    proptest! {
        /// Flooding a bucket (a request every `gap` µs) admits exactly C + floor(rate × t).
        #[test]
        fn a_flood_admits_exactly_burst_plus_refill(
            rate in 1u64..1_000,
            window_s in 1u64..3_600,
            burst in 1u64..1_000,
            gap in 1u64..50_000,
            steps in 1usize..3_000,
        ) {
            let limit = Limit::parse(LimitSpec { rate, window_s, burst }).unwrap();
            let arrivals: Vec<u64> = (0..steps as u64).map(|i| i * gap).collect();
            let elapsed = *arrivals.last().unwrap();
            let admitted = admitted_at(&limit, &arrivals).len() as u128;
            let refilled = u128::from(elapsed) * u128::from(rate) / (u128::from(window_s) * 1_000_000);
            let bound = u128::from(burst) + refilled;
            prop_assert!(admitted <= bound, "admitted {} > bound {}", admitted, bound);
            // With a request at least as often as a token appears, every token is used
            // as soon as it exists: the count is exact, not just bounded. Unless the
            // bucket holds one token only: it is then full the moment a token appears,
            // and what would refill until the next request is lost, as it must be.
            let token_interval = window_s * 1_000_000 / rate;
            if gap <= token_interval && burst >= 2 {
                prop_assert_eq!(admitted, bound.min(steps as u128));
            }
        }

        /// In any interval, at most C + rate × length requests pass.
        #[test]
        fn no_interval_admits_more_than_burst_plus_refill(
            rate in 1u64..100,
            window_s in 1u64..120,
            burst in 1u64..50,
            mut arrivals in proptest::collection::vec(0u64..200_000_000, 1..400),
        ) {
            arrivals.sort_unstable();
            let limit = Limit::parse(LimitSpec { rate, window_s, burst }).unwrap();
            let admitted = admitted_at(&limit, &arrivals);
            for (i, start) in admitted.iter().enumerate() {
                for (j, end) in admitted.iter().enumerate().skip(i) {
                    let count = (j - i + 1) as u128;
                    let refilled = u128::from(end - start) * u128::from(rate)
                        / (u128::from(window_s) * 1_000_000);
                    prop_assert!(count <= u128::from(burst) + refilled);
                }
            }
        }

        /// `remaining`, `next_token_us` and `full_after_us` agree with a model in f64 seconds.
        #[test]
        fn reported_figures_agree_with_a_reference_model(
            rate in 1u64..1_000,
            window_s in 1u64..3_600,
            burst in 1u64..1_000,
            tokens_frac in 0.0f64..1.0,
        ) {
            let limit = Limit::parse(LimitSpec { rate, window_s, burst }).unwrap();
            let units = (limit.capacity_units() as f64 * tokens_frac) as u64;
            let decision = Level::from_units(&limit, true, units, 1);
            let tokens = units as f64 / limit.token_units() as f64;
            let per_token_s = window_s as f64 / rate as f64;
            prop_assert_eq!(decision.remaining, tokens.floor() as u64);
            let model_full_s = (burst as f64 - tokens) * per_token_s;
            prop_assert!((decision.full_after_us as f64 / 1e6 - model_full_s).abs() < 1e-5);
            let model_next_s = if units == limit.capacity_units() { 0.0 } else {
                (tokens.floor() + 1.0 - tokens) * per_token_s
            };
            prop_assert!((decision.next_token_us as f64 / 1e6 - model_next_s).abs() < 1e-5);
        }
    }

    #[test]
    fn a_request_denied_by_one_limit_spends_nothing_from_the_others() {
        let minute = Limit::per(10, 60, 10).unwrap();
        let day = Limit::per(15, 86_400, 15).unwrap();
        let charges = [Charge::one(minute), Charge::one(day)];
        let drained_day = Some(BucketState {
            tokens: 0,
            updated_us: 1,
        });
        let (taken, taken_writes) = take_all(&charges, &[None, drained_day], 1);
        assert!(!taken.admitted);
        assert!(taken.levels[0].allowed && !taken.levels[1].allowed);
        assert_eq!(taken_writes.0, vec![None, None]);
        assert_eq!(taken.levels[0].remaining, 10);
        assert_eq!(taken.levels[0].retry_after_us, 0);
        assert_eq!(taken.levels[1].retry_after_us, 86_400 * SECOND / 15);
    }

    /// One token of `limit`, in the first shadow group.
    fn shadow_charge(limit: Limit) -> Charge {
        Charge {
            group: Group::Shadow(1),
            ..Charge::one(limit)
        }
    }

    #[test]
    fn a_shadow_group_never_changes_what_the_enforced_limits_decide() {
        let enforced = Charge::one(Limit::per(2, 60, 2).unwrap());
        let shadow = shadow_charge(Limit::per(1, 60, 1).unwrap());
        let (mut with, mut without) = ([None, None], [None]);
        for now in 0..5 {
            let (taken, taken_writes) = take_all(&[enforced, shadow], &with, now);
            let (alone, alone_writes) = take_all(&[enforced], &without, now);
            assert_eq!(taken.admitted, alone.admitted, "at {now}");
            assert_eq!(taken.levels[0], alone.levels[0]);
            with = [taken_writes.0[0].or(with[0]), taken_writes.0[1].or(with[1])];
            without = [alone_writes.0[0].or(without[0])];
        }
    }

    #[test]
    fn a_shadow_group_pays_only_for_admitted_requests_it_could_afford() {
        let enforced = Charge::one(Limit::per(1, 60, 1).unwrap());
        let shadow = shadow_charge(Limit::per(5, 60, 5).unwrap());
        let (first, first_writes) = take_all(&[enforced, shadow], &[None, None], 0);
        assert!(first.admitted && first_writes.0[1].is_some());
        let (second, second_writes) = take_all(
            &[enforced, shadow],
            &[first_writes.0[0], first_writes.0[1]],
            1,
        );
        assert!(!second.admitted);
        assert_eq!(
            second_writes.0,
            vec![None, None],
            "a denied request pays nowhere"
        );
    }

    #[test]
    fn long_windows_admit_exactly_burst_plus_what_has_refilled() {
        let day = 86_400 * SECOND;
        // (limit, gap between requests, requests): a flood far faster than the refill.
        let cases = [
            (Limit::per(1_000_000, 86_400, 10).unwrap(), 10_000, 100_000),
            (
                Limit::per(1, 30 * 86_400, 1).unwrap(),
                3_600 * SECOND,
                24 * 90,
            ),
        ];
        for (limit, gap, requests) in cases {
            let arrivals: Vec<u64> = (0..requests).map(|i| i * gap).collect();
            let elapsed = *arrivals.last().unwrap();
            let refilled = u128::from(elapsed) * u128::from(limit.rate_limit())
                / (u128::from(limit.window_secs()) * u128::from(SECOND));
            let expected = u128::from(limit.capacity()) + refilled;
            let admitted = admitted_at(&limit, &arrivals).len() as u128;
            assert_eq!(admitted, expected, "{limit:?} over {} days", elapsed / day);
        }
    }

    #[test]
    fn a_cost_of_several_tokens_waits_for_all_of_them() {
        let limit = Limit::per(1, 1, 10).unwrap();
        let (decision, state) = take(&limit, None, 0);
        assert!(decision.allowed);
        let charge = Charge {
            cost: 10,
            ..Charge::one(limit)
        };
        let (taken, _) = take_all(&[charge], &[state], 0);
        assert!(!taken.admitted);
        // 9 tokens held, 10 needed: one more second.
        assert_eq!(taken.levels[0].retry_after_us, SECOND);
    }

    fn read(limit: Limit) -> Charge {
        Charge {
            cost: 0,
            ..Charge::one(limit)
        }
    }

    #[test]
    fn a_cost_of_zero_reports_the_bucket_and_writes_nothing() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let (fresh, fresh_writes) = take_all(&[read(limit)], &[None], 0);
        assert!(fresh.admitted && fresh.levels[0].allowed);
        assert_eq!(fresh.levels[0].remaining, 10);
        assert_eq!(fresh_writes.0, vec![None], "a missing bucket stays missing");
        let drained = Some(BucketState {
            tokens: 0,
            updated_us: 0,
        });
        // Three tokens have come back after 18 s; the stored state still says so later.
        let (taken, taken_writes) = take_all(&[read(limit)], &[drained], 18 * SECOND);
        assert!(taken.admitted && taken.levels[0].allowed);
        assert_eq!(taken.levels[0].remaining, 3);
        assert_eq!(taken.levels[0].retry_after_us, 0);
        assert_eq!(taken_writes.0, vec![None]);
    }

    proptest! {
        /// Reads (cost 0) between requests change no state and no decision, and a read
        /// reports what a request at that moment finds: one token more than it leaves.
        #[test]
        fn reads_between_requests_change_nothing_and_report_what_a_request_finds(
            arrivals in proptest::collection::vec((0u64..5 * SECOND, any::<bool>()), 1..200),
        ) {
            let limit = Limit::per(3, 10, 5).unwrap();
            let (mut with_reads, mut without) = ([None], [None]);
            let mut now = 0;
            for (gap, read_first) in arrivals {
                now += gap;
                let found = read_first.then(|| take_all(&[read(limit)], &with_reads, now));
                if let Some((found, found_writes)) = &found {
                    prop_assert!(found.admitted);
                    prop_assert_eq!(&found_writes.0, &vec![None]);
                }
                let (taken, taken_writes) = take_all(&[Charge::one(limit)], &with_reads, now);
                let (alone, alone_writes) = take_all(&[Charge::one(limit)], &without, now);
                prop_assert_eq!(&taken, &alone);
                if let Some((found, _)) = found {
                    let spent = u64::from(taken.admitted);
                    prop_assert_eq!(found.levels[0].remaining, taken.levels[0].remaining + spent);
                }
                taken_writes.apply_to(&mut with_reads);
                alone_writes.apply_to(&mut without);
                prop_assert_eq!(with_reads, without);
            }
        }
    }

    proptest! {
        /// Under any interleaving of requests drawing on two limits, each limit admits at
        /// most burst + refill, and a request is admitted only when both paid.
        #[test]
        fn two_limits_each_hold_their_bound_and_pay_together(
            minute_rate in 1u64..20,
            hour_rate in 1u64..40,
            gaps in proptest::collection::vec(0u64..20 * SECOND, 1..300),
        ) {
            let minute = Limit::per(minute_rate, 60, minute_rate).unwrap();
            let hour = Limit::per(hour_rate, 3_600, hour_rate).unwrap();
            let charges = [Charge::one(minute), Charge::one(hour)];
            let mut states = [None, None];
            let (mut now, mut admitted) = (0u64, 0u128);
            let mut paid = [0u128, 0u128];
            for gap in gaps {
                now += gap;
                let (taken, taken_writes) = take_all(&charges, &states, now);
                admitted += u128::from(taken.admitted);
                for (paid, write) in paid.iter_mut().zip(&taken_writes.0) {
                    *paid += u128::from(write.is_some());
                }
                taken_writes.apply_to(&mut states);
            }
            prop_assert_eq!(paid[0], admitted);
            prop_assert_eq!(paid[1], admitted);
            let bound = |rate: u64, window_s: u64| {
                u128::from(rate) + u128::from(now) * u128::from(rate) / (u128::from(window_s) * u128::from(SECOND))
            };
            prop_assert!(admitted <= bound(minute_rate, 60));
            prop_assert!(admitted <= bound(hour_rate, 3_600));
        }
    }
}
