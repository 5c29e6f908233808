//! `/v1/check`, asked directly as Nginx's `auth_request` asks it: the original request in
//! `X-Original-*` headers, the answer in the statuses `auth_request` understands (204, 403,
//! 401), with what the client is to get in headers.

use reqwest::{Client, RequestBuilder, Response};

use testkit::{TestApp, client, counter, free_port, header, metrics};

/// A check of `method uri`, as the gateway sends it.
fn check(client: &Client, app: &TestApp, method: &str, uri: &str) -> RequestBuilder {
    client
        .get(app.at("/v1/check"))
        .header("X-Original-Method", method)
        .header("X-Original-URI", uri)
}

/// The answer to [`check`], sent as it is.
async fn checked(client: &Client, app: &TestApp, method: &str, uri: &str) -> Response {
    check(client, app, method, uri).send().await.unwrap()
}

/// The problem the client is to get, from `X-RateLimit-Problem`.
fn problem(response: &Response) -> serde_json::Value {
    let text = header(response, "X-RateLimit-Problem");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("X-RateLimit-Problem {text:?}: {e}"))
}

#[tokio::test]
async fn an_admitted_request_is_a_204_with_the_quota_headers() {
    let app = TestApp::spawn(&[]);
    let client = client();

    let response = checked(&client, &app, "GET", "/limited_endpoint").await;

    assert_eq!(response.status(), 204);
    assert_eq!(
        header(&response, "RateLimit-Policy"),
        "\"default\";q=10;w=60"
    );
    assert_eq!(header(&response, "RateLimit"), "\"default\";r=9;t=6");
    assert_eq!(header(&response, "X-RateLimit-Source"), "local");
    assert_eq!(header(&response, "X-RateLimit-Problem"), "");
}

#[tokio::test]
async fn the_original_request_is_judged_not_the_check_request() {
    // The default policy limits GET and HEAD /limited_endpoint only.
    let app = TestApp::spawn(&[("RATE_LIMIT", "1")]);
    let client = client();

    let other_method = checked(&client, &app, "POST", "/limited_endpoint").await;
    let other_path = checked(&client, &app, "GET", "/elsewhere").await;
    let with_query = checked(&client, &app, "GET", "/limited%5Fendpoint?page=2").await;

    for unlimited in [&other_method, &other_path] {
        assert_eq!(unlimited.status(), 204);
        assert_eq!(header(unlimited, "RateLimit-Policy"), "");
        assert_eq!(header(unlimited, "X-RateLimit-Source"), "");
    }
    assert_eq!(with_query.status(), 204);
    assert_eq!(header(&with_query, "RateLimit"), "\"default\";r=0;t=60");
}

#[tokio::test]
async fn every_method_of_the_check_itself_is_answered() {
    let app = TestApp::spawn(&[]);
    let client = client();
    for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let response = client
            .request(method.parse().unwrap(), app.at("/v1/check"))
            .header("X-Original-Method", "GET")
            .header("X-Original-URI", "/")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "{method} /v1/check");
    }
}

#[tokio::test]
async fn a_quota_denial_is_a_403_carrying_the_429_that_limited_endpoint_sends() {
    let app = TestApp::spawn(&[("RATE_LIMIT", "2")]);
    let client = client();
    for _ in 0..2 {
        let admitted = checked(&client, &app, "GET", "/limited_endpoint").await;
        assert_eq!(admitted.status(), 204);
    }

    let denied = checked(&client, &app, "GET", "/limited_endpoint").await;
    // The same client's bucket, through the route that answers for itself.
    let served = app.get("/limited_endpoint").await;

    assert_eq!(denied.status(), 403);
    assert_eq!(served.status(), 429);
    assert_eq!(header(&denied, "X-RateLimit-Status"), "429");
    for name in [
        "Retry-After",
        "RateLimit-Policy",
        "RateLimit",
        "X-RateLimit-Source",
    ] {
        assert!(!header(&denied, name).is_empty(), "the 403 carries {name}");
        assert_eq!(header(&denied, name), header(&served, name), "{name}");
    }
    let mut carried = problem(&denied);
    let denied_body = denied.bytes().await.unwrap();
    assert!(denied_body.is_empty(), "a check answer has no body");
    let mut sent: serde_json::Value = served.json().await.unwrap();
    // Both were asked within milliseconds; only that may differ.
    for body in [&mut carried, &mut sent] {
        let retry_after_ms = body["retry_after_ms"].take().as_u64().unwrap();
        assert!(
            (20_000..=30_000).contains(&retry_after_ms),
            "{retry_after_ms}"
        );
    }
    assert_eq!(carried, sent);
}

