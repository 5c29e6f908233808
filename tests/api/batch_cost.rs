//! What batching saves Redis: the master's CPU and calls per decision, with
//! `REDIS_BATCH_MAX=1` (a call per decision) and with batching on, while two in-process
//! instances decide a steady stream from many connections. A measurement, not a check:
//! ignored by default, run on its own, bounded in time and count.
//!
//! ```text
//! cargo test -p ratelimiter --test api batch_cost -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `BATCH_COST_CAPS` (e.g. `1,8,32,64`), `BATCH_COST_CONNECTIONS` (e.g. `1,64`),
//! `BATCH_COST_DRIVERS` (`http`, `store`), `BATCH_COST_POLICIES` (`allow`, `returning`),
//! `BATCH_COST_REPLICAS` (the master's replicas, default 2) and `BATCH_COST_SECONDS` (at
//! most 30) change what is measured.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ratelimiter::bucket::{Charge, Limit};
use ratelimiter::store::redis::{
    ConnectionMode, ConnectionSettings, Master, MasterSlot, RedisStore,
};
use ratelimiter::store::{KeyedCharge, Store};

use testkit::{RedisProcess, TestApp, client_from, cpu_us, unique_prefix};

/// Hard bounds of one phase, whatever the environment says.
const MOST_SECONDS: u64 = 30;
const MOST_REQUESTS: u64 = 2_000_000;

fn list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|n| n.trim().parse().expect("a number"))
        .collect()
}

/// Read and write system calls `pid` has made (`/proc/<pid>/io`): the socket reads and
/// writes of an event loop that pipelining and batching both try to share among decisions.
fn syscalls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/<pid>/io");
    io.lines()
        .filter_map(|line| {
            line.strip_prefix("syscr: ")
                .or(line.strip_prefix("syscw: "))
        })
        .map(|count| count.parse::<u64>().unwrap())
        .sum()
}

/// Calls of the bucket script Redis ran (`EVALSHA` and `EVAL`).
fn script_calls(redis: &RedisProcess) -> u64 {
    redis.command_calls("evalsha") + redis.command_calls("eval")
}

struct Phase {
    decisions: u64,
    calls: u64,
    redis_cpu_us: u64,
    redis_syscalls: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

/// `connections` clients, each with its own address (so its own bucket) and its own
/// connection, sending back to back to the two instances in turn for `seconds`.
async fn drive(apps: &[TestApp; 2], connections: u64, seconds: u64) -> (u64, Vec<u64>) {
    let deadline = Instant::now() + Duration::from_secs(seconds.min(MOST_SECONDS));
    let per_connection = MOST_REQUESTS / connections;
    let tasks: Vec<_> = (0..connections)
        .map(|n| {
            let source = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                1 + (n / 250) as u8,
                1 + (n % 250) as u8,
            ));
            let client = client_from(source);
            let url = apps[(n % 2) as usize].at("/limited_endpoint");
            tokio::spawn(async move {
                let mut timed = Timed::until(deadline, per_connection);
                while let Some(sent) = timed.next() {
                    let response = client.get(&url).send().await.unwrap();
                    assert_eq!(response.status(), 200, "every request is admitted");
                    timed.record(sent);
                }
                timed.latencies
            })
        })
        .collect();
    let latencies = joined(tasks).await;
    (latencies.len() as u64, latencies)
}

/// The latencies (µs) of decisions made one after another until a deadline or a count.
struct Timed {
    deadline: Instant,
    most: u64,
    latencies: Vec<u64>,
}

impl Timed {
    fn until(deadline: Instant, most: u64) -> Self {
        Self {
            deadline,
            most,
            latencies: Vec::new(),
        }
    }

    /// When the next decision is sent, if there is one to send.
    fn next(&self) -> Option<Instant> {
        let now = Instant::now();
        (now < self.deadline && (self.latencies.len() as u64) < self.most).then_some(now)
    }

    fn record(&mut self, sent: Instant) {
        self.latencies.push(sent.elapsed().as_micros() as u64);
    }
}

/// Every task's latencies, once all have ended.
async fn joined(tasks: Vec<tokio::task::JoinHandle<Vec<u64>>>) -> Vec<u64> {
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies
}

/// What sends the decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    /// HTTP clients against two in-process instances (two workers each).
    Http,
    /// Two stores, each on two threads of its own as an instance's workers, asked
    /// directly: what Redis sees when nothing in front of the store is the bottleneck.
    Store,
}

