//! [`ClusterStore`]: buckets in a Redis Cluster, decided by the bucket script slot by
//! slot: this thread's cluster connection, the take over one or several slots, the
//! refunds of what a slot paid for a request another slot refused, and hits given back.
//!
//! # Bounded time
//! A decision has one deadline, `REDIS_TIMEOUT_MS` from its start, across every slot it
//! asks and every retry the client makes: `MOVED`/`ASK` are followed at once, `TRYAGAIN`,
//! `CLUSTERDOWN` and lost connections are retried after short waits (milliseconds, not the
//! crate's default of seconds), and whatever is not answered by then becomes a
//! [`StoreError`] that `FAIL_MODE` turns into a decision. `NOSCRIPT` (a node that never saw
//! the script: new, restarted, promoted, flushed) is answered by sending the script itself
//! (`EVAL`), routed by the same key, so it lands wherever the slot now is. Refunds are sent
//! after the answer, on their own bounded time, and never delay it.
//!
//! # Connections
//! Each worker thread has its own cluster connection (one multiplexed connection per node),
//! opened on first use, so a decision never changes threads, as with Sentinel. Replicas
//! are never read from: a bucket must be read where it is written.
//!
//! # Batches, per hash slot
//! A request in one slot goes through this thread's queue for that slot ([`Batcher`],
//! `REDIS_BATCH_MAX`): alone, as the call it would make unbatched, when no call for the
//! slot is in flight on this thread; else with the requests that queued behind that call,
//! as one batch call of the bucket script. A batch is per slot, not per master, because a
//! script's keys must lie in one slot: so the client routes a batch as it routes one
//! decision, `MOVED` and `ASK` included, and a batch is decided whole or not at all.
//! Batches form where requests meet on one slot (a busy key, a tenant's shared limit); keys
//! spread evenly over the 16,384 slots seldom share one while in flight. A queue lives as
//! long as its thread, at most one per slot and store (a few hundred bytes each).

use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::ConnectionLike as _;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::io::tcp::TcpSettings;
use redis::{ConnectionInfo, RedisError, RedisResult, Value};
use tokio::sync::{OnceCell, oneshot};
use tokio::time::Instant;

use super::settle::{SlotReply, paid_in_call, settle_slots};
use super::slots::{by_slot, coverage};
use super::watch::ClusterWatch;
use crate::bucket::{Level, Paid, REFUND_LUA, TOKEN_BUCKET_LUA, Taken};
use crate::metrics::Metrics;
use crate::store::redis::batch::{self, Batcher};
use crate::store::redis::error::{classify_in_cluster, is_noscript};
use crate::store::redis::registry::InstanceRegistry;
use crate::store::redis::script::{
    ScriptCall, batch_answers, by_text, decide_batch_cmd, decide_cmd, levels_after_refund,
    refund_cmd, taken_from,
};
use crate::store::{KeyedCharge, Store, StoreError, StoreFuture};

/// Retries of one command within its deadline; the deadline, not this, is what bounds it.
const RETRIES: u32 = 16;
/// The waits between retries grow from about 4 ms, doubling, up to a quarter of the
/// timeout: a failover or a slot move settles in milliseconds on a LAN.
const RETRY_WAIT_MIN_MS: u64 = 1;
const RETRY_WAIT_FACTOR_MS: u64 = 2;
/// A connect may take this share of the timeout. A master that died with its host (a killed
/// container: its address answers nothing, not even a refusal) is a seed the client
/// reconnects to, and while it does every request of that connection waits: a connect
/// bounded by the whole timeout would make every decision time out, again and again, for
/// as long as the dead node stays listed. A quarter leaves the rest to reconnect to the
/// live seeds, read the new slot map and decide on the promoted replica.
const CONNECT_SHARE: u32 = 4;

