//! Failover against real processes: 1 master + 2 replicas + 3 sentinels on free ports,
//! two service instances, and a steady stream of requests from many clients while the
//! master fails in different ways. Each test prints the figures `docs/RELIABILITY.md`
//! records and holds them to its promise, the bound on what a client is admitted beyond
//! its shared bucket included.
//!
//! `sentinels` holds the sentinels that name the wrong master, `restarts` the data nodes
//! and instances that restart, `grpc` the rate-limit service's calls through a failover. The tests run one at a time, because they measure latency
//! and each one already keeps both cores busy; their metrics are their own (each service
//! builds its own handle).

mod grpc;
mod restarts;
mod sentinels;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::{
    Origin, Record, SENTINEL_PASSWORD, SENTINEL_SERVICE_PASSWORD, SERVICE_PASSWORD, SERVICE_USER,
    SentinelCluster, TestApp, Traffic, admitted, all_at_once, client, counter, header, metrics,
    unique_prefix, until_redis_decides, wait_until,
};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Short, so the tests run fast; production uses several seconds.
const DOWN_AFTER_MS: u64 = 1000;
/// Burst 10, one token per second.
const CAPACITY: u64 = 10;
const WINDOW_S: u64 = 10;
const CLIENTS: usize = 20;
/// How many instances `spawn_pair` starts on one key prefix: what the local fallback
/// divides the limits by.
const INSTANCES: u64 = 2;
/// How often each instance re-asks the sentinels and announces itself (the default).
const POLL: Duration = Duration::from_millis(1000);

fn spawn_pair(cluster: &SentinelCluster, prefix: &str, fail_mode: &str) -> (TestApp, TestApp) {
    spawn_pair_with(cluster, prefix, fail_mode, "multiplexed", &[])
}

