//! Nginx through the shipped config: `nginx/nginx.conf.template` rendered by
//! `scripts/render-config.sh` as the native topology renders it, real Nginx in front of
//! two instances sharing a real `redis-server`, and the demo upstream behind it, all on
//! free ports. What reached the upstream is read from the upstream's own counts.
//!
//! This file holds the gateway (the server that asks an instance about every request and
//! sends the admitted ones to the upstream) and the shipped configs' upstream keepalive;
//! `public` holds the public server, which proxies the instances' own API.
//!
//! Clients are loopback addresses of `127.0.1.0/24`: never `127.0.0.2`, the address
//! Nginx reaches the instances from and the only proxy they trust.

mod public;
mod socket;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use reqwest::{Client, Response};
use serde_json::json;

use testkit::{
    NginxProcess, NginxSettings, RedisProcess, TestApp, TestUpstream, client, client_from,
    free_port, header, legacy_headers, unique_prefix,
};

/// The policies every stack runs with, unless a test says otherwise.
const POLICIES: &str = r#"
[[policy]]
name = "endpoint"
match = { path = "/limited_endpoint" }
limits = [{ name = "minute", rate = 4, per = "1m" }]

[[policy]]
name = "api"
match = { path = "/api/**" }
limits = [{ name = "minute", rate = 3, per = "1m" }]

[[policy]]
name = "keyed"
match = { path = "/keyed/**" }
key = ["header:x-api-key"]
limits = [{ name = "minute", rate = 2, per = "1m" }]
"#;

/// Requests a fresh client is admitted on `/api/**`.
const API_LIMIT: usize = 3;
/// Requests a fresh client is admitted on the instances' `/limited_endpoint`.
const ENDPOINT_LIMIT: usize = 4;

/// How long any answer through the gateway may take, however broken what is behind it:
/// the check's timeouts bound it near 2 s; this only catches a hang.
const HANG_BOUND: Duration = Duration::from_secs(10);

/// Client `host` of this binary's clients.
fn address(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, host))
}

/// What a stack is built with.
struct Setup {
    /// Extra settings of both instances.
    vars: Vec<(&'static str, String)>,
    /// `GATEWAY_FAIL_MODE`.
    gateway_fail_mode: &'static str,
    /// What Nginx believes the instances are; `None`: the two started instances.
    instances: Option<[String; 2]>,
    /// Nginx reaches the instances on their Unix sockets (`UNIX_SOCKET`, beside their
    /// ports), and they trust no TCP proxy.
    over_sockets: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            vars: Vec::new(),
            gateway_fail_mode: "closed",
            instances: None,
            over_sockets: false,
        }
    }
}

/// Redis, two instances sharing it, the demo upstream, and Nginx in front of them.
struct Stack {
    nginx: NginxProcess,
    upstream: TestUpstream,
    apps: Vec<TestApp>,
    _redis: RedisProcess,
    /// The policy file, and the instances' sockets.
    files: tempfile::TempDir,
}

impl Stack {
    fn start(setup: Setup) -> Self {
        let redis = RedisProcess::server(None, &[]);
        let files = tempfile::tempdir().expect("temporary folder");
        let policy_file = files.path().join("policies.toml");
        std::fs::write(&policy_file, POLICIES).expect("write the policy file");
        let prefix = unique_prefix("gateway");
        let apps: Vec<TestApp> = ["app-1", "app-2"]
            .into_iter()
            .map(|name| {
                let mut vars = vec![
                    ("REDIS_URL", redis.url()),
                    ("KEY_PREFIX", prefix.clone()),
                    ("POLICY_FILE", policy_file.display().to_string()),
                    ("TRUSTED_PROXIES", testkit::PROXY_ADDR.to_string()),
                    ("INSTANCE_NAME", name.to_string()),
                    ("WORKERS", "1".to_string()),
                ];
                if setup.over_sockets {
                    vars.push(("UNIX_SOCKET", socket_path(&files, name)));
                    vars.push(("TRUSTED_PROXIES", String::new()));
                }
                vars.extend(setup.vars.iter().cloned());
                TestApp::spawn_with(&vars)
            })
            .collect();
        let upstream = TestUpstream::spawn();
        let instances = setup.instances.unwrap_or_else(|| {
            if setup.over_sockets {
                ["app-1", "app-2"].map(|name| format!("unix:{}", socket_path(&files, name)))
            } else {
                [
                    format!("127.0.0.1:{}", apps[0].port),
                    format!("127.0.0.1:{}", apps[1].port),
                ]
            }
        });
        let nginx = NginxProcess::start(&NginxSettings {
            instances,
            upstream: upstream.addr(),
            fail_mode: setup.gateway_fail_mode,
        });
        Self {
            nginx,
            upstream,
            apps,
            _redis: redis,
            files,
        }
    }

