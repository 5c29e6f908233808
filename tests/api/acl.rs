//! The instances' Redis user (`redis/users.acl`, which the harness loads into every data
//! node as the shipped topologies do): it decides, and it can do nothing else. A leaked
//! instance password must not empty the data set, reconfigure a node, make it follow
//! another master or reach keys that are not the limiter's; and a node answers nobody who
//! does not log in.

use std::time::Duration;

use testkit::{
    RedisProcess, SERVICE_PASSWORD, SERVICE_USER, TestApp, header, unique_prefix, wait_until,
};

/// The configs the shipped topologies run their data nodes from: the Sentinel group's
/// master and replicas, and every node of Cluster mode.
const SHIPPED_DATA_NODES: [&str; 3] = [
    "redis/master.conf",
    "redis/replica.conf",
    "redis/cluster-node.conf",
];

/// The error `args` get from `redis` as the instances' user, or `None` if it ran.
fn refusal_to_the_service_user(redis: &RedisProcess, args: &[&str]) -> Option<String> {
    redis
        .reply_to(Some((SERVICE_USER, SERVICE_PASSWORD)), args)
        .err()
}

#[test]
fn on_every_shipped_data_node_the_instances_user_is_refused_every_command_that_administers_it() {
    for template in SHIPPED_DATA_NODES {
        // DEBUG enabled, so that only the user's rights can refuse it.
        let redis =
            RedisProcess::server_from_template(template, None, &["--enable-debug-command", "yes"]);
        let replica_of_nowhere = ["REPLICAOF", "127.0.0.1", "1"];
        for args in [
            &["FLUSHALL"][..],
            &["FLUSHDB"],
            &["CONFIG", "SET", "maxmemory", "1"],
            &["CONFIG", "GET", "*"],
            &replica_of_nowhere,
            &["SLAVEOF", "NO", "ONE"],
            &["ACL", "SETUSER", SERVICE_USER, "+@all"],
            &["SHUTDOWN", "NOSAVE"],
            &["DEBUG", "SLEEP", "0"],
            &["KEYS", "*"],
            &["SCRIPT", "FLUSH"],
            // EVAL is the user's (the Cluster client sends a script whole where a node
            // lacks it), and a script runs with the user's rights, no more.
            &["EVAL", "return redis.call('FLUSHALL')", "0"],
            &["EVAL", "return redis.call('KEYS', '*')", "0"],
            &["SUBSCRIBE", "__sentinel__:hello"],
        ] {
            let refusal = refusal_to_the_service_user(&redis, args);
            // A command a script calls is refused in the script's own words.
            assert!(
                refusal.as_deref().is_some_and(|e| e.contains("NOPERM")
                    || e.contains("THE USER EXECUTING THE SCRIPT CAN'T RUN THIS COMMAND")),
                "{template}: {args:?} as {SERVICE_USER}: {refusal:?}"
            );
        }
        let role: String = redis.role().expect("the node answers");
        assert_eq!(role, "master", "{template}: no REPLICAOF got through");
    }
}

#[test]
fn every_shipped_data_node_refuses_a_client_that_does_not_log_in() {
    for template in SHIPPED_DATA_NODES {
        let redis = RedisProcess::server_from_template(template, None, &[]);

        let anonymous = redis.reply_to(None, &["PING"]);
        let service = redis.reply_to(Some((SERVICE_USER, SERVICE_PASSWORD)), &["PING"]);

        assert!(
            anonymous.as_ref().is_err_and(|e| e.contains("NOAUTH")),
            "{template}: a PING without a login got {anonymous:?}"
        );
        assert!(
            matches!(&service, Ok(redis::Value::SimpleString(pong)) if pong == "PONG"),
            "{template}: the instances' user, which logs in, got {service:?}"
        );
    }
}

#[test]
fn the_instances_user_reaches_no_key_outside_the_limiters_prefix() {
    let redis = RedisProcess::server(None, &[]);
    let _: () = redis.command(&["SET", "elsewhere:secret", "1"]);
    let hash = "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"; // SHA1 of "return 1"
    let loaded: String = redis.command(&["SCRIPT", "LOAD", "return 1"]);
    assert_eq!(loaded, hash);
    for args in [
        &["DEL", "elsewhere:secret"][..],
        &["EVALSHA", hash, "1", "elsewhere:secret"],
        &["HSET", "elsewhere:secret", "f", "1"],
    ] {
        let refusal = refusal_to_the_service_user(&redis, args);
        assert!(
            refusal.as_deref().is_some_and(|e| e.contains("NOPERM")),
            "{args:?} as {SERVICE_USER}: {refusal:?}"
        );
    }
    let kept: i64 = redis.command(&["EXISTS", "elsewhere:secret"]);
    assert_eq!(kept, 1);
    let own = format!("{}:default:{{ip=203.0.113.9}}", unique_prefix("acl"));
    assert_eq!(
        refusal_to_the_service_user(&redis, &["EVALSHA", hash, "1", &own]),
        None,
        "its own keys are allowed"
    );
}

/// `REDIS_USERNAME` with a `REDIS_URL` that names no user: every connection of either
/// client mode logs in as that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_logs_in_as_redis_username_in_both_client_modes() {
    let redis = RedisProcess::server(None, &[]);
    let bare_url = format!("redis://127.0.0.1:{}", redis.port);
    for mode in ["multiplexed", "pool"] {
        let app = TestApp::spawn(&[
            ("REDIS_URL", &bare_url),
            ("REDIS_USERNAME", SERVICE_USER),
            ("REDIS_PASSWORD", SERVICE_PASSWORD),
            ("REDIS_CLIENT", mode),
            ("KEY_PREFIX", &unique_prefix("acl-login")),
            ("FAIL_MODE", "closed"),
        ]);
        let response = app.get("/limited_endpoint").await;
        assert_eq!(response.status(), 200, "{mode}");
        assert_eq!(header(&response, "x-ratelimit-source"), "redis", "{mode}");
        let clients: String = redis.command(&["CLIENT", "LIST"]);
        let logged_in = |user: &str| {
            clients
                .lines()
                .any(|c| c.contains(&format!(" user={user} ")))
        };
        assert!(logged_in(SERVICE_USER), "{mode}: {clients}");
        app.stop().await;
        // The next mode's connections must be its own.
        wait_until(
            "the instance's connections to close",
            Duration::from_secs(5),
            || {
                let clients: String = redis.command(&["CLIENT", "LIST"]);
                !clients.contains(&format!(" user={SERVICE_USER} "))
            },
        );
    }
}
