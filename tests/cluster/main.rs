//! Redis Cluster mode against real processes: a cluster of 3 masters and 3 replicas from
//! the shipped `redis/cluster-node.conf` on free ports (`testkit::RedisCluster`) per test,
//! and service instances on it, logged in as the instances' user of `redis/users.acl`, as
//! the shipped topologies run them.
//!
//! - `batches`: a flood on one key decided in fewer calls, exactly, while scripts are
//!   flushed; decisions queued behind a stalled master falling back within the timeout.
//! - `exactness`: keys spread over every master, each admitted exactly its burst; a policy
//!   whose keys lie in two slots, with the refunds that keeps it exact.
//! - `faults`: scripts missing everywhere, a master killed, a slot moved under load, slots
//!   no master serves.
//! - `refund`: `bucket/refund.lua` against the Rust arithmetic it mirrors.
//! - `rls`: the rate-limit service's descriptors over every master, a request whose
//!   descriptors lie in two slots, hits given back on two masters, and a master killed
//!   under `ShouldRateLimit` calls.
//! - `spread`: the script calls of many keys spread evenly over the three masters.
//!
//! The tests run one at a time: each starts six Redis processes and two instances, and the
//! machine is shared. Timing is used only as a generous bound on hangs.

mod batches;
mod exactness;
mod faults;
mod refund;
mod rls;
mod spread;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use testkit::{
    Origin, RedisCluster, SERVICE_PASSWORD, SERVICE_USER, TestApp, Traffic, all_at_once, client,
    unique_prefix,
};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a master may be silent before its replica takes over. Short, so the tests run
/// fast; production uses several seconds.
const NODE_TIMEOUT_MS: u64 = 1000;
/// The default policy's burst; one token an hour comes back, so none during a test.
const BURST: u64 = 5;

/// The address of client `n` (any of 2^24), as Nginx would forward it.
fn client_ip(n: usize) -> String {
    format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
}

/// The hash that holds client `ip`'s default bucket.
fn bucket_key(prefix: &str, ip: &str) -> String {
    format!("{prefix}:default:{{ip={ip}}}")
}

/// Two instances in Cluster mode on `cluster`, sharing `prefix`, with `extra` on top. A
/// store call may take 2 s unless `extra` says otherwise: the machine is shared.
fn spawn_pair(
    cluster: &RedisCluster,
    prefix: &str,
    extra: &[(&str, String)],
) -> (TestApp, TestApp) {
    let spawn = |name: &str| {
        let mut vars = vec![
            ("REDIS_CLUSTER_NODES", cluster.seeds()),
            ("REDIS_USERNAME", SERVICE_USER.to_string()),
            ("REDIS_PASSWORD", SERVICE_PASSWORD.to_string()),
            ("TRUSTED_PROXIES", "127.0.0.1".to_string()),
            ("RATE_LIMIT", BURST.to_string()),
            ("TIME_WINDOW", "3600".to_string()),
            ("KEY_PREFIX", prefix.to_string()),
            ("INSTANCE_NAME", name.to_string()),
            ("REDIS_TIMEOUT_MS", "2000".to_string()),
        ];
        vars.extend(extra.iter().cloned());
        TestApp::spawn_with(&vars)
    };
    (spawn("app-1"), spawn("app-2"))
}

/// A cluster of its own, a new prefix named after `tag`, and [`spawn_pair`] on them.
fn pair_on_a_new_cluster(tag: &str) -> (RedisCluster, String, (TestApp, TestApp)) {
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let prefix = unique_prefix(tag);
    let pair = spawn_pair(&cluster, &prefix, &[]);
    (cluster, prefix, pair)
}

