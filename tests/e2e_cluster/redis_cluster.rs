//! The native topology in Cluster mode (`scripts/cluster.sh up --redis-cluster --gateway`):
//! both instances behind Nginx on a Redis Cluster of 3 masters and 3 replicas.
//! `scripts/e2e-cluster.sh` runs these (the filter `redis_cluster::`) once the Sentinel
//! topology is down, with `E2E_REDIS_CLUSTER_NODES` naming every node
//! (`127.0.0.1:7000,…`), `REDIS_ADMIN_PASSWORD` the password of their operators' user
//! (default the native topology's dev password) and `CLUSTER_DIR` the run folder whose pid records name the node the
//! failover test kills. The Sentinel tests of the parent module skip these, and these need
//! the nodes, so each fails and says so when they are missing.
//!
//! A client's bucket is `<prefix>:default:{ip=<address>}`: its slot is that of the hash
//! tag, whatever the prefix, so the tests choose client addresses by the master they land on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::{
    Answer, LIMITED, Traffic, address, assert_exactly_admitted, burst, exclusive, get, shared,
};
use testkit::{client_from, send_signal};

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    flags: String,
    /// The id of the master a replica follows; `-` for a master.
    master: String,
    /// Slot ranges, inclusive, of a master.
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let address = fields.get(1)?.split(['@', ',']).next()?;
        let port = address.rsplit(':').next()?.parse().ok()?;
        let slots = fields
            .iter()
            .skip(8)
            .filter(|range| !range.starts_with('['))
            .filter_map(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                Some((start.parse().ok()?, end.parse().ok()?))
            })
            .collect();
        Some(Self {
            id: (*fields.first()?).to_owned(),
            port,
            flags: (*fields.get(2)?).to_owned(),
            master: (*fields.get(3)?).to_owned(),
            slots,
        })
    }

    /// A master that serves slots: a replica that the node asked has not yet heard of as
    /// one is listed as a master without slots.
    fn is_master(&self) -> bool {
        let flags: Vec<&str> = self.flags.split(',').collect();
        flags.contains(&"master") && !flags.contains(&"fail") && !self.slots.is_empty()
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(start, end)| (start..=end).contains(&slot))
    }
}

/// The cluster's nodes, reached directly with the password.
struct Nodes {
    ports: Vec<u16>,
    password: String,
}

impl Nodes {
    fn from_env() -> Self {
        let list = std::env::var("E2E_REDIS_CLUSTER_NODES").unwrap_or_else(|_| {
            panic!(
                "E2E_REDIS_CLUSTER_NODES is not set: these tests need the native topology in Cluster mode; \
                 scripts/e2e-cluster.sh starts it, sets it and runs them"
            )
        });
        let ports = list
            .split(',')
            .map(|node| {
                let (host, port) = node.trim().rsplit_once(':').unwrap_or_else(|| {
                    panic!("E2E_REDIS_CLUSTER_NODES={list}: {node} is not host:port")
                });
                assert!(
                    host == "127.0.0.1" || host == "localhost",
                    "E2E_REDIS_CLUSTER_NODES={list}: only loopback nodes are test targets"
                );
                port.parse()
                    .unwrap_or_else(|e| panic!("E2E_REDIS_CLUSTER_NODES={list}: {node}: {e}"))
            })
            .collect();
        let password = std::env::var("REDIS_ADMIN_PASSWORD")
            .unwrap_or_else(|_| "ratelimiter-dev-admin-password".into());
        Self { ports, password }
    }

