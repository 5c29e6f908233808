//! [`RedisStore`]: buckets on one master, whichever the [`MasterSlot`] holds now (the one
//! Sentinel names, or a fixed `REDIS_URL`), decided by [`TOKEN_BUCKET_LUA`]; hits given
//! back by [`REFUND_LUA`].
//!
//! Every command goes through one path, [`Inner::query`]: it picks the connection the
//! master's [`Connections`] say (a multiplexed async connection per worker thread, or an
//! r2d2 pool used from tokio's blocking threads; `docs/BENCHMARKS.md` compares them),
//! reloads the script once on `NOSCRIPT`, and tells discovery when a failure suggests the
//! master changed.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError};

use super::error::{classify, is_noscript};
use super::master::{Connections, Master, MasterSlot};
use super::node;
use super::script::{ScriptCall, decide_cmd, levels_after_refund, refund_cmd, taken_from};
use crate::bucket::{Level, Paid, REFUND_LUA, TOKEN_BUCKET_LUA, Taken};
use crate::store::{KeyedCharge, Store, StoreError, StoreFuture};

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
    script: redis::Script,
    refund_script: redis::Script,
    timeout: Duration,
}

impl RedisStore {
    /// A store deciding on whatever master `slot` holds; `timeout` is the one every
    /// connection of that master was opened with, named in timeout errors.
    pub fn new(slot: Arc<MasterSlot>, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                slot,
                script: redis::Script::new(TOKEN_BUCKET_LUA),
                refund_script: redis::Script::new(REFUND_LUA),
                timeout,
            }),
        }
    }

    /// [`Store::take`] with an explicit clock (`now_us`), for the parity tests.
    pub async fn take_at(
        &self,
        charges: &[KeyedCharge],
        now_us: Option<u64>,
    ) -> Result<Taken, StoreError> {
        let decide = decide_cmd(ScriptCall::Sha(&self.inner.script), charges, now_us);
        let answer: Vec<u64> = self.inner.query(decide, Some(TOKEN_BUCKET_LUA)).await?;
        taken_from(charges, &answer)
    }

    /// [`Store::give_back`] with an explicit clock, as [`RedisStore::take_at`].
    pub async fn give_back_at(
        &self,
        charges: &[KeyedCharge],
        now_us: Option<u64>,
    ) -> Result<Vec<Level>, StoreError> {
        let script = ScriptCall::Sha(&self.inner.refund_script);
        let give_back = refund_cmd(script, charges, Paid::Unknown, now_us);
        let units: Vec<u64> = self.inner.query(give_back, Some(REFUND_LUA)).await?;
        levels_after_refund(charges, &units)
    }
}

/// Who sends a command through [`Inner::query_as`].
#[derive(Clone, Copy)]
enum Asker {
    Decision,
    Probe,
}

