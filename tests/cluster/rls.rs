//! The rate-limit service in Cluster mode: descriptors whose buckets lie on every master,
//! asked through both instances' gRPC ports, a request whose descriptors lie in two slots,
//! decided all or nothing, hits given back to buckets on two masters, and a master killed
//! under `ShouldRateLimit` calls.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

use crate::{NODE_TIMEOUT_MS, ONE_AT_A_TIME, kill_until_promoted, numbers_on, spawn_pair};
use testkit::{
    RedisCluster, RlsClient, RlsFiles, TestApp, Traffic, client, counter, descriptor, metrics,
    rls_request, statuses, unique_prefix,
};

/// 5 an hour per user, 3 an hour per org: nothing refills during a test.
const RULES: &str = "\
domain: edge
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 5 }
  - key: org
    rate_limit: { unit: hour, requests_per_unit: 3 }
";

/// The settings of an instance serving `files` over gRPC, its store calls bounded by
/// `timeout_ms`, with or without its deny cache.
fn grpc(files: &RlsFiles, timeout_ms: u64, deny_cache: bool) -> Vec<(&'static str, String)> {
    let mut settings = vec![
        ("GRPC_PORT", "0".to_string()),
        ("RLS_CONFIG", files.folder()),
        ("REDIS_TIMEOUT_MS", timeout_ms.to_string()),
    ];
    if !deny_cache {
        settings.push(("DENY_CACHE_SIZE", "0".to_string()));
    }
    settings
}

