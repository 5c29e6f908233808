//! End-to-end tests of the native cluster (`scripts/cluster.sh`): two instances sharing
//! buckets in Redis behind Nginx, with Sentinel keeping a master elected; and, in
//! [`redis_cluster`], the same topology on a Redis Cluster instead.
//!
//! Ignored by a plain `cargo test`, since they need that cluster running:
//! `scripts/e2e-cluster.sh` brings it up, runs them with `--ignored` and `E2E_CLUSTER_URL`
//! naming its Nginx (e.g. `http://127.0.0.1:8000`), and brings it down. Run without
//! `E2E_CLUSTER_URL`, or with nothing answering there, each of them fails and says so.
//! Other variables, all optional:
//! - `E2E_APP_URL`: one instance, reached directly (default `http://127.0.0.1:8001`);
//! - `E2E_GATEWAY_URL`: the gateway (default `http://127.0.0.1:8080`), in front of the demo
//!   upstream (`scripts/cluster.sh up --gateway`), whose counts `E2E_UPSTREAM_COUNT_URL`
//!   serves (default `http://127.0.0.1:8082`);
//! - `BURST` or else `RATE_LIMIT`: the bucket size the cluster was started with (default 10);
//! - `E2E_CLUSTER_SCRIPT`: what `failover` runs (default `scripts/cluster.sh` of this crate);
//!   it inherits `CLUSTER_DIR` and the passwords.
//!
//! Every client is a distinct source address on loopback, `127.R.T.H`: `R` is drawn once per
//! run (so a rerun against the same cluster finds fresh buckets), `T` is the test's own
//! number (so tests never share a bucket), `H` the client within the test. The failover test
//! runs alone: the others wait for it, and it waits for them.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{Client, Response, StatusCode, Url};

#[path = "e2e_cluster/redis_cluster.rs"]
mod redis_cluster;

use testkit::{client_from, header};

const LIMITED: &str = "/limited_endpoint";

/// Held shared by every test and exclusively by the failover test, which would otherwise
/// make the others' requests fall back to local buckets mid-count.
static GATE: RwLock<()> = RwLock::new(());

#[derive(Clone)]
struct Cluster {
    /// Nginx.
    url: Url,
    /// One instance, bypassing Nginx.
    app_url: Url,
    /// The gateway.
    gateway_url: Url,
    /// The demo upstream's counts.
    count_url: Url,
    /// Requests a fresh client is admitted before its first 429.
    capacity: usize,
}

impl Cluster {
    fn from_env() -> Self {
        let url = std::env::var("E2E_CLUSTER_URL").unwrap_or_else(|_| {
            panic!(
                "E2E_CLUSTER_URL is not set: these tests need the native cluster running; \
                 scripts/e2e-cluster.sh starts one, sets it and runs them"
            )
        });
        let var = |name: &str, default: &str| {
            let value = std::env::var(name).unwrap_or_else(|_| default.into());
            loopback_url(name, &value)
        };
        let app_url = var("E2E_APP_URL", "http://127.0.0.1:8001");
        let gateway_url = var("E2E_GATEWAY_URL", "http://127.0.0.1:8080");
        let count_url = var("E2E_UPSTREAM_COUNT_URL", "http://127.0.0.1:8082");
        let capacity = ["BURST", "RATE_LIMIT"]
            .iter()
            .find_map(|name| std::env::var(name).ok())
            .map(|value| value.parse().expect("BURST / RATE_LIMIT must be a number"))
            .unwrap_or(10);
        Self {
            url: loopback_url("E2E_CLUSTER_URL", &url),
            app_url,
            gateway_url,
            count_url,
            capacity,
        }
    }

    /// Fails, naming what is missing, unless Nginx and the instance both answer.
    async fn assert_running(&self) {
        let client = testkit::client();
        for (name, url) in [
            ("E2E_CLUSTER_URL", &self.url),
            ("E2E_APP_URL", &self.app_url),
            ("E2E_UPSTREAM_COUNT_URL", &self.count_url),
        ] {
            if let Err(e) = client.get(url.clone()).send().await {
                panic!(
                    "no cluster answers at {name}={url} ({e}): start it with scripts/e2e-cluster.sh, which runs these tests against it"
                );
            }
        }
    }
}

