//! Parity against a real `redis-server`: the Lua script, the memory store and the Rust
//! arithmetic decide every case of one table alike, one request at a time and in batches.

use std::collections::HashMap;

use ratelimiter::bucket::{self, BucketState, Charge, Group, Level, Limit, Taken};
use ratelimiter::store::KeyedCharge;
use ratelimiter::store::memory::MemoryStore;

use testkit::{RedisProcess, unique_prefix};

use super::redis_store::{MODES, SECOND, foreign_values, one, redis_store};

/// One row of the parity table: the buckets one request draws on (limit, cost, group)
/// and the times (µs) at which that request is made.
struct Case {
    name: &'static str,
    charges: Vec<Charge>,
    arrivals_us: Vec<u64>,
    /// Every other arrival (the second, the fourth, …) is a read: the same buckets
    /// charged 0 tokens.
    reads_between: bool,
}

fn single(name: &'static str, limit: Limit, arrivals_us: Vec<u64>) -> Case {
    Case {
        name,
        charges: vec![Charge::one(limit)],
        arrivals_us,
        reads_between: false,
    }
}

impl Case {
    /// This case with a read right after each of its requests.
    fn with_reads(self) -> Case {
        let arrivals_us = self.arrivals_us.iter().flat_map(|&at| [at, at]).collect();
        Case {
            arrivals_us,
            reads_between: true,
            ..self
        }
    }

    /// The charges of arrival `n`.
    fn charges_at(&self, n: usize) -> Vec<Charge> {
        let read = self.reads_between && n % 2 == 1;
        self.charges
            .iter()
            .map(|charge| Charge {
                cost: if read { 0 } else { charge.cost },
                ..*charge
            })
            .collect()
    }
}

fn parity_table() -> Vec<Case> {
    let mut table = base_parity_table();
    // The same requests with a read after each, through the one-bucket path of the script
    // and through the general one: reads write nothing and change no later decision.
    let with_reads: Vec<Case> = base_parity_table()
        .into_iter()
        .filter(|case| {
            [
                "burst then denied",
                "clock going backwards refills nothing",
                "minute and hour: the hour runs out first and spends nothing of the minute",
                "a cost of three tokens",
                "two shadow policies beside an enforced limit",
            ]
            .contains(&case.name)
        })
        .map(Case::with_reads)
        .collect();
    assert_eq!(with_reads.len(), 5, "every case named above exists");
    table.extend(with_reads);
    table.push(Case {
        name: "only reads: nothing is ever written",
        charges: vec![Charge {
            cost: 0,
            ..Charge::one(Limit::per(10, 60, 10).unwrap())
        }],
        arrivals_us: vec![1_790_000_000 * SECOND, 1_790_000_000 * SECOND + 1],
        reads_between: false,
    });
    table
}

