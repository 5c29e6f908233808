//! The HTTP contract, on the embedded store and on Redis alike.

use reqwest::Response;
use testkit::{RedisProcess, TestApp, client, header, legacy_headers, passes, unique_prefix};

async fn ten_pass_then_429_with_headers(app: &TestApp, expected_source: &str) {
    for n in 1..=10 {
        let response = app.get("/limited_endpoint").await;
        assert_eq!(response.status(), 200, "request {n}");
        assert_eq!(
            header(&response, "RateLimit-Policy"),
            "\"default\";q=10;w=60"
        );
        assert_eq!(
            header(&response, "RateLimit"),
            format!("\"default\";r={};t=6", 10 - n)
        );
        assert_eq!(header(&response, "X-RateLimit-Source"), expected_source);
        assert_eq!(header(&response, "X-Instance"), "test");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["message"], "This is a limited endpoint");
        assert_eq!(body["instance"], "test");
    }
    let denied = app.get("/limited_endpoint").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "Content-Type"), "application/problem+json");
    assert_eq!(header(&denied, "Retry-After"), "6");
    assert_eq!(header(&denied, "RateLimit"), "\"default\";r=0;t=6");
    assert_eq!(header(&denied, "X-RateLimit-Source"), expected_source);
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["title"], "Too Many Requests");
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], serde_json::json!(["default"]));
    let retry_after_ms = body["retry_after_ms"].as_u64().unwrap();
    assert!(
        (5_000..=6_000).contains(&retry_after_ms),
        "retry_after_ms {retry_after_ms}"
    );
}

#[tokio::test]
async fn the_embedded_store_admits_ten_then_answers_429_with_retry_after_six() {
    let app = TestApp::spawn(&[]);
    ten_pass_then_429_with_headers(&app, "local").await;
}

#[tokio::test]
async fn the_redis_store_admits_ten_then_answers_429_with_retry_after_six() {
    let redis = RedisProcess::server(None, &[]);
    let prefix = unique_prefix("contract");
    let app = TestApp::spawn(&[("REDIS_URL", &redis.url()), ("KEY_PREFIX", &prefix)]);
    ten_pass_then_429_with_headers(&app, "redis").await;
}

#[tokio::test]
async fn legacy_headers_replace_the_draft_ones_when_asked() {
    let app = TestApp::spawn(&[
        ("RATELIMIT_HEADERS", "legacy"),
        ("RATE_LIMIT", "3"),
        ("TIME_WINDOW", "30"),
    ]);
    let response = app.get("/limited_endpoint").await;
    assert_eq!(legacy_headers(&response), ["3", "2", "10"]);
    assert_eq!(header(&response, "RateLimit"), "");
    assert_eq!(header(&response, "RateLimit-Policy"), "");
}

#[tokio::test]
async fn both_header_sets_are_sent_when_asked_and_none_when_not() {
    let both = TestApp::spawn(&[("RATELIMIT_HEADERS", "both")]);
    let response = both.get("/limited_endpoint").await;
    assert_eq!(header(&response, "X-RateLimit-Limit"), "10");
    assert_eq!(
        header(&response, "RateLimit-Policy"),
        "\"default\";q=10;w=60"
    );
    let none = TestApp::spawn(&[("RATELIMIT_HEADERS", "none")]);
    let response = none.get("/limited_endpoint").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "X-RateLimit-Limit"), "");
    assert_eq!(header(&response, "RateLimit"), "");
}

#[tokio::test]
async fn a_burst_larger_than_the_rate_sets_the_quota() {
    let app = TestApp::spawn(&[("RATE_LIMIT", "10"), ("TIME_WINDOW", "60"), ("BURST", "15")]);
    let client = client();
    let passed = passes(20, || client.get(app.at("/limited_endpoint"))).await;
    assert_eq!(passed, 15);
}

#[tokio::test]
async fn the_index_health_and_ready_routes_are_never_limited() {
    let app = TestApp::spawn(&[("RATE_LIMIT", "1")]);
    for _ in 0..5 {
        let index = app.get("/").await;
        assert_eq!(index.status(), 200);
        assert_eq!(header(&index, "X-Instance"), "test");
        let body: serde_json::Value = index.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({"message": "Hello World", "instance": "test"})
        );
        let health: serde_json::Value = app.get_json("/health").await;
        assert_eq!(health, serde_json::json!({"status": "ok"}));
        assert_eq!(app.get("/ready").await.status(), 200);
    }
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405_both_as_problems() {
    let app = TestApp::spawn(&[]);
    let missing = app.get("/nope").await;
    assert_eq!(header(&missing, "X-Instance"), "test");
    let body = plain_problem(missing, 404, "Not Found").await;
    assert_eq!(
        body,
        serde_json::json!({"type": "about:blank", "title": "Not Found", "status": 404})
    );
    let post = client()
        .post(app.at("/limited_endpoint"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&post, "Allow"), "GET, HEAD");
    plain_problem(post, 405, "Method Not Allowed").await;
}

/// Asserts that `response` is an `about:blank` problem of `status` and `title`; its body.
async fn plain_problem(response: Response, status: u16, title: &str) -> serde_json::Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        header(&response, "Content-Type"),
        "application/problem+json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["type"], "about:blank", "{body}");
    assert_eq!(body["title"], title, "{body}");
    assert_eq!(body["status"], status, "{body}");
    body
}

#[tokio::test]
async fn ready_is_503_with_a_reason_when_redis_is_unreachable_and_health_stays_200() {
    let port = testkit::free_port();
    let app = TestApp::spawn(&[
        ("REDIS_URL", &format!("redis://127.0.0.1:{port}")),
        ("REDIS_TIMEOUT_MS", "50"),
    ]);
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["reason"].as_str().unwrap().contains(&port.to_string()),
        "{body}"
    );
    assert_eq!(app.get("/health").await.status(), 200);
}
