//! Operating the service: metrics, logging and graceful shutdown. Each service builds its own
//! metrics handle, so these tests run side by side and count exactly.

use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::{TestApp, client, counter, metric, metrics};

#[tokio::test]
async fn metrics_count_decisions_by_outcome_and_source() {
    let app = TestApp::spawn(&[("RATE_LIMIT", "2"), ("INSTANCE_NAME", "metrics-test")]);
    let client = client();
    for _ in 0..5 {
        app.get("/limited_endpoint").await;
    }
    let after = metrics(&client, &app).await;
    let allowed = r#"ratelimit_decisions_total{decision="allowed",source="local"}"#;
    let limited = r#"ratelimit_decisions_total{decision="limited",source="local"}"#;
    assert_eq!(counter(&after, allowed), 2.0, "{after}");
    assert_eq!(counter(&after, limited), 3.0, "{after}");
    assert!(after.contains("ratelimit_build_info{version="), "{after}");
    assert!(
        after.contains(r#"ratelimit_http_requests_total{route="/limited_endpoint",status="429"}"#)
    );
}

#[tokio::test]
async fn requests_are_counted_by_the_route_actix_matched() {
    let app = TestApp::spawn(&[]);
    let client = client();
    for path in [
        "/limited%5Fendpoint",
        "/limited_endpoint",
        "/nope",
        "/nope/2",
    ] {
        app.get(path).await;
    }
    let text = metrics(&client, &app).await;
    let limited = r#"ratelimit_http_requests_total{route="/limited_endpoint",status="200"}"#;
    let other = r#"ratelimit_http_requests_total{route="other",status="404"}"#;
    assert_eq!(counter(&text, limited), 2.0, "{text}");
    assert_eq!(counter(&text, other), 2.0, "{text}");
}

#[tokio::test]
async fn two_services_in_one_process_keep_their_own_fallback_gauge() {
    let unreachable = format!("redis://127.0.0.1:{}", testkit::free_port());
    let degraded = TestApp::spawn(&[("REDIS_URL", &unreachable), ("REDIS_TIMEOUT_MS", "50")]);
    let healthy = TestApp::spawn(&[]);
    let client = client();
    degraded.get("/limited_endpoint").await;
    healthy.get("/limited_endpoint").await;
    let gauge = "ratelimit_fallback_active";
    let degraded_text = metrics(&client, &degraded).await;
    assert_eq!(metric(&degraded_text, gauge), Some(1.0), "{degraded_text}");
    let healthy_text = metrics(&client, &healthy).await;
    assert_eq!(metric(&healthy_text, gauge), Some(0.0), "{healthy_text}");
}

/// The binary as a child process, so it can receive a real SIGTERM.
struct Service {
    child: std::process::Child,
    url: String,
}

impl Service {
    fn start(vars: &[(&str, &str)]) -> Self {
        Self::start_with_stderr(&[&[("RUST_LOG", "warn")], vars].concat(), Stdio::null())
    }

    /// `vars` may set `RUST_LOG`. A piped stderr stays with the child, unread.
    fn start_with_stderr(vars: &[(&str, &str)], stderr: Stdio) -> Self {
        let port = testkit::free_port();
        let child = testkit::service_command(port, vars)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the service");
        let service = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        testkit::wait_until(
            "the service to listen",
            std::time::Duration::from_secs(10),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        service
    }

    fn signal(&self, signal: &str) {
        testkit::send_signal(self.child.id(), signal);
    }

    /// Waits for the exit code, killing the process if it does not exit in `limit`.
    fn wait_exit(&mut self, limit: std::time::Duration) -> Option<i32> {
        testkit::wait_for_exit(&mut self.child, limit)
            .unwrap_or_else(|| panic!("the service did not exit within {limit:?} of SIGTERM"))
            .code()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With access logging on, every request logs a line; this stderr is a pipe nobody reads,
/// so it is full after about 64 KiB. A worker that wrote there itself would block on the
/// next line, and its request with it.
#[tokio::test]
async fn a_stderr_nobody_reads_stalls_no_request_and_the_lines_it_cannot_take_are_counted() {
    let service = Service::start_with_stderr(
        &[
            ("ACCESS_LOG", "on"),
            ("RUST_LOG", "info"),
            ("LOG_QUEUE_LINES", "64"),
        ],
        Stdio::piped(),
    );
    let http = client();
    let started = Instant::now();
    for request in 0..2000 {
        let status = http
            .get(format!("{}/limited_endpoint", service.url))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("request {request} was not answered within the client's 10 s: {e}")
            })
            .status();
        assert!(
            matches!(status.as_u16(), 200 | 429),
            "request {request}: {status}"
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "2,000 requests took {took:?}"
    );
    let text = http
        .get(format!("{}/metrics", service.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The pipe takes some 600 lines of about 110 bytes and the queue 64: most of the
    // 2,000 are dropped, every one of them counted.
    let dropped = counter(&text, "ratelimit_log_lines_dropped_total");
    assert!(dropped >= 1000.0, "dropped {dropped} lines:\n{text}");
}

#[tokio::test]
async fn sigterm_lets_every_in_flight_request_finish_and_exits_0() {
    let redis = testkit::RedisProcess::server(None, &[]);
    let mut service = Service::start(&[
        ("REDIS_URL", &redis.url()),
        ("REDIS_TIMEOUT_MS", "1500"),
        ("SHUTDOWN_TIMEOUT_S", "10"),
        ("KEY_PREFIX", &testkit::unique_prefix("shutdown")),
    ]);
    let http = client();
    let ready = http
        .get(format!("{}/ready", service.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // A paused Redis holds every decision for up to REDIS_TIMEOUT_MS: requests in flight.
    redis.signal("STOP");
    let in_flight: Vec<_> = (0..20)
        .map(|_| {
            let request = http.get(format!("{}/limited_endpoint", service.url));
            tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    service.signal("TERM");

    let mut answered = Vec::new();
    for request in in_flight {
        answered.push(request.await.unwrap());
    }
    redis.signal("CONT");
    let code = service.wait_exit(std::time::Duration::from_secs(15));
    let failed: Vec<_> = answered
        .iter()
        .filter(|r| !matches!(r, Ok(200) | Ok(429)))
        .collect();
    assert!(failed.is_empty(), "in-flight requests failed: {failed:?}");
    assert_eq!(code, Some(0));
}

/// Every Rust source file of the service, concatenated.
fn service_source() -> String {
    fn collect(dir: &std::path::Path, text: &mut String) {
        for entry in std::fs::read_dir(dir).expect("read src/").flatten() {
            let path = entry.path();
            if path.is_dir() {
                collect(&path, text);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                text.push_str(&std::fs::read_to_string(&path).expect("read a source file"));
            }
        }
    }
    let mut text = String::new();
    collect(&testkit::repo_path("src"), &mut text);
    text
}

#[test]
fn every_message_the_operators_guide_quotes_is_one_the_service_prints() {
    let guide = std::fs::read_to_string(testkit::repo_path("docs/OPERATIONS.md")).unwrap();
    let troubleshooting = guide
        .split("## Troubleshooting")
        .nth(1)
        .expect("docs/OPERATIONS.md has a Troubleshooting section");
    let source = service_source();
    let mut quoted = 0;
    for heading in troubleshooting
        .lines()
        .filter_map(|l| l.strip_prefix("### `"))
    {
        let message = heading.trim_end().trim_end_matches('`');
        quoted += 1;
        // `<…>` stands for what varies; every literal part must be in the code.
        let mut rest = message;
        while !rest.is_empty() {
            let (literal, after) = match rest.find('<') {
                Some(open) => {
                    let close = rest[open..].find('>').map_or(rest.len(), |c| open + c + 1);
                    (&rest[..open], &rest[close..])
                }
                None => (rest, ""),
            };
            assert!(
                literal.trim().is_empty() || source.contains(literal),
                "docs/OPERATIONS.md quotes {message:?}, but {literal:?} is not in src/"
            );
            rest = after;
        }
    }
    assert!(quoted >= 10, "only {quoted} messages quoted");
}

#[tokio::test]
async fn metrics_show_a_fallback_while_redis_is_down_and_its_end_when_redis_returns() {
    let mut redis = testkit::RedisProcess::server(None, &[]);
    let port = redis.port;
    let app = TestApp::spawn(&[
        ("REDIS_URL", &redis.url()),
        ("KEY_PREFIX", &testkit::unique_prefix("fallback-metrics")),
        ("SENTINEL_POLL_MS", "100"),
    ]);
    let client = client();
    let connection_errors = r#"ratelimit_store_errors_total{kind="connection"}"#;
    let local_allowed = r#"ratelimit_decisions_total{decision="allowed",source="local"}"#;
    let before = metrics(&client, &app).await;
    assert_eq!(metric(&before, "ratelimit_fallback_active"), Some(0.0));
    assert!(
        before.contains("ratelimit_current_master_info{addr="),
        "{before}"
    );

    redis.kill();
    for _ in 0..3 {
        app.get("/limited_endpoint").await;
    }
    let during = metrics(&client, &app).await;
    assert_eq!(metric(&during, "ratelimit_fallback_active"), Some(1.0));
    assert!(counter(&during, connection_errors) > counter(&before, connection_errors));
    assert_eq!(
        counter(&during, local_allowed) - counter(&before, local_allowed),
        3.0
    );

    let _back = testkit::RedisProcess::server_on(port, None, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    testkit::until_redis_decides(&app.url, deadline, || {
        client.get(app.at("/limited_endpoint"))
    })
    .await;
    let after = metrics(&client, &app).await;
    assert_eq!(metric(&after, "ratelimit_fallback_active"), Some(0.0));
}