    /// A connection to the node on `port`, as its operators' (default) user; `None` when it
    /// does not answer.
    fn connection(&self, port: u16) -> Option<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        redis::cmd("AUTH")
            .arg(&self.password)
            .query::<String>(&mut conn)
            .ok()?;
        Some(conn)
    }

    fn query<T: redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> Option<T> {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.connection(port)?).ok()
    }

    /// `CLUSTER NODES` as the first node that answers (other than `except`) sees it.
    fn lines_except(&self, except: Option<u16>) -> Vec<NodeLine> {
        self.ports
            .iter()
            .filter(|&&port| Some(port) != except)
            .find_map(|&port| self.query::<String>(port, &["CLUSTER", "NODES"]))
            .unwrap_or_else(|| panic!("no node of {:?} answers CLUSTER NODES", self.ports))
            .lines()
            .filter_map(NodeLine::parse)
            .collect()
    }

    fn masters(&self) -> Vec<NodeLine> {
        let masters: Vec<NodeLine> = self
            .lines_except(None)
            .into_iter()
            .filter(NodeLine::is_master)
            .collect();
        assert_eq!(masters.len(), 3, "three masters: {masters:#?}");
        masters
    }

    /// The replica that follows the master on `port`.
    fn replica_of(&self, port: u16) -> u16 {
        let lines = self.lines_except(None);
        let id = &lines
            .iter()
            .find(|line| line.port == port)
            .expect("the master is listed")
            .id;
        lines
            .iter()
            .find(|line| &line.master == id)
            .unwrap_or_else(|| panic!("no replica follows {port}: {lines:#?}"))
            .port
    }

    fn evalsha_calls(&self, port: u16) -> u64 {
        let stats: String = self
            .query(port, &["INFO", "commandstats"])
            .unwrap_or_else(|| panic!("the node on {port} does not answer INFO"));
        stats
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    }

    fn role(&self, port: u16) -> Option<String> {
        let info: String = self.query(port, &["INFO", "replication"])?;
        info.lines()
            .find_map(|line| line.strip_prefix("role:"))
            .map(|role| role.trim().to_owned())
    }
}

impl Nodes {
    /// The slot of each client's bucket (`CLUSTER KEYSLOT` of its hash tag), on one
    /// connection to the master `port`.
    fn slots_of(&self, port: u16, clients: &[IpAddr]) -> Vec<u16> {
        let mut conn = self
            .connection(port)
            .unwrap_or_else(|| panic!("the node on {port} does not answer"));
        clients
            .iter()
            .map(|ip| {
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(format!("{{ip={ip}}}"))
                    .query(&mut conn)
                    .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT on {port}: {e}"))
            })
            .collect()
    }

    /// The first `count` clients of test `test` whose buckets the master on `port` serves.
    fn clients_on(&self, masters: &[NodeLine], port: u16, test: u8, count: usize) -> Vec<IpAddr> {
        let master = masters.iter().find(|m| m.port == port).expect("a master");
        let clients: Vec<IpAddr> = (1..=254).map(|host| address(test, host)).collect();
        let asked = masters
            .iter()
            .map(|m| m.port)
            .find(|&p| p != port)
            .unwrap_or(port);
        let slots = self.slots_of(asked, &clients);
        clients
            .into_iter()
            .zip(slots)
            .filter(|&(_, slot)| master.serves(slot))
            .map(|(ip, _)| ip)
            .take(count)
            .collect()
    }
}

/// The pid `scripts/cluster.sh` recorded for the node on `port`, as `INFO server` confirms.
fn recorded_pid(nodes: &Nodes, port: u16) -> u32 {
    let dir = std::env::var("CLUSTER_DIR").expect(
        "CLUSTER_DIR names the run folder of the topology (scripts/e2e-cluster.sh sets it)",
    );
    let pids = std::fs::read_to_string(format!("{dir}/pids"))
        .unwrap_or_else(|e| panic!("{dir}/pids: {e}"));
    let name = format!("redis-cluster-{port}");
    let pid: u32 = pids
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(name.as_str())).then(|| fields.next())?
        })
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{dir}/pids has no record of {name}"));
    let info: String = nodes
        .query(port, &["INFO", "server"])
        .expect("the node answers INFO");
    assert!(
        info.contains(&format!("process_id:{pid}\r")),
        "the node on {port} is not the recorded pid {pid}"
    );
    pid
}

