//! Sentinels that name the wrong master: one left behind by a failover (stale), one that
//! claims a newer configuration for a server of its own (lying). The instances believe
//! the newest configuration the most sentinels hold, and with `REDIS_DATA_NODES` no master
//! outside the data nodes they were given. And what keeps anyone else from making a
//! sentinel lie: the shipped sentinels answer nobody who does not log in, and the
//! instances' own user may read the master and follow it, not reconfigure a sentinel.
//! A sentinel that is paused delays no failover: the instances listen to every one.

use std::io::Read;

use super::*;
use testkit::{RedisProcess, SENTINEL_AUTH_PASSWORD, free_port, service_command};

/// `sentinel` forgets the group and monitors `other` under the same name: a sentinel cut
/// off with an old master that keeps naming it. Its answer is a real master that confirms
/// with ROLE, and its configuration epoch is 0, older than any failover's.
fn leave_behind(sentinel: &RedisProcess, other: u16) {
    let _: () = sentinel.command(&["SENTINEL", "REMOVE", "redis-master"]);
    let _: () = sentinel.command(&[
        "SENTINEL",
        "MONITOR",
        "redis-master",
        "127.0.0.1",
        &other.to_string(),
        "2",
    ]);
    let _: () = sentinel.command(&[
        "SENTINEL",
        "SET",
        "redis-master",
        "auth-user",
        "sentinel",
        "auth-pass",
        SENTINEL_AUTH_PASSWORD,
    ]);
}

/// The port of the master `sentinel` names.
fn named_by(sentinel: &RedisProcess) -> u16 {
    let (_, port): (String, u16) =
        sentinel.command(&["SENTINEL", "get-master-addr-by-name", "redis-master"]);
    port
}

/// The ports of the masters an instance says it decides on (`ratelimit_current_master_info`).
async fn masters_in_use(base_url: &str) -> Vec<u16> {
    let response = client()
        .get(format!("{base_url}/metrics"))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("ratelimit_current_master_info{addr=\"127.0.0.1:"))
        .filter(|rest| rest.ends_with("\"} 1"))
        .filter_map(|rest| rest.split('"').next()?.parse().ok())
        .collect()
}

