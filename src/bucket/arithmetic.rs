//! The token bucket, as pure arithmetic: state in, time in, decision and new state out.
//!
//! `token_bucket.lua` mirrors [`take`] line by line for Redis; the parity tests run one
//! table of cases against both.

use super::limit::Limit;

/// What a bucket remembers between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    /// Units held at `updated_us` (see [`Limit`] for units).
    pub tokens: u64,
    /// When `tokens` was last written, in µs on the deciding clock.
    pub updated_us: u64,
}

/// The answer to one request, and what the client may be told about its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Until the next whole token is in the bucket (0 when it is full). For a denial this
    /// is exactly when a retry can succeed.
    pub next_token_us: u64,
    /// Until the bucket is full again, which is also when forgetting it loses nothing.
    pub full_after_us: u64,
}

impl Decision {
    /// Derives the client-facing figures from the units a bucket holds after deciding.
    /// Both stores call this, so headers cannot disagree between them.
    pub fn from_units(limit: &Limit, allowed: bool, tokens: u64) -> Self {
        let cost = limit.cost_units();
        let capacity = limit.capacity_units();
        let tokens = tokens.min(capacity);
        let next_token_us = if tokens >= capacity {
            0
        } else {
            limit.micros_to_gain(cost - tokens % cost)
        };
        Self {
            allowed,
            remaining: tokens / cost,
            next_token_us,
            full_after_us: limit.micros_to_gain(capacity - tokens),
        }
    }

    /// Until a retry can succeed, or 0 when this request was admitted.
    pub fn retry_after_us(&self) -> u64 {
        if self.allowed { 0 } else { self.next_token_us }
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

/// Takes one token at `now_us`. Returns the decision and, when the bucket changed, the
/// state to store. A denial changes nothing: refill is linear, so the old state still
/// describes the bucket exactly, and the store need not write.
pub fn take(
    limit: &Limit,
    state: Option<BucketState>,
    now_us: u64,
) -> (Decision, Option<BucketState>) {
    let tokens = refill(limit, state, now_us);
    let cost = limit.cost_units();
    if tokens < cost {
        return (Decision::from_units(limit, false, tokens), None);
    }
    let tokens = tokens - cost;
    let new_state = BucketState {
        tokens,
        updated_us: now_us,
    };
    (Decision::from_units(limit, true, tokens), Some(new_state))
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
        assert_eq!(decision.retry_after_us().div_ceil(SECOND), 6);
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
        let retry_at = 10 + denied.retry_after_us();
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
        let decision = Decision::from_units(&limit, true, limit.capacity_units());
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
            // as soon as it exists: the count is exact, not just bounded.
            let token_interval = window_s * 1_000_000 / rate;
            if gap <= token_interval {
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
            let decision = Decision::from_units(&limit, true, units);
            let tokens = units as f64 / limit.cost_units() as f64;
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
}
