//! The whole service with `GRPC_PORT` and `RLS_CONFIG`: in this process
//! (`Application::build` through `TestApp`) or as the binary, which can be sent signals.
//! Beside `ShouldRateLimit` and health, the rules reload like the policy file, the HTTP API
//! shows them and can read and reset their buckets, and a stop lets calls in flight finish.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use testkit::{
    RedisProcess, RlsClient, RlsFiles, TestApp, client, counter, descriptor, free_port, json_of,
    metrics, rls_request, send_signal, service_command, statuses, unique_prefix, wait_for_exit,
    wait_until,
};

const EDGE: &str = "\
domain: edge
descriptors:
  - key: user
    rate_limit: { name: per-user, unit: minute, requests_per_unit: 3 }
  - key: tenant
    descriptors:
      - key: user
        shadow_mode: true
        rate_limit: { unit: hour, requests_per_unit: 100 }
  - key: internal
    rate_limit: { unlimited: true }
";

/// `EDGE` with the per-user limit at `requests` a minute.
fn edge_with(requests: u32) -> String {
    EDGE.replace(
        "requests_per_unit: 3",
        &format!("requests_per_unit: {requests}"),
    )
}

/// The service on `redis`, its rules the folder `files`, both ports free ones.
fn spawn(redis: &RedisProcess, files: &RlsFiles, test: &str, extra: &[(&str, String)]) -> TestApp {
    let mut vars = vec![
        ("REDIS_URL", redis.url()),
        ("KEY_PREFIX", unique_prefix(test)),
        ("GRPC_PORT", "0".to_string()),
        ("RLS_CONFIG", files.folder()),
    ];
    vars.extend(extra.iter().cloned());
    TestApp::spawn_with(&vars)
}

/// A Redis, a folder holding [`EDGE`], and an instance on both, its buckets under a
/// prefix for `test`.
fn spawn_on_edge(test: &str) -> (RedisProcess, RlsFiles, TestApp) {
    let redis = RedisProcess::server(None, &[]);
    let files = RlsFiles::new("edge.yaml", EDGE);
    let app = spawn(&redis, &files, test, &[]);
    (redis, files, app)
}

/// Asserts that nothing accepts connections on `port` any more.
fn assert_nothing_listens(port: u16, why: &str) {
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "{why}"
    );
}

/// The `requests_per_unit` the service now states for `user` descriptors.
async fn per_user_limit(rls: &mut RlsClient) -> u32 {
    let response = rls
        .ask(rls_request("edge", vec![descriptor(&[("user", "probe")])]))
        .await
        .expect("an answer");
    response.statuses[0]
        .current_limit
        .as_ref()
        .expect("a limit applies")
        .requests_per_unit
}

