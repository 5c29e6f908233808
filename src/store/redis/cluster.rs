//! Buckets in a Redis Cluster (`REDIS_CLUSTER_NODES`): the bucket script of the other
//! modes, run on the master that owns each bucket's hash slot, through the `redis` crate's
//! async cluster client (it keeps the slot map, follows `MOVED` and `ASK`, and reconnects).
//!
//! # One request, one or several slots
//! A policy's buckets for one key are one hash, `<prefix>:<policy>:{<key>}`, and every
//! policy keyed by the same value shares its hash tag, so nearly every request is one slot:
//! one script call, all or nothing, exactly as on a single master. A request whose keys lie
//! in several slots (a policy per client address beside one per API key) is decided on each
//! slot's master at once, each call all or nothing for its own buckets ([`by_slot`]). When
//! every enforced bucket everywhere had the tokens, the request is admitted; otherwise what
//! the slots that paid took is given back ([`settle`], `bucket/refund.lua`). A shadow
//! group pays only if the request is admitted and all its buckets had the tokens, so a
//! shadow bucket is refunded when either fails, and a shadow bucket never causes a refund of
//! an enforced one: it never denies.
//!
//! What this guarantees, and what it costs (README, "Redis Cluster"): no limit ever admits
//! more than it allows, over any interval (`bucket::refund` proves it, refunds included);
//! but between a payment and its refund (one round trip) the bucket holds less, so a
//! request contending for it may be denied that one master, deciding all buckets in one
//! step, would have admitted. A refund that cannot be sent is lost the same way.
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

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::io::tcp::TcpSettings;
use redis::{Cmd, ConnectionInfo, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};
use tokio::sync::{OnceCell, oneshot};
use tokio::time::Instant;

use super::registry::InstanceRegistry;
use super::{ScriptCall, decide_cmd, outcome_of};
use crate::bucket::{Group, Level, REFUND_LUA, TOKEN_BUCKET_LUA, Taken};
use crate::metrics::Metrics;
use crate::store::{KeyedCharge, Store, StoreError, StoreFuture, Unavailable};

/// Every slot of a Redis Cluster.
const SLOTS: u64 = 16_384;
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

/// How often the watch announces this instance and reads the slot map: well within the
/// registry's 5 s, so a live instance is always counted.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

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
}

/// What the store needs to reach a cluster.
#[derive(Clone)]
pub struct ClusterSettings {
    /// Seed nodes, each with the password every node shares.
    pub nodes: Vec<ConnectionInfo>,
    /// Bounds a whole decision, retries included, and every connect.
    pub timeout: Duration,
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
                metrics,
            }),
        })
    }

    /// Starts following the cluster on this thread's runtime: every [`WATCH_EVERY`],
    /// announce this instance in `registry` (the local fallback's divisor, as in Sentinel
    /// mode) and read which nodes are masters (logged and exported when they change). The
    /// returned receiver resolves after the first round.
    pub fn watch(&self, registry: Arc<InstanceRegistry>) -> (ClusterWatch, oneshot::Receiver<()>) {
        let inner = self.inner.clone();
        let (first_round, first_round_done) = oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut conn, mut masters) = (None, Vec::new());
            let mut first_round = Some(first_round);
            loop {
                inner.watch_round(&mut conn, &registry, &mut masters).await;
                if let Some(done) = first_round.take() {
                    // Nobody waiting for the first round is not an error.
                    let _ = done.send(());
                }
                tokio::time::sleep(WATCH_EVERY).await;
            }
        });
        (ClusterWatch { task }, first_round_done)
    }
}

/// The task [`ClusterStore::watch`] started; dropping it stops the task.
pub struct ClusterWatch {
    task: tokio::task::JoinHandle<()>,
}

