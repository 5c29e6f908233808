//! [`RedisStore`]: buckets on one master, whichever the [`MasterSlot`] holds now (the one
//! Sentinel names, or a fixed `REDIS_URL`), decided by [`TOKEN_BUCKET_LUA`]; hits given
//! back by [`REFUND_LUA`].
//!
//! Every command goes through one path, [`Inner::call`]: it picks the connection the
//! master's [`Connections`] say (a multiplexed async connection per worker thread, or an
//! r2d2 pool used from tokio's blocking threads; `docs/BENCHMARKS.md` compares them) and
//! sends a call again with the script's text on `NOSCRIPT`; its callers tell discovery
//! when a failure suggests the master changed.
//!
//! In multiplexed mode a decision goes through its worker thread's queue ([`Batcher`]):
//! alone, as the same call it would make unbatched, when nothing is in flight on the
//! thread's connection; else with the decisions that queued behind the call in flight, as
//! one batch call of `token_bucket.lua` (`REDIS_BATCH_MAX` at most) that answers each
//! separately. The pool sends one call per decision.

use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike as _, MultiplexedConnection};
use redis::{Cmd, ConnectionLike as _, ErrorKind, FromRedisValue, RedisError, Value};

use super::batch::{self, Batcher};
use super::error::{classify, is_noscript};
use super::master::{Connections, Master, MasterSlot};
use super::node;
use super::script::{
    ScriptCall, batch_answers, by_text, calls, decide_batch_cmd, decide_cmd, levels_after_refund,
    refund_cmd, taken_from,
};
use crate::bucket::{Level, Paid, REFUND_LUA, TOKEN_BUCKET_LUA, Taken};
use crate::store::{KeyedCharge, Store, StoreError, StoreFuture, Unavailable};

thread_local! {
    /// This thread's connection to the current master, and its queue of decisions. Its
    /// I/O task runs on this thread's runtime, so on a worker thread's own runtime a
    /// decision never changes threads.
    static WORKER_LANE: RefCell<Option<Lane>> = const { RefCell::new(None) };
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

    /// [`Store::take`] with an explicit clock (`now_us`), for the parity tests. With a
    /// clock, the call goes alone, never in a batch.
    pub async fn take_at(
        &self,
        charges: &[KeyedCharge],
        now_us: Option<u64>,
    ) -> Result<Taken, StoreError> {
        if now_us.is_none() {
            return self.inner.decide(charges).await;
        }
        let decide = decide_cmd(ScriptCall::Sha(&self.inner.script), charges, now_us);
        let answer: Vec<u64> = self.inner.query(decide).await?;
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
        let units: Vec<u64> = self.inner.query(give_back).await?;
        levels_after_refund(charges, &units)
    }

    /// Decides `requests` in one call, in order, each all or nothing on the buckets as the
    /// ones before it left them: what a batch does, for the parity tests (`now_us` as
    /// [`RedisStore::take_at`] takes it). The outer error is the call's; an inner one is
    /// that request's alone.
    pub async fn take_batch_at(
        &self,
        requests: &[Vec<KeyedCharge>],
        now_us: Option<u64>,
    ) -> Result<Vec<Result<Taken, StoreError>>, StoreError> {
        let decide = decide_batch_cmd(ScriptCall::Sha(&self.inner.script), requests, now_us);
        let answer = self.inner.query_value(decide, Asker::Decision).await?;
        let answers =
            batch_answers(answer, requests.len()).map_err(|err| self.inner.classify(&err))?;
        Ok(requests
            .iter()
            .zip(answers)
            .map(|(charges, answer)| match answer {
                Ok(values) => taken_from(charges, &values),
                Err(err) => Err(self.inner.classify(&err)),
            })
            .collect())
    }
}

/// Who sends a command through [`Inner::query_value`].
#[derive(Clone, Copy)]
enum Asker {
    Decision,
    Probe,
}

