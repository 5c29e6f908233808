//! The instance registry: each instance announces itself in Redis, so that while Redis
//! cannot decide, the local fallback can divide the limits by the number of live
//! instances instead of granting each instance the whole limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long an instance counts as live after its last announcement, at the least.
const MIN_ANNOUNCE_TTL: Duration = Duration::from_secs(5);

/// Announcements an instance may miss before the others stop counting it.
const MISSED_ANNOUNCEMENTS: u32 = 3;

/// The divisor of the local fallback before this instance has counted the others once
/// (Redis was down when it started): more than the shipped topologies run, so that
/// instances starting blind each grant a quarter of a limit rather than all of it. Set
/// `FALLBACK_INSTANCES` where more run.
pub const ASSUMED_INSTANCES: u64 = 4;

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
    /// How long an announcement lasts: it must outlive the time between two of them.
    ttl: Duration,
    /// Instances that announced themselves recently, this one included; 0 until counted.
    live: AtomicU64,
}

impl InstanceRegistry {
    /// A registry for an instance that announces itself every `every`.
    pub fn new(key_prefix: &str, instance_name: &str, every: Duration) -> Self {
        Self {
            key: format!("{key_prefix}:instances"),
            instance_name: instance_name.to_string(),
            script: redis::Script::new(ANNOUNCE_LUA),
            ttl: announce_ttl(every),
            live: AtomicU64::new(0),
        }
    }

    /// How many instances share the limits, as last counted (at least this one), or
    /// [`ASSUMED_INSTANCES`] before the first count.
    pub fn live(&self) -> u64 {
        match self.live.load(Ordering::Relaxed) {
            0 => ASSUMED_INSTANCES,
            live => live,
        }
    }

    /// Announces this instance on `conn` (the master) and updates the count. A failure
    /// keeps the last count: the fallback needs some divisor, and the last one seen is the
    /// best guess.
    pub fn announce(&self, conn: &mut redis::Connection) {
        let announced = self
            .script
            .key(&self.key)
            .arg(&self.instance_name)
            .arg(self.ttl.as_millis() as u64)
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
                .arg(self.ttl.as_millis() as u64);
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

/// How long an announcement made every `every` lasts: several periods, so that one late
/// announcement does not make the others count this instance out.
fn announce_ttl(every: Duration) -> Duration {
    (every * MISSED_ANNOUNCEMENTS).max(MIN_ANNOUNCE_TTL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_that_has_not_counted_assumes_several() {
        let registry = InstanceRegistry::new("p", "a", Duration::from_secs(1));
        assert_eq!(registry.live(), ASSUMED_INSTANCES);
        registry.count(Ok(2));
        assert_eq!(registry.live(), 2);
        registry.count(Err(redis::RedisError::from((redis::ErrorKind::Io, "down"))));
        assert_eq!(registry.live(), 2, "a failed count keeps the last one");
    }

    #[test]
    fn an_announcement_outlives_the_time_between_two() {
        assert_eq!(announce_ttl(Duration::from_secs(1)), MIN_ANNOUNCE_TTL);
        assert_eq!(
            announce_ttl(Duration::from_secs(60)),
            Duration::from_secs(180)
        );
    }
}