    /// The socket instance `name` (`app-1`, `app-2`) listens on, with `over_sockets`.
    fn socket(&self, name: &str) -> std::path::PathBuf {
        socket_path(&self.files, name).into()
    }

    /// GET `path` through the gateway from `client`, within [`HANG_BOUND`].
    async fn get(&self, client: &Client, path: &str) -> Response {
        get_within_hang_bound(client, &self.nginx.gateway(path)).await
    }
}

/// GET `url` from `client`, within [`HANG_BOUND`].
async fn get_within_hang_bound(client: &Client, url: &str) -> Response {
    let started = Instant::now();
    let response = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        started.elapsed() < HANG_BOUND,
        "GET {url} took {:?}",
        started.elapsed()
    );
    response
}

/// Where instance `name` listens with [`Setup::over_sockets`].
fn socket_path(files: &tempfile::TempDir, name: &str) -> String {
    files
        .path()
        .join(format!("{name}.sock"))
        .display()
        .to_string()
}

/// Statuses of `count` requests to `path` in a row.
async fn statuses(stack: &Stack, client: &Client, path: &str, count: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(count);
    for _ in 0..count {
        statuses.push(stack.get(client, path).await.status().as_u16());
    }
    statuses
}

fn admitted_then_denied(admitted: usize, total: usize) -> Vec<u16> {
    (0..total)
        .map(|i| if i < admitted { 200 } else { 429 })
        .collect()
}

#[tokio::test]
async fn a_client_under_a_policy_of_n_reaches_the_upstream_exactly_n_times_then_gets_429s() {
    // Arrange
    let stack = Stack::start(Setup::default());
    let client = client_from(address(1));

    // Act
    let answers = statuses(&stack, &client, "/api/items", API_LIMIT + 2).await;
    let denied = stack.get(&client, "/api/items").await;

    // Assert
    assert_eq!(answers, admitted_then_denied(API_LIMIT, API_LIMIT + 2));
    let counts = stack.upstream.counts().await;
    assert_eq!(counts.client("127.0.1.1"), API_LIMIT as u64, "{counts:?}");
    assert_eq!(header(&denied, "X-RateLimit-Source"), "redis");
    for internal in ["X-RateLimit-Status", "X-RateLimit-Problem", "X-Instance"] {
        assert_eq!(header(&denied, internal), "", "{internal} stays inside");
    }
    assert_quota_exceeded(denied, "api-minute", API_LIMIT, 20).await;
}

/// Asserts that `denied` is the 429 problem of `limit` (`<policy>-<limit>`, `capacity`
/// a minute): its headers, a `Retry-After` of 1 to `most_retry_after` s, and its body.
async fn assert_quota_exceeded(
    denied: Response,
    limit: &str,
    capacity: usize,
    most_retry_after: u64,
) {
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "Content-Type"), "application/problem+json");
    let retry_after: u64 = header(&denied, "Retry-After").parse().expect("seconds");
    assert!(
        (1..=most_retry_after).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(
        header(&denied, "RateLimit-Policy"),
        format!("\"{limit}\";q={capacity};w=60")
    );
    assert_eq!(
        header(&denied, "RateLimit"),
        format!("\"{limit}\";r=0;t={retry_after}")
    );
    let mut body: serde_json::Value = denied.json().await.expect("a JSON body");
    let retry_after_ms = body["retry_after_ms"].take().as_u64().expect("a number");
    assert!(
        (1..=retry_after * 1000).contains(&retry_after_ms),
        "retry_after_ms {retry_after_ms}"
    );
    assert_eq!(
        body,
        json!({
            "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
            "title": "Too Many Requests",
            "status": 429,
            "violated-policies": [limit],
            "retry_after_ms": null,
        })
    );
}

#[tokio::test]
async fn admitted_responses_are_the_upstreams_with_the_draft_headers_added() {
    let stack = Stack::start(Setup::default());
    let client = client_from(address(2));

    for remaining in (0..API_LIMIT).rev() {
        let response = stack.get(&client, "/api/items?page=2").await;

        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "RateLimit-Policy"),
            "\"api-minute\";q=3;w=60"
        );
        assert_eq!(
            header(&response, "RateLimit"),
            format!("\"api-minute\";r={remaining};t=20")
        );
        assert_eq!(header(&response, "X-RateLimit-Source"), "redis");
        assert_eq!(header(&response, "X-RateLimit-Limit"), "", "draft only");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["upstream"], "demo-upstream");
        assert_eq!(body["path"], "/api/items");
    }
}

