//! What the processes under test answer: a GET on loopback, an instance's `/metrics`,
//! Nginx's access log, wrk's JSON line (scripts/bench/report.lua), an instance's port.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::LOOPBACK;
use crate::spawn::{Started, tail, wait_until};

/// GET `path` from `LOOPBACK:port` within 5 s: the status, the headers (names in lower
/// case) and the body.
pub fn get(port: u16, path: &str) -> Result<minreq::Response> {
    let url = format!("http://{LOOPBACK}:{port}{path}");
    minreq::get(&url)
        .with_timeout(5)
        .send()
        .with_context(|| format!("GET {url}"))
}

pub fn status(port: u16, path: &str) -> Option<i32> {
    get(port, path).ok().map(|r| r.status_code)
}

pub fn header(response: &minreq::Response, name: &str) -> Option<String> {
    response.headers.get(name).cloned()
}

pub fn json(port: u16, path: &str) -> Result<serde_json::Value> {
    serde_json::from_str(get(port, path)?.as_str()?)
        .with_context(|| format!("GET {path} on {port}: not JSON"))
}

pub fn port_open(port: u16) -> bool {
    let address = (std::net::Ipv4Addr::LOCALHOST, port).into();
    std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok()
}

/// Responses by status: 200, 429, anything else, and 499 (a client, the load generator
/// at its end, closed the connection first), as Nginx's log or an instance counted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub ok: u64,
    pub denied: u64,
    pub other: u64,
    pub closed: u64,
}

impl Counts {
    fn add(&mut self, status: &str, n: u64) {
        match status {
            "200" => self.ok += n,
            "429" => self.denied += n,
            "499" => self.closed += n,
            _ => self.other += n,
        }
    }

    pub fn total(&self) -> u64 {
        self.ok + self.denied + self.other
    }

    pub fn minus(&self, earlier: &Self) -> Self {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Self {
            ok: d(self.ok, earlier.ok),
            denied: d(self.denied, earlier.denied),
            other: d(self.other, earlier.other),
            closed: d(self.closed, earlier.closed),
        }
    }

    /// What `ratelimit_http_requests_total{route, status}` of an instance's /metrics
    /// says about `route`.
    pub fn from_metrics(metrics: &str, route: &str) -> Self {
        let mut counts = Self::default();
        let route = format!("route=\"{route}\"");
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("ratelimit_http_requests_total{"))
        {
            let (series, value) = line.rsplit_once(' ').unwrap_or_default();
            let labels: Vec<&str> = series.split(['{', ',', '}']).collect();
            if labels.contains(&route.as_str()) {
                let status = labels
                    .iter()
                    .find_map(|l| l.strip_prefix("status=\"")?.strip_suffix('"'));
                counts.add(
                    status.unwrap_or("?"),
                    value.parse::<f64>().unwrap_or(0.0) as u64,
                );
            }
        }
        counts
    }

    /// What an instance on `port` counted for `route`.
    pub fn of_instance(port: u16, route: &str) -> Self {
        get(port, "/metrics")
            .ok()
            .and_then(|r| Some(Self::from_metrics(r.as_str().ok()?, route)))
            .unwrap_or_default()
    }

    /// The statuses of an access log's lines (combined format: the status follows the
    /// request's closing quote) after byte `offset`.
    pub fn from_access_log(log: &Path, offset: u64) -> Result<Self> {
        let mut counts = Self::default();
        let Ok(mut file) = File::open(log) else {
            return Ok(counts);
        };
        file.seek(SeekFrom::Start(offset))?;
        for line in BufReader::new(file).lines() {
            let line = line?;
            counts.add(
                line.split('"')
                    .nth(2)
                    .and_then(|rest| rest.split_whitespace().next())
                    .unwrap_or("?"),
                1,
            );
        }
        Ok(counts)
    }
}

/// wrk's summary, as scripts/bench/report.lua prints it: one line of JSON after wrk's own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WrkReport {
    pub requests: u64,
    pub duration_us: u64,
    pub latency_us: WrkLatency,
    pub errors: WrkErrors,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WrkLatency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct WrkErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// Responses with a status of 400 or more (429 included).
    pub status: u64,
}

