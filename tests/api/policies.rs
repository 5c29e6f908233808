//! Policies through the HTTP edge: several limits decided at once, keys beyond the client
//! IP, shadow mode, reloads, and a bad file at start.

use std::time::Duration;

use testkit::{
    PolicyFile, RedisProcess, TestApp, admitted, all_at_once, client, counter, header, json_of,
    metrics, send_signal, service_command, unique_prefix, wait_for_exit,
};

const MINUTE_AND_HOUR: &str = r#"
[[policy]]
name = "api"
match = { path = "/limited_endpoint" }
key = ["header:x-api-key"]
on_missing = "deny"
limits = [
    { name = "minute", rate = 10, per = "1m" },
    { name = "hour", rate = 15, per = "1h" },
]
"#;

/// Where a bucket is in Redis: its hash and its field there.
struct Bucket {
    key: String,
    field: String,
}

impl Bucket {
    /// What the bucket holds, in whole tokens of `token_units` units.
    fn tokens(&self, redis: &RedisProcess, token_units: u64) -> u64 {
        let tokens: String = redis.command(&["HGET", &self.key, &format!("{}:tokens", self.field)]);
        tokens.parse::<u64>().expect("a whole number of units") / token_units
    }

    /// Its fields as stored: units and time of the last write.
    fn state(&self, redis: &RedisProcess) -> Vec<String> {
        let (tokens, ts) = (
            format!("{}:tokens", self.field),
            format!("{}:ts", self.field),
        );
        redis.command(&["HMGET", &self.key, &tokens, &ts])
    }
}

/// The bucket of each limit `/v1/explain` says a request with `api_key` would charge.
async fn buckets_of(app: &TestApp, api_key: &str) -> Vec<Bucket> {
    let explained = json_of(
        client()
            .get(app.at("/v1/explain?method=GET&path=/limited_endpoint"))
            .header("x-api-key", api_key),
    )
    .await;
    explained["policies"][0]["limits"]
        .as_array()
        .expect("the api policy applies")
        .iter()
        .map(|limit| Bucket {
            key: limit["bucket"]["key"].as_str().unwrap().to_string(),
            field: limit["bucket"]["field"].as_str().unwrap().to_string(),
        })
        .collect()
}

#[tokio::test]
async fn two_instances_admit_exactly_the_minute_burst_and_the_hour_pays_exactly_as_much() {
    let redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(MINUTE_AND_HOUR);
    for redis_client in ["multiplexed", "pool"] {
        let vars = [
            ("REDIS_URL", redis.url()),
            ("REDIS_CLIENT", redis_client.to_string()),
            ("KEY_PREFIX", unique_prefix("all-or-nothing")),
            ("POLICY_FILE", file.path()),
            ("REDIS_TIMEOUT_MS", "2000".into()),
        ];
        let (first, second) = (TestApp::spawn_with(&vars), TestApp::spawn_with(&vars));
        let client = client();
        let answers = all_at_once((0..200).map(|n| {
            let app = if n % 2 == 0 { &first } else { &second };
            client
                .get(app.at("/limited_endpoint"))
                .header("x-api-key", "user-42")
        }))
        .await;
        let (admitted, _) = admitted(answers);
        assert_eq!(admitted, 10, "REDIS_CLIENT={redis_client}");
        let buckets = buckets_of(&first, "user-42").await;
        // 15 per hour: one token is 240,000,000 units (3.6e9 µs / gcd(15, 3.6e9)).
        assert_eq!(
            buckets[1].tokens(&redis, 240_000_000),
            5,
            "REDIS_CLIENT={redis_client}: the hour limit paid for exactly the admitted requests"
        );
    }
}

#[tokio::test]
async fn a_request_the_hour_denies_spends_nothing_of_its_minute_limit() {
    let redis = RedisProcess::server(None, &[]);
    let file = PolicyFile::new(
        r#"
[[policy]]
name = "api"
key = ["header:x-api-key"]
limits = [
    { name = "minute", rate = 10, per = "1m" },
    { name = "hour", rate = 1, per = "1h" },
]
"#,
    );
    let app = TestApp::spawn_with(&[
        ("REDIS_URL", redis.url()),
        ("KEY_PREFIX", unique_prefix("hour-denies")),
        ("POLICY_FILE", file.path()),
        ("DENY_CACHE_SIZE", "0".into()),
    ]);
    let client = client();
    let send = || {
        client
            .get(app.at("/limited_endpoint"))
            .header("x-api-key", "k")
    };
    assert_eq!(send().send().await.unwrap().status(), 200);
    let minute = &buckets_of(&app, "k").await[0];
    let before = minute.state(&redis);
    for _ in 0..5 {
        let denied = send().send().await.unwrap();
        assert_eq!(denied.status(), 429);
        let body: serde_json::Value = denied.json().await.unwrap();
        assert_eq!(body["violated-policies"], serde_json::json!(["api-hour"]));
    }
    let after = minute.state(&redis);
    assert_eq!(before, after);
}