fn base_parity_table() -> Vec<Case> {
    // Clock values near today's epoch microseconds, as Redis TIME would give.
    let t0 = 1_790_000_000 * SECOND;
    let day = 86_400;
    let shadow = |group, limit| Charge {
        group: Group::Shadow(group),
        ..Charge::one(limit)
    };
    vec![
        single(
            "burst then denied",
            Limit::per(10, 60, 10).unwrap(),
            (0..12).map(|i| t0 + i).collect(),
        ),
        single(
            "one token every six seconds",
            Limit::per(10, 60, 10).unwrap(),
            (0..10)
                .map(|i| t0 + i)
                .chain((1..=8).map(|s| t0 + s * 3 * SECOND))
                .collect(),
        ),
        single(
            "retry exactly at the boundary",
            Limit::per(1, 7, 1).unwrap(),
            vec![
                t0,
                t0 + 7 * SECOND - 1,
                t0 + 7 * SECOND,
                t0 + 7 * SECOND + 1,
            ],
        ),
        single(
            "burst above rate, long idle refills to full",
            Limit::per(3, 10, 8).unwrap(),
            (0..9)
                .map(|i| t0 + i * 1_000)
                .chain([t0 + 3600 * SECOND, t0 + 3600 * SECOND + 1])
                .collect(),
        ),
        single(
            "clock going backwards refills nothing",
            Limit::per(2, 1, 2).unwrap(),
            vec![
                t0 + 10 * SECOND,
                t0 + 10 * SECOND,
                t0 + 5 * SECOND,
                t0 + 10 * SECOND + 499_999,
                t0 + 10 * SECOND + 500_000,
            ],
        ),
        single(
            "large policy stays exact",
            Limit::per(1_000_000, 3600, 2_000_000).unwrap(),
            vec![t0, t0 + 1, t0 + 3_600, t0 + 7_200_000_000],
        ),
        single(
            "a million a day",
            Limit::per(1_000_000, day, 1_000_000).unwrap(),
            vec![t0, t0 + 1, t0 + 86_399, t0 + 86_400, t0 + day * SECOND],
        ),
        single(
            "one per thirty days",
            Limit::per(1, 30 * day, 1).unwrap(),
            vec![
                t0,
                t0 + 30 * day * SECOND - 1,
                t0 + 30 * day * SECOND,
                t0 + 30 * day * SECOND + 1,
            ],
        ),
        single(
            "a billion a second",
            Limit::per(1_000_000_000, 1, 1_000_000_000).unwrap(),
            vec![t0, t0 + 1, t0 + SECOND],
        ),
        Case {
            name: "minute and hour: the hour runs out first and spends nothing of the minute",
            charges: vec![
                Charge::one(Limit::per(10, 60, 10).unwrap()),
                Charge::one(Limit::per(15, 3600, 15).unwrap()),
            ],
            arrivals_us: (0..12)
                .map(|i| t0 + i)
                .chain((1..=10).map(|s| t0 + s * 6 * SECOND))
                .collect(),
            reads_between: false,
        },
        Case {
            name: "a cost of three tokens",
            charges: vec![Charge {
                cost: 3,
                ..Charge::one(Limit::per(1, 1, 10).unwrap())
            }],
            arrivals_us: vec![t0, t0, t0, t0 + 1, t0 + 2 * SECOND, t0 + 3 * SECOND],
            reads_between: false,
        },
        Case {
            name: "two shadow policies beside an enforced limit",
            charges: vec![
                Charge::one(Limit::per(4, 60, 4).unwrap()),
                shadow(1, Limit::per(2, 60, 2).unwrap()),
                shadow(1, Limit::per(5, 60, 5).unwrap()),
                shadow(2, Limit::per(1, 60, 1).unwrap()),
            ],
            arrivals_us: (0..6).map(|i| t0 + i).collect(),
            reads_between: false,
        },
        Case {
            name: "a shadow policy alone: its limits pay together or not at all",
            reads_between: false,
            charges: vec![
                shadow(1, Limit::per(3, 60, 3).unwrap()),
                shadow(1, Limit::per(2, 60, 2).unwrap()),
            ],
            arrivals_us: (0..4)
                .map(|i| t0 + i)
                .chain([t0 + 30 * SECOND, t0 + 60 * SECOND])
                .collect(),
        },
        Case {
            name: "a failover to a clock a minute behind costs the skew once",
            reads_between: false,
            charges: vec![
                Charge::one(Limit::per(2, 60, 2).unwrap()),
                Charge::one(Limit::per(100, 3600, 100).unwrap()),
            ],
            arrivals_us: vec![
                t0 + 120 * SECOND,
                t0 + 120 * SECOND,
                t0 + 60 * SECOND,
                t0 + 89 * SECOND,
                t0 + 90 * SECOND,
                t0 + 91 * SECOND,
            ],
        },
        Case {
            name: "a clock behind, with shadow policies in other hashes",
            reads_between: false,
            charges: vec![
                Charge::one(Limit::per(1, 60, 1).unwrap()),
                shadow(1, Limit::per(1, 60, 1).unwrap()),
            ],
            arrivals_us: vec![
                t0 + 100 * SECOND,
                t0 + 40 * SECOND,
                t0 + 99 * SECOND,
                t0 + 100 * SECOND,
            ],
        },
        Case {
            name: "three limits in one hash, the middle one denies",
            reads_between: false,
            charges: vec![
                Charge::one(Limit::per(5, 1, 5).unwrap()),
                Charge::one(Limit::per(2, 60, 2).unwrap()),
                Charge::one(Limit::per(100, 86_400, 100).unwrap()),
            ],
            arrivals_us: (0..4)
                .map(|i| t0 + i)
                .chain([t0 + 30 * SECOND, t0 + 31 * SECOND])
                .collect(),
        },
    ]
}