/// Tells stores apart in the per-thread connection list.
static STORE_IDS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's connection to each store's cluster (tests run several stores), opened
    /// once however many requests ask for it at the same moment. Shared by `Arc`, not
    /// `Rc`, so that a decision's future is `Send`: a front on a work-stealing runtime
    /// (the gRPC server) may resume it on another thread, where the connection, a handle
    /// to its driver task, works as well.
    static CONNECTIONS: RefCell<Vec<(u64, Arc<OnceCell<ClusterConnection>>)>> =
        const { RefCell::new(Vec::new()) };

    /// This thread's queue of decisions for each slot of each store, opened on the slot's
    /// first decision here.
    static SLOT_QUEUES: RefCell<HashMap<(u64, Slot), SlotQueue>> = RefCell::new(HashMap::new());
}

/// What the store needs to reach a cluster.
#[derive(Clone)]
pub struct ClusterSettings {
    /// Seed nodes, each with the password every node shares.
    pub nodes: Vec<ConnectionInfo>,
    /// Bounds a whole decision, retries included, and every connect.
    pub timeout: Duration,
    /// `REDIS_BATCH_MAX`: the most decisions for one slot in one call; 1 sends each alone.
    pub batch_max: usize,
}

/// Buckets in a Redis Cluster, decided by `TOKEN_BUCKET_LUA` slot by slot.
#[derive(Clone)]
pub struct ClusterStore {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    client: ClusterClient,
    script: redis::Script,
    refund_script: redis::Script,
    timeout: Duration,
    /// `None` when every decision goes alone.
    batch_max: Option<NonZeroUsize>,
    metrics: Metrics,
}

impl ClusterStore {
    /// A store for the cluster the seed `settings.nodes` belong to. Connects to nothing
    /// yet: each worker thread connects on its first decision. Fails only on settings the
    /// client refuses (seeds that disagree on the password).
    pub fn new(settings: &ClusterSettings, metrics: Metrics) -> RedisResult<Self> {
        let timeout = settings.timeout;
        let client = ClusterClientBuilder::new(settings.nodes.clone())
            .connection_timeout((timeout / CONNECT_SHARE).max(Duration::from_millis(1)))
            .response_timeout(timeout)
            .overall_response_timeout(Some(timeout))
            .retries(RETRIES)
            .min_retry_wait(RETRY_WAIT_MIN_MS)
            .max_retry_wait((timeout.as_millis() as u64 / 4).max(RETRY_WAIT_MIN_MS + 1))
            .retry_wait_formula(RETRY_WAIT_FACTOR_MS, 2)
            .tcp_settings(TcpSettings::default().set_nodelay(true))
            .build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                id: STORE_IDS.fetch_add(1, Ordering::Relaxed),
                client,
                script: redis::Script::new(TOKEN_BUCKET_LUA),
                refund_script: redis::Script::new(REFUND_LUA),
                timeout,
                batch_max: NonZeroUsize::new(settings.batch_max).filter(|max| max.get() > 1),
                metrics,
            }),
        })
    }

    /// Starts the [`ClusterWatch`] of this store's cluster on this thread's runtime; the
    /// returned receiver resolves after its first round.
    pub fn watch(&self, registry: Arc<InstanceRegistry>) -> (ClusterWatch, oneshot::Receiver<()>) {
        ClusterWatch::start(
            self.inner.client.clone(),
            self.inner.timeout,
            self.inner.metrics.clone(),
            registry,
        )
    }
}