impl Inner {
    fn classify(&self, err: &RedisError) -> StoreError {
        classify(err, self.timeout)
    }

    /// Decides `charges` on Redis's clock: through this thread's queue when the master's
    /// connections batch, else in a call of its own.
    async fn decide(self: &Arc<Self>, charges: &[KeyedCharge]) -> Result<Taken, StoreError> {
        let master = self.slot.usable_master()?;
        let batches =
            matches!(master.connections, Connections::Multiplexed { batch_max } if batch_max > 1);
        let batcher = match batches {
            true => match self.worker_lane(&master).await {
                Ok(lane) => lane.batcher,
                Err(err) => {
                    let error = self.classify(&err);
                    self.report(&master, Err(&error));
                    return Err(error);
                }
            },
            false => None,
        };
        let Some(batcher) = batcher else {
            let decide = decide_cmd(ScriptCall::Sha(&self.script), charges, None);
            let answer = self.query_on(&master, decide, Asker::Decision).await?;
            return taken_from(charges, &self.read::<Vec<u64>>(answer)?);
        };
        // Bounded as a call of its own is: a decision queued behind a slow call gives up
        // when its own time is out, and is then taken out of the queue if still in it.
        let answer = tokio::time::timeout(self.timeout, batcher.submit(charges.to_vec())).await;
        match answer {
            Err(_elapsed) => Err(StoreError::Timeout {
                after_ms: self.timeout.as_millis() as u64,
                source: None,
            }),
            Ok(Err(unanswered)) => Err(StoreError::Other {
                source: Box::new(unanswered),
            }),
            Ok(Ok(Ok(values))) => taken_from(charges, &values),
            Ok(Ok(Err(failed))) => Err(match failed {
                Failed::Redis(err) => self.classify(&err),
                Failed::MasterGone(reason) => {
                    StoreError::unavailable(Unavailable::NoMaster(reason))
                }
            }),
        }
    }

    /// Sends `cmd` to the current master, and reads its answer as a `T`.
    async fn query<T: FromRedisValue>(self: &Arc<Self>, cmd: Cmd) -> Result<T, StoreError> {
        let answer = self.query_value(cmd, Asker::Decision).await?;
        self.read(answer)
    }

    /// `answer` as a `T`; an error inside it is an error.
    fn read<T: FromRedisValue>(&self, answer: Value) -> Result<T, StoreError> {
        read(answer).map_err(|err| self.classify(&err))
    }

    /// Sends `cmd` to the current master, saying who asks: only decisions tell the slot
    /// how the master does. A readiness probe that fails (a flood of `GET /ready` can make
    /// its own PINGs time out) answers "not ready" and changes nothing else.
    async fn query_value(self: &Arc<Self>, cmd: Cmd, asker: Asker) -> Result<Value, StoreError> {
        let master = self.slot.usable_master()?;
        self.query_on(&master, cmd, asker).await
    }

    /// Sends `cmd` to `master` over the connection its mode calls for (this thread's), and
    /// tells the slot how it went if a decision asks.
    async fn query_on(
        self: &Arc<Self>,
        master: &Arc<Master>,
        cmd: Cmd,
        asker: Asker,
    ) -> Result<Value, StoreError> {
        let result = self.call(master, None, cmd).await;
        let result = result.map_err(|err| self.classify(&err));
        if let Asker::Decision = asker {
            self.report(master, result.as_ref().map(|_| ()));
        }
        result
    }

