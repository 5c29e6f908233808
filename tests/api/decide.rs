//! The decision API (`POST /v1/decide`) and the bucket API (`GET`/`DELETE
//! /v1/buckets/…`) through HTTP, on a real `redis-server` and on the embedded store.

use std::collections::HashMap;
use std::net::IpAddr;

use reqwest::{Client, RequestBuilder, Response};
use serde_json::{Value, json};

use testkit::{PolicyFile, RedisProcess, TestApp, client, client_from, header, unique_prefix};

const POLICIES: &str = r#"
[[policy]]
name = "api"
match = { path = "/limited_endpoint" }
key = ["header:x-api-key"]
on_missing = "skip"
limits = [
    { name = "minute", rate = 10, per = "1m" },
    { name = "hour", rate = 15, per = "1h" },
]

[[policy.override]]
keys = ["gold"]
limits = [
    { name = "minute", rate = 30, per = "1m" },
    { name = "hour", rate = 300, per = "1h" },
]

[[policy]]
name = "scarce"
match = { path = "/never" }
key = ["header:x-api-key"]
limits = [{ name = "minute", rate = 1, per = "1m" }]

[[policy]]
name = "pair"
match = { path = "/never" }
key = ["header:x-api-key", "method"]
limits = [{ name = "minute", rate = 5, per = "1m" }]

[[policy]]
name = "ceiling"
match = { path = "/never" }
key = ["global"]
limits = [{ name = "hour", rate = 100, per = "1h" }]
"#;

/// The service on `redis` (or the embedded store) with [`POLICIES`] and `vars` on top.
fn spawn(redis: Option<&RedisProcess>, file: &PolicyFile, vars: &[(&str, &str)]) -> TestApp {
    let mut all: Vec<(&str, String)> = vec![
        ("POLICY_FILE", file.path()),
        ("KEY_PREFIX", unique_prefix("decide")),
    ];
    if let Some(redis) = redis {
        all.push(("REDIS_URL", redis.url()));
        all.push(("REDIS_TIMEOUT_MS", "2000".into()));
    }
    all.extend(vars.iter().map(|(k, v)| (*k, v.to_string())));
    TestApp::spawn_with(&all)
}

fn post(client: &Client, app: &TestApp, body: &Value) -> RequestBuilder {
    client.post(app.at("/v1/decide")).json(body)
}

/// `POST /v1/decide` with `body`, which must answer 200; its JSON.
async fn decide(client: &Client, app: &TestApp, body: Value) -> Value {
    let response = post(client, app, &body).send().await.unwrap();
    assert_eq!(response.status(), 200, "{body}");
    assert_eq!(header(&response, "Cache-Control"), "no-store");
    response.json().await.unwrap()
}

