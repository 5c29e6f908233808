//! How the buckets of many keys spread their script calls over the three masters.

use std::collections::BTreeMap;

use bench::phases::KEYED_POLICY;
use testkit::{PolicyFile, RedisCluster, RedisProcess, client, header, unique_prefix};

use crate::{NODE_TIMEOUT_MS, ONE_AT_A_TIME, spawn_pair};

/// Distinct keys, one request each: an even share is 1,000 calls per master.
const KEYS: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_keys_spread_their_script_calls_within_ten_percent_of_a_third_per_master() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    // The policy the bench's cluster phase measured the spread under: keyed by X-Bench-Key,
    // admitting everything.
    let policy = PolicyFile::new(KEYED_POLICY);
    let vars = [("POLICY_FILE", policy.path())];
    let (first, second) = spawn_pair(&cluster, &unique_prefix("spread"), &vars);
    // EVALSHA, and EVAL where a master did not have the script yet.
    let calls = || -> BTreeMap<u16, u64> {
        let masters = cluster.masters().into_iter();
        let calls = |m: &RedisProcess| m.command_calls("evalsha") + m.command_calls("eval");
        masters.map(|master| (master.port, calls(master))).collect()
    };
    let before = calls();
    let http = client();
    // One request at a time, so that no two decisions go as one call.
    for n in 0..KEYS {
        let app = if n % 2 == 0 { &first } else { &second };
        let request = http
            .get(app.at("/limited_endpoint"))
            .header("x-bench-key", format!("key-{n}"));
        let response = request.send().await.unwrap();
        let source = header(&response, "x-ratelimit-source");
        assert_eq!(
            (response.status().as_u16(), source.as_str()),
            (200, "redis"),
            "key-{n}"
        );
    }
    let spread: BTreeMap<u16, u64> = calls()
        .into_iter()
        .map(|(port, n)| (port, n - before[&port]))
        .collect();
    let total: u64 = spread.values().sum();
    assert!(
        spread.len() == 3 && total >= KEYS as u64,
        "{total} calls for {KEYS} keys: {spread:?}"
    );
    let even = total as f64 / 3.0;
    for (port, calls) in &spread {
        let off = 100.0 * (*calls as f64 - even).abs() / even;
        println!(
            "FIGURES | master {port}: {calls} of {total} script calls, {off:.1} % off a third"
        );
        assert!(
            off <= 10.0,
            "master {port}: {calls} of {total} script calls: {spread:?}"
        );
    }
}
