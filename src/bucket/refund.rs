//! Giving back what a request paid in one bucket when another bucket, decided separately,
//! refused it: the Cluster store decides a request's hash slots one call each, so a slot
//! can pay before another slot denies. `refund.lua` mirrors [`refund`] line by line.
//!
//! # Why a refund never admits more than a limit allows
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

use super::arithmetic::{BucketState, refill};
use super::limit::Limit;

/// What a refund did to one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refunded {
    /// The units the bucket holds at `now_us` after the refund (capacity when it is missing).
    pub units: u64,
    /// The state to store, or `None` when nothing changes.
    pub write: Option<BucketState>,
}

/// Gives back, at `now_us`, a payment of `cost` tokens that the bucket in `state` took
/// at `paid_at_us` or later (both on the deciding master's clock).
pub fn refund(
    limit: &Limit,
    state: Option<BucketState>,
    cost: u64,
    paid_at_us: u64,
    now_us: u64,
) -> Refunded {
    let capacity = limit.capacity_units();
    let Some(stored) = state.filter(|stored| stored.updated_us >= paid_at_us) else {
        // Missing (a missing bucket is full) or written before the payment: the payment is
        // not in this state, so there is nothing to give back.
        let units = state.map_or(capacity, |stored| refill(limit, Some(stored), now_us));
        return Refunded { units, write: None };
    };
    let held = refill(limit, Some(stored), now_us);
    let cost_units = limit.units_of(cost);
    let elapsed = now_us.saturating_sub(paid_at_us);
    let decayed = u128::from(elapsed) * u128::from(limit.refill_units_per_us());
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
        let refunded = refund(&limit, Some(paid), 1, 5 * SECOND, 5 * SECOND);
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
        let refunded = refund(&limit, Some(paid), 1, paid_at, now);
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
        let refunded = refund(&limit, Some(paid), 1, 0, now);
        assert_eq!(refunded.units, limit.capacity_units());
    }

    #[test]
    fn a_refund_after_the_payment_would_have_refilled_gives_nothing() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let mut state = None;
        for i in 0..3 {
            state = Some(pay(&limit, state, i));
        }
        let refunded = refund(&limit, state, 1, 2, 2 + 6 * SECOND);
        assert_eq!(refunded.write, None);
        assert_eq!(refunded.units, refill(&limit, state, 2 + 6 * SECOND));
    }

    #[test]
    fn a_bucket_that_no_longer_shows_the_payment_is_left_alone() {
        let limit = Limit::per(10, 60, 10).unwrap();
        let missing = refund(&limit, None, 1, 100, 100);
        assert_eq!(missing.write, None);
        assert_eq!(missing.units, limit.capacity_units());
        // Last written before the payment: a failover lost the payment with its write.
        let older = BucketState {
            tokens: 0,
            updated_us: 99,
        };
        let lost = refund(&limit, Some(older), 1, 100, 100);
        assert_eq!(lost.write, None);
        assert_eq!(lost.units, refill(&limit, Some(older), 100));
    }

    #[test]
    fn a_clock_behind_the_payment_gives_back_no_more_than_was_paid() {
        let limit = Limit::per(1, 60, 5).unwrap();
        let paid = pay(&limit, None, 100 * SECOND);
        let refunded = refund(&limit, Some(paid), 1, 100 * SECOND, 40 * SECOND);
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
                        let refunded = refund(&limit, state, 1, *paid_at, t);
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
}
