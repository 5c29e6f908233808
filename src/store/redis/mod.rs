//! Buckets in Redis: one Lua script per decision, on the master that the resolver thread
//! ([`crate::store::sentinel`]) keeps in a [`MasterSlot`].
//!
//! Two ways to reach it ([`ConnectionMode`]): a multiplexed async connection per worker
//! thread (the default: no thread hop, and concurrent decisions share one round trip's
//! system calls), or an r2d2 pool of blocking connections used from Actix's blocking
//! threads. `docs/BENCHMARKS.md` compares them. Either way, a failure that suggests the
//! master changed drops the connection and rings the resolver.

mod master;
mod node;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, ServerErrorKind};

pub use master::{ConnectionMode, Master, MasterSlot};
pub use node::{connect, node_info, with_password};

use super::{Store, StoreError, StoreFuture};
use crate::identity::ClientKey;
use crate::limiter::{Decision, Policy, TOKEN_BUCKET_LUA};

thread_local! {
    /// This thread's multiplexed connection and the generation of the master it goes to.
    /// Its I/O task runs on this thread's runtime, so a decision never changes threads.
    static WORKER_CONNECTION: RefCell<Option<(u64, MultiplexedConnection)>> =
        const { RefCell::new(None) };
}

/// Buckets in Redis, decided by [`TOKEN_BUCKET_LUA`].
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    slot: Arc<MasterSlot>,
    mode: ConnectionMode,
    script: redis::Script,
    key_prefix: String,
    timeout: Duration,
}

impl RedisStore {
    pub fn new(
        slot: Arc<MasterSlot>,
        mode: ConnectionMode,
        key_prefix: String,
        timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                slot,
                mode,
                script: redis::Script::new(TOKEN_BUCKET_LUA),
                key_prefix,
                timeout,
            }),
        }
    }

    /// The Redis key of `key`'s bucket.
    pub fn bucket_key(&self, key: &ClientKey) -> String {
        self.inner.bucket_key(key)
    }

    /// [`Store::take`] with an explicit clock (`now_us`), for the parity tests. A missing
    /// script (`NOSCRIPT`, after a restart or `SCRIPT FLUSH`) is loaded and the command
    /// sent again.
    pub async fn take_at(
        &self,
        key: ClientKey,
        policy: Policy,
        now_us: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let inner = self.inner.clone();
        let (allowed, tokens) = match self.inner.mode {
            ConnectionMode::Multiplexed => {
                let decide = inner.decide_cmd(&key, &policy, now_us);
                inner
                    .multiplexed(async |conn| match decide.query_async(conn).await {
                        Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                            inner.script.load_async(conn).await?;
                            decide.query_async::<(u8, u64)>(conn).await
                        }
                        answer => answer,
                    })
                    .await?
            }
            ConnectionMode::Pool => actix_web::web::block(move || {
                let decide = inner.decide_cmd(&key, &policy, now_us);
                inner.pooled(|conn| match decide.query(conn) {
                    Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        inner.script.load(conn)?;
                        decide.query::<(u8, u64)>(conn)
                    }
                    answer => answer,
                })
            })
            .await
            .unwrap_or_else(|err| Err(StoreError::Other(err.to_string())))?,
        };
        Ok(Decision::from_units(&policy, allowed == 1, tokens))
    }
}

impl Inner {
    fn bucket_key(&self, key: &ClientKey) -> String {
        format!("{}:{key}", self.key_prefix)
    }

    /// `EVALSHA` of the token-bucket script for `key`, written straight into one command
    /// buffer: a `ScriptInvocation` would allocate each argument separately first, on
    /// every decision.
    fn decide_cmd(&self, key: &ClientKey, policy: &Policy, now_us: Option<u64>) -> redis::Cmd {
        let mut cmd = redis::Cmd::with_capacity(8, 128);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(1)
            .arg(self.bucket_key(key))
            .arg(policy.capacity_units())
            .arg(policy.refill_units_per_us())
            .arg(policy.cost_units());
        if let Some(now_us) = now_us {
            cmd.arg(now_us);
        }
        cmd
    }

    /// The master to use now, unless a failure has made the slot unusable.
    fn master(&self) -> Result<Arc<Master>, StoreError> {
        match self.slot.current() {
            Some(master) if self.slot.is_usable() => Ok(master),
            _ => Err(StoreError::NoMaster(self.slot.reason())),
        }
    }

    /// Runs `call` on a pooled connection ([`ConnectionMode::Pool`]); blocks.
    fn pooled<T>(
        &self,
        call: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let master = self.master()?;
        let pool = master.pool.as_ref().ok_or_else(|| {
            StoreError::Other("this master was opened without a connection pool".into())
        })?;
        let result = pool
            .get()
            .map_err(|err| StoreError::Connection(format!("{}: {err}", master.addr)))
            .and_then(|mut conn| {
                call(&mut conn.connection).map_err(|err| {
                    let error = classify(&err, self.timeout);
                    conn.retired = error.suggests_master_change();
                    error
                })
            });
        self.after(&master, result)
    }

    /// Runs `call` on this thread's multiplexed connection to the master, connecting first
    /// when there is none for the current master.
    async fn multiplexed<T>(
        &self,
        call: impl AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let master = self.master()?;
        let cached = WORKER_CONNECTION.with_borrow(|cached| match cached {
            Some((generation, conn)) if *generation == master.generation => Some(conn.clone()),
            _ => None,
        });
        let result = match cached {
            Some(conn) => Ok(conn),
            None => self.open_multiplexed(&master).await,
        };
        let result = match result {
            Ok(mut conn) => call(&mut conn)
                .await
                .map_err(|err| classify(&err, self.timeout)),
            Err(error) => Err(error),
        };
        if let Err(error) = &result
            && error.suggests_master_change()
        {
            WORKER_CONNECTION.with_borrow_mut(|cached| {
                if cached
                    .as_ref()
                    .is_some_and(|(g, _)| *g == master.generation)
                {
                    *cached = None;
                }
            });
        }
        self.after(&master, result)
    }

    async fn open_multiplexed(&self, master: &Master) -> Result<MultiplexedConnection, StoreError> {
        let client =
            redis::Client::open(master.info.clone()).map_err(|err| classify(&err, self.timeout))?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&node::async_config(self.timeout))
            .await
            .map_err(|err| classify(&err, self.timeout))?;
        WORKER_CONNECTION.set(Some((master.generation, conn.clone())));
        Ok(conn)
    }

    /// Tells the resolver when a failure suggests `master` is no longer usable.
    fn after<T>(
        &self,
        master: &Arc<Master>,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Err(error) = &result
            && error.suggests_master_change()
            && self.slot.report_failure(master, error)
        {
            log::warn!("Redis master {} stopped deciding: {error}", master.addr);
        }
        result
    }
}

impl Store for RedisStore {
    fn take(&self, key: ClientKey, policy: Policy) -> StoreFuture<'_, Decision> {
        Box::pin(self.take_at(key, policy, None))
    }

    /// A real round trip to the master: a stale "ready" is worse than none.
    fn check_ready(&self) -> StoreFuture<'_, ()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.mode {
                ConnectionMode::Multiplexed => {
                    inner
                        .multiplexed(async |conn| redis::cmd("PING").query_async::<()>(conn).await)
                        .await
                }
                ConnectionMode::Pool => actix_web::web::block(move || {
                    inner.pooled(|conn| redis::cmd("PING").query::<()>(conn))
                })
                .await
                .unwrap_or_else(|err| Err(StoreError::Other(err.to_string()))),
            }
        })
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