impl ClusterWatch {
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        self.task.abort();
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
            .map_err(|err| classify(&err, self.timeout))
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
        let mut conn = self.within(deadline, self.connection()).await?;
        if shares.len() <= 1 {
            let answer = self
                .within(deadline, async {
                    self.decide(&mut conn, charges)
                        .await
                        .map_err(|err| classify(&err, self.timeout))
                })
                .await?;
            return outcome_of(charges, &answer);
        }
        let parts: Vec<Vec<KeyedCharge>> = shares
            .iter()
            .map(|share| share.iter().map(|&i| charges[i].clone()).collect())
            .collect();
        let calls = parts.iter().map(|part| {
            let mut conn = conn.clone();
            async move { tokio::time::timeout_at(deadline, self.pay(&mut conn, part)).await }
        });
        let mut answers = Vec::with_capacity(shares.len());
        let mut failure = None;
        for (share, result) in shares.into_iter().zip(join_all(calls).await) {
            match result {
                Ok(Ok((paid_at_us, answer))) => answers.push(SlotAnswer {
                    charges: share,
                    paid_at_us,
                    answer,
                }),
                // A slot that did not answer in time may have paid or not: nothing is given
                // back there, which can only lower its limits.
                Ok(Err(err)) => failure = failure.or(Some(classify(&err, self.timeout))),
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
            for slot in &answers {
                let paid = paid_in_call(charges, slot);
                self.give_back(&conn, charges, slot, &paid);
            }
            return Err(error);
        }
        let settled = settle(charges, &answers)?;
        for (slot, refund) in answers.iter().zip(&settled.refunds) {
            self.give_back(&conn, charges, slot, refund);
        }
        Ok(settled.outcome)
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

    /// Sends the refund of `slot`'s charges marked in `refund`, without waiting for it.
    fn give_back(
        self: &Arc<Self>,
        conn: &ClusterConnection,
        charges: &[KeyedCharge],
        slot: &SlotAnswer,
        refund: &[bool],
    ) {
        let part: Vec<KeyedCharge> = slot
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
        let (inner, mut conn, paid_at_us) = (self.clone(), conn.clone(), slot.paid_at_us);
        tokio::spawn(async move {
            let given = tokio::time::timeout(inner.timeout, async {
                let by_hash = refund_cmd(Some(&inner.refund_script), &part, paid_at_us, None);
                match by_hash.query_async::<Vec<u64>>(&mut conn).await {
                    Err(err) if is_noscript(&err) => {
                        refund_cmd(None, &part, paid_at_us, None)
                            .query_async::<Vec<u64>>(&mut conn)
                            .await
                    }
                    answer => answer,
                }
            })
            .await;
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
        let mut keys: Vec<&str> = buckets.iter().map(|b| b.key.as_str()).collect();
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
                    .map_err(|err| classify(&err, self.timeout))?;
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
                .map_err(|err| classify(&err, self.timeout))?;
            coverage(&info)
        })
        .await
    }

    /// One round of [`ClusterStore::watch`], on the watch's own connection (opened in
    /// the first round that can); `masters` is what the last round saw.
    async fn watch_round(
        &self,
        conn: &mut Option<ClusterConnection>,
        registry: &InstanceRegistry,
        masters: &mut Vec<String>,
    ) {
        if conn.is_none() {
            let opened = tokio::time::timeout(self.timeout, self.client.get_async_connection());
            match opened.await {
                Ok(Ok(opened)) => *conn = Some(opened),
                Ok(Err(err)) => log::debug!("cannot reach the Redis Cluster: {err}"),
                Err(_) => log::debug!("cannot reach the Redis Cluster in time"),
            }
        }
        let Some(conn) = conn else {
            return;
        };
        let announce = registry.announce_async(conn);
        let _ = tokio::time::timeout(self.timeout, announce).await;
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let slots = slots.query_async::<Value>(conn);
        let now = match tokio::time::timeout(self.timeout, slots).await {
            Ok(Ok(slots)) => slot_masters(&slots),
            Ok(Err(err)) => {
                log::debug!("cannot read the slot map: {err}");
                return;
            }
            Err(_) => return,
        };
        if now == *masters {
            return;
        }
        let added = now.iter().filter(|addr| !masters.contains(addr)).count();
        if masters.is_empty() {
            log::info!("Redis Cluster masters are {}", now.join(", "));
        } else {
            log::warn!(
                "Redis Cluster masters changed from {} to {}",
                masters.join(", "),
                now.join(", ")
            );
        }
        self.metrics.cluster_masters(&now, added as u64);
        *masters = now;
    }
}

impl Store for ClusterStore {
    fn take<'a>(&'a self, charges: &'a [KeyedCharge]) -> StoreFuture<'a, Taken> {
        Box::pin(self.inner.take(charges))
    }