/// The hash of the descriptor `key=value`'s bucket: its entries are its hash tag.
fn descriptor_hash(prefix: &str, key: &str, value: &str) -> String {
    format!("{prefix}:rls:edge:{{{key}={value}}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_on_every_master_are_each_admitted_exactly_their_limit_over_two_instances() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let files = RlsFiles::new("edge.yaml", RULES);
    let prefix = unique_prefix("rls-exact");
    let (first, second) = spawn_pair(&cluster, &prefix, &grpc(&files, 2000, true));
    let users: Vec<String> = (0..30).map(|n| format!("u{n}")).collect();
    let masters: BTreeSet<u16> = users
        .iter()
        .map(|user| cluster.owner(cluster.slot_of(&descriptor_hash(&prefix, "user", user))))
        .collect();
    assert_eq!(masters.len(), 3, "the users' buckets lie on every master");

    let clients = [
        RlsClient::connect(first.grpc()).await,
        RlsClient::connect(second.grpc()).await,
    ];
    let asked = users.iter().map(|user| {
        let clients = clients.clone();
        let user = user.clone();
        async move {
            let calls = (0..10).map(|n| {
                let mut rls = clients[n % 2].clone();
                let user = user.clone();
                tokio::spawn(async move { rls.code_of("edge", &[("user", &user)]).await })
            });
            let mut admitted = 0;
            for call in calls.collect::<Vec<_>>() {
                admitted += u64::from(call.await.unwrap() == Code::Ok);
            }
            (user, admitted)
        }
    });
    for (user, admitted) in futures_util::future::join_all(asked).await {
        assert_eq!(admitted, 5, "user {user}");
    }
}

/// A user whose bucket another master holds than org `acme`'s.
fn user_away_from_the_org(cluster: &RedisCluster, prefix: &str) -> String {
    let org_master = cluster.owner(cluster.slot_of(&descriptor_hash(prefix, "org", "acme")));
    (0..1000)
        .map(|n| format!("u{n}"))
        .find(|user| {
            cluster.owner(cluster.slot_of(&descriptor_hash(prefix, "user", user))) != org_master
        })
        .expect("a user whose bucket another master holds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_descriptors_lie_in_two_slots_is_decided_all_or_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let files = RlsFiles::new("edge.yaml", RULES);
    let prefix = unique_prefix("rls-two-slots");
    let (first, second) = spawn_pair(&cluster, &prefix, &grpc(&files, 2000, true));
    let user = user_away_from_the_org(&cluster, &prefix);
    let mut rls = [
        RlsClient::connect(first.grpc()).await,
        RlsClient::connect(second.grpc()).await,
    ];
    for _ in 0..5 {
        assert_eq!(rls[0].code_of("edge", &[("user", &user)]).await, Code::Ok);
    }
    // The user has nothing left: the org's descriptor, decided on another master in the
    // same request, must not be charged.
    for n in 0..4 {
        let response = rls[n % 2]
            .ask(rls_request(
                "edge",
                vec![
                    descriptor(&[("org", "acme")]),
                    descriptor(&[("user", &user)]),
                ],
            ))
            .await
            .unwrap();
        assert_eq!(response.overall_code(), Code::OverLimit);
        assert_eq!(
            statuses(&response)[1],
            (Code::OverLimit, 0),
            "the user's descriptor"
        );
    }
    let mut admitted = 0;
    for n in 0..6 {
        admitted += u64::from(rls[n % 2].code_of("edge", &[("org", "acme")]).await == Code::Ok);
    }
    assert_eq!(
        admitted, 3,
        "the org's bucket paid for none of the refused requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_given_back_to_descriptors_on_two_masters_return_to_both() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let files = RlsFiles::new("edge.yaml", RULES);
    let prefix = unique_prefix("rls-given-back");
    // Every answer below must come from Redis, not from a denial cached here.
    let (first, _second) = spawn_pair(&cluster, &prefix, &grpc(&files, 2000, false));
    let user = user_away_from_the_org(&cluster, &prefix);
    let mut rls = RlsClient::connect(first.grpc()).await;
    let both = || {
        vec![
            descriptor(&[("org", "acme")]),
            descriptor(&[("user", &user)]),
        ]
    };
    for _ in 0..3 {
        let response = rls.ask(rls_request("edge", both())).await.unwrap();
        assert_eq!(response.overall_code(), Code::Ok);
    }
    let spent = rls.ask(rls_request("edge", both())).await.unwrap();
    assert_eq!(
        spent.overall_code(),
        Code::OverLimit,
        "the org has none left"
    );
    // The user's slot paid for that denied call; its refund is sent after the answer.
    let (http, deadline) = (client(), Instant::now() + Duration::from_secs(5));
    let refunded = r#"ratelimit_cluster_refunds_total{result="given"}"#;
    while counter(&metrics(&http, &first).await, refunded) < 1.0 {
        assert!(Instant::now() < deadline, "the user's refund never landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let given_back = |entries: &[(&str, &str)]| {
        let mut descriptor = descriptor(entries);
        descriptor.is_negative_hits = true;
        descriptor.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 2 });
        descriptor
    };
    let given = rls
        .ask(rls_request(
            "edge",
            vec![
                given_back(&[("org", "acme")]),
                given_back(&[("user", &user)]),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(given.overall_code(), Code::Ok);
    assert_eq!(statuses(&given), [(Code::Ok, 2), (Code::Ok, 4)]);
    for code in [Code::Ok, Code::Ok, Code::OverLimit] {
        let response = rls.ask(rls_request("edge", both())).await.unwrap();
        assert_eq!(response.overall_code(), code);
    }
}

/// Decisions `apps` made from their local share (`FAIL_MODE=local`), admitted or not.
async fn local_decisions(apps: &[&TestApp]) -> f64 {
    let http = client();
    let mut sum = 0.0;
    for app in apps {
        let text = metrics(&http, app).await;
        for decision in ["allowed", "limited"] {
            let series =
                format!(r#"ratelimit_decisions_total{{decision="{decision}",source="local"}}"#);
            sum += counter(&text, &series);
        }
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_master_under_grpc_load_fails_no_call_and_its_replica_decides_within_seconds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let files = RlsFiles::new("edge.yaml", RULES);
    let prefix = unique_prefix("rls-kill");
    // Every call asks Redis: with the deny cache, the users' denials (their limits are
    // spent in half a second) would be answered here without it.
    let (first, second) = spawn_pair(&cluster, &prefix, &grpc(&files, 100, false));
    let user_hash = |n: usize| descriptor_hash(&prefix, "user", &format!("u{n}"));
    let victim = cluster.owner(cluster.slot_of(&user_hash(0)));
    let heir = cluster.replica_of(victim);
    let on_victim = numbers_on(&cluster, victim, 0, 6, user_hash);
    let elsewhere: Vec<usize> = (0..100)
        .filter(|&n| cluster.owner(cluster.slot_of(&user_hash(n))) != victim)
        .take(14)
        .collect();
    let instances = [
        RlsClient::connect(first.grpc()).await,
        RlsClient::connect(second.grpc()).await,
    ];
    let users = on_victim
        .iter()
        .chain(&elsewhere)
        .map(|&n| (n, vec![("user".to_string(), format!("u{n}"))]));
    let calls = Traffic::calls(&instances, "edge", users, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (fault_at, promoted_at) = kill_until_promoted(&mut cluster, victim).await;
    // The answers name no decider: the instances' counts of local decisions say when the
    // dead master's users were decided by Redis again, as they stop growing.
    let mut last_local = (promoted_at, local_decisions(&[&first, &second]).await);
    let watch_until = promoted_at + Duration::from_secs(3);
    while Instant::now() < watch_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let local = local_decisions(&[&first, &second]).await;
        if local > last_local.1 {
            last_local = (Instant::now(), local);
        }
    }
    let calls = calls.stop().await;

    let failed: Vec<_> = calls.iter().filter(|call| call.answer.is_err()).collect();
    let worst = calls.iter().map(|call| call.latency).max().unwrap();
    let back_on_redis = last_local.0.saturating_duration_since(promoted_at);
    let local = last_local.1;
    let victims_after = calls
        .iter()
        .filter(|call| on_victim.contains(&call.client) && call.sent > last_local.0)
        .count();
    println!(
        "FIGURES | gRPC, kill -9 of a master | fault→promotion {} ms | promotion→last local decision {} ms | failed calls {} | worst latency {} ms | local decisions {local} of {} calls",
        promoted_at.duration_since(fault_at).as_millis(),
        back_on_redis.as_millis(),
        failed.len(),
        worst.as_millis(),
        calls.len()
    );
    assert!(
        failed.is_empty(),
        "FAIL_MODE=local answers every call, yet: {failed:?}"
    );
    assert!(worst < Duration::from_secs(1), "worst latency {worst:?}");
    assert!(
        local > 0.0,
        "no decision fell back while the master was down, so the kill was not exercised"
    );
    assert!(
        back_on_redis < Duration::from_secs(2),
        "local decisions went on {back_on_redis:?} after the promotion"
    );
    assert!(
        victims_after > 0,
        "the dead master's users were asked about after the last local decision"
    );

    // A fresh user on the promoted master: exactly its limit across both instances (the
    // local shares would admit 2 each).
    let fresh = numbers_on(&cluster, heir, 500, 1, user_hash)[0];
    let mut rls = instances;
    let mut admitted = 0;
    for n in 0..10 {
        let code = rls[n % 2]
            .code_of("edge", &[("user", &format!("u{fresh}"))])
            .await;
        admitted += u64::from(code == Code::Ok);
    }
    assert_eq!(admitted, 5, "a fresh user on the promoted master");
}
