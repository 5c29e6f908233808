//! Operating the service: metrics and graceful shutdown. The metrics registry is
//! process-wide, so these tests live in their own binary and run one at a time.

#[path = "../support/mod.rs"]
mod support;

use support::{TestApp, client};

/// Serialises the tests of this binary: they read process-wide counters.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn metrics_count_decisions_by_outcome_and_source() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let app = TestApp::spawn(&[("RATE_LIMIT", "2"), ("INSTANCE_NAME", "metrics-test")]);
    let client = client();
    let before = scrape(&client, &app).await;
    for _ in 0..5 {
        client
            .get(app.at("/limited_endpoint"))
            .send()
            .await
            .unwrap();
    }
    let after = scrape(&client, &app).await;
    let allowed = r#"ratelimit_decisions_total{decision="allowed",source="local"}"#;
    let limited = r#"ratelimit_decisions_total{decision="limited",source="local"}"#;
    assert_eq!(value(&after, allowed) - value(&before, allowed), 2.0);
    assert_eq!(value(&after, limited) - value(&before, limited), 3.0);
    assert!(after.contains("ratelimit_build_info{version="), "{after}");
    assert!(
        after.contains(r#"ratelimit_http_requests_total{route="/limited_endpoint",status="429"}"#)
    );
}

async fn scrape(client: &reqwest::Client, app: &TestApp) -> String {
    let response = client.get(app.at("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The value of one sample line, 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