/// The tokens and the time `keyed`'s bucket holds in Redis, each `None` when absent.
fn stored_state(conn: &mut redis::Connection, keyed: &KeyedCharge) -> Vec<Option<u64>> {
    let fields = [
        format!("{}:tokens", keyed.field),
        format!("{}:ts", keyed.field),
    ];
    redis::cmd("HMGET")
        .arg(&*keyed.key)
        .arg(&fields)
        .query(conn)
        .unwrap()
}

#[tokio::test]
async fn the_lua_script_the_memory_store_and_the_rust_arithmetic_agree_on_every_case() {
    let redis = RedisProcess::server(None, &[]);
    let mut conn = redis.connection();
    for mode in MODES {
        let memory = MemoryStore::default();
        for case in parity_table() {
            let store = redis_store(&redis, mode);
            let prefix = unique_prefix("parity");
            let mut states: Vec<Option<BucketState>> = vec![None; case.charges.len()];
            for (n, &now) in case.arrivals_us.iter().enumerate() {
                let charges = case.charges_at(n);
                let keyed: Vec<KeyedCharge> = charges
                    .iter()
                    .enumerate()
                    .map(|(i, charge)| KeyedCharge {
                        // The enforced limits share one hash, as one policy's do; each
                        // shadow group has its own, as each shadow policy does.
                        key: match charge.group {
                            Group::Enforced => format!("{prefix}:enforced:{{k}}").into(),
                            Group::Shadow(n) => format!("{prefix}:shadow-{n}:{{k}}").into(),
                        },
                        field: format!("limit-{i}").into(),
                        charge: *charge,
                    })
                    .collect();
                let (taken, taken_writes) = bucket::take_all(&charges, &states, now);
                taken_writes.apply_to(&mut states);
                let expected = Taken {
                    admitted: taken.admitted,
                    levels: taken.levels,
                };
                let what = |store: &str| {
                    let reads = if case.reads_between {
                        ", with reads"
                    } else {
                        ""
                    };
                    format!("{}{reads} ({mode:?}): {store} at {now}", case.name)
                };
                let from_lua = store.take_at(&keyed, Some(now)).await.unwrap();
                // A hash's expiry runs in real time, from times on the test's clock: one
                // that fills within milliseconds there would be gone before the next
                // arrival here. The script reads only the hash's `exp` field, so keeping
                // the hash changes no decision (the expiry has tests of its own).
                for keyed in &keyed {
                    let _: i64 = redis::cmd("PERSIST")
                        .arg(&*keyed.key)
                        .query(&mut conn)
                        .unwrap();
                }
                let from_memory = memory.take_all_at(&keyed, now);
                assert_eq!(from_lua, expected, "{}", what("Lua"));
                assert_eq!(from_memory, expected, "{}", what("memory"));
                // And each wrote exactly what the arithmetic wrote: nothing for a read or
                // a denial, a bucket never written stays absent.
                for (keyed, state) in keyed.iter().zip(&states) {
                    let stored = stored_state(&mut conn, keyed);
                    let expected = state.map(|s| vec![Some(s.tokens), Some(s.updated_us)]);
                    // Unless it expired before PERSIST reached it: a hash whose buckets
                    // fill within a second on the test's clock (a billion a second after
                    // one token) lives a millisecond or so.
                    let may_have_expired = state.is_some_and(|s| {
                        let limit = &keyed.charge.limit;
                        Level::from_units(limit, true, s.tokens, 0).full_after_us < SECOND
                    });
                    if !(may_have_expired && stored == [None, None]) {
                        assert_eq!(
                            stored,
                            expected.unwrap_or(vec![None, None]),
                            "{}: {}",
                            what("Lua's hash"),
                            keyed.field
                        );
                    }
                    assert_eq!(
                        memory.state(&keyed.key, &keyed.field),
                        *state,
                        "{}: {}",
                        what("memory's bucket"),
                        keyed.field
                    );
                }
            }
        }
    }
}

