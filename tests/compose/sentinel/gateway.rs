//! The gateway in front of the demo upstream: exactly the limit reaches the application,
//! a denial is a problem with quota headers, claimed forwarding headers change nothing,
//! unlimited paths pass untouched, the instances' own routes stay inside; and with every
//! instance down it fails closed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testkit::header;

use super::Topology;
use crate::clients::{curl_from, requests_from, statuses};
use crate::process::docker_ok;
use crate::{RATE_LIMIT, TIME_WINDOW, answers_200};

/// The gateway, from the clients' network.
const GATEWAY: &str = "http://nginx:8080";

impl Topology {
    /// A client gets exactly its limit through the gateway, each admitted request reaching
    /// the upstream (by its own count); the client, now exhausted.
    pub async fn the_gateway_lets_exactly_the_limit_through(&self) -> String {
        let client = self.new_client();
        let url = format!("{GATEWAY}/limited_endpoint");

        let replies = requests_from(&self.stack, &self.front, &client, RATE_LIMIT + 2, &url, &[]);

        let admitted = replies.iter().take_while(|r| r.status == 200).count();
        assert!(
            admitted == RATE_LIMIT && replies[RATE_LIMIT..].iter().all(|r| r.status == 429),
            "client {client} through the gateway: {}",
            statuses(&replies)
        );
        assert!(
            replies.iter().all(|r| r.source == "redis"),
            "through the gateway, not all decided by Redis: {replies:?}"
        );
        let reached = self.upstream_counts().await.client(&client);
        assert_eq!(
            reached, RATE_LIMIT as u64,
            "requests of {client} that reached the upstream"
        );
        eprintln!(
            "  ok: client {client}: exactly {RATE_LIMIT} requests reached the upstream (its own count), then 429s"
        );
        client
    }

    pub async fn the_gateways_denial_is_a_problem_with_quota_headers(&self, exhausted: &str) {
        let before = self.upstream_counts().await.client(exhausted);
        let url = format!("{GATEWAY}/limited_endpoint");

        let denied = Response::parse(&curl_from(
            &self.stack,
            &self.front,
            exhausted,
            &["-i", &url],
        ));

        assert_eq!(
            denied.status, 429,
            "the denial through the gateway: {denied:?}"
        );
        assert_eq!(
            denied.header("content-type"),
            "application/problem+json",
            "{denied:?}"
        );
        let retry_after = denied.header("retry-after");
        assert!(
            retry_after.parse::<u64>().is_ok_and(|s| s > 0),
            "Retry-After: {denied:?}"
        );
        assert_eq!(
            denied.header("ratelimit"),
            format!("\"default\";r=0;t={retry_after}"),
            "{denied:?}"
        );
        let policy = format!("\"default\";q={RATE_LIMIT};w={TIME_WINDOW}");
        assert_eq!(denied.header("ratelimit-policy"), policy, "{denied:?}");
        let body: serde_json::Value = serde_json::from_str(&denied.body).expect("a JSON body");
        assert_eq!(
            body["violated-policies"],
            serde_json::json!(["default"]),
            "{denied:?}"
        );
        assert!(
            body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
            "{denied:?}"
        );
        let after = self.upstream_counts().await.client(exhausted);
        assert_eq!(after, before, "a denied request reached the upstream");
        eprintln!(
            "  ok: the denial is a 429 problem+json with violated-policies, retry_after_ms, Retry-After and the draft headers"
        );
    }

    pub async fn forwarding_headers_claimed_through_the_gateway_change_nothing(
        &self,
        exhausted: &str,
    ) {
        let before = self.upstream_counts().await.client(exhausted);
        let client = self.new_client();
        let claims = [
            format!("X-Forwarded-For: {exhausted}"),
            format!("X-Real-IP: {exhausted}"),
            format!("Forwarded: for={exhausted}"),
        ];
        let headers: Vec<&str> = claims
            .iter()
            .flat_map(|claim| ["-H", claim.as_str()])
            .collect();
        let url = format!("{GATEWAY}/limited_endpoint");

        let replies = requests_from(&self.stack, &self.front, &client, 1, &url, &headers);

        assert_eq!(
            statuses(&replies),
            "200",
            "client {client}, claiming to be {exhausted}"
        );
        let after = self.upstream_counts().await.client(exhausted);
        assert_eq!(
            after, before,
            "the upstream counted a request as {exhausted}'s"
        );
        eprintln!(
            "  ok: through the gateway, a client claiming to be the exhausted {exhausted} keeps its own bucket"
        );
    }

    pub async fn a_path_no_policy_limits_passes_untouched(&self) {
        let client = self.new_client();
        let url = format!("{GATEWAY}/your/api?page=2");

        let free = Response::parse(&curl_from(&self.stack, &self.front, &client, &["-i", &url]));

        assert_eq!(free.status, 200, "{free:?}");
        assert!(
            free.header("ratelimit").is_empty() && free.header("ratelimit-policy").is_empty(),
            "{free:?}"
        );
        let reached = self.upstream_counts().await.client(&client);
        assert_eq!(
            reached, 1,
            "the unlimited request did not reach the upstream once"
        );
        eprintln!("  ok: a path no policy limits passes to the upstream without quota headers");
    }

    /// /ready, /metrics and /v1/* answer 404 through Nginx, however spelt, and the
    /// gateway's check location is not reachable from outside; on an instance's own port
    /// they answer.
    pub async fn the_instances_own_routes_answer_on_their_ports_only(&self) {
        for target in [
            "/ready",
            "/metrics",
            "/v1/policies",
            "//v1/policies",
            "/v1/../metrics",
        ] {
            assert_eq!(
                raw_status(self.nginx, target),
                404,
                "GET {target} through Nginx"
            );
        }
        let check = raw_status(self.gateway, "/__ratelimiter/check");
        assert_eq!(check, 404, "the gateway's check location from outside");
        for target in ["/ready", "/metrics", "/v1/policies"] {
            let url = self.url(self.apps[0], target);
            assert!(
                answers_200(&self.http, &url).await,
                "GET {target} on app-1's own port"
            );
        }
        eprintln!(
            "  ok: /ready, /metrics and /v1/* answer 404 through Nginx (however spelt) and 200 on the instances' ports"
        );
    }

    pub async fn with_every_instance_down_the_gateway_fails_closed(&self) {
        let before = self.upstream_counts().await.total;
        docker_ok(&["kill", &self.stack.id("app-1"), &self.stack.id("app-2")]);
        let started = Instant::now();

        let answer = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap()
            .get(self.url(self.gateway, "/limited_endpoint"))
            .send()
            .await
            .expect("the gateway answers within 15 s");

        let took = started.elapsed().as_secs_f64();
        assert_eq!(answer.status().as_u16(), 503, "with both instances down");
        assert_eq!(header(&answer, "content-type"), "application/problem+json");
        assert_eq!(header(&answer, "x-ratelimit-source"), "gateway-closed");
        assert_eq!(
            self.upstream_counts().await.total,
            before,
            "with both instances down a request reached the upstream"
        );
        eprintln!(
            "  ok: both instances killed: 503 problem+json from the gateway in {took:.1}s, nothing reached the upstream"
        );
    }
}

/// An HTTP response as `curl -i` prints it.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn parse(printed: &str) -> Response {
        let (head, body) = printed.split_once("\n\n").unwrap_or((printed, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        Response {
            status,
            headers,
            body: body.to_string(),
        }
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

/// The status of `GET target` sent as it is spelt (no client normalises `/v1/../metrics`).
fn raw_status(port: u16, target: &str) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