/// [`spawn_pair`] whose every decision asks Redis (no denials cached here), each store call
/// bounded by `timeout_ms`, with `extra` on top.
fn pair_asking_redis(
    cluster: &RedisCluster,
    prefix: &str,
    timeout_ms: u64,
    extra: &[(&str, String)],
) -> (TestApp, TestApp) {
    let mut vars = vec![
        ("REDIS_TIMEOUT_MS", timeout_ms.to_string()),
        ("DENY_CACHE_SIZE", "0".to_string()),
    ];
    vars.extend(extra.iter().cloned());
    spawn_pair(cluster, prefix, &vars)
}

/// `GET /limited_endpoint` of `app` from client `ip`, as Nginx forwards it.
async fn limited_from(http: &reqwest::Client, app: &TestApp, ip: &str) -> reqwest::Response {
    http.get(app.at("/limited_endpoint"))
        .header("X-Forwarded-For", ip)
        .send()
        .await
        .unwrap()
}

/// How many `EVALSHA` calls each master has served, by port.
fn evalsha_by_master(cluster: &RedisCluster) -> BTreeMap<u16, u64> {
    cluster
        .masters()
        .into_iter()
        .map(|master| (master.port, master.command_calls("evalsha")))
        .collect()
}

/// `requests` requests at once from client `ip`, alternating between `apps`; every answer
/// must be a 200 or a 429 decided by Redis. Returns how many passed.
async fn burst_from(apps: &[&TestApp], ip: &str, requests: usize) -> u64 {
    let http = client();
    let answers = all_at_once((0..requests).map(|n| {
        http.get(apps[n % apps.len()].at("/limited_endpoint"))
            .header("X-Forwarded-For", ip)
    }))
    .await;
    let mut passed = 0;
    for (status, source) in answers {
        assert!(status == 200 || status == 429, "{ip}: status {status}");
        assert_eq!(source, "redis", "{ip}: decided by {source}");
        passed += u64::from(status == 200);
    }
    passed
}

/// Each of `clients` sending a request every `every` to `apps` in turn, as Nginx would
/// forward them.
fn traffic(apps: &[&TestApp], clients: &[usize], every: Duration) -> Traffic {
    traffic_after(Duration::ZERO, apps, clients, every)
}

/// [`traffic`], the first requests `delay` from now.
fn traffic_after(
    delay: Duration,
    apps: &[&TestApp],
    clients: &[usize],
    every: Duration,
) -> Traffic {
    let urls: Vec<String> = apps.iter().map(|app| app.at("/limited_endpoint")).collect();
    let clients = clients
        .iter()
        .map(|&id| (id, Origin::Forwarded(client_ip(id))));
    Traffic::start_after(delay, &urls, clients, every)
}

/// The first client numbers from `from` on whose default bucket the master on `port` owns.
fn clients_on(
    cluster: &RedisCluster,
    prefix: &str,
    port: u16,
    from: usize,
    count: usize,
) -> Vec<usize> {
    numbers_on(cluster, port, from, count, |n| {
        bucket_key(prefix, &client_ip(n))
    })
}

/// The first numbers from `from` on whose key, as `key` names it, the master on `port`
/// owns.
fn numbers_on(
    cluster: &RedisCluster,
    port: u16,
    from: usize,
    count: usize,
    key: impl Fn(usize) -> String,
) -> Vec<usize> {
    (from..from + 10_000)
        .filter(|&n| cluster.owner(cluster.slot_of(&key(n))) == port)
        .take(count)
        .collect()
}

/// Kills the master on `victim` with SIGKILL and waits (20 s at most) for its replica to
/// be promoted: when the kill was sent, and when the replica first said it was master.
async fn kill_until_promoted(cluster: &mut RedisCluster, victim: u16) -> (Instant, Instant) {
    let heir = cluster.replica_of(victim);
    let fault_at = Instant::now();
    cluster.node_mut(victim).kill();
    let heir = cluster.node(heir);
    while heir.role().as_deref() != Some("master") {
        assert!(
            fault_at.elapsed() < Duration::from_secs(20),
            "the replica {heir_port} was never promoted",
            heir_port = heir.port
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (fault_at, Instant::now())
}