#[tokio::test]
async fn every_limit_is_in_the_headers_and_retry_after_waits_for_the_last_denying_one() {
    let (_file, app) = TestApp::spawn_with_policies(
        r#"
[[policy]]
name = "api"
limits = [
    { name = "second", rate = 1, per = "1s" },
    { name = "minute", rate = 1, per = "1m" },
]
"#,
    );
    let first = app.get("/limited_endpoint").await;
    assert_eq!(
        header(&first, "RateLimit-Policy"),
        r#""api-second";q=1;w=1, "api-minute";q=1;w=60"#
    );
    assert_eq!(
        header(&first, "RateLimit"),
        r#""api-second";r=0;t=1, "api-minute";r=0;t=60"#
    );
    let denied = app.get("/limited_endpoint").await;
    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "Retry-After"), "60");
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(
        body["violated-policies"],
        serde_json::json!(["api-second", "api-minute"])
    );
    assert!(body["retry_after_ms"].as_u64().unwrap() > 59_000, "{body}");
}

const WITH_SHADOW: &str = r#"
[[policy]]
name = "login"
limits = [{ name = "minute", rate = 3, per = "1m" }]

[[policy]]
name = "trial"
mode = "shadow"
limits = [{ name = "minute", rate = 1, per = "1m" }]
"#;

#[tokio::test]
async fn a_shadow_policy_never_denies_is_counted_and_changes_no_enforced_decision() {
    let client = client();
    let mut statuses = Vec::new();
    for text in [
        WITH_SHADOW,
        &WITH_SHADOW[..WITH_SHADOW.find("[[policy]]\nname = \"trial\"").unwrap()],
    ] {
        let (_file, app) = TestApp::spawn_with_policies(text);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let response = app.get("/limited_endpoint").await;
            assert!(
                !header(&response, "RateLimit-Policy").contains("trial"),
                "shadow limits never show"
            );
            seen.push(response.status().as_u16());
        }
        let text = metrics(&client, &app).await;
        let would_deny = r#"ratelimit_limit_decisions_total{policy="trial",limit="minute",mode="shadow",decision="limited"}"#;
        if text.contains("trial") {
            // The first request fills the shadow bucket's one token; the other five lack it.
            assert_eq!(counter(&text, would_deny), 5.0, "{text}");
        }
        statuses.push(seen);
    }
    assert_eq!(statuses[0], vec![200, 200, 200, 429, 429, 429]);
    assert_eq!(
        statuses[0], statuses[1],
        "with and without the shadow policy"
    );
}

#[tokio::test]
async fn header_keys_give_each_api_key_its_own_bucket_and_a_missing_one_follows_on_missing() {
    let (_file, app) = TestApp::spawn_with_policies(
        r#"
[[policy]]
name = "deny"
match = { path = "/limited_endpoint", header = { name = "x-mode", value = "deny" } }
key = ["header:x-api-key"]
on_missing = "deny"
limits = [{ name = "minute", rate = 1, per = "1m" }]

[[policy]]
name = "skip"
match = { path = "/limited_endpoint", header = { name = "x-mode", value = "skip" } }
key = ["header:x-api-key"]
on_missing = "skip"
limits = [{ name = "minute", rate = 1, per = "1m" }]

[[policy]]
name = "byip"
match = { path = "/limited_endpoint", header = { name = "x-mode", value = "ip" } }
key = ["header:x-api-key"]
on_missing = "client_ip"
limits = [{ name = "minute", rate = 1, per = "1m" }]
"#,
    );
    let client = client();
    let get = |mode: &str, api_key: Option<&[u8]>| {
        let mut request = client
            .get(app.at("/limited_endpoint"))
            .header("x-mode", mode);
        if let Some(api_key) = api_key {
            request = request.header(
                "x-api-key",
                reqwest::header::HeaderValue::from_bytes(api_key).unwrap(),
            );
        }
        request
    };
    let status = |response: reqwest::Response| response.status().as_u16();
    // Present: one bucket per key.
    assert_eq!(status(get("deny", Some(b"a")).send().await.unwrap()), 200);
    assert_eq!(status(get("deny", Some(b"a")).send().await.unwrap()), 429);
    assert_eq!(status(get("deny", Some(b"b")).send().await.unwrap()), 200);
    // Not UTF-8: a key like any other.
    assert_eq!(
        status(get("deny", Some(b"\xff\xfe")).send().await.unwrap()),
        200
    );
    assert_eq!(
        status(get("deny", Some(b"\xff\xfe")).send().await.unwrap()),
        429
    );
    // Absent under deny: 400 naming the policy and the header.
    let refused = get("deny", None).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(header(&refused, "Content-Type"), "application/problem+json");
    let body: serde_json::Value = refused.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("deny") && detail.contains("x-api-key"),
        "{detail}"
    );
    // Over-long: 400, and the value is not repeated.
    let long = vec![b'z'; 300];
    let refused = get("deny", Some(&long)).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    assert!(!refused.text().await.unwrap().contains("zzzz"));
    // Absent under skip: the policy does not apply, so nothing limits the request.
    for _ in 0..3 {
        let unlimited = get("skip", None).send().await.unwrap();
        assert_eq!(unlimited.status(), 200);
        assert_eq!(header(&unlimited, "RateLimit-Policy"), "");
    }
    // Absent under client_ip: the client's address is the key.
    assert_eq!(status(get("ip", None).send().await.unwrap()), 200);
    assert_eq!(status(get("ip", None).send().await.unwrap()), 429);
    assert_eq!(status(get("ip", Some(b"other")).send().await.unwrap()), 200);
}