    /// Sends `cmd` to `master` over `lane`'s connection if given, else over the one its
    /// mode calls for (this thread's, or the pool's). A node that lost the script
    /// (`NOSCRIPT`, after a restart, a failover or `SCRIPT FLUSH`) is asked again with the
    /// script's text, on the same master, so no decision fails for it; a command refused
    /// with `NOSCRIPT` ran nothing, so asking again decides nothing twice. The answer is as the
    /// node gave it: errors inside it (a batch's) are the caller's to read.
    async fn call(
        self: &Arc<Self>,
        master: &Arc<Master>,
        lane: Option<&Arc<WorkerConnection>>,
        cmd: Cmd,
    ) -> redis::RedisResult<Value> {
        match self.send(master, lane, cmd).await {
            // `EVAL` runs the script and keeps it, in one command: a `SCRIPT FLUSH` between
            // a `SCRIPT LOAD` and a second `EVALSHA` would fail the call again, and a call
            // may carry a whole batch of decisions.
            (cmd, Err(err)) if is_noscript(&err) => {
                let text = match calls(&cmd, &self.refund_script) {
                    true => REFUND_LUA,
                    false => TOKEN_BUCKET_LUA,
                };
                self.send(master, lane, by_text(&cmd, text)).await.1
            }
            (_, answer) => answer,
        }
    }

    /// Tells the slot how a decision's call on `master` went.
    fn report(&self, master: &Arc<Master>, result: Result<(), &StoreError>) {
        match result {
            Ok(()) => self.slot.report_success(),
            Err(error) => {
                if error.suggests_master_change() && self.slot.report_failure(master, error) {
                    log::warn!("Redis master {} stopped deciding: {error}", master.addr);
                }
            }
        }
    }

