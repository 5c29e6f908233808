//! The Redis store against a real `redis-server`: parity with the Rust arithmetic,
//! exactness across instances, script reloading and key expiry.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ratelimiter::identity::ClientKey;
use ratelimiter::limiter::{Decision, Policy, bucket};
use ratelimiter::store::memory::MemoryStore;
use ratelimiter::store::redis::{ConnectionMode, Master, MasterSlot, RedisStore};

use crate::support::{
    RedisProcess, TestApp, all_at_once, client, header, unique_prefix, wait_until,
};

const SECOND: u64 = 1_000_000;

const MODES: [ConnectionMode; 2] = [ConnectionMode::Multiplexed, ConnectionMode::Pool];

/// A Redis store on `redis`, with its master installed directly (no resolver).
fn redis_store(redis: &RedisProcess, prefix: &str, mode: ConnectionMode) -> RedisStore {
    let info = redis::IntoConnectionInfo::into_connection_info(redis.url().as_str()).unwrap();
    let timeout = Duration::from_secs(2);
    let slot = Arc::new(MasterSlot::default());
    slot.install(Arc::new(Master::open(info, mode, 2, timeout).unwrap()));
    RedisStore::new(slot, mode, prefix.to_string(), timeout)
}

/// One row of the parity table: a policy and the times (µs) at which one client asks.
struct Case {
    name: &'static str,
    rate: u64,
    window_s: u64,
    burst: u64,
    arrivals_us: Vec<u64>,
}

fn parity_table() -> Vec<Case> {
    // Clock values near today's epoch microseconds, as Redis TIME would give.
    let t0 = 1_790_000_000 * SECOND;
    vec![
        Case {
            name: "burst then denied",
            rate: 10,
            window_s: 60,
            burst: 10,
            arrivals_us: (0..12).map(|i| t0 + i).collect(),
        },
        Case {
            name: "one token every six seconds",
            rate: 10,
            window_s: 60,
            burst: 10,
            arrivals_us: (0..10)
                .map(|i| t0 + i)
                .chain((1..=8).map(|s| t0 + s * 3 * SECOND))
                .collect(),
        },
        Case {
            name: "retry exactly at the boundary",
            rate: 1,
            window_s: 7,
            burst: 1,
            arrivals_us: vec![
                t0,
                t0 + 7 * SECOND - 1,
                t0 + 7 * SECOND,
                t0 + 7 * SECOND + 1,
            ],
        },
        Case {
            name: "burst above rate, long idle refills to full",
            rate: 3,
            window_s: 10,
            burst: 8,
            arrivals_us: (0..9)
                .map(|i| t0 + i * 1_000)
                .chain([t0 + 3600 * SECOND, t0 + 3600 * SECOND + 1])
                .collect(),
        },
        Case {
            name: "clock going backwards refills nothing",
            rate: 2,
            window_s: 1,
            burst: 2,
            arrivals_us: vec![
                t0 + 10 * SECOND,
                t0 + 10 * SECOND,
                t0 + 5 * SECOND,
                t0 + 10 * SECOND + 499_999,
                t0 + 10 * SECOND + 500_000,
            ],
        },
        Case {
            name: "large policy stays exact",
            rate: 1_000_000,
            window_s: 3600,
            burst: 2_000_000,
            arrivals_us: vec![t0, t0 + 1, t0 + 3_600, t0 + 7_200_000_000],
        },
    ]
}

#[tokio::test]
async fn the_lua_script_the_memory_store_and_the_rust_arithmetic_agree_on_every_case() {
    let redis = RedisProcess::server(None, &[]);
    for mode in MODES {
        let memory = MemoryStore::default();
        for (index, case) in parity_table().into_iter().enumerate() {
            let policy = Policy::parse(case.rate, case.window_s, case.burst).unwrap();
            let store = redis_store(&redis, &unique_prefix("parity"), mode);
            let key = ClientKey::V4(Ipv4Addr::new(10, 0, 0, index as u8));
            let mut state = None;
            for &now in &case.arrivals_us {
                let (expected, new_state) = bucket::take(&policy, state, now);
                state = new_state.or(state);
                let from_lua: Decision = store.take_at(key, policy, Some(now)).await.unwrap();
                let from_memory = memory.take_at(&key, &policy, now);
                assert_eq!(from_lua, expected, "{} ({mode:?}): Lua at {now}", case.name);
                assert_eq!(from_memory, expected, "{}: memory at {now}", case.name);
            }
        }
    }
}

