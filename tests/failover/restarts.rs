//! Restarts while the limits hold: a master that is back before the sentinels notice it
//! was gone, and instances that start again while Redis is down.

use super::*;

/// Long enough that the master below is back before any sentinel counts it down.
const RESTART_DOWN_AFTER_MS: u64 = 5000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_and_restarted_before_the_sentinels_notice_keeps_every_bucket() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = SentinelCluster::start(RESTART_DOWN_AFTER_MS);
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

/// How long Redis is away in the test below.
const OUTAGE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_an_outage_with_both_instances_restarted_a_client_gets_at_most_two_bursts_and_the_refill()
 {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = SentinelCluster::start(DOWN_AFTER_MS);
    let hosts = cluster.sentinel_hosts();
    let prefix = unique_prefix("outage-restarts");
    let vars = |name: &str| instance_vars(&hosts, &prefix, "local", "multiplexed", name);
    let mut apps = vec![
        TestApp::spawn_with(&vars("app-1")),
        TestApp::spawn_with(&vars("app-2")),
    ];
    // Both count two live instances before Redis goes.
    tokio::time::sleep(POLL + Duration::from_millis(200)).await;
    for node in cluster.nodes.iter_mut() {
        node.kill();
    }

    let http = client();
    let started = Instant::now();
    let (mut admitted, mut answers, mut restarted) = (0u64, 0u64, false);
    let mut n = 0;
    while started.elapsed() < OUTAGE {
        if !restarted && started.elapsed() >= OUTAGE / 3 {
            // A rolling restart of both: each new one starts while Redis is down, so it
            // has never counted the others.
            for name in ["app-1", "app-2"] {
                apps.remove(0).stop().await;
                let vars = vars(name);
                let app = tokio::task::spawn_blocking(move || TestApp::spawn_with(&vars))
                    .await
                    .unwrap();
                apps.push(app);
            }
            restarted = true;
        }
        let sent = Instant::now();
        let response = http
            .get(apps[n % apps.len()].at("/limited_endpoint"))
            .header("X-Forwarded-For", client_ip(950))
            .send()
            .await
            .unwrap();
        n += 1;
        let status = response.status().as_u16();
        assert!(status == 200 || status == 429, "status {status}");
        assert_eq!(header(&response, "X-RateLimit-Source"), "local");
        admitted += u64::from(status == 200);
        answers += 1;
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(sent.elapsed())).await;
    }
    let outage = started.elapsed();
    let allowed = 2 * CAPACITY + refilled(outage, 1);
    println!(
        "FIGURES | {} s outage, both instances restarted during it | admitted {admitted} of {answers} requests, allowed {allowed} (2 × burst + rate × outage)",
        outage.as_secs()
    );
    assert!(restarted);
    assert!(admitted > 0, "the local fallback admitted nothing");
    assert!(
        admitted <= allowed,
        "admitted {admitted} over {outage:?} of outage, more than 2 × {CAPACITY} + the refill"
    );

    for node in cluster.nodes.iter_mut() {
        node.restart();
    }
    assert_limits_shared_again(&apps[0], &apps[1], 960).await;
}