    /// Sends `cmd` over the connection `master`'s mode calls for (`lane`'s, if given, in
    /// multiplexed mode), and hands `cmd` back for a retry. An error answer is an `Err`.
    async fn send(
        self: &Arc<Self>,
        master: &Arc<Master>,
        lane: Option<&Arc<WorkerConnection>>,
        cmd: Cmd,
    ) -> (Cmd, redis::RedisResult<Value>) {
        let answer = match &master.connections {
            Connections::Multiplexed { .. } => {
                let connection = match lane {
                    Some(connection) => Ok(Arc::clone(connection)),
                    None => self.worker_lane(master).await.map(|lane| lane.connection),
                };
                let result = match connection {
                    Ok(connection) => {
                        let mut conn = connection.conn.clone();
                        let result = conn.req_packed_command(&cmd).await;
                        if let Err(err) = &result
                            && self.classify(err).suggests_master_change()
                        {
                            connection.broken.store(true, Ordering::Release);
                        }
                        result
                    }
                    Err(err) => Err(err),
                };
                (cmd, result)
            }
            Connections::Pool(pool) => {
                let (pool, timeout, addr) = (pool.clone(), self.timeout, master.addr.clone());
                let blocking = tokio::task::spawn_blocking(move || {
                    let result = match pool.get() {
                        Ok(mut conn) => {
                            let result = conn.connection.req_command(&cmd);
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
        };
        match answer {
            (cmd, Ok(Value::ServerError(error))) => (cmd, Err(error.into())),
            answer => answer,
        }
    }

    /// This thread's lane to `master`, opened on first use.
    async fn worker_lane(self: &Arc<Self>, master: &Arc<Master>) -> redis::RedisResult<Lane> {
        let cached = WORKER_LANE.with_borrow(|cached| {
            cached
                .as_ref()
                .filter(|lane| {
                    lane.connection.generation == master.generation
                        && !lane.connection.broken.load(Ordering::Acquire)
                })
                .cloned()
        });
        if let Some(lane) = cached {
            return Ok(lane);
        }
        let conn = redis::Client::open(master.info.clone())?
            .get_multiplexed_async_connection_with_config(&node::async_config(self.timeout))
            .await?;
        let connection = Arc::new(WorkerConnection {
            generation: master.generation,
            conn,
            broken: AtomicBool::new(false),
        });
        let batcher = match master.connections {
            Connections::Multiplexed { batch_max } => NonZeroUsize::new(batch_max)
                .filter(|max| max.get() > 1)
                .map(|max| {
                    let sender = Decisions {
                        inner: Arc::clone(self),
                        master: Arc::clone(master),
                        connection: Arc::clone(&connection),
                    };
                    Batcher::new(sender, max, self.timeout)
                }),
            Connections::Pool(_) => None,
        };
        let lane = Lane {
            connection,
            batcher,
        };
        WORKER_LANE.set(Some(lane.clone()));
        Ok(lane)
    }
}

/// `answer` as a `T`; an error inside it is an error.
fn read<T: FromRedisValue>(answer: Value) -> redis::RedisResult<T> {
    Ok(T::from_redis_value(answer.extract_error()?)?)
}

/// A worker thread's way to one master.
#[derive(Clone)]
struct Lane {
    connection: Arc<WorkerConnection>,
    /// Where this thread's decisions queue; `None` when they go one call each
    /// (`REDIS_BATCH_MAX=1`).
    batcher: Option<Arc<Batcher<Decisions>>>,
}

/// A multiplexed connection to the master of `generation`.
struct WorkerConnection {
    generation: u64,
    conn: MultiplexedConnection,
    /// Set when an answer on it suggested the node is no master any more: the thread's
    /// next decision opens a new connection (to whatever master is current by then).
    /// Kept on the connection, not in the thread's slot, since a batch may be sent from
    /// another thread than the one that queued it.
    broken: AtomicBool,
}

/// Why a decision in a batch got no answer from Redis.
enum Failed {
    /// The call failed, or this request's part of it (a foreign value at one of its keys).
    Redis(RedisError),
    /// The master changed or became unusable while the request waited: it is not sent to
    /// the old one.
    MasterGone(String),
}

/// What sends one thread's queued decisions to its master, as one call.
struct Decisions {
    inner: Arc<Inner>,
    master: Arc<Master>,
    connection: Arc<WorkerConnection>,
}

impl batch::Sender for Decisions {
    type Request = Vec<KeyedCharge>;
    type Answer = Result<Vec<u64>, Failed>;

    /// A lone decision goes as the very call it would make unbatched; several as one
    /// batch call. The slot hears of the call once, however many decisions it carried.
    async fn send(&self, batch: Vec<Vec<KeyedCharge>>) -> Vec<Result<Vec<u64>, Failed>> {
        let requests = batch.len();
        let all = |failed: &dyn Fn() -> Failed| (0..requests).map(|_| Err(failed())).collect();
        match self.inner.slot.usable_master() {
            Ok(current) if current.generation == self.master.generation => {}
            Ok(_) => {
                return all(&|| Failed::MasterGone("the master changed while it waited".into()));
            }
            Err(_) => return all(&|| Failed::MasterGone(self.inner.slot.reason())),
        }
        let script = ScriptCall::Sha(&self.inner.script);
        let cmd = match &batch[..] {
            [alone] => decide_cmd(script, alone, None),
            _ => decide_batch_cmd(script, &batch, None),
        };
        let answer = self
            .inner
            .call(&self.master, Some(&self.connection), cmd)
            .await;
        let answer = match answer {
            Ok(answer) => {
                self.inner.report(&self.master, Ok(()));
                answer
            }
            Err(err) => {
                self.inner
                    .report(&self.master, Err(&self.inner.classify(&err)));
                return all(&|| Failed::Redis(err.clone()));
            }
        };
        if requests == 1 {
            return vec![read(answer).map_err(Failed::Redis)];
        }
        match batch_answers(answer, requests) {
            Ok(answers) => answers
                .into_iter()
                .map(|answer| answer.map_err(Failed::Redis))
                .collect(),
            Err(err) => all(&|| Failed::Redis(err.clone())),
        }
    }
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
        Box::pin(async move { self.inner.query::<u64>(delete).await.map(|_deleted| ()) })
    }

    fn give_back<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Vec<Level>> {
        Box::pin(self.give_back_at(charges, None))
    }

    /// A real round trip to the master: a stale "ready" is worse than none.
    fn check_ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let answer = self
                .inner
                .query_value(redis::cmd("PING"), Asker::Probe)
                .await?;
            self.inner.read::<()>(answer)
        })
    }
}