/// `GET /v1/buckets/…` at `path`, which must answer 200; its JSON.
async fn show(app: &TestApp, path: &str) -> Value {
    let response = app.get(path).await;
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

fn remaining(answer: &Value) -> Vec<u64> {
    answer["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|limit| limit["remaining"].as_u64().unwrap())
        .collect()
}

fn hash(redis: &RedisProcess, key: &str) -> HashMap<String, String> {
    redis.command(&["HGETALL", key])
}

#[tokio::test]
async fn cost_zero_spends_nothing_and_writes_nothing_to_redis() {
    let redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(POLICIES);
    let app = spawn(Some(&redis), &file, &[]);
    let client = client();
    let read = json!({"policy": "api", "key": "user-42", "cost": 0});

    let fresh = decide(&client, &app, read.clone()).await;
    assert_eq!(fresh["allowed"], true);
    assert_eq!(fresh["cost"], 0);
    assert_eq!(remaining(&fresh), vec![10, 15]);
    let bucket = fresh["bucket"].as_str().unwrap().to_string();
    assert!(bucket.contains(":api:{h#"), "{bucket}");
    assert_eq!(
        redis.command::<i64>(&["EXISTS", &bucket]),
        0,
        "a read made the hash"
    );

    let spent = decide(&client, &app, json!({"policy": "api", "key": "user-42"})).await;
    assert_eq!(remaining(&spent), vec![9, 14]);
    let before = hash(&redis, &bucket);
    assert!(!before.is_empty());
    let ttl_before: i64 = redis.command(&["PTTL", &bucket]);

    let again = decide(&client, &app, read).await;
    assert_eq!(remaining(&again), vec![9, 14]);
    let through_buckets = show(&app, "/v1/buckets/api/user-42").await;
    assert_eq!(through_buckets["cost"], 0);
    assert_eq!(through_buckets["bucket"], bucket.as_str());
    assert_eq!(remaining(&through_buckets), vec![9, 14]);
    assert_eq!(hash(&redis, &bucket), before, "a read changed the hash");
    let ttl_after: i64 = redis.command(&["PTTL", &bucket]);
    assert!(ttl_after <= ttl_before, "a read extended the hash's life");
}

#[tokio::test]
async fn cost_one_spends_one_token_of_every_limit_and_reports_each() {
    let redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(POLICIES);
    let app = spawn(Some(&redis), &file, &[]);
    let client = client();
    let response = post(
        &client,
        &app,
        &json!({"policy": "api", "key": "k", "cost": 1}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "X-RateLimit-Source"), "redis");
    assert_eq!(
        header(&response, "RateLimit-Policy"),
        r#""api-minute";q=10;w=60, "api-hour";q=15;w=3600"#
    );
    assert_eq!(
        header(&response, "RateLimit"),
        r#""api-minute";r=9;t=6, "api-hour";r=14;t=240"#
    );
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        json!({
            "allowed": true,
            "source": "redis",
            "policy": "api",
            "mode": "enforce",
            "bucket": answer["bucket"],
            "cost": 1,
            "retry_after": 0,
            "retry_after_ms": 0,
            "limits": [
                {"name": "api-minute", "quota": 10, "window": 60, "allowed": true,
                 "remaining": 9, "reset": 6, "retry_after": 0, "retry_after_ms": 0},
                {"name": "api-hour", "quota": 15, "window": 3600, "allowed": true,
                 "remaining": 14, "reset": 240, "retry_after": 0, "retry_after_ms": 0},
            ],
        })
    );
    let three = decide(
        &client,
        &app,
        json!({"policy": "api", "key": "k", "cost": 3}),
    )
    .await;
    assert_eq!(remaining(&three), vec![6, 11]);
}

#[tokio::test]
async fn a_denial_says_which_limit_lacked_and_when_to_retry() {
    let redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(POLICIES);
    let app = spawn(Some(&redis), &file, &[]);
    let client = client();
    let ask = json!({"policy": "scarce", "key": "k"});
    assert_eq!(decide(&client, &app, ask.clone()).await["allowed"], true);
    let response = post(&client, &app, &ask).send().await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "a denial is an answer, not an error"
    );
    assert_eq!(
        header(&response, "RateLimit"),
        r#""scarce-minute";r=0;t=60"#
    );
    let denied: Value = response.json().await.unwrap();
    assert_eq!(denied["allowed"], false);
    assert_eq!(denied["retry_after"], 60);
    let retry_after_ms = denied["retry_after_ms"].as_u64().unwrap();
    assert!((59_000..=60_000).contains(&retry_after_ms), "{denied}");
    let limit = &denied["limits"][0];
    assert_eq!(limit["allowed"], false);
    assert_eq!(limit["remaining"], 0);
    assert_eq!(limit["retry_after"], 60);
    assert_eq!(limit["reset"], 60);
}

#[tokio::test]
async fn a_reset_makes_every_limit_full_again_on_redis_and_on_the_embedded_store() {
    let redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(POLICIES);
    for store in [Some(&redis), None] {
        let what = if store.is_some() { "redis" } else { "embedded" };
        let app = spawn(store, &file, &[]);
        let client = client();
        let ask = json!({"policy": "scarce", "key": "k"});
        assert_eq!(decide(&client, &app, ask.clone()).await["allowed"], true);
        // Twice: the second denial comes from this instance's deny cache, on Redis.
        for _ in 0..2 {
            assert_eq!(decide(&client, &app, ask.clone()).await["allowed"], false);
        }
        let bucket = show(&app, "/v1/buckets/scarce/k").await["bucket"]
            .as_str()
            .unwrap()
            .to_string();
        let reset = client
            .delete(app.at("/v1/buckets/scarce/k"))
            .send()
            .await
            .unwrap();
        assert_eq!(reset.status(), 204, "{what}");
        if store.is_some() {
            assert_eq!(redis.command::<i64>(&["EXISTS", &bucket]), 0);
        }
        let full = show(&app, "/v1/buckets/scarce/k").await;
        assert_eq!(remaining(&full), vec![1], "{what}");
        assert_eq!(decide(&client, &app, ask).await["allowed"], true, "{what}");
    }
}