#[tokio::test]
async fn a_bucket_key_expires_exactly_when_it_would_be_full_again() {
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("ttl");
    let store = redis_store(&redis, &prefix, ConnectionMode::Multiplexed);
    let key = ClientKey::V4(Ipv4Addr::new(192, 0, 2, 1));
    let policy = Policy::parse(10, 60, 10).unwrap();
    store.take_at(key, policy, None).await.unwrap();
    let pttl: i64 = redis.command(&["PTTL", &store.bucket_key(&key)]);
    assert!((5_900..=6_000).contains(&pttl), "PTTL {pttl}");
    let fields: Vec<String> = redis.command(&["HKEYS", &store.bucket_key(&key)]);
    assert_eq!(fields, vec!["tokens", "ts", "exp"]);
}

#[tokio::test]
async fn a_returning_clients_key_lives_one_refill_time_and_its_next_decisions_write_only_the_hash()
{
    let redis = RedisProcess::server(None, &[]);
    let store = redis_store(
        &redis,
        &unique_prefix("extend"),
        ConnectionMode::Multiplexed,
    );
    let key = ClientKey::V4(Ipv4Addr::new(192, 0, 2, 4));
    let bucket_key = store.bucket_key(&key);
    let policy = Policy::parse(10, 60, 10).unwrap();
    store.take_at(key, policy, None).await.unwrap();
    store.take_at(key, policy, None).await.unwrap();
    // Ten tokens take 60 s to come back: the longest this bucket can need.
    let pttl: i64 = redis.command(&["PTTL", &bucket_key]);
    assert!((59_900..=60_000).contains(&pttl), "PTTL {pttl}");
    let expiries_before = redis.command_calls("pexpire");
    let hash_writes_before = redis.command_calls("hset");
    for _ in 0..8 {
        assert!(store.take_at(key, policy, None).await.unwrap().allowed);
    }
    assert!(!store.take_at(key, policy, None).await.unwrap().allowed);
    assert_eq!(redis.command_calls("pexpire"), expiries_before);
    assert_eq!(redis.command_calls("hset"), hash_writes_before + 8);
    let pttl: i64 = redis.command(&["PTTL", &bucket_key]);
    assert!(pttl <= 60_000, "PTTL {pttl}");
}

#[tokio::test]
async fn an_idle_key_disappears_after_its_refill_time() {
    let redis = RedisProcess::server(None, &[]);
    let store = redis_store(&redis, &unique_prefix("idle"), ConnectionMode::Multiplexed);
    let key = ClientKey::V4(Ipv4Addr::new(192, 0, 2, 2));
    // Ten per second: one token is back 100 ms after it was taken.
    let policy = Policy::parse(10, 1, 10).unwrap();
    store.take_at(key, policy, None).await.unwrap();
    let bucket_key = store.bucket_key(&key);
    assert_eq!(redis.command::<i64>(&["EXISTS", &bucket_key]), 1);
    wait_until("the idle bucket to expire", Duration::from_secs(5), || {
        redis.command::<i64>(&["EXISTS", &bucket_key]) == 0
    });
}

#[tokio::test]
async fn a_denial_writes_nothing_to_redis() {
    let redis = RedisProcess::server(None, &[]);
    let store = redis_store(&redis, &unique_prefix("deny"), ConnectionMode::Multiplexed);
    let key = ClientKey::V4(Ipv4Addr::new(192, 0, 2, 3));
    let policy = Policy::parse(1, 60, 1).unwrap();
    assert!(store.take_at(key, policy, None).await.unwrap().allowed);
    let before: Vec<String> = redis.command(&["HMGET", &store.bucket_key(&key), "tokens", "ts"]);
    assert!(!store.take_at(key, policy, None).await.unwrap().allowed);
    let after: Vec<String> = redis.command(&["HMGET", &store.bucket_key(&key), "tokens", "ts"]);
    assert_eq!(before, after);
}

/// Both ways of reaching Redis, as `REDIS_CLIENT` names them.
const CLIENTS: [&str; 2] = ["multiplexed", "pool"];

#[tokio::test]
async fn two_instances_sharing_redis_admit_exactly_the_burst_of_200_concurrent_requests() {
    let redis = RedisProcess::server(None, &[]);
    for redis_client in CLIENTS {
        // One token per hour: no refill can happen during the test.
        let vars = [
            ("REDIS_URL", redis.url()),
            ("REDIS_CLIENT", redis_client.to_string()),
            ("KEY_PREFIX", unique_prefix("exact")),
            ("RATE_LIMIT", "10".into()),
            ("TIME_WINDOW", "3600".into()),
            ("REDIS_TIMEOUT_MS", "2000".into()),
        ];
        let first = TestApp::spawn_with(&vars);
        let second = TestApp::spawn_with(&vars);
        let client = client();
        let answers = all_at_once((0..200).map(|n| {
            let app = if n % 2 == 0 { &first } else { &second };
            client.get(app.at("/limited_endpoint"))
        }))
        .await;
        let mut passed = 0;
        for (status, source) in answers {
            assert!(
                status == 200 || status == 429,
                "{redis_client}: status {status}"
            );
            assert_eq!(source, "redis", "{redis_client}");
            passed += u32::from(status == 200);
        }
        assert_eq!(passed, 10, "REDIS_CLIENT={redis_client}");
    }
}

