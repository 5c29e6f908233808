//! Who a request is charged to, through the real HTTP stack.

use reqwest::header::HeaderValue;

use testkit::{PROXY_ADDR, TestApp, client, client_from, passes};

/// How many requests pass when sent one by one as forwarded for each of `addresses`.
async fn passes_forwarded_as(client: &reqwest::Client, url: &str, addresses: &[&str]) -> usize {
    let mut passed = 0;
    for address in addresses {
        let response = client
            .get(url)
            .header("X-Forwarded-For", *address)
            .send()
            .await
            .unwrap();
        passed += usize::from(response.status() == 200);
    }
    passed
}

/// The service at two requests a client, trusting this process as a proxy; a client,
/// and the URL of the endpoint the default policy limits.
fn two_a_client_behind_a_local_proxy() -> (TestApp, reqwest::Client, String) {
    let app = TestApp::spawn(&[("RATE_LIMIT", "2"), ("TRUSTED_PROXIES", "127.0.0.1")]);
    let url = app.at("/limited_endpoint");
    (app, client(), url)
}

#[tokio::test]
async fn a_direct_client_cannot_escape_its_bucket_by_forwarding_headers_to_an_instance_that_trusts_nginx()
 {
    // Arrange: the instance trusts Nginx's address, as the shipped topology has it; the
    // client, on another loopback address, talks to the instance directly.
    let app = TestApp::spawn(&[("RATE_LIMIT", "3"), ("TRUSTED_PROXIES", PROXY_ADDR)]);
    let client = client_from("127.0.0.1".parse().unwrap());
    let url = app.at("/limited_endpoint");

    // Act: every request claims to come from somewhere else.
    let mut passed = 0;
    for n in 0..10 {
        let response = client
            .get(&url)
            .header("X-Forwarded-For", format!("203.0.113.{n}"))
            .header("X-Real-IP", format!("198.51.100.{n}"))
            .header("Forwarded", format!("for=192.0.2.{n}"))
            .send()
            .await
            .unwrap();
        passed += usize::from(response.status() == 200);
    }

    // Assert: one bucket, the client's own address.
    assert_eq!(passed, 3);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket() {
    let (_app, client, url) = two_a_client_behind_a_local_proxy();
    for n in 1..=3 {
        let client_ip = format!("203.0.113.{n}");
        let passed = passes(4, || client.get(&url).header("X-Forwarded-For", &client_ip)).await;
        assert_eq!(passed, 2, "client {client_ip}");
    }
}

#[tokio::test]
async fn a_spoofed_leftmost_entry_through_a_trusted_proxy_is_ignored() {
    let (_app, client, url) = two_a_client_behind_a_local_proxy();
    // The proxy appended the real client; the client made up the rest.
    let passed = passes(6, || {
        let spoofed = format!("{}.1.1.1, 203.0.113.50", rand_octet());
        client.get(&url).header("X-Forwarded-For", spoofed)
    })
    .await;
    assert_eq!(passed, 2);
}

fn rand_octet() -> u8 {
    use std::time::{SystemTime, UNIX_EPOCH};
    (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 200) as u8
        + 1
}

#[tokio::test]
async fn repeated_forwarded_for_headers_are_read_in_order() {
    let app = TestApp::spawn(&[
        ("RATE_LIMIT", "1"),
        ("TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"),
    ]);
    let client = client();
    let url = app.at("/limited_endpoint");
    let send = |first: &str, second: &str| {
        client
            .get(&url)
            .header("X-Forwarded-For", first.to_string())
            .header("X-Forwarded-For", second.to_string())
            .send()
    };
    assert_eq!(send("203.0.113.7", "10.9.9.9").await.unwrap().status(), 200);
    // Same client behind another trusted hop: same bucket.
    assert_eq!(send("203.0.113.7", "10.1.1.1").await.unwrap().status(), 429);
    // The order matters: the rightmost untrusted entry is the client.
    assert_eq!(send("10.1.1.1", "203.0.113.8").await.unwrap().status(), 200);
}

#[tokio::test]
async fn malformed_forwarded_entries_never_mint_new_buckets() {
    let (_app, client, url) = two_a_client_behind_a_local_proxy();
    let garbage = [
        "not-an-ip",
        "999.1.1.1",
        "",
        "unknown",
        "203.0.113.1 extra",
        "\u{7f}",
    ];
    let mut passed = 0;
    for value in garbage.iter().cycle().take(12) {
        let Ok(value) = HeaderValue::from_str(value) else {
            continue;
        };
        let response = client
            .get(&url)
            .header("X-Forwarded-For", value)
            .send()
            .await
            .unwrap();
        assert!(response.status() == 200 || response.status() == 429);
        if response.status() == 200 {
            passed += 1;
        }
    }
    // All of them count against the proxy's own address: one bucket.
    assert_eq!(passed, 2);
}

#[tokio::test]
async fn invalid_utf8_in_forwarded_headers_is_answered_not_a_500() {
    let (_app, client, url) = two_a_client_behind_a_local_proxy();
    let passed = passes(5, || {
        let value = HeaderValue::from_bytes(b"\xff\xfe203.0.113.9").unwrap();
        client
            .get(&url)
            .header("X-Forwarded-For", value.clone())
            .header("X-Real-IP", value)
    })
    .await;
    assert_eq!(passed, 2);
}

#[tokio::test]
async fn an_8_kb_forwarded_for_is_handled_without_a_500() {
    let (_app, client, url) = two_a_client_behind_a_local_proxy();
    let long_chain: Vec<String> = (0..800)
        .map(|n| format!("10.0.{}.{}", n / 250, n % 250))
        .collect();
    let long_chain = long_chain.join(", ");
    assert!(long_chain.len() >= 8 * 1024, "{} bytes", long_chain.len());
    for _ in 0..3 {
        let response = client
            .get(&url)
            .header("X-Forwarded-For", &long_chain)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().as_u16() < 500,
            "status {}",
            response.status()
        );
    }
    let huge = "1".repeat(64 * 1024);
    let response = client
        .get(&url)
        .header("X-Forwarded-For", huge)
        .send()
        .await;
    if let Ok(response) = response {
        assert!(
            response.status().as_u16() < 500,
            "status {}",
            response.status()
        );
    }
}

