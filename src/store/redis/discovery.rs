//! Discovery: the resolver thread finds the master, confirms it, and swaps it into the
//! [`MasterSlot`] that the Redis store decides through. One job, following the master; it
//! is long because each way a sentinel can mislead (stale, cut off, lying) has its rule.
//!
//! Each round asks every sentinel at once (each with a short timeout) and believes the
//! answer with the highest configuration epoch, the most sentinels breaking a tie (see
//! [`candidates`]): the first sentinel to answer may be one that was cut off with the old
//! master, or one that monitors another server under the same name. Addresses outside
//! `REDIS_DATA_NODES`, when it is set, are not believed at all. The named node must then
//! confirm with `ROLE` that it really is a master. A listener for `+switch-master` on
//! every sentinel, each on its own thread, rings the resolver so a failover is seen within
//! milliseconds even while a sentinel is down; the poll covers lost events.
//! With a single `REDIS_URL` the same thread only re-confirms that one node after
//! failures. After each good round it announces this instance in the [`InstanceRegistry`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use redis::{ConnectionInfo, Role};
use tokio::sync::oneshot;

use super::error::classify;
use super::master::{ConnectionSettings, Master, MasterSlot};
use super::node::{Login, connect, node_info};
use super::registry::InstanceRegistry;
use crate::metrics::Metrics;

/// How this instance finds its master.
#[derive(Clone)]
pub enum Discovery {
    /// One fixed node (`REDIS_URL`).
    Fixed(ConnectionInfo),
    /// Ask these sentinels (`SENTINEL_HOSTS`) for the master named `master_name`.
    Sentinels {
        sentinels: Vec<ConnectionInfo>,
        master_name: String,
        /// How to log in to the master they name.
        node_login: Login,
        /// The only masters to believe (`REDIS_DATA_NODES`); `None` believes any.
        data_nodes: Option<DataNodes>,
    },
}

/// The addresses a sentinel may name as the master (`REDIS_DATA_NODES`). A sentinel that
/// anyone can reconfigure (`SENTINEL MONITOR`) could otherwise send the instances, and the
/// data nodes' password, to a server of its choosing.
#[derive(Debug, Clone)]
pub struct DataNodes(BTreeSet<(String, u16)>);

impl DataNodes {
    /// Hosts are compared without regard to case, as DNS does; they are not resolved, so
    /// list them as the sentinels name them (host names where they announce host names).
    pub fn new(nodes: impl IntoIterator<Item = (String, u16)>) -> Self {
        Self(
            nodes
                .into_iter()
                .map(|(host, port)| (host.to_ascii_lowercase(), port))
                .collect(),
        )
    }

    pub fn admits(&self, host: &str, port: u16) -> bool {
        self.0.contains(&(host.to_ascii_lowercase(), port))
    }
}

pub struct ResolverSettings {
    pub discovery: Discovery,
    pub connections: ConnectionSettings,
    /// How often to re-ask when nothing rings.
    pub poll: Duration,
    pub registry: Arc<InstanceRegistry>,
    pub metrics: Metrics,
}

/// The running resolver; dropping it stops the threads.
pub struct Resolver {
    stop: Arc<AtomicBool>,
    slot: Arc<MasterSlot>,
    threads: Vec<JoinHandle<()>>,
}

/// Resolves once the first round is over (found a master or not), so that a service whose
/// Redis is up can start ready without doing that round's network I/O on its own thread.
pub type FirstRound = oneshot::Receiver<()>;

impl Resolver {
    /// Starts resolving on threads of its own; the first round's end is signalled on the
    /// returned [`FirstRound`]. Fails only when a thread cannot be spawned.
    pub fn start(
        settings: ResolverSettings,
        slot: Arc<MasterSlot>,
    ) -> std::io::Result<(Self, FirstRound)> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut resolver = Self {
            stop: stop.clone(),
            slot: slot.clone(),
            threads: Vec::new(),
        };
        let sentinels = match &settings.discovery {
            Discovery::Sentinels { sentinels, .. } => sentinels.clone(),
            Discovery::Fixed(_) => Vec::new(),
        };
        for sentinel in sentinels {
            let listener = SwitchListener {
                sentinel,
                slot: slot.clone(),
                stop: stop.clone(),
                timeout: settings.connections.timeout,
            };
            resolver
                .threads
                .push(spawn("sentinel-events", move || listener.run())?);
        }
        let worker = Worker {
            settings,
            slot,
            warned_outsiders: BTreeSet::new(),
        };
        let (first_round, first_round_done) = oneshot::channel();
        resolver.threads.push(spawn("master-resolver", move || {
            worker.run(&stop, first_round)
        })?);
        Ok((resolver, first_round_done))
    }

    /// Stops the threads and waits for them; each wakes within a timeout of a request.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.slot.ring();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.halt();
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(body)
}

