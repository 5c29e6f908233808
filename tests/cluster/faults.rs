//! What Cluster mode does when the cluster changes under it: scripts missing everywhere,
//! a master killed, a slot moved while its keys are in use, slots nobody serves.

use std::time::{Duration, Instant};

use redis::cluster_routing::Slot;

use crate::{
    BURST, NODE_TIMEOUT_MS, ONE_AT_A_TIME, bucket_key, burst_from, client_ip, clients_on,
    evalsha_by_master, kill_until_promoted, limited_from, pair_asking_redis, spawn_pair, traffic,
    traffic_after,
};
use testkit::{RedisCluster, client, counter, header, metric, metrics, unique_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_script_cache_flushed_the_next_decisions_succeed_on_every_master() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let (first, second) = spawn_pair(&cluster, &unique_prefix("noscript"), &[]);
    let http = client();
    // Each instance has loaded the script on some masters already.
    for n in 0..6 {
        burst_from(&[&first, &second], &client_ip(n), 2).await;
    }
    let before = evalsha_by_master(&cluster);
    cluster.flush_scripts();
    for n in 100..130 {
        let app = if n % 2 == 0 { &first } else { &second };
        let response = limited_from(&http, app, &client_ip(n)).await;
        assert_eq!(response.status(), 200, "client {n}");
        assert_eq!(
            header(&response, "X-RateLimit-Source"),
            "redis",
            "client {n}"
        );
    }
    for app in [&first, &second] {
        let text = metrics(&http, app).await;
        for kind in ["noscript", "other", "timeout", "connection", "clusterdown"] {
            let series = format!(r#"ratelimit_store_errors_total{{kind="{kind}"}}"#);
            assert_eq!(counter(&text, &series), 0.0, "{series}");
        }
    }
    // Every master decided again, by hash, once the script was back in its cache.
    for n in 100..130 {
        burst_from(&[&first, &second], &client_ip(n), 1).await;
    }
    let after = evalsha_by_master(&cluster);
    for (port, calls) in &after {
        assert!(
            *calls > before[port],
            "master {port} decided nothing by hash"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_master_under_load_costs_no_5xx_and_its_replica_decides_within_seconds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let prefix = unique_prefix("kill");
    // Every request asks Redis: with the deny cache, the clients' denials (their bursts are
    // spent in half a second) would be answered here without it.
    let (first, second) = pair_asking_redis(&cluster, &prefix, 100, &[]);
    let victim = cluster.owner(cluster.slot_of(&bucket_key(&prefix, &client_ip(0))));
    let heir = cluster.replica_of(victim);
    let on_victim = clients_on(&cluster, &prefix, victim, 0, 6);
    let elsewhere: Vec<usize> = (0..100)
        .filter(|&n| cluster.owner(cluster.slot_of(&bucket_key(&prefix, &client_ip(n)))) != victim)
        .take(14)
        .collect();
    let all: Vec<usize> = on_victim.iter().chain(&elsewhere).copied().collect();
    let traffic = traffic(&[&first, &second], &all, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (fault_at, promoted_at) = kill_until_promoted(&mut cluster, victim).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let records = traffic.stop().await;

    let server_errors = records.iter().filter(|r| r.status >= 500).count();
    let transport_errors = records.iter().filter(|r| r.status == 0).count();
    let worst = records.iter().map(|r| r.latency).max().unwrap_or_default();
    let back_on_redis = records
        .iter()
        .filter(|r| on_victim.contains(&r.client) && r.sent >= promoted_at && r.source == "redis")
        .map(|r| r.answered())
        .min()
        .map(|at| at.saturating_duration_since(promoted_at));
    let local = records.iter().filter(|r| r.source == "local").count();
    println!(
        "FIGURES | kill -9 of a master | fault→promotion {} ms | promotion→first Redis decision for its keys {:?} | 5xx {server_errors} | transport errors {transport_errors} | worst latency {} ms | local decisions {local} of {}",
        promoted_at.duration_since(fault_at).as_millis(),
        back_on_redis.map(|d| d.as_millis()),
        worst.as_millis(),
        records.len()
    );
    assert_eq!(server_errors, 0, "no 5xx");
    assert_eq!(transport_errors, 0, "every request answered");
    assert!(worst < Duration::from_secs(1), "worst latency {worst:?}");
    assert!(
        local > 0,
        "no decision fell back while the master was down, so the kill was not exercised"
    );
    let back_on_redis = back_on_redis.expect("the dead master's keys decided by Redis again");
    assert!(
        back_on_redis < Duration::from_secs(2),
        "its keys went back to Redis {back_on_redis:?} after the promotion"
    );
    for record in records.iter().filter(|r| !on_victim.contains(&r.client)) {
        assert_eq!(
            record.source, "redis",
            "a key on a live master fell back: {record:?}"
        );
    }

    // A fresh key on the promoted master: exact again, across both instances.
    let fresh = clients_on(&cluster, &prefix, heir, 500, 1)[0];
    let passed = burst_from(&[&first, &second], &client_ip(fresh), 2 * BURST as usize).await;
    assert_eq!(passed, BURST, "a fresh key on the promoted master");
}

/// Beside each client's own limit, one for everyone: every request of an instance with
/// this file is decided in two slots (the client's, and `{global}`'s).
const WITH_A_GLOBAL_LIMIT: &str = r#"
[[policy]]
name = "per-client"
limits = [{ name = "hour", rate = 30, per = "1h" }]

[[policy]]
name = "everyone"
key = ["global"]
limits = [{ name = "hour", rate = 1000000, per = "1h" }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_slot_whose_keys_are_in_use_fails_no_decision_and_stays_exact() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let burst = 30u64;
    // A move is about redirections, not speed: no decision may fall back because the
    // shared machine was slow for a moment.
    let patient = ("REDIS_TIMEOUT_MS", "1000".to_string());
    let single_prefix = unique_prefix("reshard");
    let single = spawn_pair(
        &cluster,
        &single_prefix,
        &[("RATE_LIMIT", burst.to_string()), patient.clone()],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.toml");
    std::fs::write(&file, WITH_A_GLOBAL_LIMIT).unwrap();
    let double = spawn_pair(
        &cluster,
        &unique_prefix("reshard-two-slots"),
        &[("POLICY_FILE", file.display().to_string()), patient],
    );
    // Both prefixes put a client's bucket in the slot of its hash tag, `{ip=…}`.
    let key = |n| bucket_key(&single_prefix, &client_ip(n));
    let moving = 0;
    let newcomer = (1..200_000)
        .find(|&n| Slot::for_key(key(n)) == Slot::for_key(key(moving)))
        .expect("another client in the same slot");
    let slot = cluster.slot_of(&key(moving));
    assert_ne!(slot, cluster.slot_of("{global}"));
    let from = cluster.owner(slot);
    let to = cluster
        .masters()
        .iter()
        .map(|m| m.port)
        .find(|&p| p != from)
        .unwrap();
    let in_use: Vec<usize> = (0..7).collect();
    let every = Duration::from_millis(40);
    let pairs = [[&single.0, &single.1], [&double.0, &double.1]];
    let traffic = pairs.map(|apps| traffic(&apps, &in_use, every));
    tokio::time::sleep(Duration::from_millis(400)).await;

    // While the slot is half moved, the newcomer's first buckets are made where they land.
    let late =
        pairs.map(|apps| traffic_after(Duration::from_millis(100), &apps, &[newcomer], every));
    let moved = tokio::task::block_in_place(|| {
        cluster.move_slot(slot, from, to, Duration::from_millis(300))
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut runs = Vec::new();
    for (traffic, late) in traffic.into_iter().zip(late) {
        let mut records = traffic.stop().await;
        records.extend(late.stop().await);
        runs.push(records);
    }

    assert!(moved >= 2, "the keys in use moved: {moved}");
    assert_eq!(cluster.owner(slot), to, "the slot is on its new master");
    assert_eq!(
        cluster.node(to).command::<i64>(&["EXISTS", &key(moving)]),
        1
    );
    for (records, run) in runs.iter().zip(["one slot", "two slots"]) {
        let failed: Vec<_> = records
            .iter()
            .filter(|r| !(r.status == 200 || r.status == 429) || r.source != "redis")
            .collect();
        println!(
            "FIGURES | slot {slot} moved from {from} to {to} under load, requests in {run} | {moved} keys moved | {} requests | {} not decided by Redis",
            records.len(),
            failed.len()
        );
        assert!(
            failed.is_empty(),
            "{run}: decisions not made by Redis: {failed:?}"
        );
        for client in [moving, newcomer] {
            let mine: Vec<_> = records.iter().filter(|r| r.client == client).collect();
            let admitted = mine.iter().filter(|r| r.status == 200).count() as u64;
            assert!(
                mine.len() as u64 > burst,
                "{run}: client {client} sent only {}",
                mine.len()
            );
            assert_eq!(
                admitted, burst,
                "{run}: client {client}, exactly its burst across the move"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_master_and_its_replica_gone_ready_and_the_coverage_gauge_say_slots_are_uncovered_and_fail_mode_decides()
 {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let prefix = unique_prefix("uncovered");
    // A decision for a slot nobody serves gives up after this.
    let (app, _second) = spawn_pair(&cluster, &prefix, &[("REDIS_TIMEOUT_MS", "100".into())]);
    let http = client();
    let ready = http.get(app.at("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let served = "ratelimit_cluster_slots_served";
    assert_eq!(metric(&metrics(&http, &app).await, served), Some(16384.0));

    let victim = cluster.masters()[0].port;
    let stranded = clients_on(&cluster, &prefix, victim, 0, 1)[0];
    let replica = cluster.replica_of(victim);
    cluster.node_mut(replica).kill();
    cluster.node_mut(victim).kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    let reason = loop {
        let response = http.get(app.at("/ready")).send().await.unwrap();
        if response.status() == 503 {
            let body: serde_json::Value = response.json().await.unwrap();
            break body["reason"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "/ready stayed 200 with slots uncovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("FIGURES | a master and its replica killed | /ready: {reason}");
    assert!(reason.contains("Redis Cluster"), "{reason}");
    // The watch reads CLUSTER INFO every second (WATCH_EVERY).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics(&http, &app).await;
        let now = metric(&text, served).expect("the slot coverage gauge in Cluster mode");
        if now < 16384.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{served} stayed {now}: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let response = limited_from(&http, &app, &client_ip(stranded)).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "X-RateLimit-Source"), "local");
    assert_eq!(
        http.get(app.at("/health")).send().await.unwrap().status(),
        200
    );
}