    fn reset<'a>(&'a self, buckets: &'a [KeyedCharge]) -> StoreFuture<'a, ()> {
        Box::pin(self.inner.reset(buckets))
    }

    /// `CLUSTER INFO` of a node: a real round trip, and the cluster's own view of whether
    /// every slot has a master that answers.
    fn check_ready(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.inner.ready())
    }
}

fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Sorts a Redis Cluster failure into what the service does about it: the cluster's own
/// refusals are [`Unavailable::ClusterDown`], the rest as in the other modes.
pub fn classify(err: &RedisError, timeout: Duration) -> StoreError {
    match err.kind() {
        ErrorKind::Server(
            ServerErrorKind::ClusterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => StoreError::Unavailable {
            cause: Unavailable::ClusterDown(err.to_string()),
            source: Some(err.clone()),
        },
        ErrorKind::ClusterConnectionNotFound => StoreError::Unavailable {
            cause: Unavailable::NoConnection(err.to_string()),
            source: Some(err.clone()),
        },
        _ => super::classify(err, timeout),
    }
}

/// The charges of each hash slot a request touches (indices into `charges`, in order),
/// slots in the order they first appear. Every charge of one key is in one slot, so the
/// limits of one policy stay together, in their order.
pub fn by_slot(charges: &[KeyedCharge]) -> Vec<Vec<usize>> {
    let mut slots: Vec<(Slot, Vec<usize>)> = Vec::new();
    for (i, keyed) in charges.iter().enumerate() {
        let slot = Slot::for_key(keyed.key.as_bytes());
        match slots.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, share)) => share.push(i),
            None => slots.push((slot, vec![i])),
        }
    }
    slots.into_iter().map(|(_, share)| share).collect()
}

/// What one slot's script call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAnswer {
    /// Which of the request's charges the call decided, in the order it sent them.
    pub charges: Vec<usize>,
    /// A time on the master's clock (µs) no later than the payment.
    pub paid_at_us: u64,
    /// The script's answer: `had`, `units` per charge.
    pub answer: Vec<u64>,
}

impl SlotAnswer {
    fn had(&self, at: usize) -> bool {
        self.answer[2 * at] == 1
    }
}

/// Which of `slot`'s charges its call paid (the script's own rule): all of them had the
/// tokens for the call's enforced charges, and a shadow charge's group had them all in
/// the call.
pub fn paid_in_call(charges: &[KeyedCharge], slot: &SlotAnswer) -> Vec<bool> {
    let group_had = |group: Group| {
        slot.charges
            .iter()
            .enumerate()
            .filter(|(_, i)| charges[**i].charge.group == group)
            .all(|(at, _)| slot.had(at))
    };
    let admitted = group_had(Group::Enforced);
    slot.charges
        .iter()
        .map(|&i| admitted && group_had(charges[i].charge.group))
        .collect()
}

/// A request decided over several slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub outcome: Taken,
    /// Per slot answer, per charge it sent: whether to give its payment back.
    pub refunds: Vec<Vec<bool>>,
}