/// One bucket a request of a batch row draws on: its hash (one policy and key), its field
/// (one limit) and what the request asks of it.
#[derive(Clone, Copy)]
struct Draw {
    hash: &'static str,
    field: &'static str,
    charge: Charge,
}

/// One row of the batch parity table: calls, each at a time (µs) with its requests, every
/// request decided in one call with the others of its call.
struct BatchCase {
    name: &'static str,
    calls: Vec<(u64, Vec<Vec<Draw>>)>,
}

fn batch_parity_table() -> Vec<BatchCase> {
    let t0 = 1_790_000_000 * SECOND;
    let draw = |hash, field, limit: Limit| Draw {
        hash,
        field,
        charge: Charge::one(limit),
    };
    let costing = |cost, draw: Draw| Draw {
        charge: Charge {
            cost,
            ..draw.charge
        },
        ..draw
    };
    let shadow = |group, draw: Draw| Draw {
        charge: Charge {
            group: Group::Shadow(group),
            ..draw.charge
        },
        ..draw
    };
    let ten = Limit::per(10, 60, 10).unwrap();
    let three = Limit::per(3, 60, 3).unwrap();
    let hour = Limit::per(4, 3600, 4).unwrap();
    let a = draw("a", "l", three);
    let b = draw("b", "l", ten);
    vec![
        BatchCase {
            name: "twelve requests on one bucket in one call: the burst passes, then denials",
            calls: vec![(t0, vec![vec![draw("a", "l", ten)]; 12])],
        },
        BatchCase {
            name: "requests on two buckets interleaved: each bucket sees its own in order",
            calls: vec![
                (
                    t0,
                    vec![vec![a], vec![b], vec![a], vec![a], vec![b], vec![a]],
                ),
                (t0 + 20 * SECOND, vec![vec![a], vec![a], vec![b]]),
            ],
        },
        BatchCase {
            name: "a denied request between two that pass pays nothing, and the next still has its tokens",
            calls: vec![(
                t0,
                vec![vec![costing(2, a)], vec![costing(2, a)], vec![a], vec![a]],
            )],
        },
        BatchCase {
            name: "a policy with two limits and one with one limit on the same hash, in turn",
            calls: vec![(
                t0,
                vec![
                    vec![draw("p", "minute", three), draw("p", "hour", hour)],
                    vec![draw("p", "minute", three)],
                    vec![draw("p", "minute", three), draw("p", "hour", hour)],
                    vec![draw("p", "minute", three), draw("p", "hour", hour)],
                    vec![draw("p", "hour", hour)],
                    vec![draw("p", "hour", hour)],
                ],
            )],
        },
        BatchCase {
            name: "several hashes per request, shadow policies among them",
            calls: vec![
                (
                    t0,
                    vec![
                        vec![a, shadow(1, draw("s", "l", Limit::per(1, 60, 1).unwrap()))],
                        vec![a, shadow(1, draw("s", "l", Limit::per(1, 60, 1).unwrap()))],
                        vec![b, a],
                        vec![a, b],
                        vec![b],
                    ],
                ),
                (
                    t0 + 20 * SECOND,
                    vec![vec![
                        a,
                        shadow(1, draw("s", "l", Limit::per(1, 60, 1).unwrap())),
                    ]],
                ),
            ],
        },
        BatchCase {
            name: "reads between payments in one call report what the next request finds",
            calls: vec![(
                t0,
                vec![
                    vec![costing(0, a)],
                    vec![a],
                    vec![costing(0, a)],
                    vec![costing(3, a)],
                    vec![costing(0, a), costing(0, b)],
                ],
            )],
        },
        BatchCase {
            name: "a clock behind the stored buckets: the first request rebases, the next ones see it",
            calls: vec![
                (t0 + 120 * SECOND, vec![vec![a], vec![a], vec![a]]),
                (
                    t0 + 60 * SECOND,
                    vec![vec![a], vec![costing(0, a)], vec![a]],
                ),
                (t0 + 80 * SECOND, vec![vec![a], vec![a]]),
            ],
        },
    ]
}