struct Worker {
    settings: ResolverSettings,
    slot: Arc<MasterSlot>,
    /// Addresses outside `REDIS_DATA_NODES` that a sentinel named in the last round, and
    /// that were logged as a warning then: one line when a sentinel starts naming one, not
    /// one per poll while it keeps doing so.
    warned_outsiders: BTreeSet<String>,
}

impl Worker {
    fn run(mut self, stop: &AtomicBool, first_round: oneshot::Sender<()>) {
        self.resolve();
        // Nobody waiting for the first round is not an error.
        let _ = first_round.send(());
        while !stop.load(Ordering::Acquire) {
            self.slot.wait_for_ring(self.settings.poll);
            if stop.load(Ordering::Acquire) {
                break;
            }
            self.resolve();
        }
    }

    /// One round: find the master, confirm it, install it if it changed, announce.
    fn resolve(&mut self) {
        let found = self.find_master().and_then(|candidates| {
            let mut refusals = Vec::new();
            for info in candidates {
                match self.adopt(info) {
                    Ok(()) => return Ok(()),
                    Err(reason) => refusals.push(reason),
                }
            }
            Err(refusals.join("; "))
        });
        match found {
            Ok(()) => self.announce(),
            Err(reason) => {
                if self.slot.mark_unusable(reason.clone()) {
                    log::warn!("no usable Redis master: {reason}");
                }
            }
        }
    }

    /// Makes `info` the master if it confirms that it is one (the one in use and usable
    /// needs no asking).
    fn adopt(&mut self, info: ConnectionInfo) -> Result<(), String> {
        let addr = info.addr().to_string();
        match self.slot.current() {
            Some(master) if master.addr == addr && self.slot.is_usable() => Ok(()),
            Some(master) if master.addr == addr => {
                self.confirm_master(&info)?;
                self.slot.mark_usable();
                log::info!("Redis master {addr} is usable again");
                Ok(())
            }
            previous => {
                self.confirm_master(&info)?;
                let master =
                    Master::open(info, self.settings.connections).map_err(|err| err.to_string())?;
                self.slot.install(Arc::new(master));
                match previous {
                    Some(old) => log::warn!("Redis master switched from {} to {addr}", old.addr),
                    None => log::info!("Redis master is {addr}"),
                }
                self.settings.metrics.master_changed(&addr);
                Ok(())
            }
        }
    }

    /// The addresses to try as the master, best first (see [`candidates`]), or why there
    /// are none.
    fn find_master(&mut self) -> Result<Vec<ConnectionInfo>, String> {
        let timeout = self.settings.connections.timeout;
        let (sentinels, master_name, node_login, data_nodes) = match &self.settings.discovery {
            Discovery::Fixed(info) => return Ok(vec![info.clone()]),
            Discovery::Sentinels {
                sentinels,
                master_name,
                node_login,
                data_nodes,
            } => (sentinels, master_name, node_login, data_nodes),
        };
        let answers = ask_every_sentinel(sentinels, master_name, timeout);
        let mut failures = Vec::new();
        let mut believed = Vec::new();
        let mut outsiders = BTreeSet::new();
        for (sentinel, answer) in answers {
            match answer {
                Ok(Some(named)) => match data_nodes {
                    Some(nodes) if !nodes.admits(&named.host, named.port) => {
                        let addr = named.addr();
                        if !self.warned_outsiders.contains(&addr) {
                            log::warn!(
                                "sentinel {sentinel} names {addr} as the master of {master_name}, which is not in REDIS_DATA_NODES: ignored"
                            );
                        }
                        failures.push(format!("{sentinel} named {addr}, not a data node"));
                        outsiders.insert(addr);
                    }
                    _ => believed.push(named),
                },
                Ok(None) => failures.push(format!("{sentinel} does not know {master_name}")),
                Err(err) => failures.push(format!("{sentinel}: {err}")),
            }
        }
        self.warned_outsiders = outsiders;
        let current = self.slot.current().map(|master| master.addr.clone());
        let candidates = candidates(&believed, current.as_deref());
        if candidates.is_empty() {
            return Err(format!(
                "no sentinel named a master for {master_name} ({})",
                failures.join("; ")
            ));
        }
        Ok(candidates
            .into_iter()
            .map(|named| node_info(&named.host, named.port, node_login))
            .collect())
    }