impl WrkReport {
    /// The report in wrk's output: its last line that is a JSON object.
    pub fn from_output(output: &str) -> Result<Self> {
        let line = output
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("no JSON line from scripts/bench/report.lua in wrk's output")?;
        serde_json::from_str(line).with_context(|| format!("cannot read wrk's report {line:?}"))
    }

    /// Connect, read, write and timeout errors: requests that got no answer.
    pub fn socket_errors(&self) -> u64 {
        let e = &self.errors;
        e.connect + e.read + e.write + e.timeout
    }
}

/// Waits until an instance started with PORT=0 says its port and answers /ready.
pub fn wait_for_instance(instance: &mut Started, log: &Path) -> Result<u16> {
    let mut port = None;
    wait_until(
        "the instance logs its port and answers /ready",
        Duration::from_secs(15),
        || {
            port = listening_port(&std::fs::read_to_string(log).unwrap_or_default());
            !instance.running() || port.is_some_and(|p| status(p, "/ready") == Some(200))
        },
    )?;
    port.filter(|_| instance.running())
        .with_context(|| format!("it exited: {}", tail(log, 5)))
}

/// The port of the instance's "listening on port N" log line.
pub fn listening_port(log: &str) -> Option<u16> {
    let rest = log.split("listening on port ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_status_for_one_route() {
        let metrics = "# TYPE ratelimit_http_requests_total counter\n\
            ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"200\"} 120\n\
            ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"429\"} 30\n\
            ratelimit_http_requests_total{route=\"/limited_endpoint\",status=\"503\"} 2\n\
            ratelimit_http_requests_total{route=\"/\",status=\"200\"} 999\n";
        let counts = Counts::from_metrics(metrics, "/limited_endpoint");
        assert_eq!(
            counts,
            Counts {
                ok: 120,
                denied: 30,
                other: 2,
                closed: 0
            }
        );
        assert_eq!(Counts::from_metrics(metrics, "/").total(), 999);
    }

    #[test]
    fn access_log_lines_are_counted_by_status() {
        let path = std::env::temp_dir().join(format!("bench-access-{}.log", std::process::id()));
        let line = |status| {
            format!(
                "127.0.0.1 - - [27/Nov/2026:11:49:00 +0000] \"GET / HTTP/1.1\" {status} 0 \"-\" \"-\"\n"
            )
        };
        std::fs::write(&path, ["200", "429", "499", "502"].map(line).concat()).unwrap();
        let counts = Counts::from_access_log(&path, 0).unwrap();
        assert_eq!(
            counts,
            Counts {
                ok: 1,
                denied: 1,
                other: 1,
                closed: 1
            }
        );
        assert_eq!(
            Counts::from_access_log(&path, line("200").len() as u64)
                .unwrap()
                .ok,
            0
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_report_line_is_found_after_wrks_own_output() {
        let output = "Running 5s test @ http://127.0.0.1:8000/\nRequests/sec:  40167.20\n\
            {\"requests\": 200836, \"duration_us\": 5000012, \"latency_us\": {\"p50\": 1470, \"p99\": 3120, \"max\": 11340}, \"errors\": {\"connect\": 0, \"read\": 1, \"write\": 0, \"timeout\": 2, \"status\": 7}}\n";
        let report = WrkReport::from_output(output).unwrap();
        assert_eq!(
            (
                report.requests,
                report.socket_errors(),
                report.errors.status
            ),
            (200_836, 3, 7)
        );
        assert!(WrkReport::from_output("unable to connect\n").is_err());
    }

    #[test]
    fn the_port_is_read_from_the_instances_log() {
        let log = "[.. INFO ratelimiter] starting\n[.. INFO ratelimiter] listening on port 41234\n";
        assert_eq!(listening_port(log), Some(41234));
        assert_eq!(listening_port("starting\n"), None);
    }
}
