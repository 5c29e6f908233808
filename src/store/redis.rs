//! Buckets in Redis: one Lua script per decision, over an r2d2 pool of connections to the
//! current master.
//!
//! The pool lives in a [`MasterSlot`] that the resolver thread ([`super::sentinel`]) fills
//! and swaps; this module only uses whatever master the slot holds, and reports failures
//! that suggest the master has changed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::io::tcp::TcpSettings;
use redis::{
    ConnectionInfo, ConnectionLike, ErrorKind, IntoConnectionInfo, RedisConnectionInfo,
    ServerErrorKind,
};

use super::{Store, StoreError};
use crate::identity::ClientKey;
use crate::limiter::{Decision, Policy, TOKEN_BUCKET_LUA};

/// Where a data node is and how to log in to it.
pub fn node_info(host: &str, port: u16, password: Option<&str>) -> ConnectionInfo {
    let info = redis::ConnectionAddr::Tcp(host.into(), port).into_connection_info();
    // A TCP address always converts; the error arm exists only for the trait's signature.
    let info = info.unwrap_or_else(|_| unreachable!("a TCP address is a connection info"));
    with_password(info, password)
}

/// `info` with `password` for AUTH, unless `info` already carries one.
pub fn with_password(info: ConnectionInfo, password: Option<&str>) -> ConnectionInfo {
    let mut settings: RedisConnectionInfo = info.redis_settings().clone();
    if let (None, Some(password)) = (settings.password(), password) {
        settings = settings.set_password(password);
    }
    info.set_redis_settings(settings.set_skip_set_lib_name())
        .set_tcp_settings(TcpSettings::default().set_nodelay(true))
}

/// A connection whose every step is bounded: connect, AUTH, read and write.
pub fn connect(info: &ConnectionInfo, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(info.clone())?;
    let connection = client.get_connection_with_timeout(timeout)?;
    connection.set_read_timeout(Some(timeout))?;
    connection.set_write_timeout(Some(timeout))?;
    Ok(connection)
}

/// Makes pooled connections. The `redis` crate's own r2d2 manager connects without a
/// timeout and checks connections with a PING that a demoted master still answers, so
/// this one bounds every step and lets a decision retire a connection it distrusts.
pub struct NodeManager {
    info: ConnectionInfo,
    timeout: Duration,
}

pub struct NodeConnection {
    connection: redis::Connection,
    /// Set when an answer suggests the node is no longer a usable master.
    retired: bool,
}

impl r2d2::ManageConnection for NodeManager {
    type Connection = NodeConnection;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<NodeConnection, redis::RedisError> {
        Ok(NodeConnection {
            connection: connect(&self.info, self.timeout)?,
            retired: false,
        })
    }

    fn is_valid(&self, conn: &mut NodeConnection) -> Result<(), redis::RedisError> {
        redis::cmd("PING").query::<()>(&mut conn.connection)
    }

    fn has_broken(&self, conn: &mut NodeConnection) -> bool {
        conn.retired || !conn.connection.is_open()
    }
}

/// One master and the pool of connections to it.
pub struct Master {
    pub addr: String,
    pub info: ConnectionInfo,
    pool: r2d2::Pool<NodeManager>,
}

impl Master {
    /// Opens a pool to `info`, with at least one connection established, or fails.
    pub fn open(
        info: ConnectionInfo,
        pool_size: u32,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let addr = info.addr().to_string();
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(timeout)
            // Every checkout already proves the connection by using it; a PING first
            // would double the round trips.
            .test_on_check_out(false)
            // Connection failures surface as StoreErrors, which are logged once per outage;
            // r2d2's default handler would log each attempt.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(NodeManager {
                info: info.clone(),
                timeout,
            })
            .map_err(|err| StoreError::Connection(format!("{addr}: {err}")))?;
        Ok(Self { addr, info, pool })
    }
}

/// The current master, shared by the store (which uses it) and the resolver (which
/// replaces it), and the resolver's doorbell.
pub struct MasterSlot {
    current: ArcSwapOption<Master>,
    /// False from the first failure that suggests a master change until the resolver has
    /// confirmed a master again; meanwhile decisions fall back at once instead of each
    /// waiting out a timeout.
    usable: AtomicBool,
    reason: Mutex<String>,
    wake: Mutex<bool>,
    woken: Condvar,
    /// Instances that announced themselves in Redis recently, for the local fallback.
    pub live_instances: AtomicU64,
}

impl Default for MasterSlot {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            usable: AtomicBool::new(false),
            reason: Mutex::new("no master resolved yet".into()),
            wake: Mutex::new(false),
            woken: Condvar::new(),
            live_instances: AtomicU64::new(1),
        }
    }
}

impl MasterSlot {
    pub fn current(&self) -> Option<Arc<Master>> {
        self.current.load_full()
    }

    pub fn is_usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Why the slot is not usable, for `/ready`.
    pub fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Puts a confirmed master in place and makes the slot usable.
    pub fn install(&self, master: Arc<Master>) {
        self.current.store(Some(master));
        self.mark_usable();
    }

    pub fn mark_usable(&self) {
        self.usable.store(true, Ordering::Release);
    }