fn spawn_pair_with(
    cluster: &SentinelCluster,
    prefix: &str,
    fail_mode: &str,
    redis_client: &str,
    extra: &[(&'static str, &str)],
) -> (TestApp, TestApp) {
    let spawn = |name| {
        let mut vars = instance_vars(
            &cluster.sentinel_hosts(),
            prefix,
            fail_mode,
            redis_client,
            name,
        );
        vars.extend(extra.iter().map(|(key, value)| (*key, value.to_string())));
        TestApp::spawn_with(&vars)
    };
    (spawn("app-1"), spawn("app-2"))
}

/// The settings of one instance of [`spawn_pair_with`], named `name`; a setting added
/// after them overrides theirs.
fn instance_vars(
    sentinel_hosts: &str,
    prefix: &str,
    fail_mode: &str,
    redis_client: &str,
    name: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("SENTINEL_HOSTS", sentinel_hosts.to_string()),
        ("SENTINEL_POLL_MS", POLL.as_millis().to_string()),
        ("REDIS_USERNAME", SERVICE_USER.to_string()),
        ("REDIS_PASSWORD", SERVICE_PASSWORD.to_string()),
        ("SENTINEL_USERNAME", SERVICE_USER.to_string()),
        ("SENTINEL_PASSWORD", SENTINEL_SERVICE_PASSWORD.to_string()),
        ("TRUSTED_PROXIES", "127.0.0.1".to_string()),
        ("RATE_LIMIT", CAPACITY.to_string()),
        ("TIME_WINDOW", WINDOW_S.to_string()),
        ("REDIS_TIMEOUT_MS", "100".to_string()),
        ("KEY_PREFIX", prefix.to_string()),
        ("FAIL_MODE", fail_mode.to_string()),
        ("REDIS_CLIENT", redis_client.to_string()),
        ("INSTANCE_NAME", name.to_string()),
    ]
}

/// A cluster, two instances on it, and a watch on `+switch-master`.
struct Stage {
    cluster: SentinelCluster,
    first: TestApp,
    second: TestApp,
    old_master: u16,
    watch: Arc<SwitchWatch>,
}

impl Stage {
    fn start(test: &str) -> Self {
        Self::start_with(test, "multiplexed")
    }

    /// With `REDIS_CLIENT=redis_client` on both instances.
    fn start_with(test: &str, redis_client: &str) -> Self {
        Self::start_with_settings(test, redis_client, &[])
    }

    /// With `REDIS_CLIENT=redis_client` and the settings `extra` on both instances.
    fn start_with_settings(test: &str, redis_client: &str, extra: &[(&'static str, &str)]) -> Self {
        let cluster = SentinelCluster::start(DOWN_AFTER_MS);
        let (first, second) =
            spawn_pair_with(&cluster, &unique_prefix(test), "local", redis_client, extra);
        // Each instance announces itself as it starts and then every poll: one poll after
        // the second started, both count two live instances, so a fallback from then on
        // divides the limits by `INSTANCES`, as the bound in `Figures` assumes.
        std::thread::sleep(POLL + Duration::from_millis(200));
        let old_master = cluster.master_port().expect("a master");
        let watch = Arc::new(SwitchWatch::start(cluster.sentinels[0].port));
        Self {
            cluster,
            first,
            second,
            old_master,
            watch,
        }
    }

    /// `CLIENTS` clients, a request every 100 ms each, over both instances, as Nginx
    /// would forward them (`X-Forwarded-For` from a trusted proxy).
    fn traffic(&self) -> Traffic {
        let urls = [
            self.first.at("/limited_endpoint"),
            self.second.at("/limited_endpoint"),
        ];
        let clients = (0..CLIENTS).map(|id| (id, Origin::Forwarded(client_ip(id))));
        Traffic::start(&urls, clients, Duration::from_millis(100))
    }

    /// When a sentinel announced the switch (waiting off the runtime's threads).
    /// [`Stage::kill_the_master_under`] traffic begun `warm_up` before.
    async fn kill_the_master_after(&mut self, warm_up: Duration, switch_within: Duration) -> Run {
        let traffic = self.traffic();
        tokio::time::sleep(warm_up).await;
        self.kill_the_master_under(traffic, switch_within).await
    }

    /// kill -9 of the master while `traffic` runs, then the switch (within
    /// `switch_within`) and 3 s more of traffic.
    async fn kill_the_master_under(&mut self, traffic: Traffic, switch_within: Duration) -> Run {
        let fault_at = Instant::now();
        self.cluster.node_mut(self.old_master).kill();
        let switch_at = self.switch(switch_within).await;
        Run::after(traffic, Duration::from_secs(3), fault_at, switch_at).await
    }

    async fn switch(&self, limit: Duration) -> Instant {
        let watch = self.watch.clone();
        tokio::task::spawn_blocking(move || watch.wait(limit))
            .await
            .unwrap()
    }

    async fn assert_limits_shared_again(&self) {
        assert_limits_shared_again(&self.first, &self.second, 900).await;
    }
}

fn client_ip(client_id: usize) -> String {
    format!("198.51.{}.{}", 100 + client_id / 250, client_id % 250 + 1)
}

/// `GET /limited_endpoint` on `app`, from `http`, forwarded for client `client_id`.
fn limited_for(http: &reqwest::Client, app: &TestApp, client_id: usize) -> reqwest::RequestBuilder {
    http.get(app.at("/limited_endpoint"))
        .header("X-Forwarded-For", client_ip(client_id))
}

/// Notes when a sentinel announces `+switch-master`.
struct SwitchWatch {
    at: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SwitchWatch {
    fn start(sentinel_port: u16) -> Self {
        let at = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (at, stop) = (at.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = redis::Client::open(format!(
                    "redis://:{SENTINEL_PASSWORD}@127.0.0.1:{sentinel_port}"
                ))
                .unwrap();
                let mut conn = client
                    .get_connection_with_timeout(Duration::from_secs(2))
                    .unwrap();
                conn.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut pubsub = conn.as_pubsub();
                pubsub.subscribe("+switch-master").unwrap();
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if pubsub.get_message().is_ok() {
                        at.lock().unwrap().get_or_insert_with(Instant::now);
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("subscribed to +switch-master");
        Self {
            at,
            stop,
            thread: Some(thread),
        }
    }

    fn wait(&self, limit: Duration) -> Instant {
        wait_until("+switch-master", limit, || {
            self.at.lock().unwrap().is_some()
        });
        self.at.lock().unwrap().unwrap()
    }
}

impl Drop for SwitchWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What one failover cost, in the figures `docs/RELIABILITY.md` records.
struct Figures {
    scenario: &'static str,
    fault_to_switch: Duration,
    switch_to_redis: Duration,
    server_errors: usize,
    transport_errors: usize,
    worst_latency: Duration,
    /// Per client: its 200s beyond `C + floor(rate × elapsed)`, elapsed running from its
    /// first request sent to its last answer received, the most its shared bucket can
    /// admit.
    extra_admitted_max: i64,
    extra_admitted_mean: f64,
    /// From the first request the local fallback decided to the last one's answer.
    fallback_decided: Duration,
    /// The least and the most extra the promise allows a client (`Excess::allowed`).
    allowed: (i64, i64),
    /// The clients admitted more than the promise allows.
    beyond_the_promise: Vec<Excess>,
    requests: usize,
}

/// How the old master leaves.
#[derive(Clone, Copy)]
enum Fault {
    /// Killed or paused: it decides nothing after the fault, and every decision it made
    /// before had reached the replicas (on loopback replication lags by microseconds).
    Crash,
    /// `SENTINEL FAILOVER`: it keeps deciding until the instances follow the switch, and
    /// what it admits after the promoted replica stopped following it is lost with its
    /// data, so the client gets those tokens again.
    Handover,
}

/// One client's admissions beyond its shared bucket, and what the promise allows it.
struct Excess {
    client: usize,
    extra: i64,
    /// `local_allowance` (or the client's local decisions, if fewer), plus with a
    /// `Fault::Handover` what the old master may have admitted to it after the fault, and
    /// lost.
    allowed: i64,
}

/// Whole tokens that a bucket of the instances' policy (`RATE_LIMIT = CAPACITY` per
/// `TIME_WINDOW = WINDOW_S`), or of one instance's share of it among `sharing`, gains in
/// `elapsed` when it is not full.
fn refilled(elapsed: Duration, sharing: u64) -> u64 {
    elapsed.as_micros() as u64 * CAPACITY / (WINDOW_S * 1_000_000 * sharing)
}

/// The most the local fallback can admit to one client, beyond its shared bucket, while it
/// decides for `decided`: each of the `INSTANCES` instances keeps for the client a bucket
/// of its share of the policy (`Policy::share_of`: the capacity divided by the instances,
/// at least one token, refilled at the rate divided by them), and nothing it admits is
/// charged to Redis. docs/RELIABILITY.md promises this bound.
fn local_allowance(decided: Duration) -> u64 {
    INSTANCES * ((CAPACITY / INSTANCES).max(1) + refilled(decided, INSTANCES))
}

/// A fault under traffic: every request's record, when the fault came, and when the
/// sentinels switched the master.
struct Run {
    records: Vec<Record>,
    fault_at: Instant,
    switch_at: Instant,
}

impl Run {
    /// `traffic` for `more` after the switch, then stopped.
    async fn after(
        traffic: Traffic,
        more: Duration,
        fault_at: Instant,
        switch_at: Instant,
    ) -> Self {
        tokio::time::sleep(more).await;
        Self {
            records: traffic.stop().await,
            fault_at,
            switch_at,
        }
    }
}

impl Figures {
    fn measure(scenario: &'static str, fault: Fault, run: &Run) -> Self {
        let (records, fault_at, switch_at) = (&run.records[..], run.fault_at, run.switch_at);
        let first_redis_after_switch = records
            .iter()
            .filter(|r| r.sent >= switch_at && r.source == "redis")
            .map(|r| r.sent + r.latency)
            .min()
            .expect("a Redis-backed decision after the switch");
        let local = || records.iter().filter(|r| r.source == "local");
        let fallback_decided = match (
            local().map(|r| r.sent).min(),
            local().map(|r| r.sent + r.latency).max(),
        ) {
            (Some(from), Some(to)) => Some(to - from),
            _ => None,
        };
        // No local decision, no local bucket: nothing beyond the shared one.
        let fallback_allowance = fallback_decided.map_or(0, local_allowance) as i64;
        let mut excess = Vec::new();
        for client in records
            .iter()
            .map(|r| r.client)
            .collect::<std::collections::BTreeSet<_>>()
        {
            let mine: Vec<&Record> = records.iter().filter(|r| r.client == client).collect();
            let first = mine.iter().map(|r| r.sent).min().unwrap();
            let last = mine.iter().map(|r| r.sent + r.latency).max().unwrap();
            let admitted = mine.iter().filter(|r| r.status == 200).count() as i64;
            // The fallback admits no more than it decides.
            let local_decisions = mine.iter().filter(|r| r.source == "local").count() as i64;
            let may_be_lost = match fault {
                Fault::Crash => 0,
                // What the old master can admit from the fault until the instances follow
                // the switch (on +switch-master, or at their next poll at the latest): the
                // tokens the bucket may still hold at the fault, and those it gains until then.
                Fault::Handover => {
                    let admitted_before = mine
                        .iter()
                        .filter(|r| r.status == 200 && r.sent + r.latency <= fault_at)
                        .count() as u64;
                    let held = (CAPACITY + refilled(fault_at.saturating_duration_since(first), 1))
                        .saturating_sub(admitted_before);
                    (held + refilled(switch_at + POLL - fault_at, 1)) as i64
                }
            };
            excess.push(Excess {
                client,
                extra: admitted - (CAPACITY + refilled(last - first, 1)) as i64,
                allowed: fallback_allowance.min(local_decisions) + may_be_lost,
            });
        }
        let extra = || excess.iter().map(|e| e.extra);
        let allowed = || excess.iter().map(|e| e.allowed);
        Self {
            scenario,
            fault_to_switch: switch_at.saturating_duration_since(fault_at),
            switch_to_redis: first_redis_after_switch.saturating_duration_since(switch_at),
            server_errors: records.iter().filter(|r| r.status >= 500).count(),
            transport_errors: records.iter().filter(|r| r.status == 0).count(),
            worst_latency: records.iter().map(|r| r.latency).max().unwrap_or_default(),
            extra_admitted_max: extra().max().unwrap_or(0),
            extra_admitted_mean: extra().sum::<i64>() as f64 / excess.len().max(1) as f64,
            fallback_decided: fallback_decided.unwrap_or_default(),
            allowed: (allowed().min().unwrap_or(0), allowed().max().unwrap_or(0)),
            beyond_the_promise: excess.into_iter().filter(|e| e.extra > e.allowed).collect(),
            requests: records.len(),
        }
    }

    fn print(&self) {
        let allowed = match self.allowed {
            (least, most) if least == most => format!("{least}"),
            (least, most) => format!("{least} to {most}"),
        };
        println!(
            "FIGURES | {} | fault→+switch-master {} ms | +switch-master→first Redis decision {} ms | 5xx {} | transport errors {} | worst latency {} ms | extra admitted per client: max {}, mean {:.1}, allowed {} ({} ms of local fallback) | requests {}",
            self.scenario,
            self.fault_to_switch.as_millis(),
            self.switch_to_redis.as_millis(),
            self.server_errors,
            self.transport_errors,
            self.worst_latency.as_millis(),
            self.extra_admitted_max,
            self.extra_admitted_mean,
            allowed,
            self.fallback_decided.as_millis(),
            self.requests,
        );
    }

    /// Prints the figures (the test output is where docs/RELIABILITY.md takes them from),
    /// then holds them to the promise.
    fn print_and_check(&self) {
        self.print();
        self.assert_promise();
    }

    fn assert_promise(&self) {
        assert_eq!(self.server_errors, 0, "no 5xx");
        assert_eq!(self.transport_errors, 0, "every request answered");
        assert!(
            self.worst_latency < Duration::from_secs(1),
            "worst latency {:?}",
            self.worst_latency
        );
        assert!(
            self.switch_to_redis < Duration::from_secs(2),
            "followed the switch in {:?}",
            self.switch_to_redis
        );
        assert!(
            self.beyond_the_promise.is_empty(),
            "admitted beyond their shared bucket more than {INSTANCES} instances' local shares over {:?} of fallback (and, in a handover, the old master's lost decisions) allow:\n{}",
            self.fallback_decided,
            self.beyond_the_promise
                .iter()
                .map(|e| format!(
                    "client {} ({}): {} extra, {} allowed",
                    e.client,
                    client_ip(e.client),
                    e.extra,
                    e.allowed
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Sends `2 × CAPACITY` requests at once from a new client, spread over both instances,
/// and returns how many passed and from which sources.
async fn fresh_client_burst(apps: &[&TestApp], client_id: usize) -> (u64, Vec<String>) {
    let http = client();
    let answers = all_at_once(
        (0..2 * CAPACITY as usize).map(|n| limited_for(&http, apps[n % apps.len()], client_id)),
    )
    .await;
    let (passed, sources) = admitted(answers);
    (passed as u64, sources)
}

/// Waits until both instances decide through Redis again.
async fn wait_for_redis_decisions(apps: &[&TestApp], probe_client: usize) {
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    for app in apps {
        until_redis_decides(&app.url, deadline, || limited_for(&http, app, probe_client)).await;
    }
}

async fn assert_limits_shared_again(first: &TestApp, second: &TestApp, client_id: usize) {
    wait_for_redis_decisions(&[first, second], client_id + 1).await;
    let (passed, sources) = fresh_client_burst(&[first, second], client_id).await;
    assert!(sources.iter().all(|s| s == "redis"), "{sources:?}");
    assert_eq!(
        passed, CAPACITY,
        "a fresh client gets exactly the burst across both instances"
    );
}

async fn kill_the_master_mid_traffic(redis_client: &str, scenario: &'static str) {
    let mut stage = Stage::start_with("kill", redis_client);
    let old_master = stage.old_master;
    let run = stage
        .kill_the_master_after(Duration::from_secs(2), Duration::from_secs(20))
        .await;

    Figures::measure(scenario, Fault::Crash, &run).print_and_check();
    assert_ne!(stage.cluster.master_port(), Some(old_master));
    stage.assert_limits_shared_again().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_master_mid_traffic_costs_no_5xx_and_limits_are_shared_again() {
    let _serial = ONE_AT_A_TIME.lock().await;
    kill_the_master_mid_traffic("multiplexed", "kill -9 of the master").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_r2d2_pool_killing_the_master_also_costs_no_5xx() {
    let _serial = ONE_AT_A_TIME.lock().await;
    kill_the_master_mid_traffic("pool", "kill -9 of the master, REDIS_CLIENT=pool").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_master_while_batches_are_in_flight_leaves_no_decision_unanswered() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // Every decision goes to Redis (no cached denials), from 64 clients at once: calls are
    // in flight all the time, with the decisions that queued behind them.
    let mut stage = Stage::start_with_settings(
        "kill-batches",
        "multiplexed",
        &[("DENY_CACHE_SIZE", "0"), ("REDIS_BATCH_MAX", "32")],
    );
    let urls = [
        stage.first.at("/limited_endpoint"),
        stage.second.at("/limited_endpoint"),
    ];
    let old_master = stage.old_master;
    let calls_before = stage.cluster.node(old_master).command_calls("evalsha");
    let clients = (0..64).map(|id| (id, Origin::Forwarded(client_ip(id))));
    let traffic = Traffic::start(&urls, clients, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = stage.cluster.node(old_master).command_calls("evalsha") - calls_before;
    let decided = traffic.answered_so_far() as u64;
    let run = stage
        .kill_the_master_under(traffic, Duration::from_secs(20))
        .await;

    println!("before the kill: {decided} decisions in {calls} calls (announcements included)");
    assert!(
        calls < decided,
        "decisions went together: {calls} calls for {decided} decisions"
    );
    // Every request has its answer (no transport error, no 5xx: FAIL_MODE=local decided
    // what Redis could not), and no client got more than its shared bucket and the local
    // fallback's share allow: none was decided twice.
    Figures::measure(
        "kill -9 of the master with batches in flight",
        Fault::Crash,
        &run,
    )
    .print_and_check();
    assert!(run.records.iter().any(|r| r.source == "local"));
    stage.assert_limits_shared_again().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_master_is_failed_over_and_never_serves_a_decision_after_it_returns() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let stage = Stage::start("pause");
    let old_master = stage.cluster.node(stage.old_master);
    let traffic = stage.traffic();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault_at = Instant::now();
    old_master.signal("STOP");
    let switch_at = stage.switch(Duration::from_secs(20)).await;
    // Stay paused past the failover, as a hung node would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    old_master.signal("CONT");
    wait_until(
        "the old master to rejoin as a replica",
        Duration::from_secs(20),
        || old_master.role().as_deref() == Some("slave"),
    );
    let evalsha_before = old_master.command_calls("evalsha");
    let run = Run::after(traffic, Duration::from_secs(2), fault_at, switch_at).await;

    Figures::measure(
        "SIGSTOP of the master, SIGCONT after failover",
        Fault::Crash,
        &run,
    )
    .print_and_check();
    assert_eq!(
        old_master.command_calls("evalsha"),
        evalsha_before,
        "the demoted master served decisions"
    );
    stage.assert_limits_shared_again().await;
    assert_eq!(
        old_master.command_calls("evalsha"),
        evalsha_before,
        "the demoted master served decisions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_cache_and_a_forced_failover_fail_no_decision() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let stage = Stage::start("flush");
    let noscript_before = noscript_errors(&stage.first).await;
    let traffic = stage.traffic();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in &stage.cluster.nodes {
        let _: () = node.command(&["SCRIPT", "FLUSH"]);
    }
    let fault_at = Instant::now();
    let _: () = stage.cluster.sentinels[1].command(&["SENTINEL", "FAILOVER", "redis-master"]);
    let switch_at = stage.switch(Duration::from_secs(20)).await;
    let run = Run::after(traffic, Duration::from_secs(2), fault_at, switch_at).await;

    Figures::measure(
        "SCRIPT FLUSH, then SENTINEL FAILOVER",
        Fault::Handover,
        &run,
    )
    .print_and_check();
    assert_eq!(
        noscript_errors(&stage.first).await,
        noscript_before,
        "decisions failed on a missing script"
    );
    stage.assert_limits_shared_again().await;
}

async fn noscript_errors(app: &TestApp) -> f64 {
    let text = metrics(&client(), app).await;
    counter(&text, r#"ratelimit_store_errors_total{kind="noscript"}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_sentinel_down_a_killed_master_is_still_failed_over_and_followed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut stage = Stage::start("two-sentinels");
    // The instances were told of all three; the one they asked first may be the dead one.
    stage.cluster.sentinels[2].kill();
    let old_master = stage.old_master;
    let run = stage
        .kill_the_master_after(Duration::from_secs(1), Duration::from_secs(30))
        .await;

    Figures::measure(
        "one sentinel of three down, then kill -9 of the master",
        Fault::Crash,
        &run,
    )
    .print_and_check();
    assert_ne!(stage.cluster.master_port(), Some(old_master));
    stage.assert_limits_shared_again().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_redis_node_down_each_fail_mode_does_what_it_says_and_recovery_is_automatic() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = SentinelCluster::start(DOWN_AFTER_MS);
    let prefix = unique_prefix("all-down");
    let (first, second) = spawn_pair(&cluster, &prefix, "local");
    let (open, _) = spawn_pair(&cluster, &unique_prefix("all-down-open"), "open");
    let (closed, _) = spawn_pair(&cluster, &unique_prefix("all-down-closed"), "closed");
    // Let every instance announce itself, so the local share is known.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for node in cluster.nodes.iter_mut() {
        node.kill();
    }
    let http = client();

    // local: a new client gets each instance's share of the burst, no more.
    let (passed, sources) = fresh_client_burst(&[&first, &second], 500).await;
    assert!(sources.iter().all(|s| s == "local"), "{sources:?}");
    assert!(
        passed > 0 && passed <= CAPACITY,
        "admitted {passed} locally"
    );
    for app in [&first, &second, &open, &closed] {
        let ready = http.get(app.at("/ready")).send().await.unwrap();
        assert_eq!(ready.status(), 503);
        assert_eq!(
            http.get(app.at("/health")).send().await.unwrap().status(),
            200
        );
    }
    // open: everything passes, and says so.
    for _ in 0..(2 * CAPACITY) {
        let response = limited_for(&http, &open, 501).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "X-RateLimit-Source"), "open");
    }
    // closed: 503 with Retry-After: 1.
    let response = limited_for(&http, &closed, 502).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "Retry-After"), "1");
    assert_eq!(header(&response, "X-RateLimit-Source"), "closed");

    // Bring the nodes back where the sentinels expect them, as their supervisor would;
    // nothing is restarted in the service.
    for node in cluster.nodes.iter_mut() {
        node.restart();
    }
    let recovery_started = Instant::now();
    wait_for_redis_decisions(&[&first, &second], 503).await;
    println!(
        "FIGURES | every node down, then back | first Redis decision {} ms after the nodes were back",
        recovery_started.elapsed().as_millis()
    );
    assert_eq!(
        http.get(first.at("/ready")).send().await.unwrap().status(),
        200
    );
    assert_limits_shared_again(&first, &second, 910).await;
}
