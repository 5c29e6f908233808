//! Discovery: the resolver thread finds the master, confirms it, and swaps it into the
//! [`MasterSlot`] that the Redis store decides through.
//!
//! It follows the Sentinel client guidelines: ask the sentinels in turn (each with a short
//! timeout), move the first that answers to the front, confirm with `ROLE` that the named
//! node really is a master, and listen for `+switch-master` so a failover is seen within
//! milliseconds; the poll covers lost events. With a single `REDIS_URL` the same thread
//! only re-confirms that one node after failures. After each good round it announces this
//! instance in the [`InstanceRegistry`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use redis::{ConnectionInfo, Role};
use tokio::sync::oneshot;

use super::classify;
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
    },
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
        let sentinel_order = match &settings.discovery {
            Discovery::Sentinels { sentinels, .. } => sentinels.clone(),
            Discovery::Fixed(_) => Vec::new(),
        };
        if !sentinel_order.is_empty() {
            let listener = SwitchListener {
                sentinels: sentinel_order.clone(),
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
            sentinel_order,
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
    /// The sentinels, the last one that answered first.
    sentinel_order: Vec<ConnectionInfo>,
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
        let found = self.find_master().and_then(|info| {
            let addr = info.addr().to_string();
            let current = self.slot.current();
            match current {
                Some(master) if master.addr == addr && self.slot.is_usable() => Ok(()),
                Some(master) if master.addr == addr => {
                    self.confirm_master(&info)?;
                    self.slot.mark_usable();
                    log::info!("Redis master {addr} is usable again");
                    Ok(())
                }
                previous => {
                    self.confirm_master(&info)?;
                    let master = Master::open(info, self.settings.connections)
                        .map_err(|err| err.to_string())?;
                    self.slot.install(Arc::new(master));
                    match previous {
                        Some(old) => {
                            log::warn!("Redis master switched from {} to {addr}", old.addr)
                        }
                        None => log::info!("Redis master is {addr}"),
                    }
                    self.settings.metrics.master_changed(&addr);
                    Ok(())
                }
            }
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

    /// The master's address, or why none was found.
    fn find_master(&mut self) -> Result<ConnectionInfo, String> {
        let timeout = self.settings.connections.timeout;
        let (master_name, node_login) = match &self.settings.discovery {
            Discovery::Fixed(info) => return Ok(info.clone()),
            Discovery::Sentinels {
                master_name,
                node_login,
                ..
            } => (master_name.clone(), node_login.clone()),
        };
        let mut failures = Vec::new();
        for index in 0..self.sentinel_order.len() {
            let sentinel = &self.sentinel_order[index];
            let answer = connect(sentinel, timeout).and_then(|mut conn| {
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&master_name)
                    .query::<Option<(String, u16)>>(&mut conn)
            });
            match answer {
                Ok(Some((host, port))) => {
                    let answered = self.sentinel_order.remove(index);
                    self.sentinel_order.insert(0, answered);
                    return Ok(node_info(&host, port, &node_login));
                }
                Ok(None) => {
                    failures.push(format!("{} does not know {master_name}", sentinel.addr()))
                }
                Err(err) => failures.push(format!("{}: {err}", sentinel.addr())),
            }
        }
        Err(format!(
            "no sentinel named a master for {master_name} ({})",
            failures.join("; ")
        ))
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

/// Listens for `+switch-master` on one sentinel at a time and rings the resolver.
struct SwitchListener {
    sentinels: Vec<ConnectionInfo>,
    slot: Arc<MasterSlot>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
}

impl SwitchListener {
    fn run(self) {
        let mut next = 0;
        while !self.stop.load(Ordering::Acquire) {
            let sentinel = &self.sentinels[next % self.sentinels.len()];
            next += 1;
            if let Err(err) = self.listen(sentinel) {
                log::debug!("lost +switch-master events from {}: {err}", sentinel.addr());
                // Do not spin on a sentinel that refuses at once.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn listen(&self, sentinel: &ConnectionInfo) -> redis::RedisResult<()> {
        let mut conn = connect(sentinel, self.timeout)?;
        // Wake up now and then to notice a stop; a quiet channel is not an error.
        conn.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe("+switch-master")?;
        while !self.stop.load(Ordering::Acquire) {
            match pubsub.get_message() {
                Ok(message) => {
                    let payload: String = message.get_payload().unwrap_or_default();
                    log::info!(
                        "sentinel {} announced +switch-master {payload}",
                        sentinel.addr()
                    );
                    self.slot.ring();
                }
                Err(err) if err.is_timeout() => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}