#[tokio::test]
async fn legacy_headers_reach_the_client_when_the_instances_send_them() {
    let stack = Stack::start(Setup {
        vars: vec![("RATELIMIT_HEADERS", "both".to_string())],
        ..Setup::default()
    });
    let client = client_from(address(3));

    let response = stack.get(&client, "/api/items").await;

    assert_eq!(response.status(), 200);
    assert_eq!(legacy_headers(&response), ["3", "2", "20"]);
    assert_eq!(header(&response, "RateLimit"), "\"api-minute\";r=2;t=20");
}

#[tokio::test]
async fn spoofed_forwarding_headers_through_either_server_change_nothing() {
    let stack = Stack::start(Setup::default());
    let client = client_from(address(4));
    let spoofing = |url: String, i: usize| {
        let spoofed = format!("203.0.113.{}", i + 1);
        client
            .get(url)
            .header("X-Forwarded-For", &spoofed)
            .header("X-Real-IP", &spoofed)
            .header("Forwarded", format!("for={spoofed}"))
            .send()
    };
    let (mut gateway, mut public) = (Vec::new(), Vec::new());

    for i in 0..API_LIMIT + 2 {
        let response = spoofing(stack.nginx.gateway("/api/items"), i)
            .await
            .unwrap();
        gateway.push(response.status().as_u16());
    }
    for i in 0..ENDPOINT_LIMIT + 2 {
        let response = spoofing(stack.nginx.public("/limited_endpoint"), i)
            .await
            .unwrap();
        public.push(response.status().as_u16());
    }

    assert_eq!(gateway, admitted_then_denied(API_LIMIT, API_LIMIT + 2));
    assert_eq!(
        public,
        admitted_then_denied(ENDPOINT_LIMIT, ENDPOINT_LIMIT + 2)
    );
    let counts = stack.upstream.counts().await;
    assert_eq!(counts.client("127.0.1.4"), API_LIMIT as u64, "{counts:?}");
    assert_eq!(
        counts.clients.len(),
        1,
        "the upstream saw one client: {counts:?}"
    );
}

#[tokio::test]
async fn a_policy_keyed_by_an_api_key_limits_each_key_on_its_own() {
    let stack = Stack::start(Setup::default());
    let client = client_from(address(5));
    let send = |key: &'static str| {
        client
            .get(stack.nginx.gateway("/keyed/report"))
            .header("x-api-key", key)
            .send()
    };

    let mut alpha = Vec::new();
    for _ in 0..3 {
        alpha.push(send("alpha").await.unwrap().status().as_u16());
    }
    let beta = send("beta").await.unwrap();

    assert_eq!(alpha, [200, 200, 429]);
    assert_eq!(beta.status(), 200);
    assert_eq!(header(&beta, "RateLimit"), "\"keyed-minute\";r=1;t=30");
    let counts = stack.upstream.counts().await;
    assert_eq!(counts.path("/keyed/report"), 3, "{counts:?}");
}

#[tokio::test]
async fn a_request_no_policy_matches_passes_untouched() {
    let stack = Stack::start(Setup::default());
    let client = client_from(address(6));
    let count = API_LIMIT + 3;

    for _ in 0..count {
        let response = stack.get(&client, "/free/page").await;
        assert_eq!(response.status(), 200);
        for name in ["RateLimit", "RateLimit-Policy", "X-RateLimit-Source"] {
            assert_eq!(
                header(&response, name),
                "",
                "an unlimited answer has no {name}"
            );
        }
    }
    let posted = client
        .post(stack.nginx.gateway("/free/upload"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();

    assert_eq!(posted.status(), 200);
    let body: serde_json::Value = posted.json().await.unwrap();
    assert_eq!(body["method"], "POST");
    let counts = stack.upstream.counts().await;
    assert_eq!(counts.path("/free/page"), count as u64, "{counts:?}");
    assert_eq!(counts.path("/free/upload"), 1, "{counts:?}");
}

#[tokio::test]
async fn a_request_that_cannot_be_judged_is_a_400_problem_and_never_reaches_the_upstream() {
    let stack = Stack::start(Setup::default());
    let client = client_from(address(7));

    let too_long = client
        .get(stack.nginx.gateway("/keyed/report"))
        .header("x-api-key", "k".repeat(300))
        .send()
        .await
        .unwrap();
    let undecodable = stack.get(&client, "/api/%FF").await;

    for (response, named) in [(too_long, "x-api-key"), (undecodable, "X-Original-URI")] {
        assert_eq!(response.status(), 400, "{named}");
        assert_eq!(
            header(&response, "Content-Type"),
            "application/problem+json"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["status"], 400, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains(named),
            "{body} should name {named}"
        );
    }
    assert_eq!(stack.upstream.counts().await.total, 0);
}

#[tokio::test]
async fn a_denial_is_problem_json_whatever_the_paths_extension() {
    let stack = Stack::start(Setup::default());
    let client = client_from(address(8));
    statuses(&stack, &client, "/api/report.html", API_LIMIT).await;

    let denied = stack.get(&client, "/api/report.html").await;

    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "Content-Type"), "application/problem+json");
}