/// Two stores on `redis` deciding with `policy`, `connections` tasks spread over two
/// threads each, back to back until `seconds` pass.
fn drive_stores(
    redis: &RedisProcess,
    policy: Policy,
    cap: u64,
    connections: u64,
    seconds: u64,
) -> (u64, Vec<u64>) {
    let (rate, window) = policy.limit();
    let limit = Limit::per(
        rate.parse().unwrap(),
        window.parse().unwrap(),
        rate.parse().unwrap(),
    )
    .unwrap();
    let prefix = unique_prefix("cost-store");
    let deadline = Instant::now() + Duration::from_secs(seconds.min(MOST_SECONDS));
    let per_connection = MOST_REQUESTS / connections;
    let threads: Vec<_> = (0..4u64)
        .map(|thread| {
            let info =
                redis::IntoConnectionInfo::into_connection_info(redis.url().as_str()).unwrap();
            let prefix = prefix.clone();
            std::thread::spawn(move || {
                let timeout = Duration::from_secs(2);
                let slot = Arc::new(MasterSlot::default());
                let mode = ConnectionMode::Multiplexed {
                    batch_max: cap as usize,
                };
                let connections_settings = ConnectionSettings { mode, timeout };
                slot.install(Arc::new(Master::open(info, connections_settings).unwrap()));
                let store = RedisStore::new(slot, timeout);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let tasks: Vec<_> = (0..connections)
                        .filter(|n| n % 4 == thread)
                        .map(|n| {
                            let store = store.clone();
                            let charges = vec![KeyedCharge {
                                key: format!("{prefix}:{{client-{n}}}").into(),
                                field: "l".into(),
                                charge: Charge::one(limit),
                            }];
                            tokio::spawn(async move {
                                let mut timed = Timed::until(deadline, per_connection);
                                while let Some(sent) = timed.next() {
                                    let taken = store.take(&charges).await.unwrap();
                                    assert!(taken.admitted, "every request is admitted");
                                    timed.record(sent);
                                }
                                timed.latencies
                            })
                        })
                        .collect();
                    joined(tasks).await
                })
            })
        })
        .collect();
    let latencies: Vec<u64> = threads
        .into_iter()
        .flat_map(|thread| thread.join().unwrap())
        .collect();
    (latencies.len() as u64, latencies)
}

/// The policy every decision is made under; both admit every request.
#[derive(Clone, Copy, Debug)]
enum Policy {
    /// 10^9 per second, as `scripts/bench.sh --phases allow`: a bucket is full again a
    /// microsecond after it paid, so each decision writes a new hash that expires a
    /// millisecond later (HSET, PEXPIRE, and the expiry).
    Allow,
    /// 10^6 per day: a client's bucket never fills between its requests, so its hash
    /// stays and each decision writes two fields of it (HSET): a returning client.
    Returning,
}

impl Policy {
    fn parse(name: &str) -> Self {
        match name {
            "allow" => Policy::Allow,
            "returning" => Policy::Returning,
            other => panic!("BATCH_COST_POLICIES: allow or returning, not {other}"),
        }
    }

    /// `RATE_LIMIT` and `TIME_WINDOW`.
    fn limit(self) -> (&'static str, &'static str) {
        match self {
            Policy::Allow => ("1000000000", "1"),
            Policy::Returning => ("1000000", "86400"),
        }
    }
}

