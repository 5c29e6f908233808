//! wrk's summary, as `scripts/bench/report.lua` prints it: one line of JSON after wrk's
//! own (human) report.

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WrkReport {
    pub requests: u64,
    pub duration_us: u64,
    pub latency_us: Latency,
    pub errors: Errors,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Errors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// Responses with a status of 400 or more (429 included).
    pub status: u64,
}

impl Errors {
    /// Connect, read, write and timeout errors: requests that got no answer.
    pub fn socket(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

impl WrkReport {
    /// The report in wrk's output: its last line that is a JSON object.
    pub fn from_output(output: &str) -> Result<Self> {
        let line = output
            .lines()
            .rev()
            .find(|line| line.trim_start().starts_with('{'))
            .context("no JSON line from scripts/bench/report.lua in wrk's output")?;
        serde_json::from_str(line).with_context(|| format!("cannot read wrk's report {line:?}"))
    }

    pub fn seconds(&self) -> f64 {
        self.duration_us as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
Running 5s test @ http://127.0.0.1:8000/limited_endpoint
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.50ms  400.00us  11.34ms   80.00%
  200836 requests in 5.00s, 70.21MB read
Requests/sec:  40167.20
Transfer/sec:     14.04MB
{\"requests\": 200836, \"duration_us\": 5000012, \"latency_us\": {\"p50\": 1470, \"p99\": 3120, \"max\": 11340}, \"errors\": {\"connect\": 0, \"read\": 1, \"write\": 0, \"timeout\": 2, \"status\": 7}}
";

    #[test]
    fn the_report_line_is_found_after_wrks_own_output() {
        let report = WrkReport::from_output(OUTPUT).unwrap();
        assert_eq!(report.requests, 200_836);
        assert_eq!(report.latency_us.p99, 3120.0);
        assert_eq!(report.errors.socket(), 3);
        assert_eq!(report.errors.status, 7);
        assert!((report.seconds() - 5.000012).abs() < 1e-9);
    }

    #[test]
    fn output_without_the_report_is_an_error() {
        let error = WrkReport::from_output("unable to connect to 127.0.0.1:8000\n").unwrap_err();
        assert!(error.to_string().contains("report.lua"), "{error}");
    }
}