impl Inner {
    /// Runs `work` until the deadline; what is not done by then is a timeout.
    async fn within<T>(
        &self,
        deadline: Instant,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Timeout {
                    after_ms: self.timeout.as_millis() as u64,
                    source: None,
                })
            })
    }

    /// This thread's connection to the cluster, opened on first use.
    async fn connection(&self) -> Result<ClusterConnection, StoreError> {
        let cell = CONNECTIONS.with_borrow_mut(|connections| {
            match connections.iter().find(|(id, _)| *id == self.id) {
                Some((_, cell)) => cell.clone(),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    connections.push((self.id, cell.clone()));
                    cell
                }
            }
        });
        cell.get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
            .map_err(|err| classify_in_cluster(&err, self.timeout))
    }

    async fn take(self: &Arc<Self>, charges: &[KeyedCharge]) -> Result<Taken, StoreError> {
        if charges.is_empty() {
            return Ok(Taken {
                admitted: true,
                levels: Vec::new(),
            });
        }
        let deadline = Instant::now() + self.timeout;
        let shares = by_slot(charges);
        let conn = self.within(deadline, self.connection()).await?;
        if shares.len() <= 1 {
            let answer = self
                .within(deadline, self.decide_in_slot(&conn, charges))
                .await?;
            return taken_from(charges, &answer);
        }
        let parts: Vec<Vec<KeyedCharge>> = shares
            .iter()
            .map(|share| share.iter().map(|&i| charges[i].clone()).collect())
            .collect();
        let calls = parts.iter().map(|part| {
            let mut conn = conn.clone();
            async move { tokio::time::timeout_at(deadline, self.pay(&mut conn, part)).await }
        });
        let mut replies = Vec::with_capacity(shares.len());
        let mut failure = None;
        for (share, result) in shares.into_iter().zip(join_all(calls).await) {
            match result {
                Ok(Ok((paid_at_us, answer))) => replies.push(SlotReply {
                    charges: share,
                    paid_at_us,
                    answer,
                }),
                // A slot that did not answer in time may have paid or not: nothing is given
                // back there, which can only lower its limits.
                Ok(Err(err)) => failure = failure.or(Some(classify_in_cluster(&err, self.timeout))),
                Err(_) => {
                    failure = failure.or(Some(StoreError::Timeout {
                        after_ms: self.timeout.as_millis() as u64,
                        source: None,
                    }))
                }
            }
        }
        if let Some(error) = failure {
            // Redis decides nothing for this request: give back whatever a slot paid.
            for reply in &replies {
                let paid = paid_in_call(charges, reply);
                self.send_refund(&conn, charges, reply, &paid);
            }
            return Err(error);
        }
        let (taken, refunds) = settle_slots(charges, &replies)?;
        for (reply, refund) in replies.iter().zip(&refunds.0) {
            self.send_refund(&conn, charges, reply, refund);
        }
        Ok(taken)
    }

    /// `charges`, all in one slot, decided through this thread's queue for the slot, or in
    /// a call of their own when decisions go alone. A caller that gives up (its deadline)
    /// while queued is taken out of the queue, never decided behind its back.
    async fn decide_in_slot(
        self: &Arc<Self>,
        conn: &ClusterConnection,
        charges: &[KeyedCharge],
    ) -> Result<Vec<u64>, StoreError> {
        let classify = |err: RedisError| classify_in_cluster(&err, self.timeout);
        let Some(max) = self.batch_max else {
            return self
                .decide(&mut conn.clone(), charges)
                .await
                .map_err(classify);
        };
        let key = (self.id, Slot::for_key(charges[0].key.as_bytes()));
        let queue = SLOT_QUEUES.with_borrow_mut(|queues| {
            queues
                .entry(key)
                .or_insert_with(|| {
                    let sender = SlotDecisions {
                        inner: Arc::clone(self),
                        conn: conn.clone(),
                    };
                    Batcher::new(sender, max, self.timeout)
                })
                .clone()
        });
        match queue.submit(charges.to_vec()).await {
            Ok(answer) => answer.map_err(classify),
            Err(unanswered) => Err(StoreError::Other {
                source: Box::new(unanswered),
            }),
        }
    }

    /// The bucket script over `part` (one slot's charges): by hash, and in full on a node
    /// that lacks it.
    async fn decide(
        &self,
        conn: &mut ClusterConnection,
        part: &[KeyedCharge],
    ) -> RedisResult<Vec<u64>> {
        match decide_cmd(ScriptCall::Sha(&self.script), part, None)
            .query_async(conn)
            .await
        {
            Err(err) if is_noscript(&err) => {
                decide_cmd(ScriptCall::Text, part, None)
                    .query_async(conn)
                    .await
            }
            answer => answer,
        }
    }

    /// [`decide`](Self::decide), with the master's `TIME` in the same pipeline, so a
    /// refund knows a time no later than the payment (see `bucket::refund`): `TIME` is read
    /// right after the script, so the payment was made at most this call's duration (on
    /// this instance's clock, retries included) before it. `TIME` goes after the script and
    /// not before: a slot being moved redirects with `ASK`, and the `ASKING` the client
    /// sends then holds for the next command only, which must be the script.
    async fn pay(
        &self,
        conn: &mut ClusterConnection,
        part: &[KeyedCharge],
    ) -> RedisResult<(u64, Vec<u64>)> {
        let timed = |script| {
            let mut pipe = redis::pipe();
            pipe.add_command(decide_cmd(script, part, None)).cmd("TIME");
            pipe
        };
        let started = Instant::now();
        let answer: RedisResult<(Vec<u64>, (u64, u64))> =
            match timed(ScriptCall::Sha(&self.script)).query_async(conn).await {
                Err(err) if is_noscript(&err) => timed(ScriptCall::Text).query_async(conn).await,
                answer => answer,
            };
        let (answer, (seconds, micros)) = answer?;
        let after_us = seconds * 1_000_000 + micros;
        let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok((after_us.saturating_sub(took_us), answer))
    }

    /// `refund.lua` over `part` (one slot's charges): by hash, and in full on a node that
    /// lacks it.
    async fn refund(
        &self,
        conn: &mut ClusterConnection,
        part: &[KeyedCharge],
        paid: Paid,
    ) -> RedisResult<Vec<u64>> {
        match refund_cmd(ScriptCall::Sha(&self.refund_script), part, paid, None)
            .query_async(conn)
            .await
        {
            Err(err) if is_noscript(&err) => {
                refund_cmd(ScriptCall::Text, part, paid, None)
                    .query_async(conn)
                    .await
            }
            answer => answer,
        }
    }

    /// [`Store::give_back`]: `refund.lua` with no time of payment, every slot at once on
    /// its master, within one deadline. A slot that does not answer in time fails the
    /// whole call; the others may have given back, which only fills buckets sooner.
    async fn give_back(&self, charges: &[KeyedCharge]) -> Result<Vec<Level>, StoreError> {
        if charges.is_empty() {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + self.timeout;
        let conn = self.within(deadline, self.connection()).await?;
        let shares = by_slot(charges);
        let calls = shares.iter().map(|share| {
            let part: Vec<KeyedCharge> = share.iter().map(|&i| charges[i].clone()).collect();
            let mut conn = conn.clone();
            async move {
                let units = self
                    .within(deadline, async {
                        self.refund(&mut conn, &part, Paid::Unknown)
                            .await
                            .map_err(|err| classify_in_cluster(&err, self.timeout))
                    })
                    .await?;
                levels_after_refund(&part, &units)
            }
        });
        let mut levels: Vec<Option<Level>> = vec![None; charges.len()];
        for (share, answer) in shares.iter().zip(join_all(calls).await) {
            for (&i, level) in share.iter().zip(answer?) {
                levels[i] = Some(level);
            }
        }
        Ok(levels.into_iter().flatten().collect())
    }

    /// Sends the refund of `reply`'s charges marked in `refund`, without waiting for it.
    fn send_refund(
        self: &Arc<Self>,
        conn: &ClusterConnection,
        charges: &[KeyedCharge],
        reply: &SlotReply,
        refund: &[bool],
    ) {
        let part: Vec<KeyedCharge> = reply
            .charges
            .iter()
            .zip(refund)
            .filter(|(_, refunded)| **refunded)
            .map(|(&i, _)| charges[i].clone())
            // A charge of no tokens took nothing.
            .filter(|keyed| keyed.charge.cost > 0)
            .collect();
        if part.is_empty() {
            return;
        }
        let (inner, mut conn, paid_at_us) = (self.clone(), conn.clone(), reply.paid_at_us);
        tokio::spawn(async move {
            let paid = Paid::NoEarlierThan(paid_at_us);
            let given =
                tokio::time::timeout(inner.timeout, inner.refund(&mut conn, &part, paid)).await;
            match given {
                Ok(Ok(_)) => inner.metrics.cluster_refund(true),
                Ok(Err(err)) => {
                    inner.metrics.cluster_refund(false);
                    log::debug!("a refund to {} failed: {err}", part[0].key);
                }
                Err(_) => {
                    inner.metrics.cluster_refund(false);
                    log::debug!("a refund to {} timed out", part[0].key);
                }
            }
        });
    }

    /// `DEL` of every hash `buckets` name, one key at a time: they may be in different
    /// slots, and a reset is rare.
    async fn reset(&self, buckets: &[KeyedCharge]) -> Result<(), StoreError> {
        let mut keys: Vec<&str> = buckets.iter().map(|b| &*b.key).collect();
        keys.sort_unstable();
        keys.dedup();
        let deadline = Instant::now() + self.timeout;
        self.within(deadline, async {
            let mut conn = self.connection().await?;
            for key in keys {
                let _deleted: u64 = redis::cmd("DEL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(|err| classify_in_cluster(&err, self.timeout))?;
            }
            Ok(())
        })
        .await
    }

    /// Whether every slot is served now, as a node of the cluster sees it.
    async fn ready(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.timeout;
        self.within(deadline, async {
            let mut conn = self.connection().await?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .map_err(|err| classify_in_cluster(&err, self.timeout))?;
            coverage(&info)
        })
        .await
    }
}

/// One thread's queue of decisions for one slot.
type SlotQueue = Arc<Batcher<SlotDecisions>>;

/// What sends one thread's queued decisions for one slot, as one call routed by the slot.
struct SlotDecisions {
    inner: Arc<Inner>,
    conn: ClusterConnection,
}

impl batch::Sender for SlotDecisions {
    type Request = Vec<KeyedCharge>;
    type Answer = RedisResult<Vec<u64>>;

    /// A lone decision goes as the very call it would make unbatched; several as one batch
    /// call, sent again with the script's text to a node that lacks it (`NOSCRIPT` ran
    /// nothing, so nothing is decided twice).
    async fn send(&self, batch: Vec<Vec<KeyedCharge>>) -> Vec<RedisResult<Vec<u64>>> {
        let mut conn = self.conn.clone();
        if let [alone] = &batch[..] {
            return vec![self.inner.decide(&mut conn, alone).await];
        }
        let requests = batch.len();
        let cmd = decide_batch_cmd(ScriptCall::Sha(&self.inner.script), &batch, None);
        let answer = match call(&mut conn, &cmd).await {
            Err(err) if is_noscript(&err) => {
                call(&mut conn, &by_text(&cmd, TOKEN_BUCKET_LUA)).await
            }
            answer => answer,
        };
        match answer.and_then(|answer| batch_answers(answer, requests)) {
            Ok(answers) => answers,
            Err(err) => (0..requests).map(|_| Err(err.clone())).collect(),
        }
    }
}

/// `cmd`'s answer as the node gave it, but an error answer to the whole command is an
/// `Err`: errors inside it (a batch's requests') are the caller's to read.
async fn call(conn: &mut ClusterConnection, cmd: &redis::Cmd) -> RedisResult<Value> {
    match conn.req_packed_command(cmd).await? {
        Value::ServerError(error) => Err(error.into()),
        answer => Ok(answer),
    }
}

impl Store for ClusterStore {
    fn take<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Taken> {
        Box::pin(self.inner.take(charges))
    }

    fn reset<'a>(&'a self, buckets: &'a [KeyedCharge]) -> StoreFuture<'a, ()> {
        Box::pin(self.inner.reset(buckets))
    }

    fn give_back<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Vec<Level>> {
        Box::pin(self.inner.give_back(charges))
    }

    /// `CLUSTER INFO` of a node: a real round trip, and the cluster's own view of whether
    /// every slot has a master that answers.
    fn check_ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.inner.ready())
    }
}
