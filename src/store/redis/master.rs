//! The current master: what discovery installs and the store decides through.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::ConnectionInfo;

use super::node::NodeManager;
use crate::store::{StoreError, Unavailable};

/// How decisions reach the master (`REDIS_CLIENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
pub enum ConnectionMode {
    /// One multiplexed async connection per worker thread: requests on a worker are
    /// pipelined on its connection and never leave its thread. While a call is in flight
    /// on it, the decisions that arrive queue, and go together as one call of at most
    /// `batch_max` (`REDIS_BATCH_MAX`; 1 sends each alone).
    Multiplexed { batch_max: usize },
    /// An r2d2 pool of `size` blocking connections per instance, used from tokio's blocking
    /// threads.
    Pool { size: u32 },
}

impl ConnectionMode {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Tells masters apart even when one is dropped and another allocated in its place.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// How this instance holds connections to one master. The pool exists exactly when the
/// mode says so: a pool-mode master without a pool cannot be built.
pub enum Connections {
    /// Each worker thread opens its own connection on first use (see `RedisStore`), and
    /// sends at most `batch_max` decisions in one call.
    Multiplexed {
        batch_max: usize,
    },
    Pool(r2d2::Pool<NodeManager>),
}

/// One confirmed master.
pub struct Master {
    pub addr: String,
    pub info: ConnectionInfo,
    /// Unique per [`Master::open`], so connections made for an older master are never reused.
    pub generation: u64,
    pub connections: Connections,
}

/// What [`Master::open`] needs besides the address.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    pub mode: ConnectionMode,
    /// Bounds every step: connect, read, write, and a pool checkout.
    pub timeout: Duration,
}

impl Master {
    /// A master to decide through. In pool mode the pool is filled with one connection
    /// first, so a master that cannot be reached is not installed.
    pub fn open(info: ConnectionInfo, settings: ConnectionSettings) -> Result<Self, StoreError> {
        let addr = info.addr().to_string();
        let connections = match settings.mode {
            ConnectionMode::Multiplexed { batch_max } => Connections::Multiplexed { batch_max },
            ConnectionMode::Pool { size } => Connections::Pool(
                r2d2::Pool::builder()
                    .max_size(size.max(1))
                    .min_idle(Some(1))
                    .connection_timeout(settings.timeout)
                    // Every checkout already proves the connection by using it; a PING
                    // first would double the round trips.
                    .test_on_check_out(false)
                    // Connection failures surface as StoreErrors, which are logged once per
                    // outage; r2d2's default handler would log each attempt.
                    .error_handler(Box::new(r2d2::NopErrorHandler))
                    .build(NodeManager {
                        info: info.clone(),
                        timeout: settings.timeout,
                    })
                    .map_err(|err| {
                        StoreError::unavailable(Unavailable::NoConnection(format!("{addr}: {err}")))
                    })?,
            ),
        };
        Ok(Self {
            addr,
            info,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            connections,
        })
    }
}

/// Failed decisions in a row that make a master unusable without a sign that it changed:
/// enough that a lone timeout or `NOREPLICAS` never does, few enough that a master that
/// stopped answering costs at most this many timeouts before decisions fall back at once.
pub const FAILURES_IN_A_ROW: u32 = 3;

/// The current master, shared by the store (which uses it) and discovery (which
/// replaces it), and discovery's doorbell.
pub struct MasterSlot {
    current: ArcSwapOption<Master>,
    /// False from a sign that the master changed (`READONLY`, or
    /// [`FAILURES_IN_A_ROW`] failed decisions) until discovery has confirmed a master
    /// again; meanwhile decisions fall back at once instead of each waiting out a timeout.
    usable: AtomicBool,
    /// Decisions that failed in a row on the current master. One slow call is no sign of
    /// a failover: it falls back alone, and with `FAIL_MODE=open` marking the master
    /// unusable on it would lift every limit of the instance until discovery confirmed.
    failures_in_a_row: AtomicU32,
    reason: Mutex<String>,
    wake: Mutex<bool>,
    woken: Condvar,
}

impl Default for MasterSlot {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            usable: AtomicBool::new(false),
            failures_in_a_row: AtomicU32::new(0),
            reason: Mutex::new("no master resolved yet".into()),
            wake: Mutex::new(false),
            woken: Condvar::new(),
        }
    }
}

impl MasterSlot {
    pub fn current(&self) -> Option<Arc<Master>> {
        self.current.load_full()
    }

    /// The master to use now, unless a failure has made the slot unusable.
    pub fn usable_master(&self) -> Result<Arc<Master>, StoreError> {
        match self.current() {
            Some(master) if self.is_usable() => Ok(master),
            _ => Err(StoreError::unavailable(Unavailable::NoMaster(
                self.reason(),
            ))),
        }
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
        self.failures_in_a_row.store(0, Ordering::Release);
        self.mark_usable();
    }

    pub fn mark_usable(&self) {
        self.usable.store(true, Ordering::Release);
    }

    /// Records that a decision on `master` failed. A sign that it is no master any more
    /// (`READONLY`), or the [`FAILURES_IN_A_ROW`]th failure without a success between,
    /// makes the slot unusable and rings discovery; only the first such report for the
    /// current master does, so a stampede of failing requests rings it once, and this
    /// returns whether this report was that one. A lesser failure only rings discovery,
    /// which looks again without taking the master away.
    pub fn report_failure(&self, master: &Arc<Master>, error: &StoreError) -> bool {
        let is_current = self
            .current
            .load()
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, master));
        if !is_current {
            return false;
        }
        let in_a_row = self.failures_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
        if matches!(error, StoreError::MasterChanged { .. }) || in_a_row >= FAILURES_IN_A_ROW {
            return self.mark_unusable(format!("master {} failed: {error}", master.addr));
        }
        self.ring();
        false
    }

    /// Records that a decision succeeded, which ends a run of failures.
    pub fn report_success(&self) {
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Release);
        }
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

    /// Wakes discovery now instead of at its next poll.
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
