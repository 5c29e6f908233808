//! [`ClusterWatch`]: what Cluster mode keeps doing in the background, as
//! [`discovery`](crate::store::redis::discovery) does in Sentinel mode: announcing this
//! instance in the [`InstanceRegistry`] (the local fallback's divisor) and following which
//! nodes are the masters (logged and exported when they change) and how many slots they
//! serve. The client itself follows the slot map for decisions; this only reports it.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tokio::sync::oneshot;

use super::slots::{slot_masters, slots_served};
use crate::metrics::Metrics;
use crate::store::redis::registry::InstanceRegistry;

/// How often the watch announces this instance and reads the slot map: well within the
/// registry's 5 s, so a live instance is always counted.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The task [`ClusterWatch::start`] started; dropping it stops the task.
pub struct ClusterWatch {
    task: tokio::task::JoinHandle<()>,
}

impl ClusterWatch {
    /// Starts following the cluster `client` reaches, on this thread's runtime: every
    /// [`WATCH_EVERY`], announce this instance in `registry` and read which nodes are
    /// masters; `timeout` bounds each step. The returned receiver resolves after the first
    /// round.
    pub fn start(
        client: ClusterClient,
        timeout: Duration,
        metrics: Metrics,
        registry: Arc<InstanceRegistry>,
    ) -> (Self, oneshot::Receiver<()>) {
        let mut watcher = Watcher {
            client,
            timeout,
            metrics,
            registry,
            conn: None,
            masters: Vec::new(),
        };
        let (first_round, first_round_done) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut first_round = Some(first_round);
            loop {
                watcher.round().await;
                if let Some(done) = first_round.take() {
                    // Nobody waiting for the first round is not an error.
                    let _ = done.send(());
                }
                tokio::time::sleep(WATCH_EVERY).await;
            }
        });
        (ClusterWatch { task }, first_round_done)
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the watch's task holds from one round to the next.
struct Watcher {
    client: ClusterClient,
    timeout: Duration,
    metrics: Metrics,
    registry: Arc<InstanceRegistry>,
    /// The watch's own connection, opened in the first round that can.
    conn: Option<ClusterConnection>,
    /// The masters the last round saw.
    masters: Vec<String>,
}

impl Watcher {
    /// One round: open the connection if there is none yet, announce this instance, and
    /// compare the masters `CLUSTER SLOTS` names with the last round's.
    async fn round(&mut self) {
        if self.conn.is_none() {
            let opened = tokio::time::timeout(self.timeout, self.client.get_async_connection());
            match opened.await {
                Ok(Ok(opened)) => self.conn = Some(opened),
                Ok(Err(err)) => log::debug!("cannot reach the Redis Cluster: {err}"),
                Err(_) => log::debug!("cannot reach the Redis Cluster in time"),
            }
        }
        let Some(conn) = &mut self.conn else {
            // No node answers: no slot is served, as far as this instance can tell.
            self.metrics.cluster_slots_served(0);
            return;
        };
        let announce = self.registry.announce_async(conn);
        let _ = tokio::time::timeout(self.timeout, announce).await;
        let mut info = redis::cmd("CLUSTER");
        info.arg("INFO");
        let info = info.query_async::<String>(conn);
        let served = match tokio::time::timeout(self.timeout, info).await {
            Ok(Ok(info)) => slots_served(&info),
            _ => 0,
        };
        self.metrics.cluster_slots_served(served);
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
        if now == self.masters {
            return;
        }
        let added = now
            .iter()
            .filter(|addr| !self.masters.contains(addr))
            .count();
        if self.masters.is_empty() {
            log::info!("Redis Cluster masters are {}", now.join(", "));
        } else {
            log::warn!(
                "Redis Cluster masters changed from {} to {}",
                self.masters.join(", "),
                now.join(", ")
            );
        }
        self.metrics.cluster_masters(&now, added as u64);
        self.masters = now;
    }
}