/// Asks until the service states `requests` for `user` descriptors, for at most 10 s.
async fn until_per_user_limit_is(rls: &mut RlsClient, requests: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while per_user_limit(rls).await != requests {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_grpc_port_no_grpc_listener_is_started() {
    let app = TestApp::spawn(&[]);
    assert_eq!(app.grpc_port, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_with_grpc_port_and_rls_config_serves_should_rate_limit_and_health() {
    let (_redis, _files, app) = spawn_on_edge("service");
    let mut rls = RlsClient::connect(app.grpc()).await;
    assert_eq!(rls.serving().await, ServingStatus::Serving);
    for remaining in [2, 1, 0] {
        let response = rls
            .ask(rls_request("edge", vec![descriptor(&[("user", "ann")])]))
            .await
            .unwrap();
        assert_eq!(statuses(&response), [(Code::Ok, remaining)]);
    }
    assert_eq!(
        rls.code_of("edge", &[("user", "ann")]).await,
        Code::OverLimit
    );
    assert_eq!(rls.code_of("elsewhere", &[("user", "ann")]).await, Code::Ok);
    let text = metrics(&client(), &app).await;
    assert_eq!(
        counter(&text, r#"ratelimit_grpc_requests_total{code="OVER_LIMIT"}"#),
        1.0
    );
    assert_eq!(
        counter(
            &text,
            r#"ratelimit_limit_decisions_total{policy="rls:edge",limit="per-user",mode="enforce",decision="allowed"}"#
        ),
        3.0,
        "{text}"
    );
    let grpc_port = app.grpc();
    app.stop().await;
    assert_nothing_listens(grpc_port, "the gRPC server outlived the HTTP server's stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_rule_file_is_applied_and_an_invalid_one_keeps_the_rules_in_force() {
    let redis = RedisProcess::server(None, &[]);
    let files = RlsFiles::new("edge.yaml", EDGE);
    let app = spawn(
        &redis,
        &files,
        "reload",
        &[("POLICY_POLL_MS", "50".to_string())],
    );
    let mut rls = RlsClient::connect(app.grpc()).await;
    assert_eq!(per_user_limit(&mut rls).await, 3);

    files.write("edge.yaml", &edge_with(7));
    until_per_user_limit_is(&mut rls, 7, "the changed file").await;
    // A file added to the folder is a domain added.
    files.write(
        "inner.yml",
        "domain: inner\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while rls.code_of("inner", &[("k", "v")]).await == Code::Ok {
        assert!(Instant::now() < deadline, "the new domain never limited");
    }

    files.write(
        "edge.yaml",
        &edge_with(7).replace("unit: minute", "unit: fortnight"),
    );
    let client = client();
    let rejected = r#"ratelimit_rls_reloads_total{result="rejected"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&metrics(&client, &app).await, rejected) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the invalid file was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        per_user_limit(&mut rls).await,
        7,
        "the last good rules decide"
    );
    let text = metrics(&client, &app).await;
    assert!(
        counter(&text, r#"ratelimit_rls_reloads_total{result="applied"}"#) >= 2.0,
        "{text}"
    );
    app.stop().await;
}

/// A child process that is killed when the test ends, passed or failed.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary with `vars`, its HTTP and gRPC ports free ones; answers once both listen.
pub(crate) fn start_binary(vars: &[(&str, &str)]) -> (Running, u16, u16) {
    let (port, grpc_port) = (free_port(), free_port());
    let grpc = grpc_port.to_string();
    let child = service_command(port, &[&[("GRPC_PORT", grpc.as_str())], vars].concat())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the binary");
    let running = Running(child);
    wait_until("both ports to listen", Duration::from_secs(10), || {
        [port, grpc_port]
            .iter()
            .all(|port| std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok())
    });
    (running, port, grpc_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_rules_and_does_not_stop_the_service() {
    let files = RlsFiles::new("edge.yaml", EDGE);
    let folder = files.folder();
    let (mut child, _, grpc_port) = start_binary(&[
        ("RLS_CONFIG", &folder),
        ("POLICY_POLL_MS", "3600000"),
        ("RUST_LOG", "warn"),
    ]);
    let mut rls = RlsClient::connect(grpc_port).await;
    assert_eq!(per_user_limit(&mut rls).await, 3);
    files.write("edge.yaml", &edge_with(9));
    send_signal(child.0.id(), "HUP");
    until_per_user_limit_is(&mut rls, 9, "the reload on SIGHUP").await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "SIGHUP stopped the service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_grpc_call_in_flight_finish_and_exits_0() {
    let redis = RedisProcess::server(None, &[]);
    let files = RlsFiles::new("edge.yaml", EDGE);
    let (url, folder, prefix) = (redis.url(), files.folder(), unique_prefix("sigterm"));
    let (mut child, _, grpc_port) = start_binary(&[
        ("RLS_CONFIG", &folder),
        ("REDIS_URL", &url),
        ("REDIS_TIMEOUT_MS", "1500"),
        ("SHUTDOWN_TIMEOUT_S", "10"),
        ("KEY_PREFIX", &prefix),
        ("RUST_LOG", "warn"),
    ]);
    let rls = RlsClient::connect(grpc_port).await;
    // A paused Redis holds every decision for up to REDIS_TIMEOUT_MS: calls in flight.
    redis.signal("STOP");
    let in_flight: Vec<_> = (0..20)
        .map(|n| {
            let mut rls = rls.clone();
            let user = format!("u{n}");
            tokio::spawn(async move {
                rls.ask(rls_request("edge", vec![descriptor(&[("user", &user)])]))
                    .await
                    .map(|response| response.overall_code())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_signal(child.0.id(), "TERM");
    let mut answered = Vec::new();
    for call in in_flight {
        answered.push(call.await.unwrap());
    }
    redis.signal("CONT");
    let status = wait_for_exit(&mut child.0, Duration::from_secs(15))
        .expect("the service exits after SIGTERM");
    let failed: Vec<_> = answered.iter().filter(|answer| answer.is_err()).collect();
    assert!(failed.is_empty(), "calls in flight failed: {failed:?}");
    assert_eq!(status.code(), Some(0));
    assert_nothing_listens(grpc_port, "the gRPC port still listens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_list_the_rules_beside_the_policies() {
    let (_redis, files, app) = spawn_on_edge("listed");
    let listed: serde_json::Value = app.get_json("/v1/policies").await;
    assert_eq!(listed["policies"][0]["name"], "default");
    let edge = &listed["rls"]["domains"][0];
    assert_eq!(edge["domain"], "edge");
    assert_eq!(edge["policy"], "rls:edge");
    assert_eq!(edge["file"], files.path("edge.yaml"));
    let rules = edge["rules"].as_array().unwrap();
    let shown: Vec<_> = rules
        .iter()
        .map(|rule| {
            (
                rule["label"].as_str().unwrap(),
                rule["descriptor"].clone(),
                rule["limit"].clone(),
                rule["shadow"].as_bool().unwrap(),
                rule["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            (
                "per-user",
                serde_json::json!(["user"]),
                serde_json::json!({"requests_per_unit": 3, "unit": "minute"}),
                false,
                4
            ),
            (
                "tenant.user",
                serde_json::json!(["tenant", "user"]),
                serde_json::json!({"requests_per_unit": 100, "unit": "hour"}),
                true,
                9
            ),
            (
                "internal",
                serde_json::json!(["internal"]),
                serde_json::Value::Null,
                false,
                11
            ),
        ]
    );
    assert_eq!(rules[2]["unlimited"], true);
    assert_eq!(listed["rls"]["version"].as_str().unwrap().len(), 16);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_api_reads_a_descriptors_bucket_without_spending_and_delete_resets_it() {
    let (_redis, _files, app) = spawn_on_edge("buckets");
    let mut rls = RlsClient::connect(app.grpc()).await;
    let http = client();
    for _ in 0..2 {
        assert_eq!(rls.code_of("edge", &[("user", "bob")]).await, Code::Ok);
    }
    let bucket = app.at("/v1/buckets/rls:edge/user=bob");
    let remaining = async |url: &str| -> serde_json::Value {
        let body: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
        body
    };
    for _ in 0..3 {
        let read = remaining(&bucket).await;
        assert_eq!(read["limits"][0]["remaining"], 1, "{read}");
        assert_eq!(read["policy"], "rls:edge");
        assert_eq!(read["cost"], 0);
        assert_eq!(read["source"], "redis");
    }
    let decided = json_of(
        http.post(app.at("/v1/decide"))
            .json(&serde_json::json!({"policy": "rls:edge", "key": ["user=bob"], "cost": 0})),
    )
    .await;
    assert_eq!(decided["limits"][0]["remaining"], 1, "{decided}");
    assert_eq!(decided["allowed"], true);
    // The one left, then none: Envoy is told so.
    assert_eq!(rls.code_of("edge", &[("user", "bob")]).await, Code::Ok);
    assert_eq!(
        rls.code_of("edge", &[("user", "bob")]).await,
        Code::OverLimit
    );

    let reset = http.delete(&bucket).send().await.unwrap();
    assert_eq!(reset.status(), 204);
    assert_eq!(remaining(&bucket).await["limits"][0]["remaining"], 3);
    for _ in 0..3 {
        assert_eq!(rls.code_of("edge", &[("user", "bob")]).await, Code::Ok);
    }
    assert_eq!(
        rls.code_of("edge", &[("user", "bob")]).await,
        Code::OverLimit
    );

    // A descriptor of two entries, in the query; a shadow rule says so.
    let nested = app.at("/v1/buckets/rls:edge?key=tenant%3Dacme&key=user%3Dbob");
    let read = remaining(&nested).await;
    assert_eq!(read["mode"], "shadow", "{read}");
    assert_eq!(read["limits"][0]["remaining"], 100);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_api_refuses_a_descriptor_it_cannot_name_saying_which_field() {
    let (_redis, _files, app) = spawn_on_edge("refusals");
    let http = client();
    for (body, expected) in [
        (
            serde_json::json!({"policy": "rls:nowhere", "key": ["user=a"]}),
            "policy: no rate-limit domain is named \"nowhere\"",
        ),
        (
            serde_json::json!({"policy": "rls:edge", "key": ["user"]}),
            "key: entry 1 must be written key=value",
        ),
        (
            serde_json::json!({"policy": "rls:edge", "key": ["colour=secret-value"]}),
            "key: no rule of domain \"edge\"",
        ),
        (
            serde_json::json!({"policy": "rls:edge", "key": ["internal=x"]}),
            "key: these entries match rule \"internal\" of domain \"edge\", which is unlimited",
        ),
        (
            serde_json::json!({"policy": "rls:edge", "key": ["user=secret-value"], "cost": 4}),
            "cost: 4 is more than 3",
        ),
    ] {
        let response = http
            .post(app.at("/v1/decide"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let problem: serde_json::Value = response.json().await.unwrap();
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.starts_with(expected), "{body}: {detail}");
        assert!(!detail.contains("secret-value"), "{detail}");
    }
    app.stop().await;
}

/// The quota headers of a `ShouldRateLimit` answer, by name.
async fn answer_headers(rls: &mut RlsClient, user: &str) -> Vec<(String, String)> {
    let response = rls
        .ask(rls_request("edge", vec![descriptor(&[("user", user)])]))
        .await
        .expect("an answer");
    response
        .response_headers_to_add
        .into_iter()
        .map(|header| (header.key, header.value))
        .collect()
}

#[tokio::test]
async fn with_rls_response_headers_an_answer_carries_the_headers_an_http_client_gets() {
    let redis = RedisProcess::server(None, &[]);
    let files = RlsFiles::new("edge.yaml", EDGE);
    let on = [("RLS_RESPONSE_HEADERS", "on".to_string())];
    let app = spawn(&redis, &files, "rls-headers", &on);
    let mut rls = RlsClient::connect(app.grpc()).await;

    let answered = answer_headers(&mut rls, "alice").await;
    let names: Vec<&str> = answered.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["ratelimit-policy", "ratelimit"]);
    // The same bucket read over HTTP, which spends nothing: the same quota and tokens left.
    let read = app.get("/v1/buckets/rls:edge/user=alice").await;
    assert_eq!(read.status(), 200);
    assert_eq!(answered[0].1, testkit::header(&read, "RateLimit-Policy"));
    assert_eq!(answered[0].1, "\"rls:edge-per-user\";q=3;w=60");
    let state = testkit::header(&read, "RateLimit");
    assert!(
        answered[1].1.starts_with("\"rls:edge-per-user\";r=2;t="),
        "{answered:?}"
    );
    assert!(state.starts_with("\"rls:edge-per-user\";r=2;t="), "{state}");

    let legacy = [
        ("RLS_RESPONSE_HEADERS", "on".to_string()),
        ("RATELIMIT_HEADERS", "legacy".to_string()),
    ];
    let app = spawn(&redis, &files, "rls-headers-legacy", &legacy);
    let mut rls = RlsClient::connect(app.grpc()).await;
    let answered = answer_headers(&mut rls, "alice").await;
    assert_eq!(answered[0], ("x-ratelimit-limit".into(), "3".into()));
    assert_eq!(answered[1], ("x-ratelimit-remaining".into(), "2".into()));

    let app = spawn(&redis, &files, "rls-headers-off", &[]);
    let mut rls = RlsClient::connect(app.grpc()).await;
    assert_eq!(answer_headers(&mut rls, "alice").await, []);
}
