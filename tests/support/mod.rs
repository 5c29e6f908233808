//! The test harness, shared by every test binary (each includes it with
//! `#[path = "…/support/mod.rs"] mod support;`, so each compiles it anew and uses a part):
//!
//! - `redis_nodes`: real `redis-server` and `redis-sentinel` processes on free ports in
//!   temporary folders, stopped on `Drop`;
//! - `redis_cluster`: six of those nodes made one Redis Cluster (3 masters, 3 replicas);
//! - `app`: the service itself, on its own thread on port 0 (`TestApp`) or as the real
//!   binary in a child process;
//! - `http`: clients with timeouts, and the requests several suites make the same way;
//! - `policy_file`: policy files in temporary folders;
//! - `rls`: a tonic client of the rate-limit service, its messages, and rule files
//!   (`RLS_CONFIG`) in temporary folders;
//! - `nginx`: Nginx from the shipped template, rendered by `scripts/render-config.sh`, on
//!   free ports;
//! - `upstream`: the demo upstream behind the gateway, on its own thread on port 0.
#![allow(dead_code)]

mod app;
mod http;
mod nginx;
mod policy_file;
mod redis_cluster;
mod redis_nodes;
mod rls;
mod upstream;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

// Each binary uses a part of the harness; what it leaves is not a mistake.
#[allow(unused_imports)]
pub use app::{TestApp, service_command, wait_for_exit};
#[allow(unused_imports)]
pub use http::{
    all_at_once, client, client_from, counter, header, metric, metrics, passes, raw_get,
    until_redis_decides,
};
#[allow(unused_imports)]
pub use nginx::{NginxProcess, NginxSettings, PROXY_ADDR};
#[allow(unused_imports)]
pub use policy_file::PolicyFile;
#[allow(unused_imports)]
pub use redis_cluster::{RedisCluster, SLOTS, cluster_info};
#[allow(unused_imports)]
pub use redis_nodes::{
    DATA_NODE_ARGS, PASSWORD, RedisProcess, SENTINEL_AUTH_PASSWORD, SENTINEL_PASSWORD,
    SERVICE_PASSWORD, SERVICE_USER, SentinelCluster,
};
#[allow(unused_imports)]
pub use rls::{RlsClient, RlsFiles, descriptor, rls_channel, rls_request, statuses};
#[allow(unused_imports)]
pub use upstream::TestUpstream;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free port on 127.0.0.1")
}

/// A key prefix no other test uses, so tests never share buckets and never need a flush.
pub fn unique_prefix(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}-{test}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `ready` every 20 ms until it holds or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -SIGNAL pid`; panics if `kill` fails.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Panics, naming the Debian package to install, unless `binary` is on the PATH.
pub fn require(binary: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "{binary} is not installed: run `apt-get install -y {package}` (or `bash .ci/run`, which installs it)"
    );
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}