#[tokio::test]
async fn a_batch_is_decided_as_the_rust_arithmetic_decides_its_requests_one_after_another() {
    let redis = RedisProcess::server(None, &[]);
    let mut conn = redis.connection();
    for mode in MODES {
        for case in batch_parity_table() {
            let store = redis_store(&redis, mode);
            let prefix = unique_prefix("batch-parity");
            let keyed = |draw: &Draw| KeyedCharge {
                key: format!("{prefix}:{}:{{k}}", draw.hash).into(),
                field: draw.field.into(),
                charge: draw.charge,
            };
            let mut states: HashMap<(&str, &str), BucketState> = HashMap::new();
            for (call, (now, requests)) in case.calls.iter().enumerate() {
                let what = format!("{} ({mode:?}), call {call}", case.name);
                let expected: Vec<Taken> = requests
                    .iter()
                    .map(|request| {
                        let charges: Vec<Charge> = request.iter().map(|d| d.charge).collect();
                        let mut held: Vec<Option<BucketState>> = request
                            .iter()
                            .map(|d| states.get(&(d.hash, d.field)).copied())
                            .collect();
                        let (taken, writes) = bucket::take_all(&charges, &held, *now);
                        writes.apply_to(&mut held);
                        for (draw, state) in request.iter().zip(held) {
                            if let Some(state) = state {
                                states.insert((draw.hash, draw.field), state);
                            }
                        }
                        taken
                    })
                    .collect();
                let requests: Vec<Vec<KeyedCharge>> = requests
                    .iter()
                    .map(|request| request.iter().map(keyed).collect())
                    .collect();

                let answers = store.take_batch_at(&requests, Some(*now)).await.unwrap();

                let answers: Vec<Taken> = answers.into_iter().map(Result::unwrap).collect();
                assert_eq!(answers, expected, "{what}");
                // As in the table above: the expiry runs in real time, from test clocks.
                for key in requests.iter().flatten().map(|k| &k.key) {
                    let _: i64 = redis::cmd("PERSIST").arg(&**key).query(&mut conn).unwrap();
                }
                for draw in requests.iter().flatten() {
                    let stored = stored_state(&mut conn, draw);
                    let hash = draw.key.split(':').nth(1).unwrap();
                    let state = states
                        .iter()
                        .find(|((h, f), _)| *h == hash && **f == *draw.field);
                    let expected = match state {
                        Some((_, s)) => vec![Some(s.tokens), Some(s.updated_us)],
                        None => vec![None, None],
                    };
                    assert_eq!(stored, expected, "{what}: {}", draw.field);
                }
            }
        }
    }
}

#[tokio::test]
async fn a_foreign_value_at_one_requests_key_fails_that_request_alone_in_a_batch() {
    let redis = RedisProcess::server(None, &[]);
    for mode in MODES {
        let store = redis_store(&redis, mode);
        let prefix = unique_prefix("batch-foreign");
        let [string_key, garbage_key] = foreign_values(&redis, &prefix);
        let bucket_key = format!("{prefix}:{{bucket}}");
        let limit = Limit::per(2, 60, 2).unwrap();
        let requests = [
            &bucket_key,
            &string_key,
            &bucket_key,
            &garbage_key,
            &bucket_key,
        ]
        .map(|key| one(key, limit));

        let answers = store.take_batch_at(&requests, None).await.unwrap();

        let admitted: Vec<Option<bool>> = answers
            .iter()
            .map(|answer| answer.as_ref().ok().map(|taken| taken.admitted))
            .collect();
        assert_eq!(
            admitted,
            [Some(true), None, Some(true), None, Some(false)],
            "{mode:?}"
        );
        for failed in [&answers[1], &answers[3]] {
            let error = failed
                .as_ref()
                .expect_err("a foreign value decides nothing");
            assert_eq!(error.kind(), "wrongtype", "{mode:?}: {error}");
        }
        let tokens: Vec<String> = redis.command(&["HMGET", &bucket_key, "l:tokens"]);
        assert_eq!(
            tokens,
            ["0"],
            "{mode:?}: the two that passed paid, once each"
        );
    }
}