async fn wait_for_master(app: &TestApp, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while masters_in_use(&app.url).await != vec![port] {
        assert!(
            Instant::now() < deadline,
            "{} decides on {:?}, not on the master 127.0.0.1:{port}",
            app.url,
            masters_in_use(&app.url).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_left_with_an_old_master_is_outvoted_at_start_and_after_a_failover() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = SentinelCluster::start(DOWN_AFTER_MS);
    let master = cluster.master_port().expect("a master");
    let old_master = RedisProcess::server(None, &[]);
    // The sentinel the instances are told of first: one that believes the first sentinel
    // that answers stays on the old master.
    leave_behind(&cluster.sentinels[0], old_master.port);
    // Sentinels send their hello messages to the sentinels they know as well, and one
    // with a newer epoch would bring the one left behind up to date: the others forget
    // it, and it cannot be found again where they look (the group's nodes).
    for sentinel in &cluster.sentinels[1..] {
        let _: u64 = sentinel.command(&["SENTINEL", "RESET", "redis-master"]);
    }
    wait_until(
        "the two others to know each other and both replicas",
        Duration::from_secs(30),
        || {
            cluster.sentinels[1..].iter().all(|sentinel| {
                let others: Vec<redis::Value> =
                    sentinel.command(&["SENTINEL", "SENTINELS", "redis-master"]);
                let replicas: Vec<redis::Value> =
                    sentinel.command(&["SENTINEL", "REPLICAS", "redis-master"]);
                others.len() == 1 && replicas.len() == 2
            })
        },
    );
    let (first, second) = spawn_pair(&cluster, &unique_prefix("stale-sentinel"), "local");

    // At start every configuration has epoch 0: two sentinels of three name the master.
    for app in [&first, &second] {
        wait_for_master(app, master).await;
    }
    assert_limits_shared_again(&first, &second, 800).await;

    // After a failure: the two others elect a new master under a new epoch; the one left
    // behind still names the old master, as a master.
    cluster.node_mut(master).kill();
    wait_until("a new master", Duration::from_secs(30), || {
        named_by(&cluster.sentinels[1]) != master
    });
    let new_master = named_by(&cluster.sentinels[1]);
    assert_eq!(named_by(&cluster.sentinels[0]), old_master.port);
    assert_eq!(old_master.role().as_deref(), Some("master"));
    for app in [&first, &second] {
        wait_for_master(app, new_master).await;
    }
    assert_limits_shared_again(&first, &second, 810).await;
    assert_eq!(
        old_master.command_calls("evalsha"),
        0,
        "the master named by the sentinel left behind decided"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_data_nodes_set_a_master_outside_them_is_ignored_and_logged_whatever_its_epoch() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = SentinelCluster::start(DOWN_AFTER_MS);
    let master = cluster.master_port().expect("a master");
    // What anyone who can reach a sentinel can make of it: a configuration newer than any
    // failover's, naming a server of their own.
    let foreign = RedisProcess::server(None, &[]);
    let liar = RedisProcess::sentinel_with(
        foreign.port,
        DOWN_AFTER_MS,
        "sentinel config-epoch redis-master 100",
    );
    let hosts = format!("127.0.0.1:{},{}", liar.port, cluster.sentinel_hosts());
    let data_nodes = cluster
        .nodes
        .iter()
        .map(|node| format!("127.0.0.1:{}", node.port))
        .collect::<Vec<_>>()
        .join(",");

    // Without REDIS_DATA_NODES the newest configuration wins, the liar's.
    let believing = TestApp::spawn_with(&instance_vars(
        &hosts,
        &unique_prefix("believing"),
        "local",
        "multiplexed",
        "believing",
    ));
    wait_for_master(&believing, foreign.port).await;

    // With it, the service (the real binary, for its log) keeps to the data nodes.
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let port = free_port();
    let mut vars = instance_vars(
        &hosts,
        &unique_prefix("guarded"),
        "local",
        "multiplexed",
        "guarded",
    );
    vars.push(("REDIS_DATA_NODES", data_nodes));
    vars.push(("RUST_LOG", "warn".to_string()));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut guarded = service_command(port, &vars)
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().expect("the log file"))
        .spawn()
        .expect("start the service");
    let url = format!("http://127.0.0.1:{port}");
    wait_until("the service to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let http = client();
    until_redis_decides(
        "the instance with REDIS_DATA_NODES",
        Instant::now() + Duration::from_secs(10),
        || {
            http.get(format!("{url}/limited_endpoint"))
                .header("X-Forwarded-For", client_ip(820))
        },
    )
    .await;
    let in_use = masters_in_use(&url).await;
    let _ = guarded.kill();
    let _ = guarded.wait();
    let mut logged = String::new();
    log.reopen()
        .expect("the log file")
        .read_to_string(&mut logged)
        .expect("read the log");

    assert_eq!(in_use, vec![master], "log:\n{logged}");
    let foreign_addr = format!("127.0.0.1:{}", foreign.port);
    assert!(
        logged
            .lines()
            .any(|line| line.contains("WARN") && line.contains(&foreign_addr)),
        "no warning naming {foreign_addr}:\n{logged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sentinel_refuses_a_client_that_does_not_log_in_while_the_instances_that_do_decide() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = SentinelCluster::start(DOWN_AFTER_MS);
    let (first, second) = spawn_pair(&cluster, &unique_prefix("sentinel-login"), "local");

    let monitor_a_fake = ["SENTINEL", "MONITOR", "evil", "127.0.0.1", "1", "2"];
    for sentinel in &cluster.sentinels {
        let without_a_password = |args: &[&str]| sentinel.reply_to(None, args);
        assert_refuses_each(
            sentinel,
            &[
                &monitor_a_fake[..],
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "redis-master"],
                &["PING"],
            ],
            "NOAUTH",
            without_a_password,
        );
    }
    let http = client();
    for app in [&first, &second] {
        until_redis_decides(&app.url, Instant::now() + Duration::from_secs(10), || {
            http.get(app.at("/limited_endpoint"))
        })
        .await;
        let ready = http.get(app.at("/ready")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "{}", app.url);
    }
}

/// Asserts that `sentinel` answers each of `commands`, sent by `send`, with the error
/// `refusal`, and still monitors its one master afterwards.
fn assert_refuses_each(
    sentinel: &RedisProcess,
    commands: &[&[&str]],
    refusal: &str,
    send: impl Fn(&[&str]) -> Result<redis::Value, String>,
) {
    for args in commands {
        let reply = send(args);
        assert!(
            reply.as_ref().is_err_and(|e| e.contains(refusal)),
            "sentinel {} answered {args:?} with {reply:?}, not {refusal}",
            sentinel.port
        );
    }
    let masters: Vec<redis::Value> = sentinel.command(&["SENTINEL", "MASTERS"]);
    assert_eq!(masters.len(), 1, "sentinel {}: {masters:?}", sentinel.port);
}

/// A client logged in to `sentinel` as the instances are.
fn as_instances(sentinel: &RedisProcess, args: &[&str]) -> Result<redis::Value, String> {
    sentinel.reply_to(Some((SERVICE_USER, SENTINEL_SERVICE_PASSWORD)), args)
}

/// An operator's failover on `sentinel`; the port of the master it promoted.
fn fail_over(cluster: &SentinelCluster, sentinel: &RedisProcess) -> u16 {
    let old = named_by(sentinel);
    let _: () = sentinel.command(&["SENTINEL", "FAILOVER", "redis-master"]);
    wait_until(
        "the sentinel to name a new master",
        Duration::from_secs(30),
        || named_by(sentinel) != old,
    );
    let new = named_by(sentinel);
    assert!(
        cluster.nodes.iter().any(|node| node.port == new),
        "the sentinel promoted {new}, not a node of the group"
    );
    new
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instances_sentinel_user_cannot_reconfigure_any_sentinel_yet_follows_a_failover() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = SentinelCluster::start(DOWN_AFTER_MS);
    let master = cluster.master_port().expect("a master");
    let app = TestApp::spawn_with(&instance_vars(
        &cluster.sentinel_hosts(),
        &unique_prefix("sentinel-user"),
        "local",
        "multiplexed",
        "app-1",
    ));
    wait_for_master(&app, master).await;

    let commands: [&[&str]; 5] = [
        &["SENTINEL", "MONITOR", "evil", "127.0.0.1", "1", "2"],
        &["SENTINEL", "SET", "redis-master", "quorum", "1"],
        &["SENTINEL", "FAILOVER", "redis-master"],
        &["SENTINEL", "REMOVE", "redis-master"],
        &["SENTINEL", "RESET", "*"],
    ];
    for sentinel in &cluster.sentinels {
        // The credentials are right: what the instances send is answered.
        let view = as_instances(sentinel, &["SENTINEL", "MASTER", "redis-master"]);
        assert!(view.is_ok(), "sentinel {}: {view:?}", sentinel.port);
        assert_refuses_each(sentinel, &commands, "NOPERM", |args| {
            as_instances(sentinel, args)
        });
        assert_eq!(named_by(sentinel), master, "sentinel {}", sentinel.port);
    }

    let new_master = fail_over(&cluster, &cluster.sentinels[0]);
    wait_for_master(&app, new_master).await;
    let http = client();
    until_redis_decides(&app.url, Instant::now() + Duration::from_secs(10), || {
        http.get(app.at("/limited_endpoint"))
    })
    .await;
}

/// Each sentinel has a client subscribed as the instances' user: the instance listens to
/// every one of them.
fn every_sentinel_has_a_listening_instance(cluster: &SentinelCluster) -> bool {
    cluster.sentinels.iter().all(|sentinel| {
        let clients: String = sentinel.command(&["CLIENT", "LIST"]);
        clients.lines().any(|line| {
            line.contains(&format!(" user={SERVICE_USER} ")) && line.contains(" sub=1 ")
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_followed_at_once_while_the_first_sentinel_named_is_paused() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = SentinelCluster::start(DOWN_AFTER_MS);
    let master = cluster.master_port().expect("a master");
    // Polling once a minute: within the bound below only a +switch-master event moves the
    // instance, and no traffic makes a failed decision ring the resolver.
    let mut vars = instance_vars(
        &cluster.sentinel_hosts(),
        &unique_prefix("paused-sentinel"),
        "local",
        "multiplexed",
        "app-1",
    );
    vars.push(("SENTINEL_POLL_MS", "60000".to_string()));
    let app = TestApp::spawn_with(&vars);
    wait_for_master(&app, master).await;
    wait_until(
        "the instance to subscribe to +switch-master on every sentinel",
        Duration::from_secs(10),
        || every_sentinel_has_a_listening_instance(&cluster),
    );

    // Paused, its connections stay open and silent: a listener on it hears nothing and
    // sees no error either.
    cluster.sentinels[0].signal("STOP");
    let new_master = fail_over(&cluster, &cluster.sentinels[1]);
    let switched = Instant::now();
    wait_for_master(&app, new_master).await;
    let followed = switched.elapsed();
    cluster.sentinels[0].signal("CONT");

    eprintln!("followed the failover {followed:?} after the sentinel named the new master");
    assert!(
        followed < Duration::from_secs(5),
        "followed the failover only after {followed:?}"
    );
}
