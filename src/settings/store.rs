//! Where buckets live: in this process, on one Redis server, on the master Sentinel names,
//! or in a Redis Cluster. Each mode holds only what it uses, addresses already parsed;
//! which settings select a mode, and which combinations are refused, is decided here.

use std::time::Duration;

use redis::ConnectionInfo;
use secrecy::SecretString;

use super::declared::{
    Declared, Given, KEY_PREFIX, Problems, REDIS_CLIENT, REDIS_CLUSTER_NODES, REDIS_DATA_NODES,
    REDIS_URL, SENTINEL_HOSTS, SENTINEL_PASSWORD, SENTINEL_USERNAME, Setting,
};
use super::parse::{HostPort, RedisClient};
use crate::store::redis::ConnectionMode;

/// Where buckets live.
#[derive(Clone, Debug)]
pub enum StoreSettings {
    /// None of `REDIS_URL`, `SENTINEL_HOSTS`, `REDIS_CLUSTER_NODES`: in this process, so
    /// limits are per instance.
    Memory,
    /// `REDIS_URL`: one Redis server, always the master.
    Redis {
        url: ConnectionInfo,
        master: MasterSettings,
    },
    /// `SENTINEL_HOSTS`: the master the sentinels name.
    Sentinel {
        hosts: Vec<HostPort>,
        /// `REDIS_MASTER`: the name the sentinels monitor.
        master_name: String,
        /// `SENTINEL_USERNAME` / `SENTINEL_PASSWORD`: how to log in to every sentinel.
        sentinel_access: SentinelAccess,
        /// `REDIS_DATA_NODES`: the only masters to believe; `None` believes any.
        data_nodes: Option<Vec<HostPort>>,
        master: MasterSettings,
    },
    /// `REDIS_CLUSTER_NODES`: seed nodes, which tell of the others. Cluster mode keeps one
    /// multiplexed connection per node and worker, and follows the cluster on its own
    /// schedule, so neither `REDIS_CLIENT` nor `SENTINEL_POLL_MS` applies.
    Cluster {
        nodes: Vec<HostPort>,
        access: NodeAccess,
        /// `REDIS_BATCH_MAX`: the most decisions for one hash slot in one call.
        batch_max: usize,
    },
}

/// How this instance works with the one master of `REDIS_URL` or `SENTINEL_HOSTS`.
#[derive(Clone, Debug)]
pub struct MasterSettings {
    pub access: NodeAccess,
    /// `REDIS_CLIENT`, with `REDIS_POOL_SIZE` when it is a pool.
    pub connections: ConnectionMode,
    /// `SENTINEL_POLL_MS`: how often discovery confirms the master; this instance's
    /// announcement in Redis lasts three of them.
    pub poll: Duration,
}

/// What every data node is reached with.
#[derive(Clone, Debug)]
pub struct NodeAccess {
    /// `REDIS_USERNAME`: the ACL user; `None` is Redis's default user.
    pub username: Option<String>,
    /// `REDIS_PASSWORD`
    pub password: Option<SecretString>,
    /// `REDIS_TIMEOUT_MS`: bounds every step (connect, read, write, a pool checkout).
    pub timeout: Duration,
}

/// What every sentinel is logged in to with.
#[derive(Clone, Debug)]
pub struct SentinelAccess {
    /// `SENTINEL_USERNAME`: the ACL user; `None` is the sentinels' default user.
    pub username: Option<String>,
    /// `SENTINEL_PASSWORD`
    pub password: Option<SecretString>,
}

/// The mode the given settings select. Which settings are given decides it, whether or not
/// their values parse, so a conflict is reported beside a malformed value. `None` only
/// when a problem was reported.
pub(super) fn store(
    declared: &Declared,
    given: &Given,
    problems: &mut Problems,
) -> Option<StoreSettings> {
    let is_set = |setting: &Setting| given.is_set(setting);
    if is_set(&REDIS_DATA_NODES) && !is_set(&SENTINEL_HOSTS) {
        problems.add(
            "REDIS_DATA_NODES: applies only with SENTINEL_HOSTS (it limits the masters a sentinel may name); unset it, or set SENTINEL_HOSTS".into(),
        );
        return None;
    }
    if is_set(&SENTINEL_USERNAME) && !is_set(&SENTINEL_PASSWORD) {
        problems.add(
            "SENTINEL_USERNAME: a sentinel's ACL user logs in with a password; set SENTINEL_PASSWORD too".into(),
        );
        return None;
    }
    let access = NodeAccess {
        username: declared.redis_username.clone(),
        password: declared.redis_password.clone(),
        timeout: declared.redis_timeout_ms,
    };
    if is_set(&REDIS_CLUSTER_NODES) {
        let others: Vec<&str> = [&REDIS_URL, &SENTINEL_HOSTS]
            .into_iter()
            .filter(|setting| is_set(setting))
            .map(|setting| setting.name)
            .collect();
        if !others.is_empty() {
            problems.add(format!(
                "REDIS_CLUSTER_NODES and {} are both set: set REDIS_CLUSTER_NODES for Redis Cluster, SENTINEL_HOSTS for Sentinel or REDIS_URL for one Redis server, only one of them",
                others.join(" and ")
            ));
            return None;
        }
        if declared.redis_client == RedisClient::Pool {
            problems.add_unless_refused(
                &[&REDIS_CLIENT],
                "REDIS_CLIENT: pool does not apply with REDIS_CLUSTER_NODES (Cluster mode keeps one multiplexed connection per node and worker); unset it".into(),
            );
        }
        let prefix = &declared.key_prefix;
        if prefix.contains(['{', '}']) {
            problems.add_unless_refused(
                &[&KEY_PREFIX],
                format!("KEY_PREFIX: expected no braces with REDIS_CLUSTER_NODES (a {{…}} in the prefix would put every bucket in one hash slot), got {prefix:?}"),
            );
        }
        return Some(StoreSettings::Cluster {
            nodes: declared.redis_cluster_nodes.clone()?,
            access,
            batch_max: declared.redis_batch_max,
        });
    }
    let master = MasterSettings {
        access,
        connections: match declared.redis_client {
            RedisClient::Multiplexed => ConnectionMode::Multiplexed {
                batch_max: declared.redis_batch_max,
            },
            RedisClient::Pool => ConnectionMode::Pool {
                size: declared.redis_pool_size,
            },
        },
        poll: declared.sentinel_poll_ms,
    };
    match (is_set(&REDIS_URL), is_set(&SENTINEL_HOSTS)) {
        (true, true) => {
            problems.add(
                "REDIS_URL and SENTINEL_HOSTS are both set: set REDIS_URL for one Redis server or SENTINEL_HOSTS for Sentinel, not both".into(),
            );
            None
        }
        (true, false) => Some(StoreSettings::Redis {
            url: declared.redis_url.clone()?,
            master,
        }),
        (false, true) => Some(StoreSettings::Sentinel {
            hosts: declared.sentinel_hosts.clone()?,
            master_name: declared.redis_master.clone(),
            sentinel_access: SentinelAccess {
                username: declared.sentinel_username.clone(),
                password: declared.sentinel_password.clone(),
            },
            data_nodes: match &declared.redis_data_nodes {
                Some(nodes) => Some(nodes.clone()),
                // Given but refused: reported; believing any master instead is no answer.
                None if is_set(&REDIS_DATA_NODES) => return None,
                None => None,
            },
            master,
        }),
        (false, false) => Some(StoreSettings::Memory),
    }
}
