//! The default topology: two instances behind Nginx, a master, two replicas and three
//! sentinels, with the `gateway` profile's demo upstream and the `observability` profile's
//! Prometheus. One stack goes through every
//! step in order (the faults before the gateway, the gateway before every instance is
//! killed); each step checks one behaviour and says so.
//!
//! - `access`: who may talk to what (passwords, the instances' Redis user, networks);
//! - `limits`: exact limits through Nginx, and whose X-Forwarded-For is believed;
//! - `faults`: the master killed, and cut off its network, under traffic;
//! - `gateway`: the gateway in front of the demo upstream, and with no instance left;
//! - `observability`: the profile's Prometheus scraping both instances.

mod access;
mod faults;
mod gateway;
mod limits;
mod observability;

use std::time::Duration;

use testkit::UpstreamCounts as Counts;

use crate::clients::{Reply, requests_from};
use crate::process::docker_ok;
use crate::stack::{Spec, Stack};
use crate::{RATE_LIMIT, Steps, answers_200, every_log_is_rotated, http, wait_until};

const DATA_NODES: [&str; 3] = ["redis-master", "redis-replica-1", "redis-replica-2"];
const SENTINELS: [&str; 3] = ["sentinel-1", "sentinel-2", "sentinel-3"];
const INSTANCES: [&str; 2] = ["app-1", "app-2"];
/// The front network's /24: clients take addresses of its lower half.
const NET: &str = "172.28.99";

const SPEC: Spec = Spec {
    project: "ratelimiter-e2e",
    profiles: &["gateway", "observability"],
    services: &[],
    net_prefixes: [NET, "172.28.95", "172.28.97", "172.28.93"],
    settings: &[
        ("RATE_LIMIT", "10"),
        ("TIME_WINDOW", "60"),
        ("FAIL_MODE", "local"),
        ("GATEWAY_FAIL_MODE", "closed"),
    ],
    on_failure: &[(
        "sentinel-1",
        &[
            "redis-cli",
            "-p",
            "26379",
            "sentinel",
            "master",
            "redis-master",
        ],
    )],
};

#[tokio::test]
#[ignore = "needs a Docker engine: scripts/test.sh runs it with --ignored where Docker is"]
async fn the_sentinel_topology_holds_exact_limits_through_kills_partitions_and_the_gateway() {
    let mut steps = Steps::first("up: every container healthy, both instances ready");
    let t = Topology::up().await;
    steps.step("every container's log is rotated");
    every_log_is_rotated(&t.stack);
    steps.step("Prometheus scrapes both instances with the shipped rules");
    t.prometheus_scrapes_both_instances_with_the_shipped_rules()
        .await;
    steps.step("sentinels refuse unauthenticated commands");
    t.sentinels_refuse_unauthenticated_commands();
    steps.step("the instances' sentinel user cannot reconfigure a sentinel");
    t.the_instances_sentinel_user_cannot_reconfigure_a_sentinel();
    steps.step("the instances' Redis user touches only its keys");
    t.the_instances_redis_user_touches_only_its_keys();
    steps.step("Nginx neither resolves nor reaches Redis");
    t.nginx_neither_resolves_nor_reaches_redis();
    steps.step("a client gets exactly its limit from both instances");
    t.a_client_gets_exactly_its_limit_from_both_instances()
        .await;
    steps.step("Envoy's rate-limit service is exact across both instances");
    t.the_rate_limit_service_is_exact_across_both_instances()
        .await;
    steps.step("X-Forwarded-For is believed from Nginx only");
    t.x_forwarded_for_is_believed_from_nginx_only();
    steps.step("docker kill of the master under traffic");
    t.killing_the_master_under_traffic_fails_over().await;
    steps.step("the master cut off its network under traffic");
    t.cutting_the_master_off_fails_over_and_heals().await;
    steps.step("the gateway lets exactly the limit through");
    let exhausted = t.the_gateway_lets_exactly_the_limit_through().await;
    steps.step("the gateway's denial is a problem with quota headers");
    t.the_gateways_denial_is_a_problem_with_quota_headers(&exhausted)
        .await;
    steps.step("forwarding headers claimed through the gateway change nothing");
    t.forwarding_headers_claimed_through_the_gateway_change_nothing(&exhausted)
        .await;
    steps.step("a path no policy limits passes untouched");
    t.a_path_no_policy_limits_passes_untouched().await;
    steps.step("the instances' own routes answer on their ports only");
    t.the_instances_own_routes_answer_on_their_ports_only()
        .await;
    steps.step("every instance down: the gateway fails closed");
    t.with_every_instance_down_the_gateway_fails_closed().await;
}