#[tokio::test]
async fn composite_keys_overrides_costs_and_the_global_bucket() {
    let (_file, app) = TestApp::spawn_with_policies(
        r#"
[[policy]]
name = "plan"
match = { path = "/limited_endpoint", header = { name = "x-case", value = "plan" } }
key = ["header:x-api-key"]
limits = [{ name = "minute", rate = 1, per = "1m" }]

[[policy.override]]
keys = ["gold"]
limits = [{ name = "minute", rate = 3, per = "1m" }]

[[policy]]
name = "pair"
match = { path = "/limited_endpoint", header = { name = "x-case", value = "pair" } }
key = ["header:x-api-key", "header:x-region"]
limits = [{ name = "minute", rate = 1, per = "1m" }]

[[policy]]
name = "costly"
match = { path = "/limited_endpoint", header = { name = "x-case", value = "cost" } }
cost = { header = "x-cost", max = 5 }
limits = [{ name = "minute", rate = 5, per = "1m" }]

[[policy]]
name = "ceiling"
match = { path = "/limited_endpoint", header = { name = "x-case", value = "global" } }
key = ["global"]
limits = [{ name = "minute", rate = 2, per = "1m" }]
"#,
    );
    let client = client();
    let get = |case: &str, headers: &[(&str, &str)]| {
        let mut request = client
            .get(app.at("/limited_endpoint"))
            .header("x-case", case);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
    };
    let passed = |answers: Vec<(u16, String)>| answers.iter().filter(|(s, _)| *s == 200).count();
    // The gold key's override: 3 where others get 1.
    let gold = (0..5).map(|_| get("plan", &[("x-api-key", "gold")]));
    assert_eq!(passed(all_at_once(gold).await), 3);
    let plain = (0..5).map(|_| get("plan", &[("x-api-key", "silver")]));
    assert_eq!(passed(all_at_once(plain).await), 1);
    // Composite: the same API key in two regions is two buckets.
    for region in ["eu", "us"] {
        let pair = (0..3).map(|_| get("pair", &[("x-api-key", "k"), ("x-region", region)]));
        assert_eq!(passed(all_at_once(pair).await), 1, "{region}");
    }
    // Cost: 5 tokens at once, then nothing; a cost above the maximum is refused.
    let spend = |cost: &str| get("cost", &[("x-cost", cost)]).send();
    assert_eq!(spend("5").await.unwrap().status(), 200);
    assert_eq!(spend("1").await.unwrap().status(), 429);
    assert_eq!(spend("6").await.unwrap().status(), 400);
    assert_eq!(spend("lots").await.unwrap().status(), 400);
    // Global: every client shares one bucket.
    let mut admitted = 0;
    for source in ["127.0.0.61", "127.0.0.62", "127.0.0.63", "127.0.0.64"] {
        let from = testkit::client_from(source.parse().unwrap());
        let response = from
            .get(app.at("/limited_endpoint"))
            .header("x-case", "global")
            .send()
            .await
            .unwrap();
        admitted += usize::from(response.status() == 200);
    }
    assert_eq!(admitted, 2);
}

const GENEROUS: &str = r#"
[[policy]]
name = "before"
limits = [{ name = "minute", rate = 100000, per = "1m" }]
"#;

const AFTER: &str = r#"
[[policy]]
name = "after"
limits = [{ name = "minute", rate = 100000, per = "1m" }]
"#;