#[tokio::test]
async fn script_flush_is_recovered_without_a_failed_decision() {
    let redis = RedisProcess::server(None, &[]);
    for redis_client in CLIENTS {
        let app = TestApp::spawn(&[
            ("REDIS_URL", &redis.url()),
            ("REDIS_CLIENT", redis_client),
            ("KEY_PREFIX", &unique_prefix("noscript")),
            ("RATE_LIMIT", "100"),
        ]);
        let client = client();
        let loads_before = redis.command_calls("script|load");
        for round in 0..5 {
            let _: () = redis.command(&["SCRIPT", "FLUSH"]);
            let response = client
                .get(app.at("/limited_endpoint"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{redis_client}, round {round}");
            assert_eq!(
                header(&response, "X-RateLimit-Source"),
                "redis",
                "{redis_client}, round {round}"
            );
        }
        assert!(
            redis.command_calls("script|load") >= loads_before + 5,
            "{redis_client}: reloaded each time"
        );
    }
}

#[test]
fn a_policy_too_large_for_exact_lua_arithmetic_is_refused_at_start() {
    assert!(Policy::parse(1_000_000_000, 31_536_000, 1_000_000_000).is_err());
}

/// Floods one client's bucket from 32 concurrent connections for `duration`; returns
/// (admitted, requests, elapsed µs between the first and last request sent).
async fn flood(app: &TestApp, duration: Duration) -> (u64, u64, u64) {
    let client = client();
    let started = std::time::Instant::now();
    let tasks = (0..32).map(|_| {
        let (client, url) = (client.clone(), app.at("/limited_endpoint"));
        tokio::spawn(async move {
            let (mut admitted, mut requests, mut last_sent) = (0u64, 0u64, Duration::ZERO);
            while started.elapsed() < duration {
                last_sent = started.elapsed();
                let response = client.get(&url).send().await.unwrap();
                assert!(response.status() == 200 || response.status() == 429);
                admitted += u64::from(response.status() == 200);
                requests += 1;
            }
            (admitted, requests, last_sent)
        })
    });
    let (mut admitted, mut requests, mut last_sent) = (0, 0, Duration::ZERO);
    for task in tasks.collect::<Vec<_>>() {
        let (a, r, l) = task.await.unwrap();
        admitted += a;
        requests += r;
        last_sent = last_sent.max(l);
    }
    (admitted, requests, last_sent.as_micros() as u64)
}

#[tokio::test]
async fn the_denial_cache_admits_a_flooding_client_exactly_as_redis_alone_would() {
    let redis = RedisProcess::server(None, &[]);
    // Five per second, burst five: a token every 200 ms.
    let (rate, window_s, burst) = (5u64, 1u64, 5u64);
    for cache_size in ["0", "1000"] {
        let prefix = unique_prefix(&format!("deny-cache-{cache_size}"));
        let app = TestApp::spawn(&[
            ("REDIS_URL", &redis.url()),
            ("KEY_PREFIX", &prefix),
            ("RATE_LIMIT", &rate.to_string()),
            ("TIME_WINDOW", &window_s.to_string()),
            ("DENY_CACHE_SIZE", cache_size),
            ("REDIS_TIMEOUT_MS", "2000"),
        ]);
        let calls_before = redis.command_calls("evalsha");
        let (admitted, requests, elapsed_us) = flood(&app, Duration::from_millis(1500)).await;
        let calls = redis.command_calls("evalsha") - calls_before;
        // Exact up to the token still accruing at the end (and one that the last
        // requests may just miss): never more than the bucket allows.
        let bound = burst + elapsed_us * rate / (window_s * 1_000_000);
        assert!(
            admitted <= bound + 1 && admitted + 1 >= bound,
            "DENY_CACHE_SIZE={cache_size}: admitted {admitted}, bound {bound}"
        );
        println!(
            "DENY_CACHE_SIZE={cache_size}: {requests} requests, {admitted} admitted, {calls} EVALSHA calls"
        );
        if cache_size == "0" {
            // (The instance's own announcements are EVALSHA calls too.)
            assert!(
                calls >= requests,
                "without the cache every request asks Redis"
            );
        } else {
            assert!(
                calls * 4 < requests,
                "the cache answered most denials: {calls} calls for {requests} requests"
            );
        }
    }
}