/// The stack up, with where to reach it.
struct Topology {
    stack: Stack,
    /// Nginx's network, which the clients join, and the data nodes'.
    front: String,
    back: String,
    http: reqwest::Client,
    nginx: u16,
    apps: [u16; 2],
    gateway: u16,
    upstream_counts: u16,
}

impl Topology {
    async fn up() -> Topology {
        let stack = Stack::up(SPEC).await;
        wait_until(
            "every container healthy",
            Duration::from_secs(120),
            || async {
                let ids = stack.containers();
                ids.len() == 11
                    && ids.iter().all(|id| {
                        docker_ok(&[
                            "inspect",
                            "--format",
                            "{{if .State.Health}}{{.State.Health.Status}}{{end}}",
                            id,
                        ]) == "healthy"
                    })
            },
        )
        .await;
        let [front] =
            <[String; 1]>::try_from(stack.networks("nginx")).expect("nginx on one network");
        let [back] = <[String; 1]>::try_from(stack.networks("redis-master"))
            .expect("the master on one network");
        for service in DATA_NODES.iter().chain(&SENTINELS) {
            assert!(
                !stack.networks(service).contains(&front),
                "{service} shares the network {front} with Nginx"
            );
        }
        let t = Topology {
            front,
            back,
            http: http(),
            nginx: stack.port("nginx", 8000),
            apps: [stack.port("app-1", 8000), stack.port("app-2", 8000)],
            gateway: stack.port("nginx", 8080),
            upstream_counts: stack.port("demo-upstream", 8001),
            stack,
        };
        wait_until("both instances ready", Duration::from_secs(30), || {
            t.instances_ready()
        })
        .await;
        eprintln!(
            "  ok: 11 containers healthy, both instances ready; Nginx on {} only",
            t.front
        );
        t
    }

    /// Both instances reach the master they follow (/ready PINGs it). Answers through
    /// Nginx would not tell: a client already denied is answered from an instance's cache
    /// of denials until its next token is due.
    async fn instances_ready(&self) -> bool {
        answers_200(&self.http, &self.url(self.apps[0], "/ready")).await
            && answers_200(&self.http, &self.url(self.apps[1], "/ready")).await
    }

    fn url(&self, port: u16, path: &str) -> String {
        format!("http://127.0.0.1:{port}{path}")
    }

    fn new_client(&self) -> String {
        self.stack.new_client(NET)
    }

    /// RATE_LIMIT + 2 requests from a new client container through Nginx.
    fn new_client_through_nginx(&self) -> (String, Vec<Reply>) {
        let client = self.new_client();
        let url = "http://nginx:8000/limited_endpoint";
        let replies = requests_from(&self.stack, &self.front, &client, RATE_LIMIT + 2, url, &[]);
        (client, replies)
    }

    /// The master the sentinels name, as a service name (they announce host names).
    fn current_master(&self) -> String {
        SENTINELS
            .iter()
            .find_map(|sentinel| {
                let answer = self.sentinel_cli(
                    sentinel,
                    &["sentinel", "get-master-addr-by-name", "redis-master"],
                );
                let name = answer.lines().next()?.trim().to_string();
                DATA_NODES.contains(&name.as_str()).then_some(name)
            })
            .expect("no sentinel names a master")
    }

    /// Every sentinel that answers names a master other than `old`, and all answer.
    fn sentinels_moved_from(&self, old: &str) -> bool {
        SENTINELS.iter().all(|sentinel| {
            let answer = self.sentinel_cli(
                sentinel,
                &["sentinel", "get-master-addr-by-name", "redis-master"],
            );
            answer
                .lines()
                .next()
                .is_some_and(|name| DATA_NODES.contains(&name) && name != old)
        })
    }

    fn sentinel_cli(&self, sentinel: &str, args: &[&str]) -> String {
        let mut command = vec!["redis-cli", "-p", "26379"];
        command.extend(args);
        self.stack.exec(sentinel, &command)
    }

    /// redis-cli in a data node as its default (operators') user.
    fn cli(&self, node: &str, args: &[&str]) -> String {
        let mut command = vec!["redis-cli"];
        command.extend(args);
        self.stack.exec(node, &command)
    }

    fn is_replica_of(&self, node: &str, master: &str) -> bool {
        let info = self.cli(node, &["info", "replication"]);
        info.contains("role:slave")
            && info.contains(&format!("master_host:{master}\n"))
            && info.contains("master_link_status:up")
    }

    /// What reached the demo upstream, by its own count.
    async fn upstream_counts(&self) -> Counts {
        let url = self.url(self.upstream_counts, "/__upstream/count");
        let fetched = async { self.http.get(&url).send().await?.json::<Counts>().await };
        fetched
            .await
            .unwrap_or_else(|e| panic!("the demo upstream's counts on {url}: {e}"))
    }
}