#[tokio::test]
async fn a_reload_under_load_fails_no_request_applies_to_the_next_ones_and_an_invalid_file_keeps_the_set()
 {
    let file = PolicyFile::new(GENEROUS);
    let app = TestApp::spawn_with(&[
        ("POLICY_FILE", file.path()),
        ("POLICY_POLL_MS", "50".into()),
    ]);
    let client = client();
    let load = {
        let (client, url) = (client.clone(), app.at("/limited_endpoint"));
        tokio::spawn(async move {
            let mut policies = Vec::new();
            // Bounded: 3 s or 3,000 requests, whichever comes first.
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(3) && policies.len() < 3_000 {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200, "a request failed during the reload");
                policies.push(header(&response, "RateLimit-Policy"));
            }
            policies
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    file.write(AFTER);
    let seen = load.await.unwrap();
    assert!(
        seen.first().unwrap().contains("\"before-minute\""),
        "{:?}",
        seen.first()
    );
    assert!(
        seen.last().unwrap().contains("\"after-minute\""),
        "{:?}",
        seen.last()
    );
    // Once the new set answered, the old one never did again.
    let first_after = seen
        .iter()
        .position(|p| p.contains("\"after-minute\""))
        .unwrap();
    assert!(
        seen[first_after..]
            .iter()
            .all(|p| p.contains("\"after-minute\""))
    );

    file.write("[[policy]]\nname = \"Bad Name\"\nlimits = []\n");
    let rejected = r#"ratelimit_policy_reloads_total{result="rejected"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counter(&metrics(&client, &app).await, rejected) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the invalid file was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let still = app.get("/limited_endpoint").await;
    assert!(header(&still, "RateLimit-Policy").contains("\"after-minute\""));
    let listed: serde_json::Value = app.get_json("/v1/policies").await;
    assert_eq!(listed["policies"][0]["name"], "after");
}

#[tokio::test]
async fn sighup_reloads_the_policy_file_and_does_not_stop_the_service() {
    let file = PolicyFile::new(GENEROUS);
    let port = testkit::free_port();
    let path = file.path();
    let mut child = Stopped(
        service_command(
            port,
            &[("POLICY_FILE", &path), ("POLICY_POLL_MS", "3600000")],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the binary"),
    );
    let url = format!("http://127.0.0.1:{port}/limited_endpoint");
    let client = client();
    let policy_of = async |client: &reqwest::Client| -> Option<String> {
        let response = client.get(&url).send().await.ok()?;
        Some(header(&response, "RateLimit-Policy"))
    };
    let until = async |what: &str, wanted: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if policy_of(&client).await.is_some_and(|p| wanted(&p)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    until("the service to answer", &|p| {
        p.contains("\"before-minute\"")
    })
    .await;
    file.write(AFTER);
    send_signal(child.0.id(), "HUP");
    until("the reload on SIGHUP", &|p| p.contains("\"after-minute\"")).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "SIGHUP stopped the service"
    );
}

/// A child process that is killed when the test ends, passed or failed.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_invalid_policy_file_at_start_exits_2_with_each_problem_and_its_line() {
    let file = PolicyFile::new(
        "[[policy]]\nname = \"Bad Name\"\nlimits = [{ name = \"m\", rate = 1, per = \"soon\" }]\n",
    );
    let path = file.path();
    let mut child = service_command(testkit::free_port(), &[("POLICY_FILE", &path)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the binary");
    let status = wait_for_exit(&mut child, Duration::from_secs(10)).expect("it exits at once");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("{path}:2:")), "{stderr}");
    assert!(stderr.contains(&format!("{path}:3:")), "{stderr}");
}

#[tokio::test]
async fn explain_names_the_policies_a_request_would_meet_and_hashes_secret_key_parts() {
    let (_file, app) = TestApp::spawn_with_policies(MINUTE_AND_HOUR);
    let explained = json_of(
        client()
            .get(app.at("/v1/explain?method=GET&path=/limited_endpoint"))
            .header("x-api-key", "very-secret-key"),
    )
    .await;
    let text = explained.to_string();
    assert_eq!(explained["policies"][0]["name"], "api");
    assert_eq!(
        explained["policies"][0]["limits"].as_array().unwrap().len(),
        2
    );
    assert!(!text.contains("very-secret-key"), "{text}");
    let elsewhere: serde_json::Value = app.get_json("/v1/explain?method=GET&path=/other").await;
    assert_eq!(elsewhere["policies"], serde_json::json!([]));
    let bad = app.get("/v1/explain?path=/x").await;
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("method"),
        "{body}"
    );
}
