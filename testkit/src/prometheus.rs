//! Prometheus as shipped: `observability/prometheus.yml` rendered by
//! `scripts/render-config.sh` with the shipped rules (`observability/rules.yml`), scraping
//! the instances a test names every second, on a free port, in a temporary folder. Its
//! HTTP API answers queries ([`PrometheusProcess::query`]) and lists the rules it loaded
//! ([`PrometheusProcess::rules`]). Stopped on `Drop`, after printing the end of its log
//! when the test failed.

use std::fs::File;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::app::Daemon;
use crate::http::{client, raw_get};
use crate::machine::{free_port, render, repo_path, require, wait_until};

/// What the scrapes and the rule evaluations are spaced by: short, so that a rate has
/// its two samples within seconds.
const SCRAPE_INTERVAL: &str = "1s";

/// One rule as Prometheus loaded it.
#[derive(Debug, Clone)]
pub struct LoadedRule {
    /// The alert's or the recorded series' name.
    pub name: String,
    /// `alerting` or `recording`.
    pub kind: String,
    pub query: String,
    /// `ok` once evaluated without error, `unknown` before the first evaluation.
    pub health: String,
    pub last_error: String,
}

pub struct PrometheusProcess {
    pub port: u16,
    /// Declared before `dir`, so that it stops, and its log is read, before the folder goes.
    process: Daemon,
    /// Held for its `Drop`: the configuration, data and logs live as long as the process.
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl PrometheusProcess {
    /// Starts Prometheus scraping `targets` (`host:port` of each instance) under the job
    /// the shipped rules expect; returns once it is ready to answer queries.
    pub fn start(targets: &[String]) -> Self {
        require("prometheus", "prometheus");
        let dir = tempfile::tempdir().expect("temporary folder");
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        let quoted: Vec<String> = targets
            .iter()
            .map(|target| format!("\"{target}\""))
            .collect();
        let rules = repo_path("observability/rules.yml").display().to_string();
        render(
            "observability/prometheus.yml",
            &config,
            &[
                ("TARGETS", &quoted.join(", ")),
                ("SCRAPE_INTERVAL", SCRAPE_INTERVAL),
                ("RULES_FILE", &rules),
            ],
        );
        let log = File::create(dir.path().join("prometheus.log")).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Self {
            port,
            process: Daemon::new("prometheus", child, dir.path().join("prometheus.log")),
            _dir: dir,
            http: client(),
        };
        wait_until("prometheus listening", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        // It listens before its database is open; /-/ready answers 503 until then.
        wait_until("prometheus ready", Duration::from_secs(30), || {
            raw_get("127.0.0.1", port, "/-/ready").0 == 200
        });
        prometheus
    }

    /// The series `expr` evaluates to now (`/api/v1/query`), or Prometheus's error, such
    /// as a query that does not parse.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body = self.get("/api/v1/query", &[("query", expr)]).await?;
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Every rule of every group Prometheus loaded (`/api/v1/rules`).
    pub async fn rules(&self) -> Result<Vec<LoadedRule>, String> {
        let body = self.get("/api/v1/rules", &[]).await?;
        let text = |value: &Value| value.as_str().unwrap_or_default().to_string();
        Ok(body["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .map(|rule| LoadedRule {
                name: text(&rule["name"]),
                kind: text(&rule["type"]),
                query: text(&rule["query"]),
                health: text(&rule["health"]),
                last_error: text(&rule["lastError"]),
            })
            .collect())
    }

    /// The `health` of each scrape target (`up`, `down`, `unknown`), by its address.
    pub async fn targets(&self) -> Result<Vec<(String, String)>, String> {
        let body = self.get("/api/v1/targets", &[]).await?;
        Ok(body["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|target| {
                let text = |name: &str| target[name].as_str().unwrap_or_default().to_string();
                (text("scrapeUrl"), text("health"))
            })
            .collect())
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let response = self
            .http
            .get(&url)
            .query(query)
            .send()
            .await
            .map_err(|err| format!("GET {url}: {err}"))?;
        let body: Value = response
            .json()
            .await
            .map_err(|err| format!("GET {url}: the answer is not JSON: {err}"))?;
        match body["status"].as_str() {
            Some("success") => Ok(body),
            _ => Err(format!("GET {url} {query:?}: {body}")),
        }
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// SIGTERM, then at most 10 s for it to close its database.
    pub fn stop(&mut self) {
        self.process.stop();
    }
}
