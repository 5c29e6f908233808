//! The Redis store against a real `redis-server`: exactness across instances, batching,
//! script reloading, key expiry and failures (parity with the Rust arithmetic: `parity`).

use std::sync::Arc;
use std::time::Duration;

use ratelimiter::bucket::{Charge, Level, Limit, LimitSpec};
use ratelimiter::store::redis::{
    ConnectionMode, ConnectionSettings, Master, MasterSlot, RedisStore,
};
use ratelimiter::store::{KeyedCharge, Store, StoreError};

use testkit::{
    RedisProcess, SERVICE_USER, TestApp, admitted, all_at_once, client, counter, header, metrics,
    unique_prefix, wait_until,
};

pub(crate) const SECOND: u64 = 1_000_000;

/// The default way to reach Redis: a connection per worker thread, on which the decisions
/// that queue behind a call go together.
pub(crate) const MULTIPLEXED: ConnectionMode = ConnectionMode::Multiplexed { batch_max: 32 };

pub(crate) const MODES: [ConnectionMode; 2] = [MULTIPLEXED, ConnectionMode::Pool { size: 2 }];

/// A Redis store on `redis`, with its master installed directly (no resolver).
pub(crate) fn redis_store(redis: &RedisProcess, mode: ConnectionMode) -> RedisStore {
    redis_store_and_slot(redis, mode).0
}

/// Two keys under `prefix` holding what no bucket is: a string, and a hash whose
/// `l:tokens` is no number.
pub(crate) fn foreign_values(redis: &RedisProcess, prefix: &str) -> [String; 2] {
    let string_key = format!("{prefix}:{{string}}");
    let _: () = redis.command(&["SET", &string_key, "not a bucket"]);
    let garbage_key = format!("{prefix}:{{garbage}}");
    let _: () = redis.command(&["HSET", &garbage_key, "l:tokens", "many", "l:ts", "1"]);
    [string_key, garbage_key]
}

/// [`redis_store`], and the slot its master is in, to install another.
fn redis_store_and_slot(
    redis: &RedisProcess,
    mode: ConnectionMode,
) -> (RedisStore, Arc<MasterSlot>) {
    let timeout = Duration::from_secs(2);
    let slot = Arc::new(MasterSlot::default());
    slot.install(open_master(redis, mode));
    (RedisStore::new(slot.clone(), timeout), slot)
}

/// `redis` as a master, newly opened: a generation of its own.
fn open_master(redis: &RedisProcess, mode: ConnectionMode) -> Arc<Master> {
    let info = redis::IntoConnectionInfo::into_connection_info(redis.url().as_str()).unwrap();
    let connections = ConnectionSettings {
        mode,
        timeout: Duration::from_secs(2),
    };
    Arc::new(Master::open(info, connections).unwrap())
}

/// One token from the bucket `key`: the request of a single-limit policy.
pub(crate) fn one(key: &str, limit: Limit) -> Vec<KeyedCharge> {
    vec![KeyedCharge {
        key: key.into(),
        field: "l".into(),
        charge: Charge::one(limit),
    }]
}

/// Decides one token from `key` on Redis's clock.
async fn take_one(store: &RedisStore, key: &str, limit: Limit) -> Level {
    store.take_at(&one(key, limit), None).await.unwrap().levels[0]
}

#[tokio::test]
async fn a_bucket_key_expires_exactly_when_it_would_be_full_again() {
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("ttl");
    let store = redis_store(&redis, MULTIPLEXED);
    let key = format!("{prefix}:{{192.0.2.1}}");
    take_one(&store, &key, Limit::per(10, 60, 10).unwrap()).await;
    let pttl: i64 = redis.command(&["PTTL", &key]);
    assert!((5_900..=6_000).contains(&pttl), "PTTL {pttl}");
    let fields: Vec<String> = redis.command(&["HKEYS", &key]);
    assert_eq!(fields, vec!["l:tokens", "l:ts", "exp"]);
}