#[tokio::test]
async fn a_missing_or_undecodable_original_is_a_401_carrying_a_400_that_names_the_header() {
    let app = TestApp::spawn(&[]);
    let client = client();
    let cases = [
        (
            client
                .get(app.at("/v1/check"))
                .header("X-Original-URI", "/limited_endpoint"),
            "X-Original-Method",
        ),
        (
            client
                .get(app.at("/v1/check"))
                .header("X-Original-Method", "GET"),
            "X-Original-URI",
        ),
        (
            check(&client, &app, "GET", "/limited_endpoint/%FF"),
            "X-Original-URI",
        ),
        (
            check(&client, &app, "GET", "limited_endpoint"),
            "X-Original-URI",
        ),
    ];
    for (request, named) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{named}");
        assert_eq!(header(&response, "X-RateLimit-Status"), "400");
        let problem = problem(&response);
        assert_eq!(problem["status"], 400, "{problem}");
        assert_eq!(problem["title"], "Bad Request", "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(named), "{detail:?} should name {named}");
    }
}

#[tokio::test]
async fn a_request_a_policy_refuses_is_a_401_carrying_that_400() {
    let (_policies, app) = TestApp::spawn_with_policies(
        r#"
[[policy]]
name = "keyed"
match = { path = "/api/**" }
key = ["header:x-api-key"]
on_missing = "deny"
limits = [{ name = "minute", rate = 5, per = "1m" }]
"#,
    );
    let client = client();

    let missing = checked(&client, &app, "GET", "/api/items").await;
    let too_long = check(&client, &app, "GET", "/api/items")
        .header("x-api-key", "k".repeat(300))
        .send()
        .await
        .unwrap();

    for response in [&missing, &too_long] {
        assert_eq!(response.status(), 401);
        assert_eq!(header(response, "X-RateLimit-Status"), "400");
        let problem = problem(response);
        assert_eq!(problem["status"], 400, "{problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains("x-api-key"),
            "{problem}"
        );
    }
}

#[tokio::test]
async fn the_original_host_is_matched_else_the_host_header() {
    let (_policies, app) = TestApp::spawn_with_policies(
        r#"
[[policy]]
name = "api-host"
match = { host = "api.example.com" }
limits = [{ name = "minute", rate = 5, per = "1m" }]
"#,
    );
    let client = client();

    let original_host = check(&client, &app, "GET", "/")
        .header("X-Original-Host", "api.example.com")
        .send()
        .await
        .unwrap();
    let host_header = check(&client, &app, "GET", "/")
        .header("Host", "api.example.com")
        .send()
        .await
        .unwrap();
    let other_host = check(&client, &app, "GET", "/")
        .header("X-Original-Host", "www.example.com")
        .header("Host", "api.example.com")
        .send()
        .await
        .unwrap();

    assert_eq!(
        header(&original_host, "RateLimit"),
        "\"api-host-minute\";r=4;t=12"
    );
    assert_eq!(
        header(&host_header, "RateLimit"),
        "\"api-host-minute\";r=3;t=12"
    );
    assert_eq!(header(&other_host, "RateLimit"), "");
}

#[tokio::test]
async fn with_the_store_down_and_fail_mode_closed_the_check_is_a_401_carrying_a_503() {
    let unreachable = format!("redis://127.0.0.1:{}", free_port());
    let app = TestApp::spawn(&[
        ("REDIS_URL", &unreachable),
        ("REDIS_TIMEOUT_MS", "50"),
        ("FAIL_MODE", "closed"),
    ]);
    let client = client();

    let response = checked(&client, &app, "GET", "/limited_endpoint").await;

    assert_eq!(response.status(), 401);
    assert_eq!(header(&response, "X-RateLimit-Status"), "503");
    assert_eq!(header(&response, "Retry-After"), "1");
    assert_eq!(header(&response, "X-RateLimit-Source"), "closed");
    let problem = problem(&response);
    assert_eq!(problem["status"], 503, "{problem}");
    assert_eq!(problem["title"], "Service Unavailable", "{problem}");
}

#[tokio::test]
async fn checks_are_counted_under_their_own_route() {
    let app = TestApp::spawn(&[("RATE_LIMIT", "1")]);
    let client = client();
    for _ in 0..3 {
        checked(&client, &app, "GET", "/limited_endpoint").await;
    }

    let text = metrics(&client, &app).await;

    let admitted = r#"ratelimit_http_requests_total{route="/v1/check",status="204"}"#;
    let denied = r#"ratelimit_http_requests_total{route="/v1/check",status="403"}"#;
    assert_eq!(counter(&text, admitted), 1.0, "{text}");
    assert_eq!(counter(&text, denied), 2.0, "{text}");
}
