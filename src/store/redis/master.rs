//! The current master: what the resolver installs and the store decides through.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::ConnectionInfo;

use super::node::NodeManager;
use crate::store::StoreError;

/// How decisions reach the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionMode {
    /// One multiplexed async connection per worker thread: requests on a worker are
    /// pipelined on its connection and never leave its thread.
    Multiplexed,
    /// An r2d2 pool of blocking connections, used through Actix's blocking threads.
    Pool,
}

impl ConnectionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionMode::Multiplexed => "multiplexed",
            ConnectionMode::Pool => "pool",
        }
    }
}

/// Tells masters apart even when one is dropped and another allocated in its place.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// One confirmed master, and the pool of connections to it in [`ConnectionMode::Pool`].
pub struct Master {
    pub addr: String,
    pub info: ConnectionInfo,
    /// Unique per [`Master::open`], so connections made for an older master are never reused.
    pub generation: u64,
    pub(super) pool: Option<r2d2::Pool<NodeManager>>,
}

impl Master {
    /// A master to decide through. In pool mode the pool is filled with one connection
    /// first, so a master that cannot be reached is not installed.
    pub fn open(
        info: ConnectionInfo,
        mode: ConnectionMode,
        pool_size: u32,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let addr = info.addr().to_string();
        let pool = match mode {
            ConnectionMode::Multiplexed => None,
            ConnectionMode::Pool => Some(
                r2d2::Pool::builder()
                    .max_size(pool_size.max(1))
                    .min_idle(Some(1))
                    .connection_timeout(timeout)
                    // Every checkout already proves the connection by using it; a PING
                    // first would double the round trips.
                    .test_on_check_out(false)
                    // Connection failures surface as StoreErrors, which are logged once per
                    // outage; r2d2's default handler would log each attempt.
                    .error_handler(Box::new(r2d2::NopErrorHandler))
                    .build(NodeManager {
                        info: info.clone(),
                        timeout,
                    })
                    .map_err(|err| StoreError::Connection(format!("{addr}: {err}")))?,
            ),
        };
        Ok(Self {
            addr,
            info,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            pool,
        })
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
