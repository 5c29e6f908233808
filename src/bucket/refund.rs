//! Giving back what a request paid: in one bucket when another bucket, decided separately,
//! refused it (the Cluster store decides a request's hash slots one call each, so a slot
//! can pay before another slot denies), or when a caller says hits it paid are to be given
//! back (Envoy's `is_negative_hits`). `refund.lua` mirrors [`refund`] line by line.
//!
//! # Why a refund of a payment made at a known time never admits more than a limit allows
//! A bucket holds `L ≤ C` units and gains at most `r` units per µs. A payment of `c` units
//! made at `t₀` for a request that is then refused leaves a *claim*, worth
//! `p(t) = max(0, c − r·(t − t₀))` at time `t`: what the payment still keeps out of the
//! bucket, at most, once the refill it displaced is counted. [`refund`] gives back at most
//! the claim (it subtracts `r·(now − paid_at)` from `c`, with `paid_at ≤ t₀` on the same
//! master's clock: the Cluster store reads `TIME` right after the script that paid and
//! subtracts the whole call's duration), and never past `C`.
//!
//! Let `V = L + Σ p` over the open claims. `V ≤ C` always: it starts at `C` (a new bucket is
//! full, with no claims); a payment that becomes a claim moves units from `L` to `Σ p` and
//! leaves `V` alone; an admitted request's payment lowers it; while some claim is open, the
//! refill (at most `r`) is matched by that claim's decay (exactly `r`), so `V` does not
//! grow; with no claim open, `V = L ≤ C`; a refund adds at most `p` to `L` and closes `p`.
//! So over any interval `[s, e]` the admitted requests paid at most
//! `V(s) − V(e) + r·(e − s) ≤ C + r·(e − s)`: exactly the bound of a single bucket on a
//! single master, for every interval, not only from a bucket's creation. Without the decay
//! a refund could hand back a token that the refill had already replaced (the bucket
//! reached `C` between the payment and the refund), and a window starting then could admit
//! one request more than `C + r·(e − s)`.
//!
//! A refund is skipped, which is always safe, when the bucket no longer shows the payment:
//! its hash is gone, or its last write is older than `paid_at` (the payment was lost with a
//! failover to a replica that had not received it).
//!
//! # A refund whose payment time is unknown
//! Envoy's `is_negative_hits` gives hits back with no word of when they were paid
//! ([`Paid::Unknown`]). Nothing can decay then, and no write can be told apart from the
//! payment's: the hits are added to what the bucket holds now, never past `C`. The bucket
//! still holds `0 ≤ L ≤ C` and gains at most `r` per µs, so over any `[s, e]` the admitted
//! requests paid at most `L(s) − L(e) + r·(e − s) + G ≤ C + r·(e − s) + G`, with `G` the units
//! given back in that interval: the limit holds **net of what was given back**, never
//! gross. A caller that gives back hits it never paid fills the bucket sooner, up to full
//! and no further; the rate-limit service trusts its caller with that, as it trusts it
//! with `hits_addend`. A missing bucket is full, so there is nothing to give back to.

use super::arithmetic::{BucketState, refill};
use super::limit::Limit;

/// When the payment a refund gives back was made, as far as the caller knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paid {
    /// At this time or later, in µs on the deciding master's clock: only the claim the
    /// payment still holds is given back, and only if the bucket shows the payment.
    NoEarlierThan(u64),
    /// At some time the caller does not say: the whole cost is given back, up to full.
    Unknown,
}

/// What a refund did to one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refunded {
    /// The units the bucket holds at `now_us` after the refund (capacity when it is missing).
    pub units: u64,
    /// The state to store, or `None` when nothing changes.
    pub write: Option<BucketState>,
}

