//! Exactness in Cluster mode: what one master guarantees, over three.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{
    BURST, NODE_TIMEOUT_MS, ONE_AT_A_TIME, bucket_key, burst_from, client_ip, evalsha_by_master,
    pair_on_a_new_cluster, spawn_pair,
};
use testkit::{RedisCluster, TestApp, client, counter, metrics, unique_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_admit_each_of_sixty_keys_spread_over_three_masters_exactly_its_burst() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (cluster, prefix, (first, second)) = pair_on_a_new_cluster("exact");
    let keys = 60;
    let mut owned: BTreeMap<u16, u64> = evalsha_by_master(&cluster)
        .keys()
        .map(|port| (*port, 0))
        .collect();
    for n in 0..keys {
        let slot = cluster.slot_of(&bucket_key(&prefix, &client_ip(n)));
        *owned.get_mut(&cluster.owner(slot)).expect("a master") += 1;
    }
    assert!(owned.values().all(|&n| n > 0), "keys per master: {owned:?}");
    let before = evalsha_by_master(&cluster);

    for wave in 0..3 {
        let answers = (wave * 20..wave * 20 + 20).map(|n| {
            let (first, second) = (&first, &second);
            async move {
                (
                    n,
                    burst_from(&[first, second], &client_ip(n), 2 * BURST as usize).await,
                )
            }
        });
        for (n, passed) in futures_util::future::join_all(answers).await {
            assert_eq!(passed, BURST, "client {} ({})", n, client_ip(n));
        }
    }

    let after = evalsha_by_master(&cluster);
    for (port, keys) in &owned {
        let calls = after[port] - before[port];
        println!("FIGURES | master {port}: {keys} keys, {calls} EVALSHA calls");
        assert!(
            calls >= *keys,
            "master {port} decided {calls} times for {keys} keys"
        );
    }
}

const TWO_SLOTS: &str = r#"
[[policy]]
name = "per-client"
limits = [{ name = "hour", rate = 10, per = "1h" }]

[[policy]]
name = "per-tenant"
key = ["header:x-tenant"]
on_missing = "skip"
limits = [{ name = "hour", rate = 3, per = "1h" }]
"#;

/// The hashes `/v1/explain` says a request from `ip` for `tenant` charges, in policy order.
async fn hashes_of(app: &TestApp, ip: &str, tenant: &str) -> Vec<String> {
    let explained: serde_json::Value = client()
        .get(app.at("/v1/explain?method=GET&path=/limited_endpoint"))
        .header("X-Forwarded-For", ip)
        .header("x-tenant", tenant)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    explained["policies"]
        .as_array()
        .expect("policies apply")
        .iter()
        .map(|policy| {
            policy["limits"][0]["bucket"]["key"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_over_two_slots_admits_no_more_than_either_limit_and_refunds_what_the_other_denied()
 {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.toml");
    std::fs::write(&file, TWO_SLOTS).unwrap();
    let (first, second) = spawn_pair(
        &cluster,
        &unique_prefix("two-slots"),
        &[
            ("POLICY_FILE", file.display().to_string()),
            ("REDIS_TIMEOUT_MS", "2000".into()),
        ],
    );
    let (ip, tenant) = (client_ip(7), "tenant-a");
    let hashes = hashes_of(&first, &ip, tenant).await;
    let slots: Vec<u16> = hashes.iter().map(|key| cluster.slot_of(key)).collect();
    assert_eq!(slots.len(), 2, "{hashes:?}");
    assert_ne!(slots[0], slots[1], "{hashes:?} share a slot");
    // The refunds too must cope with nodes that never saw their script.
    cluster.flush_scripts();

    // Contention: twelve at once over both instances, the tenant's limit runs out first.
    let http = client();
    let answers = testkit::all_at_once((0..12).map(|n| {
        let app = if n % 2 == 0 { &first } else { &second };
        http.get(app.at("/limited_endpoint"))
            .header("X-Forwarded-For", &ip)
            .header("x-tenant", tenant)
    }))
    .await;
    let mut admitted = 0;
    for (status, source) in answers {
        assert!(status == 200 || status == 429, "status {status}");
        assert_eq!(source, "redis");
        admitted += u64::from(status == 200);
    }
    assert!(
        (1..=3).contains(&admitted),
        "admitted {admitted}: more than the tenant's 3, or none"
    );

    // Every payment of a refused request comes back: the client's own limit has spent
    // exactly what was admitted, as one master deciding both buckets would have left it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut alone = 0;
    for _ in 0..15 {
        let response = http
            .get(first.at("/limited_endpoint"))
            .header("X-Forwarded-For", &ip)
            .send()
            .await
            .unwrap();
        if response.status() != 200 {
            break;
        }
        alone += 1;
    }
    assert_eq!(
        admitted + alone,
        10,
        "the client's hour limit admitted {admitted} with the tenant, then {alone} alone"
    );
    // And the tenant's limit holds what the client's denials gave back to it.
    let other = client_ip(8);
    let mut tenant_left = 0;
    for n in 0..6 {
        let app = if n % 2 == 0 { &first } else { &second };
        let response = http
            .get(app.at("/limited_endpoint"))
            .header("X-Forwarded-For", &other)
            .header("x-tenant", tenant)
            .send()
            .await
            .unwrap();
        tenant_left += u64::from(response.status() == 200);
    }
    assert_eq!(admitted + tenant_left, 3, "the tenant's limit");

    let (mut given, mut failed) = (0.0, 0.0);
    for app in [&first, &second] {
        let text = metrics(&http, app).await;
        given += counter(&text, r#"ratelimit_cluster_refunds_total{result="given"}"#);
        failed += counter(&text, r#"ratelimit_cluster_refunds_total{result="failed"}"#);
    }
    println!(
        "FIGURES | two slots: {admitted} admitted at once, {given} refunds given, {failed} failed"
    );
    assert!(given >= 1.0, "no refund was given");
    assert_eq!(failed, 0.0, "refunds failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_through_the_bucket_api_empties_the_hash_on_the_master_of_its_slot() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (cluster, prefix, (first, second)) = pair_on_a_new_cluster("reset");
    let ip = client_ip(42);
    assert_eq!(
        burst_from(&[&first, &second], &ip, 2 * BURST as usize).await,
        BURST
    );
    let key = bucket_key(&prefix, &ip);
    let owner = cluster.node(cluster.owner(cluster.slot_of(&key)));
    assert_eq!(owner.command::<i64>(&["EXISTS", &key]), 1);

    let reset = client()
        .delete(first.at(&format!("/v1/buckets/default/{ip}")))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 204);
    assert_eq!(owner.command::<i64>(&["EXISTS", &key]), 0);
    // The instance that reset forgot its cached denials; the other may answer one until
    // its retry-after (as documented), so the first is asked.
    assert_eq!(burst_from(&[&first], &ip, 2 * BURST as usize).await, BURST);
}
