//! Nginx reaching the instances on their Unix sockets (`UNIX_SOCKET`), as the native
//! topology does by default: each client is decided as it is over TCP, known by the
//! `X-Forwarded-For` Nginx sets, though the instances trust no TCP proxy; a process that
//! talks to a socket directly is a caller on the instance's host.

use reqwest::Client;
use testkit::{client_from, header, socket_request};

use crate::{API_LIMIT, ENDPOINT_LIMIT, Setup, Stack, address, admitted_then_denied, statuses};

/// What one run of the same requests saw: the statuses through the gateway of two clients
/// (one spoofing its forwarding headers) and of an API key, the statuses through the
/// public server, and what reached the upstream per client.
async fn run_the_same_requests(stack: &Stack, first_host: u8) -> [Vec<u16>; 5] {
    let (honest, spoofing) = (
        client_from(address(first_host)),
        client_from(address(first_host + 1)),
    );
    let honest_statuses = statuses(stack, &honest, "/api/items", API_LIMIT + 2).await;
    let mut spoofed_statuses = Vec::new();
    for i in 0..API_LIMIT + 2 {
        let response = spoofing
            .get(stack.nginx.gateway("/api/items"))
            .header("X-Forwarded-For", format!("203.0.113.{i}"))
            .header("X-Real-IP", format!("203.0.113.{i}"))
            .send()
            .await
            .unwrap();
        spoofed_statuses.push(response.status().as_u16());
    }
    let keyed = keyed_statuses(stack, &honest).await;
    let mut public = Vec::new();
    for _ in 0..ENDPOINT_LIMIT + 2 {
        let response = honest
            .get(stack.nginx.public("/limited_endpoint"))
            .send()
            .await
            .unwrap();
        public.push(response.status().as_u16());
    }
    let counts = stack.upstream.counts().await;
    let per_client = [first_host, first_host + 1]
        .map(|host| counts.client(&address(host).to_string()) as u16)
        .to_vec();
    [honest_statuses, spoofed_statuses, keyed, public, per_client]
}

fn over_sockets() -> Setup {
    Setup {
        over_sockets: true,
        ..Setup::default()
    }
}

async fn keyed_statuses(stack: &Stack, client: &Client) -> Vec<u16> {
    let mut statuses = Vec::new();
    for key in ["alpha", "alpha", "alpha", "beta"] {
        let response = client
            .get(stack.nginx.gateway("/keyed/report"))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses
}

#[tokio::test]
async fn over_sockets_every_client_is_decided_exactly_as_over_tcp() {
    // Arrange
    let over_tcp = Stack::start(Setup::default());
    let over_sockets = Stack::start(over_sockets());

    // Act
    let tcp = run_the_same_requests(&over_tcp, 40).await;
    let sockets = run_the_same_requests(&over_sockets, 40).await;

    // Assert
    assert_eq!(sockets, tcp);
    let [honest, spoofing, keyed, public, per_client] = sockets;
    assert_eq!(honest, admitted_then_denied(API_LIMIT, API_LIMIT + 2));
    assert_eq!(spoofing, admitted_then_denied(API_LIMIT, API_LIMIT + 2));
    assert_eq!(keyed, [200, 200, 429, 200]);
    assert_eq!(
        public,
        admitted_then_denied(ENDPOINT_LIMIT, ENDPOINT_LIMIT + 2)
    );
    let keyed_admitted = 3;
    assert_eq!(
        per_client,
        [API_LIMIT as u16 + keyed_admitted, API_LIMIT as u16]
    );
}

#[tokio::test]
async fn over_sockets_the_gateway_answers_a_denial_with_the_instances_headers() {
    let stack = Stack::start(over_sockets());
    let client = client_from(address(42));
    statuses(&stack, &client, "/api/items", API_LIMIT).await;

    let denied = stack.get(&client, "/api/items").await;

    assert_eq!(denied.status(), 429);
    assert_eq!(header(&denied, "X-RateLimit-Source"), "redis");
    assert_eq!(
        header(&denied, "RateLimit-Policy"),
        "\"api-minute\";q=3;w=60"
    );
    assert_eq!(header(&denied, "Content-Type"), "application/problem+json");
}

#[tokio::test]
async fn a_process_on_the_socket_without_nginx_is_a_caller_on_the_instances_host() {
    // Arrange: no Nginx in the way; the instances trust no TCP proxy.
    let stack = Stack::start(over_sockets());
    let socket = stack.socket("app-1");
    let loopback = client_from("127.0.0.1".parse().unwrap());

    // Act: the endpoint's limit, spent on the socket with nothing forwarded...
    let direct: Vec<u16> = (0..ENDPOINT_LIMIT)
        .map(|_| socket_request(&socket, "GET /limited_endpoint", &[]).0)
        .collect();
    // ...is the limit of a TCP caller from this host's loopback address.
    let from_loopback = loopback
        .get(format!("{}/limited_endpoint", stack.apps[1].url))
        .send()
        .await
        .unwrap();
    let forwarded = socket_request(
        &socket,
        "GET /limited_endpoint",
        &[("X-Forwarded-For", "203.0.113.50")],
    );

    // Assert
    assert_eq!(direct, vec![200; ENDPOINT_LIMIT]);
    assert_eq!(from_loopback.status(), 429, "the same bucket: 127.0.0.1");
    assert_eq!(
        forwarded.0, 200,
        "the forwarded client has a bucket of its own"
    );
}

#[tokio::test]
async fn the_bucket_api_answers_a_socket_caller_only_when_it_forwards_for_no_one_else() {
    let stack = Stack::start(over_sockets());
    let socket = stack.socket("app-2");
    let read = "GET /v1/buckets/api/203.0.113.60";

    let local = socket_request(&socket, read, &[]);
    let for_another = socket_request(&socket, read, &[("X-Forwarded-For", "203.0.113.7")]);

    assert_eq!(local.0, 200, "{}", local.1);
    assert_eq!(for_another.0, 403, "{}", for_another.1);
    assert!(
        for_another.1.contains("local callers only"),
        "{}",
        for_another.1
    );
}