async fn phase(
    redis: &RedisProcess,
    driver: Driver,
    policy: Policy,
    cap: u64,
    connections: u64,
    seconds: u64,
) -> Phase {
    if driver == Driver::Store {
        // The stores' threads run their own runtimes; this one waits without holding one
        // of its workers.
        return tokio::task::block_in_place(|| {
            drive_stores(redis, policy, cap, connections, 1);
            let (cpu_before, calls_before) = (cpu_us(redis.pid()), script_calls(redis));
            let syscalls_before = syscalls(redis.pid());
            let started = Instant::now();
            let (decisions, latencies_us) = drive_stores(redis, policy, cap, connections, seconds);
            let elapsed = started.elapsed();
            Phase {
                decisions,
                calls: script_calls(redis) - calls_before,
                redis_cpu_us: cpu_us(redis.pid()) - cpu_before,
                redis_syscalls: syscalls(redis.pid()) - syscalls_before,
                elapsed,
                latencies_us,
            }
        });
    }
    let (rate, window) = policy.limit();
    let vars = [
        ("REDIS_URL", redis.url()),
        ("KEY_PREFIX", unique_prefix(&format!("cost-{cap}"))),
        ("RATE_LIMIT", rate.into()),
        ("TIME_WINDOW", window.into()),
        ("DENY_CACHE_SIZE", "0".into()),
        ("METRICS", "off".into()),
        ("REDIS_BATCH_MAX", cap.to_string()),
    ];
    let apps = [TestApp::spawn_with(&vars), TestApp::spawn_with(&vars)];
    drive(&apps, connections, 1).await;
    let (cpu_before, calls_before) = (cpu_us(redis.pid()), script_calls(redis));
    let syscalls_before = syscalls(redis.pid());
    let started = Instant::now();
    let (decisions, latencies_us) = drive(&apps, connections, seconds).await;
    let elapsed = started.elapsed();
    let (cpu_after, calls_after) = (cpu_us(redis.pid()), script_calls(redis));
    let redis_syscalls = syscalls(redis.pid()) - syscalls_before;

    for app in apps {
        app.stop().await;
    }
    Phase {
        decisions,
        calls: calls_after - calls_before,
        redis_cpu_us: cpu_after - cpu_before,
        redis_syscalls,
        elapsed,
        latencies_us,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it on its own, see the module's doc"]
async fn batch_cost() {
    let redis = RedisProcess::server(None, &[]);
    // As the shipped topologies run: the master's effects are replicated.
    let replicas: Vec<RedisProcess> = (0..list("BATCH_COST_REPLICAS", "2")[0])
        .map(|_| RedisProcess::server(Some(redis.port), &[]))
        .collect();
    testkit::wait_until(
        "the replicas to be in sync",
        Duration::from_secs(10),
        || {
            let info: String = redis.command(&["INFO", "replication"]);
            info.matches("state=online").count() == replicas.len()
        },
    );
    let caps = list("BATCH_COST_CAPS", "1,32");
    let seconds = list("BATCH_COST_SECONDS", "5")[0];
    let policies = std::env::var("BATCH_COST_POLICIES").unwrap_or("allow,returning".into());
    let drivers = std::env::var("BATCH_COST_DRIVERS").unwrap_or("http,store".into());
    println!(
        "driver | policy | connections | REDIS_BATCH_MAX | decisions/s | calls/decision | master CPU µs/decision | master CPU % | master reads+writes/decision | p50 µs | p99 µs"
    );
    for driver in drivers.split(',').map(|name| match name {
        "http" => Driver::Http,
        "store" => Driver::Store,
        other => panic!("BATCH_COST_DRIVERS: http or store, not {other}"),
    }) {
        for policy in policies.split(',').map(Policy::parse) {
            for connections in list("BATCH_COST_CONNECTIONS", "1,64") {
                measure(&redis, driver, policy, connections, &caps, seconds).await;
            }
        }
    }
}

/// One line per cap, each CPU figure beside the first cap's.
async fn measure(
    redis: &RedisProcess,
    driver: Driver,
    policy: Policy,
    connections: u64,
    caps: &[u64],
    seconds: u64,
) {
    let mut unbatched_cpu = None;
    for &cap in caps {
        let mut phase = phase(redis, driver, policy, cap, connections, seconds).await;
        phase.latencies_us.sort_unstable();
        let per_decision = phase.redis_cpu_us as f64 / phase.decisions as f64;
        let relative = match unbatched_cpu {
            Some((first, base)) => format!(" ({:.2}x of cap {first})", per_decision / base),
            None => String::new(),
        };
        unbatched_cpu = unbatched_cpu.or(Some((cap, per_decision)));
        println!(
            "{driver:?} | {policy:?} | {connections} | {cap} | {:.0} | {:.3} | {per_decision:.2}{relative} | {:.0} | {:.3} | {} | {}",
            phase.decisions as f64 / phase.elapsed.as_secs_f64(),
            phase.calls as f64 / phase.decisions as f64,
            phase.redis_cpu_us as f64 / phase.elapsed.as_micros() as f64 * 100.0,
            phase.redis_syscalls as f64 / phase.decisions as f64,
            percentile(&phase.latencies_us, 0.5),
            percentile(&phase.latencies_us, 0.99),
        );
    }
}