#[tokio::test]
async fn a_returning_clients_key_lives_one_refill_time_and_its_next_decisions_write_only_the_hash()
{
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("extend");
    let store = redis_store(&redis, MULTIPLEXED);
    let bucket_key = format!("{prefix}:{{192.0.2.4}}");
    let policy = Limit::per(10, 60, 10).unwrap();
    take_one(&store, &bucket_key, policy).await;
    take_one(&store, &bucket_key, policy).await;
    // Ten tokens take 60 s to come back: the longest this bucket can need.
    let pttl: i64 = redis.command(&["PTTL", &bucket_key]);
    assert!((59_900..=60_000).contains(&pttl), "PTTL {pttl}");
    let expiries_before = redis.command_calls("pexpire");
    let hash_writes_before = redis.command_calls("hset");
    for _ in 0..8 {
        assert!(take_one(&store, &bucket_key, policy).await.allowed);
    }
    assert!(!take_one(&store, &bucket_key, policy).await.allowed);
    assert_eq!(redis.command_calls("pexpire"), expiries_before);
    assert_eq!(redis.command_calls("hset"), hash_writes_before + 8);
    let pttl: i64 = redis.command(&["PTTL", &bucket_key]);
    assert!(pttl <= 60_000, "PTTL {pttl}");
}

#[tokio::test]
async fn an_idle_key_disappears_after_its_refill_time() {
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("idle");
    let store = redis_store(&redis, MULTIPLEXED);
    let bucket_key = format!("{prefix}:{{192.0.2.2}}");
    // Ten per second: one token is back 100 ms after it was taken.
    take_one(&store, &bucket_key, Limit::per(10, 1, 10).unwrap()).await;
    assert_eq!(redis.command::<i64>(&["EXISTS", &bucket_key]), 1);
    wait_until("the idle bucket to expire", Duration::from_secs(5), || {
        redis.command::<i64>(&["EXISTS", &bucket_key]) == 0
    });
}

#[tokio::test]
async fn a_denial_writes_nothing_to_redis() {
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("deny");
    let store = redis_store(&redis, MULTIPLEXED);
    let key = format!("{prefix}:{{192.0.2.3}}");
    let policy = Limit::per(1, 60, 1).unwrap();
    assert!(take_one(&store, &key, policy).await.allowed);
    let before: Vec<String> = redis.command(&["HMGET", &key, "l:tokens", "l:ts"]);
    assert!(!take_one(&store, &key, policy).await.allowed);
    let after: Vec<String> = redis.command(&["HMGET", &key, "l:tokens", "l:ts"]);
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
        let (passed, sources) = admitted(answers);
        assert!(
            sources.iter().all(|source| source == "redis"),
            "{redis_client}: {sources:?}"
        );
        assert_eq!(passed, 10, "REDIS_CLIENT={redis_client}");
    }
}

