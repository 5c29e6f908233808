//! The rate-limit service through a failover: Envoy's calls (a real tonic client) to both
//! instances, each client with its own descriptor, while the master is killed.

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;

use super::*;
use testkit::{Call, RlsClient, RlsFiles};

/// A limit of 10 a minute per user: a burst of 10, a token every 6 s.
const PER_MINUTE: u64 = 10;
const RULES: &str = "\
domain: edge
descriptors:
  - key: user
    rate_limit: { unit: minute, requests_per_unit: 10 }
";

/// Whole tokens a `user` bucket, or one instance's share of it among `sharing`, gains in
/// `elapsed` when it is not full.
fn refilled_per_user(elapsed: Duration, sharing: u64) -> u64 {
    elapsed.as_micros() as u64 * PER_MINUTE / (60_000_000 * sharing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_master_under_grpc_load_fails_no_call_and_delays_none_past_a_second() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = SentinelCluster::start(DOWN_AFTER_MS);
    let files = RlsFiles::new("edge.yaml", RULES);
    let prefix = unique_prefix("grpc-kill");
    let spawn = |name| {
        let mut vars = instance_vars(
            &cluster.sentinel_hosts(),
            &prefix,
            "local",
            "multiplexed",
            name,
        );
        vars.push(("GRPC_PORT", "0".to_string()));
        vars.push(("RLS_CONFIG", files.folder()));
        TestApp::spawn_with(&vars)
    };
    let (first, second) = (spawn("app-1"), spawn("app-2"));
    // Both announced, so the local fallback divides the limits by `INSTANCES`.
    std::thread::sleep(POLL + Duration::from_millis(200));
    let old_master = cluster.master_port().expect("a master");
    let watch = Arc::new(SwitchWatch::start(cluster.sentinels[0].port));
    let instances = [
        RlsClient::connect(first.grpc()).await,
        RlsClient::connect(second.grpc()).await,
    ];
    // Each client asks about its own user every 100 ms, over both instances in turn.
    let users =
        (0..CLIENTS).map(|client| (client, vec![("user".into(), format!("user-{client}"))]));
    let calls = Traffic::calls(&instances, "edge", users, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault_at = Instant::now();
    cluster.node_mut(old_master).kill();
    let switch_at = {
        let watch = watch.clone();
        tokio::task::spawn_blocking(move || watch.wait(Duration::from_secs(20)))
            .await
            .unwrap()
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = calls.stop().await;

    let failed: Vec<&Call> = calls.iter().filter(|call| call.answer.is_err()).collect();
    let worst = calls.iter().map(|call| call.latency).max().unwrap();
    // Beyond each client's bucket: at most what the local shares of both instances can
    // admit from the fault to the end (the fallback decides only within that time).
    let since_fault = calls
        .iter()
        .map(Call::answered)
        .max()
        .unwrap()
        .saturating_duration_since(fault_at);
    let local =
        INSTANCES * ((PER_MINUTE / INSTANCES).max(1) + refilled_per_user(since_fault, INSTANCES));
    let mut extra_max = i64::MIN;
    for client in 0..CLIENTS {
        let mine: Vec<&Call> = calls.iter().filter(|call| call.client == client).collect();
        let first_sent = mine.iter().map(|call| call.sent).min().unwrap();
        let last = mine.iter().map(|call| call.answered()).max().unwrap();
        let admitted = mine
            .iter()
            .filter(|call| call.answer == Ok(Code::Ok))
            .count() as i64;
        let bucket = (PER_MINUTE + refilled_per_user(last - first_sent, 1)) as i64;
        extra_max = extra_max.max(admitted - bucket);
    }
    println!(
        "FIGURES | gRPC, kill -9 of the master | fault→+switch-master {} ms | failed calls {} | worst latency {} ms | extra admitted per client: max {extra_max}, allowed {local} | calls {}",
        switch_at.saturating_duration_since(fault_at).as_millis(),
        failed.len(),
        worst.as_millis(),
        calls.len(),
    );
    assert!(
        failed.is_empty(),
        "FAIL_MODE=local answers every call, yet: {failed:?}"
    );
    assert!(worst < Duration::from_secs(1), "worst latency {worst:?}");
    assert!(
        extra_max <= local as i64,
        "a client was admitted {extra_max} beyond its bucket; the local shares allow {local}"
    );
    assert_ne!(cluster.master_port(), Some(old_master));

    // Shared again: a new user gets exactly its burst across both instances.
    wait_for_redis_decisions(&[&first, &second], 920).await;
    let mut clients = [
        RlsClient::connect(first.grpc()).await,
        RlsClient::connect(second.grpc()).await,
    ];
    let mut admitted = 0;
    for n in 0..2 * PER_MINUTE as usize {
        let code = clients[n % 2].code_of("edge", &[("user", "fresh")]).await;
        admitted += u64::from(code == Code::Ok);
    }
    assert_eq!(
        admitted, PER_MINUTE,
        "a new user's burst across both instances"
    );
}
