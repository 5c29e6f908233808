//! The part of the load generator's `--json` summary (loadtest/src/summary.rs) that the
//! benchmark reads. Fields it does not name are ignored, so the summary may grow.

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LoadtestSummary {
    pub elapsed_s: f64,
    pub requests: Requests,
    pub classes: Classes,
    /// `None` when nothing was answered.
    pub latency_ms: Option<Latency>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Requests {
    pub answered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Classes {
    pub admitted: u64,
    pub rejected: u64,
    pub server_errors: u64,
    pub other: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl LoadtestSummary {
    pub fn parse(json: &str) -> Result<Self> {
        let summary: Self = serde_json::from_str(json)
            .context("cannot read the load generator's --json summary")?;
        if summary.elapsed_s <= 0.0 {
            bail!(
                "the load generator's summary covers {} s",
                summary.elapsed_s
            );
        }
        Ok(summary)
    }

    /// Everything that was neither a 200 nor a 429: 5xx, other statuses, failed requests.
    pub fn not_decided(&self) -> u64 {
        self.classes.server_errors + self.classes.other + self.classes.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = r#"{
      "url": "http://127.0.0.1:8000/limited_endpoint", "mode": "64 connections",
      "mode_is_rate": false, "stopped_by": "duration", "planned_duration_s": 5.0,
      "elapsed_s": 5.01,
      "requests": {"dispatched": 100900, "answered": 100897, "errors": 3, "unanswered": 0,
                   "late": 0, "missed": 0, "max_lag_ms": 0.0, "achieved_per_s": 20139.1},
      "classes": {"admitted": 20000, "rejected": 80890, "server_errors": 5, "other": 2, "errors": 3},
      "latency_ms": {"count": 100897, "p50": 0.73, "p90": 1.2, "p99": 1.77, "max": 8.41, "mean": 0.8},
      "clients": [], "timeline": []
    }"#;

    #[test]
    fn the_summary_is_read_for_what_the_benchmark_needs() {
        let summary = LoadtestSummary::parse(SUMMARY).unwrap();
        assert_eq!(summary.requests.answered, 100_897);
        assert_eq!(summary.classes.admitted, 20_000);
        assert_eq!(summary.not_decided(), 10);
        assert_eq!(summary.latency_ms.unwrap().p99, 1.77);
    }

    #[test]
    fn a_run_without_answers_has_no_latency() {
        let json = r#"{"elapsed_s": 1.0, "requests": {"answered": 0},
            "classes": {"admitted": 0, "rejected": 0, "server_errors": 0, "other": 0, "errors": 9},
            "latency_ms": null}"#;
        assert_eq!(LoadtestSummary::parse(json).unwrap().latency_ms, None);
    }

    #[test]
    fn a_summary_of_no_time_is_an_error() {
        let json = r#"{"elapsed_s": 0.0, "requests": {"answered": 0},
            "classes": {"admitted": 0, "rejected": 0, "server_errors": 0, "other": 0, "errors": 0},
            "latency_ms": null}"#;
        assert!(LoadtestSummary::parse(json).is_err());
    }
}