/// Two instances sharing `redis` under one new prefix, every decision asking Redis (no
/// cached denials), `limit` per hour, with `extra` settings.
fn batching_pair(redis: &RedisProcess, limit: u32, extra: &[(&str, &str)]) -> [TestApp; 2] {
    let mut vars = vec![
        ("REDIS_URL", redis.url()),
        ("KEY_PREFIX", unique_prefix("batching")),
        ("RATE_LIMIT", limit.to_string()),
        ("TIME_WINDOW", "3600".into()),
        ("REDIS_TIMEOUT_MS", "2000".into()),
        ("DENY_CACHE_SIZE", "0".into()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    [TestApp::spawn_with(&vars), TestApp::spawn_with(&vars)]
}

/// `requests` requests at once, alternating between `apps`; answers (admitted, sources).
async fn flood_at_once(apps: &[TestApp; 2], requests: usize) -> (usize, Vec<String>) {
    let client = client();
    let answers =
        all_at_once((0..requests).map(|n| client.get(apps[n % 2].at("/limited_endpoint")))).await;
    admitted(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_batching_instances_admit_exactly_the_burst_of_400_concurrent_requests_in_fewer_calls()
{
    let redis = RedisProcess::server(None, &[]);
    let apps = batching_pair(&redis, 150, &[("REDIS_BATCH_MAX", "32")]);
    let calls_before = redis.command_calls("evalsha");

    let (admitted, sources) = flood_at_once(&apps, 400).await;

    let calls = redis.command_calls("evalsha") - calls_before;
    println!("400 decisions in {calls} calls");
    assert!(sources.iter().all(|s| s == "redis"), "{sources:?}");
    assert_eq!(admitted, 150);
    assert!(calls < 400, "decisions went together: {calls} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flushes_while_batches_are_in_flight_fail_no_decision() {
    let redis = RedisProcess::server(None, &[]);
    // A decision that failed would be a 503 here.
    let apps = batching_pair(&redis, 300, &[("FAIL_MODE", "closed")]);
    let resent_before = redis.command_calls("eval");
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flusher = {
        let (url, flooding) = (redis.admin_url(), flooding.clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut flushes = 0;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) && flushes < 400 {
                let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
                flushes += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            flushes
        })
    };

    let (admitted, sources) = flood_at_once(&apps, 600).await;
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let flushes = flusher.await.unwrap();

    let resent = redis.command_calls("eval") - resent_before;
    println!("{flushes} flushes, {resent} calls sent again with the script's text");
    assert!(sources.iter().all(|s| s == "redis"), "{sources:?}");
    assert_eq!(admitted, 300, "each decided once");
    assert!(resent >= 1, "a flush met a call in flight");
}

#[tokio::test]
async fn decisions_queued_when_the_master_changes_are_not_sent_to_the_old_one() {
    let redis = RedisProcess::server(None, &["--enable-debug-command", "yes"]);
    let (store, slot) = redis_store_and_slot(&redis, MULTIPLEXED);
    let prefix = unique_prefix("batch-master-change");
    let limit = Limit::per(100, 3600, 100).unwrap();
    let request = |n: usize| one(&format!("{prefix}:{{client-{n}}}"), limit);
    assert!(store.take_at(&request(0), None).await.unwrap().admitted);
    let calls_before = redis.command_calls("evalsha");
    // Redis answers nothing for 300 ms (nothing here may ask it meanwhile): the next call
    // stays in flight, and the decisions behind it on this thread's connection queue.
    let url = redis.admin_url();
    let sleeping = tokio::task::spawn_blocking(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("0.3")
            .query::<()>(&mut conn)
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let decide = |n: usize| {
        let store = store.clone();
        let request = request(n);
        tokio::spawn(async move { store.take_at(&request, None).await })
    };
    let in_flight = decide(1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let queued: Vec<_> = (2..=6).map(decide).collect();
    tokio::time::sleep(Duration::from_millis(20)).await;

    slot.install(open_master(&redis, MULTIPLEXED));

    assert!(
        in_flight.await.unwrap().unwrap().admitted,
        "the call in flight is answered"
    );
    for waiting in queued {
        let error = waiting
            .await
            .unwrap()
            .expect_err("not sent to the old master");
        assert_eq!(error.kind(), "connection", "{error}");
    }
    sleeping.await.unwrap();
    assert_eq!(
        redis.command_calls("evalsha") - calls_before,
        1,
        "only the call in flight ran"
    );
    assert!(
        store.take_at(&request(7), None).await.unwrap().admitted,
        "the new master decides"
    );
}

#[tokio::test]
async fn decisions_queued_behind_a_call_that_hangs_each_time_out_within_the_timeout() {
    let redis = RedisProcess::server(None, &["--enable-debug-command", "yes"]);
    let timeout = Duration::from_millis(100);
    let info = redis::IntoConnectionInfo::into_connection_info(redis.url().as_str()).unwrap();
    let slot = Arc::new(MasterSlot::default());
    let connections = ConnectionSettings {
        mode: MULTIPLEXED,
        timeout,
    };
    slot.install(Arc::new(Master::open(info, connections).unwrap()));
    let store = RedisStore::new(slot, timeout);
    let prefix = unique_prefix("batch-timeout");
    let limit = Limit::per(100, 3600, 100).unwrap();
    let request = |n: usize| one(&format!("{prefix}:{{client-{n}}}"), limit);
    assert!(store.take_at(&request(0), None).await.unwrap().admitted);
    // Redis answers nothing for 400 ms, four timeouts.
    let url = redis.admin_url();
    let sleeping = tokio::task::spawn_blocking(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("0.4")
            .query::<()>(&mut conn)
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    let decisions: Vec<_> = (1..=6)
        .map(|n| {
            let store = store.clone();
            let request = request(n);
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let answer = store.take_at(&request, None).await;
                (answer, started.elapsed())
            })
        })
        .collect();

    for decision in decisions {
        let (answer, took) = decision.await.unwrap();
        let error = answer.expect_err("Redis is asleep");
        assert_eq!(error.kind(), "timeout", "{error}");
        assert!(took < Duration::from_millis(250), "answered after {took:?}");
    }
    sleeping.await.unwrap();
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
        let resent_before = redis.command_calls("eval");
        for round in 0..5 {
            let _: () = redis.command(&["SCRIPT", "FLUSH"]);
            let response = app.get("/limited_endpoint").await;
            assert_eq!(response.status(), 200, "{redis_client}, round {round}");
            assert_eq!(
                header(&response, "X-RateLimit-Source"),
                "redis",
                "{redis_client}, round {round}"
            );
        }
        assert!(
            redis.command_calls("eval") >= resent_before + 5,
            "{redis_client}: sent again with the script each time"
        );
    }
}

#[tokio::test]
async fn a_request_denied_by_its_hour_limit_leaves_its_minute_bucket_untouched_in_redis() {
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("all-or-nothing");
    let store = redis_store(&redis, MULTIPLEXED);
    let policy = format!("{prefix}:api:{{k}}");
    let charges = vec![
        KeyedCharge {
            key: policy.as_str().into(),
            field: "minute".into(),
            charge: Charge::one(Limit::per(10, 60, 10).unwrap()),
        },
        KeyedCharge {
            key: policy.as_str().into(),
            field: "hour".into(),
            charge: Charge::one(Limit::per(1, 3600, 1).unwrap()),
        },
    ];
    assert!(store.take_at(&charges, None).await.unwrap().admitted);
    let before: Vec<String> = redis.command(&["HMGET", &policy, "minute:tokens", "minute:ts"]);
    let denied = store.take_at(&charges, None).await.unwrap();
    assert!(!denied.admitted);
    assert!(denied.levels[0].allowed && !denied.levels[1].allowed);
    let after: Vec<String> = redis.command(&["HMGET", &policy, "minute:tokens", "minute:ts"]);
    assert_eq!(before, after, "the minute bucket paid for a denied request");
}

#[test]
fn a_policy_too_large_for_exact_lua_arithmetic_is_refused_at_start() {
    assert!(
        Limit::parse(LimitSpec {
            rate: 7,
            window_s: 31_536_000,
            burst: 1_000_000_000
        })
        .is_err()
    );
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
            // One call per decision, so that calls count the decisions Redis made.
            ("REDIS_BATCH_MAX", "1"),
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
            // Not a tighter ratio: on a loaded machine more requests are in flight when a
            // cached denial ends, and each of those asks Redis.
            assert!(
                calls * 2 < requests,
                "the cache answered most denials: {calls} calls for {requests} requests"
            );
        }
    }
}

#[tokio::test]
async fn a_foreign_value_at_a_bucket_key_is_its_own_failure_never_a_full_bucket() {
    let redis = RedisProcess::server(None, &[]);
    for mode in MODES {
        let store = redis_store(&redis, mode);
        for key in &foreign_values(&redis, &unique_prefix("foreign")) {
            let error = store
                .take_at(&one(key, Limit::per(10, 60, 10).unwrap()), None)
                .await
                .expect_err("a foreign value decides nothing");
            assert_eq!(error.kind(), "wrongtype", "{mode:?} {key}: {error}");
            assert!(!error.suggests_master_change(), "{error}");
        }
    }
}

#[tokio::test]
async fn a_foreign_value_is_decided_by_fail_mode_and_counted_as_wrongtype() {
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("foreign-http");
    let app = TestApp::spawn(&[
        ("REDIS_URL", &redis.url()),
        ("KEY_PREFIX", &prefix),
        ("FAIL_MODE", "closed"),
    ]);
    let _: () = redis.command(&["SET", &format!("{prefix}:default:{{ip=127.0.0.1}}"), "x"]);
    let client = client();
    let response = app.get("/limited_endpoint").await;
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "x-ratelimit-source"), "closed");
    let text = metrics(&client, &app).await;
    assert_eq!(
        counter(&text, r#"ratelimit_store_errors_total{kind="wrongtype"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_reset_deletes_the_hash_of_every_bucket_named_and_fails_when_redis_is_gone() {
    let mut redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("reset");
    let store = redis_store(&redis, MULTIPLEXED);
    let (reset, kept) = (format!("{prefix}:{{a}}"), format!("{prefix}:{{b}}"));
    let policy = Limit::per(1, 60, 1).unwrap();
    for key in [&reset, &kept] {
        assert!(take_one(&store, key, policy).await.allowed);
    }
    store.reset(&one(&reset, policy)).await.unwrap();
    assert_eq!(redis.command::<i64>(&["EXISTS", &reset]), 0);
    assert_eq!(redis.command::<i64>(&["EXISTS", &kept]), 1);
    assert!(take_one(&store, &reset, policy).await.allowed, "full again");
    redis.kill();
    assert!(store.reset(&one(&reset, policy)).await.is_err());
}

#[test]
fn a_lone_failure_keeps_the_master_and_readonly_or_three_in_a_row_retire_it() {
    let redis = RedisProcess::server(None, &[]);
    let info = redis::IntoConnectionInfo::into_connection_info(redis.url().as_str()).unwrap();
    let connections = ConnectionSettings {
        mode: MULTIPLEXED,
        timeout: Duration::from_secs(1),
    };
    let master = Arc::new(Master::open(info, connections).unwrap());
    let slot = MasterSlot::default();
    slot.install(master.clone());
    let timeout = || StoreError::Timeout {
        after_ms: 100,
        source: None,
    };
    assert!(!slot.report_failure(&master, &timeout()));
    assert!(slot.is_usable(), "one timeout is no failover");
    slot.report_success();
    assert!(!slot.report_failure(&master, &timeout()));
    assert!(!slot.report_failure(&master, &timeout()));
    assert!(slot.is_usable(), "a success ended the first run");
    assert!(slot.report_failure(&master, &timeout()));
    assert!(!slot.is_usable(), "three failures in a row");

    slot.install(master.clone());
    let readonly = StoreError::MasterChanged {
        source: redis::RedisError::from((redis::ErrorKind::Client, "READONLY")).into(),
    };
    assert!(slot.report_failure(&master, &readonly));
    assert!(!slot.is_usable(), "a replica is no master, at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_ready_probes_that_time_out_sends_no_decision_to_fail_mode() {
    let redis = RedisProcess::server(None, &["--enable-debug-command", "yes"]);
    let app = TestApp::spawn(&[
        ("REDIS_URL", &redis.url()),
        ("KEY_PREFIX", &unique_prefix("ready-flood")),
        ("REDIS_TIMEOUT_MS", "100"),
        ("FAIL_MODE", "open"),
        ("RATE_LIMIT", "3"),
        ("TIME_WINDOW", "3600"),
        // Every decision below must reach the store, not a cached denial.
        ("DENY_CACHE_SIZE", "0"),
    ]);
    let client = client();
    let limited = || client.get(app.at("/limited_endpoint")).send();
    for _ in 0..3 {
        assert_eq!(limited().await.unwrap().status(), 200);
    }
    assert_eq!(limited().await.unwrap().status(), 429);
    // From now on discovery cannot confirm the master (ROLE is refused): a master taken
    // out of use would stay out, and every decision would go to FAIL_MODE=open.
    let _: () = redis.command(&["ACL", "SETUSER", SERVICE_USER, "-role"]);

    // Redis stops answering for 600 ms; the probes meanwhile time out.
    let url = redis.admin_url();
    let sleeping = tokio::task::spawn_blocking(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("0.6")
            .query::<()>(&mut conn)
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let probes = all_at_once((0..200).map(|_| client.get(app.at("/ready")))).await;
    assert!(
        probes.iter().any(|(status, _)| *status == 503),
        "no probe failed"
    );
    sleeping.await.unwrap();

    for _ in 0..5 {
        let response = limited().await.unwrap();
        assert_eq!(header(&response, "x-ratelimit-source"), "redis");
        assert_eq!(response.status(), 429, "the limit still holds");
    }
}