#[tokio::test]
async fn an_override_key_is_decided_under_the_overrides_limits() {
    let redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(POLICIES);
    let app = spawn(Some(&redis), &file, &[]);
    let client = client();
    let gold = decide(
        &client,
        &app,
        json!({"policy": "api", "key": "gold", "cost": 0}),
    )
    .await;
    let quotas: Vec<&Value> = gold["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|limit| &limit["quota"])
        .collect();
    assert_eq!(quotas, vec![&json!(30), &json!(300)]);
    // Up to the override's smallest burst, not the policy's.
    let costly = decide(
        &client,
        &app,
        json!({"policy": "api", "key": "gold", "cost": 30}),
    )
    .await;
    assert_eq!(costly["allowed"], true);
    assert_eq!(remaining(&costly), vec![0, 270]);
}

#[tokio::test]
async fn a_key_decided_through_the_api_is_the_bucket_its_requests_are_charged_to() {
    let redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(POLICIES);
    let app = spawn(Some(&redis), &file, &[]);
    let client = client();
    let spent = decide(
        &client,
        &app,
        json!({"policy": "api", "key": "user-7", "cost": 9}),
    )
    .await;
    assert_eq!(remaining(&spent), vec![1, 6]);
    let request = || {
        client
            .get(app.at("/limited_endpoint"))
            .header("x-api-key", "user-7")
    };
    let last = request().send().await.unwrap();
    assert_eq!(last.status(), 200);
    assert_eq!(
        header(&last, "RateLimit"),
        r#""api-minute";r=0;t=6, "api-hour";r=5;t=240"#
    );
    assert_eq!(request().send().await.unwrap().status(), 429);
    let after = show(&app, "/v1/buckets/api/user-7").await;
    assert_eq!(remaining(&after), vec![0, 5]);
}

#[tokio::test]
async fn the_default_policy_is_keyed_by_the_client_address_as_its_requests_are() {
    let app = TestApp::spawn(&[("RATE_LIMIT", "3")]);
    let client = client();
    let spent = decide(
        &client,
        &app,
        json!({"policy": "default", "key": "127.0.0.1", "cost": 3}),
    )
    .await;
    assert_eq!(spent["source"], "local");
    let denied = app.get("/limited_endpoint").await;
    assert_eq!(denied.status(), 429);
}

#[tokio::test]
async fn composite_and_global_keys_are_named_in_the_query() {
    let file = PolicyFile::new(POLICIES);
    let app = spawn(None, &file, &[]);
    let client = client();
    decide(
        &client,
        &app,
        json!({"policy": "pair", "key": ["k", "get"], "cost": 2}),
    )
    .await;
    let pair = show(&app, "/v1/buckets/pair?key=k&key=GET").await;
    assert_eq!(remaining(&pair), vec![3]);
    let other = show(&app, "/v1/buckets/pair?key=k&key=POST").await;
    assert_eq!(remaining(&other), vec![5]);
    decide(&client, &app, json!({"policy": "ceiling", "cost": 40})).await;
    let global = show(&app, "/v1/buckets/ceiling").await;
    assert_eq!(remaining(&global), vec![60]);
    let reset = client
        .delete(app.at("/v1/buckets/pair?key=k&key=GET"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 204);
    let pair = show(&app, "/v1/buckets/pair?key=k&key=GET").await;
    assert_eq!(remaining(&pair), vec![5]);
    // A one-part key in the path is decoded: `a+b/c` is one value.
    decide(&client, &app, json!({"policy": "scarce", "key": "a+b/c"})).await;
    let encoded = show(&app, "/v1/buckets/scarce/a%2Bb%2Fc").await;
    assert_eq!(remaining(&encoded), vec![0]);
}

/// Asserts `response` is a problem of `status` whose detail starts with `detail`.
async fn problem(response: Response, status: u16, detail: &str, what: &str) {
    assert_eq!(response.status(), status, "{what}");
    assert_eq!(
        header(&response, "Content-Type"),
        "application/problem+json",
        "{what}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status, "{what}");
    let found = body["detail"].as_str().unwrap_or_default();
    assert!(found.starts_with(detail), "{what}: {found}");
}

#[tokio::test]
async fn every_bad_input_is_a_400_whose_detail_names_the_field() {
    let file = PolicyFile::new(POLICIES);
    let app = spawn(None, &file, &[]);
    let client = client();
    let cases: &[(&str, &str)] = &[
        ("not json", "body: not JSON"),
        (r#"["api", "k"]"#, "body: expected a JSON object"),
        (
            r#"{"policy": "api", "key": "k", "tokens": 1}"#,
            "body: unknown field \"tokens\"",
        ),
        (r#"{"key": "k", "cost": 1}"#, "policy: required"),
        (
            r#"{"policy": "nope", "key": "k"}"#,
            "policy: no active policy is named \"nope\"",
        ),
        (
            r#"{"policy": "api", "key": "k", "cost": -1}"#,
            "cost: must not be negative",
        ),
        (
            r#"{"policy": "api", "key": "k", "cost": 1.5}"#,
            "cost: must be a whole number",
        ),
        (
            r#"{"policy": "api", "key": "k", "cost": "1"}"#,
            "cost: expected a whole number",
        ),
        (
            r#"{"policy": "api", "key": "k", "cost": 11}"#,
            "cost: 11 is more than 10",
        ),
        (
            r#"{"policy": "api", "key": "k", "cost": 1e40}"#,
            "cost: is larger than any bucket",
        ),
        (r#"{"policy": "api", "key": 42}"#, "key: expected a string"),
        (
            r#"{"policy": "api"}"#,
            "key: policy \"api\" is keyed by header:x-api-key, so a key is needed",
        ),
        (
            r#"{"policy": "pair", "key": "k"}"#,
            "key: policy \"pair\" is keyed by header:x-api-key, method: 1 values given",
        ),
        (
            r#"{"policy": "ceiling", "key": "k"}"#,
            "key: policy \"ceiling\" is keyed \"global\"",
        ),
    ];
    for (body, detail) in cases {
        let response = client
            .post(app.at("/v1/decide"))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        problem(response, 400, detail, body).await;
    }
    let buckets: &[(&str, &str)] = &[
        (
            "/v1/buckets/nope/k",
            "policy: no active policy is named \"nope\"",
        ),
        (
            "/v1/buckets/api",
            "key: policy \"api\" is keyed by header:x-api-key, so a key is needed",
        ),
        (
            "/v1/buckets/api/k?key=k",
            "query: the key is in the path already",
        ),
        (
            "/v1/buckets/api?cost=1",
            "query: unknown parameter \"cost\"",
        ),
        (
            "/v1/buckets/ceiling/k",
            "key: policy \"ceiling\" is keyed \"global\"",
        ),
    ];
    for (path, detail) in buckets {
        for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
            let response = client
                .request(method.clone(), app.at(path))
                .send()
                .await
                .unwrap();
            problem(response, 400, detail, &format!("{method} {path}")).await;
        }
    }
}

#[tokio::test]
async fn a_large_body_is_a_413_another_media_type_a_415_and_another_method_a_405() {
    let file = PolicyFile::new(POLICIES);
    let app = spawn(None, &file, &[]);
    let client = client();
    let padded = json!({"policy": "api", "key": "x".repeat(9 * 1024)});
    let large = post(&client, &app, &padded).send().await.unwrap();
    problem(large, 413, "body: larger than 8192 bytes", "9 KiB").await;
    let form = client
        .post(app.at("/v1/decide"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("policy=api&key=k")
        .send()
        .await
        .unwrap();
    problem(
        form,
        415,
        "Content-Type: expected application/json",
        "a form",
    )
    .await;
    let with_charset = client
        .post(app.at("/v1/decide"))
        .header("Content-Type", "application/json; charset=utf-8")
        .body(r#"{"policy": "api", "key": "k"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(with_charset.status(), 200);
    let get = app.get("/v1/decide").await;
    assert_eq!(header(&get, "Allow"), "POST");
    problem(get, 405, "this path answers POST", "GET /v1/decide").await;
    let put = client
        .put(app.at("/v1/buckets/api/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&put, "Allow"), "GET, HEAD, DELETE");
    problem(put, 405, "this path answers GET, HEAD, DELETE", "PUT").await;
}

/// One request to each route, from `client`, with `token` as its bearer token if any.
fn each_route(
    client: &Client,
    app: &TestApp,
    token: Option<&str>,
) -> Vec<(String, RequestBuilder)> {
    let requests = [
        (
            "POST /v1/decide",
            post(
                client,
                app,
                &json!({"policy": "api", "key": "k", "cost": 0}),
            ),
        ),
        ("GET /v1/buckets", client.get(app.at("/v1/buckets/api/k"))),
        (
            "DELETE /v1/buckets",
            client.delete(app.at("/v1/buckets/api/k")),
        ),
    ];
    requests
        .into_iter()
        .map(|(what, request)| {
            let request = match token {
                Some(token) => request.bearer_auth(token),
                None => request,
            };
            (what.to_string(), request)
        })
        .collect()
}

#[tokio::test]
async fn with_an_admin_token_a_missing_or_wrong_token_is_a_401_and_the_right_one_passes() {
    let file = PolicyFile::new(POLICIES);
    let app = spawn(None, &file, &[("ADMIN_TOKEN", "open-sesame")]);
    let client = client();
    for token in [None, Some("open-sesam"), Some("open-sesame-")] {
        for (what, request) in each_route(&client, &app, token) {
            let response = request.send().await.unwrap();
            assert!(
                header(&response, "WWW-Authenticate").starts_with("Bearer"),
                "{what} {token:?}"
            );
            let text = format!("{what} with {token:?}");
            problem(response, 401, "Authorization: ", &text).await;
        }
    }
    for (what, request) in each_route(&client, &app, Some("open-sesame")) {
        let status = request.send().await.unwrap().status();
        assert!(status == 200 || status == 204, "{what}: {status}");
    }
    // The token counts, not where the caller is: a proxied caller with it passes too.
    let response = client
        .get(app.at("/v1/buckets/api/k"))
        .bearer_auth("open-sesame")
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn without_an_admin_token_a_local_caller_is_served_and_one_through_a_proxy_refused() {
    let file = PolicyFile::new(POLICIES);
    let app = spawn(None, &file, &[("TRUSTED_PROXIES", "127.0.0.2/32")]);
    let direct = client();
    for (what, request) in each_route(&direct, &app, None) {
        let status = request.send().await.unwrap().status();
        assert!(status == 200 || status == 204, "{what}: {status}");
    }
    // Nginx on 127.0.0.2, forwarding for a client elsewhere.
    let proxy = client_from("127.0.0.2".parse::<IpAddr>().unwrap());
    for (what, request) in each_route(&proxy, &app, None) {
        let response = request
            .header("X-Forwarded-For", "203.0.113.7")
            .send()
            .await
            .unwrap();
        problem(response, 403, "this API answers local callers only", &what).await;
    }
    // The same proxy forwarding for a local caller: local.
    let response = proxy
        .get(app.at("/v1/buckets/api/k"))
        .header("X-Forwarded-For", "127.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The policy routes are not behind the rule.
    let policies = proxy
        .get(app.at("/v1/policies"))
        .header("X-Forwarded-For", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(policies.status(), 200);
}

#[tokio::test]
async fn while_redis_is_down_a_decision_falls_back_as_a_request_does_and_a_reset_is_a_503() {
    let mut redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(POLICIES);
    let app = spawn(Some(&redis), &file, &[("REDIS_TIMEOUT_MS", "100")]);
    let client = client();
    let ask = json!({"policy": "api", "key": "k"});
    assert_eq!(decide(&client, &app, ask.clone()).await["source"], "redis");
    redis.kill();
    let fallback = decide(&client, &app, ask).await;
    assert_eq!(fallback["source"], "local");
    assert_eq!(fallback["allowed"], true);
    let reset = client
        .delete(app.at("/v1/buckets/api/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&reset, "Retry-After"), "1");
    problem(
        reset,
        503,
        "the rate-limit store cannot reset these buckets now",
        "reset",
    )
    .await;
}

#[tokio::test]
async fn with_fail_mode_closed_and_redis_down_a_decision_is_no_with_the_quota_only() {
    let port = testkit::free_port();
    let file = PolicyFile::new(POLICIES);
    let app = spawn(
        None,
        &file,
        &[
            ("REDIS_URL", &format!("redis://127.0.0.1:{port}")),
            ("REDIS_TIMEOUT_MS", "50"),
            ("FAIL_MODE", "closed"),
        ],
    );
    let client = client();
    let closed = decide(&client, &app, json!({"policy": "scarce", "key": "k"})).await;
    assert_eq!(closed["allowed"], false);
    assert_eq!(closed["source"], "closed");
    assert_eq!(closed["retry_after"], 1);
    assert_eq!(
        closed["limits"][0],
        json!({"name": "scarce-minute", "quota": 1, "window": 60, "allowed": null,
               "remaining": null, "reset": null, "retry_after": null, "retry_after_ms": null})
    );
}
