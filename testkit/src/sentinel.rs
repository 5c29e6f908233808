//! A Sentinel group as the shipped topologies run it: a master from `redis/master.conf`,
//! two replicas from `redis/replica.conf` and three sentinels from `redis/sentinel.conf`,
//! each on a free port in its own folder. Only the sentinels' timings are the harness's,
//! so that a failover takes a second or two.

use std::time::Duration;

use crate::machine::wait_until;
use crate::redis_node::RedisProcess;

/// 1 master, 2 replicas, 3 sentinels; every process is killed as this drops.
pub struct SentinelCluster {
    pub nodes: Vec<RedisProcess>,
    pub sentinels: Vec<RedisProcess>,
}

impl SentinelCluster {
    /// Starts the group; returns once both replicas are linked and every sentinel agrees
    /// (CKQUORUM) and knows both replicas. A master silent for `down_after_ms` is down.
    pub fn start(down_after_ms: u64) -> Self {
        let master = RedisProcess::server_from_template("redis/master.conf", None, &[]);
        let mut nodes = vec![master];
        for _ in 0..2 {
            let replica =
                RedisProcess::server_from_template("redis/replica.conf", Some(nodes[0].port), &[]);
            nodes.push(replica);
        }
        for replica in &nodes[1..] {
            wait_until("replication link up", Duration::from_secs(15), || {
                let info: String = replica.command(&["INFO", "replication"]);
                info.contains("master_link_status:up")
            });
        }
        let sentinels: Vec<RedisProcess> = (0..3)
            .map(|_| RedisProcess::sentinel(nodes[0].port, down_after_ms))
            .collect();
        let cluster = Self { nodes, sentinels };
        wait_until(
            "sentinels to agree (CKQUORUM) and see both replicas",
            Duration::from_secs(20),
            || {
                cluster.sentinels.iter().all(|s| {
                    let mut conn = s.connection();
                    let quorum = redis::cmd("SENTINEL")
                        .arg("CKQUORUM")
                        .arg("redis-master")
                        .query::<String>(&mut conn);
                    let replicas: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg("redis-master")
                        .query(&mut conn);
                    quorum.is_ok() && replicas.is_ok_and(|r| r.len() == 2)
                })
            },
        );
        cluster
    }

    /// The sentinels, as `SENTINEL_HOSTS` takes them.
    pub fn sentinel_hosts(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The master's port according to the first sentinel that answers.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let mut conn = s.try_connection()?;
            let (_, port): (String, u16) = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg("redis-master")
                .query(&mut conn)
                .ok()?;
            Some(port)
        })
    }

    pub fn node(&self, port: u16) -> &RedisProcess {
        RedisProcess::on_port(&self.nodes, port)
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisProcess {
        RedisProcess::on_port_mut(&mut self.nodes, port)
    }
}