    /// A sentinel's answer can be stale; only the node itself can say it is a master.
    fn confirm_master(&self, info: &ConnectionInfo) -> Result<(), String> {
        let timeout = self.settings.connections.timeout;
        let addr = info.addr();
        let role = connect(info, timeout)
            .and_then(|mut conn| redis::cmd("ROLE").query::<Role>(&mut conn))
            .map_err(|err| format!("{addr}: {}", classify(&err, timeout)))?;
        match role {
            Role::Primary { .. } => Ok(()),
            _ => Err(format!("{addr} is not a master")),
        }
    }

    fn announce(&self) {
        let Some(master) = self.slot.current() else {
            return;
        };
        match connect(&master.info, self.settings.connections.timeout) {
            Ok(mut conn) => self.settings.registry.announce(&mut conn),
            Err(err) => log::debug!("could not announce this instance: {err}"),
        }
    }
}

/// What one sentinel says of the master.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Named {
    host: String,
    port: u16,
    /// The epoch of the configuration the sentinel holds: each failover takes a new,
    /// higher one, and sentinels adopt a configuration only from a higher epoch than theirs.
    epoch: u64,
}

impl Named {
    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Each sentinel's answer, in `sentinels`' order, asked all at once so that one that does
/// not answer costs the round one timeout, not one per sentinel behind it.
fn ask_every_sentinel(
    sentinels: &[ConnectionInfo],
    master_name: &str,
    timeout: Duration,
) -> Vec<(String, redis::RedisResult<Option<Named>>)> {
    std::thread::scope(|scope| {
        let asking: Vec<_> = sentinels
            .iter()
            .map(|sentinel| {
                (
                    sentinel.addr().to_string(),
                    scope.spawn(move || ask_sentinel(sentinel, master_name, timeout)),
                )
            })
            .collect();
        asking
            .into_iter()
            .map(|(addr, asked)| {
                let answer = asked.join().unwrap_or_else(|_| {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "the thread asking this sentinel failed",
                    )))
                });
                (addr, answer)
            })
            .collect()
    })
}

/// `SENTINEL MASTER`: the address and the configuration epoch in one answer. `None` when
/// the sentinel does not monitor `master_name`.
fn ask_sentinel(
    sentinel: &ConnectionInfo,
    master_name: &str,
    timeout: Duration,
) -> redis::RedisResult<Option<Named>> {
    let mut conn = connect(sentinel, timeout)?;
    let answer = redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(master_name)
        .query::<HashMap<String, String>>(&mut conn);
    let fields = match answer {
        Ok(fields) => fields,
        Err(err) if err.to_string().contains("No such master") => return Ok(None),
        Err(err) => return Err(err),
    };
    let field = |name: &str| {
        fields.get(name).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Parse,
                "SENTINEL MASTER answered without a field",
                name.to_string(),
            ))
        })
    };
    let number = |name: &str| {
        field(name)?.parse::<u64>().map_err(|_| {
            redis::RedisError::from((
                redis::ErrorKind::Parse,
                "SENTINEL MASTER answered a field that is no number",
                name.to_string(),
            ))
        })
    };
    let port = u16::try_from(number("port")?).map_err(|_| {
        redis::RedisError::from((
            redis::ErrorKind::Parse,
            "SENTINEL MASTER answered a port out of range",
        ))
    })?;
    Ok(Some(Named {
        host: field("ip")?.clone(),
        port,
        epoch: number("config-epoch")?,
    }))
}

/// The masters to believe among the sentinels' answers, best first: the addresses named
/// with the highest configuration epoch, since a sentinel that missed a failover (cut off
/// with the old master, paused, restarted from an old file) still holds the epoch before
/// it. Answers of one epoch can disagree: before any failover every configuration has
/// epoch 0 (and a sentinel pointed at another server by `SENTINEL MONITOR` starts at 0
/// too), and during one the leader already holds the new epoch while it still names the
/// old master, which the others, told by its hello messages, have left. So the address
/// most of them name comes first, then the one in use (`current`), then `SENTINEL_HOSTS`
/// order; the round takes the first that confirms it is a master, and an older epoch's
/// address is never tried.
fn candidates<'a>(answers: &'a [Named], current: Option<&str>) -> Vec<&'a Named> {
    let Some(top) = answers.iter().map(|named| named.epoch).max() else {
        return Vec::new();
    };
    let newest: Vec<&Named> = answers.iter().filter(|named| named.epoch == top).collect();
    let same = |a: &Named, b: &Named| a.host == b.host && a.port == b.port;
    let mut distinct: Vec<(&Named, usize)> = Vec::new();
    for named in &newest {
        match distinct.iter_mut().find(|(seen, _)| same(seen, named)) {
            Some((_, votes)) => *votes += 1,
            None => distinct.push((named, 1)),
        }
    }
    let is_current = |candidate: &Named| current == Some(candidate.addr().as_str());
    // A stable sort keeps SENTINEL_HOSTS order among equals.
    distinct.sort_by_key(|(named, votes)| std::cmp::Reverse((*votes, is_current(named))));
    distinct.into_iter().map(|(named, _)| named).collect()
}