impl Inner {
    /// Sends `cmd`, which runs `script` by its hash (if any), to the current master. A node that
    /// lost the script (`NOSCRIPT`, after a restart, a failover or `SCRIPT FLUSH`) is given
    /// it and asked again, on the same master, so no decision fails for it.
    async fn query<T: FromRedisValue + Send + 'static>(
        &self,
        cmd: Cmd,
        script: Option<&'static str>,
    ) -> Result<T, StoreError> {
        self.query_as(cmd, Asker::Decision, script).await
    }

    /// [`Inner::query`], saying who asks: only decisions tell the slot how the master
    /// does. A readiness probe that fails (a flood of `GET /ready` can make its own PINGs
    /// time out) answers "not ready" and changes nothing else.
    async fn query_as<T: FromRedisValue + Send + 'static>(
        &self,
        cmd: Cmd,
        asker: Asker,
        script: Option<&'static str>,
    ) -> Result<T, StoreError> {
        let master = self.slot.usable_master()?;
        let result = match (self.send::<T>(&master, cmd).await, script) {
            ((cmd, Err(err)), Some(script)) if is_noscript(&err) => {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(script);
                match self.send::<String>(&master, load).await.1 {
                    Ok(_) => self.send::<T>(&master, cmd).await.1,
                    Err(err) => Err(err),
                }
            }
            ((_, answer), _) => answer,
        };
        let result = result.map_err(|err| classify(&err, self.timeout));
        match (&result, asker) {
            (_, Asker::Probe) => {}
            (Ok(_), Asker::Decision) => self.slot.report_success(),
            (Err(error), Asker::Decision) => {
                if error.suggests_master_change() && self.slot.report_failure(&master, error) {
                    log::warn!("Redis master {} stopped deciding: {error}", master.addr);
                }
            }
        }
        result
    }

    /// Sends `cmd` over the connection `master`'s mode calls for, and hands `cmd` back
    /// for a retry.
    async fn send<T: FromRedisValue + Send + 'static>(
        &self,
        master: &Arc<Master>,
        cmd: Cmd,
    ) -> (Cmd, redis::RedisResult<T>) {
        match &master.connections {
            Connections::Multiplexed => {
                let result = match self.worker_connection(master).await {
                    Ok(mut conn) => cmd.query_async::<T>(&mut conn).await,
                    Err(err) => Err(err),
                };
                if let Err(err) = &result
                    && classify(err, self.timeout).suggests_master_change()
                {
                    forget_worker_connection(master.generation);
                }
                (cmd, result)
            }
            Connections::Pool(pool) => {
                let (pool, timeout, addr) = (pool.clone(), self.timeout, master.addr.clone());
                let blocking = tokio::task::spawn_blocking(move || {
                    let result = match pool.get() {
                        Ok(mut conn) => {
                            let result = cmd.query::<T>(&mut conn.connection);
                            if let Err(err) = &result {
                                conn.retired = classify(err, timeout).suggests_master_change();
                            }
                            result
                        }
                        Err(err) => Err(RedisError::from((
                            ErrorKind::Io,
                            "no pooled connection",
                            format!("{addr}: {err}"),
                        ))),
                    };
                    (cmd, result)
                });
                match blocking.await {
                    Ok(sent) => sent,
                    Err(join_error) => (
                        Cmd::new(),
                        Err(RedisError::from((
                            ErrorKind::Client,
                            "blocking task failed",
                            join_error.to_string(),
                        ))),
                    ),
                }
            }
        }
    }

    /// This thread's multiplexed connection to `master`, opened on first use.
    async fn worker_connection(
        &self,
        master: &Master,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let cached = WORKER_CONNECTION.with_borrow(|cached| match cached {
            Some((generation, conn)) if *generation == master.generation => Some(conn.clone()),
            _ => None,
        });
        if let Some(conn) = cached {
            return Ok(conn);
        }
        let conn = redis::Client::open(master.info.clone())?
            .get_multiplexed_async_connection_with_config(&node::async_config(self.timeout))
            .await?;
        WORKER_CONNECTION.set(Some((master.generation, conn.clone())));
        Ok(conn)
    }
}

/// Drops this thread's connection if it was made for the master of `generation`.
fn forget_worker_connection(generation: u64) {
    WORKER_CONNECTION.with_borrow_mut(|cached| {
        if cached.as_ref().is_some_and(|(g, _)| *g == generation) {
            *cached = None;
        }
    });
}

impl Store for RedisStore {
    fn take<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Taken> {
        Box::pin(self.take_at(charges, None))
    }

    /// `DEL` of every hash `buckets` name, on the master, through [`Inner::query`].
    fn reset<'a>(&'a self, buckets: &'a [KeyedCharge]) -> StoreFuture<'a, ()> {
        let mut keys: Vec<&str> = buckets.iter().map(|b| &*b.key).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let mut delete = redis::cmd("DEL");
        for key in keys {
            delete.arg(key);
        }
        Box::pin(async move {
            self.inner
                .query::<u64>(delete, None)
                .await
                .map(|_deleted| ())
        })
    }

    fn give_back<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Vec<Level>> {
        Box::pin(self.give_back_at(charges, None))
    }

    /// A real round trip to the master: a stale "ready" is worse than none.
    fn check_ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(
            self.inner
                .query_as::<()>(redis::cmd("PING"), Asker::Probe, None),
        )
    }
}