/// Joins the slots' answers into one decision, with the rule of `bucket::take_all`: the
/// request is admitted when every enforced bucket had the tokens, and a shadow group pays
/// when the request is admitted and its buckets all had them. A charge that its slot
/// paid but this rule would not have is given back; its decision reports the bucket as
/// it is without the payment, as a single master would have.
pub fn settle(charges: &[KeyedCharge], answers: &[SlotAnswer]) -> Result<Settled, StoreError> {
    let mut had = vec![None; charges.len()];
    let mut units = vec![0; charges.len()];
    for slot in answers {
        if slot.answer.len() != 2 * slot.charges.len() {
            return Err(StoreError::Other {
                source: RedisError::from((
                    ErrorKind::Parse,
                    "the bucket script answered the wrong number of values",
                    format!("{} for {} buckets", slot.answer.len(), slot.charges.len()),
                )),
            });
        }
        for (at, &i) in slot.charges.iter().enumerate() {
            had[i] = Some(slot.had(at));
            units[i] = slot.answer[2 * at + 1];
        }
    }
    let Some(had) = had.into_iter().collect::<Option<Vec<bool>>>() else {
        return Err(StoreError::Other {
            source: RedisError::from((ErrorKind::Client, "a charge was decided by no slot")),
        });
    };
    let group_had = |group: Group| {
        charges
            .iter()
            .zip(&had)
            .filter(|(keyed, _)| keyed.charge.group == group)
            .all(|(_, had)| *had)
    };
    let admitted = group_had(Group::Enforced);
    let pays: Vec<bool> = charges
        .iter()
        .map(|keyed| admitted && group_had(keyed.charge.group))
        .collect();
    let mut refunds = Vec::with_capacity(answers.len());
    for slot in answers {
        let paid = paid_in_call(charges, slot);
        let refund: Vec<bool> = slot
            .charges
            .iter()
            .zip(paid)
            .map(|(&i, paid)| paid && !pays[i])
            .collect();
        for (&i, refunded) in slot.charges.iter().zip(&refund) {
            if *refunded {
                let charge = &charges[i].charge;
                units[i] = (units[i] + charge.limit.units_of(charge.cost))
                    .min(charge.limit.capacity_units());
            }
        }
        refunds.push(refund);
    }
    let levels = charges
        .iter()
        .zip(had.iter().zip(&units))
        .map(|(keyed, (had, units))| {
            let charge = &keyed.charge;
            Level::from_units(&charge.limit, *had, *units, charge.cost)
        })
        .collect();
    Ok(Settled {
        outcome: Taken { admitted, levels },
        refunds,
    })
}

/// `bucket/refund.lua` over `charges` (their payments were made no earlier than
/// `paid_at_us`), by the hash of `script` or, without one, in full; `now_us` as the bucket
/// script takes it (only the parity tests pass one).
pub fn refund_cmd(
    script: Option<&redis::Script>,
    charges: &[KeyedCharge],
    paid_at_us: u64,
    now_us: Option<u64>,
) -> Cmd {
    let mut cmd = Cmd::with_capacity(5 + 7 * charges.len(), 64 + 128 * charges.len());
    let runs: Vec<&[KeyedCharge]> = charges.chunk_by(|a, b| a.key == b.key).collect();
    match script {
        Some(script) => cmd.arg("EVALSHA").arg(script.get_hash()),
        None => cmd.arg("EVAL").arg(REFUND_LUA),
    };
    cmd.arg(runs.len());
    for run in &runs {
        cmd.arg(&run[0].key);
    }
    match now_us {
        Some(now_us) => cmd.arg(now_us),
        None => cmd.arg(""),
    };
    cmd.arg(paid_at_us);
    for run in &runs {
        cmd.arg(run.len());
        for keyed in *run {
            let limit = &keyed.charge.limit;
            cmd.arg(format!("{}:tokens", keyed.field))
                .arg(format!("{}:ts", keyed.field))
                .arg(limit.capacity_units())
                .arg(limit.refill_units_per_us())
                .arg(limit.units_of(keyed.charge.cost));
        }
    }
    cmd
}

/// Whether `CLUSTER INFO` says every slot has a master that answers.
pub fn coverage(info: &str) -> Result<(), StoreError> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let state = field("cluster_state").unwrap_or("unknown");
    let ok: u64 = field("cluster_slots_ok")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if state == "ok" && ok == SLOTS {
        return Ok(());
    }
    Err(StoreError::unavailable(Unavailable::ClusterDown(format!(
        "cluster_state:{state}, {ok} of {SLOTS} slots served"
    ))))
}

