//! `docker/compose.yaml` run for real: the file users run, with the images
//! `scripts/docker-images.sh` builds on this machine (no registry is needed), containers
//! killed and cut off their network under traffic. Requests go through Nginx, except
//! those showing that an instance reached directly ignores a client's X-Forwarded-For.
//!
//! The tests that start containers are ignored unless asked for: `scripts/test.sh` runs
//! them with `--ignored` when a Docker engine answers (and fails without one in CI or
//! with REQUIRE_DOCKER=1). By hand:
//!
//! ```sh
//! cargo test --test compose -- --ignored --nocapture
//! ```
//!
//! COMPOSE_IMAGES=keep uses the images as they are, COMPOSE_IMAGES=no-cargo builds the app
//! image from the release binaries as they are. Each stack is a Compose project of its
//! own (`ratelimiter-e2e`, `ratelimiter-e2e-cluster`, after `COMPOSE_PROJECT_NAME-` when
//! that is set, so that two runs share a Docker host) with host ports Docker picks, so
//! nothing on this host is in its way; traffic goes only to its containers.
//!
//! # Layout
//! - `process`: commands run within a bound, killed and named when they hang;
//! - `stack`: the images, a Compose project up with its own passwords and settings, its
//!   containers by their labels; down with `-v` on `Drop` or Ctrl-C, whatever happened;
//! - `clients`: clients at addresses of their own (containers running curl), the stream of
//!   requests under faults, and the verdicts on what they saw;
//! - `secrets`: no password from the repository;
//! - `sentinel`: the default topology and its `gateway` and `observability` profiles, in
//!   steps: `access` (who may talk to what), `limits`, `faults` (kill and partition of the
//!   master), `gateway`, `observability` (Prometheus);
//! - `redis_cluster`: the profile `redis-cluster`.
//!
//! # What is checked, and where
//! | check | where |
//! |---|---|
//! | six random passwords, in a file only its owner reads | `secrets::compose_secrets_writes_…` |
//! | without any one password Compose refuses to start, naming it | `secrets::compose_refuses_to_start_…` |
//! | every container healthy, both instances ready, Nginx off the Redis network | `sentinel::Topology::up` |
//! | every container's log rotated (json-file, 3 × 10m) | `every_log_is_rotated`, both stacks |
//! | NOAUTH from sentinels and data nodes; the instances' sentinel user refused SENTINEL MONITOR, SET, FAILOVER, REMOVE; their Redis user refused all but its keys; Nginx neither resolves nor reaches Redis | `sentinel::access` |
//! | exact limits from both instances, per client; X-Forwarded-For believed from Nginx only | `sentinel::limits` |
//! | `docker kill` and partition of the master under traffic: no 5xx, NOREPLICAS, promotion, exact again, rejoin | `sentinel::faults` |
//! | the profile `observability`: both instances up as Prometheus's targets, every shipped rule evaluated without error, `ratelimit_ready` 1 for each | `sentinel::observability` |
//! | the gateway: exact count upstream, the 429 problem, claimed headers, unlimited paths, internal routes; 503 with no instance | `sentinel::gateway` |
//! | Cluster mode: Nginx neither resolves nor reaches a node; exact per master with EVALSHA, `docker kill` of a master under traffic, promotion, rejoin | `redis_cluster` |

mod clients;
mod process;
mod redis_cluster;
mod secrets;
mod sentinel;
mod stack;

use std::future::Future;
use std::time::{Duration, Instant};

/// Each client may make RATE_LIMIT requests per TIME_WINDOW seconds; no token comes back
/// during a client's burst (one every 6 s).
pub const RATE_LIMIT: usize = 10;
pub const TIME_WINDOW: u64 = 60;
// The stacks' settings say so in text (`Spec::settings`).
const _: () = assert!(RATE_LIMIT == 10 && TIME_WINDOW == 60);

/// Runs `check` every half second until it holds; panics naming `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every container keeps its output in rotated files (json-file, at most 3 × 10 MB).
pub fn every_log_is_rotated(stack: &stack::Stack) {
    let format = r#"{{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config "max-size"}} {{index .HostConfig.LogConfig.Config "max-file"}}"#;
    let containers = stack.containers();
    for id in &containers {
        let rotation = process::docker_ok(&["inspect", "--format", format, id]);
        assert_eq!(
            rotation, "json-file 10m 3",
            "container {id} keeps its log unrotated"
        );
    }
    eprintln!(
        "  ok: the logs of {} containers are rotated (json-file, 3 × 10m)",
        containers.len()
    );
}

/// An HTTP client with a timeout, for the published ports.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client")
}

/// GET `url` answers 200.
pub async fn answers_200(http: &reqwest::Client, url: &str) -> bool {
    http.get(url)
        .send()
        .await
        .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
}

/// Prints each step of a long test as it starts, and how long each took at the end.
pub struct Steps {
    started: Instant,
    current: Option<(&'static str, Instant)>,
    done: Vec<(&'static str, f64)>,
}

impl Steps {
    /// Starts the first step.
    pub fn first(name: &'static str) -> Self {
        eprintln!("== {name}");
        let now = Instant::now();
        Steps {
            started: now,
            current: Some((name, now)),
            done: Vec::new(),
        }
    }

    pub fn step(&mut self, name: &'static str) {
        self.finish();
        eprintln!("== {name}");
        self.current = Some((name, Instant::now()));
    }

    fn finish(&mut self) {
        if let Some((name, started)) = self.current.take() {
            self.done.push((name, started.elapsed().as_secs_f64()));
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        self.finish();
        if !std::thread::panicking() {
            for (name, seconds) in &self.done {
                eprintln!("  {name:<56} {seconds:6.1}s");
            }
            eprintln!(
                "  {:<56} {:6.1}s",
                "total",
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}