/// These tests only ever talk to this machine.
fn loopback_url(name: &str, value: &str) -> Url {
    let url = Url::parse(value).unwrap_or_else(|e| panic!("{name}={value}: {e}"));
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    assert!(
        loopback,
        "{name}={value}: only loopback addresses are test targets"
    );
    url
}

fn shared<F: Future<Output = ()>>(scenario: impl FnOnce(Cluster) -> F) {
    let cluster = Cluster::from_env();
    let _gate = GATE.read().unwrap_or_else(PoisonError::into_inner);
    runtime().block_on(async {
        cluster.assert_running().await;
        scenario(cluster).await;
    });
}

fn exclusive<F: Future<Output = ()>>(scenario: impl FnOnce(Cluster) -> F) {
    let cluster = Cluster::from_env();
    let _gate = GATE.write().unwrap_or_else(PoisonError::into_inner);
    runtime().block_on(async {
        cluster.assert_running().await;
        scenario(cluster).await;
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The second octet of every client address of this run, in 1..=254.
fn run_octet() -> u8 {
    static OCTET: OnceLock<u8> = OnceLock::new();
    *OCTET.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mixed = nanos ^ std::process::id().wrapping_mul(2_654_435_761);
        (mixed % 254) as u8 + 1
    })
}

/// Client `host` (1..=254) of test number `test`.
fn address(test: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, run_octet(), test, host))
}

/// What the tests look at in one answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// `X-Instance`; empty when absent.
    instance: String,
    /// `X-RateLimit-Source`; empty when absent.
    source: String,
}

impl Answer {
    fn of(response: &Response) -> Self {
        Self {
            status: response.status().as_u16(),
            instance: header(response, "x-instance"),
            source: header(response, "x-ratelimit-source"),
        }
    }
}