/// The masters in a `CLUSTER SLOTS` answer, as `host:port`, sorted.
fn slot_masters(slots: &Value) -> Vec<String> {
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    };
    let mut masters: Vec<String> = match slots {
        Value::Array(ranges) => ranges
            .iter()
            .filter_map(|range| match range {
                Value::Array(parts) => match parts.get(2) {
                    Some(Value::Array(node)) if node.len() >= 2 => {
                        Some(format!("{}:{}", text(&node[0])?, text(&node[1])?))
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    masters.sort();
    masters.dedup();
    masters
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{Charge, Limit, LimitSpec};

    fn limit(burst: u64) -> Limit {
        Limit::parse(LimitSpec {
            rate: 1,
            window_s: 3600,
            burst,
        })
        .unwrap()
    }

    fn charge(key: &str, field: &str, burst: u64, group: Group) -> KeyedCharge {
        KeyedCharge {
            key: key.into(),
            field: field.into(),
            charge: Charge {
                group,
                ..Charge::one(limit(burst))
            },
        }
    }

    #[test]
    fn the_slot_of_a_key_is_crc16_of_its_hash_tag_as_the_cluster_specification_says() {
        // The specification's test vector: CRC16("123456789") = 0x31C3.
        assert_eq!(Slot::for_key("123456789"), Slot::new(0x31C3).unwrap());
        assert_eq!(Slot::for_key("{123456789}.a"), Slot::new(0x31C3).unwrap());
        assert_eq!(
            Slot::for_key("{user1000}.following"),
            Slot::for_key("{user1000}.followers")
        );
        assert_eq!(Slot::for_key("foo{bar}{zap}"), Slot::for_key("bar"));
        assert_eq!(Slot::for_key("foo{{bar}}zap"), Slot::for_key("{bar"));
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(Slot::for_key("a{}{123456789}"), Slot::new(0x31C3).unwrap());
    }

    #[test]
    fn every_policy_keyed_by_one_client_lands_in_one_slot() {
        let charges = [
            charge("rl:login:{ip=192.0.2.1}", "minute", 5, Group::Enforced),
            charge("rl:login:{ip=192.0.2.1}", "day", 50, Group::Enforced),
            charge("rl:api:{ip=192.0.2.1}", "minute", 5, Group::Enforced),
            charge("rl:trial:{ip=192.0.2.1}", "hour", 5, Group::Shadow(1)),
        ];
        assert_eq!(by_slot(&charges), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn charges_in_several_slots_are_grouped_in_order_of_first_appearance() {
        let (a, b) = ("rl:p:{ip=192.0.2.1}", "rl:q:{key=abc}");
        assert_ne!(Slot::for_key(a), Slot::for_key(b));
        let charges = [
            charge(b, "x", 1, Group::Enforced),
            charge(a, "y", 1, Group::Enforced),
            charge(b, "z", 1, Group::Enforced),
        ];
        assert_eq!(by_slot(&charges), vec![vec![0, 2], vec![1]]);
    }

    /// An answer of `call` (one slot's charges): per charge, whether it had the tokens; the
    /// units as the script reports them (paid or not, by the script's rule).
    fn answer(charges: &[KeyedCharge], call: &[usize], had: &[bool]) -> SlotAnswer {
        let mut slot = SlotAnswer {
            charges: call.to_vec(),
            paid_at_us: 7,
            answer: had.iter().flat_map(|h| [u64::from(*h), 0]).collect(),
        };
        let paid = paid_in_call(charges, &slot);
        for (at, &i) in call.iter().enumerate() {
            let limit = charges[i].charge.limit;
            let held = if had[at] { limit.capacity_units() } else { 0 };
            let cost = if paid[at] { limit.units_of(1) } else { 0 };
            slot.answer[2 * at + 1] = held - cost;
        }
        slot
    }

    #[test]
    fn a_denial_in_one_slot_gives_back_what_the_other_slot_paid() {
        let charges = [
            charge("a:{1}", "minute", 10, Group::Enforced),
            charge("b:{2}", "day", 1, Group::Enforced),
        ];
        let answers = [
            answer(&charges, &[0], &[true]),
            answer(&charges, &[1], &[false]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(!settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![true], vec![false]]);
        // As a single master would have reported it: had the token, still holds all ten.
        let minute = settled.outcome.levels[0];
        assert!(minute.allowed);
        assert_eq!(minute.remaining, 10);
        assert!(!settled.outcome.levels[1].allowed);
    }

    #[test]
    fn an_admitted_request_gives_nothing_back() {
        let charges = [
            charge("a:{1}", "minute", 10, Group::Enforced),
            charge("b:{2}", "day", 3, Group::Enforced),
        ];
        let answers = [
            answer(&charges, &[0], &[true]),
            answer(&charges, &[1], &[true]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![false], vec![false]]);
        assert_eq!(settled.outcome.levels[0].remaining, 9);
        assert_eq!(settled.outcome.levels[1].remaining, 2);
    }

    #[test]
    fn a_shadow_bucket_without_tokens_never_causes_a_refund_of_an_enforced_one() {
        let charges = [
            charge("a:{1}", "minute", 10, Group::Enforced),
            charge("trial:{2}", "hour", 1, Group::Shadow(1)),
        ];
        let answers = [
            answer(&charges, &[0], &[true]),
            answer(&charges, &[1], &[false]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![false], vec![false]]);
    }

    #[test]
    fn a_shadow_group_paid_for_a_request_denied_elsewhere_is_given_back() {
        let charges = [
            charge("a:{1}", "minute", 1, Group::Enforced),
            charge("trial:{2}", "hour", 5, Group::Shadow(1)),
        ];
        let answers = [
            answer(&charges, &[0], &[false]),
            answer(&charges, &[1], &[true]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(!settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![false], vec![true]]);
        assert_eq!(settled.outcome.levels[1].remaining, 5);
    }

    #[test]
    fn a_shadow_group_split_over_slots_pays_only_if_all_of_it_had_the_tokens() {
        let charges = [
            charge("a:{1}", "minute", 5, Group::Enforced),
            charge("t:{1}", "x", 5, Group::Shadow(1)),
            charge("t:{2}", "y", 5, Group::Shadow(1)),
        ];
        let answers = [
            answer(&charges, &[0, 1], &[true, true]),
            answer(&charges, &[2], &[false]),
        ];
        let settled = settle(&charges, &answers).unwrap();
        assert!(settled.outcome.admitted);
        assert_eq!(settled.refunds, vec![vec![false, true], vec![false]]);
    }

    #[test]
    fn an_answer_of_the_wrong_length_is_an_error_not_a_decision() {
        let charges = [charge("a:{1}", "m", 1, Group::Enforced)];
        let broken = SlotAnswer {
            charges: vec![0],
            paid_at_us: 0,
            answer: vec![1],
        };
        assert!(settle(&charges, &[broken]).is_err());
    }

    #[test]
    fn ready_means_every_slot_is_served() {
        let healthy = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\n";
        assert!(coverage(healthy).is_ok());
        let failed = "cluster_state:fail\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:10923\r\ncluster_slots_fail:5461\r\n";
        let reason = coverage(failed).unwrap_err().to_string();
        assert!(
            reason.contains("cluster_state:fail, 10923 of 16384"),
            "{reason}"
        );
        let partial = "cluster_state:ok\r\ncluster_slots_ok:16000\r\n";
        assert!(coverage(partial).is_err());
        assert_eq!(coverage("").unwrap_err().kind(), "clusterdown");
    }

    #[test]
    fn the_masters_are_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let slots = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("127.0.0.1", 7000),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(11000),
                node("127.0.0.1", 7000),
            ]),
        ]);
        assert_eq!(
            slot_masters(&slots),
            vec!["127.0.0.1:7000", "127.0.0.1:7001"]
        );
    }
}