    /// Records that `master` failed. Only the first report for the current master rings
    /// the resolver; a stampede of failing requests rings it once. Returns whether this
    /// report was that first one.
    pub fn report_failure(&self, master: &Arc<Master>, error: &StoreError) -> bool {
        let is_current = self
            .current
            .load()
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, master));
        if !is_current {
            return false;
        }
        self.mark_unusable(format!("master {} failed: {error}", master.addr))
    }

    /// Returns whether the slot was usable until now.
    pub fn mark_unusable(&self, reason: String) -> bool {
        if let Ok(mut current) = self.reason.lock() {
            *current = reason;
        }
        let was_usable = self.usable.swap(false, Ordering::AcqRel);
        if was_usable {
            self.ring();
        }
        was_usable
    }

    /// Wakes the resolver now instead of at its next poll.
    pub fn ring(&self) {
        if let Ok(mut rung) = self.wake.lock() {
            *rung = true;
            self.woken.notify_all();
        }
    }

    /// Waits for a ring or `timeout`, whichever comes first.
    pub fn wait_for_ring(&self, timeout: Duration) {
        let Ok(rung) = self.wake.lock() else { return };
        if let Ok((mut rung, _)) = self.woken.wait_timeout_while(rung, timeout, |rung| !*rung) {
            *rung = false;
        }
    }
}

/// Buckets in Redis, decided by [`TOKEN_BUCKET_LUA`].
pub struct RedisStore {
    slot: Arc<MasterSlot>,
    script: redis::Script,
    key_prefix: String,
    timeout: Duration,
}

impl RedisStore {
    pub fn new(slot: Arc<MasterSlot>, key_prefix: String, timeout: Duration) -> Self {
        Self {
            slot,
            script: redis::Script::new(TOKEN_BUCKET_LUA),
            key_prefix,
            timeout,
        }
    }

    /// The Redis key of `key`'s bucket.
    pub fn bucket_key(&self, key: &ClientKey) -> String {
        format!("{}:{key}", self.key_prefix)
    }

    /// Runs the script with an explicit clock, for the parity tests.
    pub fn take_at(
        &self,
        key: &ClientKey,
        policy: &Policy,
        now_us: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let mut invocation = self.script.key(self.bucket_key(key));
        invocation
            .arg(policy.capacity_units())
            .arg(policy.refill_units_per_us())
            .arg(policy.cost_units());
        if let Some(now_us) = now_us {
            invocation.arg(now_us);
        }
        let (allowed, tokens) = self.with_master(|conn| invocation.invoke::<(u8, u64)>(conn))?;
        Ok(Decision::from_units(policy, allowed == 1, tokens))
    }

    /// Runs `call` on a pooled connection to the current master. A failure that suggests
    /// the master changed retires the connection and tells the resolver.
    pub fn with_master<T>(
        &self,
        call: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        if !self.slot.is_usable() {
            return Err(StoreError::NoMaster(self.slot.reason()));
        }
        let master = self
            .slot
            .current()
            .ok_or_else(|| StoreError::NoMaster(self.slot.reason()))?;
        let result = master
            .pool
            .get()
            .map_err(|err| StoreError::Connection(format!("{}: {err}", master.addr)))
            .and_then(|mut conn| {
                call(&mut conn.connection).map_err(|err| {
                    let error = classify(&err, self.timeout);
                    conn.retired = error.suggests_master_change();
                    error
                })
            });
        if let Err(error) = &result
            && error.suggests_master_change()
            && self.slot.report_failure(&master, error)
        {
            log::warn!("Redis master {} stopped deciding: {error}", master.addr);
        }
        result
    }
}

impl Store for RedisStore {
    fn take(&self, key: &ClientKey, policy: &Policy) -> Result<Decision, StoreError> {
        self.take_at(key, policy, None)
    }

    /// A real round trip to the master: a stale "ready" is worse than none.
    fn check_ready(&self) -> Result<(), StoreError> {
        self.with_master(|conn| redis::cmd("PING").query::<()>(conn))
    }

    fn is_blocking(&self) -> bool {
        true
    }
}

/// Sorts a Redis failure into what the service does about it.
pub fn classify(err: &redis::RedisError, timeout: Duration) -> StoreError {
    match err.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly) => return StoreError::ReadOnly,
        ErrorKind::Server(ServerErrorKind::BusyLoading) => return StoreError::Loading,
        ErrorKind::Server(ServerErrorKind::NoScript) => return StoreError::NoScript,
        _ => {}
    }
    match err.code() {
        Some("NOREPLICAS") => StoreError::NoReplicas,
        Some("READONLY") => StoreError::ReadOnly,
        Some("LOADING") => StoreError::Loading,
        Some("MASTERDOWN") => StoreError::Connection(err.to_string()),
        _ if err.is_timeout() => StoreError::Timeout(timeout.as_millis() as u64),
        _ if err.is_io_error() || err.is_connection_refusal() || err.is_unrecoverable_error() => {
            StoreError::Connection(err.to_string())
        }
        _ => StoreError::Other(err.to_string()),
    }
}