/// Instances whose Redis refuses connections, failing as `fail_mode` says.
fn with_redis_down(fail_mode: &str) -> Setup {
    Setup {
        vars: vec![
            ("REDIS_URL", format!("redis://127.0.0.1:{}", free_port())),
            ("REDIS_TIMEOUT_MS", "50".to_string()),
            ("FAIL_MODE", fail_mode.to_string()),
        ],
        ..Setup::default()
    }
}

/// Asserts that `response`, to a request on `path`, is a 503 problem the client may retry
/// in 1 s, decided by `source`.
async fn assert_unavailable(response: Response, path: &str, source: &str) {
    assert_eq!(response.status(), 503, "{path}");
    assert_eq!(
        header(&response, "Content-Type"),
        "application/problem+json"
    );
    assert_eq!(header(&response, "Retry-After"), "1");
    assert_eq!(header(&response, "X-RateLimit-Source"), source);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], 503, "{body}");
}

/// Asserts that past the policy's limit every request on `/api/items` still reaches the
/// upstream, with `source` as the deciding party; the last response is returned.
async fn assert_fails_open(stack: &Stack, client: &Client, source: &str) -> Response {
    let answers = statuses(stack, client, "/api/items", API_LIMIT + 2).await;
    assert_eq!(answers, vec![200; API_LIMIT + 2], "{source}");
    let response = stack.get(client, "/api/items").await;
    assert_eq!(header(&response, "X-RateLimit-Source"), source);
    let counts = stack.upstream.counts().await;
    assert_eq!(
        counts.path("/api/items"),
        API_LIMIT as u64 + 3,
        "{counts:?}"
    );
    response
}

#[tokio::test]
async fn with_redis_down_and_fail_mode_closed_limited_requests_get_a_503() {
    let stack = Stack::start(with_redis_down("closed"));
    let client = client_from(address(9));

    let limited = stack.get(&client, "/api/items").await;
    let unlimited = stack.get(&client, "/free/page").await;

    assert_unavailable(limited, "/api/items", "closed").await;
    assert_eq!(unlimited.status(), 200, "no policy, no store needed");
    let counts = stack.upstream.counts().await;
    assert_eq!(
        (counts.path("/api/items"), counts.total),
        (0, 1),
        "{counts:?}"
    );
}

#[tokio::test]
async fn with_redis_down_and_fail_mode_open_limited_requests_reach_the_upstream() {
    let stack = Stack::start(with_redis_down("open"));
    let client = client_from(address(10));

    assert_fails_open(&stack, &client, "open").await;
}

/// Two addresses where no instance listens: connections are refused.
fn refusing_instances() -> [String; 2] {
    [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ]
}

#[tokio::test]
async fn with_every_instance_down_the_gateway_fails_closed_with_a_503() {
    let stack = Stack::start(Setup {
        instances: Some(refusing_instances()),
        ..Setup::default()
    });
    let client = client_from(address(11));

    for path in ["/api/items", "/free/page"] {
        let response = stack.get(&client, path).await;

        assert_unavailable(response, path, "gateway-closed").await;
    }
    assert_eq!(stack.upstream.counts().await.total, 0);
}

#[tokio::test]
async fn with_every_instance_down_and_gateway_fail_mode_open_the_upstream_is_reached() {
    let stack = Stack::start(Setup {
        instances: Some(refusing_instances()),
        gateway_fail_mode: "open",
        ..Setup::default()
    });
    let client = client_from(address(12));

    let response = assert_fails_open(&stack, &client, "gateway-open").await;
    assert_eq!(header(&response, "RateLimit"), "");
}

