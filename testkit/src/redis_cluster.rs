//! A real Redis Cluster as the shipped Cluster mode topology runs it: 3 masters and 3
//! replicas, each a node from `redis/cluster-node.conf` (with `redis/users.acl`) on a free
//! port in its own temporary folder, joined by `redis-cli --cluster create`. Only the node
//! timeout is the harness's. Every node is killed on `Drop`; when the test failed, the
//! cluster's view of itself (`CLUSTER NODES`) and each node's last log lines are printed
//! first.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::machine::{require, wait_until};
use crate::redis_node::{PASSWORD, RedisProcess};

/// Six nodes made one cluster.
pub struct RedisCluster {
    pub nodes: Vec<RedisProcess>,
}

impl RedisCluster {
    /// Starts six nodes and makes them one cluster; returns once every node says
    /// `cluster_state:ok` and knows all six. `node_timeout_ms` is how long a master may be
    /// unreachable before its replica takes over.
    pub fn start(node_timeout_ms: u64) -> Self {
        require("redis-cli", "redis-tools");
        let timeout = node_timeout_ms.to_string();
        let extra = ["--cluster-node-timeout", timeout.as_str()];
        let nodes: Vec<RedisProcess> = (0..6)
            .map(|_| RedisProcess::server_from_template("redis/cluster-node.conf", None, &extra))
            .collect();
        // Bounded: `--cluster create` waits for the nodes to join without a limit of its own.
        let mut create = Command::new("timeout");
        create.args(["60", "redis-cli", "-a", PASSWORD, "--no-auth-warning"]);
        create.args(["--cluster", "create"]);
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        let cluster = Self { nodes };
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        wait_until(
            "every node to see a healthy cluster of six",
            Duration::from_secs(30),
            || {
                cluster.nodes.iter().all(|node| {
                    let info = cluster_info(node);
                    info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6")
                })
            },
        );
        wait_until("every replica's link up", Duration::from_secs(30), || {
            cluster.replicas().iter().all(|replica| {
                let info: String = replica.command(&["INFO", "replication"]);
                info.contains("master_link_status:up")
            }) && cluster.masters().len() == 3
        });
        cluster
    }

    /// Three of the nodes, as `REDIS_CLUSTER_NODES` takes them.
    pub fn seeds(&self) -> String {
        self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn alive(&self) -> impl Iterator<Item = &RedisProcess> {
        self.nodes.iter().filter(|n| n.role().is_some())
    }

    /// The nodes that answer `ROLE` as masters.
    pub fn masters(&self) -> Vec<&RedisProcess> {
        self.alive()
            .filter(|n| n.role().as_deref() == Some("master"))
            .collect()
    }

    pub fn replicas(&self) -> Vec<&RedisProcess> {
        self.alive()
            .filter(|n| n.role().as_deref() == Some("slave"))
            .collect()
    }

    pub fn node(&self, port: u16) -> &RedisProcess {
        RedisProcess::on_port(&self.nodes, port)
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisProcess {
        RedisProcess::on_port_mut(&mut self.nodes, port)
    }

    /// Some node that answers.
    fn any(&self) -> &RedisProcess {
        self.alive().next().expect("a node that answers")
    }

    /// The slot of `key`, as the cluster computes it.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.any().command::<u16>(&["CLUSTER", "KEYSLOT", key])
    }

    /// The port of the master that owns `slot`, as `node` sees the slot map.
    pub fn owner_seen_by(node: &RedisProcess, slot: u16) -> Option<u16> {
        let mut conn = node.connection();
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).ok()?;
        ranges.iter().find_map(|range| {
            let redis::Value::Array(parts) = range else {
                return None;
            };
            let number = |v: &redis::Value| match v {
                redis::Value::Int(n) => Some(*n as u16),
                _ => None,
            };
            let (start, end) = (number(&parts[0])?, number(&parts[1])?);
            let redis::Value::Array(master) = &parts[2] else {
                return None;
            };
            ((start..=end).contains(&slot)).then(|| number(&master[1]))?
        })
    }

    /// The port of the master that owns `slot`.
    pub fn owner(&self, slot: u16) -> u16 {
        Self::owner_seen_by(self.any(), slot).unwrap_or_else(|| panic!("no master has slot {slot}"))
    }

    /// The port of `master`'s replica.
    pub fn replica_of(&self, master: u16) -> u16 {
        self.replicas()
            .into_iter()
            .find(|replica| {
                let info: String = replica.command(&["INFO", "replication"]);
                info.contains(&format!("master_port:{master}\r"))
            })
            .unwrap_or_else(|| panic!("no replica of {master}"))
            .port
    }

    /// Moves `slot` from the master on `from` to the master on `to`, with the steps of the
    /// cluster specification: mark it importing on the target and migrating on the source,
    /// `MIGRATE` its keys until none is left, then give it to the target on every master.
    /// It stays half moved for `hold` before the keys go and again after, so requests meet
    /// both kinds of `ASK`. Returns how many keys moved.
    pub fn move_slot(&self, slot: u16, from: u16, to: u16, hold: Duration) -> usize {
        let (source, target) = (self.node(from), self.node(to));
        let id = |node: &RedisProcess| node.command::<String>(&["CLUSTER", "MYID"]);
        let (source_id, target_id) = (id(source), id(target));
        let slot_text = slot.to_string();
        let _: () = target.command(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source_id]);
        let _: () = source.command(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target_id]);
        std::thread::sleep(hold);
        let mut moved = 0;
        for _ in 0..1000 {
            let keys: Vec<String> =
                source.command(&["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"]);
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut migrate = vec![
                "MIGRATE",
                "127.0.0.1",
                &port,
                "",
                "0",
                "5000",
                "AUTH",
                PASSWORD,
                "KEYS",
            ];
            migrate.extend(keys.iter().map(String::as_str));
            let _: String = source.command(&migrate);
            moved += keys.len();
        }
        std::thread::sleep(hold);
        let _: () = target.command(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id]);
        let _: () = source.command(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id]);
        for master in self.masters() {
            if master.port != from && master.port != to {
                let _: () = master.command(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id]);
            }
        }
        moved
    }

    /// `SCRIPT FLUSH` on every node that answers.
    pub fn flush_scripts(&self) {
        for node in self.alive() {
            let _: () = node.command(&["SCRIPT", "FLUSH"]);
        }
    }
}

/// `CLUSTER INFO` of `node`, or nothing when it does not answer.
fn cluster_info(node: &RedisProcess) -> String {
    if node.role().is_none() {
        return String::new();
    }
    let mut conn = node.connection();
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut conn)
        .unwrap_or_default()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(node) = self.alive().next()
        {
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut node.connection())
                .unwrap_or_default();
            eprintln!(
                "--- CLUSTER NODES, as port {} sees it ---\n{nodes}",
                node.port
            );
        }
        // Each RedisProcess prints its log tail and is killed as it drops.
    }
}
