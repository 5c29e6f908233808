//! The public server: Nginx proxying the instances' own API (`/`, `/health`,
//! `/limited_endpoint`) to both instances in turn, each client known by the address Nginx
//! saw, and nothing else of theirs reachable.

use std::collections::BTreeSet;

use testkit::{client_from, header};

use crate::{
    ENDPOINT_LIMIT, Setup, Stack, address, admitted_then_denied, assert_quota_exceeded, raw_get,
};

#[tokio::test]
async fn one_client_through_the_public_server_is_admitted_exactly_its_limit_by_both_instances_then_gets_their_429_problem()
 {
    // Arrange
    let stack = Stack::start(Setup::default());
    let client = client_from(address(20));
    let url = stack.nginx.public("/limited_endpoint");

    // Act
    let mut admitted = Vec::new();
    for _ in 0..ENDPOINT_LIMIT {
        admitted.push(client.get(&url).send().await.unwrap());
    }
    let denied = client.get(&url).send().await.unwrap();

    // Assert
    let statuses: Vec<u16> = admitted.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, vec![200; ENDPOINT_LIMIT]);
    let answered: Vec<&reqwest::Response> = admitted.iter().chain([&denied]).collect();
    let instances: BTreeSet<String> = answered.iter().map(|r| header(r, "X-Instance")).collect();
    assert_eq!(
        instances,
        BTreeSet::from(["app-1".to_string(), "app-2".to_string()]),
        "Nginx sends one client's requests to both instances"
    );
    for response in &answered {
        assert_eq!(header(response, "X-RateLimit-Source"), "redis");
    }
    assert_quota_exceeded(denied, "endpoint-minute", ENDPOINT_LIMIT, 15).await;
}

#[tokio::test]
async fn distinct_clients_at_once_through_the_public_server_each_get_their_own_bucket() {
    // Arrange
    let stack = Stack::start(Setup::default());
    let url = stack.nginx.public("/limited_endpoint");
    let count = ENDPOINT_LIMIT + 2;

    // Act: four clients at once, so their requests interleave at both instances.
    let bursts: Vec<_> = (21..25)
        .map(|host| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = client_from(address(host));
                let mut statuses = Vec::with_capacity(count);
                for _ in 0..count {
                    statuses.push(client.get(&url).send().await.unwrap().status().as_u16());
                }
                (host, statuses)
            })
        })
        .collect();

    // Assert
    for burst in bursts {
        let (host, statuses) = burst.await.unwrap();
        assert_eq!(
            statuses,
            admitted_then_denied(ENDPOINT_LIMIT, count),
            "client {}",
            address(host)
        );
    }
}

#[tokio::test]
async fn a_header_larger_than_nginx_takes_is_refused_by_nginx_itself_on_either_server() {
    // Arrange: larger than one of Nginx's 8 KiB large_client_header_buffers.
    let stack = Stack::start(Setup::default());
    let client = client_from(address(25));
    let huge = "a".repeat(16 * 1024);

    for url in [
        stack.nginx.public("/limited_endpoint"),
        stack.nginx.gateway("/api/items"),
    ] {
        // Act
        let response = client
            .get(&url)
            .header("X-Padding", &huge)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: Nginx answers rather than resetting ({e})"));

        // Assert
        assert_eq!(response.status(), 400, "{url}");
        assert_eq!(
            header(&response, "X-Instance"),
            "",
            "{url}: an instance answered"
        );
    }
    assert_eq!(stack.upstream.counts().await.total, 0);
}

#[tokio::test]
async fn internal_routes_answer_404_through_the_public_server_however_spelt() {
    let stack = Stack::start(Setup::default());
    let spellings = [
        "/ready",
        "/metrics",
        "/metrics?format=text",
        "/v1/policies",
        "/v1/explain?method=GET&path=/",
        "/v1/check",
        "/v1",
        "//v1/policies",
        "/v1/../metrics",
        "/./ready",
        "/%761/policies",
        "/%761/explain?method=GET&path=/",
        "/%6detrics",
        "/limited_endpoint/../metrics",
    ];

    for target in spellings {
        let (status, from_instance) = raw_get(stack.nginx.port, target);
        assert_eq!(status, 404, "GET {target} through the public server");
        assert!(!from_instance, "GET {target} reached an instance");
    }
    for target in ["/health", "/limited_endpoint", "/"] {
        assert_eq!(raw_get(stack.nginx.port, target), (200, true), "{target}");
    }
    for app in &stack.apps {
        for target in ["/ready", "/metrics", "/v1/policies"] {
            assert_eq!(
                raw_get(app.port, target),
                (200, true),
                "{target} on the instance's own port"
            );
        }
    }
}