#[tokio::test]
async fn instances_that_accept_but_never_answer_are_given_up_on_within_the_timeouts() {
    // Both accept connections (the kernel completes them) and never read or answer.
    let silent: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let addr = |i: usize| format!("127.0.0.1:{}", silent[i].local_addr().unwrap().port());
    let stack = Stack::start(Setup {
        instances: Some([addr(0), addr(1)]),
        ..Setup::default()
    });
    let client = client_from(address(13));

    let response = stack.get(&client, "/api/items").await;

    assert_eq!(response.status(), 503);
    assert_eq!(header(&response, "X-RateLimit-Source"), "gateway-closed");
    assert_eq!(stack.upstream.counts().await.total, 0);
}

/// [`testkit::raw_get`] on loopback.
fn raw_get(port: u16, target: &str) -> (u16, bool) {
    testkit::raw_get("127.0.0.1", port, target)
}

#[tokio::test]
async fn internal_routes_are_not_reachable_through_the_gateway_either() {
    let stack = Stack::start(Setup::default());

    let (check_location, _) = raw_get(stack.nginx.gateway_port, "/__ratelimiter/check");

    assert_eq!(check_location, 404, "the check location is internal");
    let client = client();
    for path in ["/metrics", "/v1/policies", "/v1/check", "/ready"] {
        let response = stack.get(&client, path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            header(&response, "X-Instance"),
            "",
            "{path} reached an instance"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["upstream"], "demo-upstream", "{path}: {body}");
    }
}

#[tokio::test]
async fn one_address_holding_four_thousand_slow_connections_does_not_stop_another_clients_health() {
    let stack = Stack::start(Setup::default());
    let (public, gateway) = (stack.nginx.port, stack.nginx.gateway_port);
    // Slow clients: each has sent half a request and waits, so Nginx holds its connection
    // until client_header_timeout (one that sent nothing yet, it would close for a new
    // client when short of connections). Twice what the review asked for, and more than
    // two workers of Nginx's default 1,024 connections each could hold.
    let idle = tokio::task::spawn_blocking(move || {
        (0..4_000)
            .map(|n| {
                let port = if n % 2 == 0 { public } else { gateway };
                let mut stream =
                    TcpStream::connect(("127.0.0.1", port)).expect("an idle connection");
                stream
                    .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
                    .expect("half a request");
                stream
            })
            .collect::<Vec<TcpStream>>()
    })
    .await
    .unwrap();
    let client = client_from(address(14));
    for url in [
        stack.nginx.public("/health"),
        stack.nginx.gateway("/anything"),
    ] {
        let response = get_within_hang_bound(&client, &url).await;
        assert_eq!(response.status(), 200, "{url}");
    }
    drop(idle);
}

/// Each `upstream` block of an Nginx config: its name, and whether it keeps idle
/// connections (`keepalive N;`).
fn upstreams_kept_alive(config: &str) -> Vec<(String, bool)> {
    let mut upstreams: Vec<(String, bool)> = Vec::new();
    let mut inside = false;
    for line in config.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("upstream ") {
            upstreams.push((name.trim_end_matches('{').trim().to_owned(), false));
            inside = true;
        } else if line == "}" {
            inside = false;
        } else if let Some(count) = line.strip_prefix("keepalive ") {
            let count = count
                .strip_suffix(';')
                .is_some_and(|n| n.parse::<u32>().is_ok());
            if let Some(last) = upstreams.last_mut().filter(|_| inside && count) {
                last.1 = true;
            }
        }
    }
    upstreams
}

#[test]
fn every_shipped_nginx_config_keeps_its_upstream_connections_alive() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_dir(root.join("nginx")).unwrap();
    let mut configs: Vec<_> = shipped.map(|entry| entry.unwrap().path()).collect();
    configs.retain(|path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.contains("proxy_pass http://ratelimiter")
    });
    assert!(
        !configs.is_empty(),
        "no config under nginx/ proxies to the instances"
    );
    // The bench's Nginx straight to the demo upstream is held to the same settings.
    configs.push(root.join("scripts/bench/proxy-nginx.conf"));
    for path in configs {
        let config = std::fs::read_to_string(&path).unwrap();
        let upstreams = upstreams_kept_alive(&config);
        let all_kept = !upstreams.is_empty() && upstreams.iter().all(|(_, kept)| *kept);
        assert!(all_kept, "{}: upstreams {upstreams:?}", path.display());
        for directive in [
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
        ] {
            let found = config.lines().any(|line| line.trim() == directive);
            assert!(found, "{}: no `{directive}`", path.display());
        }
    }
}