/// Gives back, at `now_us`, a payment of `cost` tokens that the bucket in `state` took
/// when `paid` says.
pub fn refund(
    limit: &Limit,
    state: Option<BucketState>,
    cost: u64,
    paid: Paid,
    now_us: u64,
) -> Refunded {
    let capacity = limit.capacity_units();
    let shows_payment = |stored: &BucketState| match paid {
        Paid::NoEarlierThan(paid_at_us) => stored.updated_us >= paid_at_us,
        Paid::Unknown => true,
    };
    let Some(stored) = state.filter(shows_payment) else {
        // Missing (a missing bucket is full) or written before the payment: the payment is
        // not in this state, so there is nothing to give back.
        let units = state.map_or(capacity, |stored| refill(limit, Some(stored), now_us));
        return Refunded { units, write: None };
    };
    let held = refill(limit, Some(stored), now_us);
    let cost_units = limit.units_of(cost);
    let decayed = match paid {
        Paid::NoEarlierThan(paid_at_us) => {
            let elapsed = now_us.saturating_sub(paid_at_us);
            u128::from(elapsed) * u128::from(limit.refill_units_per_us())
        }
        Paid::Unknown => 0,
    };
    if decayed >= u128::from(cost_units) || held >= capacity {
        return Refunded {
            units: held,
            write: None,
        };
    }
    let given = cost_units - decayed as u64;
    let units = (held + given).min(capacity);
    Refunded {
        units,
        write: Some(BucketState {
            tokens: units,
            updated_us: now_us,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Charge, take_all};
    use super::*;
    use proptest::prelude::*;

    const SECOND: u64 = 1_000_000;

    /// Pays one token at `now_us` from `state`; the state after.
    fn pay(limit: &Limit, state: Option<BucketState>, now_us: u64) -> BucketState {
        let (taken, taken_writes) = take_all(&[Charge::one(*limit)], &[state], now_us);
        assert!(taken.admitted);
        taken_writes.0[0].unwrap()
    }

    #[test]
    fn a_refund_at_once_restores_the_bucket_as_if_nothing_was_paid() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let paid = pay(&limit, None, 5 * SECOND);
        let refunded = refund(
            &limit,
            Some(paid),
            1,
            Paid::NoEarlierThan(5 * SECOND),
            5 * SECOND,
        );
        assert_eq!(refunded.units, limit.capacity_units());
        assert_eq!(
            refunded.write,
            Some(BucketState {
                tokens: limit.capacity_units(),
                updated_us: 5 * SECOND,
            })
        );
    }

    #[test]
    fn a_refund_gives_back_the_payment_less_what_refilled_since() {
        // A token every 6 s; one second after the payment, a sixth of it has come back by
        // refill, so the refund gives back five sixths.
        let limit = Limit::per(10, 60, 10).unwrap();
        let paid_at = 10;
        let mut state = None;
        for _ in 0..5 {
            state = Some(pay(&limit, state, paid_at));
        }
        let paid = pay(&limit, state, paid_at);
        let token = limit.token_units();
        assert_eq!(paid.tokens, 4 * token);
        let now = paid_at + SECOND;
        let refunded = refund(&limit, Some(paid), 1, Paid::NoEarlierThan(paid_at), now);
        let gained = SECOND * limit.refill_units_per_us();
        assert_eq!(refunded.units, 4 * token + gained + (token - gained));
        assert_eq!(refunded.units, 5 * token);
    }

    #[test]
    fn a_refund_brings_a_bucket_back_to_full_at_most() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let paid = pay(&limit, None, 0);
        // Half a token's time later the bucket is nine and a half tokens full.
        let now = 3 * SECOND;
        let refunded = refund(&limit, Some(paid), 1, Paid::NoEarlierThan(0), now);
        assert_eq!(refunded.units, limit.capacity_units());
    }

    #[test]
    fn a_refund_after_the_payment_would_have_refilled_gives_nothing() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let mut state = None;
        for i in 0..3 {
            state = Some(pay(&limit, state, i));
        }
        let refunded = refund(&limit, state, 1, Paid::NoEarlierThan(2), 2 + 6 * SECOND);
        assert_eq!(refunded.write, None);
        assert_eq!(refunded.units, refill(&limit, state, 2 + 6 * SECOND));
    }

    #[test]
    fn a_bucket_that_no_longer_shows_the_payment_is_left_alone() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let missing = refund(&limit, None, 1, Paid::NoEarlierThan(100), 100);
        assert_eq!(missing.write, None);
        assert_eq!(missing.units, limit.capacity_units());
        // Last written before the payment: a failover lost the payment with its write.
        let older = BucketState {
            tokens: 0,
            updated_us: 99,
        };
        let lost = refund(&limit, Some(older), 1, Paid::NoEarlierThan(100), 100);
        assert_eq!(lost.write, None);
        assert_eq!(lost.units, refill(&limit, Some(older), 100));
    }

    #[test]
    fn a_clock_behind_the_payment_gives_back_no_more_than_was_paid() {
        let limit = Limit::per(1, 60, 5).unwrap();
        let paid = pay(&limit, None, 100 * SECOND);
        let refunded = refund(
            &limit,
            Some(paid),
            1,
            Paid::NoEarlierThan(100 * SECOND),
            40 * SECOND,
        );
        assert_eq!(refunded.units, limit.capacity_units());
    }

    /// One event of the property below.
    #[derive(Debug, Clone, Copy)]
    enum Event {
        /// A request that pays if it can and is admitted.
        Admitted,
        /// A request that pays if it can, and is refused elsewhere: its refund comes this
        /// many µs later.
        Refused(u64),
    }

    fn event() -> impl Strategy<Value = (u64, Event)> {
        (
            0u64..3 * SECOND,
            prop_oneof![
                Just(Event::Admitted),
                (0u64..8 * SECOND).prop_map(Event::Refused)
            ],
        )
    }

    proptest! {
        /// Admitted requests, refused requests that paid and whose refunds arrive later,
        /// interleaved at random: in every interval between two admissions, at most
        /// C + r × length were admitted.
        #[test]
        fn with_refunds_no_interval_admits_more_than_burst_plus_refill(
            burst in 1u64..6,
            events in proptest::collection::vec(event(), 1..120),
        ) {
            let limit = Limit::per(1, 6, burst).unwrap();
            // (time, what): payments happen at their time, refunds at theirs.
            #[derive(Debug)]
            enum Step { Pay(Event), Refund { paid_at: u64 } }
            let mut steps: Vec<(u64, usize, Step)> = Vec::new();
            let mut now = 0;
            for (i, (gap, event)) in events.iter().enumerate() {
                now += gap;
                steps.push((now, i, Step::Pay(*event)));
            }
            steps.sort_by_key(|(t, i, _)| (*t, *i));
            let mut state: Option<BucketState> = None;
            let mut admitted_at = Vec::new();
            let mut k = 0;
            while k < steps.len() {
                let (t, _, step) = &steps[k];
                let t = *t;
                match step {
                    Step::Pay(event) => {
                        let (taken, taken_writes) = take_all(&[Charge::one(limit)], &[state], t);
                        if taken.admitted {
                            taken_writes.apply_to(std::slice::from_mut(&mut state));
                            match event {
                                Event::Admitted => admitted_at.push(t),
                                Event::Refused(later) => {
                                    let at = t + later;
                                    let pos = steps[k + 1..]
                                        .iter()
                                        .position(|(s, _, _)| *s > at)
                                        .map_or(steps.len(), |p| k + 1 + p);
                                    steps.insert(pos, (at, usize::MAX, Step::Refund { paid_at: t }));
                                }
                            }
                        }
                    }
                    Step::Refund { paid_at } => {
                        let refunded = refund(&limit, state, 1, Paid::NoEarlierThan(*paid_at), t);
                        state = refunded.write.or(state);
                    }
                }
                k += 1;
            }
            for (i, start) in admitted_at.iter().enumerate() {
                for (j, end) in admitted_at.iter().enumerate().skip(i) {
                    let count = (j - i + 1) as u128;
                    let refilled = u128::from(end - start) / u128::from(6 * SECOND);
                    prop_assert!(
                        count <= u128::from(burst) + refilled,
                        "{count} admitted in [{start}, {end}]"
                    );
                }
            }
        }
    }

    #[test]
    fn hits_given_back_at_an_unknown_time_are_added_whole_up_to_full() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let token = limit.token_units();
        let mut state = None;
        for i in 0..6 {
            state = Some(pay(&limit, state, i));
        }
        // Long after the payments, nothing decays: three tokens come back on top of the
        // refill.
        let now = 6 * SECOND;
        let held = refill(&limit, state, now);
        let given = refund(&limit, state, 3, Paid::Unknown, now);
        assert_eq!(given.units, held + 3 * token);
        assert_eq!(
            given.write,
            Some(BucketState {
                tokens: held + 3 * token,
                updated_us: now,
            })
        );
        let too_many = refund(&limit, state, 1_000, Paid::Unknown, now);
        assert_eq!(too_many.units, limit.capacity_units());
    }

    #[test]
    fn hits_given_back_to_a_missing_or_full_bucket_change_nothing() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let missing = refund(&limit, None, 3, Paid::Unknown, 100);
        assert_eq!(
            (missing.units, missing.write),
            (limit.capacity_units(), None)
        );
        let paid = pay(&limit, None, 0);
        let full_again = refund(&limit, Some(paid), 3, Paid::Unknown, 6 * SECOND);
        assert_eq!(
            (full_again.units, full_again.write),
            (limit.capacity_units(), None)
        );
        let nothing = refund(&limit, Some(paid), 0, Paid::Unknown, 1);
        assert_eq!(nothing.write, None);
    }

    /// One step of the property below: a request that pays one token if it can, or a
    /// give-back of this many tokens at an unknown time.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Request,
        GiveBack(u64),
    }

    fn step() -> impl Strategy<Value = (u64, Step)> {
        (
            0u64..2 * SECOND,
            prop_oneof![
                3 => Just(Step::Request),
                1 => (0u64..8).prop_map(Step::GiveBack),
            ],
        )
    }

    proptest! {
        /// Requests and give-backs interleaved at random: between any two admissions, the
        /// units paid are at most C + r × length + the units given back in between, and
        /// the bucket never holds more than C.
        #[test]
        fn with_hits_given_back_no_interval_pays_more_than_burst_plus_refill_plus_given(
            burst in 1u64..6,
            steps in proptest::collection::vec(step(), 1..150),
        ) {
            let limit = Limit::per(1, 6, burst).unwrap();
            let token = u128::from(limit.token_units());
            let mut state: Option<BucketState> = None;
            // Per admission: its time, and the units given back before it in all.
            let mut admitted: Vec<(u64, u128)> = Vec::new();
            let mut given_total: u128 = 0;
            let mut now = 0;
            for (gap, step) in steps {
                now += gap;
                match step {
                    Step::Request => {
                        let (taken, writes) = take_all(&[Charge::one(limit)], &[state], now);
                        if taken.admitted {
                            writes.apply_to(std::slice::from_mut(&mut state));
                            admitted.push((now, given_total));
                        }
                    }
                    Step::GiveBack(tokens) => {
                        let held = refill(&limit, state, now);
                        let given = refund(&limit, state, tokens, Paid::Unknown, now);
                        prop_assert!(given.units <= limit.capacity_units());
                        given_total += u128::from(given.units - held);
                        state = given.write.or(state);
                    }
                }
            }
            let capacity = u128::from(limit.capacity_units());
            let rate = u128::from(limit.refill_units_per_us());
            for (i, (start, given_before)) in admitted.iter().enumerate() {
                for (j, (end, given_by_end)) in admitted.iter().enumerate().skip(i) {
                    let paid = (j - i + 1) as u128 * token;
                    let bound = capacity
                        + rate * u128::from(end - start)
                        + (given_by_end - given_before);
                    prop_assert!(
                        paid <= bound,
                        "{} admitted in [{start}, {end}]: {paid} units > {bound}",
                        j - i + 1
                    );
                }
            }
        }
    }
}