#[test]
#[ignore = "needs the native topology in Cluster mode: run scripts/e2e-cluster.sh"]
fn clients_on_all_three_masters_are_each_admitted_exactly_the_limit_across_both_instances() {
    shared(|cluster| async move {
        // Arrange: four clients per master.
        let nodes = Nodes::from_env();
        let masters = nodes.masters();
        let by_master: BTreeMap<u16, Vec<_>> = masters
            .iter()
            .map(|m| (m.port, nodes.clients_on(&masters, m.port, 30, 4)))
            .collect();
        for (port, clients) in &by_master {
            assert_eq!(clients.len(), 4, "clients on master {port}");
        }
        let before: BTreeMap<u16, u64> = by_master
            .keys()
            .map(|&port| (port, nodes.evalsha_calls(port)))
            .collect();

        // Act: every client at once, each its burst and three more.
        let bursts = by_master.values().flatten().map(|&ip| {
            let url = cluster.url.clone();
            let capacity = cluster.capacity;
            async move { (ip, burst(&client_from(ip), &url, capacity + 3).await) }
        });
        let answers = futures_util::future::join_all(bursts).await;

        // Assert
        let mut instances = BTreeSet::new();
        for (ip, answers) in &answers {
            assert_exactly_admitted(cluster.capacity, answers, &format!("client {ip}"));
            for answer in answers.iter().take(cluster.capacity) {
                assert_eq!(answer.source, "redis", "client {ip}: {answer:?}");
            }
            instances.extend(answers.iter().map(|a| a.instance.clone()));
        }
        instances.remove("");
        assert!(
            instances.len() >= 2,
            "both instances should have answered: {instances:?}"
        );
        for (port, clients) in &by_master {
            let calls = nodes.evalsha_calls(*port) - before[port];
            eprintln!("master {port}: {} clients, {calls} EVALSHA", clients.len());
            assert!(
                calls >= (clients.len() * cluster.capacity) as u64,
                "master {port} decided {calls} times for {} clients of {} admissions each",
                clients.len(),
                cluster.capacity
            );
        }
    });
}