#[tokio::test]
async fn ipv6_clients_in_one_64_prefix_share_a_bucket() {
    let (_app, client, url) = two_a_client_behind_a_local_proxy();
    let rotating = [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2:ffff::3",
        "2001:db8:1:2::4",
    ];
    assert_eq!(passes_forwarded_as(&client, &url, &rotating).await, 2);
    let other_prefix = ["2001:db8:1:3::1"];
    assert_eq!(passes_forwarded_as(&client, &url, &other_prefix).await, 1);
}

#[tokio::test]
async fn an_ipv4_mapped_address_is_the_same_client_as_its_ipv4_form() {
    let (_app, client, url) = two_a_client_behind_a_local_proxy();
    let forms = ["::ffff:203.0.113.77", "203.0.113.77", "::ffff:203.0.113.77"];
    assert_eq!(passes_forwarded_as(&client, &url, &forms).await, 2);
}

#[tokio::test]
async fn distinct_source_addresses_are_distinct_clients() {
    let app = TestApp::spawn(&[("RATE_LIMIT", "1"), ("HOST", "0.0.0.0")]);
    let url = format!("http://127.0.0.1:{}/limited_endpoint", app.port);
    for source in ["127.0.0.21", "127.0.0.22", "127.0.0.23"] {
        let client = client_from(source.parse().expect("a source address"));
        assert_eq!(
            client.get(&url).send().await.unwrap().status(),
            200,
            "{source}"
        );
        assert_eq!(
            client.get(&url).send().await.unwrap().status(),
            429,
            "{source}"
        );
    }
}
