//! `bucket/refund.lua` and `bucket::refund` agree: one table of cases, each a payment by
//! the bucket script then a refund, both at given times, on a plain `redis-server` (the
//! script is the same wherever the slot is): refunds of a payment made at a known time (the
//! Cluster store's) and hits given back at an unknown one (Envoy's `is_negative_hits`).

use std::sync::Arc;
use std::time::Duration;

use ratelimiter::bucket::{self, BucketState, Charge, Limit, Paid};
use ratelimiter::store::KeyedCharge;
use ratelimiter::store::redis::script::{ScriptCall, refund_cmd};
use ratelimiter::store::redis::{
    ConnectionMode, ConnectionSettings, Master, MasterSlot, RedisStore,
};

use testkit::{RedisProcess, unique_prefix};

const SECOND: u64 = 1_000_000;

/// A refund case: the request's buckets (one hash), how many requests pay before the one
/// refunded (all at `t0`), when the refunded one pays, and when, told what of the
/// payment's time, and how many tokens its refund gives back.
struct Case {
    name: &'static str,
    limits: Vec<Limit>,
    paid_before: usize,
    paid_at: u64,
    /// The payment's time as the refund is told it; later than the real payment means
    /// "lost".
    told: Paid,
    refund_at: u64,
    given: u64,
}

fn cases() -> Vec<Case> {
    let t0 = 1_790_000_000 * SECOND;
    let minute = Limit::per(10, 60, 10).unwrap();
    let hour = Limit::per(15, 3600, 15).unwrap();
    let case = |name, limits, paid_before, paid_at, told_paid_at, refund_at| Case {
        name,
        limits,
        paid_before,
        paid_at,
        told: Paid::NoEarlierThan(told_paid_at),
        refund_at,
        given: 1,
    };
    let given_back = |name, limits, paid_before, refund_at, given| Case {
        name,
        limits,
        paid_before,
        paid_at: t0,
        told: Paid::Unknown,
        refund_at,
        given,
    };
    vec![
        given_back("hits given back at once", vec![minute], 3, t0, 1),
        given_back(
            "hits given back later, on top of the refill",
            vec![minute],
            6,
            t0 + 10 * SECOND,
            3,
        ),
        given_back(
            "more hits given back than a bucket holds",
            vec![minute, hour],
            4,
            t0 + 250_000,
            50,
        ),
        given_back(
            "hits given back to a full bucket",
            vec![minute],
            0,
            t0 + 120 * SECOND,
            2,
        ),
        given_back(
            "hits given back on a clock behind the payment",
            vec![hour],
            2,
            t0 - 5 * SECOND,
            1,
        ),
        case("at once", vec![minute], 3, t0, t0, t0),
        case("a second later", vec![minute], 3, t0, t0, t0 + SECOND),
        case(
            "two limits in one hash",
            vec![minute, hour],
            4,
            t0,
            t0,
            t0 + 250_000,
        ),
        case(
            "after it would have refilled",
            vec![minute],
            2,
            t0,
            t0,
            t0 + 7 * SECOND,
        ),
        case(
            "into a full bucket",
            vec![minute],
            0,
            t0,
            t0,
            t0 + 120 * SECOND,
        ),
        case("the payment was lost", vec![minute], 3, t0, t0 + 1, t0 + 2),
        case(
            "a clock behind the payment",
            vec![hour],
            1,
            t0,
            t0,
            t0 - 5 * SECOND,
        ),
    ]
}

#[tokio::test]
async fn the_refund_script_and_the_rust_arithmetic_agree_on_every_case() {
    let redis = RedisProcess::server(None, &[]);
    let info = redis::IntoConnectionInfo::into_connection_info(redis.url().as_str()).unwrap();
    let slot = Arc::new(MasterSlot::default());
    let connections = ConnectionSettings {
        mode: ConnectionMode::Multiplexed { batch_max: 32 },
        timeout: Duration::from_secs(2),
    };
    slot.install(Arc::new(Master::open(info, connections).unwrap()));
    let store = RedisStore::new(slot, Duration::from_secs(2));
    let mut conn = redis.connection();
    for case in cases() {
        let key = format!("{}:p:{{k}}", unique_prefix("refund"));
        let charges: Vec<KeyedCharge> = case
            .limits
            .iter()
            .enumerate()
            .map(|(i, limit)| KeyedCharge {
                key: key.as_str().into(),
                field: format!("l{i}").into(),
                charge: Charge::one(*limit),
            })
            .collect();
        let plain: Vec<Charge> = charges.iter().map(|c| c.charge).collect();
        let mut states: Vec<Option<BucketState>> = vec![None; plain.len()];
        for _ in 0..case.paid_before {
            bucket::take_all(&plain, &states, case.paid_at)
                .1
                .apply_to(&mut states);
            store.take_at(&charges, Some(case.paid_at)).await.unwrap();
        }
        bucket::take_all(&plain, &states, case.paid_at)
            .1
            .apply_to(&mut states);
        assert!(
            store
                .take_at(&charges, Some(case.paid_at))
                .await
                .unwrap()
                .admitted
        );

        let expected: Vec<bucket::Refunded> = plain
            .iter()
            .zip(&states)
            .map(|(charge, state)| {
                bucket::refund(&charge.limit, *state, case.given, case.told, case.refund_at)
            })
            .collect();
        let given: Vec<KeyedCharge> = charges
            .iter()
            .map(|keyed| KeyedCharge {
                charge: Charge {
                    cost: case.given,
                    ..keyed.charge
                },
                ..keyed.clone()
            })
            .collect();
        let units: Vec<u64> = refund_cmd(ScriptCall::Text, &given, case.told, Some(case.refund_at))
            .query(&mut conn)
            .unwrap();
        let expected_units: Vec<u64> = expected.iter().map(|r| r.units).collect();
        assert_eq!(units, expected_units, "{}: units", case.name);
        for (i, (refunded, before)) in expected.iter().zip(&states).enumerate() {
            let stored: Vec<u64> = redis::cmd("HMGET")
                .arg(&key)
                .arg(format!("l{i}:tokens"))
                .arg(format!("l{i}:ts"))
                .query(&mut conn)
                .unwrap();
            let state = refunded.write.or(*before).unwrap();
            assert_eq!(
                stored,
                vec![state.tokens, state.updated_us],
                "{}: the stored state of limit {i}",
                case.name
            );
        }
    }
}
