//! The profile `redis-cluster`: six nodes joined by `redis-cli --cluster create` (three
//! masters, a replica each), its own two instances and Nginx. Clients whose buckets lie on
//! each master get exactly their limit, and each master runs the script; a master killed
//! under a stream of requests on its slots is replaced by its replica without a 5xx, and
//! rejoins as that replica's replica.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::cluster_routing::Slot;

use crate::clients::{Stream, assert_exact, assert_exact_once_redis_decides, requests_from};
use crate::stack::{Spec, Stack};
use crate::{RATE_LIMIT, Steps, answers_200, every_log_is_rotated, http, wait_until};

/// The front network's /24: Nginx and the instances, clients from .99.
const NET: &str = "172.28.98";
/// The back-end network's /24: the nodes are .21 to .26 (redis-cluster-1 to -6).
const BACKEND_NET: &str = "172.28.92";
const NODES: [&str; 6] = [
    "redis-cluster-1",
    "redis-cluster-2",
    "redis-cluster-3",
    "redis-cluster-4",
    "redis-cluster-5",
    "redis-cluster-6",
];
const INSTANCES: [&str; 2] = ["cluster-app-1", "cluster-app-2"];
const NGINX_URL: &str = "http://cluster-nginx:8000/limited_endpoint";

const SPEC: Spec = Spec {
    project: "ratelimiter-e2e-cluster",
    profiles: &["redis-cluster"],
    services: &["cluster-nginx"],
    net_prefixes: ["172.28.96", "172.28.94", NET, BACKEND_NET],
    settings: &[
        ("RATE_LIMIT", "10"),
        ("TIME_WINDOW", "60"),
        ("FAIL_MODE", "local"),
    ],
    on_failure: &[("redis-cluster-1", &["redis-cli", "cluster", "nodes"])],
};

