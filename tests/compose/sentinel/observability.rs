//! The profile `observability`: Prometheus scraping both instances with the shipped rules.

use std::time::Duration;

use serde_json::Value;

use super::Topology;
use crate::wait_until;

impl Topology {
    /// Its targets are both instances and both are up; every shipped rule is loaded and
    /// evaluates without error; the readiness it scrapes is each instance's.
    pub(super) async fn prometheus_scrapes_both_instances_with_the_shipped_rules(&self) {
        let port = self.stack.port("prometheus", 9090);
        let api = |path: &'static str| {
            let url = self.url(port, path);
            async move {
                let answer = self.http.get(&url).send().await.ok()?;
                let body: Value = answer.json().await.ok()?;
                (body["status"] == "success").then(|| body["data"].clone())
            }
        };
        wait_until(
            "both instances up as Prometheus's targets",
            Duration::from_secs(60),
            || async {
                api("/api/v1/targets").await.is_some_and(|data| {
                    let targets = data["activeTargets"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    targets.len() == 2 && targets.iter().all(|t| t["health"] == "up")
                })
            },
        )
        .await;
        let shipped = std::fs::read_to_string(testkit::repo_path("observability/rules.yml"))
            .expect("observability/rules.yml");
        let shipped = shipped
            .lines()
            .filter(|line| {
                let line = line.trim_start();
                line.starts_with("- alert:") || line.starts_with("- record:")
            })
            .count();
        wait_until(
            "every shipped rule evaluated without error",
            Duration::from_secs(60),
            || async {
                api("/api/v1/rules").await.is_some_and(|data| {
                    let rules: Vec<Value> = data["groups"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
                        .collect();
                    rules.len() == shipped && rules.iter().all(|rule| rule["health"] == "ok")
                })
            },
        )
        .await;
        let answer = api("/api/v1/query?query=ratelimit_ready")
            .await
            .expect("Prometheus answers a query");
        let series = answer["result"].as_array().cloned().unwrap_or_default();
        let values: Vec<&str> = series
            .iter()
            .filter_map(|s| s["value"][1].as_str())
            .collect();
        assert_eq!(
            values,
            ["1", "1"],
            "ratelimit_ready as Prometheus scraped it: {answer}"
        );
        eprintln!("  ok: Prometheus scrapes both instances; {shipped} rules loaded, none failing");
    }
}