async fn get(client: &Client, base: &Url, path: &str) -> Response {
    let url = base.join(path).expect("a valid path");
    client
        .get(url.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// `count` requests, one after the other, from one client.
async fn burst(client: &Client, base: &Url, count: usize) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(count);
    for _ in 0..count {
        answers.push(Answer::of(&get(client, base, LIMITED).await));
    }
    answers
}

fn statuses(answers: &[Answer]) -> Vec<u16> {
    answers.iter().map(|a| a.status).collect()
}

/// Exactly `capacity` admitted, then only denials.
fn assert_exactly_admitted(capacity: usize, answers: &[Answer], who: &str) {
    let expected: Vec<u16> = (0..answers.len())
        .map(|i| if i < capacity { 200 } else { 429 })
        .collect();
    assert_eq!(
        statuses(answers),
        expected,
        "{who}: expected {capacity} × 200 then 429s; answers: {answers:#?}"
    );
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn one_client_is_admitted_exactly_the_limit_across_both_instances() {
    shared(|cluster| async move {
        // Arrange
        let client = client_from(address(1, 1));

        // Act
        let answers = burst(&client, &cluster.url, cluster.capacity + 4).await;

        // Assert
        assert_exactly_admitted(cluster.capacity, &answers, "one client through Nginx");
        let instances: BTreeSet<_> = answers
            .iter()
            .map(|a| a.instance.as_str())
            .filter(|instance| !instance.is_empty())
            .collect();
        assert!(
            instances.len() >= 2,
            "Nginx should spread one client's requests over both instances; saw {instances:?}"
        );
        assert!(
            answers.iter().all(|a| a.source == "redis"),
            "every decision should come from the shared store: {answers:#?}"
        );
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn a_denial_is_a_problem_json_429_with_retry_after_and_ratelimit_headers() {
    shared(|cluster| async move {
        // Arrange
        let client = client_from(address(2, 1));
        let admitted = burst(&client, &cluster.url, cluster.capacity).await;
        assert_exactly_admitted(cluster.capacity, &admitted, "the client being exhausted");

        // Act
        let denied = get(&client, &cluster.url, LIMITED).await;

        // Assert
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
        let content_type = header(&denied, "content-type");
        assert!(
            content_type.starts_with("application/problem+json"),
            "Content-Type of a 429: {content_type:?}"
        );
        let retry_after = header(&denied, "retry-after");
        assert!(!retry_after.is_empty(), "a 429 carries Retry-After");
        let retry_after: u64 = retry_after
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After should be whole seconds: {retry_after:?}"));
        assert!(retry_after >= 1, "Retry-After: {retry_after}");
        for name in ["ratelimit-policy", "ratelimit"] {
            assert!(!header(&denied, name).is_empty(), "a 429 carries {name}");
        }
        let body = denied.text().await.expect("a body");
        let problem: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("the 429 body should be JSON ({e}): {body}"));
        assert!(
            problem.is_object(),
            "a problem document is an object: {body}"
        );
        if let Some(status) = problem.get("status") {
            assert_eq!(status, 429, "the problem's status: {body}");
        }
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn distinct_client_addresses_get_their_own_buckets() {
    shared(|cluster| async move {
        // Arrange
        let count = cluster.capacity + 2;

        // Act: four clients at once, so their requests interleave at both instances.
        let clients: Vec<_> = (1..=4)
            .map(|host| {
                let url = cluster.url.clone();
                tokio::spawn(
                    async move { burst(&client_from(address(3, host)), &url, count).await },
                )
            })
            .collect();

        // Assert
        for (i, client) in clients.into_iter().enumerate() {
            let answers = client.await.expect("a client task");
            assert_exactly_admitted(cluster.capacity, &answers, &format!("client {}", i + 1));
        }
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn forwarded_headers_sent_through_nginx_do_not_change_the_identity() {
    shared(|cluster| async move {
        // Arrange: every request claims to come from somewhere else.
        let client = client_from(address(4, 1));
        let mut answers = Vec::new();

        // Act
        for i in 0..cluster.capacity + 3 {
            let spoofed = format!("203.0.113.{}", i + 1);
            let response = client
                .get(cluster.url.join(LIMITED).unwrap())
                .header("X-Forwarded-For", &spoofed)
                .header("X-Real-IP", &spoofed)
                .header("Forwarded", format!("for={spoofed}"))
                .send()
                .await
                .expect("a response");
            answers.push(Answer::of(&response));
        }

        // Assert: one bucket, the client's real address.
        assert_exactly_admitted(
            cluster.capacity,
            &answers,
            "a client spoofing X-Forwarded-For",
        );
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn forwarded_headers_sent_straight_to_an_instance_are_not_believed() {
    shared(|cluster| async move {
        // Arrange: 127.0.0.1 is not a trusted proxy (only Nginx's 127.0.0.2 is). Its bucket
        // may have been used before, so this only relies on there being one bucket.
        let client = client_from(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let mut answers = Vec::new();

        // Act
        for i in 0..cluster.capacity + 1 {
            let spoofed = format!("198.51.100.{}", u8::try_from(i % 250).unwrap() + 1);
            let response = client
                .get(cluster.app_url.join(LIMITED).unwrap())
                .header("X-Forwarded-For", &spoofed)
                .header("X-Real-IP", &spoofed)
                .header("Forwarded", format!("for={spoofed}"))
                .send()
                .await
                .expect("a response");
            answers.push(Answer::of(&response));
        }

        // Assert: had each spoofed address its own bucket, all would be admitted.
        let admitted = answers.iter().filter(|a| a.status == 200).count();
        assert!(
            admitted <= cluster.capacity && answers.iter().any(|a| a.status == 429),
            "direct requests with spoofed headers should share 127.0.0.1's bucket: {answers:#?}"
        );
        assert!(
            answers.iter().all(|a| a.status == 200 || a.status == 429),
            "{answers:#?}"
        );
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn an_oversized_header_is_refused_by_nginx_with_a_4xx() {
    shared(|cluster| async move {
        // Arrange: larger than one of Nginx's 8 KiB large_client_header_buffers.
        let client = client_from(address(5, 1));
        let huge = "a".repeat(16 * 1024);

        // Act
        let response = client
            .get(cluster.url.join(LIMITED).unwrap())
            .header("X-Padding", huge)
            .send()
            .await
            .expect("Nginx answers rather than resetting the connection");

        // Assert
        let status = response.status();
        assert!(status.is_client_error(), "status {status}");
        assert_eq!(
            header(&response, "x-instance"),
            "",
            "Nginx itself should answer, not an instance"
        );
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn a_failover_mid_traffic_causes_no_5xx_and_then_the_limit_is_shared_again() {
    exclusive(|cluster| async move {
        // Arrange: steady traffic from a dozen clients.
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let traffic: Vec<_> = (1..=12)
            .map(|host| {
                tokio::spawn(keep_sending(
                    client_from(address(6, host)),
                    cluster.url.clone(),
                    Arc::clone(&stop),
                    Arc::clone(&sent),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Act
        let started = Instant::now();
        run_cluster_script("failover").await;
        let failover_took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        let mut sources = BTreeMap::new();
        for task in traffic {
            let seen = task.await.expect("a traffic task");
            failures.extend(seen.failures);
            for (source, count) in seen.sources {
                *sources.entry(source).or_insert(0) += count;
            }
        }

        // Assert
        let sent = sent.load(Ordering::Relaxed);
        eprintln!(
            "failover took {failover_took:.1?}; {sent} requests meanwhile, decided by {sources:?}"
        );
        assert!(sent > 0, "no traffic was sent during the failover");
        assert!(
            failures.is_empty(),
            "{} of {sent} requests failed during the failover: {failures:#?}",
            failures.len()
        );
        let converging = Instant::now();
        wait_until_both_instances_decide_in_redis(&cluster, 7).await;
        eprintln!(
            "both instances decide in Redis again {:.1?} later",
            converging.elapsed()
        );
        let fresh = client_from(address(8, 1));
        let answers = burst(&fresh, &cluster.url, cluster.capacity + 3).await;
        assert_exactly_admitted(
            cluster.capacity,
            &answers,
            "a fresh client after the failover",
        );
    });
}

/// What one client saw while it kept sending.
#[derive(Default)]
struct Traffic {
    /// Every 5xx and transport error.
    failures: Vec<String>,
    /// Answers by `X-RateLimit-Source`.
    sources: BTreeMap<String, u64>,
    /// The longest wait for an answer.
    slowest: Duration,
}

/// Sends until told to stop (or for at most 60 s and 20 000 requests).
async fn keep_sending(
    client: Client,
    base: Url,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Traffic {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Traffic::default();
    for i in 0..20_000_u32 {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        let path = if i % 4 == 3 { "/" } else { LIMITED };
        let url = base.join(path).unwrap();
        let asked = Instant::now();
        let answer = client.get(url.clone()).send().await;
        seen.slowest = seen.slowest.max(asked.elapsed());
        match answer {
            Ok(response) => {
                let answer = Answer::of(&response);
                if !answer.source.is_empty() {
                    *seen.sources.entry(answer.source.clone()).or_insert(0) += 1;
                }
                if response.status().is_server_error() {
                    let body = response.text().await.unwrap_or_default();
                    seen.failures.push(format!("GET {url}: {answer:?} {body}"));
                }
            }
            Err(e) => seen.failures.push(format!("GET {url}: {e}")),
        }
        sent.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// After a failover an instance may still hold connections to the old master for a while
/// (and then decide locally): wait, at most 30 s, until ten answers in a row, from both
/// instances, came from Redis. Each probe is a new client of test number `test`.
async fn wait_until_both_instances_decide_in_redis(cluster: &Cluster, test: u8) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streak: Vec<Answer> = Vec::new();
    for host in (1..=254).cycle() {
        let answer =
            Answer::of(&get(&client_from(address(test, host)), &cluster.url, LIMITED).await);
        if answer.source == "redis" {
            streak.push(answer);
        } else {
            streak.clear();
        }
        let instances: BTreeSet<_> = streak
            .iter()
            .map(|a| a.instance.as_str())
            .filter(|instance| !instance.is_empty())
            .collect();
        if streak.len() >= 10 && instances.len() >= 2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after the failover, the instances still do not all decide in Redis; last answer: {:?}",
            streak.last()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `scripts/cluster.sh COMMAND` (or `$E2E_CLUSTER_SCRIPT`), at most 60 s.
async fn run_cluster_script(command: &str) {
    let script = std::env::var_os("E2E_CLUSTER_SCRIPT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"),
        PathBuf::from,
    );
    let run = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(command)
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("{} {command} took over 60 s", script.display()))
        .unwrap_or_else(|e| panic!("{} {command}: {e}", script.display()));
    assert!(status.success(), "{} {command}: {status}", script.display());
}

/// What has reached the demo upstream behind the gateway from `client`.
async fn upstream_count_of(cluster: &Cluster, client: IpAddr) -> u64 {
    let url = cluster.count_url.join("/__upstream/count").unwrap();
    let counts: serde_json::Value = testkit::client()
        .get(url.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e} (was the cluster started with --gateway?)"))
        .json()
        .await
        .expect("the counts are JSON");
    counts["clients"][client.to_string()].as_u64().unwrap_or(0)
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn through_the_gateway_a_client_reaches_the_upstream_exactly_the_limit_then_gets_429s() {
    shared(|cluster| async move {
        // Arrange
        let address = address(9, 1);
        let client = client_from(address);

        // Act
        let mut admitted = Vec::new();
        for _ in 0..cluster.capacity {
            admitted.push(get(&client, &cluster.gateway_url, LIMITED).await);
        }
        let denied = get(&client, &cluster.gateway_url, LIMITED).await;

        // Assert
        for (i, response) in admitted.iter().enumerate() {
            assert_eq!(response.status(), 200, "request {}", i + 1);
            let state = header(response, "ratelimit");
            let remaining = format!("\"default\";r={};t=", cluster.capacity - 1 - i);
            assert!(state.starts_with(&remaining), "RateLimit: {state:?}");
            assert!(!header(response, "ratelimit-policy").is_empty());
            assert_eq!(header(response, "x-instance"), "", "the upstream answered");
        }
        assert_eq!(
            upstream_count_of(&cluster, address).await,
            cluster.capacity as u64,
            "what reached the upstream"
        );
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&denied, "content-type"), "application/problem+json");
        let retry_after: u64 = header(&denied, "retry-after").parse().expect("seconds");
        assert!(retry_after >= 1);
        assert_eq!(
            header(&denied, "ratelimit"),
            format!("\"default\";r=0;t={retry_after}")
        );
        assert!(!header(&denied, "ratelimit-policy").is_empty());
        assert_eq!(header(&denied, "x-ratelimit-source"), "redis");
        let body: serde_json::Value = denied.json().await.expect("a JSON body");
        assert_eq!(
            body["type"],
            "https://iana.org/assignments/http-problem-types#quota-exceeded"
        );
        assert_eq!(body["status"], 429);
        assert_eq!(body["violated-policies"], serde_json::json!(["default"]));
        assert!(body["retry_after_ms"].as_u64().is_some_and(|ms| ms >= 1));
        assert_eq!(
            upstream_count_of(&cluster, address).await,
            cluster.capacity as u64,
            "a denied request never reaches the upstream"
        );
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn spoofed_forwarding_headers_through_the_gateway_change_nothing() {
    shared(|cluster| async move {
        // Arrange
        let address = address(10, 1);
        let client = client_from(address);
        let mut answers = Vec::new();

        // Act
        for i in 0..cluster.capacity + 2 {
            let spoofed = format!("203.0.113.{}", i + 1);
            let response = client
                .get(cluster.gateway_url.join(LIMITED).unwrap())
                .header("X-Forwarded-For", &spoofed)
                .header("X-Real-IP", &spoofed)
                .header("Forwarded", format!("for={spoofed}"))
                .send()
                .await
                .expect("a response");
            answers.push(Answer::of(&response));
        }

        // Assert
        assert_exactly_admitted(
            cluster.capacity,
            &answers,
            "a client spoofing through the gateway",
        );
        assert_eq!(
            upstream_count_of(&cluster, address).await,
            cluster.capacity as u64
        );
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn a_request_no_policy_matches_passes_the_gateway_untouched() {
    shared(|cluster| async move {
        // Arrange: the default policy limits /limited_endpoint only.
        let address = address(11, 1);
        let client = client_from(address);
        let count = cluster.capacity + 3;

        // Act
        let mut answers = Vec::new();
        for _ in 0..count {
            answers.push(get(&client, &cluster.gateway_url, "/any/path/of/yours").await);
        }

        // Assert
        for response in &answers {
            assert_eq!(response.status(), 200);
            for name in ["ratelimit", "ratelimit-policy", "x-ratelimit-source"] {
                assert_eq!(
                    header(response, name),
                    "",
                    "an unlimited answer has no {name}"
                );
            }
        }
        assert_eq!(upstream_count_of(&cluster, address).await, count as u64);
    });
}

/// [`testkit::raw_get`] to the host and port of `url`.
fn raw_get(url: &Url, target: &str) -> (u16, bool) {
    testkit::raw_get(
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap(),
        target,
    )
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn internal_routes_are_not_reachable_through_nginx_and_stay_on_the_instances_ports() {
    shared(|cluster| async move {
        for target in [
            "/ready",
            "/metrics",
            "/v1/policies",
            "/v1/check",
            "//v1/policies",
            "/v1/../metrics",
            "/%761/explain?method=GET&path=/",
            "/./ready",
        ] {
            assert_eq!(
                raw_get(&cluster.url, target),
                (404, false),
                "GET {target} through the public Nginx"
            );
        }
        assert_eq!(
            raw_get(&cluster.gateway_url, "/__ratelimiter/check").0,
            404,
            "the gateway's check location is internal"
        );
        let (_, from_instance) = raw_get(&cluster.gateway_url, "/metrics");
        assert!(!from_instance, "the gateway sends /metrics to the upstream");
        for target in ["/ready", "/metrics", "/v1/policies"] {
            assert_eq!(
                raw_get(&cluster.app_url, target),
                (200, true),
                "GET {target} on an instance's own port"
            );
        }
    });
}

/// The sentinels and data nodes of `scripts/cluster.sh`, on its fixed loopback ports.
const SENTINEL_PORTS: [u16; 3] = [26379, 26380, 26381];
const DATA_PORTS: [u16; 3] = [6379, 6380, 6381];

/// What `args` get from the node on `port` logged in as `login` (`None`: not at all): the
/// reply, or the error text in upper case.
fn redis_reply(
    port: u16,
    login: Option<(&str, &str)>,
    args: &[&str],
) -> Result<redis::Value, String> {
    let mut url = format!("redis://127.0.0.1:{port}");
    if let Some((user, password)) = login {
        url = format!("redis://{user}:{password}@127.0.0.1:{port}");
    }
    let answer = redis::Client::open(url)
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(3)))
        .and_then(|mut conn| {
            let mut cmd = redis::cmd(args[0]);
            for arg in &args[1..] {
                cmd.arg(*arg);
            }
            conn.set_read_timeout(Some(Duration::from_secs(3)))?;
            cmd.query::<redis::Value>(&mut conn)
        });
    answer.map_err(|err| err.to_string().to_uppercase())
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn a_sentinel_refuses_every_unauthenticated_command_while_the_instances_are_ready() {
    shared(|cluster| async move {
        for port in SENTINEL_PORTS {
            for args in [
                &["SENTINEL", "MONITOR", "evil", "127.0.0.1", "1", "2"][..],
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "redis-master"],
                &["PING"],
            ] {
                let reply = redis_reply(port, None, args);
                assert!(
                    reply.as_ref().is_err_and(|e| e.contains("NOAUTH")),
                    "sentinel {port} answered {args:?} without a password: {reply:?}"
                );
            }
        }
        let ready = testkit::client()
            .get(cluster.app_url.join("/ready").unwrap())
            .send()
            .await
            .expect("the instance answers");
        assert_eq!(
            ready.status(),
            StatusCode::OK,
            "the instance, which logs in, is ready"
        );
    });
}

#[test]
#[ignore = "needs the native cluster: run scripts/e2e-cluster.sh"]
fn the_instances_redis_user_may_not_administer_a_data_node_nor_touch_other_keys() {
    shared(|_cluster| async move {
        // scripts/cluster.sh's development default, unless the run set its own.
        let password = std::env::var("REDIS_PASSWORD")
            .unwrap_or_else(|_| "ratelimiter-dev-password".to_string());
        let login = Some(("ratelimiter", password.as_str()));
        for port in DATA_PORTS {
            let pong = redis_reply(port, login, &["PING"]);
            assert!(
                matches!(&pong, Ok(redis::Value::SimpleString(s)) if s == "PONG"),
                "data node {port} refuses the instances' user: {pong:?}"
            );
            for args in [
                &["FLUSHALL"][..],
                &["CONFIG", "SET", "maxmemory", "1"],
                &["REPLICAOF", "127.0.0.1", "1"],
                &["DEL", "elsewhere:x"],
                &["KEYS", "*"],
            ] {
                let reply = redis_reply(port, login, args);
                assert!(
                    reply.as_ref().is_err_and(|e| e.contains("NOPERM")),
                    "data node {port} let the instances' user run {args:?}: {reply:?}"
                );
            }
            let anonymous = redis_reply(port, None, &["PING"]);
            assert!(
                anonymous.as_ref().is_err_and(|e| e.contains("NOAUTH")),
                "data node {port} answers without a password: {anonymous:?}"
            );
        }
    });
}