#[tokio::test]
#[ignore = "needs a Docker engine: scripts/test.sh runs it with --ignored where Docker is"]
async fn each_master_of_the_redis_cluster_profile_keeps_exact_limits_and_survives_a_kill() {
    let mut steps = Steps::first("up: every Cluster mode container healthy, both instances ready");
    let stack = Stack::up(SPEC).await;
    let network = healthy_and_ready(&stack).await;
    every_log_is_rotated(&stack);

    steps.step("Nginx neither resolves nor reaches a Cluster node");
    // The client port and the cluster bus of each node.
    let targets: Vec<(&str, u16)> = NODES
        .iter()
        .flat_map(|node| [(*node, 6379), (*node, 16379)])
        .collect();
    stack.assert_unreachable_from("cluster-nginx", &targets);
    eprintln!("  ok: from the Nginx container no Cluster node resolves or connects");

    steps.step("exact limits on each master, each running EVALSHA");
    let nodes = nodes_seen_by(&stack, "redis-cluster-1");
    let masters = masters_of(&nodes);
    assert_eq!(masters.len(), 3, "not three masters: {nodes:?}");
    for master in &masters {
        let replicated = nodes.iter().any(|n| n.follows.as_ref() == Some(&master.id));
        assert!(
            replicated,
            "no replica follows {}: {nodes:?}",
            master.address
        );
    }
    eprintln!(
        "  ok: redis-cluster-create made 3 masters with a replica each; both instances ready"
    );
    let clients = clients_by_master(&masters, 100..=149);
    for master in &masters {
        let on_it = &clients[&master.address];
        assert!(
            on_it.len() >= 2,
            "no two of 50 clients on master {}",
            master.address
        );
        let node = service_at(&master.address);
        let before = evalsha_calls(&stack, &node);
        for address in &on_it[..2] {
            let replies = requests_from(&stack, &network, address, RATE_LIMIT + 2, NGINX_URL, &[]);
            let who = format!("client {address} (on master {})", master.address);
            assert_exact(&who, &replies, RATE_LIMIT, &INSTANCES);
        }
        let calls = evalsha_calls(&stack, &node) - before;
        assert!(
            calls >= 2 * RATE_LIMIT as u64,
            "master {} ran EVALSHA {calls} times for 2 clients",
            master.address
        );
        eprintln!(
            "  ok: master {} ran EVALSHA {calls} times for its 2 clients",
            master.address
        );
    }

    steps.step("docker kill of a master under traffic on its slots");
    let streamer = format!("{NET}.99");
    let victim = masters
        .iter()
        .find(|m| m.serves(slot_of_client(&streamer)))
        .expect("a master of the stream's slot");
    let heir = nodes
        .into_iter()
        .find(|n| n.follows.as_deref() == Some(victim.id.as_str()))
        .unwrap_or_else(|| panic!("no replica follows master {}", victim.address));
    let (victim_node, heir_node) = (service_at(&victim.address), service_at(&heir.address));
    let stream = Stream::start(&stack, &network, &streamer, NGINX_URL);
    tokio::time::sleep(Duration::from_secs(2)).await;

    stack.kill(&victim_node);

    eprintln!(
        "   killed {victim_node} ({}); its replica is {heir_node} ({})",
        victim.address, heir.address
    );
    let what = format!("the cluster promotes {heir_node}");
    wait_until(&what, Duration::from_secs(30), || async {
        role(&stack, &heir_node) == "master"
    })
    .await;
    let what = format!("the cluster is whole again, as {heir_node} sees it");
    wait_until(&what, Duration::from_secs(30), || async {
        whole(&stack, &heir_node)
    })
    .await;
    wait_until(
        "both Cluster mode instances ready again",
        Duration::from_secs(30),
        || ready(&stack),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream.assert_served();
    let masters = masters_of(&nodes_seen_by(&stack, &heir_node));
    let mut fresh = clients_by_master(&masters, 150..=199)
        .remove(&heir.address)
        .unwrap_or_default()
        .into_iter();
    let who = format!("after the kill, on {heir_node}");
    assert_exact_once_redis_decides(&who, RATE_LIMIT, &INSTANCES, || {
        let client = fresh
            .next()
            .unwrap_or_else(|| panic!("no fresh client left on {heir_node}"));
        let replies = requests_from(&stack, &network, &client, RATE_LIMIT + 2, NGINX_URL, &[]);
        (client, replies)
    })
    .await;
    stack.start(&victim_node);
    let what = format!("{victim_node}, started again, rejoins as a replica of {heir_node}");
    wait_until(&what, Duration::from_secs(60), || async {
        let info = stack.exec(&victim_node, &["redis-cli", "info", "replication"]);
        info.contains("role:slave")
            && info.contains(&format!("master_host:{}\n", heir.address))
            && info.contains("master_link_status:up")
    })
    .await;
    eprintln!("  ok: {victim_node}, started again, is a replica of {heir_node}");
}

/// Waits until every container of the profile is healthy and both instances ready, and
/// the one-shot redis-cluster-create exited 0; the profile's network.
async fn healthy_and_ready(stack: &Stack) -> String {
    let services: Vec<String> = NODES
        .iter()
        .map(|node| node.to_string())
        .chain(INSTANCES.iter().map(|s| s.to_string()))
        .chain(["cluster-nginx".to_string()])
        .collect();
    wait_until(
        "every Cluster mode container healthy",
        Duration::from_secs(120),
        || async {
            services
                .iter()
                .all(|service| stack.health(service) == "healthy")
        },
    )
    .await;
    wait_until(
        "both Cluster mode instances ready",
        Duration::from_secs(30),
        || ready(stack),
    )
    .await;
    let exit = stack.inspect("redis-cluster-create", "{{.State.ExitCode}}");
    assert_eq!(exit, "0", "redis-cluster-create did not exit 0");
    let [network] = <[String; 1]>::try_from(stack.networks("cluster-nginx"))
        .expect("cluster-nginx on one network");
    network
}

async fn ready(stack: &Stack) -> bool {
    let http = http();
    for instance in INSTANCES {
        let url = format!("http://127.0.0.1:{}/ready", stack.port(instance, 8000));
        if !answers_200(&http, &url).await {
            return false;
        }
    }
    true
}

/// The service of the node at `address` (`.21` is redis-cluster-1).
fn service_at(address: &str) -> String {
    let last: u8 = address
        .rsplit('.')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("an IPv4 address");
    format!("redis-cluster-{}", last - 20)
}

fn role(stack: &Stack, node: &str) -> String {
    let info = stack.exec(node, &["redis-cli", "info", "replication"]);
    info.lines()
        .find_map(|line| line.strip_prefix("role:"))
        .unwrap_or("")
        .to_string()
}

fn whole(stack: &Stack, node: &str) -> bool {
    let info = stack.exec(node, &["redis-cli", "cluster", "info"]);
    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
}

fn evalsha_calls(stack: &Stack, node: &str) -> u64 {
    let stats = stack.exec(node, &["redis-cli", "info", "commandstats"]);
    stats
        .lines()
        .find_map(|line| {
            line.strip_prefix("cmdstat_evalsha:calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The slot of a client's buckets: their hash tag is `{ip=ADDRESS}`.
fn slot_of_client(address: &str) -> u16 {
    let slot = Slot::for_key(format!("{{ip={address}}}"));
    (0..16384)
        .find(|n| Slot::new(*n) == Some(slot))
        .expect("a slot below 16384")
}

/// Of the client addresses `.FROM` to `.TO`, those whose buckets each master serves, by
/// the master's address.
fn clients_by_master(
    masters: &[Node],
    hosts: std::ops::RangeInclusive<u8>,
) -> BTreeMap<String, Vec<String>> {
    let mut by_master: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for host in hosts {
        let address = format!("{NET}.{host}");
        let slot = slot_of_client(&address);
        let master = masters
            .iter()
            .find(|m| m.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {masters:?}"));
        by_master
            .entry(master.address.clone())
            .or_default()
            .push(address);
    }
    by_master
}

/// A node as `CLUSTER NODES` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    id: String,
    /// Its IP address, without the ports.
    address: String,
    master: bool,
    failed: bool,
    /// The id of the master it replicates.
    follows: Option<String>,
    slots: Vec<(u16, u16)>,
}

impl Node {
    fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|(from, to)| (*from..=*to).contains(&slot))
    }
}

/// The lines of `CLUSTER NODES`: `ID IP:PORT@BUS[,HOSTNAME] FLAGS MASTER PING PONG EPOCH
/// LINK SLOT...`, a slot being `N`, `N-M`, or `[N->-ID]` / `[N-<-ID]` while it migrates.
fn parse_nodes(text: &str) -> Vec<Node> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [id, address, flags, master, ..] = fields[..] else {
                return None;
            };
            let flags: Vec<&str> = flags.split(',').collect();
            let slots = fields
                .get(8..)
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((from, to)) => Some((from.parse().ok()?, to.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(Node {
                id: id.to_string(),
                address: address.split(':').next()?.to_string(),
                master: flags.contains(&"master"),
                failed: flags.contains(&"fail"),
                follows: (master != "-").then(|| master.to_string()),
                slots,
            })
        })
        .collect()
}

/// The cluster as the node `asked` sees it.
fn nodes_seen_by(stack: &Stack, asked: &str) -> Vec<Node> {
    parse_nodes(&stack.exec(asked, &["redis-cli", "cluster", "nodes"]))
}

/// The masters the cluster counts (not failed), by address.
fn masters_of(nodes: &[Node]) -> Vec<Node> {
    let mut masters: Vec<Node> = nodes
        .iter()
        .filter(|n| n.master && !n.failed)
        .cloned()
        .collect();
    masters.sort_by(|a, b| a.address.cmp(&b.address));
    masters
}

#[test]
fn cluster_nodes_lines_give_masters_their_slots_and_replicas_their_master() {
    let text = "\
a1 172.28.98.21:6379@16379 myself,master - 0 0 1 connected 0-5460 [5461->-b2]
b2 172.28.98.22:6379@16379,host master - 0 1 2 connected 5461-10922 16000
c3 172.28.98.24:6379@16379 slave a1 0 1 1 connected
d4 172.28.98.23:6379@16379 master,fail - 0 1 3 disconnected
e5 172.28.98.25:6379@16379 handshake -
";
    let nodes = parse_nodes(text);

    assert_eq!(nodes.len(), 5);
    assert_eq!(
        (nodes[0].address.as_str(), nodes[0].slots.clone()),
        ("172.28.98.21", vec![(0, 5460)])
    );
    assert!(nodes[1].serves(16000) && nodes[1].serves(5461) && !nodes[1].serves(0));
    assert_eq!(nodes[2].follows.as_deref(), Some("a1"));
    assert!(!nodes[2].master && nodes[3].failed && nodes[3].slots.is_empty());
    assert!(!nodes[4].master && nodes[4].slots.is_empty());
}

#[test]
fn a_clients_slot_is_that_of_its_hash_tag_as_redis_computes_it() {
    // What `redis-cli cluster keyslot "{ip=172.28.98.99}"` answers.
    assert_eq!(slot_of_client("172.28.98.99"), 11127);
    assert_eq!(slot_of_client("172.28.98.100"), 1891);
}
