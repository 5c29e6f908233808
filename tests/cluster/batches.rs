//! Batches in Cluster mode: the decisions that meet on one hash slot go as one call of the
//! bucket script, and stay exact, bounded in time and answered when the slot's master
//! misbehaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{NODE_TIMEOUT_MS, ONE_AT_A_TIME, bucket_key, burst_from, client_ip, pair_asking_redis};
use testkit::{RedisCluster, all_at_once, client, unique_prefix, until_redis_decides};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_key_is_admitted_exactly_its_burst_in_fewer_calls_while_scripts_are_flushed()
{
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let prefix = unique_prefix("batches");
    // A decision that failed would be a 503 here, which `burst_from` refuses.
    let closed = [("RATE_LIMIT", "150".into()), ("FAIL_MODE", "closed".into())];
    let (first, second) = pair_asking_redis(&cluster, &prefix, 2000, &closed);
    let ip = client_ip(7);
    let master = cluster.node(cluster.owner(cluster.slot_of(&bucket_key(&prefix, &ip))));
    // Every call starts as one EVALSHA; those that met a flushed cache go again as EVAL.
    let calls_before = master.command_calls("evalsha");
    let resent_before = master.command_calls("eval");

    let flooding = Arc::new(AtomicBool::new(true));
    let flusher = {
        let (url, flooding) = (master.admin_url(), flooding.clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut flushes = 0;
            while flooding.load(Ordering::Relaxed) && flushes < 400 {
                let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
                flushes += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            flushes
        })
    };
    let passed = burst_from(&[&first, &second], &ip, 400).await;
    flooding.store(false, Ordering::Relaxed);
    let flushes = flusher.await.unwrap();

    let calls = master.command_calls("evalsha") - calls_before;
    let resent = master.command_calls("eval") - resent_before;
    println!("FIGURES | 400 decisions in {calls} calls, {flushes} flushes, {resent} sent again");
    assert_eq!(passed, 150, "each decided once");
    assert!(calls < 400, "decisions went together: {calls} calls");
    assert!(resent >= 1, "a flush met a call in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_queued_on_a_slot_whose_master_stalls_each_fall_back_within_the_timeout() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(NODE_TIMEOUT_MS);
    let prefix = unique_prefix("batch-stall");
    let (first, second) =
        pair_asking_redis(&cluster, &prefix, 100, &[("RATE_LIMIT", "100".into())]);
    let ip = client_ip(9);
    let master = cluster.node(cluster.owner(cluster.slot_of(&bucket_key(&prefix, &ip))));
    assert_eq!(burst_from(&[&first, &second], &ip, 2).await, 2);

    // The master runs no script for 3 s: the first decision of each worker stays in
    // flight, and those behind it queue for the slot.
    let _: () = master.command(&["CLIENT", "PAUSE", "3000", "WRITE"]);
    let paused_at = Instant::now();
    let http = client();
    let answers = all_at_once((0..40).map(|n| {
        let app = if n % 2 == 0 { &first } else { &second };
        http.get(app.at("/limited_endpoint"))
            .header("X-Forwarded-For", &ip)
    }))
    .await;
    let took = paused_at.elapsed();

    for (status, source) in &answers {
        assert_eq!(*status, 200, "FAIL_MODE=local admits within its share");
        assert_eq!(source, "local", "decided by FAIL_MODE, not after the stall");
    }
    // Generous, but well short of the stall: nobody waited for a call ahead of it.
    assert!(took < Duration::from_secs(2), "40 answers took {took:?}");

    until_redis_decides(
        "the slot's master after the stall",
        paused_at + Duration::from_secs(15),
        || {
            http.get(first.at("/limited_endpoint"))
                .header("X-Forwarded-For", &ip)
        },
    )
    .await;
}
