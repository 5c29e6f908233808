//! Restarts while the limits hold: a master that is back before the sentinels notice it
//! was gone.

use super::*;

/// Long enough that the master below is back before any sentinel counts it down.
const RESTART_DOWN_AFTER_MS: u64 = 5000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_and_restarted_before_the_sentinels_notice_keeps_every_bucket() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = SentinelCluster::start_from_shipped_configs(RESTART_DOWN_AFTER_MS);
    let master = cluster.master_port().expect("a master");
    let hosts = cluster.sentinel_hosts();
    let prefix = unique_prefix("restart");
    let spawn = |name| {
        let mut vars = instance_vars(&hosts, &prefix, "local", "multiplexed", name);
        // A bucket refills one token per hour, so what the client gets after the restart
        // can only come from a bucket the restart lost; and no denial may come from an
        // instance's own deny cache instead of Redis.
        vars.push(("TIME_WINDOW", (CAPACITY * 3600).to_string()));
        vars.push(("DENY_CACHE_SIZE", "0".to_string()));
        // One worker, so one connection per instance that the restart breaks, and the probe
        // below is what meets it: no decision of the client's falls back because of it.
        vars.push(("WORKERS", "1".to_string()));
        TestApp::spawn_with(&vars)
    };
    let (first, second) = (spawn("app-1"), spawn("app-2"));
    let (spent, sources) = fresh_client_burst(&[&first, &second], 900).await;
    assert!(sources.iter().all(|s| s == "redis"), "{sources:?}");
    assert_eq!(spent, CAPACITY);

    let killed_at = Instant::now();
    let node = cluster.node_mut(master);
    node.kill();
    node.restart();
    let back_after = killed_at.elapsed();
    assert!(
        back_after < Duration::from_millis(RESTART_DOWN_AFTER_MS),
        "the master took {back_after:?} to come back"
    );
    wait_for_redis_decisions(&[&first, &second], 901).await;
    assert_eq!(cluster.master_port(), Some(master), "no failover happened");

    let (passed, sources) = fresh_client_burst(&[&first, &second], 900).await;
    assert!(sources.iter().all(|s| s == "redis"), "{sources:?}");
    assert_eq!(
        passed, 0,
        "a client that spent its burst before the master's restart got tokens again after it"
    );
}