#[test]
#[ignore = "needs the native topology in Cluster mode: run scripts/e2e-cluster.sh"]
fn a_master_killed_mid_traffic_causes_no_5xx_and_its_slots_decide_in_redis_again() {
    exclusive(|cluster| async move {
        // Arrange: a dozen senders, each a new client (of tests 34 to 37) every request, so
        // that requests keep needing a decision (a denied client would be answered by the
        // deny cache); the first of them, and a third of the others, on the master to be
        // killed.
        let nodes = Nodes::from_env();
        let masters = nodes.masters();
        let first_slot = nodes.slots_of(masters[0].port, &[address(31, 1)])[0];
        let victim = masters
            .iter()
            .find(|m| m.serves(first_slot))
            .expect("a master serves every slot")
            .port;
        let heir = nodes.replica_of(victim);
        let pid = recorded_pid(&nodes, victim);
        let probes = nodes.clients_on(&masters, victim, 32, 254);
        let fresh = nodes.clients_on(&masters, victim, 33, 1)[0];
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let senders: Vec<IpAddr> = std::iter::once(address(31, 1))
            .chain((34..=37).flat_map(|test| (1..=254).map(move |host| address(test, host))))
            .collect();
        let traffic: Vec<_> = (0..12)
            .map(|sender| {
                let own: Vec<IpAddr> = senders.iter().skip(sender).step_by(12).copied().collect();
                tokio::spawn(keep_deciding(
                    own,
                    cluster.url.clone(),
                    stop.clone(),
                    sent.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1000)).await;

        // Act
        let killed_at = Instant::now();
        send_signal(pid, "KILL");
        let promoted_at = loop {
            if nodes.role(heir).as_deref() == Some("master") {
                break Instant::now();
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(30),
                "30 s after kill -9 of master {victim}, its replica {heir} is not promoted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Decisions for the dead master's slots: back on Redis, from both instances.
        let back = wait_until_decided_in_redis_on(&cluster, &probes).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut failures = Vec::new();
        let mut sources = BTreeMap::new();
        let mut slowest = Duration::ZERO;
        for task in traffic {
            let seen = task.await.expect("a traffic task");
            failures.extend(seen.failures);
            slowest = slowest.max(seen.slowest);
            for (source, count) in seen.sources {
                *sources.entry(source).or_insert(0) += count;
            }
        }

        // Assert
        let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "kill -9 of master {victim}: replica {heir} promoted {:.1?} later, its slots decided in Redis by both instances {back:.1?} after that; {sent} requests meanwhile, slowest {slowest:.0?}, decided by {sources:?}",
            promoted_at.duration_since(killed_at)
        );
        assert!(sent > 0, "no traffic was sent");
        assert!(
            failures.is_empty(),
            "{} of {sent} requests failed: {failures:#?}",
            failures.len()
        );
        assert!(
            slowest < Duration::from_secs(1),
            "the slowest answer took {slowest:?}"
        );
        assert!(
            sources.get("local").copied().unwrap_or(0) > 0,
            "no decision fell back while the master was down, so the kill was not exercised: {sources:?}"
        );
        assert!(
            back < Duration::from_secs(2),
            "the promoted master's keys went back to Redis only {back:?} after the promotion"
        );
        let answers = burst(&client_from(fresh), &cluster.url, cluster.capacity + 3).await;
        assert_exactly_admitted(
            cluster.capacity,
            &answers,
            &format!("a fresh client {fresh} on the promoted master {heir}"),
        );
    });
}

/// Asks with `probes`, fresh clients whose buckets lie in the slots of the killed master,
/// until ten answers in a row, from both instances, were decided by Redis (at most 30 s);
/// returns how long until the first of them.
async fn wait_until_decided_in_redis_on(cluster: &super::Cluster, probes: &[IpAddr]) -> Duration {
    let started = Instant::now();
    assert!(probes.len() >= 20, "too few probe clients: {probes:?}");
    let mut streak: Vec<(Instant, Answer)> = Vec::new();
    for ip in probes.iter().cycle() {
        let asked = Instant::now();
        let answer = Answer::of(&get(&client_from(*ip), &cluster.url, LIMITED).await);
        if answer.source == "redis" {
            streak.push((asked, answer));
        } else {
            streak.clear();
        }
        let instances: BTreeSet<_> = streak
            .iter()
            .map(|(_, a)| a.instance.as_str())
            .filter(|i| !i.is_empty())
            .collect();
        if streak.len() >= 10 && instances.len() >= 2 {
            // Redis decided again from the first answer of the streak on.
            return streak[0].0.duration_since(started);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "30 s after the promotion, the old master's keys are not decided in Redis; last answer: {:?}",
            streak.last()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!("the probes cycle")
}

/// Sends from each of `clients` in turn, a new connection each, one request every 20 ms,
/// until told to stop (or for at most 60 s and 20 000 requests).
async fn keep_deciding(
    clients: Vec<IpAddr>,
    base: reqwest::Url,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Traffic {
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = base.join(LIMITED).expect("a valid path");
    let mut seen = Traffic::default();
    for ip in clients.iter().cycle().take(20_000) {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        let asked = Instant::now();
        let answer = client_from(*ip).get(url.clone()).send().await;
        seen.slowest = seen.slowest.max(asked.elapsed());
        match answer {
            Ok(response) => {
                let answer = Answer::of(&response);
                *seen.sources.entry(answer.source.clone()).or_insert(0) += 1;
                if response.status().is_server_error() {
                    let body = response.text().await.unwrap_or_default();
                    seen.failures
                        .push(format!("GET {url} from {ip}: {answer:?} {body}"));
                }
            }
            Err(e) => seen.failures.push(format!("GET {url} from {ip}: {e}")),
        }
        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}
