//! The instance registry: each instance announces itself in Redis, so that while Redis
//! cannot decide, the local fallback can divide the limits by the number of live
//! instances instead of granting each instance the whole limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long an instance counts as live after its last announcement.
const ANNOUNCE_TTL: Duration = Duration::from_secs(5);

/// One atomic step on Redis's clock: record this instance until now + ttl, forget the
/// instances whose announcements have lapsed, and count the rest.
const ANNOUNCE_LUA: &str = r#"
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"#;

pub struct InstanceRegistry {
    key: String,
    instance_name: String,
    script: redis::Script,
    /// Instances that announced themselves recently, this one included.
    live: AtomicU64,
}

impl InstanceRegistry {
    pub fn new(key_prefix: &str, instance_name: &str) -> Self {
        Self {
            key: format!("{key_prefix}:instances"),
            instance_name: instance_name.to_string(),
            script: redis::Script::new(ANNOUNCE_LUA),
            live: AtomicU64::new(1),
        }
    }

    /// How many instances share the limits, as last counted (at least this one).
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Announces this instance on `conn` (the master) and updates the count. A failure
    /// keeps the last count: the fallback needs some divisor, and the last one seen is the
    /// best guess.
    pub fn announce(&self, conn: &mut redis::Connection) {
        let announced = self
            .script
            .key(&self.key)
            .arg(&self.instance_name)
            .arg(ANNOUNCE_TTL.as_millis() as u64)
            .invoke::<u64>(conn);
        self.count(announced);
    }

    /// [`announce`](Self::announce) on an async connection (a Redis Cluster's): by the
    /// script's hash, and in full (`EVAL`) on a node that lacks it, so the command stays one
    /// that is routed by the registry's key. `SCRIPT LOAD` is sent to every node, and fails
    /// while one is down.
    pub async fn announce_async(&self, conn: &mut impl redis::aio::ConnectionLike) {
        let call = |verb: &str, script: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(script)
                .arg(1)
                .arg(&self.key)
                .arg(&self.instance_name)
                .arg(ANNOUNCE_TTL.as_millis() as u64);
            cmd
        };
        let announced = match call("EVALSHA", self.script.get_hash())
            .query_async::<u64>(conn)
            .await
        {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                call("EVAL", ANNOUNCE_LUA).query_async::<u64>(conn).await
            }
            answer => answer,
        };
        self.count(announced);
    }

    fn count(&self, announced: redis::RedisResult<u64>) {
        match announced {
            Ok(live) => self.live.store(live.max(1), Ordering::Relaxed),
            Err(err) => log::debug!("could not announce this instance: {err}"),
        }
    }
}