/// Listens for `+switch-master` on one sentinel and rings the resolver. There is one per
/// sentinel, each on its own thread: a sentinel that is down, paused or cut off holds up
/// only its own listener, and any sentinel that announces a switch is heard at once.
struct SwitchListener {
    sentinel: ConnectionInfo,
    slot: Arc<MasterSlot>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
}

/// How long a subscription may stay silent before the sentinel is asked for a PING: a
/// sentinel that went away without closing the connection (paused, cut off, its host gone)
/// is noticed within this and a timeout, and the listener connects again.
const QUIET_BEFORE_PING: Duration = Duration::from_secs(5);
/// How often a quiet subscription wakes to notice a stop.
const WAKE_EVERY: Duration = Duration::from_millis(500);

impl SwitchListener {
    fn run(self) {
        while !self.stop.load(Ordering::Acquire) {
            if let Err(err) = self.listen() {
                log::debug!(
                    "lost +switch-master events from {}: {err}",
                    self.sentinel.addr()
                );
                // Do not spin on a sentinel that refuses at once.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn listen(&self) -> redis::RedisResult<()> {
        let mut conn = connect(&self.sentinel, self.timeout)?;
        conn.set_read_timeout(Some(WAKE_EVERY))?;
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe("+switch-master")?;
        let mut quiet = Duration::ZERO;
        while !self.stop.load(Ordering::Acquire) {
            match pubsub.get_message() {
                Ok(message) => {
                    quiet = Duration::ZERO;
                    let payload: String = message.get_payload().unwrap_or_default();
                    log::info!(
                        "sentinel {} announced +switch-master {payload}",
                        self.sentinel.addr()
                    );
                    self.slot.ring();
                }
                Err(err) if err.is_timeout() => {
                    quiet += WAKE_EVERY;
                    if quiet >= QUIET_BEFORE_PING {
                        // A quiet channel is not an error; a sentinel that does not answer is.
                        pubsub.set_read_timeout(Some(self.timeout))?;
                        pubsub.ping::<()>()?;
                        pubsub.set_read_timeout(Some(WAKE_EVERY))?;
                        quiet = Duration::ZERO;
                    }
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(port: u16, epoch: u64) -> Named {
        Named {
            host: "127.0.0.1".into(),
            port,
            epoch,
        }
    }

    fn ports(candidates: Vec<&Named>) -> Vec<u16> {
        candidates.into_iter().map(|named| named.port).collect()
    }

    /// Which masters a round tries, in order, from what the sentinels named (port, epoch)
    /// and the master in use.
    #[test]
    fn the_newest_epoch_comes_first_then_most_sentinels_then_the_master_in_use() {
        let in_use = |port: u16| Some(format!("127.0.0.1:{port}"));
        let cases = [
            (
                "a sentinel that missed a failover is outvoted by the newer epoch alone",
                vec![named(6379, 0), named(6380, 1)],
                in_use(6379),
                vec![6380],
            ),
            (
                "within one epoch the address most sentinels name comes first",
                vec![named(7000, 0), named(6379, 0), named(6379, 0)],
                in_use(7000),
                vec![6379, 7000],
            ),
            (
                "a tie puts the master in use first",
                vec![named(7000, 2), named(6379, 2)],
                in_use(6379),
                vec![6379, 7000],
            ),
            (
                "a tie without a master in use keeps the first sentinel's answer first",
                vec![named(7000, 2), named(6379, 2)],
                None,
                vec![7000, 6379],
            ),
            // During a failover the leader holds the new epoch but still names the old
            // master, while a sentinel its hello messages reached names the new one: the
            // dead master in use comes first, and the new one must still be tried.
            (
                "a leader mid-failover ties with the new master, which stays a candidate",
                vec![named(6380, 1), named(6379, 1), named(6379, 0)],
                in_use(6379),
                vec![6379, 6380],
            ),
        ];
        for (case, answers, in_use, expected) in cases {
            assert_eq!(
                ports(candidates(&answers, in_use.as_deref())),
                expected,
                "{case}"
            );
        }
        assert!(candidates(&[], None).is_empty(), "no answer, no candidate");
    }

    #[test]
    fn data_nodes_are_matched_by_host_in_any_case_and_port() {
        let nodes = DataNodes::new([("Redis-Master".to_string(), 6379)]);
        assert!(nodes.admits("redis-master", 6379));
        assert!(!nodes.admits("redis-master", 6380));
        assert!(!nodes.admits("127.0.0.1", 6379));
    }
}
