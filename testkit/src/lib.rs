//! What the service's tests start, in one place: every suite under `tests/` depends on this
//! crate (a dev-dependency of the root package) and starts its own topology with it, on
//! free loopback ports, in temporary folders. Everything a test starts stops when its value
//! drops; when the test failed, the processes print the end of their logs first.
//!
//! The Redis and Nginx processes run from the shipped configuration (`redis/`, `nginx/`),
//! rendered by `scripts/render-config.sh` as `scripts/cluster.sh` and Compose render it,
//! with only ports, folders and timings of the harness's own.
//!
//! # Layout
//!
//! - `machine`: free ports, key prefixes no other test uses, waiting on a condition,
//!   signals, a process's CPU time, the tools a suite needs and the repository's files;
//! - `redis_node`: one `redis-server` or `redis-sentinel` ([`RedisProcess`]), the shipped
//!   users (`redis/users.acl`) on every data node, and the passwords of the harness;
//! - `sentinel`: a Sentinel group of 1 master, 2 replicas and 3 sentinels
//!   ([`SentinelCluster`]);
//! - `redis_cluster`: a Redis Cluster of 3 masters and 3 replicas ([`RedisCluster`]);
//! - `nginx`: Nginx from `nginx/nginx.conf.template` ([`NginxProcess`]);
//! - `prometheus`: Prometheus from `observability/prometheus.yml` with the shipped rules,
//!   scraping the instances a test names, and its HTTP API ([`PrometheusProcess`]);
//! - `app`: the service in this process on its own thread ([`TestApp`]), or its binary
//!   in a child process ([`service_command`]);
//! - `upstream`: the demo upstream behind the gateway, in this process ([`TestUpstream`]);
//! - `policy_file`: policy files in temporary folders ([`PolicyFile`]);
//! - `http`: clients with timeouts, the requests several suites make the same way, and
//!   reading `/metrics` ([`metric`] is `None` for an absent series, [`counter`] requires
//!   the family);
//! - `rls`: Envoy's side of the rate-limit service: a tonic client, its messages, and rule
//!   files (`RLS_CONFIG`) in temporary folders ([`RlsClient`]);
//! - `traffic`: many clients sending HTTP requests or `ShouldRateLimit` calls steadily
//!   until told to stop ([`Traffic`]), and what each met ([`Record`], [`Call`]).

mod app;
mod http;
mod machine;
mod nginx;
mod policy_file;
mod prometheus;
mod redis_cluster;
mod redis_node;
mod rls;
mod sentinel;
mod traffic;
mod upstream;

pub use app::{TestApp, service_command, wait_for_exit};
/// What the demo upstream counted, as its `/__upstream/count` answers it.
pub use demo_upstream::Counts as UpstreamCounts;
pub use http::{
    admitted, all_at_once, client, client_from, counter, header, json_of, legacy_headers, metric,
    metrics, passes, raw_get, socket_request, until_redis_decides,
};
pub use machine::{cpu_us, free_port, repo_path, require, send_signal, unique_prefix, wait_until};
pub use nginx::{NginxProcess, NginxSettings, PROXY_ADDR};
pub use policy_file::PolicyFile;
pub use prometheus::{LoadedRule, PrometheusProcess};
pub use redis_cluster::RedisCluster;
pub use redis_node::{
    PASSWORD, RedisProcess, SENTINEL_AUTH_PASSWORD, SENTINEL_PASSWORD, SENTINEL_SERVICE_PASSWORD,
    SERVICE_PASSWORD, SERVICE_USER,
};
pub use rls::{RlsClient, RlsFiles, descriptor, rls_channel, rls_request, statuses};
pub use sentinel::SentinelCluster;
pub use traffic::{Call, Origin, Record, Traffic};
pub use upstream::TestUpstream;
